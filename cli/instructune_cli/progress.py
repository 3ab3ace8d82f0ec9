"""Pure: what `instructune watch` shows of a tune at one moment, and whether it has ended.

The phase and the numbers are the status's own (the job's `status.progress`, the operator's phase
and conditions). The ETA is the job's while it trains (it knows when its attempt started); when
the job has not reported one, it is estimated from the steps this watch saw go by.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from instructune_jobs.report import format_eta
from instructune_operator.api import (
    CONDITION_CLUSTER_READY,
    CONDITION_SERVING,
    CONDITION_SUCCEEDED,
    CONDITION_TRAINING,
    CONDITION_VALIDATED,
    PHASE_FAILED,
    PHASE_SUCCEEDED,
    TERMINAL_PHASES,
)

# The condition that says most about each phase (a Failed tune's Succeeded=False says why; one
# refused at validation has only Validated=False).
_TELLING = {
    "Pending": (CONDITION_VALIDATED,),
    "Provisioning": (CONDITION_CLUSTER_READY,),
    "Training": (CONDITION_TRAINING,),
    "Evaluating": (CONDITION_TRAINING,),
    "Deploying": (CONDITION_SERVING,),
    "Suspended": (CONDITION_TRAINING,),
    PHASE_SUCCEEDED: (CONDITION_SUCCEEDED,),
    PHASE_FAILED: (CONDITION_SUCCEEDED, CONDITION_VALIDATED),
}

# Steps seen in the last this many seconds make the estimate: recent speed, not the average since
# a slow start (data preparation, model download).
ETA_WINDOW_S = 120.0


@dataclass(frozen=True)
class Sample:
    """A step seen at a time (seconds on a monotonic clock)."""

    time: float
    step: int


@dataclass(frozen=True)
class WatchView:
    phase: str
    message: str
    step: int | None
    total: int | None
    loss: float | None
    tokens_per_second: float | None
    eta: str | None

    @property
    def ended(self) -> bool:
        return self.phase in TERMINAL_PHASES

    @property
    def succeeded(self) -> bool:
        return self.phase == PHASE_SUCCEEDED

    def line(self) -> str:
        """One line of it, for a log (what the live display shows, as text)."""
        parts = [self.phase]
        if self.step is not None:
            parts.append(f"step {self.step}/{self.total}" if self.total else f"step {self.step}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4g}")
        if self.tokens_per_second is not None:
            parts.append(f"{self.tokens_per_second:.0f} tokens/s")
        if self.eta and not self.ended:
            parts.append(f"eta {self.eta}")
        if self.message:
            parts.append(self.message)
        return "  ".join(parts)


def telling_message(status: dict[str, Any]) -> str:
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    for type_ in _TELLING.get(status.get("phase") or "", ()):
        condition = conditions.get(type_)
        if condition is not None:
            return f"{condition.get('reason', '')}: {condition.get('message', '')}".strip(": ")
    return ""


def estimate_eta(samples: Sequence[Sample], total: int | None) -> float | None:
    """Seconds left at the speed of the steps seen in the last ETA_WINDOW_S, or None when the
    samples say nothing (no total, fewer than two distinct steps, no time gone by)."""
    if not total or not samples:
        return None
    latest = first = samples[-1]
    # Back from the latest, while in the window and steps only go up (a retried attempt restarts
    # from its checkpoint: the steps before that say nothing of this attempt's speed).
    for sample in reversed(samples[:-1]):
        if sample.time < latest.time - ETA_WINDOW_S or sample.step > first.step:
            break
        first = sample
    if latest.step <= first.step or latest.time <= first.time:
        return None
    rate = (latest.step - first.step) / (latest.time - first.time)
    return max(0, total - latest.step) / rate


def view(status: dict[str, Any], samples: Sequence[Sample] = ()) -> WatchView:
    """The watch's view of a status; `samples` are the steps seen so far by this watch."""
    progress = status.get("progress") or {}
    total = progress.get("totalSteps")
    phase = status.get("phase") or "Pending"
    eta = progress.get("eta") if phase == "Training" else None
    if phase == "Training" and not eta:
        eta = format_eta(estimate_eta(samples, total))
    return WatchView(
        phase=phase,
        message=telling_message(status),
        step=progress.get("step"),
        total=total,
        loss=progress.get("loss"),
        tokens_per_second=progress.get("tokensPerSecond"),
        eta=eta,
    )
