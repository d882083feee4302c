"""`leanfit search` on a tiny random BERT and a two-topic CSV: budget parsing and its errors, the space,
the Pareto helpers, a whole search (front, plot, report, best config inside the budget), resuming the
same study, two worker processes on one SQLite study, and retraining the best configuration."""

import csv
import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from leanfit.budget.budget import check_reachable, parse_budget
from leanfit.budget.cost import CostEstimate
from leanfit.budget.pareto import hypervolume_2d, nondominated_ranks, promotion_order
from leanfit.budget.space import SearchSpace, method_rank_options
from leanfit.cli import main
from leanfit.errors import ConfigError
from leanfit.tune import TuneConfig

WORDS = {"sport": "match goal team win score league coach", "money": "bank market shares profit price trade loan"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-block random BERT with a word-level tokenizer, 120 labelled rows, and a calibration cache
    shared by the tests of this module (and their subprocesses)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast
    root = tmp_path_factory.mktemp("search")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *sorted({w for t in WORDS.values() for w in t.split()}),
             *(str(i) for i in range(40))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(root / "model")
    torch.manual_seed(0)  # the same random model in every session: trial scores repeat
    BertForSequenceClassification(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=3,
                                             num_attention_heads=2, intermediate_size=32,
                                             max_position_embeddings=64)).save_pretrained(root / "model")
    with open(root / "data.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(60):
            for topic, words in WORDS.items():
                writer.writerow([f"{' '.join(words.split()[i % 3:i % 3 + 4])} {i % 40}", topic])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 16-wide model gains nothing from threads, and loses much on a busy machine
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEANFIT_CACHE", str(root / "cache"))
        mp.setenv("OMP_NUM_THREADS", "1")  # the same in the worker processes
        yield root
    torch.set_num_threads(threads)


def search_args(tiny, output, trials=6, budget="params=4%", *extra):
    return ["search", "--model", tiny / "model", "--data", tiny / "data.csv", "--budget", budget,
            "--trials", trials, "--epochs", 2, "--max-length", 12, "--batch-size", 8, "--methods", "lora,ia3,bitfit",
            "--train-layers", "1,all", "--ranks", "2,4", "--lr-range", "1e-3:1e-1", "--max-train-rows", 48,
            "--search-epochs", 2, "--finalists", 1, "--no-progress", "--output", output, *extra]


def run_cli(args) -> int:
    return main([str(a) for a in args])


def one_sentence(capsys, args, *fragments):
    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("leanfit: ") and "\n" not in err and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def trials_of(output, name="search"):
    import optuna
    return optuna.load_study(study_name=name, storage=f"sqlite:///{output / 'study.db'}").trials


# --- budgets ------------------------------------------------------------------------------------------

def test_budget_values_parse_to_the_cost_model_units():
    budget = parse_budget("params=1%,latency=+10%,memory=2GB,bytes=5MiB,time=10m")
    limits = {limit.key: limit for limit in budget.limits}
    assert limits["params"].share and limits["params"].value == pytest.approx(0.01)
    assert limits["latency"].value == pytest.approx(1.10) and limits["memory"].value == 2e9
    assert limits["bytes"].value == 5 * 2 ** 20 and limits["time"].value == 600
    count = parse_budget("params=150k").limits[0]
    assert not count.share and count.value == 150_000
    assert parse_budget("latency=1.2x").limits[0].value == pytest.approx(1.2)
    assert parse_budget("").limits == () and parse_budget(None).fits(object())


@pytest.mark.parametrize("text, fragment", [
    ("parms=1%", "Unknown budget key 'parms'; valid keys are params, bytes, memory, latency, time"),
    ("params", "is not KEY=VALUE"),
    ("memory=lots", "write e.g. memory=5MB"),
    ("params=0%", "must be above zero"),
    ("params=200%", "more than the whole model; give a share up to 100%"),
    ("params=1%,params=2%", "given twice"),
])
def test_bad_budgets_say_what_to_write(text, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("+", r"\+")):
        parse_budget(text)


def _cost(params, share, adapter_bytes, latency):
    return CostEstimate(trainable_params=params, total_params=round(params / share), adapter_bytes=adapter_bytes,
                        train_peak_bytes=10 ** 9, step_seconds=0.1, train_seconds=60.0,
                        inference_latency_ratio=latency)


def test_an_impossible_budget_names_the_smallest_cost():
    costs = [("ia3, top 1", _cost(100, 0.001, 1000, 1.05)), ("lora r=2, top 1", _cost(1000, 0.01, 5000, 1.01))]
    check_reachable(parse_budget("params=1%"), costs)  # fits: nothing raised
    with pytest.raises(ConfigError, match=r"params=0.05% is below the smallest .*ia3, top 1: params=0.100%.*at least 0.100%"):
        check_reachable(parse_budget("params=0.05%"), costs)
    with pytest.raises(ConfigError, match=r"bytes=900 .*ia3, top 1: bytes=1.00 kB"):
        check_reachable(parse_budget("bytes=900"), costs)
    # each limit alone can be met, both together cannot
    with pytest.raises(ConfigError, match=r"No single configuration .*params=0.100% \(ia3, top 1\), latency=\+1.0% "
                                          r"\(lora r=2, top 1\)\); relax"):
        check_reachable(parse_budget("params=0.5%,latency=+2%"), costs)


# --- space and Pareto helpers ----------------------------------------------------------------------------

def test_space_points_become_tune_configs():
    space = SearchSpace(methods=("lora", "ia3", "bottleneck"), train_layers=(1, "all"), ranks=(2, 8))
    assert space.learning_rates() == [1e-4, 3.16e-4, 1e-3, 3.16e-3, 1e-2]
    assert len(space.points()) == 2 * 2 * (2 + 1 + 2) and space.size() == 20 * 5
    base = TuneConfig(model="m", data="d", epochs=3)
    lora = space.config({"method": "lora", "train_layers": 1, "targets": "attention", "rank": 2, "log10_lr": -3.0}, base)
    assert lora.options == {"rank": 2, "alpha": 4.0} and lora.lr == 1e-3 and lora.train_layers == 1
    assert lora.targets == r"(?:.*\.)?(?:attention|self_attn|attn)\..*" and lora.epochs == 3 and lora.model == "m"
    assert TuneConfig.from_dict(asdict(lora)) == lora
    assert method_rank_options("bottleneck", 8) == {"size": 8} and method_rank_options("ia3", 8) == {}
    with pytest.raises(ConfigError, match="Unknown method 'lorax'"):
        SearchSpace(methods=("lorax",))
    with pytest.raises(ConfigError, match="Unknown target set 'mlp'"):
        SearchSpace(targets=("mlp",))


def test_pareto_ranks_promotion_and_hypervolume():
    points = [(1, 3), (2, 2), (3, 1), (2.5, 2.5), (3, 3)]
    assert nondominated_ranks(points) == [0, 0, 0, 1, 2]
    assert hypervolume_2d(points, (4, 4)) == pytest.approx(6.0)
    assert hypervolume_2d([(5, 1)], (4, 4)) == 0.0
    # (-accuracy, params): the front first, the most accurate first inside it
    assert promotion_order([(-0.9, 5), (-0.8, 1), (-0.95, 10), (-0.7, 6)]) == [2, 0, 1, 3]


# --- whole searches ------------------------------------------------------------------------------------------

def test_search_writes_front_report_and_a_best_config_inside_the_budget(tiny, tmp_path, capsys):
    out = tmp_path / "search"
    assert run_cli(search_args(tiny, out)) == 0
    assert "best inside the budget" in capsys.readouterr().out
    result = json.loads((out / "search.json").read_text())
    # --trials counts configurations trained: proposals over the budget or repeated come on top
    counts = result["counts"]
    assert counts["trained"] + counts["failed"] == 6
    assert counts["trials"] == 6 + counts["over budget"] + counts["duplicate"] + counts["cannot build"]
    assert counts["exact_params_matched"]
    rows = list(csv.DictReader(open(out / "front.csv")))
    assert rows and all(r["feasible"] == "True" and float(r["trainable_share_pct"]) <= 4.0 for r in rows)
    for row in csv.DictReader(open(out / "trials.csv")):
        folder = out / "trials" / f"r{row['rung']}-{int(row['trial']):04d}"
        assert folder.exists() == (row["status"] == "trained")  # over budget: priced, never trained
        if folder.exists():  # chosen on validation: the test split is never read
            assert json.loads((folder / "report.json").read_text())["test"] is None
    assert (out / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Pareto front" in (out / "report.md").read_text()
    # TPE compares configurations at the top rate; the full run's best then steps down the rate grid
    # (1e-1, 10^-1.5, 1e-2 ...) while each step beats the best so far
    assert {r["params"]["log10_lr"] for r in result["rungs"][0]["trials"] if r["params"]} == {-1.0}
    final, rates = result["rungs"][1], result["rungs"][2]
    assert rates["fidelity"] == final["fidelity"] + ", lower rates"
    champion = max(final["trials"], key=lambda r: r["score"])
    assert [r["params"] for r in rates["trials"]] == [
        {**champion["params"], "log10_lr": -1.0 - 0.5 * (i + 1)} for i in range(len(rates["trials"]))]
    scores = [champion["score"]] + [r["score"] for r in rates["trials"]]
    assert all(b > a for a, b in zip(scores[:-2], scores[1:-1]))  # each step but the last improved
    assert scores[-1] <= max(scores[:-1]) or len(rates["trials"]) == 4  # the last did not, or the grid ended
    best = result["best"]
    assert best["score"] == max(scores) and best["rung"] in (1, 2)
    assert best["feasible"] and best["cost"]["trainable_share"] <= 0.04
    config = json.loads((out / "best.json").read_text())
    assert TuneConfig.from_dict(config).max_train_rows is None and config["epochs"] == 2  # the full run
    assert config["lr"] == pytest.approx(10 ** best["params"]["log10_lr"], rel=1e-2)  # 3 significant digits

    # resume: the same study goes on to 7 trained configurations (of the 7 inside the budget at the top
    # rate); the first trials are not run again
    first = {t.number: t.datetime_start for t in trials_of(out)}
    assert run_cli(search_args(tiny, out, 7)) == 0
    again = trials_of(out)
    assert sum(t.user_attrs.get("status") in ("trained", "failed") for t in again) == 7
    assert all(again[n].datetime_start == started for n, started in first.items())
    one_sentence(capsys, search_args(tiny, out, 7, "params=3%"), "was started with another budget", "--study-name")
    trials = sorted(p.name for p in (out / "trials").iterdir())
    one_sentence(capsys, [*search_args(tiny, out, 7, "params=3%"), "--study-name", "other"],  # its trials, r0-0000 ...
                 "holds the search study 'search', whose trials and report study 'other' would replace")
    assert sorted(p.name for p in (out / "trials").iterdir()) == trials

    # the saved best configuration retrains through `leanfit tune --config`
    assert run_cli(["tune", "--config", out / "best.json", "--output", tmp_path / "retrain", "--no-progress"]) == 0
    report = json.loads((tmp_path / "retrain" / "report.json").read_text())
    assert report["method"] == best["params"]["method"]
    assert report["trainable_params"] == best["cost"]["trainable_params"]


def test_space_lists_count_each_item_once_and_refuse_an_empty_one(tiny, tmp_path, capsys):
    from leanfit.budget.search_cli import settings_from_args
    from leanfit.cli import _parser

    def space(*extra):
        return settings_from_args(_parser().parse_args([str(a) for a in search_args(tiny, tmp_path, 2, "params=4%", *extra)])).space

    once = space().size()
    assert space("--methods", "lora,ia3,bitfit,lora", "--ranks", "2,4,4", "--train-layers", "1,all,1").size() == once
    for option in ("--methods", "--ranks", "--targets", "--train-layers"):  # '' ran the default space
        one_sentence(capsys, search_args(tiny, tmp_path, 2, "params=4%", option, ""), f"{option} lists nothing")


def test_impossible_budget_and_unknown_key_from_the_command_line(tiny, tmp_path, capsys):
    one_sentence(capsys, search_args(tiny, tmp_path, 2, "parms=1%"), "valid keys are params, bytes")
    one_sentence(capsys, search_args(tiny, tmp_path, 2, "params=0.01%"), "below the smallest configuration",
                 "raise the budget to at least")
    assert not (tmp_path / "trials").exists()


def test_two_workers_share_one_sqlite_study(tiny, tmp_path):
    out = tmp_path / "shared"
    # 16 epochs: a trial takes longer than choosing the next step, so the workers' steps overlap
    args = [str(a) for a in search_args(tiny, out, 8, "params=10%", "--finalists", "0", "--search-epochs", "16")]
    workers = [subprocess.Popen([sys.executable, "-m", "leanfit.cli", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=os.environ.copy()) for _ in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err
    trials = [t for t in trials_of(out) if t.state.name in ("COMPLETE", "PRUNED")]
    trained = [t for t in trials if t.user_attrs.get("status") == "trained"]
    assert len(trained) >= 8
    assert len({json.dumps(t.params, sort_keys=True) for t in trained}) == len(trained)  # none trained twice
    # both processes ran trials of the one study (a trial pruned as "unused", its queued point taken by the
    # other worker, ran nothing and names no worker)
    assert len({t.user_attrs["worker"] for t in trained}) == 2
    assert len({t.number for t in trials}) == len(trials)
    # after the design both workers take the model's steps, each passing over what the other is
    # training, instead of one waiting for the other
    steps = [t for t in trained if t.user_attrs.get("proposed_by") == "model"]
    assert len(steps) >= 4 and len({t.user_attrs["worker"] for t in steps}) == 2
    assert any(a.user_attrs["worker"] != b.user_attrs["worker"] and a.datetime_start < b.datetime_complete
               and b.datetime_start < a.datetime_complete for a in steps for b in steps)  # at the same time


def test_a_space_smaller_than_the_trials_stops_after_a_bounded_number_of_proposals(tiny, tmp_path):
    from leanfit.budget.study import PROPOSALS_PER_TRIAL
    out = tmp_path / "small"
    args = search_args(tiny, out, 3, "params=4%", "--finalists", "0")
    args[args.index("--methods") + 1] = "bitfit"  # one point: bitfit, top 1, all-linear, one learning rate
    args[args.index("--train-layers") + 1] = "1"
    args[args.index("--lr-range") + 1] = "1e-2:1e-2"
    assert run_cli([*args, "--targets", "all-linear"]) == 0
    statuses = [t.user_attrs.get("status") for t in trials_of(out)]
    assert statuses.count("trained") == 1  # the one point, trained once
    assert len(statuses) == PROPOSALS_PER_TRIAL * 3 and set(statuses) == {"trained", "duplicate"}


def test_the_initial_design_spreads_over_the_cost_range_with_every_method():
    """Priced without training: shares grow with rank, target set and blocks; bottleneck dearest."""
    import math
    from leanfit.budget.search import Search, SearchSettings, spread_order
    space = SearchSpace(methods=("lora", "ia3", "bottleneck", "bitfit"), train_layers=(1, 2, 3, "all"),
                        ranks=(2, 4, 8, 16), lr_min=1e-4, lr_max=1e-2)
    weight = {"bitfit": 1, "ia3": 1.5, "lora": 4, "bottleneck": 8}
    settings = SearchSettings(base=TuneConfig(model="minilm", data="bbc-news"), space=space,
                              budget=parse_budget("params=1%"), trials=12)
    search = Search(settings, evaluate=None)
    for point in space.points():
        blocks = 6 if point["train_layers"] == "all" else point["train_layers"]
        share = 1e-4 * weight[point["method"]] * point.get("rank", 1) * blocks * (2 if point["targets"] == "all-linear" else 1)
        search.costs[search._cost_key(point)] = _cost(round(share * 1e7), share, 4 * round(share * 1e7), 1.0)
    feasible = [math.log(c.trainable_share) for c in search.costs.values() if c.trainable_share <= 0.01]
    design = search.initial_design()
    assert len(design) == search.design_count() == 6  # half of 12
    assert all(p["log10_lr"] == -2.0 for p in design)  # the top of the grid
    assert len({json.dumps(p, sort_keys=True) for p in design}) == len(design)
    costs = [math.log(search.costs[search._cost_key(p)].trainable_share) for p in design]
    assert costs[0] == min(feasible) and costs[1] == max(feasible)  # both ends first, inside the budget
    assert {p["method"] for p in design} == set(weight)
    step = (max(feasible) - min(feasible)) / 5
    gaps = [b - a for a, b in zip(sorted(costs), sorted(costs)[1:])]
    assert max(gaps) < 2 * step  # no stretch of the cost range left without a point
    assert spread_order(5) == [0, 4, 2, 1, 3] and sorted(spread_order(13)) == list(range(13))


def test_tpe_starts_from_its_design_and_random_search_does_not(tiny, tmp_path):
    out = tmp_path / "design"
    assert run_cli(search_args(tiny, out, 6, "params=4%", "--finalists", "0")) == 0
    trials = sorted(trials_of(out), key=lambda t: t.number)
    design = [t for t in trials if t.user_attrs.get("proposed_by") == "design"]
    assert [t.number for t in design] == list(range(len(design)))  # before any other trial
    assert len(design) == 3  # half of the 6
    assert all(t.params["log10_lr"] == -1.0 for t in design)  # the top of --lr-range 1e-3:1e-1
    rows = json.loads((out / "search.json").read_text())["rungs"][0]["trials"]
    share = {r["trial"]: r["cost"]["trainable_share"] for r in rows if r.get("cost")}
    feasible = [share[r["trial"]] for r in rows if r["feasible"]]
    assert {t.params["method"] for t in design} == {"lora", "ia3", "bitfit"}
    assert share[design[0].number] == min(feasible) and share[design[1].number] == max(feasible)

    assert all(t.params["log10_lr"] == -1.0 for t in trials if t.params)  # the model's steps too

    plain = tmp_path / "random"
    assert run_cli(search_args(tiny, plain, 3, "params=4%", "--finalists", "0", "--sampler", "random")) == 0
    drawn = trials_of(plain)
    assert not any(t.system_attrs.get("fixed_params") for t in drawn)
    assert any(t.params["log10_lr"] < -1.0 for t in drawn)  # random search draws the rate as well


def test_optunas_gp_sampler_proposes_the_trials_after_its_random_start(tiny, tmp_path):
    out = tmp_path / "gp"
    assert run_cli(search_args(tiny, out, 5, "params=4%", "--finalists", "0", "--sampler", "gp",
                               "--no-initial-design", "--startup-trials", "2")) == 0
    trials = sorted(trials_of(out), key=lambda t: t.number)
    modelled = [t for t in trials if any(k.startswith("gp:relative_params") for k in t.system_attrs)]
    assert modelled and all(t.number >= 2 for t in modelled)  # after the two random ones, Optuna's GP proposes
    assert not any(t.user_attrs.get("proposed_by") for t in trials)  # no design, no model steps of ours
    assert sum(t.user_attrs.get("status") == "trained" for t in trials) == 5
    assert all(t.params["log10_lr"] == -1.0 for t in trials if t.params)  # compared at the top rate, as TPE


def test_after_the_design_each_trial_is_the_models_likeliest_step_off_the_front(tiny, tmp_path):
    from leanfit.budget.acquire import next_step
    from leanfit.budget.search import Search
    from leanfit.budget.search_cli import settings_from_args
    from leanfit.cli import _parser
    out = tmp_path / "model"
    args = [str(a) for a in search_args(tiny, out, 6, "params=10%", "--finalists", "0")]
    assert run_cli(args) == 0
    trials = sorted(trials_of(out), key=lambda t: t.number)
    design = [t for t in trials if t.user_attrs.get("proposed_by") == "design"]
    steps = [t for t in trials if t.user_attrs.get("proposed_by") == "model"]
    # the 3 trials after the 3 of the design, each trained, none a repeat
    assert [t.number for t in design] == [0, 1, 2] and [t.number for t in steps] == [3, 4, 5]
    assert all(t.user_attrs["status"] == "trained" for t in steps)
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 6
    # each step is acquire.next_step over the trials before it, among the untried points inside the
    # budget at the top rate (priced again here, as the search priced them)
    search = Search(settings_from_args(_parser().parse_args(args)))
    search.prepare()
    feasible = [({**p, "log10_lr": -1.0}, c) for p in search.s.space.points() if (c := search._costs(p)) is not None]
    for step in steps:
        before = trials[:step.number]
        scored = [(t.params, t.values[0], search._costs(t.params)) for t in before]
        untried = [(p, c) for p, c in feasible if p not in [t.params for t in before]]
        assert step.params == next_step(scored, untried, search.s.space)


def test_a_causal_lm_search_minimises_perplexity_and_steps_the_rate_down(tiny, tmp_path):
    import shutil
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    model = tmp_path / "lm"
    shutil.copytree(tiny / "model", model)
    for name in ("config.json", "model.safetensors"):
        (model / name).unlink()
    torch.manual_seed(0)
    vocab = len(PreTrainedTokenizerFast.from_pretrained(model))
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                 num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=64)).save_pretrained(model)
    story = tmp_path / "story.txt"
    story.write_text("\n\n".join(f"{WORDS['sport']} {i % 40} {WORDS['money']}" for i in range(200)))
    out = tmp_path / "search"
    assert run_cli(["search", "--model", model, "--data", story, "--task", "causal-lm", "--budget", "params=30%",
                    "--trials", 3, "--epochs", 1, "--max-length", 12, "--batch-size", 8, "--methods", "lora,ia3",
                    "--train-layers", "1,all", "--ranks", "2", "--lr-range", "1e-2:1e-1", "--max-train-rows", 16,
                    "--search-epochs", 1, "--eta", 100, "--finalists", 1, "--no-progress", "--output", out]) == 0
    result = json.loads((out / "search.json").read_text())
    assert result["metric"] == "perplexity" and not result["maximize"]
    final, rates = result["rungs"][1], result["rungs"][2]
    champion = min(final["trials"], key=lambda r: r["score"])
    assert rates["trials"][0]["params"] == {**champion["params"], "log10_lr": -1.5}  # one step below the top
    scores = [champion["score"]] + [r["score"] for r in rates["trials"]]
    assert all(b < a for a, b in zip(scores[:-2], scores[1:-1]))  # lower perplexity at every step but the last
    assert scores[-1] >= min(scores[:-1]) or len(rates["trials"]) == 2
    assert result["best"]["score"] == min(scores)
