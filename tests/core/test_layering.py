"""A stage imports only core, models and earlier stages (shared/DESIGN.md)."""

import ast
from pathlib import Path

import mixtune

PKG = Path(mixtune.__file__).parent
STAGES = ["data", "strategy", "train", "merge", "eval", "analysis", "report"]
BASE = {"core": set(), "models": {"core"}}


def allowed(package: str) -> set[str] | None:
    if package in BASE:
        return BASE[package] | {package}
    if package in STAGES:
        return {"core", "models", package, *STAGES[: STAGES.index(package)]}
    return None  # top-level modules (recipe, pipeline, cli, ...) may import everything


def imports_of(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mixtune."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mixtune.")}
    return out


def test_stages_import_only_earlier_stages():
    checked = 0
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        if len(rel.parts) < 2:
            continue
        ok = allowed(rel.parts[0])
        if ok is None:
            continue
        bad = imports_of(path) - ok
        assert not bad, f"{rel} imports {sorted(bad)}; a stage may import only {sorted(ok)}"
        checked += 1
    assert checked >= 15  # the check must actually see the package's modules
