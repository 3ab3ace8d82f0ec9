"""`instructune watch`: a tune followed until it ends (Succeeded or Failed).

The tune is read every `interval` seconds (a GET of the tune; the job reports progress at most
every 10 s, so a watch stream would add nothing). In a terminal the view is a live Rich display;
otherwise (a CI log, a pipe) one line is printed per change.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from instructune_cli.connect import CliError
from instructune_cli.progress import Sample, WatchView, view

_STYLE = {"Succeeded": "bold green", "Failed": "bold red", "Suspended": "yellow"}


class WatchTimeout(CliError):
    """The tune had not ended when the watch's time was up."""


def render(name: str, current: WatchView) -> RenderableType:
    grid = Table.grid(padding=(0, 2))
    row: list[RenderableType] = [
        Text(name, style="bold"),
        Text(current.phase, style=_STYLE.get(current.phase, "cyan")),
    ]
    if current.total:
        row.append(ProgressBar(total=current.total, completed=current.step or 0, width=30))
        row.append(Text(f"{current.step or 0}/{current.total}"))
    if current.loss is not None:
        row.append(Text(f"loss {current.loss:.4g}"))
    if current.tokens_per_second is not None:
        row.append(Text(f"{current.tokens_per_second:.0f} tok/s"))
    if current.eta and not current.ended:
        row.append(Text(f"eta {current.eta}"))
    for _ in row:
        grid.add_column()
    grid.add_row(*row)
    return Group(grid, Text(current.message, style="dim")) if current.message else grid


class _Display:
    """A live view in a terminal; elsewhere, a line per change."""

    def __init__(self, name: str, console: Console) -> None:
        self.name, self.console, self.printed = name, console, ""
        self.live = Live(console=console, refresh_per_second=4) if console.is_terminal else None
        if self.live is not None:
            self.live.start()

    def show(self, current: WatchView) -> None:
        if self.live is not None:
            self.live.update(render(self.name, current), refresh=True)
        elif current.line() != self.printed:
            self.printed = current.line()
            self.console.print(self.printed, markup=False, highlight=False, soft_wrap=True)

    def note(self, text: str) -> None:
        if self.live is None:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def follow(
    name: str,
    read: Callable[[], dict[str, Any] | None],
    console: Console,
    interval: float = 2.0,
    timeout: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> WatchView:
    """Reads the tune (`read`: the object, or None once it is gone) until it ends; returns its last
    view. Raises WatchTimeout after `timeout` seconds, CliError when the tune is deleted."""
    started, samples = clock(), list[Sample]()
    display = _Display(name, console)
    try:
        while True:
            try:
                tune = read()
            except httpx.TransportError as err:  # the API server out of reach for a moment
                display.note(f"(API server unreachable: {err}; retrying)")
                tune = {}
            if tune is None:
                raise CliError(f"{name} was deleted while it was watched")
            if tune:
                status = tune.get("status") or {}
                step = (status.get("progress") or {}).get("step")
                if step is not None and (not samples or samples[-1].step != step):
                    samples.append(Sample(clock(), step))
                current = view(status, samples)
                display.show(current)
                if current.ended:
                    return current
            if timeout is not None and clock() - started >= timeout:
                raise WatchTimeout(f"{name} had not ended after {timeout:g}s")
            sleep(interval)
    finally:
        display.close()
