"""Issue 6: leanfit's trainer against Hugging Face PEFT on the same task, side by side.

Each contender trains in its own process (for its own peak RSS), alternating peft, leanfit, peft,
leanfit ... for REPS rounds; medians and min-max are reported. Same tokenised rows (leanfit's
de-duplicated, stratified split, seed 0), model, batch, sequence length, epochs and thread count.
Total training time covers tokenising, building the adapter, the prefix cache and the training loop
(and, for leanfit, its per-epoch validation); it excludes model loading and the test evaluation.

    .venv/bin/python bench/train_speed.py [bbc] [austen] [--reps N] [--contenders peft,leanfit,...]
    .venv/bin/python bench/train_speed.py austen --seeds 1,2 [--contenders ...]   # quality on other seeds
Writes docs/benchmarks/train_speed.md and .json. `--seeds` runs each contender once per seed (its own split,
adapter initialisation and data order) and adds the results to the task's block, leaving the seed-0 rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import environment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks"
# leanfit's policies per task: "leanfit" is what `leanfit tune` picks by default (steps in bfloat16 where
# the hardware has it natively, else float32), the others are options measured beside it (docs/lean-training.md).
POLICIES = {
    "bbc": {"leanfit": {"train_layers": 2, "prefix": "cache", "lr": 1e-3, "block_dropout": False, "precision": "auto"},
            "leanfit-fp32": {"train_layers": 2, "prefix": "cache", "lr": 1e-3, "block_dropout": False,
                             "precision": "fp32"},
            "leanfit-top1": {"train_layers": 1, "prefix": "cache", "lr": 2e-3, "block_dropout": False,
                             "precision": "auto"},
            "leanfit-block-dropout": {"train_layers": 2, "prefix": "cache", "lr": 1e-3, "block_dropout": True,
                                      "precision": "auto"}},
    # On a causal LM the default adapts the top five sixths of the blocks (25 of SmolLM2's 30).
    "austen": {"leanfit": {"train_layers": 25, "prefix": "cache", "lr": 2e-3, "precision": "auto"},
               "leanfit-every-block": {"train_layers": None, "prefix": "off", "lr": 2e-3, "precision": "auto"},
               "leanfit-fp32": {"train_layers": 25, "prefix": "cache", "lr": 2e-3, "precision": "fp32"}},
}
# The references: peft as its examples train (float32), and peft with its forwards under bfloat16 autocast
# (what HF Trainer's bf16=True does), so that what leanfit gains beyond bfloat16 itself is seen.
REFERENCES = {"peft": {}, "peft-bf16": {"precision": "bf16"}}


def run(contender: str, task: str, policy: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        worker = "peft" if contender in REFERENCES else "leanfit"
        cmd = [sys.executable, str(ROOT / "bench" / "_train_worker.py"), worker, task, str(out), json.dumps(policy)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{contender} on {task} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(out.read_text())
    result["contender"] = contender
    print(f"{task} {contender}: train {result['train_s']:.0f} s, RSS {result['peak_rss_mb']:.0f} MB, "
          f"test {result['test']}", flush=True)
    return result


def summary(runs: list[dict]) -> dict:
    def stat(values):
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}
    first = runs[0]
    metric = "accuracy" if "accuracy" in first["test"] else "perplexity"
    return {"train_s": stat([r["train_s"] for r in runs]), "peak_rss_mb": stat([r["peak_rss_mb"] for r in runs]),
            "epoch_s": stat([statistics.median(r["epoch_s"]) for r in runs if r["epoch_s"]] or [0.0]),
            "tokens_per_s": stat([r["tokens"] / r["train_s"] for r in runs]),
            metric: stat([r["test"][metric] for r in runs]), "trainable": first["trainable"],
            "policy": first.get("policy"),
            "train_peak_rss_mb": stat([r["train_peak_rss_mb"] for r in runs]) if "train_peak_rss_mb" in first else None}


def render(results: dict) -> str:
    env = results["environment"]
    lines = ["# Lean training: leanfit against Hugging Face PEFT", "",
             f"Produced by `bench/train_speed.py` on {env['cpu']} ({env['threads']} threads"
             f"{', native bfloat16 arithmetic' if env.get('native_bf16') else ''}, torch {env['torch']}, "
             f"peft {results.get('peft_version')}). Each contender runs in its own process, alternating, "
             "for the rounds stated per task; medians with min-max. Training time includes tokenising, adapter "
             "set-up, the prefix cache and the loop (leanfit's includes its per-epoch validation where the task "
             "validates); it excludes model loading and test evaluation. Peak RSS is the whole process's, test "
             "evaluation included (both contenders evaluate with leanfit's evaluation code); where shown, the "
             "peak at the end of training comes first.", ""]
    for task, block in results["tasks"].items():
        s = block["summary"]
        metric = "accuracy" if "accuracy" in s["peft"] else "perplexity"
        rounds = block.get("reps", results["reps"])
        lines += [f"## {block['title']}", "", f"{block['setup']} {rounds} round{'s' * (rounds != 1)}.", "",
                  f"| contender | policy | trainable | train s | s / epoch | tokens/s | peak RSS MB | test {metric} |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in s.items():
            m = r[metric]
            shown = (f"{100 * m['median']:.2f}%" if metric == "accuracy" else f"{m['median']:.2f}")
            lines.append(f"| {name} | {_policy(block['policies'].get(name), r)} | {r['trainable']:,} | "
                         f"{r['train_s']['median']:.0f} ({r['train_s']['min']:.0f}-{r['train_s']['max']:.0f}) | "
                         f"{r['epoch_s']['median']:.0f} | {r['tokens_per_s']['median']:.0f} | "
                         f"{_rss(r)} | {shown} |")
        peft = s["peft"]
        lines.append("")
        for name, lean in s.items():
            if name != "peft":
                low = _precision(block["policies"].get(name), lean) == "bf16" and "peft-bf16" in s
                against_low = (f"; against peft-bf16: tokens/s "
                               f"{lean['tokens_per_s']['median'] / s['peft-bf16']['tokens_per_s']['median']:.2f}x"
                               if low and name != "peft-bf16" else "")
                lines.append(f"- {name} / peft: training time {lean['train_s']['median'] / peft['train_s']['median']:.2f}x, "
                             f"tokens/s {lean['tokens_per_s']['median'] / peft['tokens_per_s']['median']:.2f}x, "
                             f"peak RSS {lean['peak_rss_mb']['median'] / peft['peak_rss_mb']['median']:.2f}x"
                             + (f" (at the end of training {lean['train_peak_rss_mb']['median'] / peft['train_peak_rss_mb']['median']:.2f}x)"
                                if lean.get("train_peak_rss_mb") and peft.get("train_peak_rss_mb") else "") + "; "
                             f"{_verdict(metric, lean, peft)}{against_low}.")
        lines.append("")
        lines += _other_seeds(block, metric)
    if results.get("notes"):  # what happened during the run that a reader must know (added by hand)
        lines += ["## Notes", "", *[f"- {n}" for n in results["notes"]], ""]
    return "\n".join(lines) + "\n"


def _other_seeds(block: dict, metric: str) -> list[str]:
    """One run per contender on each other seed (`--seeds`): is the quality gap seed 0's alone?"""
    if not block.get("seeds"):
        return []
    lines = ["Other seeds, one run each (each seed is its own split, adapter initialisation and data order):", "",
             f"| seed | contender | train s | tokens/s | test {metric} | against peft |", "|---|---|---|---|---|---|"]
    for seed, runs in block["seeds"].items():
        peft = runs["peft"]["test"][metric]
        for name, r in runs.items():
            value = r["test"][metric]
            shown = f"{100 * value:.2f}%" if metric == "accuracy" else f"{value:.2f}"
            gap = (f"{100 * (value - peft):+.2f} pts" if metric == "accuracy" else f"{100 * (value / peft - 1):+.1f}%")
            lines.append(f"| {seed} | {name} | {r['train_s']:.0f} | {r['tokens'] / r['train_s']:.0f} | {shown} | "
                         f"{'' if name == 'peft' else gap} |")
    return lines + [""]


def _rss(r: dict) -> str:
    whole = f"{r['peak_rss_mb']['median']:.0f}"
    return f"{r['train_peak_rss_mb']['median']:.0f} / {whole}" if r.get("train_peak_rss_mb") else whole


def _verdict(metric: str, lean: dict, peft: dict) -> str:
    """Issue 6's targets, on medians: bbc <= 0.25x time, <= 0.7x RSS, accuracy >= peft's; austen >= 2x
    tokens/s at a test perplexity within 2% of peft's."""
    if metric == "accuracy":
        checks = {"time <= 0.25x": lean["train_s"]["median"] <= 0.25 * peft["train_s"]["median"],
                  "RSS <= 0.7x": lean["peak_rss_mb"]["median"] <= 0.7 * peft["peak_rss_mb"]["median"],
                  "accuracy >= peft's": lean["accuracy"]["median"] >= peft["accuracy"]["median"]}
    else:
        checks = {"tokens/s >= 2x": lean["tokens_per_s"]["median"] >= 2 * peft["tokens_per_s"]["median"],
                  "perplexity within 2%": lean["perplexity"]["median"] <= 1.02 * peft["perplexity"]["median"]}
    return "targets: " + ", ".join(f"{k} {'met' if ok else 'NOT met'}" for k, ok in checks.items())


def _precision(p: dict | None, summary: dict) -> str:
    """The steps' precision: "auto" as the trainer resolved it on this machine (its policy info)."""
    asked = (p or {}).get("precision", "fp32")
    return (summary.get("policy") or {}).get("precision", asked) if asked == "auto" else asked


def _policy(p, summary):
    precision = _precision(p, summary)
    low = "" if precision == "fp32" else f", {'auto: ' if (p or {}).get('precision') == 'auto' else ''}{precision}"
    if not p or "lr" not in p:
        return f"LoRA r=8 on every linear layer, lr 5e-4 constant{low and ', bf16 autocast'}"
    if precision == "fp32" and p.get("precision") == "auto":
        low = ", auto: fp32"
    layers = f"top {p['train_layers']} blocks" if p.get("train_layers") else "every block"
    dropout = {False: ", blocks' dropout off", True: ", blocks' dropout on"}.get(p.get("block_dropout"), "")
    return f"LoRA r=8, {layers}, prefix {p.get('prefix', 'off')}{dropout}{low}, lr {p['lr']:g} linear decay"


TITLES = {
    "bbc": ("MiniLM-L6 on bbc-news", "Batch 32, 128 tokens, 3 epochs, LoRA r=8 alpha 16, seed 0; test accuracy on "
            "the held-out test split (425 rows)."),
    "austen": ("SmolLM2-135M on Austen", "Batch 8, 128 tokens, 2 epochs over the first 192 training blocks, LoRA r=8 "
               "alpha 16, seed 0; perplexity on the first 96 test blocks. Neither contender validates while it trains "
               "(peft's loop has no validation), so the time is training alone. Weights ship as 4-bit Q4_1 GGUF, "
               "dequantised to fp32."),
}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="*", help=f"any of {', '.join(POLICIES)} (default: every task)")
    parser.add_argument("--reps", type=int, default=2, help="rounds of every contender (default 2)")
    parser.add_argument("--contenders", help="comma-separated subset (peft is always run: ratios are against it)")
    parser.add_argument("--seeds", default="", help="comma-separated other seeds, one run per contender each")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.tasks) - set(POLICIES))
    if unknown:
        parser.error(f"unknown tasks {', '.join(unknown)}; choose among {', '.join(POLICIES)}.")
    reps, tasks = args.reps, args.tasks or list(POLICIES)
    # a subset of the contenders (peft always among them: every ratio is against it), for more rounds in the time
    chosen = set(args.contenders.split(",")) | {"peft"} if args.contenders else None
    known = set(REFERENCES).union(*POLICIES.values())
    if chosen and chosen - known:
        raise SystemExit(f"Unknown contenders {', '.join(sorted(chosen - known))}; "
                         f"choose among {', '.join(sorted(known))}.")
    import peft
    path = OUT / "train_speed.json"
    results = json.loads(path.read_text()) if path.exists() else {"tasks": {}}
    for block in results["tasks"].values():  # tasks measured before rounds were kept per task
        block.setdefault("reps", results.get("reps", reps))
    results.update(environment=environment(), reps=reps, peft_version=peft.__version__)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    for task in tasks:
        contenders = {n: p for n, p in {**REFERENCES, **POLICIES[task]}.items() if chosen is None or n in chosen}
        if seeds:
            if task not in results["tasks"]:
                raise SystemExit(f"{task} has no seed-0 rounds in {path} to add seeds to; "
                                 "run them first (without --seeds).")
            others = results["tasks"][task].setdefault("seeds", {})
            for seed in seeds:
                others[str(seed)] = {name: run(name, task, {**policy, "seed": seed})
                                     for name, policy in contenders.items()}
                write(results)
            continue
        runs = {name: [] for name in contenders}
        for _ in range(reps):
            for name, policy in contenders.items():
                runs[name].append(run(name, task, policy))
        results["tasks"][task] = {"title": TITLES[task][0], "setup": TITLES[task][1], "policies": contenders, "reps": reps,
                                  "runs": runs, "summary": {n: summary(r) for n, r in runs.items()}}
        write(results)


def write(results: dict) -> None:
    """After every task (and seed), atomically: a long run stopped midway keeps what it measured."""
    from leanfit.io import atomic_write_bytes
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(OUT / "train_speed.json", (json.dumps(results, indent=2) + "\n").encode())
    atomic_write_bytes(OUT / "train_speed.md", render(results).encode())


if __name__ == "__main__":
    main(sys.argv[1:])
