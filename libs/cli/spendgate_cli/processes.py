"""Small process and port helpers shared by the embedded servers, ``spendgate up`` and tests.

Child processes are started in their own session (so a Ctrl-C in the terminal reaches only
the supervising process, which then stops its children in order) and, on Linux, with a
parent-death signal (so a supervisor killed with SIGKILL does not leave servers behind).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

# How much of a log file an error message quotes.
LOG_TAIL_BYTES_MAX = 8_000
# How long one TCP connect attempt of a readiness probe may take.
TCP_PROBE_TIMEOUT = timedelta(milliseconds=200)
# How long to wait for the kernel to report a SIGKILLed process as exited. It is prompt;
# the bound only turns a bug (a process we cannot kill) into an error instead of a hang.
REAP_DEADLINE = timedelta(seconds=10)

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0, read it, release it).

    Another process may take it before the caller binds it; callers that must not race
    retry with a new port or fail loudly.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when ``port`` can be bound on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Same option the servers use, so a port in TIME_WAIT counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


def tcp_accepts(host: str, port: int) -> bool:
    """True when a TCP connection to ``host:port`` succeeds within :data:`TCP_PROBE_TIMEOUT`."""
    try:
        with socket.create_connection((host, port), timeout=TCP_PROBE_TIMEOUT.total_seconds()):
            return True
    except OSError:
        return False


def log_tail(path: Path, *, offset: int = 0, bytes_max: int = LOG_TAIL_BYTES_MAX) -> str:
    """The last ``bytes_max`` bytes of ``path`` after byte ``offset``, decoded leniently."""
    try:
        with path.open("rb") as log:
            size = log.seek(0, os.SEEK_END)
            log.seek(max(offset, size - bytes_max))
            return log.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def die_with_parent(signum: signal.Signals) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive ``signum`` when its parent dies.

    Linux only (``prctl(PR_SET_PDEATHSIG)``); None elsewhere. The kernel sends the signal
    when the *thread* that forked the child exits, so this returns None outside the main
    thread: a child started from a short-lived worker thread would otherwise die with it.
    The libc function is resolved here, in the parent, so the child only makes one call.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return None
    prctl = _libc().prctl
    signal_number = int(signum)

    def set_parent_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, signal_number, 0, 0, 0)

    return set_parent_death_signal


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def signal_group(process: subprocess.Popen[bytes], signum: signal.Signals) -> None:
    """Send ``signum`` to the process group ``process`` leads (its own session).

    Signalling the group reaches the children too (Postgres backends, for instance), which
    is what a crash test wants. A process that already exited is ignored.
    """
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def stop_process(
    process: subprocess.Popen[bytes], signum: signal.Signals, deadline: timedelta
) -> int:
    """Send ``signum``, wait up to ``deadline``, then SIGKILL the group; return the exit code.

    Exit codes follow :attr:`subprocess.Popen.returncode` (negative for a signal).
    """
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)
        try:
            return process.wait(timeout=deadline.total_seconds())
        except subprocess.TimeoutExpired:
            signal_group(process, signal.SIGKILL)
    return process.wait(timeout=REAP_DEADLINE.total_seconds())


def wait_until(
    ready: Callable[[], bool],
    *,
    deadline: timedelta,
    poll_interval: timedelta = timedelta(milliseconds=20),
    alive: Callable[[], bool] = lambda: True,
) -> bool:
    """Poll ``ready`` until it is true (True), ``alive`` turns false or ``deadline`` passes."""
    give_up_at = time.monotonic() + deadline.total_seconds()
    while True:
        if ready():
            return True
        if not alive() or time.monotonic() >= give_up_at:
            return False
        time.sleep(poll_interval.total_seconds())
