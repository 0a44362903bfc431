"""The training step on a GPU: bf16 autocast and channels_last (skipped where there is no GPU)."""

import pytest
import torch

from raymetric.extractors import TimmExtractor
from raymetric.losses import build_criterion
from raymetric.miners import HardTripletMiner
from raymetric.step import micro_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_bf16_channels_last_step_trains():
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = TimmExtractor("resnet10t", embedding_size=64, batchnorm_neck=True).to(device)
    model = model.to(memory_format=torch.channels_last)
    criterion = build_criterion("triplet_with_miner", {"margin": 0.2}, {"name": "hard_triplets"})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.randn(64, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(16, device=device).repeat_interleave(4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert model(images).dtype == torch.float32, "the extractor L2-normalises in fp32"
        assert model.backbone.conv1[0](images).dtype == torch.bfloat16, "convolutions run in bf16"
    losses = [
        micro_step(model, criterion, optimizer, images, labels, update=True, autocast_dtype=torch.bfloat16)["loss"]
        for _ in range(15)
    ]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    assert model.backbone.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_mining_on_gpu_matches_cpu():
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(256, 128, generator=g, dtype=torch.float64), dim=1)
    labels = torch.arange(32).repeat_interleave(8)
    rows = torch.arange(256)
    cpu = HardTripletMiner().mine(emb, labels, emb, labels, rows)
    gpu = HardTripletMiner().mine(emb.cuda(), labels.cuda(), emb.cuda(), labels.cuda(), rows.cuda())
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())
