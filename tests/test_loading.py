"""The training input pipeline: bytes decoded in batches, batches finished on the device, the recipe with each mode."""

import os

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as F

from raymetric.data.csv import load_dataset_csv, remap_labels
from raymetric.data.dataset import BBoxError, ImageDataset, read_image
from raymetric.data.loading import (
    DeviceBatches,
    EncodedImageDataset,
    build_train_input,
    collate_encoded,
    crop_to_boxes,
    decode_batch,
)
from raymetric.data.transforms import build_transforms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


def _train(tiny_demo):
    df = load_dataset_csv(f"{tiny_demo}/df.csv", tiny_demo, check_files=False)
    train = df[df["split"] == "train"]
    return train, remap_labels(train["label"])[0]


def test_decoding_a_batch_of_jpegs_gives_pillows_pixels(tiny_demo):
    train, labels = _train(tiny_demo)
    data = EncodedImageDataset(train, labels)
    items = [data[i] for i in range(len(data))]
    decoded = decode_batch([item["data"] for item in items], CPU)
    for item, image in zip(items, decoded):
        expected = F.pil_to_tensor(read_image(data._paths[item["index"]]))
        assert image.shape == expected.shape
        # Both are libjpeg; chroma upsampling may differ by a grey level or two.
        assert (image.int() - expected.int()).abs().float().mean() < 1.0


def test_boxes_crop_as_read_image_does_and_a_bad_box_names_the_row(tiny_demo):
    train, labels = _train(tiny_demo)
    row = train.iloc[[0]].copy()
    row[["x_1", "y_1", "x_2", "y_2"]] = [3, 5, 20, 30]
    item = EncodedImageDataset(row, labels[:1])[0]
    batch = collate_encoded([item])
    cropped = crop_to_boxes(decode_batch(batch["data"], CPU), batch["bbox"], batch["row"])[0]
    expected = F.pil_to_tensor(read_image(os.path.join(tiny_demo, row["path"].iloc[0]), (3, 5, 20, 30)))
    assert cropped.shape == expected.shape == (3, 25, 17)
    with pytest.raises(BBoxError, match=f"row {row.index[0]}: bbox"):
        crop_to_boxes(decode_batch(batch["data"], CPU), torch.tensor([[0, 0, 999, 10]]), batch["row"])


@pytest.mark.parametrize("name, args", [("norm_resize_torch", {"im_size": 32}), ("augs_torch", {"im_size": 32})])
def test_each_mode_gives_normalised_batches_of_the_right_shape(tiny_demo, name, args):
    train, labels = _train(tiny_demo)
    for augment_on, decode in [("cpu", "cpu"), ("device", "cpu"), ("device", "gpu")]:
        dataset, to_device, collate = build_train_input(
            train, labels, (name, args), device=CPU, augment_on=augment_on, decode=decode
        )
        loader = torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=collate)
        batch = next(DeviceBatches(loader, to_device).epoch([0]))
        assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.float32
        assert batch["label"].tolist() == labels[:8].tolist()
        assert -3 < batch["image"].mean() < 3


def test_uint8_through_dataloader_processes_equals_the_cpu_transform(tiny_demo):
    train, labels = _train(tiny_demo)
    cpu_set = ImageDataset(train, build_transforms("norm_resize_torch", {"im_size": 32}), labels)
    expected = torch.stack([cpu_set[i]["image"] for i in range(len(cpu_set))])
    dataset, to_device, _ = build_train_input(train, labels, ("norm_resize_torch", {"im_size": 32}), device=CPU,
                                              augment_on="device")
    loader = torch.utils.data.DataLoader(dataset, batch_size=len(train), num_workers=2, prefetch_factor=1,
                                         persistent_workers=True)
    batch = next(DeviceBatches(loader, to_device).epoch([0]))
    assert torch.equal(batch["image"], expected)


def test_the_device_augmentation_is_seeded_per_batch(tiny_demo):
    train, labels = _train(tiny_demo)
    dataset, to_device, collate = build_train_input(train, labels, ("augs_torch", {"im_size": 24}), device=CPU,
                                                    decode="gpu")
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=collate)
    a = [b["image"] for b in DeviceBatches(loader, to_device).epoch([1, 2, 3])]
    b = [b["image"] for b in DeviceBatches(loader, to_device).epoch([1, 2, 3])]
    assert len(a) == 3 and all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_transform_without_device_form_stays_on_the_cpu_under_auto(tiny_demo):
    train, labels = _train(tiny_demo)
    dataset, to_device, _ = build_train_input(train, labels, ("norm_torch", {}), device=CPU, augment_on="auto")
    assert isinstance(dataset, ImageDataset) and to_device.transform is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["loader.decode=gpu"], "loader.decode=gpu needs ray.use_gpu=true"),
        (["loader.decode=gpu", "ray.use_gpu=true", "loader.augment_on=cpu"], "loader.augment_on=cpu does not go with"),
        (["loader.decode=gpu", "ray.use_gpu=true", "on_bad_image=skip"], "on_bad_image='skip' needs loader.decode=cpu"),
        (["loader.augment_on=devise"], "loader.augment_on"),
    ],
)
def test_loader_keys_are_checked_on_the_driver(tmp_path, overrides, message):
    from raymetric.config import ConfigError, check_config, load_config

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check_config(load_config(os.path.join(ROOT, "configs", "demo.yaml"), [f"dataset_root={tmp_path}", *overrides]))


def _local_fit(tiny_demo, tmp_path, name, *overrides):
    """The real recipe in Ray Train's local mode (no Ray processes): rank 0's last report."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raymetric.config import load_config
    from raymetric.train import prepare_run, train_loop_per_worker

    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"), [
        f"dataset_root={tiny_demo}", "demo_data=null", "extractor.args.arch=resnet10t", "max_epochs=2",
        "valid_period=2", "validate_untrained=false", "logger=null", "ray.num_workers=1", "num_workers=0",
        "transforms_train={name: norm_resize_torch, args: {im_size: 32}}", "transforms_val.args.im_size=32",
        *overrides,
    ])
    cfg, _ = prepare_run(cfg)
    trainer = TorchTrainer(train_loop_per_worker, train_loop_config={"cfg": cfg.model_dump(), "quiet": True},
                           scaling_config=ScalingConfig(num_workers=0),
                           run_config=RunConfig(name=name, storage_path=str(tmp_path)))
    return trainer.fit().metrics


def test_recipe_trains_the_same_with_augmentation_finished_on_the_device(tiny_demo, tmp_path):
    cpu = _local_fit(tiny_demo, tmp_path, "cpu", "loader.augment_on=cpu")
    device = _local_fit(tiny_demo, tmp_path, "device", "loader.augment_on=device")
    decoded = _local_fit(tiny_demo, tmp_path, "decoded", "loader.augment_on=device", "loader.decode=gpu",
                         "ray.use_gpu=true")  # on a CPU-only machine the worker's device is the CPU
    assert cpu["train/loss"] == device["train/loss"]  # the split transform is exact
    assert cpu["val/cmc@1"] == device["val/cmc@1"]
    assert np.isfinite(decoded["train/loss"]) and abs(decoded["train/loss"] - cpu["train/loss"]) < 0.05


def test_an_epoch_makes_the_loader_iterator_at_once_as_iter_does(tiny_demo):
    # The iterator draws its base seed from the global RNG; the recipe seeds each step after asking for
    # the epoch, so a lazy iterator would shift the first step's draws (and break bitwise resume).
    train, labels = _train(tiny_demo)
    dataset, to_device, _ = build_train_input(train, labels, ("augs_torch", {"im_size": 16}), device=CPU)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    torch.manual_seed(0)
    iter(loader)
    expected = torch.rand(3)
    torch.manual_seed(0)
    DeviceBatches(loader, to_device).epoch([0])
    assert torch.equal(torch.rand(3), expected)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_nvjpeg_decodes_as_the_cpu_does(tiny_demo):
    train, labels = _train(tiny_demo)
    data = [EncodedImageDataset(train, labels)[i]["data"] for i in range(len(train))]
    for gpu, cpu in zip(decode_batch(data, torch.device("cuda")), decode_batch(data, CPU)):
        assert gpu.is_cuda and gpu.shape == cpu.shape
        assert (gpu.cpu().int() - cpu.int()).abs().float().mean() < 1.5


@needs_cuda
@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_batches_prepared_ahead_on_a_side_stream_equal_those_prepared_inline(tiny_demo, decode):
    train, labels = _train(tiny_demo)
    device = torch.device("cuda")
    dataset, to_device, collate = build_train_input(train, labels, ("augs_torch", {"im_size": 32}), device=device,
                                                    decode=decode)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=collate, num_workers=1, pin_memory=True)
    torch.manual_seed(0)  # the DataLoader process's crops and flips (decode: cpu) draw from a seed made of it
    ahead = [b["image"].clone() for b in DeviceBatches(loader, to_device, look_ahead=True).epoch(range(10))]
    torch.manual_seed(0)
    inline = [b["image"] for b in DeviceBatches(loader, to_device, look_ahead=False).epoch(range(10))]
    assert len(ahead) == len(inline) == len(train) // 8
    for a, b in zip(ahead, inline):
        assert torch.equal(a, b)
