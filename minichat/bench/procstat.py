"""CPU of processes from /proc (Linux): the workers, and the broker and PostgreSQL when they run on
this machine.

PostgreSQL is many processes that come and go (a backend per connection, autovacuum workers,
parallel workers), so "what PostgreSQL used between two readings" is counted as:

    sum over the processes alive at the end:  own CPU at the end - own CPU at the start (0 if new)
  + sum over every process read at the end:   its reaped children's CPU (cutime + cstime) at the end
                                              - that at the start (0 if new)
  - sum over the processes gone by the end whose parent is still read: their own and reaped
    children's CPU at the start

Linux adds a process's whole CPU to its parent's cutime/cstime when the parent reaps it; every
backend is a child of the postmaster, which reaps it at once. A backend that ended in between is
therefore counted exactly (its CPU after the start reading, through the postmaster's children's
time), and so is one that started and ended in between. Not counted: a process whose parent is not
read (the postmaster itself ending), and a pid reused in between. Every process named `postgres`
on the machine is read, whichever database it serves: on a shared machine the figure includes the
other users of that PostgreSQL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

STACK_PROCESSES = {"broker": "kafka.Kafka", "postgres": "postgres"}
"""Where the rest of the machine's CPU goes: the broker (the JVM whose main class is `kafka.Kafka`)
and PostgreSQL (every process named `postgres`), when they run on this machine."""


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/<pid>/stat the bench uses (times in seconds)."""

    comm: str
    ppid: int
    own_s: float
    """utime + stime."""
    children_s: float
    """cutime + cstime: the children this process waited for (reaped), over their whole lives."""


def parse_stat(text: str) -> ProcStat:
    """One /proc/<pid>/stat line (stat(5)); the command name may hold spaces and parentheses."""
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()  # fields[0] is stat(5)'s field 3 (state)
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return ProcStat(comm, int(fields[1]), (utime + stime) / CLOCK_TICKS, (cutime + cstime) / CLOCK_TICKS)


def read_stat(pid: int) -> ProcStat:
    return parse_stat(Path(f"/proc/{pid}/stat").read_text())


@dataclass(frozen=True)
class Reading:
    """The processes of one service at one moment, by pid."""

    processes: dict[int, ProcStat] = field(default_factory=dict)
    commands: dict[int, str] = field(default_factory=dict)
    """Their command lines (a PostgreSQL backend's names its user, database and state)."""


def cpu_used(before: Reading, after: Reading) -> float | None:
    """CPU seconds the service used between two readings (the module's docstring says how);
    None when it has no process on this machine."""
    if not after.processes:
        return None
    used = 0.0
    for pid, now in after.processes.items():
        then = before.processes.get(pid)
        used += now.own_s + now.children_s - ((then.own_s + then.children_s) if then else 0.0)
    for pid, then in before.processes.items():
        if pid not in after.processes and then.ppid in after.processes:
            used -= then.own_s + then.children_s  # its whole life is in the parent's children's time
    return max(0.0, used)


def database_cpu_used(before: Reading, after: Reading, database: str) -> float | None:
    """CPU seconds of the PostgreSQL backends connected to `database` between two readings, those
    alive at the end only (a backend that ended in between is not counted): what this database's
    sessions used, whatever else the server served meanwhile."""
    if not after.processes:
        return None
    used = 0.0
    for pid, command in after.commands.items():
        if f" {database} " in f" {command} ":
            then = before.processes.get(pid)
            used += after.processes[pid].own_s - (then.own_s if then else 0.0)
    return max(0.0, used)


def _service(pid_dir: Path) -> tuple[str | None, str]:
    comm = (pid_dir / "comm").read_text().strip()
    command = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    for name, marker in STACK_PROCESSES.items():
        if comm == marker or f" {marker} " in f" {command} ":
            return name, command
    return None, command


def stack_readings() -> dict[str, Reading]:
    """Every broker and PostgreSQL process on this machine now (empty readings when the services
    run elsewhere)."""
    found: dict[str, Reading] = {name: Reading() for name in STACK_PROCESSES}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            name, command = _service(entry)
            if name is not None:
                found[name].processes[int(entry.name)] = read_stat(int(entry.name))
                found[name].commands[int(entry.name)] = command
        except (OSError, ValueError, IndexError):  # ended meanwhile
            continue
    return found


def stack_used(before: dict[str, Reading], after: dict[str, Reading]) -> dict[str, float | None]:
    """CPU seconds each service used between two `stack_readings()` (None: not on this machine)."""
    return {
        name: None if (used := cpu_used(before[name], after[name])) is None else round(used, 3)
        for name in STACK_PROCESSES
    }
