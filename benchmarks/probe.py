"""Measuring a stage from inside its process: wall time, resident memory, CPU time (its own
and a local Postgres server's), and where a Dagster run spent them, step by step (from the
run's STEP_START / STEP_SUCCESS events)."""

from __future__ import annotations

import bisect
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NamedTuple

import dagster as dg

STATUS = Path("/proc/self/status")
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
"""Clock ticks per second, the unit of the CPU times in ``/proc/<pid>/stat``."""


def _status_kb(name: str) -> int:
    """A memory line of /proc/self/status (``VmRSS``, ``VmHWM``), in kB."""
    for line in STATUS.read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(name)


def peak_rss_mb() -> float:
    """This process's peak resident set so far (VmHWM), in MB."""
    return round(_status_kb("VmHWM") / 1024, 1)


def cpu_seconds() -> float:
    """CPU time (user + system, every thread) this process has used so far."""
    used = os.times()
    return used.user + used.system


def _stat_fields(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first); None when the
    process is gone or not visible."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


@dataclass(frozen=True)
class ServerCpu:
    """The CPU time of a Postgres server on this machine: its postmaster's, that of every
    process it runs now (backends, parallel workers, background processes) and of those it
    has reaped. All of the server's work, for every database it serves."""

    postmaster: int

    @classmethod
    def of_backend(cls, backend_pid: int) -> ServerCpu | None:
        """The server of the backend ``backend_pid`` (``SELECT pg_backend_pid()``); None when
        that process is not on this machine."""
        fields = _stat_fields(backend_pid)
        return None if fields is None else cls(int(fields[1]))

    def seconds(self) -> float | None:
        """CPU seconds so far; None when the postmaster is gone."""
        own = _stat_fields(self.postmaster)
        if own is None:
            return None
        # utime, stime, then cutime and cstime: the children it has waited for.
        ticks = sum(int(v) for v in own[11:15])
        try:
            children = Path(f"/proc/{self.postmaster}/task/{self.postmaster}/children")
            live = children.read_text().split()
        except OSError:
            live = []
        for pid in live:
            fields = _stat_fields(pid)
            if fields is not None:  # one that exited since is in cutime soon
                ticks += int(fields[11]) + int(fields[12])
        return ticks / CLOCK_TICKS


class Sample(NamedTuple):
    at: float
    rss_kb: int
    cpu_s: float
    server_cpu_s: float | None


@dataclass
class UsageSampler:
    """Samples, every ``interval`` seconds in a thread, this process's resident set (VmRSS) and
    CPU time, and with ``server`` that server's CPU time, so that a peak and the CPU used can be
    told per step of a run (VmHWM only knows the process's all-time peak)."""

    interval: float = 0.05
    server: ServerCpu | None = None
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _server_seen: float = 0.0

    def __enter__(self) -> UsageSampler:
        self._sample()
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
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        server = None if self.server is None else self.server.seconds()
        if server is not None:
            # A backend that exits between two reads leaves the live set before its time
            # reaches the postmaster's reaped total: never let the total go back.
            server = self._server_seen = max(server, self._server_seen)
        self.samples.append(Sample(time.time(), _status_kb("VmRSS"), cpu_seconds(), server))

    def peak_mb(self, start: float = 0.0, end: float = float("inf")) -> float | None:
        """The highest sample taken between ``start`` and ``end`` (epoch seconds), in MB."""
        inside = [s.rss_kb for s in self.samples if start <= s.at <= end]
        return round(max(inside) / 1024, 1) if inside else None

    def _around(self, start: float, end: float) -> tuple[Sample, Sample] | None:
        """The last sample at or before ``start`` and the first at or after ``end`` (the
        nearest ones when outside the samples)."""
        if not self.samples:
            return None
        times = [s.at for s in self.samples]
        first = max(bisect.bisect_right(times, start) - 1, 0)
        last = min(bisect.bisect_left(times, end), len(times) - 1)
        return self.samples[first], self.samples[last]

    def cpu_s(self, start: float = 0.0, end: float = float("inf")) -> float | None:
        """This process's CPU seconds between ``start`` and ``end`` (to within a sample)."""
        around = self._around(start, end)
        return None if around is None else round(around[1].cpu_s - around[0].cpu_s, 2)

    def server_cpu_s(self, start: float = 0.0, end: float = float("inf")) -> float | None:
        """The server's CPU seconds between ``start`` and ``end``; None without a server."""
        around = self._around(start, end)
        if around is None or around[0].server_cpu_s is None or around[1].server_cpu_s is None:
            return None
        return round(around[1].server_cpu_s - around[0].server_cpu_s, 2)


@dataclass(frozen=True)
class Step:
    """One step of a Dagster run: an asset or a check."""

    key: str
    seconds: float
    peak_rss_mb: float | None
    status: str
    cpu_s: float | None = None
    server_cpu_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.key,
            "seconds": round(self.seconds, 3),
            "peak_rss_mb": self.peak_rss_mb,
            "status": self.status,
            "cpu_s": self.cpu_s,
            "server_cpu_s": self.server_cpu_s,
        }


def run_steps(instance: dg.DagsterInstance, run_id: str, sampler: UsageSampler) -> list[Step]:
    """Each step of a run, in start order: its wall time from the step events, the highest
    resident set sampled while it ran and the CPU time used meanwhile."""
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
        steps.append(
            Step(
                key,
                end - start,
                sampler.peak_mb(start, end),
                status,
                sampler.cpu_s(start, end),
                sampler.server_cpu_s(start, end),
            )
        )
    return steps
