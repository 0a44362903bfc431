r"""What the decoded-image cache (``loader.cache``) saves: one DataLoader process's images/s, files vs cache.

    python bench/image_cache.py                      # 480 JPEGs of 448 px, augs_torch at 224 px, cache at 256 px
    python bench/image_cache.py --image-size 96 --im-size 64 --cache-size 64     # the demo's sizes

One process reads the training rows of a demo dataset generated with the given JPEG size (the
generator's clutter canvases with boxes are 1.4-2.2 times larger) through ``ImageDataset`` and the
training transform, as a DataLoader process does: once decoding each file (Pillow, crop to the box),
once from the cache (``raymetric.data.cache``; built by Ray Data tasks, whose time is printed). Images/s
is the median of 3 passes over the rows (the first, which also warms the page cache, dropped). Each pass
also runs the transform, so the ratio is what a CPU-bound input pipeline gains.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def images_per_s(dataset, passes: int = 4) -> float:
    rates = []
    for _ in range(passes):
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        rates.append(len(dataset) / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=448, help="side of the generated JPEGs (default 448)")
    parser.add_argument("--im-size", type=int, default=224, help="augs_torch's im_size (default 224)")
    parser.add_argument("--cache-size", type=int, default=256, help="shorter side of a cached image (default 256)")
    parser.add_argument("--out", default=".bench/cache_data", help="where the data and the cache go")
    args = parser.parse_args(argv)

    import ray
    import torch

    from raymetric.data.cache import ImageCache, build_image_cache
    from raymetric.data.csv import load_dataset_csv
    from raymetric.data.dataset import ImageDataset
    from raymetric.data.demo import DemoSpec, ensure_demo
    from raymetric.data.transforms import build_transforms

    torch.set_num_threads(1)  # one DataLoader process
    root = os.path.join(args.out, f"demo_{args.image_size}")
    ensure_demo(root, DemoSpec(image_size=args.image_size))
    df = load_dataset_csv(os.path.join(root, "df.csv"), root)
    rows = df[df["split"] == "train"]
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    start = time.perf_counter()
    folder = build_image_cache(rows, args.cache_size, os.path.join(args.out, "cache"))
    built = time.perf_counter() - start
    cache = ImageCache(folder)
    transform = build_transforms("augs_torch", {"im_size": args.im_size})
    labels = rows["label"].to_numpy()
    files = images_per_s(ImageDataset(rows, transform, labels))
    cached = images_per_s(ImageDataset(rows, transform, labels, cache=cache))
    size_mb = os.path.getsize(os.path.join(folder, "pixels.u8")) / 2**20
    print(f"{len(rows)} training images, JPEG side {args.image_size} px (boxed canvases larger), "
          f"augs_torch im_size {args.im_size}, 1 thread")
    print(f"cache: shorter side {args.cache_size} px, {size_mb:.1f} MiB, built in {built:.1f} s "
          f"(Ray Data, {os.cpu_count()} CPUs; 0 when it already existed)")
    print()
    print("| images come from | images/s (1 process) | ratio |")
    print("|---|---|---|")
    print(f"| JPEG files (decode, crop, transform) | {files:.0f} | 1.00 |")
    print(f"| the cache (memory map, transform) | {cached:.0f} | {cached / files:.2f} |")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
