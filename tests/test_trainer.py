"""Trainer behaviour on tiny models: learning, schedules, evaluation, checkpoints, resume, divergence."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import TinyCausalLM, TinyClassifier, causal_lm_data, classification_data, trainable_state  # noqa: E402
from _train_script import KILL_RUN, build  # noqa: E402

from leanfit.errors import ConfigError, TrainingError  # noqa: E402
from leanfit.io import atomic_save, atomic_write_bytes  # noqa: E402
from leanfit.train import FitResult, TrainConfig, Trainer  # noqa: E402
from leanfit.train.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from leanfit.train.schedule import lr_multiplier, make_scheduler  # noqa: E402

FAST = dict(batch_size=8, lr=1e-2, progress=False)
SCRIPT = Path(__file__).parent / "_train_script.py"


def classifier(**kw) -> TinyClassifier:
    torch.manual_seed(1234)
    return TinyClassifier(**kw)


def equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- schedules -------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule, expected", [
    ("linear", {0: 0.0, 1: 0.5, 2: 1.0, 6: 0.5, 9: 0.125, 10: 0.0}),
    ("cosine", {0: 0.0, 1: 0.5, 2: 1.0, 4: 0.5 * (1 + math.cos(math.pi / 4)), 6: 0.5, 10: 0.0}),
    ("constant", {0: 0.0, 1: 0.5, 2: 1.0, 10: 1.0}),
])
def test_schedule_warms_up_then_decays(schedule, expected):
    f = lr_multiplier(schedule, total_steps=10, warmup_steps=2)
    for step, value in expected.items():
        assert f(step) == pytest.approx(value)


def test_scheduler_is_a_lambda_lr_over_the_optimizer():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = make_scheduler(opt, "linear", total_steps=10, warmup_ratio=0.2)  # ceil(2.0) = 2 warmup steps
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 1.0, 2.0, 1.75])


# -- configuration ---------------------------------------------------------------------------------

def test_unknown_option_names_the_valid_ones():
    with pytest.raises(ConfigError, match="lerning_rate.*valid options are.*batch_size"):
        Trainer(classifier(), classification_data(), lerning_rate=1.0)


@pytest.mark.parametrize("bad", [dict(schedule="step"), dict(epochs=0), dict(resume=True), dict(grad_accum=0)])
def test_invalid_values_are_config_errors(bad):
    with pytest.raises(ConfigError):
        TrainConfig(**bad)


def test_overrides_apply_on_top_of_a_config():
    trainer = Trainer(classifier(), classification_data(), TrainConfig(epochs=7, lr=0.1), lr=0.2)
    assert (trainer.config.epochs, trainer.config.lr) == (7, 0.2)


# -- learning and evaluation -----------------------------------------------------------------------

def test_fit_learns_classification_and_evaluate_restores_train_mode():
    model, data = classifier(), classification_data()
    trainer = Trainer(model, data, epochs=15, **FAST)
    before = trainer.evaluate()
    result = trainer.fit()
    after = trainer.evaluate("test")
    assert isinstance(result, FitResult) and set(after) == {"accuracy", "loss"}
    assert after["accuracy"] >= 0.8 > before["accuracy"] and after["loss"] < before["loss"]
    assert model.training
    assert result.steps == 15 * 6 and result.epochs_run == 15 and not result.stopped_early
    assert result.final == result.history[-1]["values"] and result.best["accuracy"] >= result.final["accuracy"]


def test_causal_lm_loss_is_token_weighted_and_perplexity_its_exp():
    torch.manual_seed(0)
    model, data = TinyCausalLM(), causal_lm_data()
    metrics = Trainer(model, data, eval_batch_size=3, progress=False).evaluate("test")
    model.eval()
    with torch.no_grad():
        logits = model(**data.test).logits
    labels = data.test["labels"]
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
    assert metrics["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    result = Trainer(model, data, epochs=10, **FAST).fit()
    assert result.final["loss"] < metrics["loss"] and set(result.best) == {"loss", "perplexity"}


def test_only_trainable_parameters_change_and_are_checkpointed(tmp_path):
    model = classifier()
    model.embed.weight.requires_grad_(False)
    frozen = model.embed.weight.detach().clone()
    Trainer(model, classification_data(), epochs=2, checkpoint_dir=tmp_path, **FAST).fit()
    assert torch.equal(model.embed.weight, frozen)
    weights, best, state = load_checkpoint(latest_checkpoint(tmp_path))
    assert set(weights) == {"head.weight", "head.bias"} and best == {}
    assert torch.equal(weights["head.weight"], model.head.weight.detach())
    assert state["loop"]["step"] == 12 and state["loop"]["epoch"] == 2


def test_evaluate_needs_no_trainable_parameters_and_fit_takes_those_of_its_start():
    model = classifier()
    model.requires_grad_(False)
    trainer = Trainer(model, classification_data(), epochs=1, **FAST)
    assert set(trainer.evaluate("validation")) == {"accuracy", "loss"}
    with pytest.raises(ConfigError, match="requires grad"):
        trainer.fit()
    model.head.requires_grad_(True)  # e.g. an adapter added after the Trainer was made
    frozen = model.embed.weight.detach().clone()
    assert trainer.fit().steps == 6 and [n for n, _ in trainer.trainable] == ["head.weight", "head.bias"]
    assert torch.equal(model.embed.weight, frozen)


def test_same_seed_same_weights_other_seed_other_weights():
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        model = classifier()
        Trainer(model, classification_data(), epochs=2, seed=seed, **FAST).fit()
        runs[name] = trainable_state(model)
    assert equal_states(runs["a"], runs["b"]) and not equal_states(runs["a"], runs["c"])


def test_max_steps_and_grad_accum_count_optimizer_steps():
    result = Trainer(classifier(), classification_data(), epochs=4, max_steps=5, **FAST).fit()
    assert result.steps == 5 and result.epochs_run == 1 and result.final is not None
    result = Trainer(classifier(), classification_data(), epochs=2, grad_accum=4, **FAST).fit()
    assert result.steps == 2 * 2  # 6 micro-batches per epoch -> groups of 4 and 2


def test_early_stopping_stops_and_restores_the_best_weights():
    data = classification_data(flip_validation=True)  # learning the task makes validation worse
    trainer = Trainer(classifier(), data, epochs=20, early_stopping_patience=2, **FAST)
    result = trainer.fit()
    assert result.stopped_early and result.epochs_run < 20
    assert trainer.evaluate("validation") == pytest.approx(result.best)
    assert result.final["accuracy"] < result.best["accuracy"]


def test_metrics_file_has_one_json_record_per_log_and_eval(tmp_path):
    path = tmp_path / "m" / "metrics.jsonl"
    Trainer(classifier(), classification_data(), epochs=2, log_every=4, metrics_path=str(path), **FAST).fit()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(set(r) == {"step", "epoch", "kind", "values"} for r in records)
    assert [r["step"] for r in records if r["kind"] == "train"] == [4, 8, 12]
    assert [(r["step"], r["epoch"]) for r in records if r["kind"] == "validation"] == [(6, 1), (12, 2)]
    assert set(records[0]["values"]) == {"loss", "lr"}


def test_progress_bar_is_silent_when_not_a_terminal(capfd):
    Trainer(classifier(), classification_data(), epochs=1, batch_size=8, progress=True).fit()
    assert capfd.readouterr() == ("", "")


# -- checkpoints and resume ------------------------------------------------------------------------

def test_keeps_the_last_two_checkpoints_and_points_latest_at_the_newest(tmp_path):
    Trainer(classifier(), classification_data(), epochs=2, checkpoint_every=1, checkpoint_dir=tmp_path, **FAST).fit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000011", "step-00000012"]
    assert latest_checkpoint(tmp_path).name == "step-00000012"


class Crash(Exception):
    pass


def crash_at(step):
    def on_step(trainer, s):
        if s == step:
            raise Crash
    return on_step


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_mid_epoch_is_bit_identical(tmp_path, accum):
    run = dict(epochs=3, checkpoint_every=2, grad_accum=accum, log_every=1, **FAST)
    model = classifier()
    ref = Trainer(model, classification_data(), metrics_path=tmp_path / "ref.jsonl", **run).fit()
    reference = trainable_state(model)

    crash_step = 5 if accum == 1 else 4  # 4 is mid-epoch (3 steps an epoch) with accum=2
    with pytest.raises(Crash):
        Trainer(classifier(), classification_data(), checkpoint_dir=tmp_path / "ck",
                metrics_path=tmp_path / "m.jsonl", on_step=crash_at(crash_step), **run).fit()
    assert latest_checkpoint(tmp_path / "ck").name == f"step-{crash_step - 1 if accum == 1 else 4:08d}"
    model = classifier()
    result = Trainer(model, classification_data(), checkpoint_dir=tmp_path / "ck", resume=True,
                     metrics_path=tmp_path / "m.jsonl", **run).fit()
    assert equal_states(trainable_state(model), reference)
    assert result.history == ref.history
    assert (tmp_path / "m.jsonl").read_text() == (tmp_path / "ref.jsonl").read_text()


def test_resume_refuses_another_batch_size(tmp_path):
    Trainer(classifier(), classification_data(), epochs=1, checkpoint_dir=tmp_path, **FAST).fit()
    with pytest.raises(ConfigError, match="batch_size=8"):
        Trainer(classifier(), classification_data(), epochs=2, checkpoint_dir=tmp_path, resume=True,
                progress=False, batch_size=4).fit()


def test_resume_refuses_parameters_of_another_shape(tmp_path):
    Trainer(classifier(), classification_data(), epochs=1, checkpoint_dir=tmp_path, **FAST).fit()
    with pytest.raises(ConfigError, match=r"of shape \(24, 16\) but the model.s is \(24, 32\)"):
        Trainer(classifier(dim=32), classification_data(), epochs=2, checkpoint_dir=tmp_path, resume=True,
                **FAST).fit()


def test_resume_refuses_other_training_rows(tmp_path):
    Trainer(classifier(), classification_data(), epochs=1, checkpoint_dir=tmp_path, **FAST).fit()
    with pytest.raises(ConfigError, match="other rows"):
        Trainer(classifier(), classification_data(seed=1), epochs=2, checkpoint_dir=tmp_path, resume=True,
                **FAST).fit()
    Trainer(classifier(), classification_data(), epochs=2, checkpoint_dir=tmp_path, resume=True, **FAST).fit()


def test_sigkilled_run_resumes_to_bit_identical_weights(tmp_path):
    model, data = build()
    Trainer(model, data, **KILL_RUN).fit()
    reference = trainable_state(model)

    ck, out = tmp_path / "ck", tmp_path / "final.safetensors"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1] / "src"),
                                                                     os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(ck), str(out), "--sleep", "0.2"], env=env)
    deadline = time.monotonic() + 30
    while latest_checkpoint(ck) is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(latest_checkpoint(ck).name.split("-")[1])
    assert 0 < killed_at < 18 and not out.exists()

    done = subprocess.run([sys.executable, str(SCRIPT), str(ck), str(out), "--resume"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "steps=18" in done.stdout
    assert equal_states(load_file(str(out)), reference)


# -- divergence ------------------------------------------------------------------------------------

def test_nan_loss_stops_naming_the_step_and_last_good_checkpoint(tmp_path):
    model = classifier(nan_after=8)  # the 8th training forward is step 8
    trainer = Trainer(model, classification_data(), epochs=3, checkpoint_every=3, checkpoint_dir=tmp_path, **FAST)
    with pytest.raises(TrainingError, match=r"loss is nan at step 8 .*step-00000006"):
        trainer.fit()
    assert latest_checkpoint(tmp_path).name == "step-00000006"
    assert not any("00000008" in p.name for p in tmp_path.iterdir())


def test_nan_loss_without_checkpoints_says_so():
    with pytest.raises(TrainingError, match="at step 2 .*no checkpoint was written"):
        Trainer(classifier(nan_after=2), classification_data(), **FAST).fit()


# -- atomic files ----------------------------------------------------------------------------------

def test_atomic_writes_make_files_as_open_would(tmp_path):
    import os
    from leanfit.io import UMASK, atomic_write_bytes
    atomic_write_bytes(tmp_path / "report.json", b"{}")
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o666 & ~UMASK  # not mkstemp's 0600
    with open(tmp_path / "plain", "wb"):
        pass
    assert (tmp_path / "plain").stat().st_mode & 0o777 == (tmp_path / "report.json").stat().st_mode & 0o777
    assert os.umask(UMASK) == UMASK  # and the umask is left as it was


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "adapter.bin"
    atomic_write_bytes(target, b"old")

    def failing(tmp):
        Path(tmp).write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_save(target, failing)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["adapter.bin"]
    atomic_save(target, lambda tmp: Path(tmp).write_bytes(b"new"))
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["adapter.bin"]


def test_options_and_data_of_the_wrong_kind_get_one_sentence():
    with pytest.raises(ConfigError, match="Training option lr is of the wrong kind: it must be a number, got 'x'"):
        Trainer(classifier(), classification_data(), lr="x")
    with pytest.raises(ConfigError, match="Training option epochs .* whole number, got 2.5"):
        TrainConfig(epochs=2.5)
    with pytest.raises(ConfigError, match="Trainer takes the encoded splits"):
        Trainer(classifier(), {"train": {}})
    TrainConfig(lr=1, checkpoint_dir=Path("ck"))  # an int for a number, a Path for a folder: fine


def test_training_a_merged_adapter_is_refused():
    import leanfit as lf
    model = classifier()
    lf.adapt(model, lf.LoRA(rank=2), targets=["embed"], train_modules=[])
    lf.merge(model, "default")
    with pytest.raises(ConfigError, match="'default' is merged into the base weights"):
        Trainer(model, classification_data(), epochs=1, **FAST).fit()


# -- found by a black-box review of the Python API ---------------------------------------------------

def test_grad_accum_weighs_a_short_last_micro_batch_by_its_rows():
    # 30 rows: batch 4 x 2 ends an epoch on micro-batches of 4 and 2, which must count as 6 rows, not 2 x 3
    data = classification_data(n_train=30)
    run = dict(epochs=1, lr=1e-2, progress=False, max_grad_norm=None, warmup_ratio=0.0, schedule="constant")
    one, two = classifier(dropout=0.0), classifier(dropout=0.0)
    Trainer(one, data, batch_size=8, **run).fit()
    Trainer(two, data, batch_size=4, grad_accum=2, **run).fit()
    for (name, a), b in zip(one.named_parameters(), two.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_a_resume_takes_this_runs_lr_and_weight_decay(tmp_path):
    run = dict(epochs=2, checkpoint_every=2, checkpoint_dir=tmp_path, schedule="constant", warmup_ratio=0.0, **FAST)
    with pytest.raises(Crash):
        Trainer(classifier(), classification_data(), on_step=crash_at(3), **run).fit()
    seen = []
    resumed = Trainer(classifier(), classification_data(), **{**run, "lr": 1e-4, "weight_decay": 0.5},
                      resume=True, on_step=lambda t, s: seen.append(t.optimizer.param_groups[0]["lr"]))
    resumed.fit()  # the advice after a divergence: lower lr and resume
    assert seen and all(lr == pytest.approx(1e-4) for lr in seen)
    assert resumed.optimizer.param_groups[0]["weight_decay"] == 0.5


def test_early_stopping_at_equal_accuracy_keeps_the_lower_loss(tmp_path):
    trainer = Trainer(classifier(), classification_data(), early_stopping_patience=1, **FAST)
    trainer._prepare()
    trainer.evaluate = lambda split: {"accuracy": 0.5, "loss": 1.6}
    trainer._validate()
    trainer.evaluate = lambda split: {"accuracy": 0.5, "loss": 0.8}
    assert trainer._validate()  # a plateau of accuracy while the loss falls is an improvement
    assert trainer.state.best == {"accuracy": 0.5, "loss": 0.8}


def test_a_fresh_run_never_writes_over_an_earlier_runs_checkpoints_or_metrics(tmp_path):
    metrics = tmp_path / "m.jsonl"
    Trainer(classifier(), classification_data(), epochs=1, checkpoint_dir=tmp_path / "ck", metrics_path=metrics,
            **FAST).fit()
    kept = (sorted(p.name for p in (tmp_path / "ck").iterdir()), metrics.read_text())
    with pytest.raises(ConfigError, match="holds an earlier run's checkpoints .*pass resume=True"):
        Trainer(classifier(), classification_data(), epochs=2, checkpoint_dir=tmp_path / "ck", **FAST).fit()
    with pytest.raises(ConfigError, match="metrics_path .* holds an earlier run's metrics"):
        Trainer(classifier(), classification_data(), epochs=2, metrics_path=metrics, **FAST).fit()
    with pytest.raises(ConfigError, match=r"fresh run \(resume found no checkpoint in"):  # a mistyped folder
        Trainer(classifier(), classification_data(), epochs=2, checkpoint_dir=tmp_path / "typo", resume=True,
                metrics_path=metrics, **FAST).fit()
    assert (sorted(p.name for p in (tmp_path / "ck").iterdir()), metrics.read_text()) == kept
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="checkpoint_dir .* is a file"):  # before an epoch, not at its end
        Trainer(classifier(), classification_data(), checkpoint_dir=tmp_path / "file", **FAST).fit()


def test_a_resume_onto_another_base_is_refused(tmp_path):
    def frozen_embedding(shift=0.0):  # the base: a frozen embedding; the head trains
        model = classifier()
        with torch.no_grad():
            model.embed.weight.add_(shift)
        model.embed.weight.requires_grad_(False)
        return model

    run = dict(epochs=2, checkpoint_every=2, checkpoint_dir=tmp_path, **FAST)
    with pytest.raises(Crash):
        Trainer(frozen_embedding(), classification_data(), on_step=crash_at(3), **run).fit()
    with pytest.raises(ConfigError, match="another base model"):  # same shapes, other weights
        Trainer(frozen_embedding(0.1), classification_data(), resume=True, **run).fit()
    Trainer(frozen_embedding(), classification_data(), resume=True, **run).fit()  # its own base resumes


def test_on_step_at_an_epoch_end_comes_after_its_checkpoint(tmp_path):
    seen = {}
    Trainer(classifier(), classification_data(), epochs=1, checkpoint_dir=tmp_path,
            on_step=lambda t, s: seen.setdefault(s, t.last_checkpoint), **FAST).fit()
    last = max(seen)
    assert seen[last] is not None and seen[last].name.endswith(str(last))
