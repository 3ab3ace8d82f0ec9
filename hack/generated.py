"""The generators' one way to write their files, or with `--check` to report that they drifted
(`make lint` runs every generator with `--check`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_or_check(targets: Sequence[Path], text: str, argv: Sequence[str], make_target: str) -> int:
    """Writes text to each target that differs; with --check writes nothing and returns 1 when any
    differs, naming the files and the make target that regenerates them."""
    stale = [path for path in targets if not path.exists() or path.read_text() != text]
    if "--check" in argv:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is out of date: run `make {make_target}`", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0
