"""lm-evaluation-harness task YAML as input: a task over local data becomes a mixtune ability.

Read (lm-eval 0.4 names): ``task``, ``dataset_path`` (``json``, ``parquet`` or a local path) with
``dataset_kwargs: {data_files: ...}``, ``test_split`` / ``validation_split`` (which file is
scored), ``fewshot_split`` / ``training_split``, ``doc_to_text`` and ``doc_to_target`` (a field
or a Jinja template), ``description``, ``target_delimiter``, ``fewshot_delimiter``,
``output_type: generate_until`` with ``generation_kwargs`` (``until``, ``max_gen_toks``, greedy),
``num_fewshot``, ``metric_list`` (``exact_match`` with ``ignore_case``, ``ignore_punctuation``,
``regexes_to_ignore``) and ``filter_list`` (a ``regex`` filter, then ``take_first``);
``output_type: multiple_choice`` with ``doc_to_choice``, ``metric_list`` ``acc`` / ``acc_norm`` and
``num_fewshot``; ``output_type: loglikelihood`` (zero-shot) with ``acc`` (the score) and ``perplexity``.

Anything else is refused in one line naming the key, and a task whose data must be downloaded
says which file to provide. Zero-shot prompts are exactly lm-eval's; with ``num_fewshot`` the
examples are laid out as lm-eval lays them out but drawn by mixtune's seeded sampler, not lm-eval's,
so few-shot prompts hold other examples.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from mixtune.core import ConfigError
from mixtune.data.scorers import ScorerParams
from mixtune.eval.tasks import ChoiceTask, GenerateTask, LoglikelihoodTask

SUPPORTED = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "test_split", "validation_split",
             "fewshot_split", "training_split", "doc_to_text", "doc_to_target", "doc_to_choice", "description",
             "target_delimiter",
             "fewshot_delimiter", "output_type", "generation_kwargs", "num_fewshot", "metric_list", "filter_list",
             "metadata", "should_decontaminate", "doc_to_decontamination_query", "repeats"}


def is_lm_eval_task(data: object) -> bool:
    """Whether a parsed YAML file is an lm-eval task (``task:`` with a dataset or an output type)."""
    return isinstance(data, dict) and "task" in data and ("dataset_path" in data or "output_type" in data)


def _data_file(cfg: dict, split: str, where: str, base: Path) -> Path:
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    kind = cfg.get("dataset_path")
    if kind not in ("json", "parquet") and not (base / str(kind)).exists():
        raise ConfigError(f"{where}: dataset_path {kind!r} would be downloaded; mixtune reads local data only: save the "
                          f"{split} split as JSONL and set dataset_path: json and dataset_kwargs: "
                          f"{{data_files: {{{split}: FILE.jsonl}}}}")
    if kind not in ("json", "parquet"):
        return base / str(kind)
    if isinstance(files, str):
        files = {split: files}
    if not isinstance(files, dict) or split not in files:
        raise ConfigError(f"{where}: dataset_kwargs.data_files has no {split!r} file; give one, e.g. "
                          f"data_files: {{{split}: {split}.jsonl}}")
    f = files[split]
    f = f[0] if isinstance(f, list) and len(f) == 1 else f
    if not isinstance(f, str):
        raise ConfigError(f"{where}: dataset_kwargs.data_files.{split} must be one file, got {f!r}")
    path = Path(f) if Path(f).is_absolute() else base / f
    if not path.exists():
        raise ConfigError(f"{where}: data file {str(path)!r} for split {split!r} does not exist")
    return path


def _metrics(cfg: dict, where: str, default: str) -> list:
    """``metric_list`` (default ``[default]``), each aggregated by the mean over items as mixtune does:
    another ``aggregation``, or ``higher_is_better: false``, is refused rather than reported wrong."""
    metrics = cfg.get("metric_list") or [{"metric": default}]
    for m in metrics:
        if isinstance(m, dict) and m.get("aggregation", "mean") != "mean":
            raise ConfigError(f"{where}: metric_list.{m.get('metric')}: aggregation {m['aggregation']!r}; "
                              "mixtune aggregates by the mean over items")
        if isinstance(m, dict) and m.get("higher_is_better", True) is not True:
            raise ConfigError(f"{where}: metric_list.{m.get('metric')}: higher_is_better false is not read")
    return metrics


def _scoring(cfg: dict, where: str) -> tuple[str, ScorerParams]:
    metrics = _metrics(cfg, where, "exact_match")
    names = [m.get("metric") if isinstance(m, dict) else m for m in metrics]
    if names != ["exact_match"]:
        raise ConfigError(f"{where}: metric_list {names}: only exact_match is read from lm-eval tasks so far")
    m = metrics[0] if isinstance(metrics[0], dict) else {}
    unknown = set(m) - {"metric", "aggregation", "higher_is_better", "ignore_case", "ignore_punctuation",
                        "regexes_to_ignore"}
    if unknown:
        raise ConfigError(f"{where}: metric_list.exact_match: {sorted(unknown)} are not read")
    opts = dict(ignore_case=bool(m.get("ignore_case", False)), ignore_punctuation=bool(m.get("ignore_punctuation", False)),
                ignore_patterns=list(m.get("regexes_to_ignore") or []), fold_whitespace=False)
    filters = cfg.get("filter_list")
    if not filters:
        return "exact", ScorerParams(**opts)
    if len(filters) != 1:
        raise ConfigError(f"{where}: filter_list with {len(filters)} pipelines: one is read (its metric is the task's)")
    steps = [(s.get("function"), s) for s in filters[0].get("filter", [])]
    if [f for f, _ in steps] not in (["regex", "take_first"], ["regex"]):
        raise ConfigError(f"{where}: filter_list {[f for f, _ in steps]}: only regex (then take_first) is read")
    regex = steps[0][1]
    if regex.get("group_select", 0) != 0:
        raise ConfigError(f"{where}: filter_list regex group_select {regex['group_select']}: only 0 is read")
    return "regex", ScorerParams(**opts, pattern=regex.get("regex_pattern", r"#### (\-?[0-9\.\,]+)"), occurrence="first")


def from_lm_eval(path: str | Path) -> dict[str, GenerateTask | ChoiceTask]:
    """The ability an lm-eval task file defines, named by its ``task``.

    Raises:
        ConfigError: the file uses what is not read (named), or its data are not local.
    """
    path = Path(path)
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    where = str(path)
    unknown = sorted(set(cfg) - SUPPORTED)
    if unknown:
        raise ConfigError(f"{where}: lm-eval keys {', '.join(unknown)} are not read by mixtune")
    if cfg.get("repeats", 1) != 1:
        raise ConfigError(f"{where}: repeats {cfg['repeats']!r}: each item is answered once (repeats: 1)")
    kind = cfg.get("output_type", "generate_until")
    if kind == "multiple_choice":
        return {str(cfg["task"]): _choice_task(cfg, where, path.resolve().parent)}
    if kind == "loglikelihood":
        return {str(cfg["task"]): _loglikelihood_task(cfg, where, path.resolve().parent)}
    if kind != "generate_until":
        raise ConfigError(f"{where}: output_type {kind!r}: lm-eval tasks are read for generate_until, "
                          "multiple_choice and loglikelihood")
    gen = dict(cfg.get("generation_kwargs") or {})
    if gen.pop("do_sample", False) or gen.get("temperature", 0) not in (0, 0.0):
        raise ConfigError(f"{where}: generation_kwargs ask for sampling; lm-eval tasks are read greedy")
    gen.pop("temperature", None)
    stop = gen.pop("until", None)
    max_new = gen.pop("max_gen_toks", 256)
    if gen:
        raise ConfigError(f"{where}: generation_kwargs {sorted(gen)} are not read")
    fewshot_delim, target_delim = cfg.get("fewshot_delimiter", "\n\n"), cfg.get("target_delimiter", " ")
    if (fewshot_delim, target_delim) != ("\n\n", " "):
        raise ConfigError(f"{where}: only lm-eval's default delimiters (' ' and blank lines) are read")
    base = path.resolve().parent
    split = cfg.get("test_split") or cfg.get("validation_split") or "test"
    shots, shot_split = _fewshot(cfg, where)
    scorer, opts = _scoring(cfg, where)
    text, target = cfg.get("doc_to_text"), cfg.get("doc_to_target")
    if not isinstance(text, str) or not isinstance(target, str):
        raise ConfigError(f"{where}: doc_to_text and doc_to_target must be a field name or a Jinja template "
                          "(functions, !function, are not read)")
    task = GenerateTask(path=_data_file(cfg, split, where, base), prompt=_as_template(text),
                        references=target, template="jinja", preamble=cfg.get("description") or "",
                        scorer=scorer, scorer_options=opts, max_new_tokens=max_new,
                        stop=[stop] if isinstance(stop, str) else list(stop if stop is not None else ["\n\n"]),
                        fewshot=shots, fewshot_path=_data_file(cfg, shot_split, where, base) if shots else None,
                        format="plain", version=int((cfg.get("metadata") or {}).get("version", 1)))
    return {str(cfg["task"]): task}


def _choice_task(cfg: dict, where: str, base: Path) -> ChoiceTask:
    """An lm-eval ``multiple_choice`` task: ``doc_to_choice`` a field, a list or a template; ``doc_to_target``
    a field or a template giving the gold index (or the gold text)."""
    entries = _metrics(cfg, where, "acc")
    for m in entries:
        unknown = set(m) - {"metric", "aggregation", "higher_is_better"} if isinstance(m, dict) else set()
        if unknown:
            raise ConfigError(f"{where}: metric_list.{m.get('metric')}: {sorted(unknown)} are not read")
    metrics = [m.get("metric") if isinstance(m, dict) else m for m in entries]
    if not metrics or set(metrics) - {"acc", "acc_norm"}:
        raise ConfigError(f"{where}: metric_list {metrics}: multiple_choice tasks are read with acc and acc_norm")
    if cfg.get("fewshot_delimiter", "\n\n") != "\n\n" or cfg.get("filter_list") or cfg.get("generation_kwargs"):
        raise ConfigError(f"{where}: fewshot_delimiter, filter_list and generation_kwargs are not read for multiple_choice")
    text, target, choices = cfg.get("doc_to_text"), cfg.get("doc_to_target"), cfg.get("doc_to_choice")
    if isinstance(choices, list):
        choices = "{{ " + json.dumps([str(c) for c in choices]) + " }}"
    if not all(isinstance(v, (str, int)) for v in (text, target, choices)) or isinstance(choices, int):
        raise ConfigError(f"{where}: doc_to_text, doc_to_target and doc_to_choice must be fields, lists or Jinja "
                          "templates (functions, !function, are not read)")
    split = cfg.get("test_split") or cfg.get("validation_split") or "test"
    shots, shot_split = _fewshot(cfg, where)
    return ChoiceTask(path=_data_file(cfg, split, where, base), prompt=_as_template(str(text)), choices=choices,
                      fewshot=shots, fewshot_path=_data_file(cfg, shot_split, where, base) if shots else None,
                      gold=str(target) if not isinstance(target, int) else "{{ " + str(target) + " }}",
                      template="jinja", metric=metrics[0], target_delimiter=cfg.get("target_delimiter", " "),
                      preamble=cfg.get("description") or "",
                      version=int((cfg.get("metadata") or {}).get("version", 1)))


def _loglikelihood_task(cfg: dict, where: str, base: Path) -> LoglikelihoodTask:
    """An lm-eval ``loglikelihood`` task: the context is the description and ``doc_to_text``, the
    continuation ``doc_to_target`` as it renders (lm-eval 0.4.13 puts no delimiter between them, so a
    target template carries its own leading space); ``acc`` is the ability's score."""
    entries = _metrics(cfg, where, "acc")
    metrics = [m.get("metric") if isinstance(m, dict) else m for m in (cfg.get("metric_list") or entries)]
    if set(metrics) - {"acc", "perplexity"}:
        raise ConfigError(f"{where}: metric_list {metrics}: loglikelihood tasks are read with acc and perplexity")
    if cfg.get("num_fewshot") or cfg.get("filter_list") or cfg.get("generation_kwargs"):
        raise ConfigError(f"{where}: num_fewshot, filter_list and generation_kwargs are not read for loglikelihood")
    text, target = cfg.get("doc_to_text"), cfg.get("doc_to_target")
    if not isinstance(text, str) or not isinstance(target, str):
        raise ConfigError(f"{where}: doc_to_text and doc_to_target must be a field name or a Jinja template "
                          "(functions, !function, are not read)")
    split = cfg.get("test_split") or cfg.get("validation_split") or "test"
    return LoglikelihoodTask(path=_data_file(cfg, split, where, base), prompt=_as_template(text), target=target,
                             template="jinja", target_delimiter="", preamble=cfg.get("description") or "",
                             version=int((cfg.get("metadata") or {}).get("version", 1)))


def _fewshot(cfg: dict, where: str) -> tuple[int, str | None]:
    """``num_fewshot`` and the split the examples come from (``fewshot_split``, else ``training_split``)."""
    shots = int(cfg.get("num_fewshot") or 0)
    shot_split = cfg.get("fewshot_split") or cfg.get("training_split")
    if shots and not shot_split:
        raise ConfigError(f"{where}: num_fewshot {shots} needs fewshot_split or training_split")
    return shots, shot_split


def _as_template(text: str) -> str:
    """lm-eval reads a ``doc_to_text`` that names a field as that field; as a template that is ``{{field}}``
    -- unless the name has spaces or braces (then it is a template already)."""
    return text if "{" in text or not text.isidentifier() else "{{" + text + "}}"


__all__ = ["from_lm_eval", "is_lm_eval_task"]
