"""One training step on one worker, the same at every world size (plain torch; no Ray here).

``micro_step`` embeds a batch, gathers the global batch when the criterion compares against it, computes
the loss terms and back-propagates; every ``accumulate`` micro-steps it clips and steps the optimizer.
With ``accumulate > 1`` the DDP modules skip their gradient all-reduce (``no_sync``) until the last
micro-step, and each micro-step's loss is divided by ``accumulate``, so the update equals one process
on the concatenated batches, as Lightning's ``accumulate_grad_batches`` does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from raymetric.distributed import all_gather_nograd, all_gather_with_grad, unwrap, world
from raymetric.losses import needs_reference, reduce_loss


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` on ``device``, under DDP when there are several workers and it has trainable parameters.

    DDP averages the gradients of the model and of a criterion with parameters (ArcFace's class
    weights) over the workers; a module with nothing to train is left as it is (DDP refuses it).
    Wrapping a DDP module again (after freezing or unfreezing parameters: DDP fixes the trainable set
    when it wraps) first removes the old wrapper's gradient hooks, which would otherwise still fire.
    """
    if isinstance(module, DistributedDataParallel):
        module._remove_autograd_hooks()
    module = unwrap(module).to(device)
    if world()[1] == 1 or not any(p.requires_grad for p in module.parameters()):
        return module
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


@contextlib.contextmanager
def no_sync(modules: Iterable[nn.Module], skip: bool) -> Iterator[None]:
    """Inside, the DDP modules among ``modules`` accumulate gradients locally (when ``skip``)."""
    with contextlib.ExitStack() as stack:
        if skip:
            for m in modules:
                if isinstance(m, DistributedDataParallel):
                    stack.enter_context(m.no_sync())
        yield


def batch_loss(
    model: nn.Module,
    criterion: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    autocast_dtype: torch.dtype | None = None,
    sync_logs: bool = True,
) -> tuple[torch.Tensor, dict]:
    """This worker's loss to back-propagate (see ``raymetric.losses.reduce_loss``) and the global logs.

    Collective when there are several workers: every worker calls it at every micro-step.
    """
    rank, _ = world()
    with torch.autocast(images.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        emb = model(images)  # [B, D]
    if emb.dtype in (torch.float16, torch.bfloat16):
        emb = emb.float()  # losses in fp32 whatever the autocast
    if needs_reference(criterion):
        # Mine over the global batch: gathered in rank order with autograd, anchors stay local.
        ref_emb = all_gather_with_grad(emb)  # [W*B, D]
        ref_labels = all_gather_nograd(labels)  # [W*B]
        anchor_ref_index = rank * len(emb) + torch.arange(len(emb), device=emb.device)
        terms = criterion(emb, labels, ref_emb, ref_labels, anchor_ref_index)
    else:
        terms = criterion(emb, labels)
    return reduce_loss(terms, sync_logs=sync_logs)


def micro_step(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    update: bool,
    accumulate: int = 1,
    clip_grad_norm: float | None = None,
    autocast_dtype: torch.dtype | None = None,
    sync_logs: bool = True,
) -> dict:
    """Forward and backward of one batch; with ``update``, also clip and step the optimizer. Returns the logs.

    Args:
        update: the last micro-step of an accumulation window: gradients are all-reduced, clipped
            and applied, then zeroed.
        accumulate: micro-steps per optimizer step (each loss is divided by it).
        clip_grad_norm: clip the global gradient norm (of model and criterion) to this value.
    """
    with no_sync((model, criterion), skip=not update):
        loss, logs = batch_loss(model, criterion, images, labels, autocast_dtype=autocast_dtype, sync_logs=sync_logs)
        (loss / accumulate).backward()
    if update:
        if clip_grad_norm is not None:
            # After DDP's all-reduce the gradients are the same on every worker, and so is the clipping.
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return logs
