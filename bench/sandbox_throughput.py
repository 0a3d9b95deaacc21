"""Programs per second of the code sandbox on a HumanEval-sized batch, against human-eval's style.

164 short generated programs with tests (as many as HumanEval has problems; every fourth one is
wrong), run (a) the way the ``human-eval`` package's ``execution.py`` runs them -- a
``multiprocessing.Manager`` and a forked ``Process`` per program, ``reliability_guard``-style
monkeypatching and rlimits, no isolation -- re-implemented here, and (b) through
``mixtune.eval.sandbox.run_tests`` with every isolation layer. Both with a thread pool of 1 and of
``os.cpu_count()`` workers, as human-eval's ``evaluate_functional_correctness`` does; medians of
``--repeats`` runs, measured in the same process one after the other.

    python bench/sandbox_throughput.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import io
import multiprocessing
import os
import platform
import resource
import signal
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor


def problems(n: int = 164) -> list[tuple[str, str, str, bool]]:
    """(program, tests, entry point, expected to pass): a loop, a condition and three asserts each."""
    out = []
    for i in range(n):
        k = i % 7 + 2
        right = i % 4 != 3
        body = f"    total = 0\n    for x in range(n):\n        if x % {k} == 0:\n            total += x\n    return total"
        if not right:
            body = body.replace("total += x", "total += x + 1")
        program = f"def f{i}(n):\n{body}\n"
        expect = [sum(x for x in range(n) if x % k == 0) for n in (10, 25, 100)]
        tests = ("def check(f):\n" + "".join(f"    assert f({n}) == {e}\n" for n, e in zip((10, 25, 100), expect)))
        out.append((program, tests, f"f{i}", right))
    return out


# -- (a) human-eval's execution.py style, re-implemented ---------------------------------------------


def _guard(max_bytes: int) -> None:
    """What human-eval's reliability_guard does: rlimits, then dangerous functions set to None."""
    resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))
    resource.setrlimit(resource.RLIMIT_DATA, (max_bytes, max_bytes))
    faulthandler.disable()
    import builtins
    import shutil
    import subprocess

    builtins.exit = builtins.quit = None
    for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
                 "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
                 "chroot", "lchown", "getcwd", "chdir"):
        setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None


def _unsafe_execute(code: str, timeout: float, result) -> None:
    with tempfile.TemporaryDirectory() as d:
        os.chdir(d)
        rmtree, rmdir, chdir = __import__("shutil").rmtree, os.rmdir, os.chdir
        _guard(4 * 2**30)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                signal.setitimer(signal.ITIMER_REAL, timeout)
                signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError()))
                exec(code, {})
                signal.setitimer(signal.ITIMER_REAL, 0)
            result.append("passed")
        except BaseException as e:  # noqa: BLE001 (as human-eval: any failure is a failed sample)
            result.append(f"failed: {type(e).__name__}")
        __import__("shutil").rmtree, os.rmdir, os.chdir = rmtree, rmdir, chdir


def humaneval_style(program: str, tests: str, entry: str, timeout: float = 3.0) -> bool:
    code = f"{program}\n{tests}\ncheck({entry})\n"
    manager = multiprocessing.Manager()
    result = manager.list()
    p = multiprocessing.Process(target=_unsafe_execute, args=(code, timeout, result))
    p.start()
    p.join(timeout=timeout + 1)
    if p.is_alive():
        p.kill()
    ok = bool(result) and result[0] == "passed"
    manager.shutdown()
    return ok


# -- (b) mixtune's sandbox ------------------------------------------------------------------------------


def sandboxed(program: str, tests: str, entry: str) -> bool:
    from mixtune.eval.sandbox import run_tests

    return run_tests(program, tests, entry_point=entry).passed


def rate(check, batch, workers: int) -> tuple[float, list[bool]]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as ex:
        passed = list(ex.map(lambda p: check(*p[:3]), batch))
    return len(batch) / (time.perf_counter() - t0), passed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from mixtune.eval.sandbox import isolation

    batch = problems()
    expected = [p[3] for p in batch]
    cores = os.cpu_count() or 1
    print(f"{platform.processor() or platform.machine()}, {cores} cores, euid {os.geteuid()}; sandbox: {isolation()}")
    for workers in sorted({1, cores}):
        rows = {}
        for name, check in (("human-eval style (no isolation)", humaneval_style), ("mixtune sandbox", sandboxed)):
            rates = []
            for _ in range(args.repeats):
                r, passed = rate(check, batch, workers)
                assert passed == expected, f"{name}: wrong verdicts"
                rates.append(r)
            rows[name] = statistics.median(rates)
            print(f"workers {workers}: {name:34s} {rows[name]:6.1f} programs/s  (runs: "
                  + ", ".join(f"{x:.1f}" for x in rates) + ")")
        ratio = rows["mixtune sandbox"] / rows["human-eval style (no isolation)"]
        print(f"workers {workers}: mixtune / human-eval style = {ratio:.2f}x")


if __name__ == "__main__":
    main()
