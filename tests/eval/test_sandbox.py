"""Hostile programs: each must be stopped and reported as a failure while the host carries on."""

import os
import socket
import threading

import pytest

from mixtune.eval.sandbox import Limits, isolation, run_program, run_tests

FAST = Limits(cpu_seconds=2, wall_seconds=5, memory_mb=256)


def test_a_normal_program_passes_and_gets_stdin():
    r = run_program("import sys\nprint(sum(map(int, sys.stdin.read().split())))", stdin="2 3 4")
    assert r.passed and r.status == "ok" and r.stdout == "9\n"


def test_fork_bomb_is_stopped():
    r = run_program("import os\nwhile True:\n    os.fork()", limits=FAST)
    assert not r.passed and "creating processes is not allowed" in r.stderr
    r = run_program("import subprocess\nwhile True:\n    subprocess.Popen(['sleep', '100'])", limits=FAST)
    assert not r.passed and "not allowed" in r.stderr


def test_memory_bomb_is_stopped():
    r = run_program("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))", limits=FAST)
    assert not r.passed and r.status == "memory"


def test_infinite_loop_is_stopped_by_cpu_or_wall_limit():
    r = run_program("while True:\n    pass", limits=Limits(cpu_seconds=1, wall_seconds=5))
    assert not r.passed and r.status in ("cpu", "killed") and r.seconds < 5
    r = run_program("import time\ntime.sleep(60)", limits=Limits(wall_seconds=1))
    assert not r.passed and r.status == "timeout" and r.seconds < 5


def test_network_is_unreachable():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(3)
    port = server.getsockname()[1]
    arrived = []
    t = threading.Thread(target=lambda: arrived.append(_accept(server)))
    t.start()
    r = run_program(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                    f"s.sendall(b'leak')", limits=FAST)
    t.join()
    server.close()
    assert not r.passed and arrived == [None]  # nothing connected to the host's listener


def _accept(server):
    try:
        conn, _ = server.accept()
        conn.close()
        return "connected"
    except OSError:
        return None


def test_writing_outside_its_folder_fails(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    outside.chmod(0o777)  # writable by anyone, so only the sandbox can stop it
    target = outside / "pwned.txt"
    r = run_program(f"open({str(target)!r}, 'w').write('x')", limits=FAST)
    assert not r.passed and not target.exists() and "writing outside the working folder" in r.stderr
    r = run_program(f"import os\nos.remove({str(tmp_path / 'keep')!r})", limits=FAST)
    assert not r.passed
    # inside its own folder a program may write freely
    r = run_program("open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())", limits=FAST)
    assert r.passed and r.stdout == "ok\n"


def test_environment_secrets_are_not_visible(monkeypatch):
    monkeypatch.setenv("MIXTUNE_TEST_SECRET", "hunter2-s3cret")
    r = run_program("import os\nprint(dict(os.environ))", limits=FAST)
    assert r.passed and "hunter2" not in r.stdout
    r = run_program("import os\nprint(open(f'/proc/{os.getppid()}/environ').read())", limits=FAST)
    assert not r.passed and "hunter2" not in r.stdout


def test_killing_its_parent_fails_and_the_host_lives():
    me = os.getpid()
    r = run_program("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", limits=FAST)
    assert not r.passed and "signalling other processes is not allowed" in r.stderr
    r = run_program(f"import os, signal\nos.killpg({os.getpgid(0)}, signal.SIGKILL)", limits=FAST)
    assert not r.passed
    r = run_program("import ctypes\nctypes.CDLL(None).kill(__import__('os').getppid(), 9)", limits=FAST)
    assert not r.passed and "ctypes" in r.stderr
    assert os.getpid() == me  # still here
    assert run_program("print('next evaluation runs')").passed


def test_humaneval_style_tests():
    program = "def add(a, b):\n    return a + b\n"
    tests = "def check(f):\n    assert f(2, 3) == 5\n    assert f(-1, 1) == 0\n"
    assert run_tests(program, tests, entry_point="add").passed
    wrong = run_tests("def add(a, b):\n    return a - b\n", tests, entry_point="add")
    assert not wrong.passed and wrong.status == "error" and "AssertionError" in wrong.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root; the audit hook still blocks sockets")
def test_isolation_report_as_root():
    layers = isolation()
    assert layers["network_namespace"] and layers["audit_hook"] and layers["limits"]
