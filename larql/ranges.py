"""Sets of expert or layer ids written as inclusive ranges: '0-63', '0-3,8,10-11'.

The one place ranges are parsed and formatted: CLI flags (--experts, --layers), shard maps,
error messages, index.json, and (as [first, last] pairs) hello replies. Validating pairs that
arrive over the wire is protocol.py's job; it builds on `to_pairs`/`from_pairs` here.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import LarqlError


class RangeError(LarqlError, ValueError):
    """A range text is malformed or names ids outside the allowed 0..limit-1."""


def split_span(text: str, what: str = "range") -> tuple[int, int]:
    """'A-B' or 'N' -> (A, B), inclusive; the order of A and B is not checked."""
    part = text.strip()
    try:
        if "-" in part:
            a, b = part.split("-", 1)
            return int(a), int(b)
        return int(part), int(part)
    except ValueError:
        raise RangeError(f"bad {what} {part!r}: expected A-B or N") from None


def parse_span(text: str, what: str = "range") -> tuple[int, int]:
    """'A-B' or 'N' -> (A, B), inclusive, A <= B."""
    lo, hi = split_span(text, what)
    if lo > hi:
        part = text.strip()
        raise RangeError(f"bad {what} {part!r}: start {lo} is after end {hi}")
    return lo, hi


def parse(text: str, limit: int | None = None, what: str = "range") -> list[int]:
    """'0-63' or '0-3,8,10-11' -> sorted ids, each in [0, limit) (any id >= 0 if limit is None)."""
    text = text.strip()
    if not text:
        raise RangeError(f"empty {what}")
    out: set[int] = set()
    for part in text.split(","):
        lo, hi = parse_span(part, what)
        if lo < 0 or (limit is not None and hi >= limit):
            bound = f"0-{limit - 1}" if limit is not None else "0 and up"
            raise RangeError(f"bad {what} {part.strip()!r}: out of range, outside {bound}")
        out.update(range(lo, hi + 1))
    return sorted(out)


def to_pairs(values: Iterable[int]) -> list[list[int]]:
    """[0,1,2,5] -> [[0,2],[5,5]]: inclusive [first, last] pairs, sorted."""
    out: list[list[int]] = []
    for v in sorted(values):
        if out and v == out[-1][1] + 1:
            out[-1][1] = v
        elif not out or v != out[-1][1]:
            out.append([v, v])
    return out


def from_pairs(pairs: Iterable[tuple[int, int] | list[int]]) -> list[int]:
    """[[0,2],[5,5]] -> [0,1,2,5] (sorted, duplicates dropped; the pairs are trusted)."""
    return sorted({v for first, last in pairs for v in range(first, last + 1)})


def text(values: Iterable[int]) -> str:
    """[0,1,2,5] -> '0-2,5'; no values -> 'none'."""
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in to_pairs(values)) or "none"
