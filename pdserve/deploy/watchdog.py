"""The Ray watchdog: a small process that outlives the gateway by at most a few seconds and takes
the Ray instance the gateway started with it, however the gateway ended (SIGKILL included: Ray's
own agents notice a dead driver only after 30-90 s). It waits for EOF on a pipe whose other end
only the gateway holds, then stops every process of that instance: those whose command line
names its session (`session_<date>_<gateway pid>`, Ray's naming) and all their descendants
(the worker processes and agents, renamed `ray::...`). Descendants are also noted while the
gateway lives, since the raylet may die first and orphan them. A cluster it joined is left alone."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

TERM_GRACE_S = 2.0  # SIGTERM first; SIGKILL whatever still runs after this
SCAN_INTERVAL_S = 1.0  # how often the instance's processes are noted while the gateway lives


def start_watchdog() -> subprocess.Popen:
    """Starts the watchdog of the Ray instance this process is about to start; keep the returned
    process referenced (its stdin pipe is the signal) until this process exits."""
    return subprocess.Popen(
        [sys.executable, "-m", "pdserve.deploy.watchdog", str(os.getpid())],
        stdin=subprocess.PIPE,
        start_new_session=True,  # no Ctrl-C of the terminal reaches it
        cwd=Path(__file__).resolve().parent.parent.parent,
    )


def session_processes(owner_pid: int) -> dict[int, int]:
    """The processes of the Ray instance `owner_pid` started and their descendants: pid -> start
    time (so that a pid reused later is never mistaken for one of them)."""
    pattern = re.compile(rb"session_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_\d+_" + str(owner_pid).encode() + rb"(?!\d)")
    table = _process_table()
    roots = {pid for pid in table if pattern.search(_cmdline(pid))}
    found, frontier = set(roots), set(roots)
    while frontier:
        frontier = {pid for pid, (parent, _) in table.items() if parent in frontier} - found
        found |= frontier
    found.discard(os.getpid())
    return {pid: table[pid][1] for pid in found}


def stop(processes: dict[int, int]) -> None:
    """SIGTERM, then SIGKILL for whatever still runs after `TERM_GRACE_S`."""
    _signal(processes, signal.SIGTERM)
    deadline = time.monotonic() + TERM_GRACE_S
    while time.monotonic() < deadline and alive(processes):
        time.sleep(0.05)
    _signal(alive(processes), signal.SIGKILL)


def main(owner_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    known: dict[int, int] = {}
    while not _is_closed(sys.stdin.fileno(), SCAN_INTERVAL_S):  # EOF once the owner is gone
        known.update(session_processes(owner_pid))
    for _ in range(2):  # a process may spawn another while the first sweep runs
        processes = alive({**known, **session_processes(owner_pid)})
        if processes:
            stop(processes)
        known = {}


def _is_closed(fd: int, timeout_s: float) -> bool:
    """Waits up to `timeout_s` on the pipe; True at EOF (its only writer closed)."""
    ready, _, _ = select.select([fd], [], [], timeout_s)
    return bool(ready) and not os.read(fd, 4096)


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time) of every process that is not a zombie."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and fields[0] != b"Z":
                table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/<pid>/stat after "pid (comm) ": state, ppid, ... (field 3 onwards)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2 :].split()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(processes: dict[int, int]) -> dict[int, int]:
    """Those still running (a zombie is dead, only not yet reaped), with the same start time."""
    running = {}
    for pid, start in processes.items():
        fields = _stat_fields(pid)
        if fields is not None and fields[0] != b"Z" and int(fields[19]) == start:
            running[pid] = start
    return running


def _signal(processes: dict[int, int], signum: int) -> None:
    for pid in processes:
        try:
            os.kill(pid, signum)
        except OSError:
            pass


if __name__ == "__main__":
    main(int(sys.argv[1]))
