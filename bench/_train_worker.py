"""One training run for bench/train_speed.py, in its own process so its peak RSS is its own.

    python bench/_train_worker.py CONTENDER TASK OUT.json [POLICY-JSON]
CONTENDER: peft (Hugging Face PEFT LoRA, a plain PyTorch loop as in shared/anchors/peft_bbc_news.py;
           POLICY {"precision": "bf16"}: its forwards under torch.autocast bfloat16, as HF Trainer's bf16=True)
           | leanfit (leanfit tune's default policy) | leanfit-all (leanfit, LoRA on every layer, no policy)
TASK: bbc (MiniLM, bbc-news) | austen (SmolLM2-135M, Austen subset)
Both contenders get the same tokenised rows (leanfit's split), model, batch, length, epochs and seed
(POLICY's "seed", 0 by default: the split, the adapter's initialisation and the data order).
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch

import leanfit as lf
from leanfit.data import encode
from leanfit.memory import peak_rss_bytes
from leanfit.train import Trainer

TASKS = {
    "bbc": dict(model="minilm", data="bbc-news", max_length=128, batch_size=32, epochs=3,
                peft_targets=["query", "key", "value", "dense"], task_type="SEQ_CLS"),
    "austen": dict(model="smollm2-135m", data="austen", max_length=128, batch_size=8, epochs=2,
                   train_rows=192, eval_rows=96, validate=False,
                   peft_targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                   task_type="CAUSAL_LM"),
}


def load(task: dict, seed: int):
    dataset = lf.zoo.dataset(task["data"], seed=seed)
    labels = len(dataset.labels) if dataset.labels else None
    model, tokenizer = lf.zoo.model(task["model"], task=dataset.task, num_labels=labels, seed=seed)
    return dataset, model, tokenizer


def subset(data, task):
    if task.get("train_rows"):
        data.train = {k: v[: task["train_rows"]] for k, v in data.train.items()}
    if task.get("eval_rows"):
        data.validation = {k: v[: task["eval_rows"]] for k, v in data.validation.items()}
        data.test = {k: v[: task["eval_rows"]] for k, v in data.test.items()}
    if not task.get("validate", True):  # time training alone: peft's loop validates nothing either
        data.validation = {k: v[:0] for k, v in data.validation.items()}
    return data


def run_peft(task, dataset, model, tokenizer, policy: dict) -> dict:
    from peft import LoraConfig, get_peft_model
    low = policy.get("precision") == "bf16"
    started = time.perf_counter()
    data = subset(encode(dataset, tokenizer, max_length=task["max_length"]), task)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=task["peft_targets"],
                                             task_type=task["task_type"]))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-4)
    x = data.train
    n, epochs = len(x["input_ids"]), []
    for epoch in range(task["epochs"]):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(policy.get("seed", 0) * 1000 + epoch))
        for i in range(0, n, task["batch_size"]):
            idx = order[i: i + task["batch_size"]]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):  # as HF Trainer's bf16=True
                loss = model(**{k: v[idx] for k, v in x.items()}).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        epochs.append(time.perf_counter() - t0)
    train_s = time.perf_counter() - started
    train_rss = peak_rss_mb()
    test = Trainer(model, data, progress=False).evaluate("test")
    trainable = sum(p.numel() for p in params)
    return {"train_s": train_s, "epoch_s": epochs, "test": test, "trainable": trainable,
            "tokens": n * task["max_length"] * task["epochs"], "train_peak_rss_mb": train_rss}


def run_leanfit(task, dataset, model, tokenizer, policy: dict) -> dict:
    started = time.perf_counter()
    data = subset(encode(dataset, tokenizer, max_length=task["max_length"]), task)
    from leanfit.train.layers import below_top_k
    exclude = below_top_k(model, policy["train_layers"]) if policy.get("train_layers") else None
    lf.adapt(model, lf.LoRA(rank=8, alpha=16), targets="all-linear", exclude=exclude)
    epochs = []
    last = [time.perf_counter()]

    def on_step(trainer, step):
        if step % trainer.batches_per_epoch == 0:
            epochs.append(time.perf_counter() - last[0])
            last[0] = time.perf_counter()

    trainer = Trainer(model, data, epochs=task["epochs"], batch_size=task["batch_size"], lr=policy["lr"] or 5e-4,
                      schedule=policy.get("schedule", "linear"), prefix=policy.get("prefix", "off"),
                      block_dropout=policy.get("block_dropout", False),  # as leanfit tune
                      precision=policy.get("precision", "fp32"), seed=policy.get("seed", 0),
                      progress=False, on_step=on_step)
    trainer.fit()
    train_s = time.perf_counter() - started
    train_rss = peak_rss_mb()
    test = trainer.evaluate("test")
    trainable, _ = lf.trainable_parameters(model)
    n = len(data.train["input_ids"])
    return {"train_s": train_s, "epoch_s": epochs, "test": test, "trainable": trainable,
            "tokens": n * task["max_length"] * task["epochs"], "policy": trainer.policy.info,
            "train_peak_rss_mb": train_rss}


def peak_rss_mb() -> float:
    """The process's peak resident set so far (the whole run's is read again after the test evaluation)."""
    return peak_rss_bytes() / 2 ** 20  # VmHWM: ru_maxrss would be floored at the parent's peak at the fork


def main() -> None:
    contender, task_name, out = sys.argv[1], sys.argv[2], sys.argv[3]
    policy = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    torch.set_num_threads(torch.get_num_threads())
    seed = policy.get("seed", 0)
    torch.manual_seed(seed)
    task = TASKS[task_name]
    dataset, model, tokenizer = load(task, seed)
    torch.manual_seed(seed)
    if contender == "peft":
        result = run_peft(task, dataset, model, tokenizer, policy)
    else:
        result = run_leanfit(task, dataset, model, tokenizer, policy)
    result.update(contender=contender, task=task_name, threads=torch.get_num_threads(),
                  peak_rss_mb=peak_rss_mb())
    if "perplexity" in result["test"] and not math.isfinite(result["test"]["perplexity"]):
        result["test"]["perplexity"] = None
    with open(out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
