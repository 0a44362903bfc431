r"""Convert a standard retrieval dataset from its official folder layout to OML's dataset CSV.

    python jobs/convert.py cub data/CUB_200_2011          # writes data/CUB_200_2011/df.csv
    python jobs/convert.py cars data/CARS196 --split official
    python jobs/convert.py sop data/Stanford_Online_Products
    python jobs/convert.py inshop data/DeepFashion_InShop --images img

On a cluster, where the data lives on storage every node sees:
    ray job submit --working-dir . -- python jobs/convert.py sop /mnt/shared/data/Stanford_Online_Products

Datasets: cub (CUB-200-2011), cars (Stanford Cars / Cars196, either official layout), sop (Stanford
Online Products), inshop (DeepFashion In-shop). CUB and Cars are split by class as in the
metric-learning literature (the first half of the classes trains); --split official takes the
dataset's own image split instead, as OML's converters do (train and validation then share classes).
SOP and In-shop have official splits by product. Boxes are added where the dataset has them; SOP and
In-shop get a category column. Paths are relative to the dataset folder. The CSV is checked as
training checks it (every image must exist, unless --no-check-files). Then train with the matching
config: python jobs/train.py --config configs/<name>.yaml dataset_root=<folder>.

The last line printed is `csv: <path>`. Exit status: 0 done; 2 the folder does not match the layout,
an option does not apply to the dataset, or the CSV fails the dataset checks.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from raymetric.converters import CONVERTERS, ConverterError, convert_dataset, write_dataset_csv  # noqa: E402
from raymetric.data.csv import DatasetError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(CONVERTERS), help="which dataset the folder holds")
    parser.add_argument("dataset_root", help="the dataset's folder, in its official layout")
    parser.add_argument("--out", default="df.csv", help="CSV file name inside the dataset folder (default: df.csv)")
    parser.add_argument("--no-bboxes", action="store_true", help="cub, cars, inshop: leave the bounding boxes out")
    parser.add_argument("--split", choices=["classes", "official"],
                        help="cub, cars: split by class (default) or the dataset's own image split (OML's)")
    parser.add_argument("--train-classes", type=int, metavar="N",
                        help="cub, cars with --split classes: the first N classes train (default: half)")
    parser.add_argument("--images", choices=["img", "img_highres"],
                        help="inshop: image folder (default: img_highres if present; boxes only with img)")
    parser.add_argument("--no-check-files", action="store_true", help="do not check that every image exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    options = {"split": args.split, "train_classes": args.train_classes, "images": args.images}
    converter_args = {key: value for key, value in options.items() if value is not None}
    if args.no_bboxes:
        converter_args["bboxes"] = False
    try:
        df = convert_dataset(args.dataset, args.dataset_root, converter_args)
        path = write_dataset_csv(df, args.dataset_root, args.out, check_files=not args.no_check_files)
    except (ConverterError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, part in df.groupby("split", sort=False):
        line = f"{split:<10} {len(part):>7} images  {part['label'].nunique():>6} labels"
        if split == "validation":
            line += f"  {int(part['is_query'].sum())} queries  {int(part['is_gallery'].sum())} gallery"
        print(line)
    extras = [c for c in ("category", "x_1") if c in df.columns]
    if extras:
        print("columns:", ", ".join("category" if c == "category" else "bounding boxes" for c in extras))
    print(f"csv: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
