"""Ray Data for the stand-alone validation: embedding a dataset with an actor pool, and a sharded search.

Only this module of the package touches Ray (imported inside functions, so the rest loads without it).
"""

from __future__ import annotations


import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from raymetric.embeddings import EmbeddingsTable
from raymetric.export import trained_extractor_spec
from raymetric.ray_env import quiet_ray_data
from raymetric.retrieval import TopK, merge_topk, own_rows, pair_distance_counts, topk_shard
from raymetric.search import SearchSettings
from raymetric.validate.plan import ValidationPlan, table_from_frame


class _DecodeEmbed:
    """Ray Data actor: rows -> images (decode, crop, transform) -> embeddings, or images -> embeddings."""

    def __init__(self, refs: list, extractor: dict, transforms: dict | None, threads: int, bf16: bool = False):
        import ray

        from raymetric.data.dataset import ImageDataset
        from raymetric.data.transforms import build_transforms
        from raymetric.extractors import build_extractor

        torch.set_num_threads(threads)
        state, frame = ray.get(refs)  # Ray: passed as refs in a list, fetched once per actor
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = build_extractor(extractor["name"], extractor["args"])
        self.model.load_state_dict(state)
        self.model.eval().to(self.device)
        self.bf16 = bf16 and self.device.type == "cuda"  # as training: bf16 autocast on GPU only
        self.dataset = None if transforms is None else ImageDataset(
            frame, build_transforms(transforms["name"], transforms["args"]))

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        if self.dataset is not None:
            images = torch.stack([self.dataset[int(i)]["image"] for i in batch["row"]])
        else:
            images = torch.as_tensor(batch["image"])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            emb = self.model(images.to(self.device)).float().cpu().numpy()
        return {"row": batch["row"], "embedding": emb}


def _decode(batch: dict, refs: list, transforms: dict) -> dict:
    """Ray Data task (GPU runs): rows -> transformed images, on CPU workers."""
    import ray

    from raymetric.data.dataset import ImageDataset
    from raymetric.data.transforms import build_transforms

    frame = ray.get(refs[0])
    dataset = ImageDataset(frame, build_transforms(transforms["name"], transforms["args"]))
    images = torch.stack([dataset[int(i)]["image"] for i in batch["row"]])
    return {"row": batch["row"], "image": images.numpy()}


def embed_with_ray_data(plan: ValidationPlan) -> EmbeddingsTable:
    """Embeddings of the plan's validation rows with a Ray Data actor pool (``ray.num_workers`` actors)."""
    cfg = plan.cfg
    extractor = trained_extractor_spec(plan.train_cfg.extractor.model_dump())
    emb = embed_frame(plan.frame, plan.model_state, extractor, cfg.transforms_val.model_dump(), batch_size=cfg.bs_val,
                      ray_cfg=cfg.ray, bf16=cfg.precision == "bf16")
    return table_from_frame(plan.frame, emb)


def embed_frame(frame: pd.DataFrame, state: dict, extractor: dict, transforms: dict, *, batch_size: int,
                ray_cfg, bf16: bool = False) -> np.ndarray:
    """``[len(frame), D]`` embeddings of a frame's images (rows with ``path``, optional boxes) on Ray Data.

    Args:
        frame: the rows to embed, in order; ``label`` is not needed.
        state: the extractor's state dict.
        extractor: ``{"name", "args"}`` that :func:`raymetric.extractors.build_extractor` rebuilds it from.
        transforms: ``{"name", "args"}`` of the image transform.
        batch_size: images per inference batch.
        ray_cfg: ``raymetric.config.RayConfig``: ``num_workers`` actors, ``cpus_per_worker``, ``use_gpu``
            (decoding in CPU tasks, the model in GPU actors).
        bf16: bf16 autocast of the model on GPU actors (CPU actors run fp32).
    """
    import ray
    import ray.data

    from raymetric.data.dataset import ImageDataset  # noqa: F401  (fail here, not in an actor)

    quiet_ray_data()
    if "label" not in frame:
        frame = frame.assign(label=np.zeros(len(frame), np.int64))  # ImageDataset's items carry one
    refs = [ray.put(state), ray.put(frame)]
    n_blocks = max(ray_cfg.num_workers * 2, -(-len(frame) // (batch_size * 4)))
    parts = np.array_split(np.arange(len(frame), dtype=np.int64), min(n_blocks, len(frame)))
    # Blocks built on the driver: no repartition, which can starve an actor pool of CPUs (RAY_NOTES §5).
    ds = ray.data.from_pandas([pd.DataFrame({"row": part}) for part in parts if len(part)])
    pool = ray.data.ActorPoolStrategy(size=ray_cfg.num_workers)
    threads = max(1, int(ray_cfg.cpus_per_worker))
    if ray_cfg.use_gpu:
        ds = ds.map_batches(_decode, fn_kwargs={"refs": refs[1:], "transforms": transforms}, batch_size=batch_size,
                            num_cpus=1)
        ds = ds.map_batches(_DecodeEmbed, fn_constructor_kwargs={"refs": refs, "extractor": extractor,
                                                                 "transforms": None, "threads": threads, "bf16": bf16},
                            batch_size=batch_size, compute=pool, num_gpus=1, num_cpus=0)
    else:
        ds = ds.map_batches(_DecodeEmbed, fn_constructor_kwargs={"refs": refs, "extractor": extractor,
                                                                 "transforms": transforms, "threads": threads, "bf16": bf16},
                            batch_size=batch_size, compute=pool, num_cpus=ray_cfg.cpus_per_worker)
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    row = np.concatenate([p["row"] for p in parts])
    emb = np.concatenate([p["embedding"] for p in parts])
    out = np.empty_like(emb)
    out[row] = emb
    return out


def _shard_arrays(batch: pa.Table) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    column = batch.column("embedding").combine_chunks()
    emb = np.asarray(column.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(batch.num_rows, -1)
    shard = int(batch.column("shard")[0].as_py())
    return (torch.from_numpy(emb.copy()), torch.from_numpy(batch.column("id").to_numpy().copy()),
            torch.from_numpy(batch.column("label").to_numpy().copy()),
            torch.from_numpy(batch.column("sequence").to_numpy().copy()), shard)


def _search_shard(batch: pa.Table, queries: list, settings: dict, threads: int, use_gpu: bool) -> dict:
    """Ray Data task: the top-k of every query of the chunk over one gallery shard (one block)."""
    import ray

    torch.set_num_threads(threads)
    q = ray.get(queries[0])  # Ray: the chunk is in the object store once, shared by every task
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    emb, ids, labels, sequences, shard = (x.to(device) if torch.is_tensor(x) else x for x in _shard_arrays(batch))
    has_seq = q["sequences"] is not None
    settings = SearchSettings(**settings)
    part = topk_shard(torch.from_numpy(q["emb"]).to(device), emb, settings.k,
                      query_labels=torch.from_numpy(q["labels"]).to(device), gallery_labels=labels, gallery_ids=ids,
                      query_ids=torch.from_numpy(q["rows"]).to(device),
                      query_sequences=torch.from_numpy(q["sequences"]).to(device) if has_seq else None,
                      gallery_sequences=sequences if has_seq else None, **settings.shard_kwargs()).to("cpu")
    n = len(q["rows"])
    return {"query": np.arange(n), "shard": np.full(n, shard), "dist": part.dist.numpy(),
            "ids": part.gallery_ids.numpy(), "n_gt": part.n_gt.numpy(),
            "widened": np.full(n, part.stats["queries_widened"])}


def _count_shard(batch: pa.Table, queries: list, windows: list, n_buckets: int, threads: int) -> dict:
    """Ray Data task: the pair-distance counts of the query chunk against one gallery shard."""
    import ray

    torch.set_num_threads(threads)
    q = ray.get(queries[0])
    emb, ids, labels, sequences, shard = _shard_arrays(batch)
    has_seq = q["sequences"] is not None
    rows = torch.from_numpy(q["rows"])
    counts = pair_distance_counts(
        torch.from_numpy(q["emb"]), emb, query_labels=torch.from_numpy(q["labels"]), gallery_labels=labels,
        windows=[tuple(w) for w in windows], n_buckets=n_buckets, self_row=own_rows(rows, ids),
        query_sequences=torch.from_numpy(q["sequences"]) if has_seq else None,
        gallery_sequences=sequences if has_seq else None)
    return {"shard": np.array([shard]), "counts": counts.reshape(1, -1).numpy()}


class RayDataSearcher:
    """Exact top-k over a gallery split into shards, one Ray Data block each, searched by Ray tasks.

    The driver keeps the table (for queries, labels and post-processing); each query chunk goes to the
    object store once and every shard's task searches it; the driver merges the shards' top-k as they
    arrive, so it holds ``[Q, k]`` results, never a shard's scores.
    """

    def __init__(self, table: EmbeddingsTable, settings: SearchSettings, n_shards: int, threads: int = 1,
                 use_gpu: bool = False):
        import ray.data

        quiet_ray_data()
        self.table, self.settings, self.threads, self.use_gpu = table, settings, threads, use_gpu
        self.labels = torch.from_numpy(table.labels)
        codes = table.sequence_codes()
        self.sequences = torch.from_numpy(codes) if (codes != -1).any() else None
        gallery_ids = np.flatnonzero(table.is_gallery)
        shards = []
        for shard, ids in enumerate(np.array_split(gallery_ids, n_shards)):
            if not len(ids):
                continue
            flat = pa.array(table.embeddings[ids].reshape(-1), pa.float32())
            shards.append(pa.table({
                "id": pa.array(ids, pa.int64()), "label": pa.array(table.labels[ids], pa.int64()),
                "sequence": pa.array(codes[ids], pa.int64()), "shard": pa.array(np.full(len(ids), shard), pa.int64()),
                "embedding": pa.FixedSizeListArray.from_arrays(flat, table.dim)}))
        self.n_shards = len(shards)
        # Blocks straight from Arrow tables: no repartition (RAY_NOTES §5).
        self.dataset = ray.data.from_arrow(shards)

    def _chunk_ref(self, query_emb: torch.Tensor, rows: torch.Tensor):
        import ray

        return ray.put({"emb": query_emb.float().numpy(), "rows": rows.numpy(), "labels": self.table.labels[rows.numpy()],
                        "sequences": None if self.sequences is None else self.sequences[rows].numpy()})

    def search(self, query_emb: torch.Tensor, query_rows: torch.Tensor) -> TopK:
        k, chunk = self.settings.k, self.settings.query_chunk
        parts = []
        for start in range(0, len(query_rows), chunk):
            rows = query_rows[start:start + chunk]
            ref = self._chunk_ref(query_emb[start:start + chunk], rows)
            n = len(rows)
            best = TopK(torch.full((n, k), float("inf")), torch.full((n, k), -1, dtype=torch.int64),
                        torch.zeros(n, dtype=torch.int64), {"queries": n, "queries_widened": 0})
            out = self.dataset.map_batches(
                _search_shard, fn_kwargs={"queries": [ref], "settings": self.settings.__dict__, "threads": self.threads,
                                          "use_gpu": self.use_gpu},
                batch_size=None, batch_format="pyarrow", num_cpus=self.threads, num_gpus=1 if self.use_gpu else 0)
            for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
                for shard in np.unique(batch["shard"]):  # a batch could hold several shards' rows
                    sel = batch["shard"] == shard
                    q = torch.from_numpy(batch["query"][sel])
                    part = TopK(torch.from_numpy(batch["dist"][sel]), torch.from_numpy(batch["ids"][sel]),
                                torch.from_numpy(batch["n_gt"][sel]))
                    merged = merge_topk([best[q], part], k)
                    best.dist[q], best.gallery_ids[q], best.n_gt[q] = merged.dist, merged.gallery_ids, merged.n_gt
                    best.stats["queries_widened"] += int(batch["widened"][sel][0])
            parts.append(best)
        return TopK.cat(parts) if parts else TopK(torch.zeros(0, k), torch.zeros(0, k, dtype=torch.int64),
                                                  torch.zeros(0, dtype=torch.int64))

    def gallery_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        emb = torch.from_numpy(self.table.embeddings)[ids.clamp_min(0)]
        return emb * (ids >= 0)[..., None]

    def pair_counts(self, query_emb: torch.Tensor, query_rows: torch.Tensor, windows: list[tuple[int, int]],
                    n_buckets: int) -> torch.Tensor:
        """Distance counts of all (query, gallery item) pairs in key windows, one Ray task per shard and
        query chunk (:func:`raymetric.retrieval.pair_distance_counts`)."""
        total = torch.zeros(len(windows) * 2 * (n_buckets + 2), dtype=torch.int64)
        for start in range(0, len(query_rows), self.settings.query_chunk):
            rows = query_rows[start:start + self.settings.query_chunk]
            ref = self._chunk_ref(query_emb[start:start + self.settings.query_chunk], rows)
            out = self.dataset.map_batches(
                _count_shard, fn_kwargs={"queries": [ref], "windows": [list(w) for w in windows],
                                         "n_buckets": n_buckets, "threads": self.threads},
                batch_size=None, batch_format="pyarrow", num_cpus=self.threads)
            for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
                total += torch.from_numpy(batch["counts"].sum(0))
        return total.view(len(windows), 2, n_buckets + 2)
