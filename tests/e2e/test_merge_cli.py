"""`mixtune merge` run as a user runs it: its help, its method list, and a damaged input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]


def mixtune(*args, cwd=ROOT):
    env = os.environ | {"COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "mixtune.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_merge_help_gives_merge_override_examples():
    out = mixtune("merge", "--help")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "parameters.density=0.5 dtype=bfloat16" in text
    assert "format.seq_len" not in text  # train's example, whose keys a merge config does not have


def test_merge_list_describes_every_parameter_and_gives_the_lines_formula():
    out = mixtune("merge", "--list")
    assert out.returncode == 0, out.stderr
    params = re.findall(r"^    (\S+) = (.*?):(.*)$", out.stdout, flags=re.M)
    assert len(params) >= 60  # 15 methods, most with several parameters
    empty = [name for name, _default, doc in params if not doc.strip()]
    assert empty == []
    names = {name for name, _d, _doc in params}
    assert {"parameters.lambda", "parameters.scope", "parameters.drop", "models[].parameters.density"} <= names
    text = " ".join(out.stdout.split())
    # LiNeS (Wang et al., 2025): alpha = (||sum_t tau_t||_1 / ||tau_MTL||_1) / T; for summed task vectors, 1/T
    assert "alpha = (||sum_t tau_t||_1 / ||tau_MTL||_1) / T" in text and "so auto gives 1/T" in text
    assert "(||sum tau||_1 / ||sum tau||_1)" not in text
    assert "``" not in text and "None" not in text and "True" not in text  # plain text; YAML's null and true
    assert "parameters.beta = null:" in text and "parameters.normalize = true:" in text
    assert "parameters.t = (required):" in text and "Undefined" not in text  # slerp's t has no default
    assert "nuslerp (base model optional)" in text and "linear (no base model)" in text


def test_a_header_that_lies_about_a_shape_is_one_error_line_at_dry_run(tmp_path):
    # base vocabulary 8 rows; the model's header claims 10 rows, its bytes hold 8: `vocab: pad` lets
    # the shapes through, so only the size check at open time stops it
    for name in ("base", "liar"):
        (tmp_path / name).mkdir()
        save_file({"model.embed_tokens.weight": torch.randn(8, 6), "norm.weight": torch.ones(6)},
                  str(tmp_path / name / "model.safetensors"))
    path = tmp_path / "liar" / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["model.embed_tokens.weight"]["shape"] = [10, 6]
    lo, hi = header["model.embed_tokens.weight"]["data_offsets"]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    recipe = tmp_path / "merge.yaml"
    recipe.write_text("method: task_arithmetic\nbase_model: base\nmodels:\n  - model: liar\nvocab: pad\n")
    for args in (["--dry-run"], ["-o", tmp_path / "out"]):
        out = mixtune("merge", recipe, *args)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: model ")
        assert (f"liar: model.safetensors: tensor model.embed_tokens.weight: the header says shape [10, 6] F32 "
                f"(240 bytes), but its data_offsets [{lo}, {hi}] hold 192 bytes") in out.stderr
    assert not (tmp_path / "out").exists()
