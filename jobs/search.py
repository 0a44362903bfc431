r"""Search a predict run's index with new images: the top-k items of each, nearest first.

    python jobs/search.py --index runs/<predict run> query1.jpg query2.jpg --k 5
    python jobs/search.py --index runs/<predict run> queries/ --k 10 --json > hits.jsonl

The images are embedded in this process (GPU when there is one) with the extractor and transform the
predict job saved in the run folder (extractor/), then searched in its faiss index (index.faiss).
A folder argument stands for every image under it. Distances are Euclidean (L2), as in validation.

On a cluster, where the predict run folder is on storage every node sees:
    ray job submit --working-dir . -- python jobs/search.py --index /mnt/shared/predict/<run> \
        /mnt/shared/queries/ --json

Output: per query a line `query: <path>`, then one line per hit: rank, distance, row of the run's
embeddings table, label and path; with --json one JSON object per query instead. Exit status: 0 done;
2 no index in the folder or an image that cannot be read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", required=True, help="a predict run folder (python jobs/predict.py writes one)")
    parser.add_argument("images", nargs="+", help="query image files or folders")
    parser.add_argument("--k", type=int, default=5, help="hits per query (default: 5)")
    parser.add_argument("--nprobe", type=int, help="IVF lists to visit (default: the index's index.nprobe)")
    parser.add_argument("--json", action="store_true", help="one JSON object per query")
    args = parser.parse_args(argv)

    from raymetric.data.dataset import ImageReadError
    from raymetric.predict import ImageIndex, image_files

    queries = []
    for item in args.images:
        queries += image_files(item) if os.path.isdir(item) else [item]
    try:
        index = ImageIndex.load(args.index, nprobe=args.nprobe)
        hits = index.search(queries, k=args.k)
    except (OSError, ValueError, ImageReadError) as err:  # no index, a bad k, an unreadable image
        print(f"error: {err}", file=sys.stderr)
        return 2
    for q, path in enumerate(queries):
        items = index.items(hits.rows[q])
        found = [{"rank": r + 1, "distance": float(hits.distances[q, r]), **{k: (v.item() if hasattr(v, "item") else v)
                  for k, v in items.iloc[r].items()}} for r in range(len(items))]
        if args.json:
            print(json.dumps({"query": path, "hits": found}))
            continue
        print(f"query: {path}")
        for hit in found:
            print(f"  {hit['rank']:>3}  d={hit['distance']:.4f}  row={hit['row']}  label={hit['label']}  "
                  f"{hit.get('path', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
