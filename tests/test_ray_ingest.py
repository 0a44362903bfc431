"""Ray Data streaming ingest (``loader.source: ray_data``) gives the in-process loader's batches.

Oracle: the recipe's own loader with ``num_workers: 0``, seeded per step by the recipe. Ray tasks decode
and augment (random crops, flips, colour jitter) and must give the same images bit for bit, for each
worker's share, from a mid-epoch start step too, with a broken image substituted and counted alike.
"""

import os
import shutil

import pytest
import torch

from raymetric.checkpoint import seed_everything, step_seed
from raymetric.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["demo_data=null", "transforms_train.args.im_size=32", "transforms_val.args.im_size=32",
        "extractor.args.arch=resnet10t", "sampler.args.n_labels=4", "sampler.args.n_instances=2", "num_workers=0"]


def _batches(cfg, rank, world_size, epoch, start_step):
    """What the recipe's loop gets: seeded per step before each batch."""
    from raymetric.train import setup_data

    data = setup_data(cfg, rank, world_size, use_gpu=False)
    sampler = data.sampler
    sampler.set_epoch(epoch)
    sampler.set_start_step(start_step)
    steps = range(start_step, sampler.n_steps)
    batches = data.train_batches.epoch(step_seed(cfg.seed, epoch, s, rank) for s in steps)
    out = []
    for step in steps:
        seed_everything(step_seed(cfg.seed, epoch, step, rank))
        out.append(next(batches))
    return out


@pytest.mark.ray
def test_ray_data_batches_equal_the_in_process_loaders(ray_session, tiny_demo, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_demo, data)
    import pandas as pd

    df = pd.read_csv(data / "df.csv")
    broken = df.loc[df["split"] == "train", "path"].iloc[5]
    (data / broken).write_bytes(b"not a jpeg")
    for overrides, world_size, epoch, start in ((["on_bad_image=skip"], 2, 1, 0), ([], 1, 0, 1)):
        base = load_config(os.path.join(ROOT, "configs", "demo.yaml"), [f"dataset_root={data}", *TINY, *overrides])
        if not overrides:  # without the broken file: on_bad_image=error
            (data / broken).write_bytes((data / df.loc[df["split"] == "train", "path"].iloc[4]).read_bytes())
        streamed_cfg = base.model_copy(update={"loader": base.loader.model_copy(update={"source": "ray_data"})})
        for rank in range(world_size):
            expected = _batches(base, rank, world_size, epoch, start)
            streamed = _batches(streamed_cfg, rank, world_size, epoch, start)
            assert len(streamed) == len(expected) > 0
            for a, b in zip(expected, streamed):
                torch.testing.assert_close(b["image"], a["image"], rtol=0, atol=0)
                assert torch.equal(b["label"], a["label"]) and torch.equal(b["index"], torch.as_tensor(a["index"]))
                assert b["n_bad_images"] == a.get("n_bad_images", 0)
            if overrides:
                assert sum(b["n_bad_images"] for b in streamed) <= 1


def test_ray_data_source_is_checked_on_the_driver(tiny_demo):
    from raymetric.config import ConfigError, check_config

    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"),
                      [f"dataset_root={tiny_demo}", "loader.source=ray_data", "loader.decode=gpu", "ray.use_gpu=true"])
    with pytest.raises(ConfigError, match="loader.source=ray_data does not go with loader.decode=gpu"):
        check_config(cfg)


@pytest.mark.ray
def test_training_with_ray_data_ingest_ends_with_the_in_process_weights(ray_session, tiny_demo, tmp_path):
    """2 Ray Train workers (half a CPU each) streaming from Ray tasks (the other CPU): the same weights."""
    from raymetric.checkpoint import STATE_FILE, load_state
    from raymetric.train import fit

    states = {}
    for source in ("dataloader", "ray_data"):
        cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"), [
            f"dataset_root={tiny_demo}", *TINY, f"ray.storage_path={tmp_path}", f"ray.name={source}", "max_epochs=1",
            "valid_period=1", "validate_untrained=false", "log_images=false", "ray.cpus_per_worker=0.5",
            "scheduling.scheduler.args.T_max=1", f"loader.source={source}"])
        result = fit(cfg, quiet=True)
        states[source] = load_state(os.path.join(result.checkpoint_path, STATE_FILE))
    assert states["ray_data"]["epoch"] == 1
    for key, value in states["dataloader"]["model"].items():
        assert torch.equal(states["ray_data"]["model"][key], value), key
