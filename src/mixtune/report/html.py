"""The study report: one self-contained HTML file (plots embedded as PNG data URIs)."""

from __future__ import annotations

import html
from pathlib import Path

from mixtune.core import atomic_write_text
from mixtune.report import plots
from mixtune.report.forgetting import deltas, mean_scores
from mixtune.report.paired import binomial_se, format_p, paired_bootstrap, paired_test
from mixtune.report.why import why_section

CSS = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-variant-numeric:tabular-nums}th,td{padding:.3em .7em;
border-bottom:1px solid #eee;text-align:right}th:first-child,td:first-child{text-align:left}th{background:#f6f6f6}
.pos{color:#1a7f37}.neg{color:#c62828}.muted{color:#777;font-size:.9em}img{max-width:100%}
code{background:#f3f3f3;padding:0 .25em;border-radius:3px}
"""


def _number(v) -> float | None:
    """A finite float from a row's value (``scores.csv`` and the database store a missing one as
    empty or NULL, and NaN where it cannot be estimated), else None."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f == f else None


def _signed(v: float | None, higher_is_better: bool = True) -> str:
    """A signed change, green when a gain and red when a loss (a rise is a loss where lower is better)."""
    if v is None:
        return "<td class=muted>–</td>"
    gain = v if higher_is_better else -v
    cls = "pos" if gain > 0.005 else "neg" if gain < -0.005 else ""
    return f"<td class='{cls}'>{v:+.3f}</td>"


def error_bars(means: dict[str, dict[str, float]], problems: dict[tuple[str, str], int],
               known: dict[tuple[str, str], float] | None = None) -> dict[str, dict[str, float]]:
    """Per run and ability, the standard error stored with the score (``known[(run, ability)]``, from
    its per-problem scores: :func:`mixtune.report.paired.standard_error`), else the binomial standard
    error sqrt(p(1-p)/n) of an accuracy ``p`` measured on ``problems[(run, ability)]`` = n problems
    (0 where neither is known)."""
    known = known or {}
    return {run: {a: known[(run, a)] if (run, a) in known else binomial_se(p, problems.get((run, a), 0))
                  for a, p in by.items()} for run, by in means.items()}


def paired_rows(items: dict[str, dict[str, list[float]]], runs: list[str], abilities: list[str], *,
                base: str = "base", resamples: int = 2000, seed: int = 0) -> list[dict]:
    """Every run against ``base`` on the same problems, per ability: the two scores, the mean
    difference run - base with its paired-bootstrap 95% interval, and the paired test's p-value
    (McNemar's exact test for 0/1 scores, else the paired bootstrap; :mod:`mixtune.report.paired`).
    A (run, ability) without per-problem scores of both, or with a different number of problems, is
    left out."""
    out = []
    for run in runs:
        if run == base or run not in items or base not in items:
            continue
        for a in abilities:
            x, y = items[run].get(a), items[base].get(a)
            if not x or not y or len(x) != len(y):
                continue
            boot = paired_bootstrap(x, y, resamples=resamples, seed=seed)
            test, p = paired_test(x, y, resamples=resamples, seed=seed)
            out.append({"run": run, "ability": a, "score": sum(x) / len(x), "base": sum(y) / len(y),
                        "diff": boot.diff, "low": boot.low, "high": boot.high, "test": test, "p": p, "n": len(x)})
    return out


def search_tables(searches: list[dict], abilities: list[str]) -> list[str]:
    """HTML of each merge-parameter search: every point's validation score per ability and the mean
    that chose, the chosen point marked (for a greedy soup, each candidate, marked when kept)."""
    if not searches:
        return []
    parts = ["<h2>Merge-parameter search</h2><p class=muted>Each grid point scored on validation problems "
             "(held-out problems apart from the test problems above); the point with the best mean (weighted "
             "where the search says so) was chosen and scored on the test problems. For a greedy soup: each "
             "candidate's validation scores, chosen = kept in the soup.</p>"]
    for s in searches:
        cols = [a for a in abilities if any(a in p["scores"] for p in s["points"])]
        parts.append(f"<p><b>{html.escape(s['run'].split('|')[0])}</b> <span class=muted>"
                     f"{html.escape(s['run'])}</span></p><table><tr><th>point</th>"
                     + "".join(f"<th>{html.escape(a)}</th>" for a in cols) + "<th>mean</th><th>chosen</th></tr>")
        for p in s["points"]:
            mark = "<b>✓</b>" if p["chosen"] else ""
            parts.append(f"<tr><td>{html.escape(p['name'])}</td>"
                         + "".join(f"<td>{p['scores'][a]:.3f}</td>" if a in p["scores"] else "<td></td>" for a in cols)
                         + f"<td>{p['objective']:.3f}</td><td>{mark}</td></tr>")
        parts.append("</table>")
    return parts


def build_report(rows: list[dict], curves: dict[str, list[tuple[int, str, str, float]]], out: Path, *,
                 title: str, notes: list[str] = (), sources: list[str] = (), mixing: dict | None = None,
                 val_losses: dict[str, dict[str, float]] | None = None, abilities: list[str] = (),
                 verdict: list[str] = (), items: dict[str, dict[str, list[float]]] | None = None,
                 during: dict[str, list[tuple[int, str, str, float]]] | None = None,
                 searches: list[dict] = (), analysis: dict | None = None) -> Path:
    """Write the report from study results.

    Args:
        rows: one dict per run x ability (``name``, ``amount``, ``seed``, ``ability``, ``value``,
            ``higher_is_better``, ``n``; optionally ``se``, the score's standard error, and
            ``model_dir`` and ``link``, the run's model folder and its readable link), as
            :meth:`mixtune.study.Study.results` returns.
        curves: per run name, ``(step, stage, source, loss)`` across the run's stages.
        out: the HTML file to write.
        title: page heading.
        notes: lines shown under the heading (command, machine, time).
        sources: source names, in legend order.
        mixing: per run with mixed stages, ``(step, stage, source, proportion)`` as ``curves``.
        val_losses: per such run, each source's validation loss at the end of its last mixed stage.
        abilities: the ability order of tables and charts (the study's ``eval.abilities``); abilities
            of ``rows`` not in it follow, sorted. Colours come from one mapping over ``abilities`` then
            ``sources`` (:func:`plots.colors`), the same in every chart.
        verdict: lines of a verdict on the study's question (the demo's), shown under the scores.
        items: per run name, per ability, the per-problem scores (first seed, full amount; the same
            problems in the same order for every run): a table of paired comparisons of every run
            against ``base`` (:func:`paired_rows`).
        during: per run trained with ``run.eval``, ``(step, stage, ability, score)`` as ``curves``:
            the scores of evaluations during training.
        searches: merge-parameter searches, as :meth:`mixtune.study.Study.searches` returns: per
            search its ``run`` id and ``points`` (``name``, validation ``scores`` per ability,
            ``objective``, ``chosen``): a table each, under the scores.
        analysis: the study's stored analyses (:meth:`mixtune.study_analysis.Analyses.report_data`):
            the "why" section (:func:`mixtune.report.why.why_section`), after gains and forgetting.
    """
    if not rows:
        return atomic_write_text(out, f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
                                      f"</title><style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
                                 + "".join(f"<p class=muted>{html.escape(n)}</p>" for n in notes)
                                 + "<p>No scores yet for the study's evaluation settings: run <code>mixtune study"
                                   "</code> to evaluate its models.</p></body></html>")
    means = mean_scores(rows)
    scored = {r["ability"] for r in rows}
    abilities = [a for a in abilities if a in scored] + sorted(scored - set(abilities))
    during_names = [*abilities, *sorted({p[2] for v in (during or {}).values() for p in v} - set(abilities))]
    palette = plots.colors([*during_names, *sources])  # one colour per ability (or source), in every chart
    amounts = sorted({r["amount"] for r in rows})
    hib = {r["ability"]: bool(r["higher_is_better"]) for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    full = max(amounts)
    runs = list(dict.fromkeys(r["name"] for r in rows))
    m = {n: {a: means[(n, full)][a][0] for a in means[(n, full)]} for n in runs if (n, full) in means}
    sd = {n: {a: means[(n, full)][a][1] for a in means[(n, full)]} for n in runs if (n, full) in means}
    d = deltas(m, hib)
    problems = {(r["name"], r["ability"]): r["n"] for r in rows if r["amount"] == full and r.get("n")}
    first_seed = min(seeds)
    se = {(r["name"], r["ability"]): _number(r["se"]) for r in rows
          if r["amount"] == full and r["seed"] == first_seed and _number(r.get("se")) is not None}
    folders: dict[str, list[str]] = {}
    for r in rows:
        if r["amount"] == full and r.get("model_dir"):
            cell = (f"<code>{html.escape(r['link'])}</code> → " if r.get("link") else "") + \
                f"<code>{html.escape(r['model_dir'])}</code>"
            folders.setdefault(r["name"], [])
            if cell not in folders[r["name"]]:
                folders[r["name"]].append(cell)

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f"<p class=muted>{html.escape(n)}</p>" for n in notes]
    spread = ("; mean ± std over seeds" if len(seeds) > 1 else
              "; ± standard error over the problems" if se else "")
    parts.append(f"<p class=muted>{len(runs)} runs × {len(abilities)} abilities; seeds {seeds}; "
                 f"held-out accuracy, greedy decoding{spread}.</p>")

    parts.append("<h2>Scores</h2><table><tr><th>run</th>" + "".join(f"<th>{a}</th>" for a in abilities)
                 + "<th>mean</th>" + ("<th>model folder</th>" if folders else "") + "</tr>")
    for n in runs:
        cells = []
        for a in abilities:
            v = m[n].get(a)
            err = sd[n][a] if len(seeds) > 1 else se.get((n, a))
            cells.append("<td class=muted>–</td>" if v is None else
                         f"<td>{v:.3f}{f' ± {err:.3f}' if err is not None else ''}</td>")
        mean = sum(m[n].values()) / max(len(m[n]), 1)
        folder = f"<td style='text-align:left'>{'<br>'.join(folders.get(n, []))}</td>" if folders else ""
        parts.append(f"<tr><td>{html.escape(n)}</td>{''.join(cells)}<td><b>{mean:.3f}</b></td>{folder}</tr>")
    parts.append("</table>")
    if folders:
        parts.append("<p class=muted>Model folders are relative to the study folder; <code>runs/NAME</code> "
                     "links to the run's model.</p>")
    if verdict:
        parts.append("<h2>Verdict</h2><p class=muted>A difference counts only when it exceeds two binomial "
                     "standard errors of the difference. Where both runs' per-problem scores are stored, the "
                     "p-value of a paired test on the same problems follows (McNemar's exact test on the "
                     "problems where the two disagree).</p><ul>"
                     + "".join(f"<li>{html.escape(line)}</li>" for line in verdict) + "</ul>")
    parts += search_tables(searches, abilities)
    errors = sd if len(seeds) > 1 else error_bars(m, problems, se)
    bars = plots.ability_bars(runs, abilities, m, errors, palette=palette)
    parts.append("<h2>Abilities per run</h2><p class=muted>Error bars: "
                 + ("standard deviation over seeds" if len(seeds) > 1 else
                    "standard error of the score over its n problems: sqrt(p(1-p)/n) for an accuracy p, "
                    "s/sqrt(n) for other scores") + ".</p>"
                 + plots.img(bars, "bar chart"))
    paired = paired_rows(items or {}, runs, abilities)
    if paired:
        parts.append("<h2>Paired comparisons with the base</h2><p class=muted>Each run against the base model on "
                     f"the same problems{f' (seed {first_seed})' if len(seeds) > 1 else ''}: the difference of "
                     "the scores with its 95% paired-bootstrap interval (2000 resamples of the problems), and "
                     "the p-value of McNemar's exact test on the problems where the two disagree (the paired "
                     "bootstrap's for scores other than 0/1).</p><table><tr><th>run</th><th>ability</th>"
                     "<th>run</th><th>base</th><th>difference</th><th>95% interval</th><th>test</th><th>p</th>"
                     "<th>n</th></tr>")
        for c in paired:
            parts.append(f"<tr><td>{html.escape(c['run'])}</td><td>{html.escape(c['ability'])}</td>"
                         f"<td>{c['score']:.3f}</td><td>{c['base']:.3f}</td>"
                         f"{_signed(c['diff'], hib.get(c['ability'], True))}"
                         f"<td>[{c['low']:+.3f}, {c['high']:+.3f}]</td><td>{c['test']}</td>"
                         f"<td>{format_p(c['p'])}</td><td>{c['n']}</td></tr>")
        parts.append("</table>")

    parts.append("<h2>Gains and forgetting</h2><p class=muted>Change in accuracy against the base model, and "
                 "against the best specialist for that ability (negative = forgotten or never learned).</p>")
    parts.append("<table><tr><th>run</th>" + "".join(f"<th>{a} vs base</th>" for a in abilities)
                 + "".join(f"<th>{a} vs specialist</th>" for a in abilities) + "</tr>")
    for n in runs:
        if n == "base":
            continue
        parts.append(f"<tr><td>{html.escape(n)}</td>"
                     + "".join(_signed(d[n].get(a, {}).get("vs_base")) for a in abilities)
                     + "".join(_signed(d[n].get(a, {}).get("vs_specialist")) for a in abilities) + "</tr>")
    parts.append("</table>")
    parts += why_section(analysis or {}, abilities)

    if curves:
        parts.append("<h2>Training loss per ability</h2><p class=muted>Loss on each source's tokens over the run; "
                     "dashed lines are stage boundaries. A source keeps being measured only while it is in the "
                     "mixture.</p>"
                     + plots.img(plots.loss_curves(curves, list(sources), palette=palette), "loss curves"))
    if during:
        parts.append("<h2>Scores during training</h2><p class=muted>Each ability's score on its evaluation problems "
                     "(run.eval: fewer problems than the final scores above, so noisier) over the run; dashed lines "
                     "are stage boundaries.</p>"
                     + plots.img(plots.loss_curves(during, during_names, ylabel="score", palette=palette),
                                 "scores during training"))
    if mixing:
        parts.append("<h2>Mixture proportions</h2><p class=muted>Share of each source in the batches over the run "
                     "(online mixing changes it as it learns).</p>"
                     + plots.img(plots.loss_curves(mixing, list(sources), ylabel="proportion", palette=palette),
                                 "mixture proportions"))
    if val_losses:
        cols = [s for s in sources if any(s in v for v in val_losses.values())]
        parts.append("<h2>Validation loss per source</h2><p class=muted>Held-out examples of each source, at the end "
                     "of the run's last mixed stage; the mean is over sources.</p><table><tr><th>run</th>"
                     + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "<th>mean</th></tr>")
        for name, v in val_losses.items():
            mean = sum(v[c] for c in cols if c in v) / max(1, sum(c in v for c in cols))
            parts.append(f"<tr><td>{html.escape(name)}</td>" + "".join(
                f"<td>{v[c]:.3f}</td>" if c in v else "<td></td>" for c in cols) + f"<td>{mean:.3f}</td></tr>")
        parts.append("</table>")
    if len(amounts) > 1:
        series = {(n, a): {am: means[(n, am)][a][0] for am in amounts if (n, am) in means and a in
                           means[(n, am)]} for n in runs for a in abilities}
        parts.append("<h2>Data amount</h2>"
                     + plots.img(plots.scaling(amounts, series, palette=palette), "scaling curves"))
    parts.append("</body></html>")
    return atomic_write_text(out, "\n".join(parts))
