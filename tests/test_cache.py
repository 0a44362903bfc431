"""The decoded-image cache (``loader.cache``): built once with Ray Data, read through a memory map.

Oracle: each cached image is, pixel for pixel, the file decoded, cropped to its box and shrunk by the same
rule in this process; an unreadable file keeps its original error, under both bad-image policies.
"""

import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from raymetric.data.cache import ImageCache, build_image_cache, cache_key, shrink
from raymetric.data.csv import load_dataset_csv
from raymetric.data.dataset import ImageDataset, ImageReadError, collate_substituting, read_image
from raymetric.data.transforms import build_transforms


def _train_rows(root):
    df = load_dataset_csv(os.path.join(root, "df.csv"), root)
    return df[df["split"] == "train"]


@pytest.mark.ray
def test_cache_holds_each_image_decoded_cropped_and_shrunk(ray_session, tiny_demo, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_demo, data)
    rows = _train_rows(str(data))
    boxed = rows["x_1"].notna().to_numpy()
    assert boxed.any() and (~boxed).any()
    broken = rows["path"].iloc[3]
    with open(broken, "wb") as f:
        f.write(b"not a jpeg")

    folder = build_image_cache(rows, 40, str(tmp_path / "cache"))
    cache = ImageCache(folder)
    assert len(cache) == len(rows) and cache.size == 40
    for i, (_, row) in enumerate(rows.iterrows()):
        if i == 3:
            continue
        box = None if pd.isna(row["x_1"]) else [int(row[c]) for c in ("x_1", "y_1", "x_2", "y_2")]
        expected = np.asarray(shrink(read_image(row["path"], box), 40))
        assert min(expected.shape[:2]) <= 40
        np.testing.assert_array_equal(np.asarray(cache.image(i)), expected)
    with pytest.raises(ImageReadError, match="cannot read image"):
        cache.image(3)

    # Built once: the same rows and size find the folder; another size gets its own.
    stamp = os.path.getmtime(os.path.join(folder, "meta.json"))
    assert build_image_cache(rows, 40, str(tmp_path / "cache")) == folder
    assert os.path.getmtime(os.path.join(folder, "meta.json")) == stamp
    assert cache_key(rows, 40) != cache_key(rows, 48) != cache_key(rows.iloc[1:], 40)
    assert sorted(os.listdir(tmp_path / "cache")) == [os.path.basename(folder)]  # no half-built folder left

    # The dataset reads the cache (in DataLoader processes too) and keeps the bad-image policies.
    labels = np.arange(len(rows)) % 4
    with pytest.raises(ImageReadError, match=f"row {rows.index[3]}: cannot read image"):
        ImageDataset(rows, None, labels, cache=cache)[3]
    resize = build_transforms("norm_resize_torch", {"im_size": 24})
    skipping = ImageDataset(rows, resize, labels, on_bad_image="skip", cache=cache)
    assert skipping[3]["image"] is None
    loader = torch.utils.data.DataLoader(skipping, batch_size=8, num_workers=2, collate_fn=collate_substituting)
    batches = list(loader)
    assert sum(b["n_bad_images"] for b in batches) == 1 and sum(len(b["label"]) for b in batches) == len(rows)
    torch.testing.assert_close(batches[0]["image"][0], resize(cache.image(0)), rtol=0, atol=0)


def test_cache_config_is_checked_on_the_driver(tiny_demo):
    from raymetric.config import ConfigError, cache_size, check_config, load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    demo = os.path.join(root, "configs", "demo.yaml")
    cfg = load_config(demo, [f"dataset_root={tiny_demo}", "loader.cache=true"])
    assert cache_size(cfg) == 64  # the training transform's im_size
    assert cache_size(load_config(demo, [f"dataset_root={tiny_demo}", "loader.cache=true", "loader.cache_size=80"])) == 80
    with pytest.raises(ConfigError, match="loader.cache=true does not go with loader.decode=gpu"):
        check_config(load_config(demo, [f"dataset_root={tiny_demo}", "loader.cache=true", "loader.decode=gpu",
                                        "ray.use_gpu=true"]))
