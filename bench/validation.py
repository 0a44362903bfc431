r"""Validation speed and memory: raymetric against OML 4.0.0, in the same run, on the same embeddings.

    python bench/validation.py                      # N = 20k, 50k, 200k, the 10k x 1M scale row, GPU row if CUDA
    python bench/validation.py --sizes 20000 --no-scale   # a quick look
    python bench/validation.py --sizes --no-scale         # only the fnmr@fmr rows
    python bench/validation.py --gpu-only           # only the GPU row (on a GPU machine; no OML needed)

Embeddings: D = 128, labels of exactly 5 items, every item both query and gallery (1 vs rest),
L2-normalised clustered points (label centres plus noise), float32. Both sides compute OML's default
validation set: cmc@1, cmc@5, precision@5, map@5 and pcf@0.5. OML runs its own validation code
(``EmbeddingMetrics.compute_metrics``: ``RetrievalResults.from_embeddings`` + ``calc_retrieval_metrics``)
in its side virtualenv (``bench/oml_env.py``); raymetric runs ``raymetric.validate.score_table`` (the
in-process search of the stand-alone job). Each side runs in its own subprocess: the time is that of
the validation call (embeddings already in memory), the peak memory is the subprocess's maximum
resident set (``getrusage(RUSAGE_SELF).ru_maxrss`` at its end), imports and data included. Agreement: per query, when both sides' top-5 ids are
equal, each per-query metric must agree to 1e-6; the table shows the share of queries whose top-5 ids
agree (the rest differ by float32 distance noise in OML's ``cdist``, which raymetric ranks exactly).

fnmr@fmr rows (``--fnmr-size``, default 5,000): both sides compute ``fnmr@fmr`` at four rates on the same
embeddings, once the clustered unit vectors and once integer points whose distances tie in large groups
(OML ranks the whole gallery for it, so N stays small); the values must agree to float32 rounding.

Scale row: 10k queries against a 1M-item gallery (the queries are gallery items too), raymetric only
(OML would hold a 5,000 x 1M float32 block, 20 GB). GPU row (only where CUDA exists): exact top-16 of
1M queries against the same 1M items, D = 256, bfloat16 candidate scores, against ``matmul`` +
``torch.topk`` on 4,096-query chunks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM, PER_LABEL, K = 128, 5, 5
CMC, PRECISION, MAP, PCF = (1, 5), (5,), (5,), (0.5,)
FMR = (0.001, 0.01, 0.1, 0.5)  # the fnmr@fmr rows only
NOISE = 1.5  # per-dimension noise around label centres of unit variance: cmc@1 about 0.7


def make_embeddings(n: int, dim: int = DIM, seed: int = 0, rows_per_block: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """``[n, dim]`` float32 unit vectors around ``n / 5`` label centres, and their labels (5 each)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(n) // PER_LABEL
    centres = rng.standard_normal((n // PER_LABEL + 1, dim), dtype=np.float32)
    emb = np.empty((n, dim), np.float32)
    for start in range(0, n, rows_per_block):  # in blocks: no float64 temporaries of the whole set
        part = centres[labels[start:start + rows_per_block]]
        part += NOISE * rng.standard_normal(part.shape, dtype=np.float32)
        emb[start:start + rows_per_block] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return emb, labels.astype(np.int64)


# ---------------------------------------------------------------- workers (each in its own process)


def worker_raymetric(data: str, out: str, n_query: int | None = None, fmr: bool = False) -> dict:
    sys.path.insert(0, ROOT)
    import torch

    from raymetric.config import MetricArgs, RetrievalConfig
    from raymetric.embeddings import EmbeddingsTable
    from raymetric.validate import score_table

    if data.startswith("generate:"):
        emb, labels = make_embeddings(int(data.split(":")[1]))
    else:
        emb, labels = np.load(data + ".emb.npy"), np.load(data + ".labels.npy")
    n = len(labels)
    is_query = np.zeros(n, bool)
    is_query[: n_query or n] = True
    table = EmbeddingsTable(emb, labels, is_query, np.ones(n, bool))
    metric_args = MetricArgs(cmc_top_k=list(CMC), precision_top_k=list(PRECISION), map_top_k=list(MAP),
                             pcf_variance=list(PCF), fmr_vals=list(FMR) if fmr else [])
    start = time.perf_counter()
    result = score_table(table, metric_args, RetrievalConfig())
    seconds = time.perf_counter() - start
    np.savez(out, ids=result.topk.gallery_ids[:, :K].numpy(),
             **{name: v.numpy() for name, v in result.per_query.items()})
    return {"seconds": seconds, "metrics": result.metrics, "widened": result.topk.stats.get("queries_widened", 0),
            "threads": torch.get_num_threads()}


def worker_oml(data: str, out: str, fmr: bool = False) -> dict:
    import torch
    from oml.interfaces.datasets import IQueryGalleryLabeledDataset
    from oml.metrics.embeddings import EmbeddingMetrics

    emb, labels = np.load(data + ".emb.npy"), np.load(data + ".labels.npy")

    class OneVsRest(IQueryGalleryLabeledDataset):
        """The embeddings' labels, every item a query and in the gallery (what OML's validation reads)."""

        def __init__(self, labels):
            self.labels, self.extra_data, self.index_key, self.input_tensors_key = labels, {}, "idx", "input_tensors"

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, item):
            raise NotImplementedError

        def get_labels(self):
            return self.labels

        def get_query_ids(self):
            return torch.arange(len(self.labels))

        def get_gallery_ids(self):
            return torch.arange(len(self.labels))

    metric = EmbeddingMetrics(OneVsRest(labels), cmc_top_k=CMC, precision_top_k=PRECISION, map_top_k=MAP,
                              fmr_vals=FMR if fmr else (), pcf_variance=PCF, verbose=False)
    metric.setup(len(labels))
    metric.update(torch.from_numpy(emb), list(range(len(labels))))
    start = time.perf_counter()
    metrics = metric.compute_metrics()
    seconds = time.perf_counter() - start
    overall = metric.metrics_unreduced["OVERALL"]
    per_query = {f"{name}@{k}": overall[name][k].numpy() for name in ("cmc", "precision", "map") for k in overall[name]}
    ids = np.stack([r[:K].numpy() for r in metric.retrieval_results.retrieved_ids])
    np.savez(out, ids=ids, **per_query)
    flat = {f"{name}@{k}": float(v) for name in ("cmc", "precision", "map", "pcf") for k, v in metrics["OVERALL"][name].items()}
    flat.update({f"fnmr@fmr={k:g}": float(v) for k, v in metrics["OVERALL"].get("fnmr@fmr", {}).items()})
    return {"seconds": seconds, "metrics": flat, "threads": torch.get_num_threads()}


def worker_gpu(n: int, dim: int, k: int) -> dict:
    """Exact top-k of every item against all items on one GPU, against matmul + torch.topk."""
    sys.path.insert(0, ROOT)
    import torch

    import raymetric.retrieval.candidates as candidates
    import raymetric.retrieval.fused as fused
    from raymetric.retrieval import topk_shard

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: a dry run at a small size
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    labels = torch.randperm(n, device=device) // PER_LABEL
    centres = torch.randn(n // PER_LABEL + 1, dim, device=device)
    emb = torch.nn.functional.normalize(centres[labels] + NOISE * torch.randn(n, dim, device=device), dim=1)
    ids = torch.arange(n, device=device)
    # extra=48: with 1M items in 256 dims the 16th and the ~30th neighbours lie within bfloat16's error
    # bound of each other, so a shorter list would send many queries round again.
    kwargs = dict(query_labels=labels, gallery_labels=labels, gallery_ids=ids, query_ids=ids, score_dtype="bfloat16",
                  max_block_elems=2**32, extra=48)

    def timed(fn):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        return time.perf_counter() - start, result

    sub_n = min(131072, n)
    sub = dict(kwargs, query_labels=labels[:sub_n], query_ids=ids[:sub_n])
    plain = lambda group, extra: (setattr(fused, "ENABLED", False), candidates.GROUP.update(cuda=group),  # noqa: E731
                                  kwargs.update(extra=extra), sub.update(extra=extra))
    variants = {  # name -> setup; each is timed on 128k queries (after a warm-up call that compiles)
        "plain, group 32": lambda: plain(32, 48),
        "plain, group 64": lambda: plain(64, 48),
        "plain, group 128": lambda: plain(128, 48),
        "plain, group 64, extra 24": lambda: plain(64, 24),
        "plain, group 128, extra 24": lambda: plain(128, 24),
        "fused 128x128x64, 8 warps": lambda: (plain(32, 48), setattr(fused, "ENABLED", True),
                                              fused.CUDA_TILES.update(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)),
        "fused 128x256x64, 8 warps": lambda: fused.CUDA_TILES.update(BM=128, BN=256, BK=64, num_warps=8, num_stages=3),
        "fused 64x128x64, 4 warps": lambda: fused.CUDA_TILES.update(BM=64, BN=128, BK=64, num_warps=4, num_stages=4),
    }
    tried, errors = {}, {}
    for name, setup in variants.items():
        setup()
        try:
            timed(lambda: topk_shard(emb[:4096], emb, k, **dict(kwargs, query_labels=labels[:4096], query_ids=ids[:4096])))
            tried[name] = timed(lambda: topk_shard(emb[:sub_n], emb, k, **sub))[0]
        except Exception as err:  # a tile shape this GPU cannot compile: skip it
            errors[name] = f"{type(err).__name__}: {str(err)[:200]}"
    best = min(tried, key=tried.get)
    variants[best]()
    if best.startswith("fused"):
        fused.ENABLED = True
    seconds, result = timed(lambda: topk_shard(emb, emb, k, **kwargs))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")

    # Exactness on 512 random queries: float64 distances to every item, ranked by (distance, id).
    sample = torch.randperm(n, device=device)[:512]
    d = torch.cdist(emb[sample].double(), emb.double())  # [512, n]
    d[torch.arange(len(sample), device=device), sample] = float("inf")  # the query itself
    # Rounded to float32 as raymetric's distances are; a stable sort keeps equal ones in id order.
    expected = torch.sort(d.float(), dim=1, stable=True).indices[:, :k]
    exact = bool((result.gallery_ids[sample] == expected).all())

    # The naive baseline: bf16 matmul + torch.topk in 4096-query chunks (timed on 64 chunks, scaled).
    emb16 = emb.bfloat16()
    chunks = min(64, -(-n // 4096))

    def naive():
        for s in range(0, chunks * 4096, 4096):
            (emb16[s:s + 4096] @ emb16.T).topk(k + 1, dim=1)

    naive_seconds = timed(naive)[0] * (n / min(n, chunks * 4096))
    return {"seconds": seconds, "naive_seconds": naive_seconds, "exact_on_sample": exact, "peak_gpu_gib": peak,
            "variant": best, "tried": tried, "errors": errors, "widened": result.stats["queries_widened"],
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)"}


# ---------------------------------------------------------------- driver


def run_worker(python: str, args: list[str], timeout: float) -> tuple[dict | None, float, str]:
    """Runs a worker in a subprocess; returns its JSON result, its peak RSS in GiB, and an error."""
    proc = subprocess.Popen([python, os.path.abspath(__file__), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        return None, float("nan"), f"timed out after {timeout:.0f} s"
    peak = float("nan")
    for line in stdout.splitlines():
        if line.startswith("PEAK_RSS_KB "):
            peak = int(line.split()[1]) / 2**20
    result = next((json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")), None)
    error = "" if proc.returncode == 0 else (stderr.strip().splitlines() or ["?"])[-1][:200]
    return result, peak, error


def fnmr_comparison(n: int, tmp: str, oml_python: str | None, timeout: float) -> list[dict]:
    """fnmr@fmr of both sides on two sets of n embeddings: the clustered unit vectors, and integer points
    (coordinates 0..3 in 8 dimensions: few distinct distances, each shared by many pairs, so the
    threshold falls on ties; their float32 distances are exact on both sides)."""
    rng = np.random.default_rng(1)
    sets = {"clustered, D=128": make_embeddings(n)[0],
            "integer, D=8 (ties)": rng.integers(0, 4, (n, 8)).astype(np.float32)}
    rows = []
    for name, emb in sets.items():
        data = os.path.join(tmp, f"fnmr{len(rows)}")
        np.save(data + ".emb.npy", emb)
        np.save(data + ".labels.npy", rng.permutation(n) // PER_LABEL)
        ours, _, err = run_worker(sys.executable, ["--worker", "raymetric", data, data + ".ours.npz", "--fmr"], 3600)
        oml = None
        if oml_python:
            oml, _, oml_err = run_worker(oml_python, ["--worker", "oml", data, data + ".oml.npz", "--fmr"], timeout)
        for fmr in FMR:
            key = f"fnmr@fmr={fmr:g}"
            rows.append({"data": name, "fmr": fmr, "ours": (ours or {}).get("metrics", {}).get(key, float("nan")),
                         "oml": (oml or {}).get("metrics", {}).get(key), "ours_s": (ours or {}).get("seconds"),
                         "oml_s": (oml or {}).get("seconds")})
        print(json.dumps({"fnmr": name, "ours_err": err, "oml": bool(oml)}), flush=True)
    return rows


def agreement(ours: str, oml: str) -> tuple[float, float]:
    """Share of queries whose top-5 ids agree, and the largest per-query metric difference among them."""
    a, b = np.load(ours), np.load(oml)
    same = (a["ids"] == b["ids"]).all(1)
    worst = 0.0
    for name in a.files:
        if name != "ids" and name in b.files:
            worst = max(worst, float(np.abs(a[name][same] - b[name][same]).max(initial=0.0)))
    return float(same.mean()), worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[20_000, 50_000, 200_000])
    parser.add_argument("--no-oml", action="store_true", help="raymetric only")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per side and size, interleaved; the fastest counts (a shared machine is noisy)")
    parser.add_argument("--oml-timeout", type=float, default=1800, help="seconds before an OML run is given up")
    parser.add_argument("--no-scale", action="store_true", help="skip the 10k x 1M row")
    parser.add_argument("--scale", type=int, nargs=2, default=[10_000, 1_000_000], metavar=("QUERIES", "GALLERY"))
    parser.add_argument("--fnmr-size", type=int, default=5000,
                        help="N of the fnmr@fmr rows (OML ranks the whole gallery for them); 0 skips them")
    parser.add_argument("--gpu-only", action="store_true", help="only the GPU row")
    parser.add_argument("--gpu-size", type=int, nargs=3, default=[1_000_000, 256, 16], metavar=("N", "DIM", "K"))
    args = parser.parse_args()

    if not args.gpu_only:
        oml_python = None
        if not args.no_oml:
            sys.path.insert(0, os.path.join(ROOT, "bench"))
            from oml_env import oml_python as find_oml

            oml_python = find_oml()
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for n in args.sizes:
                data = os.path.join(tmp, f"n{n}")
                emb, labels = make_embeddings(n)
                np.save(data + ".emb.npy", emb)
                np.save(data + ".labels.npy", labels)
                del emb, labels
                row = {"N": n}
                for _ in range(args.repeat):
                    sides = [("ours", sys.executable, "raymetric", 3600)]
                    sides += [("oml", oml_python, "oml", args.oml_timeout)] if oml_python else []
                    for side, python, worker, timeout in sides:
                        result, peak, err = run_worker(python, ["--worker", worker, data, f"{data}.{side}.npz"], timeout)
                        best = row.get(side)
                        if result and (not best or result["seconds"] < best["seconds"]):
                            row[side] = result
                        row[f"{side}_peak"] = max(row.get(f"{side}_peak", 0.0), peak) if result else row.get(f"{side}_peak")
                        row[f"{side}_err"] = err
                if row.get("ours") and row.get("oml"):
                    row["agree"], row["max_diff"] = agreement(data + ".ours.npz", data + ".oml.npz")
                rows.append(row)
                print_row(row, flush=True)
            if not args.no_scale:
                q, g = args.scale
                out = os.path.join(tmp, "scale.npz")
                ours, peak, err = run_worker(sys.executable, ["--worker", "raymetric", f"generate:{g}", out, str(q)], 3600)
                rows.append({"N": f"{q // 1000}k x {g // 1000}k", "ours": ours, "ours_peak": peak, "ours_err": err})
                print_row(rows[-1], flush=True)
            fnmr_rows = fnmr_comparison(args.fnmr_size, tmp, oml_python, args.oml_timeout) if args.fnmr_size else []
        print()
        print_table(rows)
        if fnmr_rows:
            print(f"\nfnmr@fmr, N = {args.fnmr_size} all vs all (the same float32 embeddings on both sides):")
            print("| embeddings | fmr | raymetric | OML 4.0.0 | difference | raymetric s | OML s |")
            print("|---|---|---|---|---|---|---|")
            for r in fnmr_rows:
                print(f"| {r['data']} | {r['fmr']:g} | {_fmt(r['ours'], '.6f')} | {_fmt(r['oml'], '.6f')} "
                      f"| {_fmt(abs(r['ours'] - r['oml']) if r['oml'] is not None else None, '.1e')} "
                      f"| {_fmt(r['ours_s'])} | {_fmt(r['oml_s'])} |")

    import torch

    if torch.cuda.is_available() or args.gpu_only:
        n, dim, k = args.gpu_size
        result, peak, err = run_worker(sys.executable, ["--worker", "gpu", str(n), str(dim), str(k)], 1200)
        print(f"\nGPU ({(result or {}).get('gpu', '?')}): exact top-{k}, {n} x {n} x {dim}")
        if result:
            print(f"| raymetric topk_shard ({result['variant']}) | {result['seconds']:.2f} s | exact on 512 sampled "
                  f"queries: {result['exact_on_sample']} | widened: {result['widened']} | peak GPU "
                  f"{result['peak_gpu_gib']:.1f} GiB |")
            print(f"| bf16 matmul + torch.topk, 4096-query chunks | {result['naive_seconds']:.2f} s (64 chunks, scaled) |")
            print(f"variants on 128k queries (s): {result['tried']}  errors: {result['errors']}")
        else:
            print(f"failed: {err}")
    else:
        print("\nGPU row: skipped (no CUDA device here); the H200 1M x 1M row is unmeasured in this run")


def _fmt(x, spec=".2f"):
    return "-" if x is None or x != x else format(x, spec)


def print_row(row: dict, flush: bool = False) -> None:
    print(json.dumps({k: v for k, v in row.items()}, default=str)[:400], flush=flush)


def print_table(rows: list[dict]) -> None:
    print("| N (all-vs-all) | raymetric s | raymetric peak GiB | OML 4.0.0 s | OML peak GiB | speed-up | memory ratio "
          "| top-5 ids agree | max per-query diff (agreeing) | raymetric cmc@1 | OML cmc@1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ours, oml = r.get("ours") or {}, r.get("oml") or {}
        speed = oml.get("seconds", float("nan")) / ours.get("seconds", float("nan")) if ours and oml else None
        mem = r.get("oml_peak", float("nan")) / r["ours_peak"] if oml and r.get("ours_peak") else None
        oml_cell = _fmt(oml.get("seconds")) if oml else (r.get("oml_err") or "not run")
        print(f"| {r['N']} | {_fmt(ours.get('seconds'))} | {_fmt(r.get('ours_peak'))} | {oml_cell} "
              f"| {_fmt(r.get('oml_peak'))} | {_fmt(speed, '.1f')}x | {_fmt(mem, '.1f')}x "
              f"| {_fmt(r.get('agree'), '.4f')} | {_fmt(r.get('max_diff'), '.1e')} "
              f"| {_fmt((ours.get('metrics') or {}).get('cmc@1'), '.4f')} | {_fmt((oml.get('metrics') or {}).get('cmc@1'), '.4f')} |")


def _worker_main(argv: list[str]) -> None:
    import resource

    kind, fmr = argv[0], "--fmr" in argv
    argv = [a for a in argv if a != "--fmr"]
    if kind == "raymetric":
        result = worker_raymetric(argv[1], argv[2], int(argv[3]) if len(argv) > 3 else None, fmr)
    elif kind == "oml":
        result = worker_oml(argv[1], argv[2], fmr)
    else:
        result = worker_gpu(int(argv[1]), int(argv[2]), int(argv[3]))
    print("RESULT " + json.dumps(result, default=float))
    print(f"PEAK_RSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}")  # Linux: kilobytes


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker_main(sys.argv[2:])
    else:
        main()
