"""CPU time per component (ledger, NATS, Postgres, load generators) from ``/proc``.

On a 2-core machine the question "where does the time go" starts with "which process
burns the cores". A sample is the user + system CPU seconds of each component's
processes (and, for Postgres, of the postmaster's children: one backend per connection);
the difference of two samples divided by the wall time is the cores each one used.
``machine`` is every core's busy time (``/proc/stat``) and ``other`` what remains of it
after the components: anything else running on the machine at the same time (the
benchmark cannot stop it; a large ``other`` means the figures of that run are low).
``steal`` is the time the hypervisor ran something else on our virtual cores: a virtual
machine whose CPU is capped is frozen for whole scheduling periods (about 100 ms seen on
the 2-core benchmark machine, every process at once) once its cores are busy, and every
latency percentile above it is the machine's, not the code's.
Outside Linux the samples are empty and the report leaves the columns out.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

_PROC = Path("/proc")
_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

CpuSample = dict[str, dict[int, float]]


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces.
    return raw[raw.rindex(")") + 2 :].split()


def _cpu_s(fields: Sequence[str], *, reaped: bool = False) -> float:
    # After the name: fields[11] is utime and fields[12] stime (stat fields 14 and 15);
    # fields[13] and fields[14] are cutime and cstime (16, 17): children waited for.
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICKS_PER_S


def _children(parents: set[int]) -> list[int]:
    found = []
    for entry in _PROC.iterdir() if _PROC.exists() else ():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        # fields[1] is the parent pid (stat field 4).
        if fields is not None and int(fields[1]) in parents:
            found.append(int(entry.name))
    return found


def _machine_s() -> tuple[float, float]:
    """Seconds every core was busy (running anything but idle, iowait and steal), and
    seconds stolen by the hypervisor."""
    try:
        first = (_PROC / "stat").read_text().splitlines()[0].split()
    except OSError:
        return 0.0, 0.0
    # cpu user nice system idle iowait irq softirq steal ...
    ticks = [int(value) for value in first[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4] - ticks[7]
    return busy / _TICKS_PER_S, ticks[7] / _TICKS_PER_S


def sample(
    components: Mapping[str, Sequence[int]],
    *,
    with_children: set[str],
    with_reaped: frozenset[str] = frozenset(),
) -> CpuSample:
    """CPU seconds so far of every process of every component (children where asked).

    ``with_reaped``: components whose own processes also count the children they have
    waited for (the ledger's snapshot forks, which live too briefly to be sampled).
    """
    busy_s, stolen_s = _machine_s()
    result: CpuSample = {"machine": {0: busy_s}, "steal": {0: stolen_s}}
    for name, pids in components.items():
        every = list(pids)
        if name in with_children:
            every += _children(set(pids))
        times = {}
        for pid in every:
            fields = _stat_fields(pid)
            if fields is not None:
                times[pid] = _cpu_s(fields, reaped=name in with_reaped and pid in pids)
        result[name] = times
    return result


def seconds_used(before: CpuSample, after: CpuSample) -> dict[str, float]:
    """CPU seconds each component (and ``machine``: every core) used between two samples."""
    used = {}
    for name, times in after.items():
        earlier = before.get(name, {})
        # A process that started after the first sample (a new Postgres backend) counts
        # with all its time; one that ended before the second is missed (rare here).
        used[name] = sum(cpu_s - earlier.get(pid, 0.0) for pid, cpu_s in times.items())
    return used


def cores_used(before: CpuSample, after: CpuSample, wall_s: float) -> dict[str, float]:
    """Cores each component used between two samples, ``other`` and ``steal`` (see the
    module)."""
    used = {name: round(spent / wall_s, 3) for name, spent in seconds_used(before, after).items()}
    machine = used.pop("machine")
    steal = used.pop("steal", 0.0)
    used["other"] = round(max(0.0, machine - sum(used.values())), 3)
    used["steal"] = steal
    return used
