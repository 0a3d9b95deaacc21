"""Run untrusted generated code, isolated by the kernel rather than by the program's cooperation.

Every program runs in its own `bubblewrap <https://github.com/containers/bubblewrap>`_ sandbox (the
Debian package ``bubblewrap``; Flatpak's sandbox), one process tree per program. The layers:

1. **An unprivileged user.** As root, the sandbox is entered as ``nobody`` (it owns nothing and
   can read only what everyone can); otherwise as the evaluator's own unprivileged user, mapped to
   ``nobody`` inside a user namespace. Never as root.
2. **Namespaces** (``bwrap --unshare-all``): a mount namespace whose root is an empty tmpfs with
   only the system folders (``/usr`` and its links), the interpreter's prefix and (optionally) the
   evaluator's site-packages mounted **read-only**, a fresh ``/proc``, a minimal ``/dev`` and a
   size-capped tmpfs as the working folder and ``/tmp``: no ``/etc``, ``/root``, ``/home`` or
   project folders, nothing writable that outlives the program. A pid namespace (the program
   sees only its own processes; all of them die with it, ``setsid`` or not), a network namespace
   with only a loopback interface, and ipc and uts namespaces.
3. **Limits**: a control group per program (memory counted as used, not as address space, so
   threads work; a process count that holds for fork bombs) where cgroups can be created (root),
   else RLIMIT_DATA and RLIMIT_NPROC; RLIMIT_CPU, RLIMIT_FSIZE and RLIMIT_NOFILE always; a wall
   clock; output read in a bounded stream (a program that floods its output is killed and fails).
4. **An audit hook** inside the interpreter refusing process creation: a further layer only (Python's documentation says audit hooks are not a sandbox; the tests switch it off
   and check that the kernel layers still hold).

Why bubblewrap rather than the kernel calls made here: it is a small, widely used (Flatpak), maintained
tool that gets the order of unshare, mounts, ``pivot_root``, capability dropping and pid-1 reaping
right, which a hand-written version would have to re-learn; and it is cheap. Measured on the
project's 2-core machine: a bare ``bwrap ... true`` takes 3.8 ms, the interpreter alone 42 ms, a
whole sandboxed ``print(1)`` (cgroup, prlimit, bwrap, setpriv, interpreter, audit hook) 66 ms.

Where a layer cannot be had (no bubblewrap, no user namespaces), :func:`run_program` refuses to
run untrusted code and names what is missing, unless ``allow_unsafe_code=True`` (lm-eval's
``confirm_run_unsafe_code``). :func:`isolation` reports every layer.
"""

from __future__ import annotations

import os
import pwd
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from mixtune.core import MixtuneError
from mixtune.eval import cgroups

WORK = "/sandbox/work"
PACKAGES = "/sandbox/site-packages"


class SandboxUnavailable(MixtuneError):
    """A layer of isolation this machine cannot give; untrusted code is refused without it."""


@dataclass(frozen=True)
class Limits:
    """Resource limits for one program."""

    cpu_seconds: int = 5
    """CPU seconds of each process (RLIMIT_CPU)."""
    wall_seconds: float = 10.0
    """Wall-clock time of the whole program."""
    memory_mb: int = 512
    """Memory in use by all its processes (a cgroup; else each process's data segment)."""
    processes: int = 64
    """Processes and threads at once."""
    file_mb: int = 16
    """Largest file it may write, and (x 4) the size of its working folder and /tmp."""
    open_files: int = 256
    """Open file descriptors per process."""
    output_kb: int = 64
    """stdout and stderr, each: more than this kills the program (status ``output``)."""


@dataclass(frozen=True)
class Result:
    """How a program ended. ``passed`` only for a clean exit within every limit."""

    passed: bool
    status: str
    """``ok``, ``error`` (non-zero exit), ``timeout``, ``cpu``, ``memory``, ``output``, ``killed``."""
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


# Runs first in the sandboxed interpreter: the audit hook (layer 4), then the program.
_BOOTSTRAP = r'''
import os, sys
if os.path.isdir("/sandbox/site-packages"):
    sys.path.append("/sandbox/site-packages")
_BLOCKED = {"os.fork": "creating processes", "os.forkpty": "creating processes", "os.exec": "creating processes",
            "os.posix_spawn": "creating processes", "os.spawn": "creating processes", "os.system": "creating processes",
            "subprocess.Popen": "creating processes"}
def _hook(event, args):
    if event in _BLOCKED:
        raise PermissionError(f"sandbox: {_BLOCKED[event]} is not allowed")
sys.addaudithook(_hook)
del _hook
_code = open("program.py").read()
exec(compile(_code, "program.py", "exec"), {"__name__": "__main__"})
'''


def _nobody() -> tuple[int, int]:
    try:
        pw = pwd.getpwnam("nobody")
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        return 65534, 65534


def _interpreter() -> tuple[str, list[str]]:
    """The real interpreter and the folders it needs read-only: its prefix (stdlib, libpython)."""
    exe = os.path.realpath(sys.executable)
    folders = [os.path.realpath(sys.base_prefix)]
    if not exe.startswith(folders[0] + os.sep):
        folders.append(os.path.dirname(exe))
    return exe, folders


def _packages() -> str | None:
    """The evaluator's own site-packages when it is not the interpreter's (a virtualenv's)."""
    here = os.path.realpath(sysconfig.get_paths()["purelib"])
    base = os.path.realpath(sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})["purelib"])
    return here if here != base and os.path.isdir(here) else None


def _system_mounts() -> list[str]:
    """``/usr`` read-only, and ``/bin``, ``/lib`` ... as the host has them (links into /usr, or folders)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        p = Path("/") / name
        if p.is_symlink():
            args += ["--symlink", os.readlink(p), str(p)]
        elif p.is_dir():
            args += ["--ro-bind", str(p), str(p)]
    return args


def isolation() -> dict[str, object]:
    """Every layer and whether it is active here (bubblewrap is found, not assumed to work: a run
    that it cannot set up raises :class:`SandboxUnavailable` naming the reason)."""
    bwrap = shutil.which("bwrap")
    root = os.geteuid() == 0
    cg = cgroups.version()
    return {
        "bubblewrap": bwrap,
        "user": "nobody" if root else f"uid {os.geteuid()} (unprivileged), seen as nobody in a user namespace",
        "namespaces": (["mount", "pid", "network", "ipc", "uts"] if root else
                       ["user", "mount", "pid", "network", "ipc", "uts"]) if bwrap else [],
        "cgroup": f"v{cg} memory + pids" if cg else None,
        "rlimits": ["cpu", "fsize", "nofile"] + ([] if cg else ["data", "nproc"]),
        "bounded_output": True,
        "audit_hook": True,
    }


def _command(limits: Limits, packages: bool, program_fd: int) -> list[str]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable("the code sandbox needs bubblewrap (`apt-get install bubblewrap`), which is not "
                                 "installed; without it untrusted code is refused (allow_unsafe_code=True runs it "
                                 "with resource limits only)")
    exe, folders = _interpreter()
    tmpfs = str(4 * limits.file_mb * 2**20)
    uid, gid = _nobody()
    if os.geteuid() == 0:
        # bubblewrap sets up as root (it must reach an interpreter under a private /root), without a user
        # namespace, and setpriv makes the program the real nobody, with every capability gone
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise SandboxUnavailable("running as root, the sandbox needs setpriv (util-linux) to drop to nobody")
        who = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        become = [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--inh-caps=-all",
                  "--bounding-set=-all", "--no-new-privs", "--"]
    else:  # an unprivileged evaluator: a user namespace, in which the program is nobody
        who, become = ["--unshare-all", "--uid", str(uid), "--gid", str(gid)], []
    cmd = [bwrap, *who, "--die-with-parent", "--new-session", "--hostname", "sandbox", "--clearenv",
           "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", WORK, "--setenv", "LANG", "C.UTF-8",
           "--setenv", "TMPDIR", "/tmp", *_system_mounts(), "--proc", "/proc", "--dev", "/dev",
           "--perms", "1777", "--size", tmpfs, "--tmpfs", "/tmp",
           "--perms", "0777", "--size", tmpfs, "--tmpfs", WORK,
           "--perms", "0644", "--file", str(program_fd), f"{WORK}/program.py"]
    for folder in folders:  # at their own paths (libpython's RUNPATH is absolute), parents searchable
        for parent in reversed(Path(folder).parents[:-1]):
            cmd += ["--perms", "0755", "--dir", str(parent)]
        cmd += ["--ro-bind", folder, folder]
    site = _packages() if packages else None
    if site:
        cmd += ["--ro-bind", site, PACKAGES]
    # the root itself (bwrap's tmpfs, where the mount points live) is made read-only last
    return cmd + ["--remount-ro", "/", "--chdir", WORK, "--", *become, exe, "-I", "-c", _BOOTSTRAP]


def _limited(limits: Limits, group: cgroups.Cgroup | None, cmd: list[str]) -> list[str]:
    """``cmd`` started inside the cgroup and under the rlimits, through ``sh`` and util-linux's
    ``prlimit`` (no ``preexec_fn``, which is unsafe when several evaluations run in threads)."""
    mb = 2**20
    prlimit = [shutil.which("prlimit") or "/usr/bin/prlimit", f"--cpu={limits.cpu_seconds}:{limits.cpu_seconds + 1}",
               f"--fsize={limits.file_mb * mb}", f"--nofile={limits.open_files}", "--core=0"]
    if group is None:  # without a cgroup: the data segment (not address space: thread stacks) and processes
        prlimit += [f"--data={limits.memory_mb * mb}", f"--nproc={limits.processes}"]
    prlimit.append("--")
    if group is None:
        return prlimit + cmd
    join = "; ".join(f"echo $$ > {path}" for path in group.procs)  # our own paths: no quoting needed
    return ["/bin/sh", "-c", f'{join}; exec "$@"', "sh", *prlimit, *cmd]


def run_program(code: str, *, stdin: str = "", limits: Limits = Limits(), packages: bool = True,
                allow_unsafe_code: bool = False) -> Result:
    """Run ``code`` (a Python program) in the sandbox and report how it ended.

    Args:
        code: the program, run as ``__main__`` in a working folder of its own.
        stdin: what it reads from standard input.
        limits: its resource limits.
        packages: make the evaluator's site-packages (numpy ...) importable, read-only.
        allow_unsafe_code: where bubblewrap is missing, run with resource limits only instead of refusing.

    Never raises for anything the program does; the caller's process, files and environment are
    unaffected.

    Raises:
        SandboxUnavailable: a layer of isolation is missing here (without ``allow_unsafe_code``).
    """
    if shutil.which("bwrap") is None and allow_unsafe_code:
        return _run_unsafe(code, stdin, limits)
    cgroup = cgroups.Cgroup(limits.memory_mb * 2**20, limits.processes) if cgroups.version() else nullcontext()
    with tempfile.TemporaryFile() as program, tempfile.TemporaryFile() as args, cgroup as group:
        program.write(code.encode())
        program.seek(0)
        bwrap, *rest = _command(limits, packages, program.fileno())
        # bubblewrap's own process is the sandbox's pid 1, visible inside: its options come from a file
        # (not its command line, which would show the host's paths) and its environment is bare
        cut = rest.index("--")
        args.write(b"".join(a.encode() + b"\0" for a in rest[:cut]))
        args.seek(0)
        result = _supervise([bwrap, "--args", str(args.fileno()), *rest[cut:]], stdin, limits, group,
                            (program.fileno(), args.fileno()), env={"PATH": "/usr/bin:/bin"})
    if result.returncode == 1 and result.stderr.startswith("bwrap:"):  # it could not build the sandbox
        raise SandboxUnavailable(f"bubblewrap cannot set up the sandbox here: {result.stderr.strip()}")
    return result


def _supervise(cmd: list[str], stdin: str, limits: Limits, group, pass_fds: tuple[int, ...] = (), *,
               cwd: Path | None = None, env: dict | None = None) -> Result:
    """Start the sandbox, feed stdin, read its output in bounded amounts, enforce the wall clock."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(_limited(limits, group, cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, pass_fds=pass_fds, close_fds=True, cwd=cwd, env=env)
    threading.Thread(target=_feed, args=(proc.stdin, stdin.encode()), daemon=True).start()
    cap = limits.output_kb * 1024
    out = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    sel = selectors.DefaultSelector()
    for stream in out:
        sel.register(stream, selectors.EVENT_READ)
    why = None
    while sel.get_map():
        left = limits.wall_seconds - (time.perf_counter() - t0)
        if left <= 0:
            why = "timeout"
            break
        for key, _ in sel.select(timeout=min(left, 0.5)):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            buf = out[key.fileobj]
            buf += chunk[: cap + 1 - len(buf)]
            if len(buf) > cap:
                why = "output"
        if why:
            break
    if why:
        _kill(proc, group)
    rc = proc.wait()
    seconds = time.perf_counter() - t0
    sel.close()
    for stream in (proc.stdout, proc.stderr, proc.stdin):
        stream.close()
    stdout, stderr = (bytes(out[s][:cap]).decode(errors="replace") for s in (proc.stdout, proc.stderr))
    return Result(why is None and rc == 0, why or _status(rc, stderr, seconds, limits, group), rc, stdout, stderr,
                  seconds)


def _feed(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.close()
    except (BrokenPipeError, ValueError, OSError):
        pass  # the program ended (or closed stdin) without reading it all


def _kill(proc: subprocess.Popen, group) -> None:
    """Kill the sandbox: bubblewrap's death takes its pid namespace (every program process) with it."""
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    if group is not None:
        group.kill()


def _status(rc: int, stderr: str, seconds: float, limits: Limits, group) -> str:
    """What ended a program that was not stopped for time or output."""
    if rc == 0:
        return "ok"
    if group is not None and group.out_of_memory() or "MemoryError" in stderr:
        return "memory"
    signum = -rc if rc < 0 else rc - 128 if rc > 128 else None  # bubblewrap passes a signal on as 128 + n
    if signum == signal.SIGXCPU:
        return "cpu"
    if signum is not None:
        return "cpu" if signum == signal.SIGKILL and seconds >= limits.cpu_seconds * 0.9 else "killed"
    return "error"


def _run_unsafe(code: str, stdin: str, limits: Limits) -> Result:
    """Without bubblewrap, when the caller allowed it: a plain interpreter with the resource limits,
    the audit hook and a throwaway folder. Not isolation."""
    work = Path(tempfile.mkdtemp(prefix="mixtune-unsafe-"))
    try:
        (work / "program.py").write_text(code)
        exe, _ = _interpreter()
        return _supervise([exe, "-I", "-c", _BOOTSTRAP], stdin, limits, None, cwd=work,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(work), "LANG": "C.UTF-8"})
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_tests(program: str, tests: str, *, entry_point: str | None = None, limits: Limits = Limits(),
              allow_unsafe_code: bool = False) -> Result:
    """HumanEval-style check: the program, then its tests (and ``check(entry_point)`` when named)."""
    code = f"{program}\n\n{tests}\n"
    if entry_point:
        code += f"\ncheck({entry_point})\n"
    return run_program(code, limits=limits, allow_unsafe_code=allow_unsafe_code)
