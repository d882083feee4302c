"""The markdown table and the plots of bench/methods.py, from its JSON (no measuring here)."""

from __future__ import annotations

import io
from pathlib import Path

LOSS_MARGIN = 2.0  # points of test accuracy behind full fine-tuning that count as a loss


def _by_task(results: dict) -> dict[str, list[dict]]:
    tasks: dict[str, list[dict]] = {}
    for run in results["runs"].values():
        tasks.setdefault(run["task"], []).append(run)
    return tasks


def _acc(run: dict) -> float:
    return 100 * run["test_accuracy"]


def _options(run: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in (run.get("options") or {}).items()) or "-"


def _bytes(run: dict) -> str:
    if run.get("adapter_bytes") is not None:
        return f"{run['adapter_bytes'] / 1024:,.0f} KiB"
    return f"({run['trained_bytes_fp32'] / 1024:,.0f} KiB)"


def _pareto(runs: list[dict]) -> set[str]:
    """Methods no other method beats on both accuracy and trainable parameters."""
    return {r["method"] for r in runs
            if not any(o is not r and _acc(o) >= _acc(r) and o["trainable_params"] <= r["trainable_params"]
                       and (_acc(o) > _acc(r) or o["trainable_params"] < r["trainable_params"]) for o in runs)}


def _settings_line(task: str, runs: list[dict]) -> str:
    s = runs[0]["settings"]
    sizes = next(("/".join(str(v) for v in r["split_sizes"].values()) for r in runs if r["status"] == "ok"), None)
    mixed = any(r["settings"] != s for r in runs)
    subset = []
    if s["max_train_rows"]:
        subset.append(f"the first {s['max_train_rows']} training rows")
    if s["max_eval_rows"]:
        subset.append(f"the first {s['max_eval_rows']} validation and test rows")
    text = (f"{s['model']}, seed {s['seed']}, {s['epochs']} epoch{'s' * (s['epochs'] != 1)}, batch {s['batch_size']}"
            + (f", {s['max_length']} tokens" if s["model"] != "efficientnet-lite0" else "")
            + f"; split used (train/validation/test): {sizes or 'n/a'}"
            + (f" ({' and '.join(subset)} of the seeded, de-duplicated, stratified split)" if subset else "")
            + ".")
    if mixed:
        text += " **Rows were measured with different settings; see methods.json.**"
    return text


def render(results: dict, tasks_config: dict) -> str:
    env = results["environment"]
    lines = [
        "# Method zoo: every method against full fine-tuning and a linear probe", "",
        "Produced by `bench/methods.py`: one `leanfit.tune.run` per row, each in its own process, run one",
        f"after another on {env['cpu']} ({env['threads']} torch threads, {env.get('cores')} cores, torch",
        f"{env['torch']}, leanfit {env.get('leanfit_commit')}). Every method runs as `leanfit tune --method",
        "NAME` runs it by default: adapters in the top third of the blocks (MiniLM: 2 of 6 layers;",
        "EfficientNet-Lite0: 6 of 16 blocks), the frozen prefix below them computed once and cached",
        "(docs/lean-training.md), so all methods are compared under one policy; full fine-tuning, the",
        "reference, trains every block, and the linear probe trains the head alone. Options are listed at",
        "the end (the paper's where they differ from leanfit's defaults); the learning rate is the one",
        "`leanfit.tune` picks (DEFAULT_LR per method, else 1e-3 for adapters on the top blocks); AdamW,",
        "linear decay after warm-up. Targets are `all-linear`: every Linear layer and, on the CNN, every",
        "pointwise (1x1) convolution (linear-only methods adapt those through methods/pointwise.py), except",
        "the head, which every method trains in full. Accuracy is on the held-out test split; the",
        "subsets used are stated per task. Re-run with `.venv/bin/python bench/methods.py` (resumable,",
        "see its docstring; `--render` re-writes this page from methods.json).", "",
        "Columns: *step ms* is the median wall time of one optimizer step (forward, backward, clipping,",
        "AdamW; first 3 steps dropped) over the run; *peak RSS* is the run's process (rows measured",
        "up to 2026-11-24 were read by the parent with wait4, which Linux floors at the parent's own peak",
        "at the fork; that parent, with the task's model loaded and every method's check done, peaks at",
        "612-653 MiB, under every row's figure, so none was floored; later rows are the process's own",
        "VmHWM); *bytes*",
        "is adapter.safetensors (adapter and trained head), or in parentheses the fp32",
        "bytes of what full fine-tuning / the probe train (they write no adapter). Rows ran one after",
        "another on a shared 2-core machine, not interleaved, so step times and RSS are indicative only",
        "(differences under ~15% are not meaningful). With a few hundred to 2,000 test rows, one",
        "standard error of an accuracy is about 1 point: gaps under ~2 points are within noise.", "",
    ]
    for task, runs in _by_task(results).items():
        runs = sorted(runs, key=lambda r: (r["status"] != "ok", -_acc(r) if r["status"] == "ok" else 0, r["method"]))
        ok = [r for r in runs if r["status"] == "ok"]
        full = next((r for r in ok if r["method"] == "full"), None)
        probe = next((r for r in ok if r["method"] == "probe"), None)
        front = _pareto(ok)
        plot = [f"![accuracy vs parameters](methods-{task}.png)", ""] if ok else []
        lines += [f"## {task}", "", _settings_line(task, runs), "", *plot]
        if ok:
            lines += ["| method | options | lr | test acc | vs full | trainable params | share | bytes | step ms | peak RSS MB |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
        for r in ok:
            gap = f"{_acc(r) - _acc(full):+.2f}" if full else "-"
            name = f"**{r['method']}**" if r["method"] in front else r["method"]
            lines.append(f"| {name} | {_options(r)} | {r['lr']:g} | {_acc(r):.2f}% | {gap} | {r['trainable_params']:,} | "
                         f"{100 * r['trainable_share']:.3f}% | {_bytes(r)} | {r['step_ms_median']:.0f} | "
                         f"{r['peak_rss_mb']:.0f} |")
        if ok:
            lines += ["", "Bold: on the accuracy / trainable-parameter Pareto front of this task.", ""]
        lines += _losses(ok, full, probe, [r for r in runs if r["status"] != "ok"])
        lines += _final_ranks(ok)
    if results.get("notes"):  # what happened during the runs that a reader must know (added by hand)
        lines += ["## Notes", "", *[f"- {n}" for n in results["notes"]], ""]
    configs = {r["method"]: r["config"] for r in results["runs"].values() if r.get("config")}
    lines += ["## Method configurations", "", "| method | configuration |", "|---|---|"]
    lines += [f"| {m} | {', '.join(f'{k}={v}' for k, v in c.items() if k != 'method')} |"
              for m, c in sorted(configs.items())]
    return "\n".join(lines) + "\n"


def _final_ranks(ok: list[dict]) -> list[str]:
    """Where the adaptive-rank methods (AdaLoRA, IncreLoRA) put their budget, layer by layer."""
    lines = []
    for r in ok:
        ranks = r.get("final_ranks")
        if not ranks:
            continue
        prefix = _common_prefix(list(ranks))
        shown = ", ".join(f"{name[len(prefix):]} {rank}" for name, rank in ranks.items())
        lines.append(f"- {r['method']}: final rank per layer ({sum(ranks.values())} in all over {len(ranks)} layers; "
                     f"names after `{prefix}`): {shown}")
    return ["Final ranks of the adaptive-rank methods:", "", *lines, ""] if lines else []


def _common_prefix(names: list[str]) -> str:
    """The longest dotted prefix every name shares (the block list they sit in)."""
    parts = [n.split(".") for n in names]
    common = []
    for pieces in zip(*(p[:-1] for p in parts)):  # never a whole name
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common) + "." if common else ""


def _losses(ok: list[dict], full: dict | None, probe: dict | None, missing: list[dict]) -> list[str]:
    lines = ["Where methods lose, and what did not run:", ""]
    if full:
        behind = [r for r in ok if r["method"] != "full" and _acc(full) - _acc(r) > LOSS_MARGIN]
        lines.append(f"- more than {LOSS_MARGIN:g} points below full fine-tuning ({_acc(full):.2f}%): "
                     + (", ".join(f"{r['method']} ({_acc(r) - _acc(full):+.2f})" for r in behind) or "none"))
        beats = [r for r in ok if r["method"] != "full" and _acc(r) > _acc(full)]
        if beats:
            lines.append("- above full fine-tuning: " + ", ".join(f"{r['method']} ({_acc(r) - _acc(full):+.2f})" for r in beats))
    if probe:
        below = [r for r in ok if r["method"] not in ("probe",) and _acc(r) < _acc(probe)]
        lines.append(f"- below the linear probe ({_acc(probe):.2f}%, only the head trained): "
                     + (", ".join(f"{r['method']} ({_acc(r) - _acc(probe):+.2f})" for r in below) or "none"))
    for r in missing:
        last = [line for line in r["reason"].splitlines() if line.strip()][-1:] or ["?"]
        reason = " ".join(last[0].split())[-300:]  # a failure's log ends with the exception
        lines.append(f"- {r['method']}: {'cannot run here' if r['status'] == 'n/a' else 'FAILED'}: {reason}")
    return lines + [""]


def write_plots(results: dict, out_dir: Path) -> None:
    """One PNG per task: test accuracy against trainable parameters (log x)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from leanfit.io import atomic_write_bytes
    for task, runs in _by_task(results).items():
        ok = [r for r in runs if r["status"] == "ok"]
        if not ok:
            continue
        fig, ax = plt.subplots(figsize=(8, 5.5))
        for r in ok:
            style = {"full": ("s", "black"), "probe": ("D", "grey")}.get(r["method"], ("o", "tab:blue"))
            ax.scatter(r["trainable_params"], _acc(r), marker=style[0], color=style[1], zorder=3)
            ax.annotate(r["method"], (r["trainable_params"], _acc(r)), textcoords="offset points",
                        xytext=(4, 3), fontsize=8)
        full = next((r for r in ok if r["method"] == "full"), None)
        if full:
            ax.axhline(_acc(full), color="black", linestyle="--", linewidth=0.8, label="full fine-tuning")
            ax.axhline(_acc(full) - LOSS_MARGIN, color="tab:red", linestyle=":", linewidth=0.8,
                       label=f"full - {LOSS_MARGIN:g} points")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_ylabel("test accuracy (%)")
        s = ok[0]["settings"]
        ax.set_title(f"{task} on {s['model']}: seed {s['seed']}, {s['epochs']} epochs, "
                     f"train rows {ok[0]['split_sizes']['train']}, test rows {ok[0]['split_sizes']['test']}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(out_dir / f"methods-{task}.png", buffer.getvalue())
