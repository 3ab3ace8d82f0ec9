"""Splits a hashed lock file in two: the named packages, and all the others.

Used where one package must be installed after the rest (DeepSpeed's sdist builds against the
installed torch). Standard library only: it runs before any environment exists.
Usage: split_lock.py LOCK NAME[,NAME...] REST_OUT NAMED_OUT
"""

import re
import sys
from pathlib import Path


def split_lock(text: str, names: set[str]) -> tuple[str, str]:
    """Returns (others, named): each requirement keeps its continuation lines (hashes, comments)."""
    rest: list[str] = []
    named: list[str] = []
    target = rest
    for line in text.splitlines(keepends=True):
        start = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", line)
        if start:
            target = named if _normalise(start.group(1)) in names else rest
        target.append(line)
    return "".join(rest), "".join(named)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


if __name__ == "__main__":
    lock, wanted, rest_out, named_out = sys.argv[1:5]
    names = {_normalise(n) for n in wanted.split(",")}
    rest, named = split_lock(Path(lock).read_text(), names)
    if not named:
        sys.exit(f"split_lock: {wanted} not in {lock}")
    Path(rest_out).write_text(rest)
    Path(named_out).write_text(named)
