"""The hostile-program suite again, as an unprivileged user, when the test suite runs as root (CI).

A non-root evaluator gets the sandbox's other path (an unprivileged bubblewrap in a user
namespace, rlimits instead of cgroups), so the same attacks must be contained there too. The
interpreter and the checkout may sit under a private folder (a 0700 /root) that ``nobody``
cannot enter: the run happens in a private mount namespace where such a folder is covered by a
world-searchable tmpfs holding just the paths the run needs, bound back in.
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _blocking_ancestor(path: Path) -> Path | None:
    """The topmost folder on the way to ``path`` that others cannot enter, if any."""
    for parent in [*reversed(path.parents), path]:
        if parent.is_dir() and not parent.stat().st_mode & 0o001:
            return parent
    return None


def _as_nobody_script(needed: list[Path], command: str) -> str:
    """Shell for ``unshare --mount``: make every ``needed`` path reachable by nobody, then run ``command``."""
    lines, covered = ["set -e", "stash=$(mktemp -d)"], {}
    for i, p in enumerate(needed):
        block = _blocking_ancestor(p)
        if block is not None:
            covered.setdefault(block, []).append((i, p))
            lines.append(f"mkdir -p $stash/{i} && mount --bind '{p}' $stash/{i}")
    for block, paths in covered.items():
        lines.append(f"mount -t tmpfs -o mode=0755 tmpfs '{block}'")
        for i, p in paths:
            lines.append(f"mkdir -p '{p}' && mount --bind $stash/{i} '{p}'")
            lines += [f"chmod 0755 '{parent}'" for parent in p.parents if parent != block and
                      parent.is_relative_to(block) and parent != Path("/")]
    nobody = "setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all"
    lines.append(f"cd '{ROOT}' && exec {nobody} env HOME=/tmp PATH=/usr/bin:/bin {command}")
    return "\n".join(lines)


@pytest.mark.skipif(os.geteuid() != 0, reason="this suite already runs as a non-root user: "
                                              "tests/eval/test_sandbox.py is the non-root run")
@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed (apt-get install bubblewrap)")
def test_the_sandbox_suite_passes_as_an_unprivileged_user():
    python = Path(sys.executable).absolute()
    needed = [Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(),
              Path(sysconfig.get_paths()["purelib"]).resolve(), ROOT]
    command = f"'{python}' -m pytest -q -p no:cacheprovider tests/eval/test_sandbox.py"
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                          _as_nobody_script(needed, command)], capture_output=True, text=True, timeout=600)
    tail = out.stdout[-3000:] + out.stderr[-2000:]
    assert out.returncode == 0, tail
    summary = re.search(r"(\d+) passed", out.stdout)
    assert summary and int(summary.group(1)) >= 15 and "skipped" not in out.stdout.splitlines()[-1], tail
