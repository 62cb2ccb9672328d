"""Where the server and the load generator run: disjoint CPU sets, every process of the server pinned (its inference
workers too, re-checked before each phase), and the CPU each side used during a phase."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import psutil

from visionflow.tools.loadtest import cpus as cpu
from visionflow.tools.loadtest.client import LoadTestError

MIN_CPU_S = 1.0


@dataclass
class Placement:
    """The server's processes (the trees of `roots`) on `server_cpus`, this process on `client_cpus`.

    Without sets (one CPU, --no-pin, a server whose process is not on this machine) nothing is pinned, and the
    report says why in `note`; the CPU each side used is still measured where its processes are known."""

    server_cpus: tuple[int, ...] | None
    client_cpus: tuple[int, ...] | None
    roots: list[int]
    how: str
    note: str = ""
    restore_server: bool = False  # a server found running goes back to its own CPUs afterwards; one we start ends
    usable: tuple[int, ...] = field(default_factory=cpu.usable_cpus)  # read before this process is pinned
    _before: dict[int, tuple[int, ...]] = field(default_factory=dict)
    _pinned: dict[int, str] = field(default_factory=dict)  # pid -> process name, every server process pinned

    @property
    def pinned(self) -> bool:
        return self.server_cpus is not None

    @classmethod
    def unpinned(cls, why: str, roots: list[int] | None = None) -> Placement:
        return cls(None, None, list(roots or []), "not pinned", why)

    def apply(self) -> None:
        """Pin this process (the generator: all its threads, not its children) and the server's processes."""
        if not self.pinned:
            return
        me = os.getpid()
        self._before[me] = cpu.process_affinity(me)
        cpu.pin_process(me, self.client_cpus)
        self.refresh()

    def refresh(self) -> int:
        """Pin the server's processes not yet pinned (workers started or replaced since); how many were new."""
        if not self.pinned:
            return 0
        new = 0
        for p in cpu.process_tree(self.roots):
            try:
                if p.pid in self._pinned and cpu.process_affinity(p.pid) == self.server_cpus:
                    continue
                if self.restore_server:
                    self._before.setdefault(p.pid, cpu.process_affinity(p.pid))
                cpu.pin_process(p.pid, self.server_cpus)
                self._pinned[p.pid], new = p.name(), new + 1
            except psutil.NoSuchProcess:  # a worker that exited between the listing and the pin
                continue
            except (PermissionError, psutil.AccessDenied):
                raise LoadTestError(
                    f"may not pin the server's process {p.pid} (another user's?): run as its user, or with --no-pin"
                ) from None
        return new

    def restore(self) -> None:
        """This process back on its own CPUs, and a server found running back on its own."""
        for pid, before in self._before.items():
            if pid == os.getpid() or self.restore_server:
                try:
                    cpu.pin_process(pid, before)
                except (psutil.NoSuchProcess, PermissionError):
                    continue

    def cpu_snapshot(self) -> tuple[dict[int, float], dict[int, float]]:
        return cpu.cpu_seconds([psutil.Process()]), cpu.cpu_seconds(cpu.process_tree(self.roots))

    def cpu_used(self, before: tuple[dict[int, float], dict[int, float]], elapsed_s: float) -> dict[str, Any]:
        """CPU cores each side kept busy since `before` (1.0: one core all the time); nothing for a phase under
        MIN_CPU_S, which the kernel's CPU accounting (10 ms ticks) cannot resolve."""
        if elapsed_s < MIN_CPU_S:
            return {"note": f"phase under {MIN_CPU_S:g} s: too short for CPU accounting"}
        after = self.cpu_snapshot()

        def busy(a: dict[int, float], b: dict[int, float]) -> float:
            return round(sum(v - b.get(pid, 0.0) for pid, v in a.items()) / max(elapsed_s, 1e-9), 3)

        out: dict[str, Any] = {"generator_cores": busy(after[0], before[0])}
        if self.roots:
            out["server_cores"] = busy(after[1], before[1])
            out["server_processes"] = len(after[1])
        return out

    def reported(self) -> dict[str, Any]:
        """The report's "cpus" section: both sets, how the server was found, every server process and the CPUs
        its threads may run on, read back now."""
        out: dict[str, Any] = {
            "pinned": self.pinned,
            "server_cpus": cpu.format_cpus(self.server_cpus) if self.pinned else None,
            "client_cpus": cpu.format_cpus(self.client_cpus) if self.pinned else None,
            "usable_cpus": cpu.format_cpus(self.usable),
            "server": self.how,
            "note": self.note,
        }
        if self.pinned:
            procs = []
            for p in cpu.process_tree(self.roots):
                try:
                    procs.append({"pid": p.pid, "name": p.name(), "cpus": cpu.format_cpus(cpu.process_affinity(p.pid))})
                except psutil.NoSuchProcess:
                    continue
            out["server_processes"] = procs
            out["generator_process_cpus"] = cpu.format_cpus(cpu.process_affinity(os.getpid()))
            out["all_on_their_sets"] = (
                all(x["cpus"] == out["server_cpus"] for x in procs)
                and out["generator_process_cpus"] == out["client_cpus"]
            )
        return out
