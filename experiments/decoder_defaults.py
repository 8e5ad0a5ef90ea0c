"""The decoder defaults (layout, template, prompt start and length), chosen on training-split data, never test.

Two measurements, SmolLM2-135M-Instruct in float32:

``zero-shot``: the accuracy at z = 0 (the prompt is its start: the manual prompt) of every combination of
layout ("before": ``[lead, prompt, text, cue]``, "after": ``[lead, text, prompt, cue]``), decoder template
("completion", "reference") and prompt start (none; the movie-review phrase, 4 tokens; the reference code's
slots, ids 1000-1049, 50 tokens; their first 10), on dev-like sentences of a task's *train* split that no
few-shot draw of seeds 0-9 can use (``prompt_start.dev_like``); ``--split test`` gives the same table on the
test split, for reporting only.

``fedbpt``: the main command's setting (embedded Rotten Tomatoes snippets, 10 non-IID clients, 16 shots a
class, 5 rounds) trained with FedBPT in each candidate setting, read on its **dev** set (100 examples a class
from the training pool): the dev accuracy at z = 0, of the dev-selected round and at the last round, and the
seconds a round takes. Runs are resumable (a finished run's ``metrics.json`` is kept).

    python experiments/decoder_defaults.py zero-shot --task sst2            # ~10-20 min on 2 cores
    python experiments/decoder_defaults.py zero-shot --task sst2 --split test
    python experiments/decoder_defaults.py fedbpt --seeds 0                  # ~5 min a setting
"""

from __future__ import annotations

import fedbpt_jax as fb  # first: sets OPENBLAS_NUM_THREADS before numpy/jax load

# isort: split
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fedbpt_jax import objective, prompt
from fedbpt_jax.machine import cpu_flags, cpu_model

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "decoder_defaults"
sys.path.insert(0, str(HERE))

STARTS = (
    ("none", None),
    ("phrase ' (movie review)'", "phrase: (movie review)"),
    ("ids 1000-1009", "tokens:" + ",".join(str(i) for i in range(1000, 1010))),
    ("ids 1000-1049 (reference)", "reference"),
)
STYLES = ("completion", "reference")
LAYOUTS = ("before", "after")

#: FedBPT candidates: (name, layout, style, prompt start)
SETTINGS = (
    ("after / completion / phrase (previous default)", "after", "completion", "phrase: (movie review)"),
    ("before / completion / phrase", "before", "completion", "phrase: (movie review)"),
    ("before / reference / phrase", "before", "reference", "phrase: (movie review)"),
    ("before / reference / ids 1000-1009", "before", "reference", "tokens:" + ",".join(map(str, range(1000, 1010)))),
    ("before / reference / ids 1000-1049 (reference)", "before", "reference", "reference"),
)


def zero_shot(lm, examples, task: str, chunk: int) -> list[dict]:
    rows = []
    for style in STYLES:
        spec = fb.data.scoring_spec(task, lm.tokenizer, lm.kind, style=style)
        batch = fb.data.tokenize(
            task,
            examples,
            lm.tokenizer,
            lm.kind,
            n_prompt=50,
            style=style,
            max_positions=getattr(lm.config, "max_position_embeddings", None),
        )
        for layout in LAYOUTS:
            for label, option in STARTS:
                n = 0 if option is None else prompt.start_length(option, lm.tokenizer)
                start = None
                if option is not None:
                    start = prompt.start_prompt(prompt.build_start(lm, option, n, layout), n, lm.hidden_size)
                scorer = objective.make_scorer(lm, layout, n_prompt_tokens=n)
                chunks = jax.tree_util.tree_map(jnp.asarray, objective.eval_chunks(scorer, batch, chunk, spec))
                labels = np.asarray(chunks.labels).reshape(-1)
                mask = np.asarray(chunks.example_mask).reshape(-1) > 0
                t0 = time.perf_counter()
                logits = jax.jit(objective.evaluate_logits, static_argnums=0)(scorer, lm.params, chunks, spec, start)
                logits = np.asarray(logits).reshape(-1, logits.shape[-1])[mask]
                pred = logits.argmax(-1)
                rows.append(
                    {
                        "style": style,
                        "layout": layout,
                        "start": label,
                        "option": option,
                        "n_prompt_tokens": n,
                        "accuracy": float(np.mean(pred == labels[mask])),
                        "share_positive": float(np.mean(pred == 1)),
                        "seconds": time.perf_counter() - t0,
                    }
                )
                r = rows[-1]
                print(
                    f"  {style:10s} {layout:6s} {label:28s} acc {r['accuracy']:.4f} pos {r['share_positive']:.3f} "
                    f"({r['seconds']:.0f} s)",
                    flush=True,
                )
    return rows


def zero_shot_table(rows: list[dict]) -> str:
    lines = [
        "| template | start | n | before: acc. | before: share pos. | after: acc. | after: share pos. |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for style in STYLES:
        for label, _ in STARTS:
            r = {x["layout"]: x for x in rows if x["style"] == style and x["start"] == label}
            cells = []
            for layout in LAYOUTS:
                cells += [f"{100 * r[layout]['accuracy']:.1f} %", f"{r[layout]['share_positive']:.2f}"]
            lines.append(f"| {style} | {label} | {r['before']['n_prompt_tokens']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cmd_zero_shot(args) -> int:
    from prompt_start import dev_like

    lm = fb.models.load("smollm2-135m-instruct")
    if args.split == "test":
        examples = fb.data.load_task_data(args.task, split="test", source=args.data)
        what = f"{len(examples)} {args.task} test examples (reporting only; the defaults are chosen on train data)"
    else:
        examples, _, _ = dev_like(args.task, args.size, args.seed, args.min_words)
        what = (
            f"{len(examples)} dev-like {args.task} train-split sentences (>= {args.min_words} words, seed {args.seed})"
        )
    print(what, flush=True)
    t0 = time.perf_counter()
    rows = zero_shot(lm, examples, args.task, args.chunk)
    out = RESULTS / f"zero_shot_{args.task}_{args.split}"
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": "SmolLM2-135M-Instruct (float32)",
        "what": what,
        "share_positive_labels": float(np.mean(examples.labels == 1)),
        "seconds": time.perf_counter() - t0,
        "machine": {"cpu": cpu_model(), "cpu_flags": cpu_flags()},
        "jax": jax.__version__,
    }
    fb.checkpoint.write_json_atomic(str(out / "zero_shot.json"), {"meta": meta, "rows": rows})
    md = zero_shot_table(rows)
    (out / "zero_shot.md").write_text(f"Zero-shot at z = 0, SmolLM2-135M-Instruct, {what}.\n\n{md}\n")
    print(md)
    return 0


def cmd_fedbpt(args) -> int:
    out_root = RESULTS / "fedbpt"
    out_root.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, layout, style, start in SETTINGS:
        if args.only and args.only not in name:
            continue
        for seed in (int(s) for s in args.seeds.split(",")):
            slug = name.split(" (")[0].replace(" / ", "_").replace(" ", "-").replace("'", "")
            d = out_root / f"{slug}_seed{seed}"
            metrics = d / "metrics.json"
            if not metrics.exists():
                cmd = [
                    sys.executable,
                    "-m",
                    "fedbpt_jax.cli",
                    "simulate",
                    "--layout",
                    layout,
                    "--style",
                    style,
                    "--prompt-start",
                    start,
                    "--seed",
                    str(seed),
                    "--rounds",
                    str(args.rounds),
                    "--test-size",
                    str(args.test_size),
                    "--results-dir",
                    str(d),
                    "--overwrite",
                    "--no-progress",
                    "--no-plot",
                ]
                print(" ".join(cmd[2:]), flush=True)
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
                (d / "wall_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
            m = json.loads(metrics.read_text())
            evals = m["evals"]
            dev = [e["dev_accuracy"] for e in evals]
            best = int(np.argmax(dev))
            secs = [r["seconds"] for r in m["rounds"] if "seconds" in r]
            rows.append(
                {
                    "setting": name,
                    "seed": seed,
                    "dev_z0": dev[0],
                    "dev_selected": dev[best],
                    "selected_round": evals[best]["round"],
                    "dev_final": dev[-1],
                    "round_seconds": float(np.median(secs)) if secs else None,
                    "wall_seconds": float((d / "wall_seconds.txt").read_text())
                    if (d / "wall_seconds.txt").exists()
                    else None,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    lines = [
        "| setting | seed | dev at z = 0 | dev, selected (round) | dev, final | s / round | run (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['seed']} | {100 * r['dev_z0']:.1f} | {100 * r['dev_selected']:.1f} "
            f"({r['selected_round']}) | {100 * r['dev_final']:.1f} | "
            f"{r['round_seconds'] or float('nan'):.0f} | {r['wall_seconds'] or float('nan'):.0f} |"
        )
    md = "\n".join(lines)
    (out_root / "fedbpt.md").write_text(md + "\n")
    fb.checkpoint.write_json_atomic(str(out_root / "fedbpt.json"), {"rows": rows})
    print(md)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    z = sub.add_parser("zero-shot")
    z.add_argument("--task", default="sst2")
    z.add_argument("--data", default=None)
    z.add_argument("--split", choices=("dev-like", "test"), default="dev-like")
    z.add_argument("--size", type=int, default=300)
    z.add_argument("--min-words", type=int, default=8)
    z.add_argument("--seed", type=int, default=2024)
    z.add_argument("--chunk", type=int, default=50)
    f = sub.add_parser("fedbpt")
    f.add_argument("--seeds", default="0")
    f.add_argument("--rounds", type=int, default=5)
    f.add_argument("--test-size", type=int, default=300)
    f.add_argument("--only", default=None, help="run only the settings whose name contains this")
    args = ap.parse_args(argv)
    return cmd_zero_shot(args) if args.cmd == "zero-shot" else cmd_fedbpt(args)


if __name__ == "__main__":
    raise SystemExit(main())
