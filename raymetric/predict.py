"""Predict: embeddings of a folder of images or a CSV on Ray Data, a faiss index beside them, and search.

``run_predict`` (``python jobs/predict.py``) checks everything on the driver, embeds the images with a Ray
Data actor pool (the code the stand-alone validation uses, :func:`raymetric.validate.ray_data.embed_frame`)
and writes a run folder:

- ``embeddings.parquet``: the embeddings table of :mod:`raymetric.embeddings`, one row per image, in the
  order of the CSV or of the sorted file names. ``label``, ``is_query``, ``is_gallery``, ``category`` and
  ``sequence`` come from the CSV where it has them; ``label`` is ``-1`` where it has none, and rows that
  are neither query nor gallery (a folder, a plain CSV, the train rows of OML's CSV) are both.
  ``jobs/validate.py --embeddings`` scores such a table when it has labels.
- ``index.faiss`` and ``index.json``: a faiss index over the gallery rows (``index.type``: ``flat``, exact;
  ``ivf``, inverted lists, approximate, ``index.nprobe`` lists visited per query), L2 distances like
  validation, ids = rows of the table;
- ``extractor/``: the extractor and its transform as ``jobs/export.py`` writes them, so the folder
  embeds new images on its own;
- ``config.yaml``; the last line printed is ``run: <directory>``.

``ImageIndex.load(run_folder)`` is the search API: it embeds new images (paths or PIL images) in this
process and returns their top-k rows with distances; ``python jobs/search.py`` is its command line.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from PIL import Image

from raymetric.config import ConfigError, PredictConfig, make_run_dir
from raymetric.embeddings import EmbeddingsTable, optional_strings, read_embeddings, write_embeddings

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
EMBEDDINGS_FILE = "embeddings.parquet"
INDEX_FILE = "index.faiss"
INDEX_META_FILE = "index.json"
EXTRACTOR_DIR = "extractor"


@dataclass
class ExtractorSource:
    """A trained extractor as the predict job needs it: what rebuilds it, its tensors, its transform."""

    extractor: dict  # {"name", "args"} for raymetric.extractors.build_extractor
    state: dict  # the extractor's state dict
    transforms: dict  # {"name", "args"}: the checkpoint's transforms_val, or the export's transform
    path: str  # the state.pt or export folder it came from
    checkpoint: dict | None = None  # the training checkpoint as read (None: an export folder)
    meta: dict | None = None  # the export folder's extractor.json (None: a training checkpoint)


def read_extractor_source(path: str, which: str = "best") -> ExtractorSource:
    """The extractor of a run folder, checkpoint folder, ``state.pt`` or export folder.

    Raises ConfigError naming the key ``checkpoint`` when there is none or it does not load.
    """
    from raymetric.export import (
        META_FILE,
        WEIGHTS_FILE,
        ExportError,
        read_checkpoint,
        read_export_meta,
        trained_extractor_spec,
    )

    if not os.path.exists(path):
        raise ConfigError(f"config key checkpoint: no such file or folder: {path!r}")
    try:
        if os.path.isfile(os.path.join(path, META_FILE)):
            from safetensors.torch import load_file

            meta = read_export_meta(path)
            return ExtractorSource(meta["extractor"], load_file(os.path.join(path, WEIGHTS_FILE)),
                                   meta["transforms"], os.path.abspath(path), meta=meta)
        state = read_checkpoint(path, which)
    except (ExportError, OSError, KeyError, RuntimeError, ValueError) as err:
        raise ConfigError(f"config key checkpoint: {path!r} holds no readable extractor: "
                          f"{type(err).__name__}: {err}") from None
    cfg = state["config"]
    return ExtractorSource(trained_extractor_spec(cfg["extractor"]), state["model"], cfg["transforms_val"],
                           os.path.abspath(state["path"]), checkpoint=state)


def image_files(folder: str) -> list[str]:
    """The image files under ``folder`` (searched recursively, by suffix), sorted by path."""
    return sorted(os.path.join(root, f) for root, _, files in os.walk(folder)
                  for f in files if f.lower().endswith(IMAGE_SUFFIXES))


def _folder_frame(folder: str) -> pd.DataFrame:
    paths = image_files(folder)
    if not paths:
        raise ConfigError(f"config key images: no image files ({', '.join(IMAGE_SUFFIXES)}) under {folder!r}")
    return pd.DataFrame({"path": [os.path.abspath(p) for p in paths]})


def _csv_frame(cfg: PredictConfig) -> pd.DataFrame:
    from raymetric.data.csv import (
        _BOOL_TOKENS,
        BBOX_COLUMNS,
        REQUIRED_COLUMNS,
        DatasetError,
        _check_files,
        _count,
        _format_problems,
        _list_rows,
        _parse_bboxes,
        _parse_ints,
        _parse_paths,
        _text,
        load_dataset_csv,
    )

    csv_path = cfg.dataframe
    if not os.path.isfile(csv_path):
        raise ConfigError(f"config key dataframe: no such file: {csv_path!r}")
    root = cfg.dataset_root or os.path.dirname(os.path.abspath(csv_path))
    header = pd.read_csv(csv_path, nrows=0).columns
    if all(c in header for c in REQUIRED_COLUMNS):  # OML's dataset CSV: every check of training
        df = load_dataset_csv(csv_path, root, check_files=True, require_splits=())
        if cfg.split != "all":
            df = df[df["split"] == cfg.split]
            if not len(df):
                raise DatasetError(f"{csv_path}: column 'split': no {cfg.split!r} rows (config key split)")
        return df
    if cfg.split != "all":
        raise ConfigError(f"config key split={cfg.split!r}: {csv_path} has no OML columns {list(REQUIRED_COLUMNS)}")
    if "path" not in header:
        raise DatasetError(f"{csv_path}: missing required column 'path' (found columns: {list(header)})")
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=True)  # every cell as text, parsed below
    if not len(df):
        raise DatasetError(f"{csv_path}: no rows")
    problems = []
    path, has_path = _parse_paths(df["path"], root, problems)
    if has_path.all():
        df["path"] = path
        problems += _check_files(path, root)
    if "label" in df:  # optional per row: an empty label is -1 (unknown)
        text = _text(df["label"])
        labels, bad = _parse_ints(text)
        if bad.any():
            problems.append(f"column 'label': {_count(bad, 'row')} not integers: {_list_rows(text[bad])}")
        df["label"] = labels.fillna(-1).astype("int64")
    if all(c in df for c in BBOX_COLUMNS):  # optional boxes, checked as in OML's CSV
        df = df.assign(**_parse_bboxes(df, problems))
    else:
        df = df.drop(columns=[c for c in BBOX_COLUMNS if c in df])
    for column in ("is_query", "is_gallery"):  # optional: empty = not set
        if column in df:
            text = _text(df[column])
            value = text.str.lower().map(_BOOL_TOKENS)
            bad = text.notna() & value.isna()
            if bad.any():
                problems.append(f"column {column!r}: {_count(bad, 'row')} not true/false: {_list_rows(text[bad])}")
            df[column] = value.fillna(False).astype(bool)
    if problems:
        raise DatasetError(_format_problems(csv_path, problems))
    return df


def predict_frame(cfg: PredictConfig) -> pd.DataFrame:
    """The rows to embed (``path`` absolute, optional boxes, labels, flags), checked; index = row in the CSV."""
    if (cfg.images is None) == (cfg.dataframe is None):
        raise ConfigError("give exactly one of config keys images (a folder) and dataframe (a CSV with 'path')")
    if cfg.images is not None:
        if not os.path.isdir(cfg.images):
            raise ConfigError(f"config key images: not a folder: {cfg.images!r}")
        return _folder_frame(cfg.images)
    return _csv_frame(cfg)


def table_of(frame: pd.DataFrame, embeddings: np.ndarray) -> EmbeddingsTable:
    """The embeddings table of predicted rows (see the module docstring for the columns)."""
    n = len(frame)
    query = frame["is_query"].to_numpy(bool) if "is_query" in frame else np.zeros(n, bool)
    gallery = frame["is_gallery"].to_numpy(bool) if "is_gallery" in frame else np.zeros(n, bool)
    neither = ~query & ~gallery
    query, gallery = query | neither, gallery | neither

    return EmbeddingsTable(
        embeddings=np.ascontiguousarray(embeddings, np.float32),
        labels=frame["label"].to_numpy(np.int64) if "label" in frame else np.full(n, -1, np.int64),
        is_query=query, is_gallery=gallery,
        categories=optional_strings(frame, "category"), sequences=optional_strings(frame, "sequence"),
        paths=optional_strings(frame, "path"),
    ).check("predicted rows")


# ---------------------------------------------------------------- the faiss index


def ivf_lists(cfg_nlist: int | None, n: int) -> int:
    """IVF lists for ``n`` gallery items: the config's, or about ``4 sqrt(n)`` with >= 39 items per list.

    >>> ivf_lists(None, 100_000), ivf_lists(None, 50), ivf_lists(7, 1000)
    (1264, 1, 7)
    """
    if cfg_nlist is not None:
        return cfg_nlist
    return max(1, min(int(4 * n ** 0.5), n // 39))


def build_index(embeddings: np.ndarray, ids: np.ndarray, kind: str, nlist: int, nprobe: int):
    """A faiss index of ``embeddings`` (L2) whose search returns ``ids``."""
    import faiss

    x = np.ascontiguousarray(embeddings, np.float32)
    dim = x.shape[1]
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatL2(dim))
    elif kind == "ivf":
        quantizer = faiss.IndexFlatL2(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_L2)
        index.train(x)
        index.nprobe = nprobe
    else:
        raise ValueError(f"index type {kind!r}: expected 'flat' or 'ivf'")
    index.add_with_ids(x, np.ascontiguousarray(ids, np.int64))
    return index


# ---------------------------------------------------------------- the job


@dataclass
class PredictResult:
    run_dir: str
    n_items: int
    index: str | None  # the index file, or None (index.type: none)


def prepare_predict(cfg: PredictConfig) -> tuple[PredictConfig, ExtractorSource, pd.DataFrame]:
    """Driver-side checks before Ray starts: config, extractor, images. Raises ConfigError or DatasetError."""
    from raymetric.data.transforms import build_transforms

    source = read_extractor_source(cfg.checkpoint, cfg.which)
    from raymetric.extractors import EXTRACTORS

    if source.extractor["name"] not in EXTRACTORS:
        raise ConfigError(f"config key checkpoint: its extractor {source.extractor['name']!r} is not a built-in one "
                          f"({sorted(EXTRACTORS)}); embed with your own code")
    if cfg.transforms is not None:
        try:
            build_transforms(cfg.transforms.name, cfg.transforms.args)
        except Exception as err:
            raise ConfigError(f"config key transforms: {type(err).__name__}: {err}") from None
        source.transforms = cfg.transforms.model_dump()
    frame = predict_frame(cfg)
    n_gallery = int(table_of(frame, np.zeros((len(frame), 1), np.float32)).is_gallery.sum())
    if cfg.index.type == "ivf" and ivf_lists(cfg.index.nlist, n_gallery) > n_gallery:
        raise ConfigError(f"config key index.nlist={cfg.index.nlist}: more lists than gallery items ({n_gallery})")
    if cfg.index.type != "none":
        try:
            import faiss  # noqa: F401
        except ImportError:
            raise ConfigError("config key index.type: faiss is not installed (index.type: none writes no index)") from None
    cfg = cfg.model_copy(update={"checkpoint": source.path,
                                 "ray": cfg.ray.model_copy(update={"storage_path": os.path.abspath(cfg.ray.storage_path)})})
    return cfg, source, frame


def _write_extractor(source: ExtractorSource, out_dir: str) -> None:
    """The extractor and the transform this job embedded with, as an export folder."""
    from raymetric.data.transforms import build_transforms
    from raymetric.export import META_FILE, WEIGHTS_FILE, export_state, input_size

    if source.checkpoint is not None:
        export_state(source.checkpoint, out_dir, formats=("state_dict",), transforms=source.transforms)
        return
    os.makedirs(out_dir, exist_ok=True)
    shutil.copy(os.path.join(source.path, WEIGHTS_FILE), os.path.join(out_dir, WEIGHTS_FILE))
    size = input_size(build_transforms(source.transforms["name"], source.transforms["args"]))  # of the transform used
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump(source.meta | {"transforms": source.transforms, "input_size": size}, f, indent=2)


def run_predict(cfg: PredictConfig, *, quiet: bool = False) -> PredictResult:
    """The whole predict job (see the module docstring)."""
    from raymetric.ray_env import init_ray
    from raymetric.validate.ray_data import embed_frame

    cfg, source, frame = prepare_predict(cfg)
    run_dir = make_run_dir(cfg)
    init_ray(quiet=quiet)
    emb = embed_frame(frame.reset_index(drop=True), source.state, source.extractor, source.transforms,
                      batch_size=cfg.bs, ray_cfg=cfg.ray, bf16=cfg.precision == "bf16")
    table = table_of(frame, emb)
    write_embeddings(table, os.path.join(run_dir, EMBEDDINGS_FILE))
    _write_extractor(source, os.path.join(run_dir, EXTRACTOR_DIR))
    index_path = None
    if cfg.index.type != "none":
        import faiss

        ids = np.flatnonzero(table.is_gallery)
        nlist = ivf_lists(cfg.index.nlist, len(ids))
        index = build_index(table.embeddings[ids], ids, cfg.index.type, nlist, cfg.index.nprobe)
        index_path = os.path.join(run_dir, INDEX_FILE)
        faiss.write_index(index, index_path)
        meta = {"type": cfg.index.type, "metric": "l2", "dim": table.dim, "n_items": int(len(ids)),
                "nlist": nlist if cfg.index.type == "ivf" else None, "nprobe": cfg.index.nprobe,
                "embeddings": EMBEDDINGS_FILE, "extractor": EXTRACTOR_DIR, "checkpoint": source.path}
        with open(os.path.join(run_dir, INDEX_META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
    return PredictResult(run_dir, len(table), index_path)


# ---------------------------------------------------------------- search


@dataclass
class Hits:
    """Top-k of each query: ``rows`` of the embeddings table (``-1``: fewer than k items) and L2 distances."""

    rows: np.ndarray  # [Q, k] int64
    distances: np.ndarray  # [Q, k] float32, ascending; inf where rows is -1


class ImageIndex:
    """A predict run folder, loaded for search: its index, its table and its extractor.

    >>> index = ImageIndex.load("runs/<predict run>")          # doctest: +SKIP
    >>> hits = index.search(["query.jpg"], k=5)                # doctest: +SKIP
    >>> index.items(hits.rows[0])[["path", "label"]]           # doctest: +SKIP
    """

    def __init__(self, index, table: EmbeddingsTable, model: torch.nn.Module, transform, meta: dict):
        self.index, self.table, self.model, self.transform, self.meta = index, table, model, transform, meta
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, run_dir: str, *, nprobe: int | None = None, device: str | None = None) -> "ImageIndex":
        """Loads ``run_dir`` (a predict run folder); ``nprobe`` overrides an IVF index's."""
        import faiss

        from raymetric.export import load_exported

        meta_path = os.path.join(run_dir, INDEX_META_FILE)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{run_dir}: no {INDEX_META_FILE}; not a predict run folder with an index "
                                    f"(python jobs/predict.py writes one)")
        with open(meta_path) as f:
            meta = json.load(f)
        index = faiss.read_index(os.path.join(run_dir, INDEX_FILE))
        if meta["type"] == "ivf":
            faiss.extract_index_ivf(index).nprobe = nprobe or meta["nprobe"]
        table = read_embeddings(os.path.join(run_dir, meta["embeddings"]))
        model, transform = load_exported(os.path.join(run_dir, meta["extractor"]))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(index, table, model.to(device), transform, meta)

    @torch.no_grad()
    def embed(self, images: Sequence[str | os.PathLike | Image.Image], batch_size: int = 64) -> np.ndarray:
        """``[n, D]`` embeddings of image files or PIL images, with the folder's extractor and transform."""
        from raymetric.data.dataset import read_image

        out = []
        for start in range(0, len(images), batch_size):
            batch = [im if isinstance(im, Image.Image) else read_image(os.fspath(im))
                     for im in images[start:start + batch_size]]
            x = torch.stack([self.transform(im.convert("RGB")) for im in batch]).to(self.device)
            out.append(self.model(x).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.table.dim), np.float32)

    def search(self, queries: np.ndarray | Sequence[str | os.PathLike | Image.Image], k: int = 5) -> Hits:
        """The ``k`` nearest gallery rows of each query: embeddings ``[Q, D]``, or images to embed first."""
        if k < 1:
            raise ValueError(f"k={k}: ask for at least one neighbour")
        if not isinstance(queries, np.ndarray):
            queries = self.embed(queries)
        queries = queries.reshape(-1, self.table.dim) if queries.ndim == 1 else queries
        if queries.ndim != 2 or queries.shape[1] != self.table.dim:
            raise ValueError(f"queries of shape {queries.shape}: expected [Q, {self.table.dim}] embeddings")
        dist2, rows = self.index.search(np.ascontiguousarray(queries, np.float32), k)
        dist = np.sqrt(np.maximum(dist2, 0)).astype(np.float32)  # faiss: squared L2
        dist[rows < 0] = np.inf
        return Hits(rows.astype(np.int64), dist)

    def items(self, rows: np.ndarray) -> pd.DataFrame:
        """The table's ``path``, ``label`` (and ``category``, ``sequence``) of rows (``-1`` rows left out)."""
        rows = np.asarray(rows)
        rows = rows[rows >= 0]
        columns = {"row": rows, "label": self.table.labels[rows]}
        for column, values in (("path", self.table.paths), ("category", self.table.categories),
                               ("sequence", self.table.sequences)):
            if values is not None:
                columns[column] = values[rows]
        return pd.DataFrame(columns)
