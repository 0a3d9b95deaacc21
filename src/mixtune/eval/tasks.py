"""Abilities from the user's own files: a benchmark is a data file plus a few lines of YAML.

A task file names one or more abilities::

    tasks:
      gsm8k:
        kind: generate
        path: gsm8k_test.jsonl              # .jsonl, .parquet or a save_to_disk folder
        prompt: "Question: {question}\\nAnswer:"   # a template over the record's fields
        references: answer                  # a field holding a string or a list of strings
        scorer: numeric                     # exact | numeric | regex | contains | package.module:function
        scorer_options: {extract: gsm8k}    # see mixtune.data.scorers.ScorerParams
        max_new_tokens: 256
        stop: ["\\n\\nQuestion:"]
        fewshot: 5                          # examples shown before each question, drawn (seeded) from
        fewshot_path: gsm8k_train.jsonl     # this file's records

and ``mixtune eval MODEL --abilities math,tasks.yaml`` scores them beside the built-in ones. The
first ``n`` records are scored (lm-eval's ``--limit``), in file order.

**Prompt format.** ``format: auto`` (default) renders with the tokenizer's chat template when it
has one (an instruct model), else as plain text (a base model); ``chat`` and ``plain`` force one.
In chat form the few-shot examples are earlier user/assistant turns; in plain form each is the
prompt, a space and its target, separated by blank lines (lm-eval's layout). ``system`` adds a
system turn (chat) or a first paragraph (plain).
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import random
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Union

import yaml
from pydantic import Discriminator, Field, Tag, field_validator

from mixtune.core import ConfigError, DataError, Strict, existing_path, load_config
from mixtune.data.sources import read_rows
from mixtune.data.scorers import SCORERS, ScorerParams, check_scorer, user_scorer


class GenerateTask(Strict):
    """An ability scored by generating an answer and comparing it with references."""

    kind: Literal["generate"] = "generate"
    """Generate an answer, then score it."""
    path: Path
    """The records: ``.jsonl``, ``.parquet`` or a ``datasets`` save_to_disk folder (relative to the task file)."""
    split: str = "test"
    """For a saved ``DatasetDict``: which split to score."""
    prompt: str = "{prompt}"
    """The question, as a template over the record's fields (``{question}``; ``{{`` for a brace), or a
    Jinja template with ``template: jinja`` (``{{question}}``)."""
    references: str = "answer"
    """The record field with the reference answer (a string or a list of accepted strings); with
    ``template: jinja``, a field name or a Jinja template."""
    template: Literal["format", "jinja"] = "format"
    """How ``prompt`` (and a ``references`` that is not a field) are filled: Python's ``str.format``
    or Jinja (as lm-evaluation-harness task files write them)."""
    preamble: str = ""
    """Text put verbatim before everything else of a plain prompt (lm-eval's ``description``)."""
    scorer: str = "exact"
    """``exact``, ``numeric``, ``regex``, ``contains`` (mixtune.data.scorers) or ``package.module:function``,
    called as ``function(output, record) -> float``."""
    scorer_options: ScorerParams = ScorerParams()
    """Options of the built-in scorers (case, punctuation, which number, the regex)."""
    max_new_tokens: int = Field(default=256, ge=1)
    """Generation budget per answer."""
    stop: list[str] = []
    """Strings that end an answer (cut before them)."""
    fewshot: int = Field(default=0, ge=0)
    """Examples shown before each question."""
    fewshot_path: Path | None = None
    """Where the examples come from (required with ``fewshot``; keep it apart from the scored file)."""
    fewshot_target: str | None = None
    """The field shown as an example's answer (default: ``references``, its first when a list)."""
    seed: int = 0
    """Seed of the few-shot draw (the same examples for every question and model)."""
    system: str | None = None
    """A system prompt."""
    format: Literal["auto", "chat", "plain"] = "auto"
    """``auto``: the chat template when the tokenizer has one, else plain text."""
    version: int = 1
    """Bump when you change the task, so old scores are not compared with new ones."""

    _paths = field_validator("path", "fewshot_path")(existing_path)  # relative to the task file

    @field_validator("scorer")
    @classmethod
    def _scorer(cls, v: str) -> str:
        try:
            check_scorer(v)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return v


class CodeTask(Strict):
    """An ability scored by running generated code against its tests in the sandbox (HumanEval, MBPP)."""

    kind: Literal["code"] = "code"
    """Complete a program, then run its tests (:mod:`mixtune.eval.sandbox`)."""
    path: Path
    """The problems (relative to the task file), one record each with a prompt, tests and an entry point."""
    split: str = "test"
    """For a saved ``DatasetDict``: which split to score."""
    prompt: str = "prompt"
    """The field with the code to complete (HumanEval: the signature and docstring)."""
    test: str = "test"
    """The field with the test code, which defines ``check(candidate)``."""
    entry_point: str | None = "entry_point"
    """The field naming the function ``check`` is called with (None: the tests run as they are)."""
    max_new_tokens: int = Field(default=512, ge=1)
    """Generation budget per completion."""
    stop: list[str] = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
    """Where a completion ends (the Codex paper's stop sequences for HumanEval)."""
    samples: int = Field(default=1, ge=1)
    """Completions per problem: 1 is greedy (pass@1); more are sampled, for pass@k."""
    k: list[int] = [1]
    """The k of the pass@k reported (each at most ``samples``); the first is the ability's score."""
    temperature: float = Field(default=0.8, gt=0)
    """Sampling temperature when ``samples`` > 1 (Codex: 0.8 for pass@100, 0.2 for pass@1)."""
    top_p: float = Field(default=0.95, gt=0, le=1)
    """Nucleus sampling mass when ``samples`` > 1."""
    seed: int = 0
    """Seed of the samples."""
    cpu_seconds: int = Field(default=5, ge=1)
    """CPU seconds per test run."""
    allow_unsafe_code: bool = False
    """Run without the sandbox's kernel isolation where bubblewrap is missing (unsafe)."""
    version: int = 1
    """Bump when you change the task."""

    _paths = field_validator("path")(existing_path)


class ChoiceTask(Strict):
    """An ability scored by which choice the model finds most likely (MMLU, ARC, HellaSwag style):
    ``acc`` and ``acc_norm`` as lm-evaluation-harness defines them (:mod:`mixtune.eval.choice`)."""

    kind: Literal["multiple_choice"] = "multiple_choice"
    """Rank the choices by log-likelihood; nothing is generated."""
    path: Path
    """The questions (relative to the task file)."""
    split: str = "test"
    """For a saved ``DatasetDict``: which split to score."""
    prompt: str = "{question}"
    """The context each choice continues, a template over the record (``str.format``, or Jinja with
    ``template: jinja``)."""
    choices: str = "choices"
    """The field with the list of choice texts (with ``template: jinja``, or a template rendering a list)."""
    gold: str = "answer"
    """The field with the right choice: its index, its letter (A, B, ...) or its text."""
    metric: Literal["acc", "acc_norm"] = "acc"
    """The ability's score: ``acc`` (highest log-likelihood) or ``acc_norm`` (per character); both are kept."""
    target_delimiter: str = " "
    """Put between the context and each choice (lm-eval's default)."""
    template: Literal["format", "jinja"] = "format"
    """How ``prompt`` (and ``choices``/``gold`` that are not fields) are filled."""
    preamble: str = ""
    """Text put verbatim before every context (lm-eval's ``description``)."""
    fewshot: int = Field(default=0, ge=0)
    """Solved questions put before each context: each example's context, ``target_delimiter`` and
    its gold choice, separated by blank lines (lm-eval's layout)."""
    fewshot_path: Path | None = None
    """Where the examples come from (required with ``fewshot``; keep it apart from the scored file)."""
    seed: int = 0
    """Seed of the few-shot draw (the same examples for every question and model)."""
    version: int = 1
    """Bump when you change the task."""

    _paths = field_validator("path", "fewshot_path")(existing_path)


class LoglikelihoodTask(Strict):
    """An ability scored by whether the model's greedy continuation of a context is the target
    (LAMBADA style; lm-evaluation-harness's ``output_type: loglikelihood``): the score is ``acc``,
    lm-eval's ``is_greedy``; each item's log-likelihood of the target is kept (and lm-eval's
    ``perplexity``, exp of minus their mean, is in the lm-eval results JSON)."""

    kind: Literal["loglikelihood"] = "loglikelihood"
    """Score the target's log-likelihood after the context; nothing is generated."""
    path: Path
    """The records (relative to the task file)."""
    split: str = "test"
    """For a saved ``DatasetDict``: which split to score."""
    prompt: str = "{text}"
    """The context, a template over the record (``str.format``, or Jinja with ``template: jinja``)."""
    target: str = "target"
    """The field with the continuation (with ``template: jinja``, a field or a template)."""
    target_delimiter: str = " "
    """Put between the context and the target (lm-eval's default)."""
    template: Literal["format", "jinja"] = "format"
    """How ``prompt`` (and a ``target`` that is not a field) are filled."""
    preamble: str = ""
    """Text put verbatim before every context (lm-eval's ``description``)."""
    version: int = 1
    """Bump when you change the task."""

    _paths = field_validator("path")(existing_path)


def _kind(v) -> str:
    """A task's ``kind``, ``generate`` when it is left out."""
    return v.get("kind", "generate") if isinstance(v, dict) else getattr(v, "kind", "generate")


TaskConfig = Annotated[Union[Annotated[GenerateTask, Tag("generate")], Annotated[CodeTask, Tag("code")],
                             Annotated[ChoiceTask, Tag("multiple_choice")],
                             Annotated[LoglikelihoodTask, Tag("loglikelihood")]], Discriminator(_kind)]


class TaskFile(Strict):
    """A file of abilities defined by the user's own data."""

    DOCS: ClassVar[str] = "docs/recipes.md"
    tasks: dict[str, TaskConfig] = Field(min_length=1)
    """Abilities by name."""


def load_tasks(path: str | Path) -> dict[str, GenerateTask | CodeTask | ChoiceTask]:
    """The abilities a task file defines (every problem reported with its line).

    Raises:
        ConfigError: the file is not a valid task file, a data file is missing, or a name is
            already a built-in ability.
    """
    from mixtune.data.abilities import ABILITIES

    path = Path(path)
    cfg = load_config(TaskFile, path, context={"base_dir": path.resolve().parent})
    taken = [n for n in cfg.tasks if n in ABILITIES]
    if taken:
        raise ConfigError(f"{path}: task names {', '.join(taken)} are built-in abilities; name them otherwise")
    return dict(cfg.tasks)


def fingerprint(task) -> str:
    """A hash of everything that decides a task's scores: its settings and the bytes of every data
    file or folder its path fields name."""
    h = hashlib.sha256(json.dumps(task.model_dump(mode="json"), sort_keys=True).encode())
    for p in vars(task).values():
        if isinstance(p, Path):
            for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
                if f.is_file():
                    h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _fill(template: str, record: dict, where: str, engine: str = "format") -> str:
    if engine == "jinja":
        return _jinja(template, record, where)
    try:
        return template.format_map(record)
    except KeyError as e:
        raise DataError(f"{where}: the prompt template names field {e.args[0]!r}, which this record lacks "
                        f"(it has: {', '.join(map(str, record))})") from None
    except (ValueError, IndexError) as e:
        raise ConfigError(f"prompt template {template!r}: {e} (write a literal brace as {{{{ or }}}})") from None


def _jinja(template: str, record: dict, where: str) -> str:
    """A Jinja template over the record, as lm-eval renders one (undefined names are errors)."""
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(pattern, repl, s, count=count)
    try:
        return env.from_string(template).render(**record)
    except jinja2.UndefinedError as e:
        raise DataError(f"{where}: the template {template!r} names a field this record lacks ({e.message}; it has: "
                        f"{', '.join(map(str, record))})") from None
    except jinja2.TemplateError as e:
        raise ConfigError(f"template {template!r}: {e}") from None


def _references(record: dict, field: str, where: str, engine: str = "format") -> list[str]:
    if field not in record and engine == "jinja":
        text = _jinja(field, record, where)
        if len(text) >= 2 and text[0] == "[" and text[-1] == "]":  # a list, as lm-eval's doc_to_target reads it
            with contextlib.suppress(ValueError, SyntaxError):
                return [str(r) for r in ast.literal_eval(text)]
        return [text]
    if field not in record:
        raise DataError(f"{where}: no field {field!r} with the reference answer (it has: {', '.join(map(str, record))})")
    value = record[field]
    refs = value if isinstance(value, list) else [value]
    return [str(r) for r in refs]


def load_items(task: GenerateTask | CodeTask | ChoiceTask, n: int | None = None) -> list[tuple[str, dict]]:
    """The first ``n`` records (all with None) as ``(where, record)``."""
    rows = read_rows(task.path, split=task.split, name=str(task.path))
    bad = next(((w, r) for w, r in rows if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"{bad[0]}: expected a JSON object (a record with fields), found {type(bad[1]).__name__}")
    if not rows:
        raise DataError(f"{task.path}: contains no records")
    return rows[:n] if n is not None else rows


def _draw_shots(task: GenerateTask | ChoiceTask) -> list[tuple[str, dict]]:
    """``task.fewshot`` records of ``fewshot_path`` as ``(where, record)``, drawn with the task's seed."""
    if not task.fewshot:
        return []
    if task.fewshot_path is None:
        raise ConfigError("fewshot > 0 needs fewshot_path: the file the examples are drawn from")
    rows = read_rows(task.fewshot_path, split="train", name=str(task.fewshot_path))
    if len(rows) < task.fewshot:
        raise DataError(f"{task.fewshot_path}: {len(rows)} records, fewer than fewshot = {task.fewshot}")
    return random.Random(task.seed).sample(rows, task.fewshot)


def _shots(task: GenerateTask) -> list[tuple[str, str]]:
    """The few-shot examples as ``(prompt, target)``, drawn with the task's seed."""
    picked = _draw_shots(task)
    field = task.fewshot_target or task.references
    return [(_fill(task.prompt, r, w, task.template), _references(r, field, w, task.template)[0]) for w, r in picked]


def render_prompts(task: GenerateTask, items: list[tuple[str, dict]], tokenizer,
                   transform: Callable[[str], str] | None = None) -> list[str]:
    """Each item's full prompt: system, few-shot examples and question, in the task's format;
    ``transform`` rewrites each filled question (not the few-shot examples) before the format is applied."""
    from mixtune.data.format import prompt_text

    shots = _shots(task)
    chat = task.format == "chat" or (task.format == "auto" and getattr(tokenizer, "chat_template", None))
    out = []
    for where, record in items:
        question = _fill(task.prompt, record, where, task.template)
        if transform is not None:
            question = transform(question)
        if chat:
            messages = [{"role": "system", "content": task.system}] if task.system else []
            for q, a in shots:
                messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            out.append(prompt_text([*messages, {"role": "user", "content": question}], tokenizer))
        else:
            parts = ([task.system] if task.system else []) + [f"{q} {a}" for q, a in shots] + [question]
            out.append(task.preamble + "\n\n".join(parts))
    return out


def score_output(task: GenerateTask, output: str, record: dict, where: str) -> float:
    """The item's score in [0, 1] by the task's scorer (a user scorer's error names the item)."""
    refs = _references(record, task.references, where, task.template)
    if ":" not in task.scorer:
        return SCORERS.get(task.scorer)(output, refs, task.scorer_options)
    try:
        return float(user_scorer(task.scorer)(output, record))
    except Exception as e:  # the user's function: say where it failed
        raise DataError(f"{where}: scorer {task.scorer} raised {type(e).__name__}: {e}") from None


def run_task(name: str, task, model, tokenizer, *, n: int | None, batch_size: int, progress=None,
             transform: Callable[[str], str] | None = None):
    """Score ``model`` on the task: generate for the first ``n`` items, score each output.
    ``transform`` rewrites a generate task's questions (:func:`render_prompts`).

    Raises:
        ConfigError: ``transform`` is given for a code, multiple-choice or log-likelihood task.
    """
    from mixtune.models.generate import generate
    from mixtune.eval.run import AbilityScore

    if transform is not None and not isinstance(task, GenerateTask):
        raise ConfigError(f"task {name}: a prompt transform applies to generate tasks and built-in abilities, "
                          f"not to a {task.kind} task")
    if isinstance(task, CodeTask):
        return run_code_task(name, task, model, tokenizer, n=n, batch_size=batch_size, progress=progress)
    if isinstance(task, ChoiceTask):
        return run_choice_task(name, task, model, tokenizer, n=n, batch_size=batch_size)
    if isinstance(task, LoglikelihoodTask):
        return run_loglikelihood_task(name, task, model, tokenizer, n=n, batch_size=batch_size)
    items = load_items(task, n)
    prompts = render_prompts(task, items, tokenizer, transform)
    outputs = generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=task.max_new_tokens,
                       stop=task.stop, progress=progress)
    scores = [score_output(task, o, r, w) for o, (w, r) in zip(outputs, items)]
    return AbilityScore(name, sum(scores) / len(scores), len(scores), task.version,
                        examples=[{"where": w, "prompt": p, "output": o, "score": s,
                                   "answer": _references(r, task.references, w, task.template)}
                                  for (w, r), p, o, s in zip(items, prompts, outputs, scores)])


def tasks_in(entries: list[str]) -> tuple[list[str], Mapping[str, GenerateTask]]:
    """Split ``--abilities`` entries into names and task files: every ability a ``.yaml`` file
    defines (a mixtune task file, or an lm-evaluation-harness task: :mod:`mixtune.eval.lm_eval_tasks`)
    is added in its place."""
    from mixtune.eval.lm_eval_tasks import from_lm_eval, is_lm_eval_task

    names, tasks = [], {}
    for entry in entries:
        if entry.endswith((".yaml", ".yml")):
            try:
                data = yaml.safe_load(Path(entry).read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise ConfigError(f"{entry}: no such task file") from None
            except yaml.YAMLError:
                data = None  # load_tasks reports the syntax error with its line
            found = from_lm_eval(entry) if is_lm_eval_task(data) else load_tasks(entry)
            tasks.update(found)
            names += list(found)
        else:
            names.append(entry)
    return names, tasks


def _field(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise DataError(f"{where}: no field {key!r} (it has: {', '.join(map(str, record))})")
    return str(record[key])


def code_passes(task: CodeTask, items: list[tuple[str, dict]], completions: list[list[str]]) -> list[list[bool]]:
    """Whether each completion of each problem passes its tests: prompt + completion, then the tests
    (and ``check(entry_point)``), each run in a sandbox of its own, as many at once as there are cores."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from mixtune.eval.sandbox import Limits, run_tests

    limits = Limits(cpu_seconds=task.cpu_seconds, wall_seconds=2.0 * task.cpu_seconds + 5)
    runs = []
    for (where, record), cs in zip(items, completions):
        prompt, tests = _field(record, task.prompt, where), _field(record, task.test, where)
        entry = _field(record, task.entry_point, where) if task.entry_point else None
        runs += [(prompt + c, tests, entry) for c in cs]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        flat = list(pool.map(lambda r: run_tests(r[0], r[1], entry_point=r[2], limits=limits,
                                                 allow_unsafe_code=task.allow_unsafe_code).passed, runs))
    out, at = [], 0
    for cs in completions:
        out.append(flat[at:at + len(cs)])
        at += len(cs)
    return out


def run_code_task(name: str, task: CodeTask, model, tokenizer, *, n: int | None, batch_size: int, progress=None):
    """pass@k of ``model`` on the first ``n`` problems: greedy completions for one sample, else seeded
    samples, each completion run against the problem's tests in the sandbox."""
    from mixtune.models.generate import generate, sample
    from mixtune.eval.passk import pass_at_k
    from mixtune.eval.run import AbilityScore

    bad = [k for k in task.k if k > task.samples]
    if bad:
        raise ConfigError(f"pass@{bad[0]} needs samples >= {bad[0]} (samples = {task.samples})")
    items = load_items(task, n)
    prompts = [_field(r, task.prompt, w) for w, r in items]  # code models complete the prompt as it is
    kw = dict(max_new_tokens=task.max_new_tokens, batch_size=batch_size, stop=task.stop, progress=progress)
    if task.samples == 1:
        completions = [[c] for c in generate(model, tokenizer, prompts, **kw)]
    else:
        completions = sample(model, tokenizer, prompts, num_samples=task.samples, temperature=task.temperature,
                             top_p=task.top_p, seed=task.seed, **kw)
    passed = code_passes(task, items, completions)
    per_k = {k: [pass_at_k(len(p), sum(p), k) for p in passed] for k in task.k}
    first = per_k[task.k[0]]
    return AbilityScore(name, sum(first) / len(first), len(first), task.version,
                        examples=[{"where": w, "prompt": p, "outputs": cs, "passed": ps, "score": sc,
                                   **{f"pass@{k}": per_k[k][i] for k in task.k}}
                                  for i, ((w, _), p, cs, ps, sc) in enumerate(zip(items, prompts, completions, passed, first))])


def _value(record: dict, key: str, where: str, engine: str):
    """A record's field, or (Jinja) a template over it, read as Python literal when it looks like one."""
    if key in record:
        return record[key]
    if engine != "jinja":
        raise DataError(f"{where}: no field {key!r} (it has: {', '.join(map(str, record))})")
    text = _jinja(key, record, where)
    with contextlib.suppress(ValueError, SyntaxError):
        return ast.literal_eval(text)
    return text


def choice_shots(task: ChoiceTask) -> str:
    """The few-shot prefix of every context: each drawn example's context, the target delimiter and
    its gold choice, each followed by a blank line (lm-eval's ``fewshot_context`` for
    ``multiple_choice``); "" without ``fewshot``."""
    out = ""
    for where, record in _draw_shots(task):
        shot = choice_item(task, record, where, shots="", preamble="")
        out += shot.context + task.target_delimiter + shot.choices[shot.gold] + "\n\n"
    return out


def choice_item(task: ChoiceTask, record: dict, where: str, *, shots: str = "", preamble: str | None = None):
    """One question as :class:`mixtune.eval.choice.ChoiceItem`: context (the preamble, the few-shot
    prefix ``shots`` of :func:`choice_shots`, the question), choice texts, gold index."""
    from mixtune.eval.choice import ChoiceItem

    choices = _value(record, task.choices, where, task.template)
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: {task.choices!r} is not a list of choice texts: {choices!r}")
    gold = _value(record, task.gold, where, task.template)
    if isinstance(gold, str) and gold.strip().isdigit():
        gold = int(gold)
    if isinstance(gold, str):
        text = gold.strip()
        if len(text) == 1 and text.isalpha() and text.upper() not in choices and ord(text.upper()) - 65 < len(choices):
            gold = ord(text.upper()) - 65  # a letter: A is the first choice
        elif gold in choices:
            gold = choices.index(gold)
        else:
            raise DataError(f"{where}: gold {gold!r} is neither an index, a letter nor one of the choices")
    if not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise DataError(f"{where}: gold {gold!r} is outside the {len(choices)} choices")
    return ChoiceItem((task.preamble if preamble is None else preamble) + shots
                      + _fill(task.prompt, record, where, task.template), choices, gold)


def run_choice_task(name: str, task: ChoiceTask, model, tokenizer, *, n: int | None, batch_size: int):
    """``acc`` / ``acc_norm`` of ``model`` on the first ``n`` questions (the task's ``metric`` is its score)."""
    from mixtune.eval.choice import score_multiple_choice
    from mixtune.eval.run import AbilityScore

    items = load_items(task, n)
    shots = choice_shots(task)
    questions = [choice_item(task, r, w, shots=shots) for w, r in items]
    res = score_multiple_choice(model, tokenizer, questions, target_delimiter=task.target_delimiter,
                                batch_size=batch_size)
    per_item = res.acc if task.metric == "acc" else res.acc_norm
    return AbilityScore(name, sum(per_item) / len(per_item), len(per_item), task.version,
                        examples=[{"where": w, "prompt": q.context, "choices": list(q.choices), "gold": q.gold,
                                   "loglikelihoods": ll, "pred": p, "pred_norm": pn, "acc": a, "acc_norm": an,
                                   "score": sc}
                                  for (w, _), q, ll, p, pn, a, an, sc in zip(items, questions, res.loglikelihoods,
                                                                             res.pred, res.pred_norm, res.acc,
                                                                             res.acc_norm, per_item)])


def run_loglikelihood_task(name: str, task: LoglikelihoodTask, model, tokenizer, *, n: int | None, batch_size: int):
    """``acc`` (lm-eval's ``is_greedy``: every target token is the model's argmax) on the first ``n``
    records; each item keeps the target's log-likelihood (:func:`mixtune.eval.choice.continuation_loglikelihoods`)."""
    from mixtune.eval.choice import continuation_loglikelihoods
    from mixtune.eval.run import AbilityScore

    items = load_items(task, n)
    pairs = []
    for where, record in items:
        target = _value(record, task.target, where, task.template)
        pairs.append((task.preamble + _fill(task.prompt, record, where, task.template),
                      task.target_delimiter + str(target)))
    res = continuation_loglikelihoods(model, tokenizer, pairs, batch_size=batch_size)
    acc = [float(greedy) for _, greedy in res]
    return AbilityScore(name, sum(acc) / len(acc), len(acc), task.version,
                        examples=[{"where": w, "prompt": c, "target": t, "loglikelihood": ll, "is_greedy": g,
                                   "score": a} for (w, _), (c, t), (ll, g), a in zip(items, pairs, res, acc)])


__all__ = ["ChoiceTask", "CodeTask", "GenerateTask", "LoglikelihoodTask", "TaskConfig", "TaskFile", "fingerprint", "load_items", "load_tasks", "render_prompts",
           "choice_item", "run_choice_task", "run_loglikelihood_task", "run_code_task", "run_task", "score_output", "tasks_in"]
