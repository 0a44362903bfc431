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
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError


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


class OptimizerBlock(Block):
    """An optimizer; ``groups`` overrides its arguments per parameter group (``backbone``, ``head``, ``loss``)."""

    groups: dict[Literal["backbone", "head", "loss"], dict[str, Any]] = Field(default_factory=dict)


class SchedulingConfig(_Strict):
    """LR scheduling (OML's keys), plus an optional linear warm-up (raymetric's)."""

    scheduler: Block
    scheduler_interval: Literal["epoch", "step"] = "epoch"  # "step": at optimizer steps, by batch within the epoch
    scheduler_frequency: PositiveInt = 1
    # Scheduler steps of linear warm-up from warmup_start_factor x lr; the scheduler starts after it.
    warmup: NonNegativeInt = 0
    warmup_start_factor: float = Field(default=0.01, gt=0, le=1)


def _power_of_two(value: int) -> int:
    if value & (value - 1):
        raise ValueError("must be a power of two")
    return value


class MetricArgs(_Strict):
    """Which retrieval metrics validation computes."""

    cmc_top_k: list[PositiveInt] = [1, 5]
    precision_top_k: list[PositiveInt] = [5]
    map_top_k: list[PositiveInt] = [5]
    # Queries with no relevant gallery item: left out of the averages and counted ("exclude"), or
    # scored exactly as OML does, NaN precision included ("oml"). See raymetric/metrics.py.
    queries_without_gt: Literal["exclude", "oml"] = "exclude"
    # fnmr@fmr=<fmr> for each false match rate (OML's key; off by default as in OML: it scores every
    # query-gallery pair), exact: counting passes over all pairs narrow a window around the threshold,
    # fmr_bins buckets per pass, a power of two (65536: two passes, sometimes three; fewer, more passes).
    fmr_vals: list[Annotated[float, Field(ge=0, le=1)]] = []
    fmr_bins: Annotated[int, Field(ge=2), AfterValidator(_power_of_two)] = 65536
    # pcf@<share>: fraction of principal components explaining that share of the variance (OML's key).
    pcf_variance: list[Annotated[float, Field(ge=0, le=1)]] = [0.5]

    def metric_names(self) -> list[str]:
        return (
            [f"cmc@{k}" for k in self.cmc_top_k]
            + [f"precision@{k}" for k in self.precision_top_k]
            + [f"map@{k}" for k in self.map_top_k]
            + [f"fnmr@fmr={v:g}" for v in self.fmr_vals]
            + [f"pcf@{v:g}" for v in self.pcf_variance]
        )

    @property
    def max_k(self) -> int:
        return max(self.cmc_top_k + self.precision_top_k + self.map_top_k, default=1)  # all empty: fnmr/pcf only


class RetrievalConfig(_Strict):
    """How validation searches the gallery (raymetric/retrieval). The top-k is exact whatever is chosen."""

    backend: Literal["torch", "faiss"] = "torch"  # what scores the candidates; faiss scores in float32
    score_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bfloat16 where the hardware is fast at it
    extra_candidates: NonNegativeInt = 16  # candidates per query beyond k, re-ranked exactly (48 for ~1M items)
    max_block_elems: PositiveInt | None = None  # scores held at once; null: 2**24 on CPU, 2**28 on GPU (512 MB)
    query_chunk: PositiveInt = 4096  # queries searched per round (per worker inside training)
    # Stand-alone job: a gallery whose search needs less memory is searched in-process, a larger one in
    # shards over Ray Data (same results; Ray Data's actors take seconds to start).
    memory_budget_mb: PositiveFloat = 2048
    # Post-processing of the results, in order (raymetric/postprocessing.py): query_expansion,
    # distance_threshold. Empty: none.
    postprocessing: list[Block] = []


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
    # A Ray started by raymetric also starts its dashboard (web UI, State API: Ray Train's placement-group
    # cleaner needs it). About 1 s more start-up (bench/ray_startup.py). Ignored when joining a cluster.
    dashboard: bool = True


class LoaderConfig(_Strict):
    """How each Ray worker feeds its training steps (raymetric/data/loading.py). ``num_workers`` stays OML's top-level key."""

    pin_memory: bool | Literal["auto"] = "auto"  # page-locked batches; auto: on a GPU
    prefetch_factor: PositiveInt = 2  # batches each DataLoader process prepares ahead (num_workers > 0)
    persistent_workers: bool = True  # DataLoader processes live across epochs (num_workers > 0)
    # Where the training transforms finish. cpu: all of it in the DataLoader processes (float images travel);
    # device: resize/crop/flip there, uint8 images travel, jitter and normalisation batched on the
    # worker's device; auto: device on a GPU (transforms without a device form stay on the CPU).
    augment_on: Literal["auto", "cpu", "device"] = "auto"
    # JPEG decoding: cpu (Pillow, in the DataLoader processes) or gpu (nvJPEG, batched on the worker's GPU;
    # the processes only read the files, and augmentation runs on the GPU). gpu needs ray.use_gpu.
    decode: Literal["cpu", "gpu"] = "cpu"
    look_ahead: bool = True  # on a GPU, move and finish the next batch on a side stream during the step
    # Decode, crop and shrink every training image once, before training (Ray Data tasks), and read the
    # pixels from a memory-mapped cache every epoch (raymetric/data/cache.py). cache_size: the shorter side
    # of a cached image, null: the training transform's im_size; cache_dir null: <ray.storage_path>/.image_cache.
    cache: bool = False
    cache_size: PositiveInt | None = None
    cache_dir: str | None = None
    # Where training batches are decoded and augmented: dataloader (num_workers processes next to each Ray
    # Train worker) or ray_data (Ray tasks anywhere in the cluster, ray_data_cpus CPUs each, streamed to the
    # worker in its plan's order; the same batches as num_workers: 0; raymetric/data/ray_ingest.py).
    source: Literal["dataloader", "ray_data"] = "dataloader"
    ray_data_cpus: PositiveFloat = 1.0


class PictureConfig(_Strict):
    """The retrieval picture: the worst queries and what they retrieved, as OML draws it.

    Drawn by the stand-alone validation, and by training at every validation when ``log_images`` is true.
    """

    n_queries: NonNegativeInt = 8  # rows, worst first; 0: no picture
    n_retrieved: PositiveInt = 5  # retrieved items per row (plus the query and one missed relevant item)
    metric: str | None = None  # per-query metric that ranks the queries; null: the first of metric_args
    tile_size: PositiveInt = 128  # pixels per image


class TrainConfig(_Strict):
    """Everything a training run needs. YAML files in configs/ give values for these keys."""

    postfix: str = "metric_learning"
    seed: int = 42
    precision: Literal["32", "bf16"] = "32"  # bf16 autocast on GPU; CPU always runs fp32
    dataset_root: str
    dataframe_name: str = "df.csv"
    demo_data: DemoData | None = None
    num_workers: NonNegativeInt = 2  # DataLoader processes per Ray worker
    loader: LoaderConfig = LoaderConfig()  # pinned memory, prefetch, where images are decoded and augmented
    transforms_train: Block = Block(name="augs_torch", args={"im_size": 224})
    transforms_val: Block = Block(name="norm_resize_torch", args={"im_size": 224})
    # null: plain shuffled batches of bs_train items (a global batch, split across workers)
    sampler: Block | None = Block(name="balance", args={"n_labels": 8, "n_instances": 4})
    bs_train: PositiveInt = 128  # global batch size when sampler is null; unused otherwise
    bs_val: PositiveInt = 128  # validation batch size per worker
    max_epochs: PositiveInt = 10
    valid_period: PositiveInt = 1  # validate every N epochs, and after the last one
    validate_untrained: bool = False  # also validate before the first step (a baseline)
    metric_args: MetricArgs = MetricArgs()
    retrieval: RetrievalConfig = RetrievalConfig()  # how validation searches (exact either way)
    metric_for_checkpointing: str = "cmc@1"  # OML's "OVERALL/cmc/1" is accepted too
    mode_for_checkpointing: Literal["max", "min"] = "max"
    extractor: Block = Block(name="timm", args={"arch": "resnet18"})
    criterion: CriterionBlock = CriterionBlock(
        name="triplet_with_miner", args={"margin": 0.2}, miner=Block(name="hard_triplets")
    )
    optimizer: OptimizerBlock = OptimizerBlock(name="adam", args={"lr": 1e-4})
    scheduling: SchedulingConfig | None = None
    freeze_n_epochs: NonNegativeInt = 0  # OML's key: the extractor's backbone is frozen for the first N epochs
    gradient_clip_val: PositiveFloat | None = None  # clip the gradient norm (Lightning's name)
    accumulate_grad_batches: PositiveInt = 1  # global batches per optimizer step (Lightning's name)
    channels_last: bool = True  # channels-last memory format for the model and its images (GPU and CPU)
    # torch.compile the extractor (in place, nn.Module.compile: checkpoints keep their keys); the first
    # steps and the first validation pay the compilation. compile_backend: a torch._dynamo backend.
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    compile_backend: str = "inductor"
    # fused=True for optimizers that have a fused kernel (adam, adamw, sgd, adagrad); auto: on a GPU.
    # An explicit optimizer.args.fused or foreach wins.
    fused_optimizer: bool | Literal["auto"] = "auto"
    # Lightning's key: BatchNorm layers normalise with the statistics of the global batch (all workers),
    # as one process on the whole batch would; needs ray.use_gpu (torch's SyncBatchNorm runs on CUDA).
    # Off, each worker normalises its own share of the batch, as DDP does by default.
    sync_batchnorm: bool = False
    # Also checkpoint every N global steps inside an epoch (a multiple of accumulate_grad_batches);
    # null: only at the end of each epoch.
    checkpoint_every_n_steps: PositiveInt | None = None
    # Lightning's key: the step's loss terms (over the global batch) and learning rate every N optimizer
    # steps, logged as train_step/<name> at the global step (and kept in history.jsonl); null: per epoch only.
    log_every_n_steps: PositiveInt | None = 50
    # Experiment loggers (raymetric/loggers.py), OML's {name, args} or a list of them; null: none.
    logger: list[Block] = [Block(name="tensorboard")]
    log_images: bool = False  # also log validation's retrieval picture with the loggers (OML's key)
    picture: PictureConfig = PictureConfig(tile_size=96)  # that picture, saved as <run>/pictures/*.png
    # Continue from an earlier run: its run directory (continued in place, any override applies, e.g. a
    # larger max_epochs), or a checkpoint (a checkpoint_* folder or a state.pt; a new run starts from it).
    resume_from: str | None = None
    # An image that fails to decode: "error" stops the run naming the file and row; "skip" logs it,
    # counts it (train/bad_images, val/n_bad_images) and uses another image of the same label in its
    # place in a training batch, or leaves it out of validation.
    on_bad_image: Literal["error", "skip"] = "error"
    # A label found in several categories: "error", or "first" keeps its first category and logs it.
    category_conflict: Literal["error", "first"] = "error"
    check_images: bool = False  # decode every image once, in parallel with Ray Data, before training
    ray: RayConfig = RayConfig()

    @property
    def dataset_csv(self) -> str:
        return os.path.join(self.dataset_root, self.dataframe_name)


class ValidateConfig(_Strict):
    """The stand-alone validation job (jobs/validate.py): a checkpoint and a dataset, or an embeddings table."""

    postfix: str = "validation"
    # A raymetric checkpoint: its state.pt, its checkpoint_* folder, or a run folder (best/state.pt, else the latest).
    checkpoint: str | None = None
    # Or a Parquet embeddings table (raymetric/embeddings.py) made elsewhere; then no model runs.
    embeddings: str | None = None
    # Dataset and inference settings; null: the checkpoint's (its training config).
    dataset_root: str | None = None
    dataframe_name: str | None = None
    transforms_val: Block | None = None
    bs_val: PositiveInt = 128  # images per inference batch
    # bf16 autocast of the extractor on GPU actors (CPU always runs fp32); null: the checkpoint's, so that
    # the job scores a checkpoint as validation inside its training did.
    precision: Literal["32", "bf16"] | None = None
    metric_args: MetricArgs | None = None  # null: the checkpoint's, else the defaults
    retrieval: RetrievalConfig = RetrievalConfig()
    picture: PictureConfig = PictureConfig()
    save_embeddings: bool = True  # write the embeddings table into the run folder (with a checkpoint)
    topk_to_save: PositiveInt | None = None  # width of the per-query top-k table; null: the largest k computed
    ray: RayConfig = RayConfig()  # num_workers = inference actors; storage_path and name as in training


class IndexConfig(_Strict):
    """The faiss index the predict job saves beside the embeddings, over their gallery rows (L2 distances)."""

    type: Literal["flat", "ivf", "none"] = "flat"  # flat: exact; ivf: inverted lists, approximate; none: no index
    nlist: PositiveInt | None = None  # IVF lists; null: about 4 x sqrt(N), with >= 39 training items per list
    nprobe: PositiveInt = 16  # IVF lists visited per query (the search command can override it)


class PredictConfig(_Strict):
    """The predict job (jobs/predict.py): embeddings of a folder of images or a CSV, and a faiss index."""

    postfix: str = "predict"
    # The extractor: a run folder (its best checkpoint, else the latest), a checkpoint_* folder, a state.pt,
    # or an export folder (jobs/export.py).
    checkpoint: str
    which: Literal["best", "latest"] = "best"  # which checkpoint of a run folder
    # The images: a folder (searched recursively for .jpg/.jpeg/.png/.bmp/.webp), or a CSV with a 'path'
    # column (OML's dataset CSV, with its labels, splits and boxes, or any CSV with 'path').
    images: str | None = None
    dataframe: str | None = None
    dataset_root: str | None = None  # relative paths of the CSV are joined to it; null: the CSV's folder
    split: Literal["all", "train", "validation"] = "all"  # rows of an OML dataset CSV to embed
    transforms: Block | None = None  # null: the checkpoint's transforms_val
    bs: PositiveInt = 128  # images per inference batch
    # bf16 autocast of the extractor on GPU actors (faster; CPU always runs fp32). "32" keeps the index
    # in the precision raymetric.predict.ImageIndex embeds its queries in.
    precision: Literal["32", "bf16"] = "32"
    index: IndexConfig = IndexConfig()
    ray: RayConfig = RayConfig()  # num_workers = inference actors; storage_path and name as in training


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
    """Accept OML's spellings: ``criterion.args.miner`` and ``precision: 32``; one ``logger`` block or null."""
    if "logger" in raw:
        if raw["logger"] is None:
            raw["logger"] = []
        elif isinstance(raw["logger"], dict):
            raw["logger"] = [raw["logger"]]
    crit = raw.get("criterion")
    if isinstance(crit, dict) and isinstance(crit.get("args"), dict) and "miner" in crit["args"]:
        if crit.get("miner") is not None:
            raise ConfigError("config key 'criterion.miner' is given twice (also as 'criterion.args.miner')")
        crit["miner"] = crit["args"].pop("miner")
    if isinstance(raw.get("precision"), int):
        raw["precision"] = str(raw["precision"])
    return raw


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming the dotted key (under ``prefix``, e.g. ``tune``)."""
    lines = []
    for e in err.errors():
        key = ".".join([prefix, *(str(p) for p in e["loc"])] if prefix else [str(p) for p in e["loc"]])
        if e["type"] == "extra_forbidden":
            lines.append(f"config key {key!r}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"config key {key!r}: required, but not given")
        else:
            lines.append(f"config key {key!r}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def build_config(raw: dict, schema: type[BaseModel] = TrainConfig) -> TrainConfig:
    """Typed config from a raw dict (types and unknown keys checked; no registry checks).

    ``schema``: ``TrainConfig`` (training) or ``ValidateConfig`` (the stand-alone validation).
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of keys, got {type(raw).__name__}")
    try:
        return schema.model_validate(_normalise_raw(raw) if schema in (TrainConfig, ValidateConfig, PredictConfig) else raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def load_config(path: str | None = None, overrides: Sequence[str] = (),
                schema: type[BaseModel] = TrainConfig) -> TrainConfig:
    """Read a YAML config (or start from the defaults), apply ``key=value`` overrides, check types."""
    raw: dict = {}
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            raw = parse_yaml(f.read()) or {}
    for override in overrides:
        apply_override(raw, override)
    return build_config(raw, schema)


def dump_config(cfg: TrainConfig, path: str) -> None:
    """Write the resolved config as YAML (loadable with ``load_config``)."""
    with open(path, "w") as f:
        yaml.safe_dump(cfg.model_dump(mode="json"), f, sort_keys=False)


def cache_size(cfg: TrainConfig) -> int:
    """``loader.cache_size``, else the training transform's ``im_size`` (its default when not given)."""
    if cfg.loader.cache_size is not None:
        return cfg.loader.cache_size
    from raymetric.data.transforms import TRANSFORMS

    size = cfg.transforms_train.args.get("im_size")
    if size is None and cfg.transforms_train.name in TRANSFORMS:
        size = inspect.signature(TRANSFORMS[cfg.transforms_train.name]).parameters.get("im_size")
        size = None if size is None or size.default is inspect.Parameter.empty else size.default
    if not isinstance(size, int):
        raise ConfigError(f"config key loader.cache_size: transforms_train {cfg.transforms_train.name!r} has no "
                          f"im_size to default to; set the shorter side of a cached image")
    return size


def make_run_dir(cfg) -> str:
    """``<ray.storage_path>/<ray.name or date_time_postfix>``, created, with the resolved config in it.

    Any job's config with ``ray`` and ``postfix`` keys (training, validation, predict).
    """
    from datetime import datetime

    name = cfg.ray.name or f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{cfg.postfix}"
    run_dir = os.path.join(cfg.ray.storage_path, name)
    os.makedirs(run_dir, exist_ok=True)
    dump_config(cfg, os.path.join(run_dir, "config.yaml"))
    return run_dir


def describe_keys(model: type[BaseModel] = TrainConfig, prefix: str = "") -> list[str]:
    """``key: default`` for every config key, nested sections as dotted keys (for a job's ``--help``).

    >>> [line for line in describe_keys() if line.startswith(("dataset_root", "ray.num_workers"))]
    ['dataset_root: (required)', 'ray.num_workers: 2']
    """
    import json

    lines = []
    for name, field in model.model_fields.items():
        if field.is_required():
            lines.append(f"{prefix}{name}: (required)")
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, _Strict) and not isinstance(default, Block):
            lines += describe_keys(type(default), f"{prefix}{name}.")
            continue
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json")
        elif isinstance(default, list):
            default = [d.model_dump(mode="json") if isinstance(d, BaseModel) else d for d in default]
        lines.append(f"{prefix}{name}: {default if isinstance(default, str) else json.dumps(default)}")
    return lines


def job_parser(doc: str, schema: type[BaseModel], *, config_default: str | None = None,
               config_help: str = "YAML config (default: none, every key at its default)",
               quiet_help: str = "no Ray log lines", example: str = "bs_val=64"):
    """A config job's command line: ``--config``, ``--quiet``, ``key=value`` overrides, and every key of
    ``schema`` with its default in ``--help``; the job adds its own flags."""
    import argparse

    parser = argparse.ArgumentParser(
        description=doc,
        epilog="config keys and their defaults (raymetric/config.py documents each):\n  "
        + "\n  ".join(describe_keys(schema)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=config_default, help=config_help)
    parser.add_argument("--quiet", action="store_true", help=quiet_help)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {example}")
    return parser


def flag_overrides(args, keys: Sequence[str]) -> list[str]:
    """``args.overrides`` plus ``key=value`` for each of ``keys`` given as a flag (``--checkpoint X``)."""
    return list(args.overrides) + [f"{key}={getattr(args, key)}" for key in keys if getattr(args, key)]


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


def check_picture(picture: PictureConfig, metric_args: MetricArgs) -> None:
    """The picture ranks queries by a per-query metric that is computed. Raises ConfigError naming the key."""
    per_query = [n for n in metric_args.metric_names() if n.split("@")[0] in ("cmc", "precision", "map")]
    if picture.n_queries and picture.metric is not None and picture.metric not in per_query:
        raise ConfigError(f"config key picture.metric: {picture.metric!r} is not a per-query metric computed; "
                          f"computed: {per_query}")
    if picture.n_queries and not per_query:
        raise ConfigError("config key picture.n_queries: a picture needs a per-query metric (cmc, precision or map)")


def check_config(cfg: TrainConfig, extractors: dict | None = None) -> None:
    """Check every registry name, every block's arguments and cross-key consistency. Raises ConfigError.

    Needs no dataset and starts no worker: cheap blocks are built once here so that their own
    checks run on the driver.
    """
    import torch

    from raymetric.data.transforms import TRANSFORMS
    from raymetric.extractors import EXTRACTORS
    from raymetric.losses import CRITERIA, build_criterion
    from raymetric.losses import RUNTIME_ARGS as CRITERION_RUNTIME_ARGS
    from raymetric.losses import STATED_RUNTIME_ARGS
    from raymetric.miners import MINERS
    from raymetric.optim import OPTIMIZERS, SCHEDULERS
    from raymetric.samplers import RUNTIME_ARGS as SAMPLER_RUNTIME_ARGS
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
        if weights and os.path.isdir(weights):  # a raymetric run, checkpoint or export folder
            from raymetric.export import ExportError, extractor_weights_file

            try:
                extractor_weights_file(weights)
            except ExportError as err:
                raise ConfigError(f"config key extractor.args.weights: {err}") from None

    workers = cfg.ray.num_workers
    if cfg.sampler is None:
        if cfg.bs_train % workers:
            raise ConfigError(
                f"config key bs_train={cfg.bs_train} must be divisible by ray.num_workers={workers}: "
                "each global batch is split evenly across workers (sampler is null)"
            )
    else:
        sampler_factory = _lookup("sampler", SAMPLERS, cfg.sampler.name)
        check_args("sampler", sampler_factory, cfg.sampler.args, provided=SAMPLER_RUNTIME_ARGS)
        n_labels, n_categories = cfg.sampler.args.get("n_labels"), cfg.sampler.args.get("n_categories", 1)
        if isinstance(n_labels, int) and isinstance(n_categories, int) and (n_labels * n_categories) % workers:
            what = f"n_labels={n_labels}" if "n_categories" not in cfg.sampler.args else (
                f"n_categories x n_labels = {n_categories} x {n_labels}")
            raise ConfigError(
                f"config key sampler.args.{what} must be divisible by ray.num_workers="
                f"{workers}: each global step's labels are split evenly across workers"
            )

    crit_factory = _lookup("criterion", CRITERIA, cfg.criterion.name)
    # The run provides the embedding size and the number of labels; OML's configs also state them in
    # criterion.args, which is accepted (the run checks them). Stand-ins run the criterion's own checks.
    stated = {k: cfg.criterion.args.get(k, v) for k, v in {"in_features": 8, "num_classes": 2}.items()
              if k in inspect.signature(crit_factory).parameters}
    provided = tuple(k for k in CRITERION_RUNTIME_ARGS if k not in STATED_RUNTIME_ARGS)
    check_args("criterion", crit_factory, stated | cfg.criterion.args, provided=provided)
    if cfg.criterion.miner is not None:
        miner_factory = _lookup("criterion.miner", MINERS, cfg.criterion.miner.name)
        check_args("criterion.miner", miner_factory, cfg.criterion.miner.args, provided=("seed",))
        if "miner" not in inspect.signature(crit_factory).parameters:
            raise ConfigError(f"config key criterion.miner: criterion {cfg.criterion.name!r} takes no miner")
    miner = cfg.criterion.miner.model_dump() if cfg.criterion.miner else None
    criterion = _build(
        "criterion", lambda: build_criterion(cfg.criterion.name, cfg.criterion.args, miner, seed=cfg.seed, **stated)
    )

    opt_factory = _lookup("optimizer", OPTIMIZERS, cfg.optimizer.name)
    check_args("optimizer", opt_factory, cfg.optimizer.args, provided=("params",))
    dummy = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = _build("optimizer", lambda: opt_factory(dummy, **cfg.optimizer.args))
    for group, group_args in cfg.optimizer.groups.items():
        unknown = sorted(set(group_args) - set(optimizer.defaults))
        if unknown:
            raise ConfigError(
                f"config key optimizer.groups.{group}: unknown argument(s) {unknown} for {cfg.optimizer.name}; "
                f"accepted: {sorted(optimizer.defaults)}"
            )
        merged = cfg.optimizer.args | group_args
        _build(f"optimizer.groups.{group}", lambda: opt_factory([torch.nn.Parameter(torch.zeros(1))], **merged))
    if cfg.scheduling is not None:
        block = cfg.scheduling.scheduler
        sched_factory = _lookup("scheduling.scheduler", SCHEDULERS, block.name)
        check_args("scheduling.scheduler", sched_factory, block.args, provided=("optimizer",))
        _build("scheduling.scheduler", lambda: sched_factory(optimizer, **block.args))
    if cfg.checkpoint_every_n_steps is not None and cfg.checkpoint_every_n_steps % cfg.accumulate_grad_batches:
        raise ConfigError(
            f"config key checkpoint_every_n_steps={cfg.checkpoint_every_n_steps} must be a multiple of "
            f"accumulate_grad_batches={cfg.accumulate_grad_batches}: checkpoints are taken after optimizer steps"
        )
    if cfg.freeze_n_epochs and cfg.extractor.name == "timm" and not list(criterion.parameters()):
        args = cfg.extractor.args
        if not args.get("embedding_size") and not args.get("batchnorm_neck"):
            raise ConfigError(
                f"config key freeze_n_epochs={cfg.freeze_n_epochs}: nothing would train while the backbone is "
                "frozen (the extractor has no head: set extractor.args.embedding_size or batchnorm_neck, "
                "or use a criterion with parameters such as arcface)"
            )

    if cfg.log_images:
        check_picture(cfg.picture, cfg.metric_args)
    if cfg.compile:
        import torch._dynamo

        if cfg.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise ConfigError(f"config key compile_backend: unknown backend {cfg.compile_backend!r}; known: "
                              f"{sorted(torch._dynamo.list_backends(exclude_tags=()))}")
    if cfg.sync_batchnorm and not cfg.ray.use_gpu:
        raise ConfigError("config key sync_batchnorm=true needs ray.use_gpu=true: torch's SyncBatchNorm runs on "
                          "CUDA only (on CPU each worker normalises its share of the batch)")
    if cfg.fused_optimizer is True:
        from raymetric.optim import has_fused

        if not has_fused(cfg.optimizer.name):
            raise ConfigError(f"config key fused_optimizer: optimizer {cfg.optimizer.name!r} has no fused kernel")
    metric = checkpoint_metric_key(cfg)
    known = cfg.metric_args.metric_names()
    if metric not in known:
        raise ConfigError(
            f"config key metric_for_checkpointing: {cfg.metric_for_checkpointing!r} is not computed; "
            f"computed: {known} (set metric_args.*_top_k to add it)"
        )
    from raymetric.search import check_retrieval_config

    check_retrieval_config(cfg.retrieval, cfg.metric_args)
    from raymetric.data.loading import check_loader_settings

    problem = check_loader_settings(
        cfg.loader.augment_on, cfg.loader.decode, cfg.transforms_train.name, cfg.ray.use_gpu, cfg.on_bad_image,
        cfg.loader.cache, cfg.loader.source,
    )
    if problem:
        raise ConfigError(problem)
    if cfg.loader.cache:
        cache_size(cfg)  # raises when there is none
    if cfg.demo_data is not None:
        from raymetric.data.demo import SIZES

        if cfg.demo_data.size not in SIZES:
            raise ConfigError(f"config key demo_data.size: unknown size {cfg.demo_data.size!r}; known: {sorted(SIZES)}")

    from raymetric.loggers import LOGGERS, missing_requirement

    for i, block in enumerate(cfg.logger):
        key = "logger" if len(cfg.logger) == 1 else f"logger[{i}]"
        check_args(key, _lookup(key, LOGGERS, block.name), block.args, provided=("run_dir",))
        missing = missing_requirement(block.name)
        if missing:
            raise ConfigError(f"config key {key}.name={block.name!r}: {missing}")
