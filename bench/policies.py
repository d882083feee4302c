"""Issue 6: what each lean-training policy costs in accuracy (and saves in time and memory).

One `leanfit tune` process per policy on bbc-news / MiniLM (seed 0, 3 epochs, batch 32, 128 tokens,
LoRA r=8 alpha 16) and on Austen / SmolLM2-135M (train_speed.py's subset), run one after another. Writes docs/benchmarks/policies.md and .json.

    .venv/bin/python bench/policies.py            # every policy (about 40 min on 2 cores)
    .venv/bin/python bench/policies.py int8 lisa  # a subset, merged into the existing JSON
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import COMMON, run_case, run_selected  # noqa: E402

# Every row keeps the blocks' dropout (as measured; tune turns it off by default since 2026-11-24) except
# the row that turns it off.
LORA = ["--method", "lora", "--rank", "8", "--alpha", "16", "--block-dropout"]
EVERY = ["--train-layers", "all", "--prefix", "off", "--lr", "5e-4"]
TOP2 = ["--train-layers", "2", "--prefix", "cache", "--lr", "1e-3"]
# (what it is, its options); the first is the reference every other row is compared with.
CASES = {
    "every-block": ("LoRA on every block, nothing cached (the classic setting)", EVERY),
    "top2-cache": ("top 2 blocks, prefix cached", TOP2),
    "top2-eval": ("top 2 blocks, prefix in eval mode, not cached", ["--train-layers", "2", "--prefix", "eval",
                                                                      "--lr", "1e-3"]),
    "top1-cache": ("top 1 block, prefix cached", ["--train-layers", "1", "--prefix", "cache", "--lr", "2e-3"]),
    "lisa2": ("LISA: every block adapted, 2 sampled blocks trained per 10-step period",
              ["--train-layers", "all", "--prefix", "off", "--lr", "1e-3", "--lisa-layers", "2",
               "--lisa-period", "10"]),
    "top2-checkpointing": ("top 2, cached + gradient checkpointing", [*TOP2, "--gradient-checkpointing"]),
    "top2-int8": ("top 2, cached + int8 frozen base", [*TOP2, "--int8-base"]),
    "top2-no-dropout": ("top 2, cached + the blocks' dropout off (the default)", [*TOP2, "--no-block-dropout"]),
}
# SmolLM2-135M on Austen, the causal-LM case of bench/train_speed.py (test perplexity, lower is better).
AUSTEN = ["--data", "austen", "--model", "smollm2-135m", "--epochs", "2", "--batch-size", "8", "--max-length", "128",
          "--max-train-rows", "192", "--max-eval-rows", "96", "--seed", "0", "--no-progress"]
CAUSAL = {
    "austen-top10": ("SmolLM2: top 10 of 30 blocks (the top third), prefix cached",
                     ["--train-layers", "10", "--prefix", "cache", "--lr", "1e-3"]),
    "austen-top10-lr3e-3": ("SmolLM2: top 10 blocks, prefix cached, lr 3e-3",
                            ["--train-layers", "10", "--prefix", "cache", "--lr", "3e-3"]),
    "austen-top15-lr2e-3": ("SmolLM2: top 15 blocks, prefix cached, lr 2e-3",
                            ["--train-layers", "15", "--prefix", "cache", "--lr", "2e-3"]),
}


def render(results: dict) -> str:
    env, rows = results["environment"], results["runs"]
    ref = rows.get("every-block")
    ref = ref if ref and "error" not in ref else None
    lines = ["# Lean-training policies: what each costs in accuracy", "",
             f"Produced by `bench/policies.py` on {env['cpu']} ({env['threads']} threads, torch {env['torch']}): "
             "one `leanfit tune` process per row, run one after another on bbc-news / MiniLM-L6, seed 0, "
             "3 epochs, batch 32, 128 tokens, LoRA r=8 alpha 16, AdamW with linear decay. Test accuracy on the "
             "held-out test split (425 rows). Wall time is the whole job (loading, tokenising, cache, "
             "training, evaluating, saving); peak RSS is the process's. Single runs: one test row is 0.24 "
             "points, so differences of one or two rows are noise.", "",
             "| policy | lr | test accuracy | vs every block | trainable params | wall s | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if name in CAUSAL:
            continue
        if "error" in r:
            lines.append(f"| {CASES[name][0]} | failed: {r['error'].strip().splitlines()[-1]} | | | | | |")
            continue
        acc = 100 * r["test"]["accuracy"]
        delta = f"{acc - 100 * ref['test']['accuracy']:+.2f} pts" if ref else "-"
        lines.append(f"| {CASES[name][0]} | {r['lr']:g} | {acc:.2f}% | {delta} | {r['trainable_params']:,} | "
                     f"{r['wall_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    causal = [name for name in CAUSAL if name in rows]
    if causal:
        lines += ["", "SmolLM2-135M on Austen: 2 epochs over the first 192 training blocks of 128 tokens, batch 8, "
                  "perplexity on the first 96 test blocks (bench/train_speed.py's case; peft's LoRA on every "
                  "block is in train_speed.md).", "",
                  "| policy | lr | test perplexity | trainable params | wall s | peak RSS MB |", "|---|---|---|---|---|---|"]
        causal = [n for n in causal if "error" not in rows[n]]
        lines += [f"| {CAUSAL[n][0]} | {rows[n]['lr']:g} | {rows[n]['test']['perplexity']:.2f} | "
                  f"{rows[n]['trainable_params']:,} | {rows[n]['wall_s']:.0f} | {rows[n]['peak_rss_mb']:.0f} |"
                  for n in causal]
    return "\n".join(lines) + "\n"


def run_policy(name: str, args: list[str]) -> dict:
    try:
        return run_case(f"policy-{name}", args)
    except SystemExit as failed:  # one failing policy is a finding, not the end of the run
        print(failed, flush=True)
        return {"error": str(failed)[-2000:]}


def main(selected: list[str]) -> None:
    cases = {**{k: COMMON + LORA + v[1] for k, v in CASES.items()},
             **{k: AUSTEN + LORA + v[1] for k, v in CAUSAL.items()}}
    run_selected(cases, selected, "policies", render, run=run_policy)


if __name__ == "__main__":
    main(sys.argv[1:])
