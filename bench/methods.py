"""Issue 3's method zoo, measured side by side: every registered method, full fine-tuning and a linear
probe on bbc-news and tweets-sentiment (MiniLM-L6) and fashion-mnist (EfficientNet-Lite0).

Each (task, method) run is one `leanfit.tune.run` in its own process (`--worker`), so its peak RSS,
the VmHWM that `leanfit tune` reports, is its own (wait4's ru_maxrss is floored at this parent's peak
at the fork, and this parent has loaded the task's model). Results are appended to the JSON after every run, and
a pair already measured with the same settings is skipped (resumable; `--force` re-runs it; pairs
that failed or could not run are tried again).
Writes OUT/methods.json, OUT/methods.md and OUT/methods-<task>.png (accuracy vs trainable params).

    .venv/bin/python bench/methods.py                                  # everything, docs/benchmarks/
    .venv/bin/python bench/methods.py --tasks bbc-news --methods lora,mos
    .venv/bin/python bench/methods.py --quick --methods lora,probe     # smoke run, out/bench-methods-quick/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _methods_report import render, write_plots  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks"
# Each task as `leanfit tune --method NAME` runs it by default: the top third of the blocks adapted
# and the frozen prefix below them cached (docs/lean-training.md), so every method is compared under
# one policy; full fine-tuning, the reference, trains every block. On the CNN, "all-linear" is every
# pointwise (1x1) convolution (core/inject.py), its only Linear being the head. The subsets keep the
# whole table (60 runs) within about two hours on 2 cores.
LEAN = dict(train_layers="auto", prefix="cache")
TASKS = {
    "bbc-news": dict(model="minilm", data="bbc-news", targets="all-linear", epochs=3, batch_size=32, max_length=128,
                     max_train_rows=None, max_eval_rows=None, **LEAN),
    "tweets-sentiment": dict(model="minilm", data="tweets-sentiment", targets="all-linear", epochs=3, batch_size=32, max_length=64,
                             max_train_rows=1000, max_eval_rows=500, **LEAN),
    "fashion-mnist": dict(model="efficientnet-lite0", data="fashion-mnist", targets="all-linear", epochs=3, batch_size=32,
                          max_length=128, max_train_rows=2000, max_eval_rows=1000, **LEAN),
}
QUICK = dict(epochs=1, max_train_rows=64, max_eval_rows=64)
BASELINES = ("full", "probe")
# Options where a method's paper setting differs from its config's defaults (rank 8 for the low-rank
# families, as LoRA r=8 in the foundation results).
OPTIONS = {
    "lora": {"rank": 8, "alpha": 16.0}, "dylora": {"rank": 8, "alpha": 16.0}, "hydra": {"rank": 8},
    "lora-sb": {"rank": 16, "init": "gradient"}, "paca": {"rank": 8}, "hut": {"rank": 8},
    "mos": {"rank": 8}, "sft": {"regrow_every": 20},
}
SEED = 0


def all_methods() -> list[str]:
    from leanfit.methods import method_names
    return [*BASELINES, *method_names()]


def settings(task: str, args) -> dict:
    s = dict(TASKS[task], seed=SEED, threads=args.threads)
    if args.quick:
        s.update(QUICK)
    for key in ("epochs", "max_train_rows", "max_eval_rows"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    return s


def policy(method: str, s: dict) -> dict:
    """The task's lean-training policy; full fine-tuning, the reference, trains every block. The blocks'
    dropout stays on, as when the table was measured (tune turns it off by default since 2026-11-24)."""
    layers = dict(train_layers="all", prefix="off") if method == "full" else \
        dict(train_layers=s["train_layers"], prefix=s["prefix"])
    return {**layers, "block_dropout": True}


# ---------------------------------------------------------------- worker (one run, its own process)

def worker(task: str, method: str, config_json: str, targets: str, out: str) -> int:
    import torch
    from leanfit.train.trainer import Trainer
    from leanfit.tune import TuneConfig, run
    s = json.loads(config_json)
    torch.set_num_threads(s["threads"])
    steps: list[float] = []
    step = Trainer._optimizer_step

    def timed(self, group):  # forward, backward, clipping and AdamW of one optimizer step
        started = time.perf_counter()
        result = step(self, group)
        steps.append(time.perf_counter() - started)
        return result
    Trainer._optimizer_step = timed
    output = Path(out).parent / task / method
    shutil.rmtree(output, ignore_errors=True)
    result = {"task": task, "method": method, "settings": s}
    config = TuneConfig(model=s["model"], data=s["data"], method=method, options=OPTIONS.get(method, {}),
                        targets=json.loads(targets), epochs=s["epochs"], batch_size=s["batch_size"],
                        max_length=s["max_length"], seed=SEED, output=str(output),
                        max_train_rows=s["max_train_rows"], max_eval_rows=s["max_eval_rows"],
                        progress=False, **policy(method, s))
    report = run(config)
    timed_steps = steps[3:] or steps  # the first steps warm up allocators and caches
    result.update(
        status="ok", lr=report["lr"], options=report["options"],
        test_accuracy=report["test"]["accuracy"], validation_best=report["validation_best"],
        trainable_params=report["trainable_params"], total_params=report["total_params"],
        trainable_share=report["trainable_share"], split_sizes=report["split_sizes"],
        adapter_bytes=report.get("adapter_bytes"),
        # full / probe write no adapter: the fp32 bytes of what they train is what they would ship
        trained_bytes_fp32=report["trainable_params"] * 4, steps=report["steps"],
        step_ms_median=1000 * statistics.median(timed_steps), step_ms_min=1000 * min(timed_steps),
        step_ms_max=1000 * max(timed_steps), train_wall_s=report["train_wall_s"], wall_s=report["wall_s"],
        peak_rss_mb_self=report["peak_rss_mb"], data_info=report.get("data_info"), policy=report.get("policy"),
        final_ranks=report.get("final_ranks"))
    Path(out).write_text(json.dumps(result, indent=2, default=str))
    return 0


# ---------------------------------------------------------------- parent

class TaskModel:
    """A task's freshly loaded model, once per task in the parent, to ask whether a method can adapt
    it at all; only that refusal makes a row "n/a", any error of a run itself is a failure."""

    def __init__(self, s: dict):
        import leanfit as lf
        if s["data"] not in lf.zoo.DATASETS or s["model"] not in lf.zoo.MODELS:
            raise LookupError(f"{s['model']} or {s['data']} is not in this leanfit's zoo yet")
        dataset = lf.zoo.dataset(s["data"], seed=SEED)
        self.model, _ = lf.zoo.model(s["model"], task=dataset.task, num_labels=len(dataset.labels), seed=SEED)
        self.settings = s

    def check(self, method: str) -> tuple[object, dict | None, tuple[str, str] | None]:
        """(targets, method config, None or (status, reason) when it cannot run)."""
        import copy
        import leanfit as lf
        if method in BASELINES:
            return self.settings["targets"], None, None
        from leanfit.tune import TuneConfig, apply_method, method_options
        config = lf.config_from_dict({"method": method, **OPTIONS.get(method, {})})
        targets = self.settings["targets"]
        run = TuneConfig(method=method, options=method_options(method, OPTIONS.get(method, {})), targets=targets,
                         **policy(method, self.settings))
        try:  # adapted as the run will adapt it: the same targets, below the same top blocks
            apply_method(copy.deepcopy(self.model), run)
        except lf.errors.LeanfitError as err:  # the method refuses this model: a finding
            return targets, config.to_dict(), ("n/a", str(err))
        except Exception as err:  # noqa: BLE001  (a bug: recorded as a failure, retried next time)
            return targets, config.to_dict(), ("failed", f"adapt raised {err!r}")
        return targets, config.to_dict(), None


def run_in_child(task: str, method: str, s: dict, targets) -> dict:
    out = ROOT / "out" / "bench-methods" / f"{task}--{method}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--worker", task, method, json.dumps(s), json.dumps(targets), str(out)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0 or not out.exists():
        return {"task": task, "method": method, "settings": s, "status": "failed",
                "reason": f"exit {proc.returncode}: {proc.stdout[-2000:]}"}
    result = json.loads(out.read_text())
    result["peak_rss_mb"] = result["peak_rss_mb_self"]
    result["process_wall_s"] = time.perf_counter() - started
    return result


def environment(threads: int) -> dict:
    import torch
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    return {"torch": torch.__version__, "threads": threads, "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "leanfit_commit": commit}


def save(results: dict, out_dir: Path) -> None:
    from leanfit.io import atomic_write_bytes
    atomic_write_bytes(out_dir / "methods.json", (json.dumps(results, indent=2, default=str) + "\n").encode())
    atomic_write_bytes(out_dir / "methods.md", render(results, TASKS).encode())
    write_plots(results, out_dir)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    p.add_argument("--methods", help="comma-separated method names (default: every registered one, full, probe)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-train-rows", dest="max_train_rows", type=int)
    p.add_argument("--max-eval-rows", dest="max_eval_rows", type=int)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help=f"smoke run {QUICK}, written to out/bench-methods-quick")
    p.add_argument("--force", action="store_true", help="re-run pairs already measured with these settings")
    p.add_argument("--out", help="output folder (default docs/benchmarks, or out/bench-methods-quick with --quick)")
    p.add_argument("--render", action="store_true", help="only re-write the md and plots from the JSON")
    p.add_argument("--worker", nargs=5, metavar=("TASK", "METHOD", "SETTINGS", "TARGETS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    tasks = [t for t in args.tasks.split(",") if t]
    methods = args.methods.split(",") if args.methods else all_methods()
    unknown = [t for t in tasks if t not in TASKS] + [m for m in methods if m not in all_methods()]
    if unknown:
        p.error(f"unknown task or method {unknown}; tasks: {list(TASKS)}, methods: {all_methods()}")
    out_dir = Path(args.out) if args.out else (ROOT / "out" / "bench-methods-quick" if args.quick else DOCS)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "methods.json"
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    if args.render:  # the page of the runs as measured: their environment is kept
        save(results, out_dir)
        return 0
    results["environment"] = environment(args.threads)
    for task in tasks:
        s, base = settings(task, args), None
        for method in methods:
            key, done = f"{task}/{method}", results["runs"].get(f"{task}/{method}")
            if done and done["status"] == "ok" and done["settings"] == s and not args.force:
                print(f"{key}: measured already with these settings, skipped", flush=True)
                continue
            try:
                base = base or TaskModel(s)
            except Exception as err:  # noqa: BLE001  (a task that cannot load: say so, go on with the next)
                print(f"{task}: cannot load its model or data ({err}); task skipped", flush=True)
                break
            targets, config, refusal = base.check(method)
            if refusal:
                result = {"task": task, "method": method, "settings": s, "status": refusal[0], "reason": refusal[1]}
            else:
                result = run_in_child(task, method, s, targets)
            result.update(config=config, targets=len(targets) if isinstance(targets, list) else targets)
            results["runs"][key] = result
            save(results, out_dir)
            summary = (f"{100 * result['test_accuracy']:.2f}% test, {result['trainable_params']:,} trainable, "
                       f"{result['step_ms_median']:.0f} ms/step, {result['peak_rss_mb']:.0f} MB, "
                       f"{result['process_wall_s']:.0f} s" if result["status"] == "ok"
                       else f"{result['status']}: {result['reason'][-300:]}")
            print(f"{key}: {summary}", flush=True)
    save(results, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
