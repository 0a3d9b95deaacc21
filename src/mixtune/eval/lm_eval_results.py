"""Scores in lm-evaluation-harness's results JSON layout: what ``lm_eval --output_path`` writes.

``mixtune eval --out DIR`` writes ``DIR/results_lm_eval.json`` beside ``scores.json``, in the layout
of lm-eval 0.4.x's ``results_<date>.json``, so tools that read lm-eval results (its own
``lm_eval.utils.make_table``, leaderboards, notebooks) read mixtune's too. The layout follows
lm-eval 0.4.13: ``EvalAcc._to_eval_results`` and ``_compute_task_aggregations``
(``evaluator_utils.py``), ``simple_evaluate`` (``evaluator.py``: ``config``, ``git_hash``,
``date``), ``add_env_info`` / ``add_tokenizer_info`` (``loggers/utils.py``) and
``GeneralConfigTracker`` / ``save_results_aggregated`` (``loggers/evaluation_tracker.py``).

**Metrics.** ``results[task]`` holds ``"<metric>,<filter>"`` (the mean over items) and
``"<metric>_stderr,<filter>"``: lm-eval's ``mean_stderr``, the sample standard deviation
(``n - 1``) over ``sqrt(n)``, and ``"N/A"`` below two items as lm-eval writes it. (``mixtune eval``'s
table and studies use the binomial error ``sqrt(p(1-p)/n)`` instead; this file carries lm-eval's.)
Names: an lm-eval task keeps its ``metric_list`` names (lm-eval's defaults without one: ``acc`` and
``acc_norm`` for ``multiple_choice``, ``exact_match`` for ``generate_until``) and its filter's
``name`` (``none`` without a filter). Otherwise: multiple choice ``acc`` and ``acc_norm``; code
``pass@k`` for each k; a generate task ``exact_match`` for the ``exact``, ``regex`` and ``numeric``
scorers (filters ``none``, ``regex``, ``numeric-<extract>``), ``contains`` for ``contains`` and the
function's name for a user scorer; a built-in ability ``exact_match`` with the filter
``answer-line`` (the text after the last ``Answer:`` is what is compared).
A loglikelihood task has ``perplexity`` (lm-eval's aggregation, ``exp(-mean loglikelihood)``, lower
is better; its stderr, a random bootstrap in lm-eval, is left out) and ``acc`` (``is_greedy``).

**Left out**, as no value can be given honestly: the seeds (``random_seed``, ``numpy_seed``,
``torch_seed``, ``fewshot_seed``; mixtune's seeds choose built-in problems and few-shot examples
per task), ``bootstrap_iters`` (nothing is bootstrapped), ``model_revision`` / ``model_sha`` (hub
revisions; models are local folders), ``lm_eval_version`` / ``upper_git_hash`` (lm-eval did not
run), ``pretty_env_info`` (torch's environment report takes seconds and runs subprocesses),
``task_hashes`` (hashes of lm-eval's per-sample logs), ``samples`` (``outputs.jsonl`` holds them),
``system_instruction`` and the chat-template fields (mixtune picks the prompt format per task:
each task's config says which), and ``max_length`` unless a multiple-choice task ran (generation
truncates nothing).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path

import transformers
import yaml

from mixtune import __version__
from mixtune.core import atomic_write_text
from mixtune.eval.choice import max_length_of, mean_stderr
from mixtune.eval.lm_eval_tasks import is_lm_eval_task
from mixtune.eval.run import AbilityScore
from mixtune.eval.tasks import ChoiceTask, CodeTask, GenerateTask, LoglikelihoodTask, load_items

RESULTS_FILE = "results_lm_eval.json"
DEFAULT_METRICS = {"multiple_choice": ["acc", "acc_norm"], "generate_until": ["exact_match"],
                   "loglikelihood": ["perplexity", "acc"]}
"""lm-eval's metrics for a task without ``metric_list`` (``DEFAULT_METRIC_REGISTRY``, ``api/registry.py``)."""


def lm_eval_sources(abilities: str) -> dict[str, tuple[Path, dict]]:
    """The lm-eval task files among ``--abilities`` entries: task name -> (file, its YAML as read)."""
    out = {}
    for entry in (a.strip() for a in abilities.split(",")):
        if entry.endswith((".yaml", ".yml")) and Path(entry).is_file():
            cfg = yaml.safe_load(Path(entry).read_text(encoding="utf-8"))
            if is_lm_eval_task(cfg):
                out[str(cfg["task"])] = (Path(entry).resolve(), cfg)
    return out


def stderr(values: list[float]) -> float | str:
    """lm-eval's standard error of a mean-aggregated metric: ``mean_stderr`` (``api/metrics.py``),
    ``sqrt(sum (x - mean)^2 / (n - 1)) / sqrt(n)``; ``"N/A"`` for fewer than two items (as
    ``_compute_task_aggregations`` writes it)."""
    return mean_stderr(values) if len(values) > 1 else "N/A"


def metrics_of(score: AbilityScore, task=None, lm_cfg: dict | None = None) -> list[tuple[str, str, list[float], bool]]:
    """``(metric, filter, per-item values, higher_is_better)`` of one scored ability, named as the module
    docstring says: ``task`` is its task from a file (None: built-in), ``lm_cfg`` its lm-eval YAML."""
    ex, hib = score.examples, score.higher_is_better
    if lm_cfg is not None:
        kind = lm_cfg.get("output_type", "generate_until")
        listed = [m if isinstance(m, dict) else {"metric": m} for m in lm_cfg.get("metric_list") or []]
        listed = listed or [{"metric": m} for m in DEFAULT_METRICS[kind]]
        filters = lm_cfg.get("filter_list") or []
        filt = filters[0].get("name", "regex") if filters else "none"  # mixtune reads one regex pipeline
        if kind == "loglikelihood":  # lm-eval: perplexity is exp(-mean loglikelihood), lower is better
            return [("perplexity", "none", [e["loglikelihood"] for e in ex], False) if m["metric"] == "perplexity"
                    else ("acc", "none", [e["score"] for e in ex], True) for m in listed]
        return [(m["metric"], filt, [e["score" if kind == "generate_until" else m["metric"]] for e in ex],
                 bool(m.get("higher_is_better", True))) for m in listed]  # acc, acc_norm, exact_match: higher
    if isinstance(task, ChoiceTask):
        return [(m, "none", [e[m] for e in ex], hib) for m in ("acc", "acc_norm")]
    if isinstance(task, LoglikelihoodTask):
        return [("perplexity", "none", [e["loglikelihood"] for e in ex], False),
                ("acc", "none", [e["score"] for e in ex], hib)]
    if isinstance(task, CodeTask):
        return [(f"pass@{k}", "none", [e[f"pass@{k}"] for e in ex], hib) for k in task.k]
    values = [e["score"] for e in ex]
    if isinstance(task, GenerateTask):
        name, filt = {"exact": ("exact_match", "none"), "regex": ("exact_match", "regex"),
                      "numeric": ("exact_match", f"numeric-{task.scorer_options.extract}"),
                      "contains": ("contains", "none")}.get(task.scorer, (task.scorer.rpartition(":")[2], "none"))
        return [(name, filt, values, hib)]
    return [("exact_match", "answer-line", values, hib)]


def _config(name: str, score: AbilityScore, task, source: tuple[Path, dict] | None, run: Mapping) -> dict:
    """``configs[name]``: an lm-eval task's YAML with the defaults mixtune applied and lm-eval dumps;
    a task file's settings; a built-in ability's version and what chooses its problems."""
    if source is not None:
        path, cfg = source
        defaults = {"output_type": "generate_until", "num_fewshot": 0, "description": "", "target_delimiter": " ",
                    "fewshot_delimiter": "\n\n"}
        return (cfg | {k: v for k, v in defaults.items() if k not in cfg}
                | {"metadata": (cfg.get("metadata") or {}) | {"config_source": str(path)}})
    if task is not None:
        return {"task": name, **task.model_dump(mode="json")}
    meta = {"version": score.version, "difficulty": run["difficulty"], "seed": run["seed"]}
    return {"task": name, "output_type": "generate_until", "test_split": "test", "num_fewshot": 0,
            "metadata": meta | ({"condition": run["condition"]} if run.get("condition") else {})}


def _git_hash() -> str | None:
    """``git describe --always --dirty`` of the mixtune checkout that ran (lm-eval's ``get_git_commit_hash``
    describes its own checkout; ``--dirty`` marks uncommitted edits); None when not run from one."""
    repo = Path(__file__).resolve().parents[3]
    if not (repo / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def lm_eval_results(scores: Mapping[str, AbilityScore], *, model, tokenizer, model_path: str, n: int,
                    batch_size: int, seed: int = 0, difficulty: int = 1, condition: str | None = None,
                    tasks: Mapping[str, object] | None = None,
                    sources: Mapping[str, tuple[Path, dict]] | None = None,
                    started: float, seconds: float) -> dict:
    """The results of one ``evaluate`` call as lm-eval 0.4.x lays out its ``results_<date>.json``.

    Args:
        scores: :func:`mixtune.eval.run.evaluate`'s result, in evaluation order.
        model, tokenizer: what was scored (parameters, dtype, device, special tokens).
        model_path: the MODEL folder as given (``config.model_args`` is ``pretrained=<it>``).
        n, batch_size, seed, difficulty, condition: ``evaluate``'s arguments.
        tasks: the abilities from files, by name (:func:`mixtune.eval.run.parse_abilities`).
        sources: the lm-eval task files among them (:func:`lm_eval_sources`).
        started: UNIX time the evaluation began (lm-eval's ``date``).
        seconds: how long it took (``total_evaluation_time_seconds``, a string as lm-eval writes it).
    """
    tasks, sources = tasks or {}, sources or {}
    run = {"seed": seed, "difficulty": difficulty, "condition": condition}
    results, configs, versions, nshot, hib, nsamples = {}, {}, {}, {}, {}, {}
    for name, sc in scores.items():
        task, source = tasks.get(name), sources.get(name)
        entry = {"name": name, "alias": name, "sample_len": sc.n}
        for metric, filt, values, up in metrics_of(sc, task, source[1] if source else None):
            if metric == "perplexity":  # lm-eval's `perplexity` aggregation; its stderr is a random bootstrap: left out
                entry[f"{metric},{filt}"] = math.exp(-sum(values) / len(values))
            else:
                entry[f"{metric},{filt}"] = sum(values) / len(values)  # lm-eval's `mean`
                entry[f"{metric}_stderr,{filt}"] = stderr(values)
            hib.setdefault(name, {})[metric] = up
        results[name] = entry
        configs[name] = _config(name, sc, task, source, run)
        versions[name] = (source[1].get("metadata") or {}).get("version", "Yaml") if source else sc.version
        nshot[name] = int(source[1].get("num_fewshot") or 0) if source else getattr(task, "fewshot", 0)
        nsamples[name] = {"original": len(load_items(task)) if task is not None else sc.n, "effective": sc.n}
    device = next(model.parameters()).device
    out = {
        "results": results,
        "group_subtasks": {},
        "configs": dict(sorted(configs.items())),
        "versions": dict(sorted(versions.items())),
        "n-shot": dict(sorted(nshot.items())),
        "higher_is_better": dict(sorted(hib.items())),
        "n-samples": nsamples,
        "config": {
            "model": "mixtune",
            "model_args": f"pretrained={model_path}",
            "model_num_parameters": model.num_parameters() if hasattr(model, "num_parameters")
            else sum(p.numel() for p in model.parameters()),
            "model_dtype": str(model.dtype),
            "batch_size": batch_size,
            "batch_sizes": [],  # lm-eval lists sizes found by batch_size=auto; mixtune's is fixed
            "device": str(device),
            "use_cache": None,  # no cache of model responses
            "limit": n,
            "gen_kwargs": None,  # each task's own generation settings, none overridden
        },
        "git_hash": _git_hash(),
        "date": started,
        "transformers_version": transformers.__version__,
        "tokenizer_pad_token": [tokenizer.pad_token, str(tokenizer.pad_token_id)],
        "tokenizer_eos_token": [tokenizer.eos_token, str(tokenizer.eos_token_id)],
        "tokenizer_bos_token": [tokenizer.bos_token, str(tokenizer.bos_token_id)],
        "eot_token_id": tokenizer.eos_token_id,  # generation stops at EOS, as lm-eval's HF backend does
    }
    if any(isinstance(tasks.get(name), ChoiceTask) for name in scores):
        out["max_length"] = max_length_of(model, tokenizer)  # the left truncation of choice scoring
    out |= {"model_source": "mixtune", "model_name": model_path,
            "model_name_sanitized": re.sub(r"[\"<>:/|\\?*\[\]]+", "__", model_path),  # lm-eval's sanitize_model_name
            "total_evaluation_time_seconds": str(seconds), "mixtune_version": __version__}
    return out


def write_lm_eval_results(out_dir: Path, scores: Mapping[str, AbilityScore], **kwargs) -> Path:
    """:func:`lm_eval_results` written to ``out_dir/results_lm_eval.json`` (indent 2, as lm-eval dumps)."""
    text = json.dumps(lm_eval_results(scores, **kwargs), indent=2, ensure_ascii=False, default=str)
    return atomic_write_text(Path(out_dir) / RESULTS_FILE, text)


__all__ = ["RESULTS_FILE", "lm_eval_results", "lm_eval_sources", "metrics_of", "stderr", "write_lm_eval_results"]
