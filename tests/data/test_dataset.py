"""Tests of ImageDataset and read_image on real image files: RGB decoding, bbox crops, errors, pickling."""

import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from raymetric.data.csv import load_dataset_csv
from raymetric.data.dataset import BBoxError, ImageDataset, ImageReadError, read_image
from raymetric.data.transforms import norm_resize_torch


def random_pixels(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def frame(paths, labels=None, boxes=None) -> pd.DataFrame:
    """A frame as load_dataset_csv returns it; ``boxes`` holds (x_1, y_1, x_2, y_2) or None per row."""
    df = pd.DataFrame({"label": labels or list(range(len(paths))), "path": [str(p) for p in paths]})
    if boxes is not None:
        for k, column in enumerate(("x_1", "y_1", "x_2", "y_2")):
            df[column] = pd.array([None if b is None else b[k] for b in boxes], dtype="Int64")
    return df


def test_grayscale_and_rgba_decode_to_rgb(tmp_path):
    gray = random_pixels(6, 5, channels=1, seed=1)
    rgba = random_pixels(4, 7, channels=4, seed=2)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    ds = ImageDataset(frame([tmp_path / "gray.png", tmp_path / "rgba.png"]))

    image = ds[0]["image"]
    assert image.dtype == torch.uint8 and image.shape == (3, 6, 5)
    for channel in image:
        assert torch.equal(channel, torch.from_numpy(gray))
    image = ds[1]["image"]
    assert image.shape == (3, 4, 7)
    assert torch.equal(image, torch.from_numpy(rgba[..., :3]).permute(2, 0, 1))  # alpha dropped, not blended
    assert read_image(tmp_path / "gray.png").mode == "RGB"


def test_bbox_crop_equals_manual_crop_of_the_pixels(tmp_path):
    pixels = random_pixels(20, 30, seed=3)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    ds = ImageDataset(frame([tmp_path / "a.png"] * 2, boxes=[(4, 2, 11, 17), None]))

    x_1, y_1, x_2, y_2 = 4, 2, 11, 17
    expected = torch.from_numpy(pixels[y_1:y_2, x_1:x_2]).permute(2, 0, 1)
    assert torch.equal(ds[0]["image"], expected)
    assert torch.equal(ds[1]["image"], torch.from_numpy(pixels).permute(2, 0, 1))  # <NA> box = whole image
    # The box may end exactly at the border (right and bottom are exclusive).
    assert read_image(tmp_path / "a.png", (0, 0, 30, 20)).size == (30, 20)


def test_bbox_from_the_csv_columns(tmp_path):
    pixels = random_pixels(10, 12, seed=4)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    (tmp_path / "df.csv").write_text(
        "label,path,split,is_query,is_gallery,x_1,x_2,y_1,y_2\n"
        "5,a.png,validation,True,True,1,9,3,8\n"
        "5,a.png,validation,False,True,,,,\n"
    )
    ds = ImageDataset(load_dataset_csv(tmp_path / "df.csv", require_splits=("validation",)))
    assert torch.equal(ds[0]["image"], torch.from_numpy(pixels[3:8, 1:9]).permute(2, 0, 1))
    assert ds[1]["image"].shape == (3, 10, 12)


def test_transform_and_labels(tmp_path):
    Image.fromarray(random_pixels(20, 30, seed=5)).save(tmp_path / "a.png")
    transform = norm_resize_torch(im_size=16)
    ds = ImageDataset(frame([tmp_path / "a.png"] * 3, labels=[7, 9, 7]), transform=transform)

    item = ds[2]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 16, 16)
    assert torch.equal(item["image"], transform(read_image(tmp_path / "a.png")))
    assert (item["label"], item["index"]) == (7, 2)
    remapped = ImageDataset(frame([tmp_path / "a.png"] * 3, labels=[7, 9, 7]), labels=np.array([0, 1, 0]))
    assert [remapped[i]["label"] for i in range(3)] == [0, 1, 0]
    with pytest.raises(ValueError, match="one label per row"):
        ImageDataset(frame([tmp_path / "a.png"] * 3), labels=[0, 1])
    with pytest.raises(IndexError):
        ds[3]


def test_corrupt_and_truncated_files_name_the_file_and_row(tmp_path):
    Image.fromarray(random_pixels(64, 64, seed=6)).save(tmp_path / "good.jpg", quality=90)
    (tmp_path / "garbage.jpg").write_bytes(b"this is not an image")
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    df = frame([tmp_path / "good.jpg", tmp_path / "garbage.jpg", tmp_path / "truncated.jpg", tmp_path / "gone.jpg"])
    df.index = [10, 11, 12, 13]  # rows are named by the frame's index (the CSV's data row)
    ds = ImageDataset(df)

    assert ds[0]["image"].shape == (3, 64, 64)
    for i, name in [(1, "garbage.jpg"), (2, "truncated.jpg"), (3, "gone.jpg")]:
        with pytest.raises(ImageReadError) as error:
            ds[i]
        message = str(error.value)
        assert message.startswith(f"row {10 + i}: cannot read image ")
        assert str(tmp_path / name) in message


def test_bbox_beyond_the_image_names_file_row_and_box(tmp_path):
    Image.fromarray(random_pixels(10, 12, seed=7)).save(tmp_path / "a.png")
    ds = ImageDataset(frame([tmp_path / "a.png"] * 2, boxes=[(0, 0, 12, 10), (2, 3, 13, 9)]))

    assert ds[0]["image"].shape == (3, 10, 12)
    with pytest.raises(BBoxError) as error:
        ds[1]
    assert str(error.value) == (
        f"row 1: bbox (x_1=2, y_1=3, x_2=13, y_2=9) does not fit in image {str(tmp_path / 'a.png')!r} "
        "of size 12x10 (width x height)"
    )
    assert isinstance(error.value, ImageReadError)  # one class for a skip policy to catch


def test_pickle_round_trip(tmp_path):
    for k in range(3):
        Image.fromarray(random_pixels(8 + k, 9, seed=k)).save(tmp_path / f"ü{k}.png")  # non-ASCII paths too
    df = frame([tmp_path / f"ü{k}.png" for k in range(3)], labels=[4, 5, 6], boxes=[(1, 1, 5, 5), None, None])
    ds = ImageDataset(df, transform=norm_resize_torch(im_size=8))

    clone = pickle.loads(pickle.dumps(ds))
    assert len(clone) == len(ds) == 3
    for i in range(3):
        a, b = ds[i], clone[i]
        assert torch.equal(a["image"], b["image"]) and a["label"] == b["label"] and a["index"] == b["index"] == i
    batch = next(iter(torch.utils.data.DataLoader(clone, batch_size=3)))
    assert batch["image"].shape == (3, 3, 8, 8) and batch["label"].tolist() == [4, 5, 6]
