r"""Embed a folder of images or a CSV with a trained extractor (Ray Data), and save a faiss index beside them.

On one machine (Ray starts locally when needed):
    python jobs/predict.py --checkpoint runs/<run> --images photos/
    python jobs/predict.py --checkpoint runs/<run> --dataframe data/demo/df.csv split=validation index.type=ivf

On a running cluster (images and outputs on storage every node sees):
    ray job submit --working-dir . -- python jobs/predict.py --checkpoint /mnt/shared/runs/<run> \
        --images /mnt/shared/catalogue ray.num_workers=8 ray.use_gpu=true ray.storage_path=/mnt/shared/predict

`checkpoint` takes a run folder (its best checkpoint, else the latest; which=latest for the latest), a
checkpoint_* folder, a state.pt, or an export folder (jobs/export.py). The images: a folder, searched
recursively for .jpg/.jpeg/.png/.bmp/.webp files, or a CSV with a 'path' column (OML's dataset CSV
keeps its labels, categories, sequences and boxes; split=train|validation picks its rows). Inference
runs on a Ray Data actor pool of ray.num_workers actors (GPU actors with ray.use_gpu=true).

The run folder holds embeddings.parquet (the embeddings table jobs/validate.py --embeddings reads),
index.faiss and index.json (index.type: flat = exact, ivf = approximate with index.nlist lists and
index.nprobe visited; none = no index), extractor/ (the extractor and its transform) and config.yaml.
Search it with `python jobs/search.py --index <run folder> image.jpg` or, in Python,
raymetric.predict.ImageIndex.load(<run folder>).search([...], k=5).

The last line printed is `run: <directory>`. Exit status: 0 done; 2 a config, checkpoint or dataset
error (printed, naming the key, column or rows).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from raymetric.config import ConfigError, PredictConfig, flag_overrides, job_parser, load_config  # noqa: E402
from raymetric.data.csv import DatasetError  # noqa: E402
from raymetric.embeddings import EmbeddingsError  # noqa: E402
from raymetric.ray_env import shutdown_if_started  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__, PredictConfig, example="index.type=ivf")
    parser.add_argument("--checkpoint", help="run folder, checkpoint folder, state.pt or export folder "
                        "(same as checkpoint=...)")
    parser.add_argument("--images", help="a folder of images (same as images=...)")
    parser.add_argument("--dataframe", help="a CSV with a 'path' column (same as dataframe=...)")
    args = parser.parse_args(argv)
    overrides = flag_overrides(args, ("checkpoint", "images", "dataframe"))
    try:
        cfg = load_config(args.config, overrides, schema=PredictConfig)
        from raymetric.predict import run_predict  # imports Ray Data: after the cheap checks

        result = run_predict(cfg, quiet=args.quiet)
    except (ConfigError, DatasetError, EmbeddingsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    shutdown_if_started()  # flushes the workers' log lines, so that `run:` is really the last line
    print(f"embedded: {result.n_items} images")
    print(f"index: {result.index or 'none'}")
    print(f"run: {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
