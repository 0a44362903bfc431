"""Export the extractor of a checkpoint, reload it, get the same embeddings; start training from raymetric weights.

The checkpoint is written in the layout and format ``raymetric.train`` writes (``<run>/checkpoint_*/state.pt``
and ``<run>/best/state.pt`` holding ``model`` and ``config``); tests/test_train_job.py also exports a
checkpoint of a real Ray Train run. The oracle is the checkpoint's extractor itself, in eval mode, on
real image files through the run's validation transforms.
"""

import logging
import os
import sys

import pytest
import torch
from PIL import Image

from raymetric.config import load_config
from raymetric.data.transforms import build_transforms
from raymetric.export import (
    ExportError,
    export_extractor,
    extractor_from_checkpoint,
    find_checkpoint,
    load_exported,
)
from raymetric.extractors import TimmExtractor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = {"arch": "resnet10t", "embedding_size": 16, "batchnorm_neck": True, "normalise_features": True}


def _trained_like(seed: int) -> TimmExtractor:
    """An extractor whose weights and BN running statistics differ from a fresh one's."""
    torch.manual_seed(seed)
    model = TimmExtractor(**ARGS)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        model.train()
        model(torch.randn(8, 3, 32, 32))  # moves the BN running statistics
    return model.eval()


def _write_checkpoint(run_dir, name, model, epoch):
    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"), [
        "transforms_val.args.im_size=32", *[f"extractor.args.{k}={str(v).lower()}" for k, v in ARGS.items()]])
    os.makedirs(os.path.join(run_dir, name), exist_ok=True)
    torch.save({"model": model.state_dict(), "config": cfg.model_dump(mode="json"), "epoch": epoch},
               os.path.join(run_dir, name, "state.pt"))


@pytest.fixture
def run_dir(tmp_path):
    """A run directory with two checkpoints Ray kept and a best one, each with other weights."""
    run = str(tmp_path / "run")
    _write_checkpoint(run, "checkpoint_2026-01-01_00-00-01.000001", _trained_like(1), 1)
    _write_checkpoint(run, "checkpoint_2026-01-01_00-00-02.000001", _trained_like(2), 2)
    _write_checkpoint(run, "best", _trained_like(3), 1)
    return run


@pytest.fixture
def images(tiny_demo):
    """Validation images of the demo data through the run's validation transforms: [N, 3, 32, 32]."""
    import pandas as pd

    df = pd.read_csv(os.path.join(tiny_demo, "df.csv"))
    paths = df.loc[df["split"] == "validation", "path"].head(6)
    transform = build_transforms("norm_resize_torch", {"im_size": 32})
    return torch.stack([transform(Image.open(os.path.join(tiny_demo, p)).convert("RGB")) for p in paths])


def test_find_checkpoint(run_dir, tmp_path):
    assert find_checkpoint(run_dir) == os.path.join(run_dir, "best", "state.pt")
    assert find_checkpoint(run_dir, "latest").endswith(os.path.join("checkpoint_2026-01-01_00-00-02.000001", "state.pt"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ExportError, match="no state.pt, no best/state.pt and no checkpoint_"):
        find_checkpoint(str(tmp_path / "empty"))


@pytest.mark.parametrize("fmt", ["state_dict", "torchscript", "torch_export"])
def test_export_then_reload_gives_the_same_embeddings(run_dir, images, tmp_path, fmt):
    original, _ = extractor_from_checkpoint(run_dir)  # the best checkpoint
    with torch.no_grad():
        expected = original(images)  # [N, 16]
    written = export_extractor(run_dir, str(tmp_path / "export"), formats=[fmt])
    assert set(written) == {"meta", fmt}
    model, transform = load_exported(str(tmp_path / "export"), fmt=fmt)
    with torch.no_grad():
        got = model(images)
    assert got.shape == expected.shape == (len(images), 16)
    if fmt == "state_dict":
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # The exported transform is the run's validation transform.
    img = Image.new("RGB", (50, 40), (10, 200, 30))
    assert torch.equal(transform(img), build_transforms("norm_resize_torch", {"im_size": 32})(img))


def test_export_metadata(run_dir, tmp_path):
    import json

    export_extractor(run_dir, str(tmp_path / "e"), formats=["state_dict"], which="latest")
    meta = json.load(open(tmp_path / "e" / "extractor.json"))
    assert meta["timm_arch"] == "resnet10t" and meta["feat_dim"] == 16 and meta["input_size"] == [3, 32, 32]
    assert meta["transforms"] == {"name": "norm_resize_torch", "args": {"im_size": 32}}
    assert meta["epoch"] == 2 and "checkpoint_2026-01-01_00-00-02" in meta["source"]


def test_torch_export_takes_any_batch_size(run_dir, images, tmp_path):
    export_extractor(run_dir, str(tmp_path / "e"), formats=["torch_export"])
    model, _ = load_exported(str(tmp_path / "e"), fmt="torch_export")
    original, _ = extractor_from_checkpoint(run_dir)
    with torch.no_grad():
        torch.testing.assert_close(model(images[:1]), original(images[:1]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("source", ["run", "checkpoint_dir", "state_pt", "export"])
def test_training_starts_from_raymetric_weights(run_dir, images, tmp_path, source):
    original, _ = extractor_from_checkpoint(run_dir, which="latest")
    latest = find_checkpoint(run_dir, "latest")
    weights = {"run": run_dir, "checkpoint_dir": os.path.dirname(latest), "state_pt": latest}.get(source)
    if source == "export":
        export_extractor(run_dir, str(tmp_path / "e"), formats=["state_dict"], which="latest")
        weights = str(tmp_path / "e")
    if source == "run":  # a run directory means its best checkpoint
        original, _ = extractor_from_checkpoint(run_dir)
    model = TimmExtractor(**ARGS, weights=weights).eval()
    with torch.no_grad():
        assert torch.equal(model(images), original(images))


def test_other_head_keeps_the_backbone(run_dir, images, caplog):
    original, _ = extractor_from_checkpoint(run_dir)
    with caplog.at_level(logging.WARNING):
        model = TimmExtractor(arch="resnet10t", embedding_size=8, weights=run_dir).eval()
    assert "does not fit this extractor's" in caplog.text
    with torch.no_grad():
        assert torch.equal(model.backbone(images), original.backbone(images))
    assert model(images).shape == (len(images), 8)


def test_weights_folder_without_a_checkpoint_fails_on_the_driver(tmp_path):
    from raymetric.config import ConfigError, check_config

    os.makedirs(tmp_path / "not_a_run")
    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"), [f"extractor.args.weights={tmp_path / 'not_a_run'}"])
    with pytest.raises(ConfigError, match="config key extractor.args.weights: .*no state.pt"):
        check_config(cfg)


def test_export_job(run_dir, tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "jobs"))
    import export as export_job

    assert export_job.main([os.path.join(run_dir, "best", "state.pt"), "--format", "state_dict"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"export: {os.path.join(run_dir, 'export')}"
    assert os.path.isfile(os.path.join(run_dir, "export", "extractor.safetensors"))
    assert export_job.main([str(tmp_path / "nothing")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
