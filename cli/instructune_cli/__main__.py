"""`python -m instructune_cli` and the `instructune` console script."""

from __future__ import annotations

from instructune_cli.app import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
