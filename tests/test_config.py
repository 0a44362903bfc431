import glob
import os

import pytest

from raymetric.config import ConfigError, apply_override, build_config, check_config, dump_config, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def test_there_are_configs():
    assert any(p.endswith("demo.yaml") for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_loads_and_resolves(path):
    cfg = load_config(path)
    check_config(cfg)
    with open(path) as f:
        assert f.readline().startswith("# "), "each config opens with its launch command"


def test_round_trip_of_resolved_config(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"), ["max_epochs=3"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")) == cfg


def _demo(*overrides):
    return load_config(os.path.join(ROOT, "configs", "demo.yaml"), overrides)


@pytest.mark.parametrize(
    "overrides, key, what",
    [
        (["max_epoch=3"], "max_epoch", "unknown key"),
        (["ray.num_worker=3"], "ray.num_worker", "unknown key"),
        (["max_epochs=ten"], "max_epochs", "valid integer"),
        (["ray.use_gpu=maybe"], "ray.use_gpu", "valid boolean"),
        (["valid_period=0"], "valid_period", "greater than 0"),
        (["sampler=3"], "sampler", "valid dictionary"),
    ],
)
def test_type_errors_name_the_key(overrides, key, what):
    with pytest.raises(ConfigError) as err:
        _demo(*overrides)
    assert f"'{key}'" in str(err.value) and what in str(err.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optimizer.name=adamx"], "optimizer.name: unknown name 'adamx'"),
        (["criterion.name=nope"], "criterion.name: unknown name 'nope'"),
        (["criterion.miner.name=nope"], "criterion.miner.name: unknown name 'nope'"),
        (["sampler.name=nope"], "sampler.name: unknown name"),
        (["transforms_train.name=nope"], "transforms_train.name: unknown name"),
        (["extractor.name=nope"], "extractor.name: unknown name"),
        (["scheduling.scheduler.name=nope"], "scheduling.scheduler.name: unknown name"),
        (["optimizer.args.lrr=0.1"], "optimizer.args: unknown argument(s) ['lrr']"),
        (["extractor.args.embeding_size=3"], "extractor.args: unknown argument(s) ['embeding_size']"),
        (["sampler.args.n_label=3"], "sampler.args: unknown argument(s) ['n_label']"),
        (["transforms_val.args.size=3"], "transforms_val.args: unknown argument(s) ['size']"),
        (["optimizer.args.lr=-1"], "optimizer: ValueError: Invalid learning rate"),
        (["criterion.args.margin=-1"], "criterion: ValueError: margin must be >= 0"),
        (["extractor.args.arch=resnet_nonexistent"], "extractor.args.arch: 'resnet_nonexistent' is not a timm model"),
        (["extractor.args.weights=/no/such/file.pth"], "extractor.args.weights: file not found"),
        (["sampler.args.n_labels=7"], "sampler.args.n_labels=7 must be divisible by ray.num_workers=2"),
        (["metric_for_checkpointing=cmc@10"], "metric_for_checkpointing: 'cmc@10' is not computed"),
        (["scheduling.scheduler.args={}"], "scheduling.scheduler.args: missing required argument(s) ['T_max']"),
        (["demo_data.size=huge"], "demo_data.size: unknown size 'huge'"),
    ],
)
def test_registry_and_value_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        check_config(_demo(*overrides))
    assert message in str(err.value)


def test_oml_spellings_are_accepted():
    raw = {
        "dataset_root": ".",
        "precision": 32,
        "metric_for_checkpointing": "OVERALL/cmc/1",
        "criterion": {"name": "triplet_with_miner", "args": {"margin": None, "miner": {"name": "hard_triplets", "args": {}}}},
        "optimizer": {"name": "adam", "args": {"lr": 1e-5}},
    }
    cfg = build_config(raw)
    assert cfg.criterion.miner.name == "hard_triplets" and "miner" not in cfg.criterion.args
    assert cfg.precision == "32"
    check_config(cfg)


def test_overrides_parse_yaml_values():
    raw = {}
    for o in ["a.b=1e-5", "a.c=[1, 2]", "a.d=null", "a.e=true", "f=text"]:
        apply_override(raw, o)
    assert raw == {"a": {"b": 1e-5, "c": [1, 2], "d": None, "e": True}, "f": "text"}
    with pytest.raises(ConfigError, match="key=value"):
        apply_override(raw, "novalue")


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/no/such.yaml")
