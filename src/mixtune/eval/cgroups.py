"""One control group per sandboxed program: a memory limit that counts what it really uses (not
address space, which thread stacks and allocator arenas inflate) and a process-count limit that
holds however many programs run at once. Linux cgroup v2, or v1's ``memory`` and ``pids``
hierarchies; only where this process may create groups (root, or a delegated subtree).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
GROUP = "mixtune-sandbox"
"""Parent group of every sandbox's group (created on first use, left in place)."""


def _writable(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK)


def version() -> int | None:
    """2 (unified with memory and pids), 1 (v1 memory and pids hierarchies), or None: no cgroup
    this process may create, with both controllers."""
    if (ROOT / "cgroup.controllers").exists():
        have = set((ROOT / "cgroup.controllers").read_text().split())
        return 2 if {"memory", "pids"} <= have and _writable(ROOT) else None
    if _writable(ROOT / "memory") and _writable(ROOT / "pids"):
        return 1
    return None


class Cgroup:
    """A fresh group (one folder per controller on v1) with a memory and a process limit.

    Use as a context manager: every process still in the group is killed and the group removed on
    exit. A process joins by writing its pid to each of :attr:`procs` before it execs the program.
    """

    def __init__(self, memory_bytes: int, processes: int) -> None:
        self.version = version()
        if self.version is None:
            raise OSError("no cgroup can be created here")
        name = f"{GROUP}/{uuid.uuid4().hex[:12]}"
        if self.version == 2:
            parent = ROOT / GROUP
            parent.mkdir(exist_ok=True)
            # controllers reach a child only when its parent delegates them
            with contextlib.suppress(OSError):
                (ROOT / "cgroup.subtree_control").write_text("+memory +pids")
            (parent / "cgroup.subtree_control").write_text("+memory +pids")
            self.dirs = [ROOT / name]
        else:
            self.dirs = [ROOT / "memory" / name, ROOT / "pids" / name]
        for d in self.dirs:
            d.mkdir(parents=True)
        if self.version == 2:
            (self.dirs[0] / "memory.max").write_text(str(memory_bytes))
            with contextlib.suppress(OSError):  # no swap to run into instead
                (self.dirs[0] / "memory.swap.max").write_text("0")
            (self.dirs[0] / "pids.max").write_text(str(processes))
        else:
            mem, pids = self.dirs
            (mem / "memory.limit_in_bytes").write_text(str(memory_bytes))
            with contextlib.suppress(OSError):  # memsw exists only with swap accounting; it must follow the limit
                (mem / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
            (pids / "pids.max").write_text(str(processes))
        self.procs = [str(d / "cgroup.procs") for d in self.dirs]
        """The ``cgroup.procs`` file of each hierarchy."""

    def out_of_memory(self) -> bool:
        """Whether the kernel killed a process of the group for exceeding its memory limit."""
        if self.version == 2:
            events = dict(line.split() for line in (self.dirs[0] / "memory.events").read_text().splitlines())
            return int(events.get("oom_kill", 0)) > 0 or int(events.get("max", 0)) > 0
        control = dict(line.split() for line in (self.dirs[0] / "memory.oom_control").read_text().splitlines())
        return int(control.get("oom_kill", 0)) > 0 or int((self.dirs[0] / "memory.failcnt").read_text()) > 0

    def peak_bytes(self) -> int | None:
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            return int((self.dirs[0] / name).read_text())
        except OSError:
            return None

    def kill(self) -> None:
        """SIGKILL every process in the group, until none is left."""
        for _ in range(100):
            pids = {int(p) for path in self.procs for p in Path(path).read_text().split()}
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)

    def __enter__(self) -> Cgroup:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
        for d in self.dirs:
            for _ in range(100):  # a group is removable once its last process has been reaped
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)
