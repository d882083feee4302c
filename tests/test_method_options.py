"""Method options of the wrong type are refused in one sentence when the config is built, not deep
inside torch later; the values that configs get from Python, JSON manifests and the command line
still work."""

import argparse
import json

import pytest
import torch
from torch import nn

import leanfit as lf
from leanfit.errors import ConfigError
from leanfit.methods import config_from_dict, method_names, module_class
from leanfit.tune_options import add_tune_arguments, tune_config


def config(method, **options):
    return module_class(method).config_class(**options)


@pytest.mark.parametrize("method, option, value, expected", [
    ("lora", "rank", 2.5, "a whole number, got 2.5 (float)"),
    ("lora", "rank", "8", "a whole number, got '8' (str)"),
    ("lora", "rank", True, "a whole number, got True (bool)"),
    ("lora", "rank", None, "a whole number, got None"),
    ("lora", "alpha", "x", "a number, got 'x' (str)"),
    ("lora", "alpha", True, "a number, got True (bool)"),
    ("lora", "use_rslora", "yes", "true or false, got 'yes' (str)"),
    ("lora", "use_rslora", 1, "true or false, got 1 (int)"),
    ("lora", "init", 3, "text, got 3 (int)"),
    ("hydra", "alpha", "x", "a number"),
    ("hydra", "rank", 4.0, "a whole number"),
    ("dylora", "rank", 2.5, "a whole number"),
    ("dylora", "min_rank", 1.5, "a whole number"),
    ("bottleneck", "size", 3.5, "a whole number"),
    ("bottleneck", "placement", 1, "text"),
    ("compacter", "phm_rank", 1.5, "a whole number or None, got 1.5 (float)"),
    ("compacter", "share", "no", "true or false"),
    ("mos", "share", 0, "true or false"),
    ("s2ft", "k", "3", "a whole number or None"),
    ("increlora", "advance_learning", None, "true or false"),
])
def test_an_option_of_the_wrong_type_is_refused_in_one_sentence(method, option, value, expected):
    with pytest.raises(ConfigError) as caught:
        config(method, **{option: value})
    message = str(caught.value)
    assert message.startswith(f"Method '{method}' option {option} is of the wrong kind")
    assert expected in message and message.count(". ") == 0 and message.endswith(".")
    # every other way of building a config says the same
    with pytest.raises(ConfigError, match=f"option {option} is of the wrong kind"):
        config(method).replace(**{option: value})
    with pytest.raises(ConfigError, match=f"option {option} is of the wrong kind"):
        config_from_dict({"method": method, option: value})


def test_wrong_types_no_longer_fail_inside_torch():
    model = nn.Sequential(nn.Linear(4, 4))
    for bad in ({"rank": 2.5}, {"rank": "8"}, {"alpha": "x"}):
        with pytest.raises(ConfigError, match="wrong kind"):
            lf.adapt(model, lf.LoRA(**bad), targets=["0"], name="a")


def test_values_of_the_right_type_still_work():
    assert lf.LoRA(alpha=16, dropout=0).scaling() == 2.0  # an int for a float field
    assert lf.Hydra(alpha=16).scaling() == 2.0
    assert config("compacter", phm_rank=None).phm_rank is None
    assert config("s2ft", k=None).k is None and config("s2ft", k=3).k == 3
    assert lf.LoRA(use_rslora=True).use_rslora is True
    for name in method_names():  # every default, and its manifest round trip through JSON
        made = config(name)
        assert config_from_dict(json.loads(json.dumps(made.to_dict()))) == made
    manifest = {"method": "dylora", "rank": 4, "alpha": 8, "dropout": 0, "use_rslora": False, "init": "default",
                "min_rank": 2}
    assert config_from_dict(manifest) == lf.DyLoRA(rank=4, alpha=8.0, dropout=0.0, min_rank=2)


def test_save_and_load_keep_working_with_an_int_alpha(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    lf.adapt(model, lf.LoRA(rank=2, alpha=4), targets=["0"], name="a", train_modules=[])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    x = torch.randn(5, 4)
    model.eval()
    out = model(x)
    lf.save(model, tmp_path / "ad")
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    assert lf.load(fresh, tmp_path / "ad") == "a"
    fresh.eval()
    assert torch.equal(fresh(x), out)


def command_line(*argv):
    parser = argparse.ArgumentParser()
    add_tune_arguments(parser)
    return tune_config(parser.parse_args(list(argv)))


def test_command_line_values_of_the_right_type_still_work():
    assert command_line("--set", "rank=8", "--set", "alpha=16").options == {"rank": 8, "alpha": 16}
    assert command_line("--rank", "4", "--alpha", "8").options == {"rank": 4, "alpha": 8.0}
    assert command_line("--set", "use_rslora=true", "--set", "init=pissa").options["use_rslora"] is True
    assert command_line("--method", "compacter", "--set", "phm_rank=null").options["phm_rank"] is None


def test_command_line_rank_of_the_wrong_type_is_refused_in_one_sentence(capsys):
    from leanfit.cli import main
    for value, shown in (("2.5", "2.5 (float)"), ('"8"', "'8' (str)")):
        assert main(["plan", "--set", f"rank={value}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("leanfit: Method 'lora' option rank is of the wrong kind") and "\n" not in err
        assert shown in err


def test_set_rank_refuses_a_rank_that_is_not_a_whole_number_in_range_and_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    lf.adapt(model, lf.DyLoRA(rank=4), targets=["0"], name="d", train_modules=[])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    model.eval()
    x = torch.randn(3, 4)
    lf.set_rank(model, 3)
    before = model(x)
    for bad in (2.5, "2", True, 2.0):
        with pytest.raises(ConfigError, match=f"whole number, got {bad!r}"):
            lf.set_rank(model, bad)
    for bad in (0, 5, -1):
        with pytest.raises(ConfigError, match="outside"):
            lf.set_rank(model, bad)
    assert torch.equal(model(x), before)
    lf.set_rank(model, 2)
    assert not torch.equal(model(x), before)
