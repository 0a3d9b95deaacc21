"""Partial output folders of interrupted merges: mark the one being written, reap the dead ones.

A merge writes into a hidden ``.NAME.XXXXXXXX.partial`` folder beside its target
(:func:`mixtune.core.atomic_dir`) and renames it to NAME only when complete. A killed merge cannot
clean up, so its partial would stay forever, as large as what it had written. While a merge
writes, its partial holds :data:`OWNER`: the host, the process id and that process's start time.
The next merge towards the same target removes every partial of it whose owner has ended (on this
host, no process has that id, or the process that has it started at another time: the id was
reused), and says so. A partial whose owner is alive, on another host, or not recorded (an older
mixtune, or another writer) is kept, and named so that the user can decide.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

OWNER = ".mixtune-owner.json"
"""The file in a partial folder naming the process that writes it; removed before the rename."""


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, Linux), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22, counted after the command name in parentheses


def claim(partial: Path, target: Path) -> None:
    """Record in ``partial`` that this process is writing it (towards ``target``)."""
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid()),
             "target": str(Path(target).absolute())}
    (Path(partial) / OWNER).write_text(json.dumps(owner))


def release(partial: Path) -> None:
    """Remove the owner record, so that the finished folder holds only the model."""
    (Path(partial) / OWNER).unlink(missing_ok=True)


def _alive(owner: dict) -> bool | None:
    """Whether the recorded owner still runs: None when this host cannot tell (another host, no pid)."""
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or type(pid) is not int or pid <= 0:
        return None
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    except OSError:
        return None
    started, now = owner.get("started"), _start_time(pid)
    return not (started and now and started != now)


def partials_of(target: Path) -> list[Path]:
    """The partial folders that :func:`mixtune.core.atomic_dir` makes for exactly ``target``."""
    target = Path(target)
    name = re.compile(re.escape(f".{target.name}.") + r"[a-z0-9_]{8}\.partial")  # tempfile's 8 random characters
    try:
        entries = list(target.absolute().parent.iterdir())
    except OSError:  # no parent folder yet: nothing to reap
        return []
    return sorted(p for p in entries if name.fullmatch(p.name) and p.is_dir() and not p.is_symlink())


def _size(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _human(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _log(line: str) -> None:
    logging.getLogger("mixtune.merge").warning(line)


def reap_stale_partials(target: str | os.PathLike, say: Callable[[str], None] | None = None) -> list[Path]:
    """Remove the partial folders of ``target`` left by merges that have ended; returns those removed.

    Args:
        target: the folder a merge is about to write.
        say: called with one line per partial removed or kept (default: a warning on the
            ``mixtune.merge`` logger, which Python prints to stderr when logging is not set up).
    """
    say = say or _log
    removed = []
    for p in partials_of(Path(target)):
        try:
            owner = json.loads((p / OWNER).read_text())
        except (OSError, ValueError):
            owner = None
        alive = _alive(owner) if isinstance(owner, dict) else None
        if alive:
            continue  # a merge that is running now
        size = _human(_size(p))
        if alive is False:
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                removed.append(p)
                say(f"removed stale partial folder {p} ({size}) from an interrupted merge "
                    f"(process {owner['pid']} has ended)")
            continue
        who = (f"written by process {owner.get('pid')} on host {owner.get('host')}" if isinstance(owner, dict)
               else "its writer is not recorded (an older mixtune, or another program)")
        say(f"kept partial folder {p} ({size}): {who}; delete it if nothing is writing {target} any more")
    return removed
