"""Issue 4: many adapters in one batch, leanfit against Hugging Face PEFT, side by side in one run.

1. Forward time relative to the unadapted base model: MiniLM-L6, 64 rows x 64 tokens, LoRA r=8 on
   every linear layer, with 1 adapter (unmerged; and leanfit's hot merged adapter), 8 and 64 distinct
   adapters in one batch: leanfit `forward_mixed` vs peft `adapter_names=` (one adapter: peft's
   active adapter). Contenders alternate in one process, after a warm-up, 15 rounds.
2. Generation throughput (new tokens/s) of SmolLM2-135M, 8 adapters (LoRA r=8, all linear) in one
   batch of 8 rows, greedy: leanfit's serving loop (serve/generation.py) vs peft `generate(...,
   adapter_names=)`, alternating, the base model's own loop as reference; both produce the same tokens.
3. Load test: `leanfit serve` (MiniLM, 8 adapters in the registry) in a subprocess on loopback, 60 s of
   16 concurrent openai clients on random adapters: throughput, p50/p99 latency, errors.

Both contenders hold the same adapter weights (random, so every delta is non-zero) and run with
torch.set_num_threads(2), float32.

    .venv/bin/python bench/serve_mixed.py           # ~8 min; writes docs/benchmarks/serve_mixed.md and .json
    .venv/bin/python bench/serve_mixed.py --quick   # tiny settings, ~2 min, writes to a temporary folder
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results import environment  # noqa: E402

import leanfit as lf  # noqa: E402
from leanfit.core.batching import HotAdapter, forward_mixed  # noqa: E402
from leanfit.core.model import adapter_modules  # noqa: E402
from leanfit.serve.generation import GenerationParams, generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FULL = {"rows": 64, "tokens": 64, "counts": (1, 8, 64), "reps": 15, "gen_rows": 8, "prompt": 32, "new": 32,
        "gen_reps": 7, "load_s": 60, "clients": 16}
QUICK = {"rows": 8, "tokens": 16, "counts": (1, 2, 8), "reps": 2, "gen_rows": 4, "prompt": 8, "new": 4,
         "gen_reps": 1, "load_s": 5, "clients": 4}


def stat(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def add_adapters(model, count: int, seed: int) -> list[str]:
    """`count` LoRA r=8 adapters on every linear layer, with random (non-zero) factors."""
    g = torch.Generator().manual_seed(seed)
    names = [f"a{i}" for i in range(count)]
    for name in names:
        lf.adapt(model, lf.LoRA(rank=8, alpha=16), targets="all-linear", name=name, train_modules=[])
        with torch.no_grad():
            for module in adapter_modules(model, name).values():
                module.lora_A.copy_(torch.randn(module.lora_A.shape, generator=g) * 0.05)
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * 0.05)
    lf.deactivate(model)
    return names


def peft_copy(base, leanfit_model, names: list[str]):
    """A peft model over a copy of `base` with the same adapters (same factors) as `leanfit_model`."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    model = get_peft_model(copy.deepcopy(base), config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    with torch.no_grad():
        for name in names:
            for host, module in adapter_modules(leanfit_model, name).items():
                layer = model.base_model.model.get_submodule(host)
                layer.lora_A[name].weight.copy_(module.lora_A)
                layer.lora_B[name].weight.copy_(module.lora_B)
    return model.eval()


def alternate(contenders: dict, reps: int) -> dict:
    """Each contender once as warm-up, then `reps` rounds of all of them in turn; seconds per call."""
    times = {k: [] for k in contenders}
    for fn in contenders.values():
        fn()
    for _ in range(reps):
        for key, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return times


def forward_bench(s: dict) -> dict:
    base, tokenizer = lf.zoo.model("minilm", task="embedding")
    base.eval()
    ours = copy.deepcopy(base)
    names = add_adapters(ours, max(s["counts"]), seed=0)
    ours.eval()
    theirs = peft_copy(base, ours, names)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, tokenizer.vocab_size, (s["rows"], s["tokens"]), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    hot_model = copy.deepcopy(ours)
    hot = HotAdapter(hot_model, after=1)
    hot.prepare([names[0]])  # the adapter of a single-adapter batch, merged (exactly restorable)
    contenders, rows_of, diffs = {"base": lambda: base(**batch)}, {}, {}
    for count in s["counts"]:
        rows = [names[i * count // s["rows"]] for i in range(s["rows"])]
        rows_of[count] = rows
        contenders[f"leanfit-{count}"] = lambda rows=rows: forward_mixed(ours, batch, rows)
        if count == 1:
            theirs.set_adapter(names[0])  # peft's own one-adapter path (unmerged)
            contenders["peft-1"] = lambda: theirs(**batch)
        else:
            contenders[f"peft-{count}"] = lambda rows=rows: theirs(**batch, adapter_names=rows)
    contenders["leanfit-1-merged"] = lambda: forward_mixed(hot_model, batch, rows_of[1])
    with torch.inference_mode():
        for count, rows in rows_of.items():
            a = forward_mixed(ours, batch, rows).last_hidden_state
            b = theirs(**batch, adapter_names=rows).last_hidden_state
            diffs[count] = float((a - b).abs().max())
        diffs["merged"] = float((contenders["leanfit-1-merged"]().last_hidden_state
                                 - forward_mixed(ours, batch, rows_of[1]).last_hidden_state).abs().max())
        times = alternate(contenders, s["reps"])
    base_median = statistics.median(times["base"])
    return {"times_s": {k: stat(v) for k, v in times.items()},
            "ratio_to_base": {k: statistics.median(v) / base_median for k, v in times.items()},
            "max_abs_diff_leanfit_vs_peft": diffs}


class _Job:
    """What serve/generation.py needs of a request: its adapter, parameters, and a way to report."""

    def __init__(self, adapter, params):
        self.adapter, self.payload, self.cancelled, self.result = adapter, params, False, None

    def emit(self, kind, value=None):
        if kind == "done":
            self.result = value


def generation_bench(s: dict) -> dict:
    base, tokenizer = lf.zoo.model("smollm2-135m", task="causal-lm")
    base.eval()
    ours = copy.deepcopy(base)
    names = add_adapters(ours, s["gen_rows"], seed=2)
    ours.eval()
    theirs = peft_copy(base, ours, names)
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(100, tokenizer.vocab_size, (s["gen_rows"], s["prompt"]), generator=g)
    mask = torch.ones_like(prompts)
    out = {}

    def leanfit_run():
        jobs = [_Job(n, GenerationParams([prompts[i].tolist()], max_tokens=s["new"], temperature=0))
                for i, n in enumerate(names)]
        generate(ours, tokenizer, jobs)
        out["leanfit"] = [tokenizer(j.result["choices"][0]["text"], add_special_tokens=False)["input_ids"]
                          for j in jobs]
        out["leanfit_tokens"] = sum(j.result["completion_tokens"] for j in jobs)

    def hf(model, key, **extra):
        def run():
            ids = model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=s["new"], do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, **extra)[:, s["prompt"]:]
            out[key + "_tokens"] = int((ids != tokenizer.pad_token_id).sum())
            out[key] = ids
        return run

    with torch.inference_mode():
        times = alternate({"base": hf(base, "base"), "leanfit": leanfit_run,
                           "peft": hf(theirs, "peft", adapter_names=names)}, s["gen_reps"])
    same = all(tokenizer.decode(out["peft"][i], skip_special_tokens=True)
               == tokenizer.decode(out["leanfit"][i], skip_special_tokens=True) for i in range(len(names)))
    result = {"times_s": {k: stat(v) for k, v in times.items()}, "same_text_as_peft": same}
    result["tokens_per_s"] = {k: out[k + "_tokens"] / statistics.median(v) for k, v in times.items()}
    return result


def load_test(s: dict, tmp: Path) -> dict:
    import httpx
    import openai

    model, tokenizer = lf.zoo.model("minilm", task="embedding")
    names = add_adapters(model, 8, seed=4)
    registry = tmp / "registry"
    for name in names:
        lf.save(model, registry / name, name)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "leanfit.cli", "serve", "--model", "minilm", "--adapters",
                               str(registry), "--port", str(port), "--log-level", "warning"],
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if server.poll() is not None:
            raise SystemExit(f"leanfit serve failed:\n{server.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("leanfit serve did not start within 180 s")
        time.sleep(0.5)
    words = "the market fell sharply after the report while the team won its match again".split()
    latencies, errors, lock = [], [], threading.Lock()
    stop_at = time.monotonic() + s["load_s"]

    def client(seed: int) -> None:
        rng = random.Random(seed)
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        while time.monotonic() < stop_at:
            texts = [" ".join(rng.choices(words, k=rng.randint(4, 24))) for _ in range(rng.randint(1, 4))]
            adapter = rng.choice(names + ["minilm"])
            start = time.perf_counter()
            try:
                api.embeddings.create(model=adapter, input=texts)
                with lock:
                    latencies.append(time.perf_counter() - start)
            except Exception as err:  # counted, never hidden
                with lock:
                    errors.append(f"{type(err).__name__}: {err}")

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(s["clients"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    metrics = httpx.get(f"{url}/metrics").text
    server.send_signal(signal.SIGTERM)
    server.wait(60)
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None  # noqa: E731
    batches = [line for line in metrics.splitlines() if line.startswith("leanfit_batch_size_")]
    return {"duration_s": elapsed, "clients": s["clients"], "requests": len(latencies), "errors": len(errors),
            "error_samples": errors[:5], "requests_per_s": len(latencies) / elapsed, "p50_s": pick(0.5),
            "p99_s": pick(0.99), "batch_size_metrics": batches}


def render(r: dict) -> str:
    env, s, f, gen, load = r["environment"], r["settings"], r["forward"], r["generation"], r["load"]
    lines = ["# Mixed-adapter serving: leanfit vs peft", "",
             f"Produced by `bench/serve_mixed.py`{' --quick' if r['quick'] else ''} on {env['cpu']} "
             f"({env['threads']} threads, torch {env['torch']}, peft {r['peft']}). float32. Contenders alternate "
             f"in one process after a warm-up; medians of {s['reps']} rounds, min-max in brackets.", "",
             f"## Forward time, MiniLM-L6, {s['rows']} rows x {s['tokens']} tokens, LoRA r=8 on every linear layer",
             "", "| adapters in the batch | leanfit | peft | leanfit / base | peft / base |", "|---|---|---|---|---|"]
    t, ratio = f["times_s"], f["ratio_to_base"]

    def ms(key):
        return f"{t[key]['median'] * 1e3:.0f} ms [{t[key]['min'] * 1e3:.0f}-{t[key]['max'] * 1e3:.0f}]"

    for count in s["counts"]:
        label = "1 (unmerged)" if count == 1 else str(count)
        lines.append(f"| {label} | {ms(f'leanfit-{count}')} | {ms(f'peft-{count}')} | "
                     f"{ratio[f'leanfit-{count}']:.3f}x | {ratio[f'peft-{count}']:.3f}x |")
    hot = ratio["leanfit-1-merged"]
    lines += [f"| 1, hot (merged by `HotAdapter`) | {ms('leanfit-1-merged')} | - | {hot:.3f}x | - |",
              "", f"Base model: {ms('base')}. Targets (issue 4): 64 adapters <= 1.15x, one unmerged adapter <= 1.10x. "
              f"Max abs difference leanfit vs peft outputs: {max(f['max_abs_diff_leanfit_vs_peft'].values()):.1e}.",
              "", f"## Generation, SmolLM2-135M, {s['gen_rows']} rows on {s['gen_rows']} adapters, "
              f"{s['prompt']}-token prompts, {s['new']} new tokens, greedy", "",
              "| contender | time per batch | new tokens/s |", "|---|---|---|"]
    for key in ("base", "leanfit", "peft"):
        g = gen["times_s"][key]
        rate = gen["tokens_per_s"][key]
        lines.append(f"| {key} | {g['median']:.2f} s [{g['min']:.2f}-{g['max']:.2f}] | {rate:.1f} |")
    lines += ["", f"leanfit and peft generate the same text: {gen['same_text_as_peft']}. The base row is the model "
              "without adapters (transformers' `generate`).", "",
              f"## Load test: `leanfit serve` (MiniLM, 8 adapters) on loopback, {load['clients']} concurrent openai "
              f"clients for {load['duration_s']:.0f} s", "",
              "| requests | errors | requests/s | p50 latency | p99 latency |", "|---|---|---|---|---|",
              f"| {load['requests']} | {load['errors']} | {load['requests_per_s']:.1f} | "
              f"{(load['p50_s'] or 0) * 1e3:.0f} ms | {(load['p99_s'] or 0) * 1e3:.0f} ms |", "",
              "Each request embeds 1-4 texts of 4-24 words for one of the 8 adapters or the base model, chosen at "
              "random; client and server share the machine's cores.", ""]
    if len(set(r.get("measured", {}).values())) > 1:  # parts re-measured on their own (--parts)
        lines += ["## When each part was measured", "",
                  *[f"- {part}: {when}" for part, when in sorted(r["measured"].items())], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (a smoke test); writes to a temp folder")
    parser.add_argument("--out", help="output folder (default docs/benchmarks; --quick: a temporary folder)")
    parser.add_argument("--parts", default="forward,generation,load",
                        help="comma-separated parts to measure; the others are kept from the existing JSON")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= {"forward", "generation", "load"} or not parts:
        parser.error(f"--parts takes forward, generation and/or load, got {args.parts!r}")
    torch.set_num_threads(2)
    settings = QUICK if args.quick else FULL
    import peft

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else (Path(tmp) / "out" if args.quick else ROOT / "docs" / "benchmarks")
        kept = out / "serve_mixed.json"
        result = json.loads(kept.read_text()) if parts != {"forward", "generation", "load"} and kept.exists() else {}
        if parts != {"forward", "generation", "load"} and result.get("settings") != json.loads(json.dumps(settings)):
            parser.error(f"--parts needs an existing {kept} measured with the same settings")
        result.update({"quick": args.quick, "settings": settings, "environment": environment(), "peft": peft.__version__})
        result.setdefault("measured", {part: "an earlier full run" for part in ("forward", "generation", "load")})
        if "forward" in parts:
            print("forward ...", flush=True)
            result["forward"] = forward_bench(settings)
            print(json.dumps(result["forward"]["ratio_to_base"], indent=1), flush=True)
        if "generation" in parts:
            print("generation ...", flush=True)
            result["generation"] = generation_bench(settings)
            print(json.dumps(result["generation"]["tokens_per_s"], indent=1), flush=True)
        if "load" in parts:
            print("load test ...", flush=True)
            result["load"] = load_test(settings, Path(tmp))
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        for part in parts:  # when, and by which leanfit, each part was measured
            result["measured"][part] = f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, leanfit {commit}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "serve_mixed.json").write_text(json.dumps(result, indent=2, default=str))
        (out / "serve_mixed.md").write_text(render(result))
        print((out / "serve_mixed.md").read_text())
        if args.quick and not args.out:
            print("(--quick: results not kept; pass --out DIR to keep them)")


if __name__ == "__main__":
    main()
