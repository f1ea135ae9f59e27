"""Parse the text table that ``dcgmi diag -r N`` prints into typed results.

Layouts checked: the table printer ``dcgmi/Diag.cpp`` of github.com/NVIDIA/DCGM, read at tags
v2.4.7, v3.3.9 and v4.6.0 (commit 72fa3feaa67d716a75323a8f47c34ff3ee73f824), and the real captures
in ``tests/fixtures/added/`` (sources in ``tests/fixtures/ADDED.md``):

* DCGM 2.x: no Metadata block, a ``Blacklist`` row, a failed Deployment check followed by
  ``Error`` rows (capture: facebookresearch/gcm, ``-r 4``).
* DCGM 3.0-3.3 (captures from 3.1.8, 3.3.3, 3.3.8, 3.3.9): a Metadata block, ``Denylist``, per-GPU
  results folded into the result column (``Pass - All``; ``Pass - GPUs: 1, 2`` then
  ``Fail - GPU: 0`` on a continuation row), ``Warning`` / ``Info`` / ``Error`` rows.
* DCGM 4.x (captures from 4.2.3, 4.4.1, 4.4.2): lower-case plugin names (``software``, ``memory``,
  ``pcie``), the test's overall result on its own row and then one ``GPU0: Pass`` row per entity,
  ``Warning`` (test-wide) and ``Warning: GPU0`` (per-entity) rows.

Every row is ``| <name, 25 wide> | <info, 46 wide> |``. DCGM wraps a long message into
45-character chunks cut mid-word (``... totaling 13.3 second`` / ``s started at ...``), so
continuation rows are joined without a separator, keeping each chunk's own spaces.

Not supported: the JSON form (``dcgmi diag -j``). No complete real capture of it was found to check
a parser against, so JSON input raises ``ValueError`` rather than being guessed at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

Result = Literal["pass", "fail", "warn", "skip"]

_RESULTS: dict[str, Result] = {
    "Pass": "pass",
    "Fail": "fail",
    "Warn": "warn",
    "Skip": "skip",
    "Not Run": "skip",
}
_SEVERITY: dict[Result, int] = {"pass": 0, "skip": 1, "warn": 2, "fail": 3}

# "Pass", "Fail - All", "Pass - GPUs: 0, 2, 3": the result word, then the rest of the cell.
_RESULT_CELL = re.compile(r"^(Pass|Fail|Warn|Skip|Not Run)(?=$|[\s:-])\s*(?:-\s*)?(.*)$")
# A DCGM 3.x per-GPU continuation row: "Fail - GPU: 0", "Pass - GPUs: 1, 2, 3".
_GPU_SPLIT_CELL = re.compile(r"^(Pass|Fail|Warn|Skip) - (?:All|GPUs?: \d+(?:, ?\d+)*)$")
# A DCGM 4.x per-entity row: "GPU0: Pass", "CPU1: Skip".
_ENTITY_CELL = re.compile(r"^[A-Za-z][A-Za-z_]*\d+: (Pass|Fail|Warn|Skip|Not Run)$")
# "Warning", "Info", "Error", or DCGM 4.x "Warning: GPU0".
_MESSAGE_LABEL = re.compile(r"^(Warning|Info|Error)(?:: ?\S.*)?$")
# "|-----  Deployment  --------+----...|" and "+-----  Hardware  ----------+----...+".
_SECTION = re.compile(r"^[|+]-{3,}\s+([A-Za-z](?:[A-Za-z ]*[A-Za-z])?)\s+-+\+-+[|+]\s*$")
_BORDER = re.compile(r"^\+[-=]+\+[-=]+\+\s*$")
_ROW = re.compile(r"^\|(?P<name>[^|]*)\|(?P<info>.*)$")

_CHUNK = 45  # DATA_INFO_TAG_LEN in dcgmi/Diag.cpp: a wrapped message is cut every 45 characters


@dataclass(frozen=True)
class DiagTest:
    """One test row of the table, with its continuation rows folded in.

    ``detail`` is everything after the result word on the test's own row (``"All"``,
    ``"GPUs: 1, 2"``, or empty) followed, one per line, by per-GPU result rows
    (``"Fail - GPU: 0"``, ``"GPU0: Pass"``) and messages (``"Warning: <text>"``). ``messages``
    holds the message texts alone.
    """

    name: str
    result: Result
    detail: str
    category: str = ""
    messages: tuple[str, ...] = ()


@dataclass(frozen=True)
class DiagReport:
    tests: list[DiagTest]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def failures(self) -> list[DiagTest]:
        return [t for t in self.tests if t.result == "fail"]

    @property
    def warnings(self) -> list[DiagTest]:
        return [t for t in self.tests if t.result == "warn"]

    @property
    def passed(self) -> bool:
        """No test failed. A warning or a skipped test is not a failure."""
        return not self.failures

    @property
    def dcgm_version(self) -> str | None:
        return self.metadata.get("DCGM Version")


@dataclass
class _Message:
    label: str
    chunks: list[str]

    def text(self) -> str:
        if not self.chunks:
            return ""
        return ("".join(self.chunks[:-1]) + self.chunks[-1].rstrip()).strip()


@dataclass
class _Test:
    name: str
    result: Result
    category: str
    parts: list[str | _Message] = field(default_factory=list)

    def worsen(self, result: Result) -> None:
        if _SEVERITY[result] > _SEVERITY[self.result]:
            self.result = result

    def freeze(self) -> DiagTest:
        lines: list[str] = []
        messages: list[str] = []
        for part in self.parts:
            if isinstance(part, _Message):
                text = part.text()
                messages.append(text)
                lines.append(f"{part.label}: {text}")
            elif part:
                lines.append(part)
        return DiagTest(self.name, self.result, "\n".join(lines), self.category, tuple(messages))


def _cell(info: str) -> tuple[str, str]:
    """(stripped text, exact chunk) of an info cell; the chunk keeps the message's own spaces."""
    body = info[1:] if info.startswith(" ") else info
    trimmed = body.rstrip()
    if trimmed.endswith("|"):
        body = trimmed[:-1]
        chunk = body[:_CHUNK] if len(body) > _CHUNK else body.rstrip()
    else:  # copy-pasted and cut short: no closing bar, so trailing padding can't be told apart
        body = trimmed
        chunk = body
    return body.strip(), chunk


def _no_table(text: str) -> ValueError:
    stripped = text.strip()
    if not stripped:
        return ValueError("empty dcgmi diag output: no result table")
    if stripped.startswith("{"):
        return ValueError(
            "dcgmi diag JSON output (-j) is not supported; run `dcgmi diag -r N` without -j"
        )
    first = stripped.splitlines()[0][:200]
    return ValueError(f"no dcgmi diag result table in the output (it starts with {first!r})")


def parse_dcgmi_diag(text: str) -> DiagReport:
    """Parse ``dcgmi diag`` text output (any run level, DCGM 2.x to 4.x).

    Raises ``ValueError`` when the text holds no result table: empty output, ``dcgmi: command not
    found``, ``Error: Unable to connect to host engine``, JSON output, or a table with no test rows.
    A ``Warning`` or ``Error`` row that belongs to no test counts as a failed test of that name, so
    a damaged table never reads as healthy.
    """
    tests: list[_Test] = []
    metadata: dict[str, str] = {}
    category = ""
    header_seen = False
    current: _Test | None = None
    message: _Message | None = None

    for line in text.splitlines():
        section = _SECTION.match(line)
        if section:
            category = section.group(1)
            current, message = None, None
            continue
        row = _ROW.match(line)
        if row is None or _BORDER.match(line):
            current, message = None, None
            continue
        name = row.group("name").strip()
        info, chunk = _cell(row.group("info"))

        if name == "Diagnostic" and info == "Result":
            header_seen = True
            current, message = None, None
            continue

        if name and _MESSAGE_LABEL.match(name):
            if current is None:
                if name.startswith("Info"):
                    message = None
                    continue
                current = _Test(name.split(":", 1)[0], "fail", category)
                tests.append(current)
            message = _Message(name, [chunk])
            current.parts.append(message)
            continue

        if not name:
            per_gpu = _GPU_SPLIT_CELL.match(info) or _ENTITY_CELL.match(info)
            if per_gpu and current is not None:
                current.worsen(_RESULTS[per_gpu.group(1)])
                current.parts.append(info)
                message = None
            elif message is not None:
                message.chunks.append(chunk)
            elif current is not None and info:
                current.parts.append(info)
            continue

        result = _RESULT_CELL.match(info)
        message = None
        if result is None:
            metadata[name] = info
            current = None
            continue
        current = _Test(name, _RESULTS[result.group(1)], category)
        if result.group(2).strip():
            current.parts.append(result.group(2).strip())
        tests.append(current)

    if not tests:
        if header_seen:
            raise ValueError("dcgmi diag result table has no test rows")
        raise _no_table(text)
    return DiagReport([t.freeze() for t in tests], metadata)
