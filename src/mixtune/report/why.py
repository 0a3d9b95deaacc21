"""The report's "why" section: what fine-tuning changed in the weights, and whether a lost ability was
erased or only suppressed, from a study's stored analyses (:mod:`mixtune.study_analysis`)."""

from __future__ import annotations

import html
from collections.abc import Sequence

from mixtune.report import plots
from mixtune.report.paired import format_p, paired_test


def _e(text) -> str:
    return html.escape(str(text))


def reading(plain: float, conjugate: float, p: float, alpha: float = 0.05) -> str:
    """How a conjugate score reads against the plain one on the same problems (Kotha et al., 2024): the
    ability *returns* under the conjugate prompt (it was suppressed, not erased) when the conjugate
    score is higher at paired-test p < ``alpha``; it *drops* when lower at p < ``alpha``; else no
    significant change."""
    if p < alpha and conjugate > plain:
        return "returns: suppressed, not erased"
    if p < alpha and conjugate < plain:
        return "drops under the transform"
    return "no significant change"


def paired_scores(plain: Sequence[float], other: Sequence[float], name: str = "conjugate") -> dict:
    """A model's per-problem scores ``plain`` against ``other`` on the same problems (under a conjugate
    prompt, or of its mitigated model: ``name``), as :func:`conjugate_part` and :func:`intruder_part`
    read them: the two mean scores (keys ``"plain"`` and ``name``), the paired test and its ``p``
    (:func:`mixtune.report.paired.paired_test`), and the number of problems ``n``."""
    test, p = paired_test(plain, other)
    return {"plain": sum(plain) / len(plain), name: sum(other) / len(other), "p": p, "test": test, "n": len(plain)}


def task_vector_part(tables: list[dict]) -> list[str]:
    parts = ["<h3>Task vectors</h3><p class=muted>tau = theta_run - theta_base for every run with stages of its "
             "own. Cosine of the whole-model task vectors (Ilharco et al., 2023): near 0, the runs changed "
             "unrelated directions and a merge adds them with little interference; negative, they pull against each "
             "other. Sign conflicts: of the entries both runs keep in their top "
             f"{tables[0]['density']:g} by magnitude (per tensor, TIES' trim), the share whose signs disagree "
             "(what TIES' sign election resolves; 0.5 is what unrelated random updates give).</p>"]
    for t in tables:
        label = f"seed {t['seed']}, amount {t['amount']:g}" if len(tables) > 1 else ""
        parts.append(plots.img(plots.heatmap(t["runs"], t["cosine"], title=f"task-vector cosine {label}".strip()),
                               "task-vector cosines"))
        parts.append(plots.img(plots.heatmap(t["runs"], t["sign_conflicts"], vmin=0.0, vmax=1.0, cmap="Reds",
                                             title=f"sign conflicts {label}".strip()), "sign conflicts"))
        parts.append("<table><tr><th>run</th><th>|tau|</th><th>largest block</th></tr>")
        for name, norm, layers in zip(t["runs"], t["norm"], t["layer_norms"]):
            blocks = {k: v for k, v in layers.items() if k != "other"}
            top = max(blocks, key=blocks.get) if blocks else "-"
            parts.append(f"<tr><td>{_e(name)}</td><td>{norm:.3f}</td><td>{_e(top)}</td></tr>")
        parts.append("</table>")
    return parts


def intruder_part(rows: list[dict]) -> list[str]:
    eps = rows[0]["eps"]
    head = 0.5 if 0.5 in eps else eps[len(eps) // 2]
    parts = [f"<h3>Intruder dimensions</h3><p class=muted>Per weight matrix, the top {rows[0]['k']} singular "
             "vectors of the fine-tuned matrix whose largest |cosine| with every pre-trained singular vector is "
             "below eps (Shuttleworth et al., 2024): new directions the fine-tuning brought in. The paper finds "
             "them after LoRA and hardly after full fine-tuning; they go with forgetting.</p>"
             "<table><tr><th>run</th><th>matrices</th>" + "".join(f"<th>eps {e:g}</th>" for e in eps)
             + f"<th>at eps {head:g}, by module</th></tr>"]
    series = {}
    for r in rows:
        totals = [sum(m["intruders"][str(e)] for m in r["rows"]) for e in eps]
        by_module: dict[str, int] = {}
        for m in r["rows"]:
            by_module[m["module"]] = by_module.get(m["module"], 0) + m["intruders"][str(head)]
        modules = ", ".join(f"{k} {v}" for k, v in by_module.items() if v) or "none"
        parts.append(f"<tr><td>{_e(r['run'])}</td><td>{len(r['rows'])}</td>"
                     + "".join(f"<td>{t}</td>" for t in totals) + f"<td>{_e(modules)}</td></tr>")
        series[r["run"]] = list(zip(eps, totals))
    parts.append("</table>")
    mitigated = [r for r in rows if r.get("mitigated", {}).get("scores")]
    if mitigated:
        m0 = mitigated[0]["mitigated"]
        parts.append(f"<p class=muted>Mitigation: each run's intruders at eps {m0['eps']:g} with their singular "
                     f"values scaled by {m0['lambda']:g} (Shuttleworth et al., 2024, Sec. 6; peft's "
                     "reduce_intruder_dimension), the model scored again on the same problems. p: the paired test "
                     "on the problems.</p><table><tr><th>run</th><th>matrices changed</th><th>ability</th>"
                     "<th>fine-tuned</th><th>mitigated</th><th>difference</th><th>p</th></tr>")
        for r in mitigated:
            for x in r["mitigated"]["scores"]:
                diff = x["mitigated"] - x["plain"]
                cls = "pos" if diff > 0.005 else "neg" if diff < -0.005 else ""
                parts.append(f"<tr><td>{_e(r['run'])}</td><td>{r['mitigated']['matrices']}</td><td>{_e(x['ability'])}"
                             f"</td><td>{x['plain']:.3f}</td><td>{x['mitigated']:.3f}</td>"
                             f"<td class='{cls}'>{diff:+.3f}</td><td>{format_p(x['p'])}</td></tr>")
        parts.append("</table>")
    if len(eps) > 1:
        parts.append(plots.img(plots.lines(series, xlabel="eps", ylabel="intruder dimensions (all matrices)"),
                               "intruders against eps"))
    return parts


def conjugate_part(rows: list[dict]) -> list[str]:
    parts = ["<h3>Suppressed or erased: conjugate prompts</h3><p class=muted>Each ability scored on the same "
             "problems under a transformed prompt that no training stage used (Kotha et al., 2024). A later stage "
             "can make the model read an earlier ability's prompts as its own task; if the score returns under the "
             "transform, the ability was suppressed, not erased. The specialist's and the base's rows show what the "
             "transform costs a model that has the ability. p: McNemar's exact test on the problems where the two "
             "prompts disagree.</p><table><tr><th>run</th><th>ability</th><th>transform</th><th>plain</th>"
             "<th>conjugate</th><th>difference</th><th>p</th><th>reading</th><th>n</th></tr>"]
    for r in rows:
        diff = r["conjugate"] - r["plain"]
        cls = "pos" if diff > 0.005 else "neg" if diff < -0.005 else ""
        parts.append(f"<tr><td>{_e(r['run'])}</td><td>{_e(r['ability'])}</td><td>{_e(r['transform'])}</td>"
                     f"<td>{r['plain']:.3f}</td><td>{r['conjugate']:.3f}</td><td class='{cls}'>{diff:+.3f}</td>"
                     f"<td>{format_p(r['p'])}</td><td>{_e(reading(r['plain'], r['conjugate'], r['p']))}</td>"
                     f"<td>{r['n']}</td></tr>")
    parts.append("</table>")
    return parts


def tuco_part(rows: list[dict], abilities: list[str]) -> list[str]:
    cols = [a for a in abilities if any(a in r["abilities"] for r in rows)]
    parts = ["<h3>Tuning contribution (TuCo)</h3><p class=muted>Per prompt, ||sum FTC|| / (||sum PTC|| + ||sum "
             "FTC||) at the last token: the share of the residual stream's updates that the fine-tuning, not the "
             "base model's blocks, contributes (Nuti et al., 2025; per decoder block, L2 norm). Mean ± standard "
             "error over the prompts.</p><table><tr><th>run</th>" + "".join(f"<th>{_e(a)}</th>" for a in cols)
             + "</tr>"]
    for r in rows:
        cells = "".join(f"<td>{r['abilities'][a]['mean']:.3f} ± {r['abilities'][a]['se']:.3f}</td>"
                        if a in r["abilities"] else "<td class=muted>–</td>" for a in cols)
        parts.append(f"<tr><td>{_e(r['run'])}</td>{cells}</tr>")
    parts.append("</table>")
    return parts


def localize_part(data: dict) -> list[str]:
    rows = data["rows"]
    how = ("the region learned from its top entries by magnitude (Panigrahi et al., 2023: the sigmoid relaxation, "
           "trained on the specialist's training problems)" if rows[0].get("learned") else
           "its top entries by magnitude over the whole model only (the basepatch of Panigrahi et al., 2023)")
    parts = ["<h3>Skill localisation</h3><p class=muted>Each specialist's task vector grafted onto the base on "
             f"{how}: the "
             "share of the specialist's accuracy the graft recovers at each sparsity, and how far the specialists' "
             "grafted regions overlap (Jaccard; near 0: different weights carry different abilities).</p>"]
    series = {}
    parts.append("<table><tr><th>specialist</th><th>fine-tuned</th>"
                 + "".join(f"<th>{p['sparsity']:g}</th>" for p in rows[0]["curve"]) + "</tr>")
    for r in rows:
        full = sum(r["fine_tuned"].values()) / len(r["fine_tuned"])
        accs = [sum(p["scores"].values()) / len(p["scores"]) for p in r["curve"]]
        parts.append(f"<tr><td>{_e(r['run'])}</td><td>{full:.3f}</td>" + "".join(f"<td>{a:.3f}</td>" for a in accs)
                     + "</tr>")
        series[r["run"]] = [(p["sparsity"], a) for p, a in zip(r["curve"], accs)]
    parts.append("</table>")
    parts.append(plots.img(plots.lines(series, xlabel="share of parameters grafted", ylabel="accuracy", logx=True),
                           "graft accuracy against sparsity"))
    overlap = data.get("overlap", {})
    for sparsity, matrix in overlap.get("jaccard", {}).items():
        if len(overlap["runs"]) > 1:
            parts.append(plots.img(plots.heatmap(overlap["runs"], matrix, vmin=0.0, vmax=1.0, cmap="Blues",
                                                 title=f"mask overlap at sparsity {sparsity}"), "mask overlap"))
    return parts


def why_section(analysis: dict, abilities: list[str]) -> list[str]:
    """The HTML parts of the section (none when nothing was analysed)."""
    if not analysis:
        return []
    parts = ["<h2>Why: what fine-tuning changed</h2><p class=muted>From the study's <code>analysis</code> "
             "section (<code>mixtune analyze</code>); each analysis compares a run's model with the base it "
             "fine-tunes.</p>"]
    if "task_vectors" in analysis:
        parts += task_vector_part(analysis["task_vectors"])
    if "conjugate" in analysis:
        parts += conjugate_part(analysis["conjugate"])
    if "intruders" in analysis:
        parts += intruder_part(analysis["intruders"])
    if "tuco" in analysis:
        parts += tuco_part(analysis["tuco"], abilities)
    if "localize" in analysis:
        parts += localize_part(analysis["localize"])
    return parts
