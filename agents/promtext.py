"""Prometheus text exposition → plain sample lists, using prometheus_client's own parser.

Engines publish hundreds of families we do not need (a vLLM V1 scrape is ~50 KB), so lines are first filtered by
metric-name prefix (a plain ``str.startswith``; the parsing itself is prometheus_client's). Input that the parser
rejects (a literal ``...`` line, a bad value) costs only the family it sits in: the text is split at family headers
and re-parsed per block, every bad block is logged and skipped, every complete block is kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class ParseResult:
    # sample name -> list of (labels, value); only finite values are kept
    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def get(self, name: str) -> list[tuple[dict[str, str], float]]:
        return self.samples.get(name, [])


def _metric_name(line: str) -> str:
    end = len(line)
    for sep in ("{", " ", "\t"):
        pos = line.find(sep)
        if 0 <= pos < end:
            end = pos
    return line[:end]


def filter_lines(text: str, prefixes: tuple[str, ...] | None) -> str:
    """Keep only comment and sample lines for metric names starting with one of ``prefixes`` (None: keep all)."""
    if prefixes is None:
        return text
    kept = []
    for line in text.splitlines():
        if not line or line.isspace():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE") and parts[2].startswith(prefixes):
                kept.append(line)
            continue
        if _metric_name(line).startswith(prefixes) or (not line[0].isalpha() and line[0] not in "_:"):
            # non-metric garbage ('...') is kept so that the parser reports it rather than us hiding it
            kept.append(line)
    return "\n".join(kept) + "\n"


def _collect(families: Iterable, result: ParseResult) -> None:
    for fam in families:
        for s in fam.samples:
            value = float(s.value)
            if not math.isfinite(value):
                result.errors.append(f"non-finite value for {s.name}{s.labels}: skipped")
                continue
            labels = dict(s.labels)
            result.samples.setdefault(s.name, []).append((labels, value))
            if fam.type == "counter" and s.name == fam.name + "_total":
                # the parser appends _total to typed counters; keep the name as exposed too (Triton, TGI)
                result.samples.setdefault(fam.name, []).append((labels, value))


def _blocks(text: str) -> list[str]:
    """Split exposition text into per-family blocks at HELP/TYPE headers (a new name starts a new block)."""
    blocks: list[list[str]] = [[]]
    current: str | None = None
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE") and parts[2] != current:
                current = parts[2]
                blocks.append([])
        blocks[-1].append(line)
    return ["\n".join(b) + "\n" for b in blocks if b]


def parse(text: str, prefixes: tuple[str, ...] | None = None) -> ParseResult:
    """Parse exposition text; problems are returned in ``errors`` (the caller logs them), never raised."""
    from prometheus_client.parser import text_string_to_metric_families

    text = filter_lines(text, prefixes)
    result = ParseResult()
    try:
        fams = list(text_string_to_metric_families(text))
    except Exception:  # any parser failure: fall back to per-block parsing below
        fams = None
    if fams is not None:
        _collect(fams, result)
    else:
        _parse_blocks(text, result)
    return result


def _parse_blocks(text: str, result: ParseResult) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    for block in _blocks(text):
        try:
            block_fams = list(text_string_to_metric_families(block))
        except Exception as exc:  # this block is unreadable: skip it, keep the others
            first = block.split("\n", 1)[0][:120]
            msg = f"unparseable exposition block starting {first!r}: {exc}; block skipped"
            result.errors.append(msg)
            continue
        _collect(block_fams, result)
