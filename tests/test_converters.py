"""Each converter on a tiny fake tree in its dataset's official layout (real JPEG files, real .mat files).

Expected rows are written out by hand from the fake trees; every produced CSV must pass the dataset
checks that training runs (``load_dataset_csv``, files included).
"""

import os
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from raymetric.converters import CONVERTERS, ConverterError, convert_dataset, write_dataset_csv
from raymetric.data.csv import load_dataset_csv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image(path, size=(40, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, (120, 60, 30)).save(path)


def _write(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------- fake trees


def make_cub(root):
    """4 species x 3 images; official image split: the first image of each species is a test image."""
    images, labels, boxes, split = [], [], [], []
    image_id = 0
    for c in range(1, 5):
        for k in range(3):
            image_id += 1
            rel = f"{c:03d}.Bird_{c}/Bird_{c}_{k}.jpg"
            _image(os.path.join(root, "images", rel))
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            boxes.append(f"{image_id} {k + 1}.0 2.0 {10 + k}.5 7.0")
            split.append(f"{image_id} {0 if k == 0 else 1}")
    _write(os.path.join(root, "images.txt"), images)
    _write(os.path.join(root, "image_class_labels.txt"), labels)
    _write(os.path.join(root, "bounding_boxes.txt"), boxes)
    _write(os.path.join(root, "train_test_split.txt"), split)
    _write(os.path.join(root, "classes.txt"), [f"{c} {c:03d}.Bird_{c}" for c in range(1, 5)])


def _cars_struct(records, fields):
    """A MATLAB struct array [1, N] as scipy.io.savemat writes it: an object record array."""
    arr = np.empty((1, len(records)), dtype=[(f, "O") for f in fields])
    for i, rec in enumerate(records):
        for f in fields:
            arr[0, i][f] = np.array([[rec[f]]]) if not isinstance(rec[f], str) else np.array([rec[f]])
    return arr


def make_cars_devkit(root):
    """4 models; each has 2 images in cars_train and 2 in cars_test (the official image split)."""
    from scipy.io import savemat

    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    for mat, folder in (("devkit/cars_train_annos.mat", "cars_train"), ("cars_test_annos_withlabels.mat", "cars_test")):
        records = []
        for i in range(8):
            fname = f"{i + 1:05d}.jpg"
            _image(os.path.join(root, folder, fname))
            records.append({"bbox_x1": 1 + i, "bbox_y1": 2, "bbox_x2": 20 + i, "bbox_y2": 25, "class": i // 2 + 1, "fname": fname})
        os.makedirs(os.path.dirname(os.path.join(root, mat)), exist_ok=True)
        savemat(os.path.join(root, mat), {"annotations": _cars_struct(records, fields)})
    savemat(os.path.join(root, "devkit", "cars_meta.mat"), {"class_names": np.array([[f"Car {c}" for c in range(1, 5)]], dtype=object)})


def make_cars_all_images(root):
    """The car_ims + cars_annos.mat layout: 4 models x 4 images, the last 2 of each are test images."""
    from scipy.io import savemat

    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    records = []
    for i in range(16):
        rel = f"car_ims/{i + 1:06d}.jpg"
        _image(os.path.join(root, rel))
        records.append({"relative_im_path": rel, "bbox_x1": 3, "bbox_y1": 4, "bbox_x2": 30, "bbox_y2": 20,
                        "class": i // 4 + 1, "test": int(i % 4 >= 2)})
    savemat(os.path.join(root, "cars_annos.mat"), {"annotations": _cars_struct(records, fields)})


def make_sop(root):
    """Train products 1-3 (bicycle, chair), test products 4-6 (chair, coffee_maker); 2-3 images each."""
    rows = {"Ebay_train.txt": [], "Ebay_test.txt": []}
    image_id = 0
    plan = [(1, 1, "bicycle", 2, "Ebay_train.txt"), (2, 1, "bicycle", 3, "Ebay_train.txt"), (3, 2, "chair", 2, "Ebay_train.txt"),
            (4, 2, "chair", 2, "Ebay_test.txt"), (5, 3, "coffee_maker", 3, "Ebay_test.txt"), (6, 3, "coffee_maker", 2, "Ebay_test.txt")]
    for product, super_class, category, n, file in plan:
        for k in range(n):
            image_id += 1
            rel = f"{category}_final/{product}00{k}_{k}.JPG"
            _image(os.path.join(root, rel))
            rows[file].append(f"{image_id} {product} {super_class} {rel}")
    for file, lines in rows.items():
        _write(os.path.join(root, file), ["image_id class_id super_class_id path", *lines])


INSHOP_ROWS = [  # image_name, item_id, status
    ("img/WOMEN/Dresses/id_00000001/01_1_front.jpg", "id_00000001", "train"),
    ("img/WOMEN/Dresses/id_00000001/01_2_side.jpg", "id_00000001", "train"),
    ("img/MEN/Denim/id_00000003/01_1_front.jpg", "id_00000003", "train"),  # a single image: dropped
    ("img/MEN/Denim/id_00000007/01_1_front.jpg", "id_00000007", "query"),
    ("img/MEN/Denim/id_00000007/01_2_side.jpg", "id_00000007", "gallery"),
    ("img/MEN/Denim/id_00000007/01_3_back.jpg", "id_00000007", "gallery"),
    ("img/WOMEN/Skirts/id_00000009/02_1_front.jpg", "id_00000009", "query"),
    ("img/WOMEN/Skirts/id_00000009/02_2_side.jpg", "id_00000009", "gallery"),
]


def make_inshop(root, folders=("img", "img_highres")):
    part = [str(len(INSHOP_ROWS)), "image_name item_id evaluation_status"]
    boxes = [str(len(INSHOP_ROWS)), "image_name clothes_type pose_type x_1 y_1 x_2 y_2"]
    for i, (name, item, status) in enumerate(INSHOP_ROWS):
        for folder in folders:
            _image(os.path.join(root, folder, name.split("/", 1)[1]))
        # The real files pad columns with several spaces.
        part.append(f"{name}   {item}   {status}")
        boxes.append(f"{name}  1  1  {10 + i:03d}  005  030  028")
    _write(os.path.join(root, "list_eval_partition.txt"), part)
    _write(os.path.join(root, "list_bbox_inshop.txt"), boxes)


# ---------------------------------------------------------------- every converter: the CSV passes the checks


TREES = {"cub": make_cub, "cars": make_cars_devkit, "sop": make_sop, "inshop": make_inshop}


def test_every_converter_has_a_fake_tree():
    assert set(TREES) == set(CONVERTERS)


@pytest.mark.parametrize("name", sorted(CONVERTERS))
def test_converted_csv_passes_the_dataset_checks(name, tmp_path):
    TREES[name](str(tmp_path))
    df = convert_dataset(name, str(tmp_path))
    path = write_dataset_csv(df, str(tmp_path))
    checked = load_dataset_csv(path, str(tmp_path), check_files=True)
    assert len(checked) == len(df) > 0
    assert set(checked["split"]) == {"train", "validation"}
    # Paths stay relative to the dataset folder: the CSV survives moving the folder.
    assert not any(os.path.isabs(p) for p in pd.read_csv(path)["path"])
    # Train and validation labels are disjoint in every standard split by class.
    train = set(checked.loc[checked["split"] == "train", "label"])
    assert not train & set(checked.loc[checked["split"] == "validation", "label"])


# ---------------------------------------------------------------- content, against the fake trees


def test_cub_split_by_class_and_boxes(tmp_path):
    make_cub(str(tmp_path))
    df = convert_dataset("cub", str(tmp_path))
    assert df.columns.tolist() == ["label", "path", "split", "is_query", "is_gallery", "x_1", "x_2", "y_1", "y_2"]
    assert df.groupby("label")["split"].first().to_dict() == {1: "train", 2: "train", 3: "validation", 4: "validation"}
    assert df.loc[0, "path"] == os.path.join("images", "001.Bird_1", "Bird_1_0.jpg")
    # Box "1.0 2.0 10.5 7.0": x_1 = int(1.0), x_2 = int(1.0 + 10.5), y_1 = 2, y_2 = int(2.0 + 7.0).
    assert df.loc[0, ["x_1", "x_2", "y_1", "y_2"]].tolist() == [1, 11, 2, 9]
    # 1 vs rest on validation rows; empty flags on train rows.
    val = df["split"] == "validation"
    assert df.loc[val, "is_query"].all() and df.loc[val, "is_gallery"].all()
    assert df.loc[~val, "is_query"].isna().all()


def test_cub_official_split_and_no_boxes(tmp_path):
    make_cub(str(tmp_path))
    df = convert_dataset("cub", str(tmp_path), {"split": "official", "bboxes": False})
    assert "x_1" not in df.columns
    # The first image of each species is a test image: 4 validation rows, one per class.
    assert sorted(df.loc[df["split"] == "validation", "label"]) == [1, 2, 3, 4]
    assert df.loc[df["split"] == "validation", "path"].str.endswith("_0.jpg").all()


def test_cub_train_classes(tmp_path):
    make_cub(str(tmp_path))
    df = convert_dataset("cub", str(tmp_path), {"train_classes": 3})
    assert sorted(df.loc[df["split"] == "validation", "label"].unique()) == [4]


def test_cars_devkit_layout(tmp_path):
    make_cars_devkit(str(tmp_path))
    df = convert_dataset("cars", str(tmp_path))
    assert len(df) == 16
    assert df.loc[0, ["label", "path", "split", "x_1", "x_2", "y_1", "y_2"]].tolist() == [
        1, os.path.join("cars_train", "00001.jpg"), "train", 1, 20, 2, 25]
    assert df.groupby("label")["split"].first().to_dict() == {1: "train", 2: "train", 3: "validation", 4: "validation"}
    official = convert_dataset("cars", str(tmp_path), {"split": "official"})
    assert (official["path"].str.startswith("cars_test") == (official["split"] == "validation")).all()


def test_cars_all_images_layout(tmp_path):
    make_cars_all_images(str(tmp_path))
    df = convert_dataset("cars", str(tmp_path))
    write_dataset_csv(df, str(tmp_path))
    assert df.loc[5, ["label", "path", "split", "x_1", "x_2", "y_1", "y_2"]].tolist() == [
        2, "car_ims/000006.jpg", "train", 3, 30, 4, 20]
    official = convert_dataset("cars", str(tmp_path), {"split": "official", "bboxes": False})
    # The `test` flag: images 3 and 4 of every model.
    assert official.loc[official["split"] == "validation", "path"].tolist() == [
        f"car_ims/{i:06d}.jpg" for i in range(1, 17) if (i - 1) % 4 >= 2]


def test_sop_categories_and_split(tmp_path):
    make_sop(str(tmp_path))
    df = convert_dataset("sop", str(tmp_path))
    assert df.columns.tolist() == ["label", "path", "split", "is_query", "is_gallery", "category"]
    assert df.groupby("label")["category"].first().to_dict() == {
        1: "bicycle", 2: "bicycle", 3: "chair", 4: "chair", 5: "coffee_maker", 6: "coffee_maker"}
    assert df.groupby("label")["split"].first().to_dict() == {
        1: "train", 2: "train", 3: "train", 4: "validation", 5: "validation", 6: "validation"}
    assert df.loc[df["split"] == "validation", ["is_query", "is_gallery"]].all().all()


def test_inshop_highres_by_default_without_boxes(tmp_path):
    make_inshop(str(tmp_path))
    df = convert_dataset("inshop", str(tmp_path))
    assert df["path"].str.startswith("img_highres/").all() and "x_1" not in df.columns
    # The single-image train item 3 is dropped; query/gallery as in the partition file.
    assert sorted(df["label"].unique()) == [1, 7, 9]
    val = df[df["split"] == "validation"].set_index("path")
    assert val.loc["img_highres/MEN/Denim/id_00000007/01_1_front.jpg", ["is_query", "is_gallery"]].tolist() == [True, False]
    assert val.loc["img_highres/MEN/Denim/id_00000007/01_2_side.jpg", ["is_query", "is_gallery"]].tolist() == [False, True]
    assert df.groupby("label")["category"].first().to_dict() == {1: "Dresses", 7: "Denim", 9: "Skirts"}


def test_inshop_low_res_with_boxes(tmp_path):
    make_inshop(str(tmp_path), folders=("img",))
    df = convert_dataset("inshop", str(tmp_path))
    assert df["path"].str.startswith("img/").all()
    # Row 0 of the partition: "... 010 005 030 028" as x_1 y_1 x_2 y_2.
    assert df.loc[0, ["x_1", "x_2", "y_1", "y_2"]].tolist() == [10, 30, 5, 28]
    write_dataset_csv(df, str(tmp_path))


# ---------------------------------------------------------------- errors name the file, the line, the option


def test_missing_files_name_the_layout(tmp_path):
    with pytest.raises(ConverterError, match=r"missing images.txt, image_class_labels.txt, bounding_boxes.txt; expected"):
        convert_dataset("cub", str(tmp_path))
    with pytest.raises(ConverterError, match="cars_annos.mat"):
        convert_dataset("cars", str(tmp_path))


def test_bad_line_is_named(tmp_path):
    make_sop(str(tmp_path))
    with open(tmp_path / "Ebay_test.txt", "a") as f:
        f.write("99 7 3\n")
    with pytest.raises(ConverterError, match=r"Ebay_test.txt, line 9: expected 4 fields, got 3"):
        convert_dataset("sop", str(tmp_path))


def test_inshop_refuses_low_res_boxes_on_high_res_images(tmp_path):
    make_inshop(str(tmp_path))
    with pytest.raises(ConverterError, match="coordinates are those of the img/ images"):
        convert_dataset("inshop", str(tmp_path), {"images": "img_highres", "bboxes": True})


def test_option_that_does_not_apply(tmp_path):
    make_sop(str(tmp_path))
    with pytest.raises(ConverterError, match=r"converter 'sop' takes no argument\(s\) \['split'\]"):
        convert_dataset("sop", str(tmp_path), {"split": "official"})


# ---------------------------------------------------------------- the job


def test_convert_job(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "jobs"))
    import convert as convert_job

    make_inshop(str(tmp_path), folders=("img",))
    assert convert_job.main(["inshop", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"csv: {tmp_path / 'df.csv'}"
    assert any(line.startswith("validation") and "2 queries  3 gallery" in line for line in out)

    os.remove(tmp_path / "img" / "WOMEN" / "Skirts" / "id_00000009" / "02_2_side.jpg")
    assert convert_job.main(["inshop", str(tmp_path), "--out", "other.csv"]) == 2
    assert "02_2_side.jpg" in capsys.readouterr().err
    assert convert_job.main(["sop", str(tmp_path)]) == 2
    assert "Ebay_train.txt" in capsys.readouterr().err
