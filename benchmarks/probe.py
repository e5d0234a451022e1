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
SAMPLE_INTERVAL_S: Final = 0.05
"""How often a UsageSampler reads memory and CPU time."""
BUSY_MIN_SECONDS: Final = 1.0
"""The shortest time whose "cores busy" is told: CPU time is known to within a sample."""


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
    return time.process_time()


def _stat_fields(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first); None when the
    process is gone or not visible."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _command(pid: int | str) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


@dataclass(frozen=True)
class ServerCpu:
    """The CPU time of a Postgres server on this machine: its postmaster's, that of every
    process it runs now (backends, parallel workers, background processes) and of those it
    has reaped. All of the server's work, for every database it serves."""

    postmaster: int

    @classmethod
    def of_backend(cls, backend_pid: int) -> ServerCpu | None:
        """The server of the backend ``backend_pid`` (``SELECT pg_backend_pid()``); None
        unless that process and its parent are Postgres processes here (a server on another
        host, or in another PID namespace, is not measured)."""
        fields = _stat_fields(backend_pid)
        if fields is None or _command(backend_pid) != "postgres":
            return None
        parent = int(fields[1])
        return cls(parent) if _command(parent) == "postgres" else None

    def seconds(self) -> float | None:
        """CPU seconds so far; None when they cannot be read (the postmaster gone, or the
        kernel listing no children)."""
        # The postmaster before its children: a child reaped in between is missed by this
        # reading (a dip, which UsageSampler evens out), never counted twice.
        own = _stat_fields(self.postmaster)
        try:
            live = Path(f"/proc/{self.postmaster}/task/{self.postmaster}/children").read_text()
        except OSError:
            return None
        if own is None:
            return None
        # utime, stime, cutime, cstime: its own time and that of the children it has reaped.
        ticks = sum(int(v) for v in own[11:15])
        for pid in live.split():
            fields = _stat_fields(pid)
            # A pid reused since the list was read belongs to someone else.
            if fields is not None and int(fields[1]) == self.postmaster:
                ticks += sum(int(v) for v in fields[11:15])
        return ticks / CLOCK_TICKS


class Sample(NamedTuple):
    """What a UsageSampler read at one instant (epoch seconds)."""

    at: float
    rss_kb: int
    cpu_seconds: float
    server_cpu_seconds: float | None


class Usage(NamedTuple):
    """The CPU time used between two samples: this process's, the server's (None: not
    measured), and the cores both kept busy (None: too short a time to tell)."""

    cpu_seconds: float
    server_cpu_seconds: float | None
    cores_busy: float | None


@dataclass
class UsageSampler:
    """Samples, every ``interval`` seconds in a thread, this process's resident set (VmRSS) and
    CPU time, and with ``server`` that server's CPU time, so that a peak and the CPU used can be
    told per step of a run (VmHWM only knows the process's all-time peak)."""

    interval: float = SAMPLE_INTERVAL_S
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
            # Never let the total go back (a child reaped between two reads of one sample).
            server = self._server_seen = max(server, self._server_seen)
        rss = _status_kb("VmRSS")
        cpu, at = cpu_seconds(), time.time()
        self.samples.append(Sample(at, rss, cpu, server))

    def peak_mb(self, start: float = 0.0, end: float = float("inf")) -> float | None:
        """The highest sample taken between ``start`` and ``end`` (epoch seconds), in MB."""
        inside = [s.rss_kb for s in self.samples if start <= s.at <= end]
        return round(max(inside) / 1024, 1) if inside else None

    def usage(self, start: float = 0.0, end: float = float("inf")) -> Usage | None:
        """The CPU time used between ``start`` and ``end``, from the last sample at or before
        ``start`` to the first at or after ``end`` (so a step's is its own to within a
        sample on each side); None without samples there."""
        if not self.samples or start > end:
            return None
        times = [s.at for s in self.samples]
        first = self.samples[max(bisect.bisect_right(times, start) - 1, 0)]
        last = self.samples[min(bisect.bisect_left(times, end), len(times) - 1)]
        cpu = last.cpu_seconds - first.cpu_seconds
        server = (
            None
            if first.server_cpu_seconds is None or last.server_cpu_seconds is None
            else last.server_cpu_seconds - first.server_cpu_seconds
        )
        window = last.at - first.at
        busy = (cpu + (server or 0.0)) / window if window >= BUSY_MIN_SECONDS else None
        return Usage(
            round(cpu, 2),
            None if server is None else round(server, 2),
            None if busy is None else round(busy, 2),
        )


@dataclass(frozen=True)
class Step:
    """One step of a Dagster run: an asset or a check."""

    key: str
    seconds: float
    peak_rss_mb: float | None
    status: str
    usage: Usage | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.key,
            "seconds": round(self.seconds, 3),
            "peak_rss_mb": self.peak_rss_mb,
            "status": self.status,
            **(self.usage._asdict() if self.usage else dict.fromkeys(Usage._fields)),
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
            Step(key, end - start, sampler.peak_mb(start, end), status, sampler.usage(start, end))
        )
    return steps
