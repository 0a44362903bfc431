"""The typed training config: YAML plus ``key=value`` overrides, checked on the driver before any worker starts.

Every default lives here, in the schema. Key names follow OML's pipeline configs where OML has one
(REFERENCE.md §5). Building blocks are chosen by name with their arguments; ``check_config`` checks
every name against its registry and every argument against the factory's signature, and builds the
cheap blocks once so that a bad value fails here, naming the key, and not inside a worker.

Plain dicts cross the Ray boundary: the driver sends ``cfg.model_dump()`` and each worker rebuilds the
typed config with ``TrainConfig.model_validate``.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError


class ConfigError(ValueError):
    """A config problem; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Block(_Strict):
    """A building block chosen by name from a registry, with keyword arguments for its factory."""

    name: str
    args: dict[str, Any] = Field(default_factory=dict)


class CriterionBlock(Block):
    """A criterion; ``miner`` (OML keeps it in ``args.miner``, which is accepted too) for criteria that mine."""

    miner: Block | None = None


class SchedulingConfig(_Strict):
    """LR scheduling (OML's keys)."""

    scheduler: Block
    scheduler_interval: Literal["epoch", "step"] = "epoch"
    scheduler_frequency: PositiveInt = 1


class MetricArgs(_Strict):
    """Which retrieval metrics validation computes."""

    cmc_top_k: list[PositiveInt] = [1, 5]
    precision_top_k: list[PositiveInt] = [5]
    map_top_k: list[PositiveInt] = [5]
    # Queries with no relevant gallery item: left out of the averages and counted ("exclude"), or
    # scored exactly as OML does, NaN precision included ("oml"). See raymetric/metrics.py.
    queries_without_gt: Literal["exclude", "oml"] = "exclude"

    def metric_names(self) -> list[str]:
        return (
            [f"cmc@{k}" for k in self.cmc_top_k]
            + [f"precision@{k}" for k in self.precision_top_k]
            + [f"map@{k}" for k in self.map_top_k]
        )

    @property
    def max_k(self) -> int:
        return max(self.cmc_top_k + self.precision_top_k + self.map_top_k)


class DemoData(_Strict):
    """Generate the bundled demo dataset into ``dataset_root`` when it is not there yet."""

    size: str = "default"
    seed: int = 0


class RayConfig(_Strict):
    """How the run uses Ray."""

    num_workers: PositiveInt = 2
    use_gpu: bool = False
    cpus_per_worker: PositiveFloat = 1.0
    # Where run directories go. On a multi-node cluster: storage every node reaches (NFS, S3).
    storage_path: str = "runs"
    name: str | None = None  # run directory name; default: "<date>_<time>_<postfix>"
    max_failures: NonNegativeInt = 0


class TrainConfig(_Strict):
    """Everything a training run needs. YAML files in configs/ give values for these keys."""

    postfix: str = "metric_learning"
    seed: int = 42
    precision: Literal["32", "bf16"] = "32"  # bf16 autocast on GPU; CPU always runs fp32
    dataset_root: str
    dataframe_name: str = "df.csv"
    demo_data: DemoData | None = None
    num_workers: NonNegativeInt = 2  # DataLoader processes per Ray worker
    transforms_train: Block = Block(name="augs_torch", args={"im_size": 224})
    transforms_val: Block = Block(name="norm_resize_torch", args={"im_size": 224})
    sampler: Block = Block(name="balance", args={"n_labels": 8, "n_instances": 4})
    bs_val: PositiveInt = 128  # validation batch size per worker
    max_epochs: PositiveInt = 10
    valid_period: PositiveInt = 1  # validate every N epochs, and after the last one
    validate_untrained: bool = False  # also validate before the first step (a baseline)
    metric_args: MetricArgs = MetricArgs()
    metric_for_checkpointing: str = "cmc@1"  # OML's "OVERALL/cmc/1" is accepted too
    mode_for_checkpointing: Literal["max", "min"] = "max"
    extractor: Block = Block(name="timm", args={"arch": "resnet18"})
    criterion: CriterionBlock = CriterionBlock(
        name="triplet_with_miner", args={"margin": 0.2}, miner=Block(name="hard_triplets")
    )
    optimizer: Block = Block(name="adam", args={"lr": 1e-4})
    scheduling: SchedulingConfig | None = None
    ray: RayConfig = RayConfig()

    @property
    def dataset_csv(self) -> str:
        return os.path.join(self.dataset_root, self.dataframe_name)


# ---------------------------------------------------------------- loading


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-5`` as a float (YAML 1.1 needs ``1.0e-5``; users write ``1e-5``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str) -> Any:
    """Parse YAML text with raymetric's loader.

    >>> parse_yaml("lr: 1e-5")
    {'lr': 1e-05}
    """
    return yaml.load(text, Loader=_YamlLoader)


def apply_override(raw: dict, override: str) -> None:
    """Apply one ``a.b.c=value`` override to a raw config dict in place; ``value`` is parsed as YAML.

    >>> d = {"optimizer": {"name": "adam", "args": {"lr": 0.1}}}
    >>> apply_override(d, "optimizer.args.lr=1e-3"); d["optimizer"]["args"]["lr"]
    0.001
    """
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value (e.g. max_epochs=5)")
    key, value = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: bad key {key!r}")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: key {'.'.join(parts[: i + 1])!r} is not a mapping")
        node = child
    node[parts[-1]] = parse_yaml(value) if value.strip() else None


def _normalise_raw(raw: dict) -> dict:
    """Accept OML's spellings: ``criterion.args.miner`` and ``precision: 32``."""
    crit = raw.get("criterion")
    if isinstance(crit, dict) and isinstance(crit.get("args"), dict) and "miner" in crit["args"]:
        if crit.get("miner") is not None:
            raise ConfigError("config key 'criterion.miner' is given twice (also as 'criterion.args.miner')")
        crit["miner"] = crit["args"].pop("miner")
    if isinstance(raw.get("precision"), int):
        raw["precision"] = str(raw["precision"])
    return raw


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, each naming the dotted key."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"config key {key!r}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"config key {key!r}: required, but not given")
        else:
            lines.append(f"config key {key!r}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def build_config(raw: dict) -> TrainConfig:
    """Typed config from a raw dict (types and unknown keys checked; no registry checks)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of keys, got {type(raw).__name__}")
    try:
        return TrainConfig.model_validate(_normalise_raw(raw))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config (or start from the defaults), apply ``key=value`` overrides, check types."""
    raw: dict = {}
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            raw = parse_yaml(f.read()) or {}
    for override in overrides:
        apply_override(raw, override)
    return build_config(raw)


def dump_config(cfg: TrainConfig, path: str) -> None:
    """Write the resolved config as YAML (loadable with ``load_config``)."""
    with open(path, "w") as f:
        yaml.safe_dump(cfg.model_dump(mode="json"), f, sort_keys=False)


# ---------------------------------------------------------------- semantic checks


def checkpoint_metric_key(cfg: TrainConfig) -> str:
    """The flat metric key that ``metric_for_checkpointing`` names (``OVERALL/cmc/1`` -> ``cmc@1``).

    >>> checkpoint_metric_key(TrainConfig(dataset_root=".", metric_for_checkpointing="OVERALL/map/5"))
    'map@5'
    """
    key = cfg.metric_for_checkpointing
    m = re.fullmatch(r"OVERALL/(\w+)/(\d+)", key)
    return f"{m.group(1)}@{m.group(2)}" if m else key


def check_args(key: str, factory: Callable, args: dict, provided: Sequence[str] = ()) -> None:
    """Check ``args`` against ``factory``'s signature; ``provided`` are the arguments the code passes itself."""
    sig = inspect.signature(factory)
    params = {n: p for n, p in sig.parameters.items() if n not in provided and n != "self"}
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    unknown = sorted(set(args) - named)
    if unknown and not takes_kwargs:
        raise ConfigError(
            f"config key {key}.args: unknown argument(s) {unknown} for {getattr(factory, '__name__', factory)}; "
            f"accepted: {sorted(named)}"
        )
    required = [
        n
        for n, p in params.items()
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in args
    ]
    if required:
        raise ConfigError(f"config key {key}.args: missing required argument(s) {required}")


def _lookup(key: str, registry: dict, name: str) -> Callable:
    if name not in registry:
        raise ConfigError(f"config key {key}.name: unknown name {name!r}; known: {sorted(registry)}")
    return registry[name]


def _build(key: str, build: Callable[[], Any]) -> Any:
    try:
        return build()
    except ConfigError:
        raise
    except Exception as err:  # a value the block itself rejects
        raise ConfigError(f"config key {key}: {type(err).__name__}: {err}") from None


def check_config(cfg: TrainConfig, extractors: dict | None = None) -> None:
    """Check every registry name, every block's arguments and cross-key consistency. Raises ConfigError.

    Needs no dataset and starts no worker: cheap blocks are built once here so that their own
    checks run on the driver.
    """
    import torch

    from raymetric.data.transforms import TRANSFORMS
    from raymetric.extractors import EXTRACTORS
    from raymetric.losses import CRITERIA, build_criterion
    from raymetric.miners import MINERS
    from raymetric.optim import OPTIMIZERS, SCHEDULERS
    from raymetric.samplers import SAMPLERS

    for key in ("transforms_train", "transforms_val"):
        block = getattr(cfg, key)
        factory = _lookup(key, TRANSFORMS, block.name)
        check_args(key, factory, block.args)
        _build(key, lambda: factory(**block.args))

    registry = EXTRACTORS | (extractors or {})
    factory = _lookup("extractor", registry, cfg.extractor.name)
    check_args("extractor", factory, cfg.extractor.args)
    if cfg.extractor.name == "timm":
        import timm

        arch = cfg.extractor.args.get("arch", "resnet18")
        if not timm.is_model(arch):
            close = timm.list_models(f"*{arch.split('_')[0]}*")[:10]
            raise ConfigError(f"config key extractor.args.arch: {arch!r} is not a timm model; similar: {close}")
        weights = cfg.extractor.args.get("weights")
        if weights and not os.path.exists(weights):
            raise ConfigError(f"config key extractor.args.weights: file not found: {weights}")

    sampler_factory = _lookup("sampler", SAMPLERS, cfg.sampler.name)
    check_args("sampler", sampler_factory, cfg.sampler.args, provided=("labels", "world_size", "rank", "seed"))
    n_labels = cfg.sampler.args.get("n_labels")
    if isinstance(n_labels, int) and n_labels % cfg.ray.num_workers:
        raise ConfigError(
            f"config key sampler.args.n_labels={n_labels} must be divisible by ray.num_workers="
            f"{cfg.ray.num_workers}: each global step's labels are split evenly across workers"
        )

    crit_factory = _lookup("criterion", CRITERIA, cfg.criterion.name)
    check_args("criterion", crit_factory, cfg.criterion.args, provided=("miner",))
    if cfg.criterion.miner is not None:
        miner_factory = _lookup("criterion.miner", MINERS, cfg.criterion.miner.name)
        check_args("criterion.miner", miner_factory, cfg.criterion.miner.args)
        if "miner" not in inspect.signature(crit_factory).parameters:
            raise ConfigError(f"config key criterion.miner: criterion {cfg.criterion.name!r} takes no miner")
    miner = cfg.criterion.miner.model_dump() if cfg.criterion.miner else None
    _build("criterion", lambda: build_criterion(cfg.criterion.name, cfg.criterion.args, miner))

    opt_factory = _lookup("optimizer", OPTIMIZERS, cfg.optimizer.name)
    check_args("optimizer", opt_factory, cfg.optimizer.args, provided=("params",))
    dummy = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = _build("optimizer", lambda: opt_factory(dummy, **cfg.optimizer.args))
    if cfg.scheduling is not None:
        block = cfg.scheduling.scheduler
        sched_factory = _lookup("scheduling.scheduler", SCHEDULERS, block.name)
        check_args("scheduling.scheduler", sched_factory, block.args, provided=("optimizer",))
        _build("scheduling.scheduler", lambda: sched_factory(optimizer, **block.args))

    metric = checkpoint_metric_key(cfg)
    known = cfg.metric_args.metric_names()
    if metric not in known:
        raise ConfigError(
            f"config key metric_for_checkpointing: {cfg.metric_for_checkpointing!r} is not computed; "
            f"computed: {known} (set metric_args.*_top_k to add it)"
        )
    if cfg.demo_data is not None:
        from raymetric.data.demo import SIZES

        if cfg.demo_data.size not in SIZES:
            raise ConfigError(f"config key demo_data.size: unknown size {cfg.demo_data.size!r}; known: {sorted(SIZES)}")
