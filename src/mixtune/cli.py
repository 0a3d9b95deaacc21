"""The ``mixtune`` command line (one Typer app)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from mixtune.core import MixtuneError

app = typer.Typer(
    help="Compose multi-ability language models: mix data from several abilities, tune, merge, measure.\n\n"
    "Everything runs offline on local folders; `mixtune demo` runs on the built-in tiny model and ability suite.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect and generate training data.", no_args_is_help=True)
model_app = typer.Typer(help="Create built-in models.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")
# Logs must stay greppable: no hard wrapping of long lines (paths, hashes); written to a file or a
# pipe, tables get a wide page instead of rich's 80 columns.


class _Command(typer.core.TyperCommand):
    """Usage lines as click writes them (``RECIPE [KEY=VALUE]...``), not typer's ``{RECIPE}``, and
    arguments listed by their metavar alone (typer appends a type such as ``<list[str]>``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.param_type_name == "argument" and param.metavar:
                param.display_type_rich = lambda ctx: None

    def collect_usage_pieces(self, ctx):
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar or param.name.upper()
                pieces.append(name if param.required or name.startswith("[") else f"[{name}]")
        return pieces


console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)

Overrides = Annotated[
    Optional[list[str]], typer.Argument(metavar="[KEY=VALUE]...",
                                        help="Config overrides, e.g. seed=1 format.seq_len=256 train.steps=50.")
]
Recipe = Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe YAML file (keys: docs/recipes.md).")]
OutDir = Annotated[Optional[Path], typer.Option("--out", "-o", metavar="DIR", help="Output folder (default: runs/RECIPE-NAME).")]


def _version(value: bool) -> None:
    if value:
        from mixtune import __version__

        print(f"mixtune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print mixtune's version and exit.")] = False,
) -> None:
    """Compose multi-ability language models: mix data from several abilities, tune, merge, measure."""


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # accelerate warns that the tied lm_head is stored once in safetensors; that is expected
    logging.getLogger("accelerate").setLevel(logging.ERROR)


LISTS = ("abilities", "strategies", "methods", "mixing", "merges", "scorers", "transforms")
"""What ``mixtune list`` lists: one registry each."""


_ABBREVIATIONS = {"Eq", "Eqs", "Sec", "Alg", "Fig", "al", "e.g", "i.e", "cf", "vs"}


def _first_sentence(doc: str | None, limit: int = 200) -> str:
    """A docstring's first sentence (up to ". " outside parentheses), on one line, at most ``limit`` characters."""
    text = " ".join((doc or "").strip().split("\n\n")[0].split())
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        word = text[:i].rsplit(" ", 1)[-1]
        if ch == "." and depth == 0 and (i + 1 == len(text) or text[i + 1] == " ") and word not in _ABBREVIATIONS:
            text = text[:i + 1]
            break
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def _registry_rows(what: str) -> tuple[str, list[tuple[str, str]]]:
    """The title and ``(name, what it is)`` rows of one of :data:`LISTS`."""
    if what == "strategies":
        from mixtune.strategy.stages import STRATEGIES

        return "Strategies (strategy: / strategies:)", [(n, _first_sentence(STRATEGIES.get(n).plan.__doc__))
                                                         for n in STRATEGIES]
    if what == "methods":
        from mixtune.train.methods import TUNERS

        return "Tuning methods (train.method)", [(n, _first_sentence(TUNERS.get(n).prepare.__doc__)) for n in TUNERS]
    if what == "mixing":
        from mixtune.strategy.mixing import MIXING_MODES

        return "Mixing modes (stage mixing:)", [(n, _first_sentence(MIXING_MODES.get(n).params.__doc__))
                                                 for n in MIXING_MODES]
    if what == "merges":
        from mixtune.merge.methods import MERGE_METHODS

        return ("Merge methods (mixtune merge, a study's merges:; parameters: mixtune merge --list)",
                [(n, _first_sentence(MERGE_METHODS.get(n).fn.__doc__)) for n in MERGE_METHODS])
    if what == "transforms":
        from mixtune.analysis import TRANSFORMS

        return ("Prompt transforms (analysis.conjugate.transforms; or a template with {prompt}, or python:module:function)",
                [(n, f"{_first_sentence(TRANSFORMS.get(n).fn.__doc__)} [{', '.join(TRANSFORMS.get(n).abilities)}]")
                 for n in TRANSFORMS])
    from mixtune.data.scorers import SCORERS

    return "Scorers (a task file's scorer:)", [(n, _first_sentence(SCORERS.get(n).__doc__)) for n in SCORERS]


@app.command(cls=_Command, name="list")
def list_cmd(
    what: Annotated[Optional[str], typer.Argument(
        metavar="[WHAT]", help=f"One of {', '.join(LISTS)} (default: all).")] = None,
) -> None:
    """List what mixtune has by name: built-in abilities (with their difficulty levels), strategies, tuning
    methods, mixing modes, merge methods, scorers and the conjugate prompts' transforms."""
    from mixtune.data.abilities import ABILITIES

    if what is not None and what not in LISTS:
        raise typer.BadParameter(f"{what!r}; choose one of {', '.join(LISTS)}", param_hint="WHAT")
    for kind in [what] if what else LISTS:
        if kind == "abilities":
            table = Table(title="Built-in abilities (builtin: sources, eval.abilities)", show_lines=True)
            table.add_column("name", style="bold")
            table.add_column("what")
            table.add_column("difficulty levels")
            for name in ABILITIES:
                a = ABILITIES.get(name)
                table.add_row(name, f"{a.description} (v{a.version})",
                              "\n".join(f"{k}: {v}" for k, v in a.difficulties.items()))
        else:
            title, rows = _registry_rows(kind)
            table = Table(title=title)
            table.add_column("name", style="bold")
            table.add_column("what")
            for name, text in rows:
                table.add_row(name, escape(text))
        console.print(table)


@data_app.command(cls=_Command, name="preview")
def data_preview(
    recipe: Recipe,
    overrides: Overrides = None,
    examples: Annotated[int, typer.Option("--examples", "-n", metavar="N", min=0,
                                          help="Rendered examples to show per stage.")] = 1,
) -> None:
    """Show what each stage's mixture takes from each source, how it packs, and rendered examples.

    In the rendered examples, dim text is context (no loss) and green text is trained on.
    """
    from mixtune.core import parse_overrides
    from mixtune.pipeline import prepare_data
    from mixtune.recipe import load_recipe

    _quiet_transformers()
    cfg, base = load_recipe(recipe, parse_overrides(overrides or []))
    with console.status("loading sources, mixing, tokenizing, packing ..."):
        data = prepare_data(cfg, base, select_with=_selection_model(cfg))
    _print_selection(data)
    for st in data.stages:
        _print_stage(st, f"stage {st.config.name} of {recipe} (seed {cfg.seed})")
        for i in range(min(examples, len(st.examples))):
            ex, (source, _) = st.examples[i], st.mixture.picks[i]
            console.rule(f"example {i} · source {source} · {len(ex.input_ids)} tokens")
            console.print(_render_masked(ex, data.tokenizer))


def _selection_model(cfg) -> Path | None:
    """The starting model, when a source selects data with it (the built-in one in a temporary folder)."""
    if not any(src.select is not None for src in cfg.sources.values()):
        return None
    import tempfile

    from mixtune.pipeline import start_model

    folder = Path(tempfile.mkdtemp(prefix="mixtune-start-")) / "base"
    return start_model(cfg.model, seed=cfg.seed, folder=folder)


def _print_selection(data) -> None:
    for name, (before, kept) in (data.selected or {}).items():
        console.print(f"source {name}: selection kept {kept:,} of {before:,} records")


def _print_stage(st, title: str, steps: int | None = None) -> None:
    """The mixture table of one prepared stage and its packing summary."""
    tokens: dict[str, int] = {o.source: 0 for o in st.mixture.outcomes}
    for (source, _), ex in zip(st.mixture.picks, st.examples):
        tokens[source] += len(ex.input_ids)
    n_ex, n_tok = len(st.examples), sum(tokens.values())
    table = Table(title=title)
    for col in ("source", "available", "taken", "distinct", "share of examples", "share of tokens"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for o in st.mixture.outcomes:
        table.add_row(o.source, f"{o.available:,}", f"{o.taken:,}", f"{o.distinct:,}",
                      f"{o.taken / max(n_ex, 1):.1%}", f"{tokens[o.source] / max(n_tok, 1):.1%}")
    table.add_row("total", "", f"{n_ex:,}", "", "100%", f"{n_tok:,} tokens", style="bold")
    console.print(table)
    p = st.packed
    trained = int((p.labels != -100).sum())
    if (obj := st.config.objective) is not None:  # its prompts are the records; what it trains on comes later
        per = {"grpo": lambda o: f"{o.prompts} prompts x {o.group} samples a step",
               "rft": lambda o: f"{o.samples} samples per prompt at the stage's start, the accepted trained as SFT",
               "dpo": lambda o: f"pairs from the records' rejected replies, else from {o.samples} samples per prompt"}
        console.print(f"objective {obj.name}: {len(st.records):,} prompts; {per[obj.name](obj)}"
                      + (f"; {steps:,} optimizer steps" if steps is not None else ""))
        return
    console.print(
        f"packed into {p.input_ids.shape[0]:,} rows of {p.input_ids.shape[1]} tokens: "
        f"{p.efficiency:.1%} real tokens, {trained:,} trained ({trained / max(p.n_tokens, 1):.0%} of real)"
        + (f"; dropped {p.dropped} long examples" if p.dropped else "")
        + (f"; truncated {p.truncated}" if p.truncated else "")
        + (f"; {steps:,} optimizer steps" if steps is not None else "")
    )
    mx = st.config.mixing
    if st.groups is not None:
        from mixtune.strategy.mixing import MIXING_MODES

        line = f"mixing {mx.name}: {mx.validation} examples per source held out for validation losses"
        describe = MIXING_MODES.get(mx.name).describe
        if describe is not None:
            line += "; " + describe(mx, st.groups.names, steps)
        console.print(line)


@app.command(cls=_Command, name="train")
def train_cmd(
    recipe: Recipe,
    overrides: Overrides = None,
    out: OutDir = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config, the stages and an "
                                                             "estimated time; train nothing.")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore checkpoints in OUT and start over.")] = False,
    estimate: Annotated[bool, typer.Option("--estimate/--no-estimate",
                                           help="With --dry-run: time a few training steps to estimate the run's "
                                                "time.")] = True,
) -> None:
    """Train a recipe's stages in order (resuming from OUT's newest checkpoint if there is one).

    Writes OUT/stages/STAGE/ (the model after each stage, with tokenizer and resolved config),
    OUT/log.jsonl (loss per source, lr, grad norm, tokens/s) and OUT/checkpoints/. Runs on several
    processes unchanged: `accelerate launch -m mixtune.cli train RECIPE`.
    """
    from mixtune.core import dump_config, output_folder, parse_overrides
    from mixtune.pipeline import prepare_data, run_training, stage_plan
    from mixtune.recipe import load_recipe

    _quiet_transformers()
    cfg, base = load_recipe(recipe, parse_overrides(overrides or []))
    out = out or Path("runs") / recipe.stem
    output_folder(out, create=not dry_run)
    if dry_run:
        from mixtune.pipeline import estimate_seconds

        with console.status("preparing data ..."):  # data problems surface before anything is printed
            data = prepare_data(cfg, base, select_with=_selection_model(cfg))
            if cfg.run.eval is not None:  # so do unknown abilities and missing task files
                from mixtune.eval import during_training

                during_training(cfg.run.eval, data.tokenizer, base)
        console.print(Text(dump_config(cfg)))
        _print_selection(data)
        plans = stage_plan(cfg, data)
        for st, plan in zip(data.stages, plans):
            _print_stage(st, f"stage {plan.name}: {plan.steps:,} steps, lr {plan.lr:g} {plan.schedule}", plan.steps)
        if cfg.run.eval is not None:
            from mixtune.train.evaluation import evaluation_steps

            e = cfg.run.eval
            times = len(evaluation_steps(e, [plan.steps for plan in plans]))
            console.print(f"evaluation during training: {times} evaluations (start, every {e.every} steps, stage "
                          f"ends) of {', '.join(e.abilities)} on {e.n} problems each"
                          + (f"; the best weights by {e.keep_best} kept in {out / 'best'}" if e.keep_best else ""))
        if estimate:
            with console.status("timing a few training steps ..."):
                seconds = estimate_seconds(cfg, data, plans)
            console.print(f"estimated time: {seconds}" if isinstance(seconds, str) else
                          f"estimated time: {seconds / 60:.1f} min for {sum(p.steps for p in plans):,} steps "
                          "(timed on a few steps of this model here; one process)")
        console.print(f"dry run: nothing trained; output would go to {out}")
        return
    folders = run_training(cfg, base, out, resume=not fresh)
    from accelerate import PartialState

    if PartialState().is_main_process:
        console.print(f"trained {len(folders)} stage(s); models in {out / 'stages'}, log in {out / 'log.jsonl'}")
        best = out / "best" / "best.json"
        if cfg.run.eval is not None and cfg.run.eval.keep_best and best.exists():
            import json

            b = json.loads(best.read_text())
            console.print(f"best weights by {b['keep_best']} ({b['value']:.3f}): step {b['step']} (stage "
                          f"{b['stage']}), in {out / 'best'}")


def _render_masked(ex, tokenizer) -> Text:
    """The example's text, context dim and trained tokens green, in runs of equal state."""
    text, run, state = Text(), [], None
    for tok, lab in zip(ex.input_ids, ex.labels):
        trained = lab != -100
        if state is not None and trained != state:
            text.append(tokenizer.decode(run), style="bold green" if state else "dim")
            run = []
        run.append(tok)
        state = trained
    if run:
        text.append(tokenizer.decode(run), style="bold green" if state else "dim")
    return text


@data_app.command(cls=_Command, name="generate")
def data_generate(
    ability: Annotated[str, typer.Argument(metavar="ABILITY", help="Built-in ability (see `mixtune list`).")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="FILE", help="JSONL file to write.")],
    n: Annotated[int, typer.Option("-n", metavar="N", min=1, help="Number of distinct problems.")] = 1000,
    split: Annotated[str, typer.Option(metavar="SPLIT", help="train or test (they never share a problem).")] = "train",
    difficulty: Annotated[int, typer.Option(metavar="LEVEL", min=1, max=3, help="1-3, see `mixtune list`.")] = 1,
    seed: Annotated[int, typer.Option(metavar="SEED", help="Generator seed.")] = 0,
) -> None:
    """Write problems of a built-in ability as chat-format JSONL."""
    from mixtune.core import ConfigError, atomic_write_text, output_folder
    from mixtune.data.abilities import ABILITIES

    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; give the JSONL file to write")
    output_folder(out.parent or Path("."), what="folder of --out")
    records = ABILITIES.get(ability).generate(n, seed=seed, split=split, difficulty=difficulty)  # type: ignore[arg-type]
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    console.print(f"wrote {len(records):,} {ability} {split} problems (difficulty {difficulty}, seed {seed}) to {out}")


@model_app.command(cls=_Command, name="init")
def model_init(
    out_dir: Annotated[Path, typer.Argument(metavar="DIR", help="Folder to create.")],
    size: Annotated[str, typer.Option(metavar="SIZE", help="Built-in size: tiny (~1.1M parameters) or small (~14M).")] = "tiny",
    seed: Annotated[int, typer.Option(metavar="SEED", help="Initialisation seed.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing folder.")] = False,
) -> None:
    """Write a freshly initialised built-in model and tokenizer as a Hugging Face folder."""
    from mixtune.builtin import init_builtin
    from mixtune.core import CheckpointError

    _quiet_transformers()
    try:
        init_builtin(out_dir, size=size, seed=seed, overwrite=overwrite)
    except FileExistsError:
        raise CheckpointError(f"{out_dir} already exists; pass --overwrite to replace it") from None
    from mixtune.models import load_model

    model, tokenizer = load_model(out_dir)
    params = sum(p.numel() for p in model.parameters())
    console.print(f"wrote built-in model '{size}' ({params:,} parameters, vocabulary {len(tokenizer)}) to {out_dir}")


@app.command(cls=_Command, name="eval")
def eval_cmd(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="A Hugging Face model folder, or a peft adapter folder.")],
    abilities: Annotated[str, typer.Option(metavar="NAMES", help="Comma-separated built-in abilities and task files "
                                                                 "(YAML, see mixtune.eval.tasks), e.g. math,my-tasks.yaml.")] = "math,code,general",
    n: Annotated[int, typer.Option("--n", metavar="N", min=1, help="Held-out problems per ability (a task file's "
                                                                     "first N records).")] = 200,
    difficulty: Annotated[int, typer.Option(metavar="LEVEL", min=1, max=3, help="1-3, see `mixtune list`.")] = 1,
    seed: Annotated[int, typer.Option(metavar="SEED", help="Which held-out problems.")] = 0,
    batch_size: Annotated[int, typer.Option(metavar="N", min=1, help="Prompts per generation batch.")] = 64,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="DIR",
                                                help="Write scores.json, outputs.jsonl and results_lm_eval.json "
                                                     "(lm-evaluation-harness's results layout) here.")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Accept pickle weights (they can run code).")] = False,
    condition: Annotated[Optional[str], typer.Option(metavar="TAG", help="C-RLFT inference condition: the class tag prompts carry.")] = None,
) -> None:
    """Score a model on held-out problems of built-in abilities and of your own task files (greedy, batched).

    A task file (YAML) defines abilities over your data: a prompt template, references and a
    scorer (exact, numeric, regex, contains, or your function); see `mixtune.eval.tasks`. With
    --out, results_lm_eval.json holds the scores as lm-eval 0.4's results_<date>.json does
    (see `mixtune.eval.lm_eval_results`).
    """
    import time

    from mixtune.eval import evaluate, load_for_eval, parse_abilities, write_results

    from mixtune.core import output_folder
    from mixtune.report.paired import standard_error

    _quiet_transformers()
    names, tasks = parse_abilities(abilities)
    if out:
        output_folder(out)
    started, clock = time.time(), time.perf_counter()  # lm-eval's `date` and evaluation time
    mdl, tok = load_for_eval(model, allow_pickle=allow_pickle)
    with console.status(f"generating {n} answers for each of {', '.join(names)} ..."):
        scores = evaluate(mdl, tok, names, n=n, seed=seed, difficulty=difficulty, batch_size=batch_size,
                          condition=condition, tasks=tasks)
    console.print(f"{model} on held-out problems (difficulty {difficulty}, seed {seed}):")
    table = Table()
    for col in ("ability", "accuracy", "se", "n"):  # se: standard error over the problems
        table.add_column(col, justify="left" if col == "ability" else "right")
    for name, sc in scores.items():
        per_item = [x["score"] for x in sc.examples if "score" in x]
        se = standard_error(per_item) if len(per_item) == sc.n else float("nan")
        table.add_row(name, f"{sc.score:.3f}", "–" if se != se else f"{se:.3f}", str(sc.n))
    console.print(table)
    if out:
        from mixtune.eval.lm_eval_results import lm_eval_sources, write_lm_eval_results

        seconds = time.perf_counter() - clock
        write_results(scores, out, {"model": str(model), "difficulty": difficulty, "seed": seed})
        lm = write_lm_eval_results(out, scores, model=mdl, tokenizer=tok, model_path=str(model), n=n,
                                   batch_size=batch_size, seed=seed, difficulty=difficulty, condition=condition,
                                   tasks=tasks, sources=lm_eval_sources(abilities), started=started, seconds=seconds)
        console.print(f"wrote {out / 'scores.json'}, {out / 'outputs.jsonl'} and {lm}")


RAY_DEFAULT = "(default)"
"""What a bare ``--ray`` stands for: Ray's own choice of cluster."""


class _StudyCommand(_Command):
    """``--ray`` without its address (last, or before an option, a recipe or an override): Ray's
    default address."""

    def parse_args(self, ctx, args):
        args = list(args)
        for i, arg in enumerate(args):
            if arg == "--":
                break
            after = args[i + 1] if i + 1 < len(args) else "-"
            if arg == "--ray" and (after.startswith("-") or "=" in after or after.endswith((".yaml", ".yml"))):
                args[i] = f"--ray={RAY_DEFAULT}"
        return super().parse_args(ctx, args)


@app.command(cls=_StudyCommand, name="study")
def study_cmd(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="Study YAML: sources, strategies, specialists, "
                                                                   "merges, seeds, amounts (keys: docs/recipes.md).")],
    overrides: Overrides = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="DIR", help="Study folder (default: runs/NAME).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the runs and their stages; train nothing.")] = False,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, metavar="N",
                                      help="Run up to N independent steps (stages, merges, evaluations) at once, in "
                                           "separate local processes that share the cores (see docs/training.md).")] = 1,
    ray: Annotated[Optional[str], typer.Option(
        "--ray", metavar="[ADDRESS]",
        help="Run every step as a task on a Ray cluster: auto (the one `ray start` made), HOST:PORT, ray://HOST:PORT "
             "or local; alone: RAY_ADDRESS, else a cluster on this machine, else a new local one. OUT, the recipe's "
             "files and the model must be on a path every Ray node sees (docs/training.md, \"Studies on Ray\").")] = None,
    ray_resources: Annotated[Optional[list[str]], typer.Option(
        "--ray-resources", metavar="KIND.KEY=VALUE",
        help="What each kind of step reserves on Ray (KIND: train, eval, search, merge, analysis; KEY: cpus, gpus, "
             "memory_gb), e.g. --ray-resources train.cpus=8 --ray-resources merge.memory_gb=16.")] = None,
) -> None:
    """Run a grid of training runs, train each shared stage prefix once, score every model, write the report.

    Resumable: run it again and finished stages and scores are skipped. Results: OUT/results.sqlite,
    OUT/scores.csv, OUT/report.html. With --ray, each step's output is in OUT/logs/<key>.log.
    """
    from mixtune.core import load_config, output_folder, parse_overrides
    from mixtune.study import StudyConfig, expand, stage_keys
    from mixtune.study_merges import expand_merges

    _quiet_transformers()
    on_ray = None
    if ray is not None:
        from mixtune.graph import ray_options

        if jobs != 1:
            raise typer.BadParameter("--jobs runs local processes; with --ray the cluster's free resources decide "
                                     "how many steps run at once (--ray-resources sets what each reserves)")
        on_ray = ray_options(None if ray == RAY_DEFAULT else ray, ray_resources or [])
    elif ray_resources:
        raise typer.BadParameter("--ray-resources is for --ray")
    cfg = load_config(StudyConfig, recipe, parse_overrides(overrides or []),
                      context={"base_dir": recipe.resolve().parent})
    out = out or Path("runs") / recipe.stem
    output_folder(out, create=not dry_run)
    if dry_run:
        runs = expand(cfg)
        merges = expand_merges(cfg, runs)
        table = Table(title=f"{recipe.name}: {len(runs)} runs" + (f", {len(merges)} merges" if merges else ""))
        for col in ("run", "stages", "method"):
            table.add_column(col)
        for r in runs:
            table.add_row(escape(r.id), " > ".join(st.name for st in r.stages) or "(the starting model)",
                          (r.method or cfg.train.method.model_dump())["name"] if r.stages else "-")
        for mr in merges:
            m = cfg.merges[mr.entry]
            what = f"merge {m.method} of {' + '.join(r.name for r in mr.inputs)}" + (
                f" on {mr.base.name}" if mr.base is not None else "")
            table.add_row(escape(mr.id), escape(what), "searched on validation" if m.search else "-")
        console.print(table)
        distinct = {k for r in runs for k in stage_keys(cfg, r)}
        searched = sum(1 for m in cfg.merges if m.search) * len(cfg.seeds) * len(cfg.amounts)
        scored = len(runs) + sum(1 for mr in merges if not cfg.merges[mr.entry].search) + searched
        console.print(f"{len(distinct)} distinct stages to train (shared prefixes train once); "
                      f"{scored} models scored on {', '.join(cfg.eval.abilities)} ({cfg.eval.n} problems each)")
        if merges:
            console.print(f"{len(merges)} merges" + (
                f"; {searched} searches each score their grid on validation problems apart from the test problems "
                "and score the chosen point" if searched else ""))
        if cfg.analysis.methods():
            console.print(f"analyses of the runs: {', '.join(cfg.analysis.methods())} (mixtune analyze; "
                          "results in the report's \"why\" section)")
        return
    _run_study(cfg, out, recipe.resolve().parent, title=f"mixtune study {recipe.name}",
               notes=[f"mixtune study {recipe}"], jobs=jobs, ray=on_ray)


def _run_study(cfg, out: Path, base_dir: Path, *, title: str, notes: list[str], verdict=None, jobs: int = 1,
               ray=None):
    """Run the study, write its report, print its scores; ``verdict`` turns ``{run name: {ability:
    accuracy}}`` (first seed, full amount) and the per-problem scores (:meth:`Study.item_scores`, for
    paired tests) into lines for the report (returned for the terminal).
    ``title`` and ``notes`` name the study on its first invocation; a rerun keeps the original ones."""
    import time

    from mixtune.study import Study

    t0 = time.perf_counter()
    study = Study(cfg, out, base_dir=base_dir, log=lambda m: console.print(f"[dim]{escape(m)}[/]"), jobs=jobs,
                  ray=ray)
    study.describe(title=title, notes=notes)
    study.run()
    minutes = (time.perf_counter() - t0) / 60
    rows = study.results()
    first = [r for r in rows if r["seed"] == min(cfg.seeds) and r["amount"] == max(cfg.amounts)]
    by_name: dict[str, dict[str, float]] = {}
    for row in first:
        by_name.setdefault(row["name"], {})[row["ability"]] = row["value"]
    lines = verdict(by_name, study.item_scores()) if verdict is not None else None
    path = study.report(verdict=lines)
    table = Table(title="held-out accuracy")
    abilities = study.abilities
    table.add_column("run")
    for a in abilities:
        table.add_column(a, justify="right")
    by_run: dict[str, dict[str, float]] = {}
    for row in rows:
        by_run.setdefault(row["run_id"], {})[row["ability"]] = row["value"]
    for run, scores in by_run.items():
        table.add_row(escape(run.split("|")[0]), *(f"{scores.get(a, float('nan')):.2f}" for a in abilities))
    console.print(table)
    total = study.meta().get("minutes", minutes)
    console.print(f"report: {path}   scores: {out / 'scores.csv'}   models: {out / 'runs'}/   "
                  f"({minutes:.1f} min this invocation, {total:.1f} min in all)")
    return study, by_run, lines or []


@app.command(cls=_Command, name="report")
def report_cmd(study_dir: Annotated[Path, typer.Argument(metavar="DIR", help="A study folder (with results.sqlite).")]) -> None:
    """Rebuild OUT/report.html from a study folder's results."""
    from mixtune.core import CheckpointError, load_config
    from mixtune.study import Study, StudyConfig

    if not (study_dir / "results.sqlite").exists():
        raise CheckpointError(f"{study_dir}: no results.sqlite; run `mixtune study` or `mixtune demo` first")
    study = Study(load_config(StudyConfig, study_dir / "study.yaml"), study_dir)
    # the study's own title, notes, machine, time and verdict (a folder from before they were kept: its name)
    title = None if "title" in study.meta() else f"mixtune study {study_dir.name}"
    console.print(f"wrote {study.report(title=title)}")


@app.command(cls=_Command, name="analyze")
def analyze_cmd(
    folder: Annotated[Path, typer.Argument(metavar="RUN_OR_STUDY", help="A study folder (with results.sqlite) or a "
                                                                        "`mixtune train` output folder (with stages/).")],
    methods: Annotated[Optional[str], typer.Option(
        "--methods", "-m", metavar="LIST",
        help="Comma-separated analyses: task_vectors, intruders, conjugate, tuco, localize (studies only). Default: "
             "a study's own `analysis` section, else task_vectors,intruders,conjugate.")] = None,
    abilities: Annotated[Optional[str], typer.Option(
        "--abilities", metavar="LIST", help="Run folders: abilities to score and prompt (built-in names or task "
                                            "files; default: the recipe's run.eval abilities or built-in sources).")] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Run folders: problems per ability.")] = 100,
    base: Annotated[Optional[Path], typer.Option("--base", metavar="DIR", help="Run folders: the model training "
                                                                               "started from (default: OUT/base or the recipe's model).")] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, metavar="N", help="Studies: run up to N analyses at once.")] = 1,
) -> None:
    """What fine-tuning changed, and why an ability was lost: task-vector geometry, intruder dimensions,
    conjugate prompts (suppressed or erased), tuning contribution, skill localisation.

    A study folder: its models are analysed (nothing is trained) and report.html gains a "why" section.
    A run folder: each stage against the starting model, written to OUT/analysis.json and OUT/analysis.html.
    """
    from mixtune.analyze import analyze_run, analyze_study
    from mixtune.core import CheckpointError

    _quiet_transformers()
    names = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    log = lambda m: console.print(f"[dim]{escape(m)}[/]")  # noqa: E731
    if (folder / "results.sqlite").exists():
        console.print(f"wrote {analyze_study(folder, names, log=log, jobs=jobs)}")
        return
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder")
    wanted = [a.strip() for a in abilities.split(",") if a.strip()] if abilities else None
    out = analyze_run(folder, names, abilities=wanted, n=n, base=base, log=log)
    for row in out.get("conjugate", []):
        console.print(f"{row['run']:>16}  {row['ability']:<10} {row['transform']:<10} plain {row['plain']:.3f}  "
                      f"conjugate {row['conjugate']:.3f}  p {row['p']:.3g}")
    for row in out.get("intruders", []):
        counts = ", ".join(f"eps {e:g}: {sum(m['intruders'][str(e)] for m in row['rows'])}" for e in row["eps"])
        console.print(f"{row['run']:>16}  intruders {counts}")
    console.print(f"wrote {folder / 'analysis.json'} and {folder / 'analysis.html'}")


@app.command(cls=_Command, name="merge")
def merge_cmd(
    config: Annotated[Optional[Path], typer.Argument(
        metavar="CONFIG", help="Merge YAML: mixtune's form or a mergekit config as it is.")] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(
        metavar="[KEY=VALUE]...",
        help="Merge config overrides, e.g. parameters.density=0.5 dtype=bfloat16 vocab=pad seed=1.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="DIR", help="Folder for the merged model.")] = None,
    dtype: Annotated[Optional[str], typer.Option(metavar="DTYPE",
                                                 help="float32, bfloat16 or float16 (default: the base's).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the config and the inputs, print the plan, stop.")] = False,
    overwrite: Annotated[bool, typer.Option(
        help="Replace OUT if it exists (several merges: merge every document again).")] = False,
    list_methods: Annotated[bool, typer.Option("--list", help="Describe every merge method and its parameters.")] = False,
    intermediate_dir: Annotated[Optional[Path], typer.Option(
        "--intermediate-dir", "-I", metavar="DIR",
        help="Several merges in one file: where the named documents' outputs go (default: OUT.parts).")] = None,
) -> None:
    """Merge checkpoints in weight space, streaming tensor by tensor from safetensors.

    The output is written to a temporary folder and renamed when complete; config and tokenizer
    files come from the base model (or `files_from`), or with `tokenizer` / `tokenizer_source` the
    tokenizer is built and the vocabularies aligned by token string, as mergekit does. A model may be a peft LoRA adapter folder
    (applied to the base). Methods with `scope: global` first read every input once or twice more
    for whole-model statistics. See `mixtune merge --list` for the methods.

    A file of several YAML documents (mergekit-multi) runs each: a document with `name: NAME` is
    written to the intermediate folder's NAME, and other documents may give NAME as a model path;
    the one without a name is written to OUT. Outputs already made from the same document are kept.
    """
    from mixtune.core import parse_overrides
    from mixtune.merge import MERGE_METHODS, load_merge_config
    from mixtune.merge import multi
    from mixtune.merge.run import check_merge, merge, resolve

    if list_methods:
        def plain(text: str | None) -> str:  # one line, without the docstrings' ``code`` marks
            return " ".join((text or "").replace("``", "").split())

        def yaml_value(info) -> str:  # a default as it is written in the YAML
            v = info.default
            if info.is_required():
                return "(required)"
            return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

        for name in MERGE_METHODS:
            m = MERGE_METHODS.get(name)
            base = "" if m.needs_base else "  (base model optional)" if m.optional_base else "  (no base model)"
            console.print(Text(name + base, style="bold"))
            console.print(Text("  " + plain(m.fn.__doc__)))
            fields = [("parameters", f, i) for f, i in m.params.model_fields.items()]
            fields += [("models[].parameters", f, i) for f, i in m.model_params.model_fields.items()]
            for where, field, info in fields:
                line = f"    {where}.{info.alias or field} = {yaml_value(info)}: {plain(info.description)}"
                console.print(Text(line))
        return
    if config is None:
        raise typer.BadParameter("give a merge config (or --list)")
    items = list(overrides or []) + ([f"dtype={dtype}"] if dtype else [])
    if multi.is_multi(config):
        steps = multi.load_multi_config(config, out, intermediate_dir=intermediate_dir, overrides=parse_overrides(items))
        if dry_run:
            for st, action, why, n, pending in multi.check_multi(steps, overwrite):
                what = {"keep": "up to date, kept", "merge": "to merge", "remerge": f"to merge again ({why})"}[action]
                got = (f"{n} tensors checked" if n is not None else
                       f"waits for {', '.join(pending)}: its config and existing inputs checked, the rest once made")
                console.print(Text(f"{st.label}: {st.cfg.method} -> {st.out} ({what}); {got}"))
            return
        from rich.progress import Progress

        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("merging tensors", total=None)
            doing = ["merging tensors"]

            def on_start(st, why: str) -> None:
                n = check_merge(st.cfg, st.base_dir)  # its inputs exist now: size the bar
                console.print(Text(f"{st.label}: {st.cfg.method} -> {st.out}{f' (again: {why})' if why else ''}"))
                doing[0] = f"merging {st.name or 'the final merge'}"
                bar.reset(task, total=n, description=doing[0])

            multi.run_multi(steps, overwrite=overwrite, say=lambda line: console.print(Text(line)), on_start=on_start,
                            progress=lambda _k: bar.advance(task),
                            on_pass=lambda what: bar.reset(task, description=what if what != "merging" else doing[0]),
                            notice=lambda line: console.print(Text(line)))
        console.print(Text(f"outputs: {', '.join(str(st.out) for st in steps)}"))
        return
    if intermediate_dir is not None:
        raise typer.BadParameter("--intermediate-dir is for a file of several merges (YAML documents separated by ---)")
    cfg = load_merge_config(config, parse_overrides(items))
    _, params, _, base, models = resolve(cfg, config.parent)
    # the config, every input's headers and the plan of every output tensor (slices may stack models of
    # different depths), before anything is written; the count sizes the progress bar
    n_tensors = check_merge(cfg, config.parent)
    if dry_run:
        console.print(f"{cfg.method}: {n_tensors} tensors, {len(models)} model(s){f' on base {base}' if base else ''}; "
                      f"parameters {params.model_dump(by_alias=True)}")
        if getattr(params, "scope", None) == "global":
            console.print("scope global: whole-model statistics come first, in extra streaming passes over the "
                          "inputs (one per total, two per top-k or quantile)")
        return
    if out is None:
        raise typer.BadParameter("give --out for the merged model")
    from rich.progress import Progress

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("merging tensors", total=n_tensors)

        def on_pass(what: str) -> None:  # whole-model statistics (scope global) take passes of their own
            bar.reset(task, description=what if what != "merging" else "merging tensors")

        merge(cfg, out, base_dir=config.parent, overwrite=overwrite, progress=lambda _k: bar.advance(task),
              on_pass=on_pass, notice=lambda line: console.print(Text(line)))
    console.print(f"wrote {out}")


@app.command(cls=_Command, name="soup")
def soup_cmd(
    models: Annotated[list[Path], typer.Argument(metavar="MODEL...",
                                                 help="Fine-tuned model folders of one architecture (2 or more).")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Folder for the soup.")],
    abilities: Annotated[str, typer.Option(metavar="LIST",
                                           help="Comma-separated built-in abilities and task files to score "
                                                "on.")] = "math,code,general",
    n: Annotated[int, typer.Option("--n", metavar="N", min=1, help="Held-out problems per ability for each score.")] = 100,
    seed: Annotated[int, typer.Option(metavar="SEED", help="Which held-out problems (eval and studies use 0).")] = 1,
    difficulty: Annotated[int, typer.Option(metavar="LEVEL", min=1, max=3, help="1-3, see `mixtune list`.")] = 1,
    dtype: Annotated[Optional[str], typer.Option(metavar="DTYPE",
                                                 help="float32, bfloat16 or float16 (default: as stored).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Greedy soup (Wortsman et al., 2022): average fine-tunes, keeping each only if it helps.

    Scores every model on held-out problems of the abilities (mean accuracy), sorts them, and adds
    each to the running uniform average only when the average scores strictly higher. Writes the
    soup with OUT/soup.json (every score and decision).
    """
    from mixtune.eval import ability_scorer, parse_abilities
    from mixtune.merge.soup import greedy_soup

    _quiet_transformers()
    names, tasks = parse_abilities(abilities)
    scorer = ability_scorer(names, n=n, seed=seed, difficulty=difficulty, tasks=tasks)
    result = greedy_soup(models, scorer, out, dtype=dtype, overwrite=overwrite, progress=console.print)
    console.print(f"wrote {out}: {len(result.ingredients)} of {len(models)} models, score {result.score:.4f}")


@app.command(cls=_Command, name="extract-lora")
def extract_lora_cmd(
    base: Annotated[Path, typer.Argument(metavar="BASE", help="The base model folder (safetensors).")],
    finetune: Annotated[Path, typer.Argument(metavar="FINETUNE", help="The fine-tuned model folder (same architecture).")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Folder for the peft adapter.")],
    rank: Annotated[Optional[int], typer.Option("--rank", "-r", metavar="R",
                                                help="Rank of every module (with --energy: the most).")] = None,
    energy: Annotated[Optional[float], typer.Option(metavar="FRACTION",
                                                    help="Per module, the smallest rank keeping this fraction of the "
                                                         "delta's sum of squared singular values, in (0, 1].")] = None,
    sv_epsilon: Annotated[float, typer.Option(metavar="EPS", help="Drop singular values at or below EPS.")] = 0.0,
    distribute_scale: Annotated[bool, typer.Option(help="sqrt(S) into both A and B (else S into A).")] = True,
    embed_lora: Annotated[bool, typer.Option(help="LoRA for embeddings and head instead of saving them whole.")] = False,
    save_module: Annotated[Optional[list[str]], typer.Option(metavar="NAME",
                                                             help="Save this module whole (repeatable).")] = None,
    include: Annotated[Optional[list[str]], typer.Option("--include", "-i", metavar="REGEX",
                                                         help="Extract only modules matching (repeatable).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", "-e", metavar="REGEX",
                                                         help="Leave out modules matching (repeatable).")] = None,
    skip_undecomposable: Annotated[bool, typer.Option(help="Leave out changed norms etc. instead of saving them "
                                                           "whole.")] = False,
    svd: Annotated[str, typer.Option(metavar="KIND", help="full (exact) or randomized (needs --rank).")] = "full",
    dtype: Annotated[Optional[str], typer.Option(metavar="DTYPE",
                                                 help="float32, bfloat16 or float16 (default: the base's).")] = None,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="Where the SVDs run (cpu, cuda).")] = "cpu",
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Extract a fine-tune's change as a peft LoRA adapter (mergekit-extract-lora's job).

    Each linear weight's delta FINETUNE - BASE is cut to its truncated SVD (B A, alpha = r); embeddings, the head
    and changed norms are saved whole. Load it with peft.PeftModel.from_pretrained(base_model, OUT). Streams tensor
    by tensor; OUT is written whole or not at all, with OUT/extract_lora.json (each module's rank and energy kept).
    """
    from rich.progress import Progress

    from mixtune.merge.extract_lora import extract_config, extract_lora

    cfg = extract_config(rank=rank, energy=energy, sv_epsilon=sv_epsilon, distribute_scale=distribute_scale,
                         embed_lora=embed_lora, modules_to_save=tuple(save_module or ()), include=tuple(include or ()),
                         exclude=tuple(exclude or ()), skip_undecomposable=skip_undecomposable, svd=svd, dtype=dtype,
                         device=device)
    _quiet_transformers()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("extracting modules", total=None)

        def advance(_module: str, total: int) -> None:
            bar.update(task, total=total, advance=1)

        result = extract_lora(base, finetune, out, cfg, overwrite=overwrite, progress=advance)
    ranks = sorted(set(result.ranks.values()))
    shown = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}" if ranks else "no LoRA modules"
    console.print(f"wrote {out}: {len(result.ranks)} LoRA modules ({shown}), {len(result.whole)} saved whole, "
                  f"{result.unchanged} unchanged")


@app.command(cls=_Command)
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Folder for the demo study.")] = Path("mixtune-demo"),
    quick: Annotated[bool, typer.Option("--quick", help="Short stages and few test problems (CI; ~2 min).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the demo's study recipe and stop.")] = False,
    jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", min=1, metavar="N",
                                                help="Run up to N independent steps (stages, merges, evaluations) at "
                                                     "once, in separate local processes that share the cores (default: "
                                                     "2 where there are 2 cores or more, else 1).")] = None,
) -> None:
    """Run the DMT comparison on the embedded default: the built-in tiny model and ability suite.

    Trains a base (pretraining on copying and number facts), one specialist per ability, multi-task, sequential,
    mixed-sequential and DMT at two k values; merges the specialists (TIES and LiNeS, the scale searched on
    validation problems); scores every model on held-out problems; analyses why (the specialists' task vectors,
    each ability under a conjugate prompt), and writes OUT/report.html. Offline, on CPU; resumable (run it again
    to continue).
    """
    from importlib.resources import files

    from mixtune.core import dump_config, load_config, output_folder, parse_overrides
    from mixtune.study import StudyConfig

    _quiet_transformers()
    recipe = Path(str(files("mixtune") / "recipes" / "demo.yaml"))
    # --quick checks the whole pipeline in CI time; its stages are too short to show the effects
    quick_overrides = ["train.steps=12", "prefix.0.steps=12", "eval.n=20", "sources.echo.n=300",
                       *(f"sources.{s}.n=300" for s in ("math", "code", "general")),
                       "merges.0.search.n=10", "merges.1.search.n=10"] if quick else []
    cfg = load_config(StudyConfig, recipe, parse_overrides(quick_overrides))
    if dry_run:
        console.print(Text(dump_config(cfg)))
        return
    output_folder(out)
    import os

    from mixtune.report import dmt_verdict

    jobs = jobs or min(2, os.cpu_count() or 1)  # the same numbers, ~1.3x sooner on 2 cores (README)

    _, _, lines = _run_study(cfg, out, recipe.parent, title="mixtune demo: forgetting and DMT on the built-in suite",
                             notes=[f"mixtune demo{' --quick' if quick else ''}"], jobs=jobs,
                             verdict=lambda scores, items: dmt_verdict(scores, cfg.eval.n, quick=quick, items=items))
    _explain_demo(lines)


def _explain_demo(lines: list[str]) -> None:
    """Print the demo's verdict (:func:`mixtune.report.dmt_verdict`: whether the DMT paper's effects
    appeared, each difference against two binomial standard errors; none for ``--quick``)."""
    for line in lines:
        console.print(Text(line))


def main() -> None:
    """Entry point: user errors print one clear message and exit 2, without a traceback."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # mixtune never downloads
    try:
        app(prog_name="mixtune")
    except MixtuneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError) as e:
        # the file system refused something the checks up front could not foresee (e.g. a folder
        # made read-only mid-run): one line naming the path, as for any user error
        print(f"error: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
