"""Wall time of mixtune's evaluation against lm-evaluation-harness's HF backend, same tasks and model.

Four local lm-eval task files, read by both tools as they are (mixtune through
``mixtune.eval.lm_eval_tasks``): two multiple-choice tasks of ``--questions`` distinct questions after
the same five-shot prompt, with four choices (``acc``, ``acc_norm``) -- MMLU-style (``bench_mc``:
each choice a number, one or two tokens) and HellaSwag-style (``bench_endings``: each choice a
sentence ending of some 8-12 tokens) -- and two ``generate_until`` tasks of ``--prompts`` prompts
(greedy, ``until: ["\\n\\n"]``, ``max_gen_toks``; exact match), zero-shot (``bench_gen``) and
GSM8K-style five-shot (``bench_gen_shots``: the same five solved problems before each). The model is
the built-in one (``--size``), its weights sharpened so choices are not near ties. Both tools get
the loaded model and the same batch size; each timing covers everything from the task file to the
scores. The scores must agree (checked). Medians of ``--repeats``, interleaved.

    python bench/eval_vs_lm_eval.py [--size tiny] [--questions 200] [--prompts 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def write_tasks(folder: Path, questions: int, prompts: int, max_gen: int) -> None:
    from mixtune.data.abilities import ABILITIES

    shots = "".join(f"Question: What is {i} + {i + 1}?\nAnswer: {2 * i + 1}\n\n" for i in range(5))
    rows = [{"question": f"{shots}Question: What is {i} + {i % 7}?", "choices": [str(i + i % 7 + d) for d in (0, 1, 2, -1)],
             "answer": 0} for i in range(questions)]
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    verbs = ["walks to the", "opens the", "paints the", "cleans the"]
    things = ["door and waits for a friend", "window to let the air in", "old fence in bright red",
              "kitchen before the guests arrive"]
    endings = [{"question": f"{shots}Question: A man named Sam {i}", "answer": 0,
                "choices": [f"{verbs[(i + d) % 4]} {things[(i + 2 * d) % 4]}." for d in range(4)]}
               for i in range(questions)]
    (folder / "endings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in endings))
    recs = ABILITIES.get("math").generate(prompts, split="test", seed=0)
    (folder / "gen.jsonl").write_text("".join(json.dumps({"question": r["messages"][0]["content"],
                                                          "answer": r["answer"]}) + "\n" for r in recs))
    # GSM8K-style five-shot: the same five solved problems before each question
    solved = "".join(f"Question: {r['messages'][0]['content']}\nAnswer: {r['answer']}\n\n"
                     for r in ABILITIES.get("math").generate(5, split="train", seed=1))
    (folder / "gen_shots.jsonl").write_text("".join(json.dumps({"question": solved + "Question: " + r["messages"][0][
        "content"], "answer": r["answer"]}) + "\n" for r in recs))
    head = "dataset_path: json\ntest_split: test\n"
    (folder / "bench_mc.yaml").write_text(f"task: bench_mc\n{head}dataset_kwargs:\n  data_files:\n    test: "
                                          f"{folder / 'mc.jsonl'}\n" + textwrap.dedent("""\
        output_type: multiple_choice
        doc_to_text: "{{question}}\\nAnswer:"
        doc_to_choice: choices
        doc_to_target: answer
        metric_list:
          - {metric: acc}
          - {metric: acc_norm}
        """))
    (folder / "bench_endings.yaml").write_text((folder / "bench_mc.yaml").read_text().replace(
        "bench_mc", "bench_endings").replace("mc.jsonl", "endings.jsonl"))
    (folder / "bench_gen.yaml").write_text(f"task: bench_gen\n{head}dataset_kwargs:\n  data_files:\n    test: "
                                           f"{folder / 'gen.jsonl'}\n" + textwrap.dedent(f"""\
        output_type: generate_until
        doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
        doc_to_target: "{{{{answer}}}}"
        generation_kwargs:
          until: ["\\n\\n"]
          max_gen_toks: {max_gen}
        metric_list:
          - {{metric: exact_match}}
        """))
    (folder / "bench_gen_shots.yaml").write_text((folder / "bench_gen.yaml").read_text().replace(
        "bench_gen", "bench_gen_shots").replace("gen.jsonl", "gen_shots.jsonl").replace(
        'doc_to_text: "Question: {{question}}', 'doc_to_text: "{{question}}'))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-gen", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from mixtune.builtin import init_builtin
    from mixtune.eval import evaluate, parse_abilities
    from mixtune.models import load_model

    work = Path(tempfile.mkdtemp(prefix="mixtune-bench-eval-"))
    init_builtin(work / "model", size=args.size, seed=0)
    model, tok = load_model(work / "model")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    write_tasks(work, args.questions, args.prompts, args.max_gen)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, device="cpu")
    manager = TaskManager(include_path=str(work))
    print(f"model builtin:{args.size} ({sum(p.numel() for p in model.parameters()):,} parameters), "
          f"torch threads {torch.get_num_threads()}, batch size {args.batch_size}")
    for task, metric, n in (("bench_mc", "acc", args.questions), ("bench_endings", "acc", args.questions),
                            ("bench_gen", "exact_match", args.prompts),
                            ("bench_gen_shots", "exact_match", args.prompts)):
        names, tasks = parse_abilities(str(work / f"{task}.yaml"))
        times = {"lm-eval": [], "mixtune": []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = simple_evaluate(model=lm, tasks=[task], task_manager=manager, log_samples=True)
            times["lm-eval"].append(time.perf_counter() - t0)
            theirs = sorted(res["samples"][task], key=lambda s: s["doc_id"])
            t0 = time.perf_counter()
            ours = evaluate(model, tok, names, n=n, tasks=tasks, batch_size=args.batch_size)[task]
            times["mixtune"].append(time.perf_counter() - t0)
            assert [s[metric] for s in theirs] == [e["acc" if metric == "acc" else "score"] for e in ours.examples], \
                f"{task}: per-item {metric} differ"
        lm_t, mx_t = (statistics.median(times[k]) for k in ("lm-eval", "mixtune"))
        print(f"{task}: {n} items, {metric} {ours.score:.3f} (both); lm-eval {lm_t:.2f} s, mixtune {mx_t:.2f} s "
              f"-> {lm_t / mx_t:.2f}x  (runs: lm-eval {', '.join(f'{x:.2f}' for x in times['lm-eval'])}; "
              f"mixtune {', '.join(f'{x:.2f}' for x in times['mixtune'])})")


if __name__ == "__main__":
    main()
