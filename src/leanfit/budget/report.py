"""What a search leaves behind, in its output folder (every file written atomically):

- `front.csv`: the Pareto front of the search fidelity (feasible configurations no other beats on
  every objective), with costs and the score each reached at higher fidelities;
- `trials.csv`: every trial of every rung;
- `front.png`: validation score against trainable-parameter share, front and budget marked;
- `report.md` and `search.json`: settings, fidelity ladder, front, successive-halving results, best;
- `best.json`: the best configuration inside the budget, a `leanfit tune --config` file.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..io import atomic_save, atomic_write_bytes
from .budget import format_value
from .pareto import front
from .space import describe
from .study import RATES_SUFFIX

CSV_COLUMNS = ("rung", "trial", "configuration", "method", "targets", "train_layers", "rank", "lr", "status",
               "score", "best_rung", "best_rung_score", "trainable_params", "trainable_share_pct", "adapter_bytes",
               "train_peak_mb", "inference_latency_pct", "train_seconds_est", "feasible")


@dataclass
class SearchResult:
    settings: dict
    metric: str
    maximize: bool
    objectives: list
    rungs: list  # [{"index", "fidelity", "trials": [row, ...]}]
    front: list  # rows of rung 0 on the Pareto front
    best: dict | None
    best_config: dict | None
    counts: dict
    wall_s: float
    budget: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def collect(search, studies: list, ladder: list, wall_s: float) -> SearchResult:
    """Read every rung's study into rows and pick the front and the best configuration."""
    from optuna.trial import TrialState
    s = search.s
    rungs = []
    for index, study in enumerate(studies):
        rows = [_row(search, index, t) for t in study.get_trials(deepcopy=False)
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.user_attrs.get("status") != "unused"]
        label = ladder[index].label(s.base) + (", lower rates" if study.study_name.endswith(RATES_SUFFIX) else "")
        rungs.append({"index": index, "fidelity": label, "trials": rows, "key": ladder[index].key()})
    scored = [r for r in rungs[0]["trials"] if r["score"] is not None and r["status"] == "trained"]
    sign = -1 if search.maximize else 1
    points = [[sign * r["score"], *r["objective_costs"]] for r in scored]
    on_front = sorted((scored[i] for i in front(points)), key=lambda r: r["cost"]["trainable_params"])
    _mark_higher_rungs(rungs)
    best = _best(rungs, search.maximize)
    best_config = None
    if best is not None:
        config = replace(s.space.config(best["params"], s.base), output=str(Path(s.output) / "best"), progress=True)
        best_config = asdict(config)
    counts = {status: sum(r["status"] == status for r in rungs[0]["trials"])
              for status in ("trained", "duplicate", "over budget", "failed", "cannot build")}
    counts["trials"] = len(rungs[0]["trials"])
    counts["trained_per_rung"] = [sum(r["status"] == "trained" for r in rung["trials"]) for rung in rungs]
    counts["train_wall_s"] = sum(r["wall_s"] or 0 for rung in rungs for r in rung["trials"])
    counts["exact_params_matched"] = all(r["trained_params"] == r["cost"]["trainable_params"]
                                         for rung in rungs for r in rung["trials"] if r["trained_params"] is not None)
    settings = {"model": s.base.model, "data": s.base.data, "budget": s.budget.text, "trials": s.trials,
                "objectives": list(s.objectives), "sampler": s.sampler, "seed": s.seed, "eta": s.eta,
                "finalists": s.finalists, "study_name": s.study_name, "storage": s.storage_url(),
                "space": s.space.as_dict(), "space_size": s.space.size(), "train_seed": s.base.seed,
                "epochs": s.base.epochs, "batch_size": s.base.batch_size, "max_length": s.base.max_length,
                "max_eval_rows": s.base.max_eval_rows}
    budget = {limit.key: {"text": limit.text, "value": limit.value, "share": limit.share} for limit in s.budget.limits}
    return SearchResult(settings, search.metric, search.maximize, list(s.objectives), rungs, on_front, best,
                        best_config, counts, wall_s, budget)


def _row(search, rung: int, trial) -> dict:
    attrs, cost = trial.user_attrs, trial.user_attrs.get("cost", {})
    params = dict(trial.params)
    return {"rung": rung, "trial": trial.number, "name": attrs.get("name", describe(params) if params else "?"),
            "params": params, "status": attrs.get("status", trial.state.name.lower()),
            "score": trial.values[0] if trial.values else None, "validation": attrs.get("validation"),
            "cost": cost, "objective_costs": list(trial.values[1:]) if trial.values else [],
            "feasible": all(v <= 0 for v in trial.constraints.values()), "constraints": dict(trial.constraints),
            "same_as": attrs.get("same_as"), "wall_s": attrs.get("wall_s"), "trained_params": attrs.get("trained_params"),
            "error": attrs.get("error"), "source": attrs.get("source"), "output": attrs.get("output"), "best_rung": rung,
            "best_rung_score": trial.values[0] if trial.values else None}


def _key(row: dict) -> str:
    return json.dumps(row["params"], sort_keys=True)


def _mark_higher_rungs(rungs: list) -> None:
    """Give each rung-0 row the score of the highest rung its configuration reached."""
    reached = {}
    for rung in rungs[1:]:
        for row in rung["trials"]:
            if row["score"] is not None:
                reached[_key(row)] = (rung["index"], row["score"])
    for row in rungs[0]["trials"]:
        if _key(row) in reached:
            row["best_rung"], row["best_rung_score"] = reached[_key(row)]


def _scored(rung: dict) -> list:
    return [r for r in rung["trials"] if r["score"] is not None and r["feasible"]]


def _best(rungs: list, maximize: bool) -> dict | None:
    """Best score at the highest fidelity with results (the full run: its finalists and their lower
    rates); ties go to fewer trainable parameters."""
    top = next((rung for rung in reversed(rungs) if _scored(rung)), None)
    if top is None:
        return None
    rows = [r for rung in rungs if rung["key"] == top["key"] for r in _scored(rung)]
    return min(rows, key=lambda r: ((-r["score"] if maximize else r["score"]), r["cost"]["trainable_params"]))


# --- files -------------------------------------------------------------------------------------------

def write_outputs(result: SearchResult, output: str | Path) -> None:
    output = Path(output)
    atomic_write_bytes(output / "front.csv", _csv(result.front).encode())
    atomic_write_bytes(output / "trials.csv", _csv([r for rung in result.rungs for r in rung["trials"]]).encode())
    atomic_write_bytes(output / "search.json", (json.dumps(result.as_dict(), indent=2, default=str) + "\n").encode())
    if result.best_config is not None:
        atomic_write_bytes(output / "best.json", (json.dumps(result.best_config, indent=2) + "\n").encode())
    atomic_save(output / "front.png", lambda tmp: plot(result, tmp))
    atomic_write_bytes(output / "report.md", render_markdown(result, output).encode())


def _csv(rows: list) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        p, c = r["params"], r["cost"]
        writer.writerow({
            "rung": r["rung"], "trial": r["trial"], "configuration": r["name"], "method": p.get("method"),
            "targets": p.get("targets"), "train_layers": p.get("train_layers"), "rank": p.get("rank", ""),
            "lr": f"{10 ** p['log10_lr']:.3g}" if "log10_lr" in p else "", "status": r["status"],
            "score": _num(r["score"]), "best_rung": r["best_rung"], "best_rung_score": _num(r["best_rung_score"]),
            "trainable_params": c.get("trainable_params", ""),
            "trainable_share_pct": _num(100 * c["trainable_share"]) if "trainable_share" in c else "",
            "adapter_bytes": c.get("adapter_bytes", ""),
            "train_peak_mb": _num(c["train_peak_bytes"] / 1e6) if "train_peak_bytes" in c else "",
            "inference_latency_pct": _num(100 * (c["inference_latency_ratio"] - 1)) if c else "",
            "train_seconds_est": _num(c.get("train_seconds")), "feasible": r["feasible"]})
    return buffer.getvalue()


def _num(value) -> str:
    return "" if value is None else f"{value:.6g}"


def plot(result: SearchResult, path: str) -> None:
    """Score against trainable share: trained points, the front, the budget line, higher-rung scores."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result.rungs[0]["trials"] if r["cost"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    trained = [r for r in rows if r["score"] is not None]
    ax.scatter([100 * r["cost"]["trainable_share"] for r in trained], [r["score"] for r in trained],
               s=18, color="tab:blue", alpha=0.6, label=f"trained ({result.rungs[0]['fidelity']})")
    over = [r for r in rows if r["status"] == "over budget"]
    if over and trained:
        low = min(r["score"] for r in trained)
        ax.scatter([100 * r["cost"]["trainable_share"] for r in over], [low] * len(over), marker="x",
                   color="grey", label="over budget (not trained)")
    fr = sorted(result.front, key=lambda r: r["cost"]["trainable_share"])
    ax.step([100 * r["cost"]["trainable_share"] for r in fr], [r["score"] for r in fr], where="post",
            color="tab:red", marker="o", label="Pareto front")
    if len(result.rungs) > 1:
        full = [rung for rung in result.rungs if rung["key"] == result.rungs[-1]["key"]]
        done = [r for rung in full for r in rung["trials"] if r["score"] is not None]
        ax.scatter([100 * r["cost"]["trainable_share"] for r in done], [r["score"] for r in done], marker="*",
                   s=120, color="tab:green", label=f"full run ({full[0]['fidelity']})")
    limit = result.budget.get("params")
    if limit and rows:
        share = limit["value"] if limit["share"] else limit["value"] / rows[0]["cost"]["total_params"]
        ax.axvline(100 * share, color="black", linestyle="--", linewidth=1, label=f"budget params={limit['text']}")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the model)")
    ax.set_ylabel(f"validation {result.metric}")
    name = f"{Path(str(result.settings['data'])).name} / {Path(str(result.settings['model'])).name}"
    ax.set_title(f"{name}: search under {result.settings['budget']}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def render_markdown(result: SearchResult, output: Path) -> str:
    s, n = result.settings, result.counts
    lines = [f"# Search: {s['data']} / {s['model']} under {s['budget']}", ""]
    if result.best is not None:
        b = result.best
        lines += [f"Best configuration inside the budget: **{b['name']}**: validation {result.metric} "
                  f"{b['score']:.4f} at {result.rungs[b['rung']]['fidelity']}, "
                  f"{b['cost']['trainable_params']:,} trainable parameters "
                  f"({100 * b['cost']['trainable_share']:.3f}%). Retrain it: "
                  f"`leanfit tune --config {output / 'best.json'}`.", ""]
    else:
        lines += ["No configuration inside the budget finished training.", ""]
    lines += ["| setting | value |", "|---|---|"]
    for key in ("model", "data", "budget", "objectives", "sampler", "trials", "seed", "eta", "finalists",
                "study_name", "storage", "space_size", "train_seed", "epochs", "batch_size", "max_length"):
        lines.append(f"| {key} | {s[key]} |")
    lines.append(f"| space | {json.dumps(s['space'])} |")
    lines += ["", f"Trials at the search fidelity: {n['trials']} ({n['trained']} trained, {n['duplicate']} repeated "
              f"points reused, {n['over budget']} over budget and never trained, {n['failed']} failed, "
              f"{n['cannot build']} not buildable). Parameter counts predicted before training matched every "
              f"trained run exactly: {'yes' if n['exact_params_matched'] else 'NO'}. Training time over all "
              f"trials: {n['train_wall_s']:.0f} s. The test split was never looked at.", "",
              "## Successive halving", "", "| rung | fidelity | configurations trained |", "|---|---|---|"]
    lines += [f"| {r['index']} | {r['fidelity']} | {n['trained_per_rung'][r['index']]} |" for r in result.rungs]
    lines += ["", "## Pareto front (search fidelity)", "", "![front](front.png)", "",
              f"| trial | configuration | validation {result.metric} | highest rung: score | params | share | "
              "adapter bytes | memory (est.) | latency (est.) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result.front:
        c = r["cost"]
        higher = f"{r['best_rung']}: {r['best_rung_score']:.4f}" if r["best_rung"] else "-"
        lines.append(f"| {r['trial']} | {r['name']} | {r['score']:.4f} | {higher} | {c['trainable_params']:,} | "
                     f"{100 * c['trainable_share']:.3f}% | {format_value('bytes', c['adapter_bytes'])} | "
                     f"{format_value('memory', c['train_peak_bytes'])} | "
                     f"{format_value('latency', c['inference_latency_ratio'])} |")
    for rung in result.rungs[1:]:
        lines += ["", f"## Rung {rung['index']}: {rung['fidelity']}", "",
                  f"| trial | configuration | validation {result.metric} | params |", "|---|---|---|---|"]
        lines += [f"| {r['trial']} | {r['name']} | {_num(r['score'])} | {r['cost'].get('trainable_params', 0):,} |"
                  for r in rung["trials"]]
    return "\n".join(lines) + "\n"
