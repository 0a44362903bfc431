"""The training input pipeline of one worker: DataLoader processes, and where images are decoded and augmented.

Three ways to feed a step (``loader.augment_on``, ``loader.decode``; plain torch, no Ray here):

| mode | the DataLoader processes | what travels | the training process, on the worker's device |
|---|---|---|---|
| ``augment_on: cpu`` | decode, the whole transform | float32 images | nothing |
| ``augment_on: device`` | decode, the transform's geometry (resize, crop, flip) | uint8 images | to float, colour jitter, normalise, batched |
| ``decode: gpu`` | read the JPEG files' bytes | bytes | nvJPEG decode (batched), crop, resize, flip, jitter, normalise |

``augment_on: auto`` (the default) is ``device`` on a GPU and ``cpu`` on a CPU. On a GPU each batch is
moved and finished one step ahead on a side CUDA stream (``loader.look_ahead``), so the copy, the
decoding and the augmentation overlap the previous step instead of delaying it. The transforms'
batched forms are ``raymetric.data.device_transforms``.

``decode: gpu`` reads files whole: a file that is not a JPEG (PNG, WebP) is decoded on the CPU by
torchvision in the training process, and a JPEG that nvJPEG refuses (CMYK) likewise.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import torch

from raymetric.data.dataset import ImageDataset, ImageReadError, check_box
from raymetric.data.device_transforms import DEVICE_TRANSFORMS, DeviceTransform, build_device_transform
from raymetric.data.transforms import build_transforms

JPEG_MAGIC = b"\xff\xd8\xff"
# torchvision 0.29 deprecates its image codecs for TorchCodec, which has no batched nvJPEG decoding yet.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def resolve_augment_on(augment_on: str, decode: str, device_type: str) -> str:
    """Where the training transforms finish: ``cpu`` (in the DataLoader processes) or ``device``.

    >>> resolve_augment_on("auto", "cpu", "cuda"), resolve_augment_on("auto", "cpu", "cpu")
    ('device', 'cpu')
    >>> resolve_augment_on("auto", "gpu", "cuda")
    'device'
    """
    if decode == "gpu" or augment_on == "device":
        return "device"
    if augment_on == "cpu":
        return "cpu"
    return "device" if device_type == "cuda" else "cpu"


def loader_kwargs(num_workers: int, pin_memory: bool, prefetch_factor: int, persistent_workers: bool) -> dict:
    """``DataLoader`` keyword arguments; the process-only ones only when there are processes.

    >>> loader_kwargs(0, False, 2, True)
    {'num_workers': 0, 'pin_memory': False}
    >>> loader_kwargs(2, True, 4, True)
    {'num_workers': 2, 'pin_memory': True, 'prefetch_factor': 4, 'persistent_workers': True}
    """
    kwargs: dict[str, Any] = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers > 0:  # DataLoader refuses these without processes
        kwargs |= {"prefetch_factor": prefetch_factor, "persistent_workers": persistent_workers}
    return kwargs


class EncodedImageDataset(ImageDataset):
    """The file bytes of each image, for decoding on the GPU: ``{"data": uint8 [n_bytes], "bbox", "label", "index"}``.

    ``bbox`` is ``(x_1, y_1, x_2, y_2)`` or ``-1``s for none; it is applied after decoding, when the
    image's size is known.
    """

    def __init__(self, df: pd.DataFrame, labels=None):
        super().__init__(df, transform=None, labels=labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} images")
        path = self._paths[i]
        try:
            with open(path, "rb") as f:
                data = np.frombuffer(f.read(), dtype=np.uint8)
        except OSError as error:
            raise ImageReadError(f"row {self._rows[i]}: cannot read image {path!r}: {error}") from error
        return {"data": torch.from_numpy(data.copy()), "bbox": torch.from_numpy(self._bboxes[i].copy()),
                "label": int(self.labels[i]), "index": int(i), "row": int(self._rows[i])}


def collate_encoded(items: list[dict]) -> dict[str, Any]:
    """A batch of encoded images: the byte tensors stay a list (their lengths differ)."""
    return {
        "data": [item["data"] for item in items],
        "bbox": torch.stack([item["bbox"] for item in items]),  # [B, 4]
        "label": torch.tensor([item["label"] for item in items], dtype=torch.int64),
        "index": torch.tensor([item["index"] for item in items], dtype=torch.int64),
        "row": [item["row"] for item in items],
    }


def decode_batch(data: list[torch.Tensor], device: torch.device, rows: list[int] | None = None) -> list[torch.Tensor]:
    """RGB uint8 ``[3, h, w]`` images on ``device`` from encoded files; JPEGs in one batched call.

    Args:
        data: Each file's bytes (uint8, on the CPU).
        device: Where to decode JPEGs (nvJPEG on CUDA) and put every image.
        rows: The dataset rows, for error messages.

    Raises:
        ImageReadError: A file cannot be decoded; the message names its row.

    >>> import io, PIL.Image
    >>> buf = io.BytesIO(); PIL.Image.new("RGB", (5, 3), (255, 0, 0)).save(buf, "PNG")
    >>> decode_batch([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], torch.device("cpu"))[0].shape
    torch.Size([3, 3, 5])
    """
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    out: list[torch.Tensor | None] = [None] * len(data)
    jpegs = [i for i, d in enumerate(data) if bytes(d[:3].tolist()) == JPEG_MAGIC]
    if jpegs:
        try:
            for i, image in zip(jpegs, decode_jpeg([data[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)):
                out[i] = image
        except RuntimeError:  # a JPEG nvJPEG refuses (CMYK, a damaged file): each goes to the CPU below
            pass
    for i, image in enumerate(out):
        if image is None:
            try:
                out[i] = decode_image(data[i], mode=ImageReadMode.RGB).to(device, non_blocking=True)
            except RuntimeError as error:
                row = f"row {rows[i]}: " if rows is not None else ""
                raise ImageReadError(f"{row}cannot decode image: {error}") from error
    return out  # type: ignore[return-value]


def crop_to_boxes(images: list[torch.Tensor], boxes: torch.Tensor, rows: list[int]) -> list[torch.Tensor]:
    """Each image cropped to its box ``(x_1, y_1, x_2, y_2)`` (``-1``: none), refused when the box does not fit.

    >>> crop_to_boxes([torch.zeros(3, 4, 6)], torch.tensor([[1, 0, 3, 2]]), [7])[0].shape
    torch.Size([3, 2, 2])
    """
    out = []
    for image, box, row in zip(images, boxes.tolist(), rows):
        if box[0] < 0:
            out.append(image)
            continue
        height, width = image.shape[1:]
        x_1, y_1, x_2, y_2 = check_box(box, width, height, "its image", row)
        out.append(image[:, y_1:y_2, x_1:x_2])
    return out


class BatchToDevice:
    """A collated training batch with its images and labels on the device, the images normalised, ready for the model.

    Args:
        device: The worker's device.
        transform: The training transform's split form; None when the DataLoader processes ran the
            whole transform (``augment_on: cpu``).
        encoded: The batch holds file bytes (``decode: gpu``).
    """

    def __init__(self, device: torch.device, transform: DeviceTransform | None = None, encoded: bool = False):
        self.device, self.transform, self.encoded = device, transform, encoded
        self._gens = (torch.Generator(), torch.Generator(device=device))

    def __call__(self, batch: dict, seed: int) -> dict:
        """The batch with ``image`` and ``label`` on the device, the images finished; other keys as they were.

        ``seed`` seeds this batch's random augmentation on the device (crop boxes, flips, jitter).
        """
        out = {k: v for k, v in batch.items() if k not in ("data", "bbox", "row")}
        out["label"] = batch["label"].to(self.device, non_blocking=True)
        if self.transform is None:
            out["image"] = batch["image"].to(self.device, non_blocking=True)
            return out
        for gen in self._gens:
            gen.manual_seed(seed)
        if self.encoded:
            images = crop_to_boxes(decode_batch(batch["data"], self.device, batch["row"]), batch["bbox"], batch["row"])
            out["image"] = self.transform.from_decoded(images, self._gens)
        else:
            out["image"] = self.transform.finish(batch["image"].to(self.device, non_blocking=True), self._gens)
        return out


class DeviceBatches:
    """The train loader's batches on the device (``BatchToDevice``), one epoch at a time.

    On CUDA with ``look_ahead``, batch ``k + 1`` is copied and finished on a side stream right after
    step ``k`` is queued, and step ``k + 1`` waits for it by an event: the copy, decoding and
    augmentation overlap the step before. Otherwise each batch is prepared when it is asked for; so
    too without DataLoader processes, where preparing early would run the CPU transforms before the
    step's seed is set (``seed_everything`` in the recipe).

    Args:
        loader: The training ``DataLoader``.
        to_device: What turns a collated batch into device tensors.
        look_ahead: Prepare one batch ahead on a side stream (CUDA only).
    """

    def __init__(self, loader: torch.utils.data.DataLoader, to_device: BatchToDevice, look_ahead: bool = True):
        self.loader, self.to_device = loader, to_device
        self.look_ahead = look_ahead and to_device.device.type == "cuda" and loader.num_workers > 0

    def epoch(self, seeds: Iterable[int]) -> Iterator[dict]:
        """One pass over the loader; the ``i``-th batch's device augmentation is seeded with ``seeds[i]``.

        The loader's iterator is made here, at once, as ``iter(loader)`` would be: it draws its base
        seed from the global RNG, which must happen before the caller seeds the first step, not after
        (a run resumed mid-epoch must draw the same numbers as an uninterrupted one).
        """
        return self._prepared(zip(seeds, iter(self.loader)))

    def _prepared(self, batches: Iterator[tuple[int, dict]]) -> Iterator[dict]:
        if not self.look_ahead:
            for seed, batch in batches:
                yield self.to_device(batch, seed)
            return
        stream = torch.cuda.Stream(self.to_device.device)

        def prepare(seed: int, batch: dict):
            with torch.cuda.stream(stream):
                out = self.to_device(batch, seed)
                ready = torch.cuda.Event()
                ready.record(stream)
            return out, ready

        pending = None
        for seed, batch in batches:
            if pending is not None:
                yield self._ready(*pending)
            pending = prepare(seed, batch)
        if pending is not None:
            yield self._ready(*pending)

    @staticmethod
    def _ready(out: dict, ready: torch.cuda.Event) -> dict:
        current = torch.cuda.current_stream()
        current.wait_event(ready)
        for key in ("image", "label"):
            out[key].record_stream(current)  # made on the side stream, used on this one: keep its memory until then
        return out


def build_train_input(
    df: pd.DataFrame,
    labels: np.ndarray,
    transforms: tuple[str, dict],
    *,
    device: torch.device,
    augment_on: str = "auto",
    decode: str = "cpu",
    on_bad_image: str = "error",
    cache=None,
) -> tuple[torch.utils.data.Dataset, BatchToDevice, Callable | None]:
    """The training dataset, what finishes its batches on the device, and its collate function (None: the default).

    Args:
        df: The train rows.
        labels: Their training labels (``remap_labels``).
        transforms: ``(name, args)`` of ``transforms_train``.
        device: The worker's device.
        augment_on: ``auto``, ``cpu`` or ``device`` (``loader.augment_on``).
        decode: ``cpu`` or ``gpu`` (``loader.decode``).
        on_bad_image: ``ImageDataset``'s policy (``error`` only with ``decode: gpu``, which decodes in
            the training process).
        cache: an ``ImageCache`` of the rows (``loader.cache``; not with ``decode: gpu``).
    """
    name, args = transforms
    where = resolve_augment_on(augment_on, decode, device.type)
    if where == "cpu" or (augment_on == "auto" and decode == "cpu" and name not in DEVICE_TRANSFORMS):
        return ImageDataset(df, build_transforms(name, args), labels, on_bad_image, cache), BatchToDevice(device), None
    split = build_device_transform(name, args)
    if decode == "gpu":
        if on_bad_image != "error":
            raise ValueError(f"on_bad_image={on_bad_image!r} needs images decoded on the CPU (decode: cpu)")
        return EncodedImageDataset(df, labels=labels), BatchToDevice(device, split, encoded=True), collate_encoded
    return ImageDataset(df, split.host, labels, on_bad_image, cache), BatchToDevice(device, split), None


def check_loader_settings(
    augment_on: str, decode: str, transforms_name: str, use_gpu: bool, on_bad_image: str = "error",
    cache: bool = False,
    source: str = "dataloader",
) -> str | None:
    """A problem with the ``loader`` keys for this run, naming the key, or None.

    >>> check_loader_settings("auto", "gpu", "augs_torch", use_gpu=False)
    'config key loader.decode=gpu needs ray.use_gpu=true: nvJPEG decodes on the GPU'
    """
    if source == "ray_data" and decode == "gpu":
        return ("config key loader.source=ray_data does not go with loader.decode=gpu: Ray tasks decode the "
                "images; nvJPEG decodes in the training process")
    if cache and decode == "gpu":
        return ("config key loader.cache=true does not go with loader.decode=gpu: the cache holds decoded pixels, "
                "nvJPEG decodes files")
    if decode == "gpu" and not use_gpu:
        return "config key loader.decode=gpu needs ray.use_gpu=true: nvJPEG decodes on the GPU"
    if decode == "gpu" and on_bad_image != "error":
        return (f"config key on_bad_image={on_bad_image!r} needs loader.decode=cpu: images decoded on the GPU "
                "are decoded a batch at a time in the training process (check them first with check_images=true)")
    if decode == "gpu" and augment_on == "cpu":
        return ("config key loader.augment_on=cpu does not go with loader.decode=gpu: images decoded on the GPU "
                "are augmented there (set loader.augment_on to auto or device)")
    # augment_on: auto falls back to the CPU for a transform without a device form; asked for, it must have one.
    if (decode == "gpu" or augment_on == "device") and transforms_name not in DEVICE_TRANSFORMS:
        return (f"config key transforms_train.name={transforms_name!r} has no device form for "
                f"loader.augment_on=device / loader.decode=gpu; those with one: {sorted(DEVICE_TRANSFORMS)}")
    return None


def pin_memory_for(setting: bool | str, device_type: str) -> bool:
    """``loader.pin_memory``: ``auto`` pins on a GPU only (page-locked memory helps host-to-GPU copies alone).

    >>> pin_memory_for("auto", "cuda"), pin_memory_for("auto", "cpu"), pin_memory_for(False, "cuda")
    (True, False, False)
    """
    return device_type == "cuda" if setting == "auto" else bool(setting)

