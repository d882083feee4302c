"""Issue 2's results table: every method of the foundation against full fine-tuning and a frozen
linear probe on bbc-news / MiniLM, and SmolLM2-135M's test perplexity on Austen before and after LoRA.

Each configuration runs `leanfit tune` in its own process (so peak RSS is its own), one after the
other, seed 0. Writes docs/benchmarks/results.md and results.json.

    .venv/bin/python bench/results.py            # everything (about an hour on 2 cores)
    .venv/bin/python bench/results.py lora full  # a subset, merged into the existing JSON
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks"
RUNS = ROOT / "out" / "bench-results"
# Each method as the papers apply it: on every block with the model's dropout, no lean-training policy
# (that is bench/train_speed.py's subject); `lora-default` is what `leanfit tune` does with no options.
COMMON = ["--data", "bbc-news", "--model", "minilm", "--epochs", "3", "--batch-size", "32",
          "--max-length", "128", "--seed", "0", "--no-progress"]
PLAIN = ["--train-layers", "all", "--prefix", "off", "--block-dropout"]
CASES = {
    "lora-default": [],
    "full": ["--method", "full"],
    "probe": ["--method", "probe"],
    "lora": ["--method", "lora", "--rank", "8", "--alpha", "16"],
    "lora-rslora": ["--method", "lora", "--rank", "8", "--alpha", "16", "--set", "use_rslora=true"],
    "lora-pissa": ["--method", "lora", "--rank", "8", "--alpha", "16", "--set", "init=pissa"],
    "dylora": ["--method", "dylora", "--rank", "8", "--alpha", "16"],
    "lora-sb": ["--method", "lora-sb", "--rank", "16", "--set", "init=gradient"],
    "bottleneck-series": ["--method", "bottleneck", "--set", "size=64"],
    "bottleneck-parallel": ["--method", "bottleneck", "--set", "size=64", "--set", "placement=parallel"],
    "ia3": ["--method", "ia3"],
    "ssf": ["--method", "ssf"],
    "bitfit": ["--method", "bitfit"],
}
CAUSAL = {  # SmolLM2 on a CPU: a subset of Austen, stated in the table
    "smollm2-lora": ["--data", "austen", "--model", "smollm2-135m", "--method", "lora", "--rank", "8", *PLAIN,
                     "--alpha", "16", "--epochs", "1", "--batch-size", "8", "--max-length", "128",
                     "--max-train-rows", "384", "--max-eval-rows", "96", "--seed", "0", "--no-progress"],
}


def _policy(r: dict) -> str:
    p = r.get("policy") or {}
    if not p.get("train_layers"):
        return "every block"
    return f"top {p['train_layers']} blocks, prefix {p.get('prefix')}"


def run_case(name: str, args: list[str]) -> dict:
    out = RUNS / name
    cmd = [sys.executable, "-m", "leanfit.cli", "tune", *args, "--output", str(out), "--overwrite"]  # a rerun replaces
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    report["process_wall_s"] = time.perf_counter() - started
    print(f"{name}: {proc.stdout.strip().splitlines()[0]}", flush=True)
    return report


def environment() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    from leanfit.train.precision import native_bf16
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu,
            "python": platform.python_version(), "native_bf16": native_bf16(torch.device("cpu"))}


def render(results: dict) -> str:
    rows = results["runs"]
    lines = ["# Foundation results: bbc-news / MiniLM-L6 and austen / SmolLM2-135M", "",
             "Produced by `bench/results.py`: one `leanfit tune` process per row, run one after another on",
             f"{machines(rows, results['environment']['cpu'])} ({results['environment']['threads']} threads, torch "
             f"{results['environment']['torch']}). Seed 0; bbc-news split (de-duplicated, stratified):",
             f"{rows.get('lora', next(iter(rows.values())))['split_sizes']} rows; 128 tokens, batch 32, 3 epochs,",
             "AdamW with linear decay after 6% warm-up. Accuracy is on the held-out test split. Wall time is the",
             "whole job (loading, tokenising, training, evaluating, saving); peak RSS is the process's.",
             "Wall times are single runs on a shared 2-core machine and are NOT comparable between rows:",
             "other work ran beside several of them (full, lora-rslora and lora-pissa most; quiet rows ran",
             "lora at ~250-330 s). Side-by-side timing is bench/train_speed.py's job.", "",
             "| method | options | blocks adapted | lr | test accuracy | trainable params | share | wall s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if r["task"] != "classification":
            continue
        lines.append(f"| {name} | {_options(r)} | {_policy(r)} | {r['lr']:g} | {100 * r['test']['accuracy']:.2f}% | "
                     f"{r['trainable_params']:,} | {100 * r['trainable_share']:.3f}% | {r['wall_s']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    dy = rows.get("dylora", {}).get("per_rank")
    if dy:
        lines += ["", "DyLoRA, one training run, evaluated at each rank by truncation (no retraining):", "",
                  "| rank | test accuracy |", "|---|---|"]
        lines += [f"| {k} | {100 * v['accuracy']:.2f}% |" for k, v in dy.items()]
    for name, r in rows.items():
        if r["task"] == "causal-lm":
            lines += ["", f"## {name}: SmolLM2-135M on Austen", "",
                      f"LoRA r=8 on all linear layers, {r['epochs']} epoch on the first {r['split_sizes']['train']} "
                      f"training blocks of {r['max_length']} tokens; perplexity on the first {r['split_sizes']['test']} "
                      "test blocks. The model's weights ship as 4-bit Q4_1 GGUF and are dequantised to fp32.", "",
                      "| test perplexity before | after | trainable share | wall s | peak RSS MB |", "|---|---|---|---|---|",
                      f"| {r['test_before']['perplexity']:.2f} | {r['test']['perplexity']:.2f} | "
                      f"{100 * r['trainable_share']:.3f}% | {r['wall_s']:.0f} | {r['peak_rss_mb']:.0f} |"]
    full, lora = rows.get("full"), rows.get("lora")
    if full and lora:
        gap = 100 * (full["test"]["accuracy"] - lora["test"]["accuracy"])
        lines += ["", f"Target (LoRA within 1.0 point of full fine-tuning at <= 1.5% trainable parameters): "
                      f"LoRA is {gap:+.2f} points behind full fine-tuning at {100 * lora['trainable_share']:.3f}% "
                      f"trainable -> {'met' if gap <= 1.0 and lora['trainable_share'] <= 0.015 else 'NOT met'}."]
    return "\n".join(lines) + "\n"


def machines(rows: dict, default: str) -> str:
    """The CPU the rows ran on, naming the rows of each where a subset was re-run on another machine."""
    by_cpu: dict[str, list[str]] = {}
    for name, r in rows.items():
        by_cpu.setdefault(r.get("cpu") or default, []).append(name)
    if len(by_cpu) == 1:
        return next(iter(by_cpu))
    return " and ".join(f"{cpu} ({', '.join(names)})" for cpu, names in by_cpu.items())


def _options(r: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"


def run_selected(cases: dict, selected: list[str], stem: str, render, run=run_case) -> None:
    """Run the `selected` cases (none: all), one after another, writing OUT/<stem>.json and .md after
    each; a subset is merged into the existing JSON, kept in the order of `cases`."""
    unknown = [s for s in selected if s not in cases]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {list(cases)}")
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{stem}.json"
    results = json.loads(path.read_text()) if path.exists() and selected else {"runs": {}}
    earlier = results.get("environment", {}).get("cpu")
    for kept in results["runs"].values():  # rows kept from an earlier run keep that run's machine
        kept.setdefault("cpu", earlier)
    results["environment"] = environment()
    for name in selected or list(cases):
        results["runs"][name] = {**run(name, cases[name]), "cpu": results["environment"]["cpu"]}
        results["runs"] = {k: results["runs"][k] for k in cases if k in results["runs"]}
        path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        (OUT / f"{stem}.md").write_text(render(results))


def main(selected: list[str]) -> None:
    cases = {**{k: COMMON + (v if k == "lora-default" else PLAIN + v) for k, v in CASES.items()}, **CAUSAL}
    run_selected(cases, selected, "results", render)


if __name__ == "__main__":
    main(sys.argv[1:])
