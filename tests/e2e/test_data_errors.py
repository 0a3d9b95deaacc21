"""A data error seen from the CLI: exit code 2, one `error:` line naming file, line and column, no traceback."""

import os
import subprocess
import sys


def test_preview_of_non_utf8_data_is_one_error_line(tmp_path):
    (tmp_path / "run.yaml").write_text("model: builtin:tiny\nsources:\n  mine: {path: d.jsonl}\n")
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"prompt": "p", "completion": "c"}\n{"prompt": "caf\xe9", "completion": "c"}\n')  # Latin-1 "é"
    env = os.environ | {"COLUMNS": "200", "NO_COLOR": "1"}
    out = subprocess.run([sys.executable, "-m", "mixtune.cli", "data", "preview", "run.yaml"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert f"{data}:2: not UTF-8: byte 0xe9 at column 16 cannot be decoded" in lines[0]
