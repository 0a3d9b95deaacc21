"""Run untrusted generated code: one process per program, with limits, and no way out we know of.

Layers (each test in tests/eval/test_sandbox.py attacks one):

1. **Process and OS limits**, always: a separate ``python -I`` process in its own session;
   RLIMIT_CPU (CPU seconds), RLIMIT_AS (memory), RLIMIT_FSIZE (largest file), RLIMIT_NPROC
   (processes), a wall-clock timeout that kills the whole process group; a throwaway working
   folder that is deleted afterwards; an environment holding only ``PATH`` and ``HOME``.
2. **When the evaluator runs as root** (containers, CI): the program runs in a new network
   namespace with no interface up (no network at all), and as ``nobody`` when ``nobody`` can run
   the interpreter (then RLIMIT_NPROC applies and it cannot signal the evaluator).
3. **Inside the interpreter**: an audit hook, installed before the program runs and impossible to
   remove from Python, refuses sockets, new processes (fork, exec, spawn, system, subprocess),
   signals to other processes, ``ctypes`` and other native escape hatches, reading other
   processes' ``/proc`` files, and writing or deleting outside the working folder.

:func:`isolation` reports which layers are active. Reading ordinary files is not restricted
(programs need the standard library). Layer 3 is what stands between a program and native code,
so run evaluations of untrusted code inside a container as well.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class Limits:
    """Resource limits for one program."""

    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    memory_mb: int = 512
    processes: int = 64
    """Processes and threads of the sandbox user (root: the ``nobody`` user)."""
    file_mb: int = 16


@dataclass(frozen=True)
class Result:
    """How a program ended. ``passed`` only for a clean exit within every limit."""

    passed: bool
    status: str
    """``ok``, ``error`` (non-zero exit), ``timeout``, ``cpu``, ``memory``, ``killed``."""
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


# Runs first in the child: installs the audit hook, then executes the program file.
_BOOTSTRAP = r'''
import os, sys
_root = os.path.realpath(os.getcwd())
_pid = os.getpid()
_BLOCKED = {"socket.__new__": "network access", "os.fork": "creating processes", "os.forkpty": "creating processes",
            "os.exec": "creating processes", "os.posix_spawn": "creating processes", "os.spawn": "creating processes",
            "os.system": "creating processes", "subprocess.Popen": "creating processes", "ctypes.dlopen": "ctypes",
            "os.putenv": "changing the environment"}
_NO_IMPORT = {"ctypes", "_ctypes", "_posixsubprocess", "socket", "_socket", "multiprocessing", "pty"}
def _hook(event, args):
    if event in _BLOCKED:
        raise PermissionError(f"sandbox: {_BLOCKED[event]} is not allowed")
    if event == "import" and args[0].split(".")[0] in _NO_IMPORT:
        raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
    if event == "os.kill" and args[0] not in (_pid, 0):
        raise PermissionError("sandbox: signalling other processes is not allowed")
    if event == "os.killpg" and args[0] not in (os.getpgid(0), 0):
        raise PermissionError("sandbox: signalling other processes is not allowed")
    if event == "open" and args[0] is not None and not isinstance(args[0], int):
        mode, flags = args[1] or "r", args[2] or 0
        parts = os.path.realpath(os.fsdecode(args[0])).split(os.sep)
        if len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and int(parts[2]) != _pid:
            raise PermissionError("sandbox: reading other processes' files is not allowed")
        writing = any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writing:
            path = os.path.realpath(os.fsdecode(args[0]))
            if path != _root and not path.startswith(_root + os.sep):
                raise PermissionError(f"sandbox: writing outside the working folder is not allowed ({path})")
    if event in ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.chmod", "os.chown"):
        path = os.path.realpath(os.fsdecode(args[0]))
        if path != _root and not path.startswith(_root + os.sep):
            raise PermissionError(f"sandbox: changing files outside the working folder is not allowed ({path})")
sys.addaudithook(_hook)
del _hook
_code = open("program.py").read()
exec(compile(_code, "program.py", "exec"), {"__name__": "__main__"})
'''


def isolation() -> dict[str, bool]:
    """Which layers are active here (the network namespace is probed, not assumed)."""
    root = os.geteuid() == 0
    return {"limits": True, "audit_hook": True, "network_namespace": root and _can_unshare_net(),
            "unprivileged_user": root and _drop_target() is not None}


def _can_unshare_net() -> bool:
    """Whether a child may enter a new network namespace (root without CAP_SYS_ADMIN may not)."""
    pid = os.fork()
    if pid == 0:
        os._exit(0 if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET) == 0 else 1)
    return os.waitpid(pid, 0)[1] == 0


def _drop_target() -> tuple[int, int] | None:
    """``nobody``'s uid and gid, if ``nobody`` can run this interpreter (every folder on the way
    to it world-searchable); else None (e.g. a Python installed under a private /root)."""
    import pwd

    try:
        pw = pwd.getpwnam("nobody")
    except KeyError:
        return None
    for path in (Path(sys.executable).resolve(), *Path(sys.executable).resolve().parents,
                 Path(sys.prefix).resolve(), *Path(sys.prefix).resolve().parents):
        if not path.stat().st_mode & 0o001:
            return None
    return pw.pw_uid, pw.pw_gid


def _limit_child(limits: Limits, drop_to: tuple[int, int] | None) -> None:
    """Runs in the forked child before exec (no Python threads there; keep it to syscalls)."""
    os.setsid()
    if os.geteuid() == 0:
        # A fresh namespace has only a loopback device, down. Where it is refused (root without
        # CAP_SYS_ADMIN), the audit hook's socket ban still holds; isolation() reports which.
        ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET)
    mb = 1024 * 1024
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb * mb, limits.file_mb * mb))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if drop_to is not None:
        uid, gid = drop_to
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)


def run_program(code: str, *, stdin: str = "", limits: Limits = Limits()) -> Result:
    """Run ``code`` (a Python program) in the sandbox and report how it ended.

    Never raises for anything the program does; the caller's process, files and environment are
    unaffected. Output is cut to 64 KiB per stream.
    """
    root = os.geteuid() == 0
    work = Path(tempfile.mkdtemp(prefix="mixtune-sandbox-"))
    drop_to = _drop_target() if root else None
    try:
        (work / "program.py").write_text(code)
        if drop_to is not None:
            os.chown(work, *drop_to)
            os.chown(work / "program.py", *drop_to)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "LANG": "C.UTF-8"}
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _BOOTSTRAP], cwd=work, env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=lambda: _limit_child(limits, drop_to),
            close_fds=True,
        )
        timed_out = False
        try:
            out, err = proc.communicate(stdin.encode(), timeout=limits.wall_seconds)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            out, err = proc.communicate()
        seconds = time.perf_counter() - t0
        _kill_group(proc.pid)  # anything it left behind in its session
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stdout, stderr = out[:65536].decode(errors="replace"), err[:65536].decode(errors="replace")
    rc = proc.returncode
    if timed_out:
        status = "timeout"
    elif rc in (-signal.SIGXCPU, -signal.SIGKILL) and seconds < limits.wall_seconds and "MemoryError" not in stderr:
        status = "cpu" if rc == -signal.SIGXCPU else "killed"
    elif "MemoryError" in stderr:
        status = "memory"
    elif rc != 0:
        status = "error" if rc > 0 else "killed"
    else:
        status = "ok"
    return Result(status == "ok", status, rc, stdout, stderr, seconds)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_tests(program: str, tests: str, *, entry_point: str | None = None, limits: Limits = Limits()) -> Result:
    """HumanEval-style check: the program, then its tests (and ``check(entry_point)`` when named)."""
    code = f"{program}\n\n{tests}\n"
    if entry_point:
        code += f"\ncheck({entry_point})\n"
    return run_program(code, limits=limits)
