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
from rich.table import Table
from rich.text import Text

from mixtune.core import MixtuneError

app = typer.Typer(
    help="Compose multi-ability language models: mix data from several abilities, tune, merge, measure.\n\n"
    "Everything runs offline on local folders; `mixtune demo` runs on the built-in tiny model and ability suite.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect and generate training data.", no_args_is_help=True)
model_app = typer.Typer(help="Create built-in models.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")
console = Console()

Overrides = Annotated[
    Optional[list[str]], typer.Argument(help="Config overrides KEY=VALUE, e.g. seed=1 format.seq_len=256.")
]


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # accelerate warns that the tied lm_head is stored once in safetensors; that is expected
    logging.getLogger("accelerate").setLevel(logging.ERROR)


@app.command("list")
def list_cmd() -> None:
    """List the built-in abilities with their difficulty levels."""
    from mixtune.data.abilities import ABILITIES

    table = Table(title="Built-in abilities", show_lines=True)
    table.add_column("name", style="bold")
    table.add_column("what")
    table.add_column("difficulty levels")
    for name in ABILITIES:
        a = ABILITIES.get(name)
        table.add_row(name, f"{a.description} (v{a.version})", "\n".join(f"{k}: {v}" for k, v in a.difficulties.items()))
    console.print(table)


@data_app.command("preview")
def data_preview(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    overrides: Overrides = None,
    examples: Annotated[int, typer.Option("--examples", "-n", help="Rendered examples to show per stage.")] = 1,
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
        data = prepare_data(cfg, base)
    for st in data.stages:
        _print_stage(st, f"stage {st.config.name} of {recipe} (seed {cfg.seed})")
        for i in range(min(examples, len(st.examples))):
            ex, (source, _) = st.examples[i], st.mixture.picks[i]
            console.rule(f"example {i} · source {source} · {len(ex.input_ids)} tokens")
            console.print(_render_masked(ex, data.tokenizer))


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
    console.print(
        f"packed into {p.input_ids.shape[0]:,} rows of {p.input_ids.shape[1]} tokens: "
        f"{p.efficiency:.1%} real tokens, {trained:,} trained ({trained / max(p.n_tokens, 1):.0%} of real)"
        + (f"; dropped {p.dropped} long examples" if p.dropped else "")
        + (f"; truncated {p.truncated}" if p.truncated else "")
        + (f"; {steps:,} optimizer steps" if steps is not None else "")
    )


@app.command("train")
def train_cmd(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    overrides: Overrides = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default: runs/<recipe name>).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and stages, train nothing.")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore checkpoints in OUT and start over.")] = False,
) -> None:
    """Train a recipe's stages in order (resuming from OUT's newest checkpoint if there is one).

    Writes OUT/stages/<stage>/ (the model after each stage, with tokenizer and resolved config),
    OUT/log.jsonl (loss per source, lr, grad norm, tokens/s) and OUT/checkpoints/. Runs on several
    processes unchanged: `accelerate launch -m mixtune.cli train RECIPE`.
    """
    from mixtune.core import dump_config, parse_overrides
    from mixtune.pipeline import prepare_data, run_training, stage_plan
    from mixtune.recipe import load_recipe

    _quiet_transformers()
    cfg, base = load_recipe(recipe, parse_overrides(overrides or []))
    out = out or Path("runs") / recipe.stem
    if dry_run:
        console.print(Text(dump_config(cfg)))
        with console.status("preparing data ..."):
            data = prepare_data(cfg, base)
        for st, plan in zip(data.stages, stage_plan(cfg, data)):
            _print_stage(st, f"stage {plan.name}: {plan.steps:,} steps, lr {plan.lr:g} {plan.schedule}", plan.steps)
        console.print(f"dry run: nothing trained; output would go to {out}")
        return
    folders = run_training(cfg, base, out, resume=not fresh)
    console.print(f"trained {len(folders)} stage(s); models in {out / 'stages'}, log in {out / 'log.jsonl'}")


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


@data_app.command("generate")
def data_generate(
    ability: Annotated[str, typer.Argument(help="Built-in ability (see `mixtune list`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSONL file to write.")],
    n: Annotated[int, typer.Option("-n", help="Number of distinct problems.")] = 1000,
    split: Annotated[str, typer.Option(help="train or test (they never share a problem).")] = "train",
    difficulty: Annotated[int, typer.Option(help="1-3, see `mixtune list`.")] = 1,
    seed: Annotated[int, typer.Option(help="Generator seed.")] = 0,
) -> None:
    """Write problems of a built-in ability as chat-format JSONL."""
    from mixtune.core import atomic_write_text
    from mixtune.data.abilities import ABILITIES

    records = ABILITIES.get(ability).generate(n, seed=seed, split=split, difficulty=difficulty)  # type: ignore[arg-type]
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    console.print(f"wrote {len(records):,} {ability} {split} problems (difficulty {difficulty}, seed {seed}) to {out}")


@model_app.command("init")
def model_init(
    out_dir: Annotated[Path, typer.Argument(help="Folder to create.")],
    size: Annotated[str, typer.Option(help="Built-in size: tiny (~1.1M parameters) or small (~14M).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Initialisation seed.")] = 0,
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


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo's outputs.")] = Path("mixtune-demo"),
) -> None:
    """Run the whole loop on the embedded default (built-in tiny model and ability suite).

    What exists so far: build the tiny model, write the built-in suite's train and held-out
    test splits, and preview the DMT stage-2 mixture. Training, evaluation and the report
    arrive with the training and evaluation issues; the demo says where it stops.
    """
    from mixtune.builtin import init_builtin
    from mixtune.core import atomic_write_text, validate
    from mixtune.data.abilities import ABILITIES
    from mixtune.recipe import Recipe

    _quiet_transformers()
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "base" / "config.json").exists():
        init_builtin(out / "base", size="tiny", seed=0, overwrite=True)
    console.print(f"[bold]1.[/] built-in tiny model in {out / 'base'}")
    for name in ABILITIES:
        for split, n in (("train", 2000), ("test", 200)):
            records = ABILITIES.get(name).generate(n, seed=0, split=split)  # type: ignore[arg-type]
            atomic_write_text(out / "data" / f"{name}-{split}.jsonl",
                              "".join(json.dumps(r) + "\n" for r in records))
    console.print(f"[bold]2.[/] built-in suite in {out / 'data'} (train 2,000 and held-out test 200 per ability)")
    recipe = validate(Recipe, {
        "model": str(out / "base"),
        "sources": {name: {"path": str((out / "data" / f"{name}-train.jsonl").resolve())} for name in ABILITIES},
        "format": {"seq_len": 256},
        # DMT (Dong et al., 2024): specialists, then all general data plus a fraction k of each specialist.
        "strategy": {"name": "dmt", "k": 0.125},
    }, where="demo recipe")
    recipe_path = out / "dmt.yaml"
    from mixtune.core import dump_config

    atomic_write_text(recipe_path, dump_config(recipe))
    console.print(f"[bold]3.[/] DMT stages (k = 1/8), recipe {recipe_path}:")
    data_preview(recipe_path, [], examples=1)
    console.print(
        "\n[yellow]Training, evaluation and the report are not implemented yet (issues #3 and #4); "
        "the demo stops after data preparation.[/]"
    )


def main() -> None:
    """Entry point: user errors print one clear message and exit 2, without a traceback."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # mixtune never downloads
    try:
        app()
    except MixtuneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
