"""Zero-shot accuracy of each prompt start at z = 0, measured on dev-like data drawn from SST-2 *train*.

The prompt start is what the soft prompt is at z = 0 (``fedbpt_jax.prompt.build_start``). This script
scores, with SmolLM2-135M-Instruct in float32 and the prompt after the text (the default layout), the
template with no prompt tokens and the template with each candidate start, for the completion and the
BBT-style decoder templates, and reports accuracy and the share predicted positive. The default start is
chosen from these numbers, never from the test split.

Dev-like data: ``--size`` sentences of at least ``--min-words`` words (the test split holds whole
sentences; most SST-2 train items are short phrases), sampled with ``--seed`` from the SST-2 train split
after removing every example that BBT's few-shot draw (40 train + 40 dev per class) could give to seeds
0-9, so no few-shot training example of those seeds is in it.

``--split test`` scores the same starts on a task's whole test split instead, for **reporting** the
zero-shot table (the choice of the default uses the train-derived numbers only)::

    python experiments/prompt_start.py --split test --task sst2   # the 872 SST-2 test sentences
    python experiments/prompt_start.py --split test --task mr     # the 2,000 MR test snippets

Usage::

    python experiments/prompt_start.py            # about 3-5 minutes on 2 cores
    python experiments/prompt_start.py --tiny --out /tmp/ps              # a tiny random model (smoke run)
"""

from __future__ import annotations

import fedbpt_jax as fb  # first: sets OPENBLAS_NUM_THREADS before numpy/jax load

# isort: split
import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fedbpt_jax import objective, prompt

RESULTS = Path(__file__).resolve().parent / "results" / "prompt_start"

# (label, start option, number of prompt tokens or None for "no prompt tokens")
STARTS = (
    ("no prompt tokens", None),
    ("5 zero vectors", "zeros"),
    ("BBT placeholder ids 1000-1004", "tokens:1000,1001,1002,1003,1004"),
    ("phrase ' (movie review)'", "phrase: (movie review)"),
    ("phrase ' In short:'", "phrase: In short:"),
    ("phrase ' Overall, the review is'", "phrase: Overall, the review is"),
)
STYLES = ("completion", "bbt")


def dev_like(task: str, size: int, seed: int, min_words: int, exclude_seeds: int = 10, shots: int = 40):
    """``size`` train-split examples of >= ``min_words`` words, none of them in any few-shot draw."""
    pool = fb.data.load_task_data(task, split="train")
    used = set()
    for s in range(exclude_seeds):
        tr, dv = fb.data.few_shot_indices(pool.labels, shots, s, num_labels=2)
        used.update(tr.tolist())
        used.update(dv.tolist())
    ok = np.array([i for i, t in enumerate(pool.texts) if i not in used and len(t.split()) >= min_words])
    pick = np.sort(np.random.default_rng(seed).choice(ok, size=min(size, len(ok)), replace=False))
    return pool.take(pick), len(used), len(ok)


def measure(lm, examples, task: str, style: str, chunk: int, first_token: bool = False) -> list[dict]:
    n_max = 5
    batch = fb.data.tokenize(
        task,
        examples,
        lm.tokenizer,
        lm.kind,
        n_prompt=n_max,
        style=style,
        max_positions=getattr(lm.config, "max_position_embeddings", None),
    )
    spec = fb.data.scoring_spec(task, lm.tokenizer, lm.kind, style=style, first_token=first_token)
    chunks = jax.tree_util.tree_map(jnp.asarray, objective.chunk_examples(batch, chunk))
    labels, mask = np.asarray(chunks.labels).reshape(-1), np.asarray(chunks.example_mask).reshape(-1) > 0
    rows = []
    # The text-prefix key/value cache does not depend on the prompt (nor on its length): computed once.
    ctx = jax.jit(objective.prepare_chunks, static_argnums=0)(
        objective.make_scorer(lm, "after"), lm.params, chunks, spec
    )
    for label, option in STARTS:
        if option is None:
            n, start = 0, None
        else:
            n = prompt.start_length(option, lm.tokenizer) or n_max
            start = prompt.start_prompt(prompt.build_start(lm, option, n, "after"), n, lm.hidden_size)
        scorer = objective.make_scorer(lm, "after", n_prompt_tokens=n)
        t0 = time.perf_counter()
        logits = jax.jit(objective.evaluate_prepared, static_argnums=0)(scorer, lm.params, ctx, spec, start)
        logits = np.asarray(logits).reshape(-1, logits.shape[-1])[mask]
        pred = logits.argmax(-1)
        toks = (
            []
            if option is None
            else lm.tokenizer.convert_ids_to_tokens(list(prompt.start_token_ids(option, lm.tokenizer) or []))
        )
        rows.append(
            {
                "style": style,
                "start": label,
                "option": option,
                "n_prompt_tokens": n,
                "tokens": toks,
                "accuracy": float(np.mean(pred == labels[mask])),
                "share_positive": float(np.mean(pred == 1)),
                "seconds": time.perf_counter() - t0,
            }
        )
        print(
            f"  {style:10s} {label:36s} acc {rows[-1]['accuracy']:.4f}  pos {rows[-1]['share_positive']:.3f}",
            flush=True,
        )
    return rows


def table(rows: list[dict], share_pos_true: float) -> str:
    lines = [
        "| start | tokens | completion acc. | completion share pos. | bbt acc. | bbt share pos. |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, _ in STARTS:
        r = {x["style"]: x for x in rows if x["start"] == label}
        toks = " ".join(f"`{t}`" for t in r[STYLES[0]]["tokens"]) or "—"
        cells = []
        for st in STYLES:
            cells += [f"{100 * r[st]['accuracy']:.1f} %", f"{r[st]['share_positive']:.2f}"]
        lines.append(f"| {label} | {toks} | " + " | ".join(cells) + " |")
    lines.append(f"\nShare of positive labels in the data: {share_pos_true:.2f}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--size", type=int, default=400)
    ap.add_argument("--min-words", type=int, default=8)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--chunk", type=int, default=50)
    ap.add_argument(
        "--split",
        choices=("dev-like", "test"),
        default="dev-like",
        help="dev-like: train-split sentences (choosing the default); test: the whole test split (reporting)",
    )
    ap.add_argument(
        "--out",
        default=None,
        help="results folder (default: results/prompt_start, or results/zero_shot_<task>_test with --split test)",
    )
    ap.add_argument("--tiny", action="store_true", help="a tiny random decoder with a small real tokenizer")
    args = ap.parse_args(argv)
    if args.tiny:
        tok = fb.testing.chatml_tokenizer()
        lm = fb.testing.tiny_decoder(0, tokenizer=tok, num_layers=1)
        args.size = min(args.size, 24)
        model_name = "tiny random decoder"
    else:
        lm = fb.models.load("smollm2-135m-instruct")
        model_name = "SmolLM2-135M-Instruct (float32)"
    if args.split == "test":
        examples = fb.data.load_task_data(args.task, split="test")
        if args.tiny:
            examples = examples.take(np.arange(min(args.size, len(examples))))
        excluded, eligible = 0, len(examples)
        what = f"{len(examples)} {args.task} test examples (the whole test split)"
        split = "test (reporting only; the default start was chosen on train-split data)"
    else:
        examples, excluded, eligible = dev_like(args.task, args.size, args.seed, args.min_words)
        what = (
            f"{len(examples)} dev-like {args.task} sentences from the train split (>= {args.min_words} words, "
            f"seed {args.seed})"
        )
        split = "train (dev-like, never test)"
    print(f"{model_name}; {what}; {excluded} few-shot candidates excluded, {eligible} eligible", flush=True)
    if args.out is None:
        args.out = str(RESULTS if args.split == "dev-like" else RESULTS.parent / f"zero_shot_{args.task}_test")
    t0 = time.perf_counter()
    rows = [r for style in STYLES for r in measure(lm, examples, args.task, style, args.chunk, args.tiny)]
    share = float(np.mean(examples.labels == 1))
    md = table(rows, share)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": model_name,
        "task": args.task,
        "split": split,
        "size": len(examples),
        "min_words": args.min_words,
        "seed": args.seed,
        "excluded_few_shot_candidates": excluded,
        "share_positive_labels": share,
        "layout": "after",
        "seconds": time.perf_counter() - t0,
    }
    fb.checkpoint.write_json_atomic(str(out / "prompt_start.json"), {"meta": meta, "rows": rows})
    (out / "prompt_start.md").write_text(f"Zero-shot at z = 0, {model_name}, {what}, prompt after the text.\n\n{md}\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
