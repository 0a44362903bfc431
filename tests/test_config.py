import glob
import os

import pytest

from raymetric.config import ConfigError, apply_override, build_config, check_config, dump_config, load_config, parse_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def test_there_are_configs():
    assert any(p.endswith("demo.yaml") for p in CONFIGS)


def config_kind(path: str) -> str:
    """Sweep files hold a `tune` block, stand-alone validation configs a `checkpoint`; the rest train."""
    raw = parse_yaml(open(path).read()) or {}
    return "sweep" if "tune" in raw else "validate" if "checkpoint" in raw or "embeddings" in raw else "train"


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_loads_and_resolves(path):
    kind = config_kind(path)
    if kind == "train":
        check_config(load_config(path))
    elif kind == "sweep":
        from raymetric.tune.space import build_search_space, load_sweep

        sweep, train_raw = load_sweep(path)
        check_config(build_config(train_raw))  # every trial's base; the searched values: tests/test_tune.py
        for key, spec in sweep.search.items():
            build_search_space(key, spec)
    else:
        from raymetric.config import MetricArgs, ValidateConfig
        from raymetric.validate import check_validate_config

        cfg = load_config(path, schema=ValidateConfig)
        check_validate_config(cfg, cfg.metric_args or MetricArgs())
    with open(path) as f:
        header = [line for line in iter(f.readline, "") if line.startswith("#") or not line.strip()]
    job = {"train": "train", "sweep": "tune", "validate": "validate"}[kind]
    launch = f"# python jobs/{job}.py --config configs/{os.path.basename(path)}"
    assert any(line.startswith(launch) for line in header), f"the header comment gives the launch command {launch!r}"


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
        (["optimizer.groups={neck: {lr: 1}}"], "optimizer.groups.neck.[key]", "'backbone', 'head' or 'loss'"),
        (["scheduling.warmup_start_factor=0"], "scheduling.warmup_start_factor", "greater than 0"),
        (["accumulate_grad_batches=0"], "accumulate_grad_batches", "greater than 0"),
        (["gradient_clip_val=-1"], "gradient_clip_val", "greater than 0"),
        (["freeze_n_epochs=-1"], "freeze_n_epochs", "greater than or equal to 0"),
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
        # building blocks of the training-breadth issue
        (["optimizer.groups={head: {lrr: 1}}"], "optimizer.groups.head: unknown argument(s) ['lrr'] for adam"),
        (["optimizer.groups={head: {lr: -1}}"], "optimizer.groups.head: ValueError: Invalid learning rate"),
        (["sampler=null", "bs_train=7"], "bs_train=7 must be divisible by ray.num_workers=2"),
        (["sampler={name: category_balance, args: {n_categories: 1, n_labels: 3, n_instances: 2}}"],
         "sampler.args.n_categories x n_labels = 1 x 3 must be divisible by ray.num_workers=2"),
        (["sampler={name: category_balance, args: {n_label: 2}}"], "sampler.args: unknown argument(s) ['n_label']"),
        (["criterion={name: arcface, args: {num_class: 3}}"], "criterion.args: unknown argument(s) ['num_class']"),
        (["criterion={name: arcface, args: {label2category: {}}}"], "criterion.args: unknown argument(s) ['label2category']"),
        (["criterion={name: triplet, args: {in_features: 3}}"], "criterion.args: unknown argument(s) ['in_features']"),
        (["criterion={name: mlp_arcface}"], "criterion.args: missing required argument(s) ['mlp_features']"),
        (["criterion.name=arcface", "criterion.args={}"], "criterion.miner: criterion 'arcface' takes no miner"),
        (["criterion={name: arcface, args: {smoothing_epsilon: 2}}"], "criterion: ValueError: smoothing_epsilon must be in [0, 1)"),
        (["criterion.miner={name: n_hard_triplets, args: {n_positive: [3, 2]}}"], "criterion: ValueError: n_positive=[from, to]"),
        (["criterion.miner={name: n_hard_triplets, args: {n_postive: 2}}"], "criterion.miner.args: unknown argument(s) ['n_postive']"),
        (["criterion.miner={name: miner_with_bank, args: {bank_size_in_batches: 2, miner: {name: hard_cluster}}}"],
         "inner miner must be one of"),
        (["checkpoint_every_n_steps=3", "accumulate_grad_batches=2"],
         "checkpoint_every_n_steps=3 must be a multiple of accumulate_grad_batches=2"),
        (["freeze_n_epochs=2", "extractor.args={arch: resnet10t}"], "freeze_n_epochs=2: nothing would train"),
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


def test_oml_arcface_config_with_stated_sizes_is_accepted():
    # OML's configs/criterion/arcface.yaml states in_features and num_classes; the run checks them.
    cfg = _demo("criterion={name: arcface, args: {smoothing_epsilon: 0.0, m: 0.4, s: 64, in_features: 384, num_classes: 3985}}")
    check_config(cfg)
