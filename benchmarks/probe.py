"""Measuring a stage from inside its process: wall time, resident memory, and where a Dagster
run spent both, step by step (from the run's STEP_START / STEP_SUCCESS events)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import dagster as dg

STATUS = Path("/proc/self/status")


def _status_kb(name: str) -> int:
    """A memory line of /proc/self/status (``VmRSS``, ``VmHWM``), in kB."""
    for line in STATUS.read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(name)


def peak_rss_mb() -> float:
    """This process's peak resident set so far (VmHWM), in MB."""
    return round(_status_kb("VmHWM") / 1024, 1)


@dataclass
class RssSampler:
    """Samples this process's resident set (VmRSS) every ``interval`` seconds in a thread, so a
    peak can be told per step of a run (VmHWM only knows the process's all-time peak)."""

    interval: float = 0.05
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), _status_kb("VmRSS")))
            self._stop.wait(self.interval)

    def peak_mb(self, start: float = 0.0, end: float = float("inf")) -> float | None:
        """The highest sample taken between ``start`` and ``end`` (epoch seconds), in MB."""
        inside = [kb for t, kb in self.samples if start <= t <= end]
        return round(max(inside) / 1024, 1) if inside else None


@dataclass(frozen=True)
class Step:
    """One step of a Dagster run: an asset or a check."""

    key: str
    seconds: float
    peak_rss_mb: float | None
    status: str

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.key,
            "seconds": round(self.seconds, 3),
            "peak_rss_mb": self.peak_rss_mb,
            "status": self.status,
        }


def run_steps(instance: dg.DagsterInstance, run_id: str, sampler: RssSampler) -> list[Step]:
    """Each step of a run, in start order: its wall time from the step events and the highest
    resident set sampled while it ran."""
    started: dict[str, float] = {}
    ended: dict[str, tuple[float, str]] = {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None or event.step_key is None:
            continue
        if event.event_type == dg.DagsterEventType.STEP_START:
            started[event.step_key] = entry.timestamp
        elif event.event_type in (
            dg.DagsterEventType.STEP_SUCCESS,
            dg.DagsterEventType.STEP_FAILURE,
            dg.DagsterEventType.STEP_SKIPPED,
        ):
            status = event.event_type.value.removeprefix("STEP_").lower()
            ended[event.step_key] = (entry.timestamp, status)
    steps = []
    for key, start in sorted(started.items(), key=lambda item: item[1]):
        end, status = ended.get(key, (time.time(), "unfinished"))
        steps.append(Step(key, end - start, sampler.peak_mb(start, end), status))
    return steps
