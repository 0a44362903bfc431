"""The trained extractor alone, for serving: a plain state dict with what rebuilds it, TorchScript, torch.export.

A training checkpoint (``state.pt``) holds the extractor next to the optimizer, the loss, RNG states
and the config. ``export_extractor`` takes the extractor out of a run directory (its best checkpoint,
else its latest), a checkpoint directory or a ``state.pt``, and writes into a folder:

- ``extractor.safetensors`` and ``extractor.json``: the tensors, and the extractor's name and
  arguments (for ``timm``, the timm architecture), its embedding size, the validation transforms and
  the input size; ``load_exported`` rebuilds the model and the transform from them;
- ``extractor.torchscript.pt``: the eval-mode extractor traced with TorchScript (C++ / Triton
  serving; TorchScript is deprecated in recent PyTorch, in favour of torch.export);
- ``extractor.pt2``: the eval-mode extractor as a ``torch.export`` program, any batch size.

Every format gives the same embeddings as the checkpoint's extractor in eval mode (tests/test_export.py).
The same folders are accepted by ``extractor.args.weights`` to start training from them.
"""

from __future__ import annotations

import glob
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from raymetric.checkpoint import BEST_DIR, STATE_FILE, load_state

META_FILE = "extractor.json"
WEIGHTS_FILE = "extractor.safetensors"
TORCHSCRIPT_FILE = "extractor.torchscript.pt"
TORCH_EXPORT_FILE = "extractor.pt2"
FORMAT = "raymetric-extractor"
FORMATS = ("state_dict", "torchscript", "torch_export")


class ExportError(ValueError):
    """A source that holds no extractor, or a format that cannot be written; the message names the path."""


def find_checkpoint(path: str, which: str = "best") -> str:
    """The ``state.pt`` that ``path`` names: the file itself, a checkpoint directory, or a run directory.

    Args:
        path: a ``state.pt``, a directory holding one, or a run directory.
        which: in a run directory, ``best`` (``<run>/best/state.pt`` when it exists, else the latest)
            or ``latest`` (the newest ``checkpoint_*`` Ray kept).
    """
    if which not in ("best", "latest"):
        raise ExportError(f"which={which!r}: expected 'best' or 'latest'")
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise ExportError(f"no such file or directory: {path}")
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return os.path.join(path, STATE_FILE)
    best = os.path.join(path, BEST_DIR, STATE_FILE)
    if which == "best" and os.path.isfile(best):
        return best
    # Ray names checkpoint folders by their creation time: the newest sorts last.
    latest = sorted(glob.glob(os.path.join(path, "checkpoint_*", STATE_FILE)))
    if not latest:
        raise ExportError(f"{path}: no {STATE_FILE}, no best/{STATE_FILE} and no checkpoint_*/{STATE_FILE} in it")
    return latest[-1]


def default_export_dir(source: str) -> str:
    """``<run directory>/export`` for a run directory, one of its checkpoint directories or a ``state.pt`` in one.

    Not inside a checkpoint directory: Ray deletes old checkpoints.

    >>> default_export_dir("runs/r1"), default_export_dir("runs/r1/checkpoint_2026-01-01_00-00-00.0/state.pt")
    ('runs/r1/export', 'runs/r1/export')
    >>> default_export_dir("runs/r1/best/state.pt")
    'runs/r1/export'
    """
    path = os.path.normpath(source)
    if path.endswith(".pt"):
        path = os.path.dirname(path)
    if os.path.basename(path).startswith("checkpoint_") or os.path.basename(path) == BEST_DIR:
        path = os.path.dirname(path)
    return os.path.join(path, "export")


def read_checkpoint(path: str, which: str = "best") -> dict:
    """A raymetric training checkpoint: ``model`` (the extractor's state dict) and ``config`` among others."""
    state_path = find_checkpoint(path, which)
    state = load_state(state_path)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ExportError(f"{state_path}: not a raymetric checkpoint (no 'model' and 'config' in it)")
    state["path"] = state_path
    return state


def trained_extractor_spec(extractor: dict) -> dict:
    """``{"name", "args"}`` that rebuild a trained extractor, without ``args.weights``.

    The state dict holds every tensor: the pretrained-weights file the run started from is not needed.

    >>> trained_extractor_spec({"name": "timm", "args": {"arch": "resnet18", "weights": "x.pth"}})
    {'name': 'timm', 'args': {'arch': 'resnet18'}}
    """
    return {"name": extractor["name"], "args": {k: v for k, v in extractor.get("args", {}).items() if k != "weights"}}


def _build(extractor: dict, extractors: dict | None) -> torch.nn.Module:
    from raymetric.extractors import build_extractor

    spec = trained_extractor_spec(extractor)
    return build_extractor(spec["name"], spec["args"], extractors)


def extractor_from_checkpoint(path: str, *, which: str = "best", extractors: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """The checkpoint's extractor in eval mode, and the run's config (a plain dict).

    Args:
        path: a run directory, a checkpoint directory or a ``state.pt``.
        which: ``best`` or ``latest`` checkpoint of a run directory.
        extractors: the user's own extractor classes by name, when the run used one.
    """
    state = read_checkpoint(path, which)
    cfg = state["config"]
    model = _build(cfg["extractor"], extractors)
    model.load_state_dict(state["model"])
    return model.eval(), cfg


def input_size(transform: Callable) -> list[int]:
    """``[C, H, W]`` that ``transform`` makes of an image (it resizes, so any image tells)."""
    from PIL import Image

    return list(transform(Image.new("RGB", (256, 256))).shape)


def export_extractor(
    source: str,
    out_dir: str,
    *,
    formats: Sequence[str] = ("state_dict", "torchscript"),
    which: str = "best",
    extractors: dict | None = None,
) -> dict[str, str]:
    """Write the extractor of ``source`` (run directory, checkpoint directory or ``state.pt``) into ``out_dir``.

    Args:
        source: where the trained extractor is.
        out_dir: the export folder (created).
        formats: any of ``state_dict``, ``torchscript``, ``torch_export``.
        which: ``best`` or ``latest`` checkpoint of a run directory.
        extractors: the user's own extractor classes by name, when the run used one.

    Returns:
        The written files by format (``meta`` for ``extractor.json``).
    """
    return export_state(read_checkpoint(source, which), out_dir, formats=formats, extractors=extractors)


def export_state(
    state: dict,
    out_dir: str,
    *,
    formats: Sequence[str] = ("state_dict", "torchscript"),
    extractors: dict | None = None,
    transforms: dict | None = None,
) -> dict[str, str]:
    """:func:`export_extractor` of a checkpoint already read (:func:`read_checkpoint`).

    ``transforms``: the ``{"name", "args"}`` to record instead of the run's ``transforms_val``.
    """
    from raymetric.data.transforms import build_transforms

    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ExportError(f"formats {list(formats)}: choose from {list(FORMATS)}")
    cfg = state["config"]
    model = _build(cfg["extractor"], extractors)
    model.load_state_dict(state["model"])
    model.eval()
    transforms = transforms or cfg["transforms_val"]
    size = input_size(build_transforms(transforms["name"], transforms["args"]))
    example = torch.zeros(2, *size)  # [B, C, H, W]; 2, not 1: torch.export specialises a batch of 1
    os.makedirs(out_dir, exist_ok=True)
    written: dict[str, str] = {}

    meta = {
        "format": FORMAT,
        "version": 1,
        "extractor": trained_extractor_spec(cfg["extractor"]),
        "timm_arch": cfg["extractor"]["args"].get("arch") if cfg["extractor"]["name"] == "timm" else None,
        "feat_dim": _feat_dim(model, example),
        "transforms": transforms,
        "input_size": size,
        "source": os.path.abspath(state["path"]),
        "epoch": state.get("epoch"),
    }
    written["meta"] = os.path.join(out_dir, META_FILE)
    with open(written["meta"], "w") as f:
        json.dump(meta, f, indent=2)
    if "state_dict" in formats:
        from safetensors.torch import save_file

        written["state_dict"] = os.path.join(out_dir, WEIGHTS_FILE)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, written["state_dict"])
    with torch.no_grad():
        if "torchscript" in formats:
            written["torchscript"] = os.path.join(out_dir, TORCHSCRIPT_FILE)
            with _torchscript_deprecation_quiet():
                torch.jit.save(torch.jit.trace(model, example), written["torchscript"])
        if "torch_export" in formats:
            written["torch_export"] = os.path.join(out_dir, TORCH_EXPORT_FILE)
            batch = torch.export.Dim("batch", min=1)
            name = next(iter(_forward_args(model)))
            program = torch.export.export(model, (example,), dynamic_shapes={name: {0: batch}})
            torch.export.save(program, written["torch_export"])
    return written


@contextmanager
def _torchscript_deprecation_quiet() -> Iterator[None]:
    # PyTorch warns at every torch.jit.save/load that TorchScript is deprecated; the module docstring says it once.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*deprecated")
        yield


def _feat_dim(model: torch.nn.Module, example: torch.Tensor) -> int:
    if hasattr(model, "feat_dim"):
        return int(model.feat_dim)
    with torch.no_grad():
        return int(model(example).shape[1])


def _forward_args(model: torch.nn.Module) -> list[str]:
    import inspect

    return [p for p in inspect.signature(model.forward).parameters]


def load_exported(path: str, *, fmt: str = "state_dict", extractors: dict | None = None) -> tuple[torch.nn.Module, Callable]:
    """The exported extractor (eval mode) and its validation transform (PIL image -> ``[C, H, W]``).

    Args:
        path: the export folder.
        fmt: which file to load: ``state_dict`` (rebuilds the extractor with raymetric and timm),
            ``torchscript`` or ``torch_export``.
        extractors: the user's own extractor classes by name, for ``state_dict`` of one.
    """
    from raymetric.data.transforms import build_transforms

    meta = read_export_meta(path)
    transform = build_transforms(meta["transforms"]["name"], meta["transforms"]["args"])
    if fmt == "state_dict":
        from safetensors.torch import load_file

        model = _build(meta["extractor"], extractors)
        model.load_state_dict(load_file(os.path.join(path, WEIGHTS_FILE)))
    elif fmt == "torchscript":
        with _torchscript_deprecation_quiet():
            model = torch.jit.load(os.path.join(path, TORCHSCRIPT_FILE), map_location="cpu")
    elif fmt == "torch_export":
        model = torch.export.load(os.path.join(path, TORCH_EXPORT_FILE)).module()
        return model, transform  # an exported program has no train/eval switch: it was exported in eval mode
    else:
        raise ExportError(f"fmt={fmt!r}: choose from {list(FORMATS)}")
    return model.eval(), transform


def read_export_meta(path: str) -> dict:
    """The ``extractor.json`` of an export folder; ExportError when ``path`` is not one."""
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise ExportError(f"{path}: no {META_FILE}; not an export folder (python jobs/export.py writes one)")
    with open(meta_path) as f:
        return json.load(f)


def extractor_weights_file(path: str) -> str:
    """The file holding an extractor's tensors in a folder: an export folder's safetensors, else a checkpoint.

    ``extractor.args.weights`` accepts a run directory, a checkpoint directory or an export folder
    through this.
    """
    exported = os.path.join(path, WEIGHTS_FILE)
    return exported if os.path.isfile(exported) else find_checkpoint(path)
