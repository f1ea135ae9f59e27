"""Dotted version numbers compared numerically, and how far one is from another ("major 40 behind")."""

import re
from dataclasses import dataclass

_LEADING_NUMBER = re.compile(r"\d+")
LEVELS = ("major", "minor", "patch")


def parse_version(value: str) -> tuple[int, ...] | None:
    """The numeric dotted parts of a version, left to right, up to the first part that is not a plain number:
    '550.127.05' -> (550, 127, 5), '0.6.3.post1' -> (0, 6, 3), '0.6.3+cu124' -> (0, 6, 3), 'v2.4' -> (2, 4).
    None when the value does not start with a number."""
    parts: list[int] = []
    for piece in value.strip().removeprefix("v").split("."):
        match = _LEADING_NUMBER.match(piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):
            break
    return tuple(parts) or None


def _padded(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Missing trailing parts count as zero, so 12.4 equals 12.4.0."""
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)), b + (0,) * (width - len(b))


def compare(a: str, b: str) -> int:
    """-1, 0 or 1 as version a is older than, equal to or newer than version b. ValueError if either has no
    numeric parts."""
    pa, pb = parse_version(a), parse_version(b)
    if pa is None or pb is None:
        raise ValueError(f"not a dotted version: {a if pa is None else b!r}")
    pa, pb = _padded(pa, pb)
    return (pa > pb) - (pa < pb)


def level_name(index: int) -> str:
    return LEVELS[index] if index < len(LEVELS) else f"part {index + 1}"


@dataclass(frozen=True)
class Drift:
    """Where a version departs from its baseline: the first differing part, by how much, and which way."""

    direction: int  # -1 behind the baseline, 0 on it, 1 ahead of it
    level: int = 0  # index of the first part that differs (0 = major)
    amount: int = 0  # absolute difference of that part

    def __str__(self) -> str:
        if self.direction == 0:
            return "on baseline"
        return f"{level_name(self.level)} {self.amount} {'ahead' if self.direction > 0 else 'behind'}"


def drift(actual: str, baseline: str) -> Drift | None:
    """How far `actual` is from `baseline`, e.g. drift('550.127.05', '590.48.01') is 'major 40 behind' and
    drift('590.48.01', '590.44.01') is 'minor 4 ahead'. None when either is not a dotted version."""
    pa, pb = parse_version(actual), parse_version(baseline)
    if pa is None or pb is None:
        return None
    pa, pb = _padded(pa, pb)
    for index, (x, y) in enumerate(zip(pa, pb, strict=True)):
        if x != y:
            return Drift(direction=1 if x > y else -1, level=index, amount=abs(x - y))
    return Drift(direction=0)
