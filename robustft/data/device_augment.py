"""Training augmentation on the accelerator for small images (``data.device_augmentation: true``).

With 32x32 images a GPU trains a ResNet faster than a few CPU workers can decode JPEG/PNG, crop, flip
and normalise one image at a time with PIL: the GPU starves. Here

- the training set is decoded ONCE (resize + centre-crop to the model's input size, as the CPU recipe
  does first) into one uint8 ``[N, C, H, W]`` tensor (:class:`UInt8TrainingSet`), pinned when CUDA is
  available, so a batch is an index into memory and the host-to-device copy moves 1 byte per value;
- the random part of the recipe runs on the device, on the whole batch at once
  (:func:`crop_flip_batch`): per-sample random crops of the zero-padded batch and horizontal flips
  folded into ONE gather, then the backbone's normalisation. ``OODDataModule.on_after_batch_transfer``
  applies it to uint8 training batches only (evaluation batches are already float tensors).

Supported recipes: ``crop_flip`` (the CIFAR recipe: pad ``size // 8``, random crop, flip) and ``none``
(normalise only), with any ``n_views`` (V independent draws per image). The other recipes (``simclr``'s
colour jitter / grayscale, ``random_resized_crop``'s resampling) have no device version here and are
refused with the field named (:func:`check_device_augmentation`).

Randomness [CHOICE]: offsets and flips are drawn on the CPU from ``generator`` (default: torch's global
CPU RNG, which ``seed_everything`` seeds and the resumable training loader restores before every
batch, so a resumed run draws what the uninterrupted one drew), then moved to the device: 3 small
integers per image, negligible next to the batch. Same distribution as torchvision's
``RandomCrop(size, padding=size // 8)`` + ``RandomHorizontalFlip()`` (offsets uniform in
``0..2 * padding``, flip with probability 1/2, zero padding), not the same draws.

``data.num_workers: 0`` is the natural setting here: a batch is one index into memory, and workers would
only add inter-process copies (with CUDA, of a pinned tensor into forked processes: untested).

``ChannelsLast`` (a callback, ``trainer.callbacks``) puts the model's weights in channels-last memory
format; convolutions then run channels-last (cuDNN follows the weight's format), the format tensor cores
prefer under bf16 autocast (``trainer.precision: bf16-mixed``).
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms as T

from robustft.backbones.base import PreprocessConfig
from robustft.data.sources import DataConfigError, LabeledImages

#: ``data.augmentation`` recipes that have a device version
DEVICE_RECIPES = ("crop_flip", "none")


def check_device_augmentation(augmentation: str, has_unlabeled: bool) -> None:
    """Refuse what ``data.device_augmentation: true`` cannot do, naming the fields and the fix."""
    if augmentation not in DEVICE_RECIPES:
        raise DataConfigError(
            f"data.device_augmentation: true supports data.augmentation {list(DEVICE_RECIPES)}, got "
            f"'{augmentation}'; set data.device_augmentation: false to run '{augmentation}' on the CPU"
        )
    if has_unlabeled:
        raise DataConfigError(
            "data.device_augmentation: true does not cover data.unlabeled sets (they are augmented on the "
            "CPU); remove data.unlabeled or set data.device_augmentation: false"
        )


def crop_padding(image_size: int) -> int:
    """The ``crop_flip`` recipe's padding: ``size // 8`` (4 for 32x32), at least 1."""
    return max(1, image_size // 8)


def draw_crop_flip(
    n: int, padding: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(top, left, flip)`` for ``n`` images: offsets uniform in ``0..2 * padding``, flip with p 1/2 (CPU)."""
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return top, left, flip


def crop_flip_at(images: Tensor, padding: int, top: Tensor, left: Tensor, flip: Tensor) -> Tensor:
    """Crop every image of ``images`` ``[B, C, H, W]`` (any dtype, any device) from its zero-padded
    version at ``(top[b], left[b])``, mirrored horizontally where ``flip[b]``; one gather for the batch.

    Output pixel ``(y, x)`` of image b is padded pixel ``(top + y, left + x)``, or ``(top + y,
    left + W - 1 - x)`` when flipped (a flip after the crop)."""
    b, _, h, w = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    top, left, flip = top.to(device), left.to(device), flip.to(device)
    rows = top[:, None] + torch.arange(h, device=device)  # [B, H]
    cols = torch.arange(w, device=device).expand(b, w)
    cols = left[:, None] + torch.where(flip[:, None], cols.flip(1), cols)  # [B, W]
    batch = torch.arange(b, device=device)[:, None, None]
    # advanced indices around a slice: the indexed dims come first -> [B, H, W, C]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def normalize_uint8(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 ``[..., C, H, W]`` -> float32 ``(x / 255 - mean) / std``, as ``ToTensor`` + ``Normalize``."""
    shape = (len(mean), 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(shape)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(shape)
    return (images.float() / 255.0 - mean_t) / std_t


def augment_batch(
    images: Tensor,
    cfg: PreprocessConfig,
    augmentation: str = "crop_flip",
    n_views: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The device version of ``data.augmentation`` on a uint8 batch ``[B, C, H, W]``: float32
    ``[B, C, H, W]`` (``n_views`` 1) or ``[B, V, C, H, W]`` (V independent draws per image)."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"device augmentation expects a uint8 [B, C, H, W] batch, got {images.dtype} {tuple(images.shape)}")
    if augmentation not in DEVICE_RECIPES:
        raise DataConfigError(f"data.augmentation: '{augmentation}' has no device version ({list(DEVICE_RECIPES)})")
    b = images.shape[0]
    views = images if n_views == 1 else images[:, None].expand(b, n_views, *images.shape[1:]).flatten(0, 1)
    if augmentation == "crop_flip":
        padding = crop_padding(cfg.image_size)
        top, left, flip = draw_crop_flip(views.shape[0], padding, generator)
        views = crop_flip_at(views, padding, top, left, flip)
    out = normalize_uint8(views, cfg.mean, cfg.std)
    return out if n_views == 1 else out.view(b, n_views, *out.shape[1:])


class UInt8TrainingSet(Dataset):
    """Training images decoded once (resize + centre-crop to ``cfg.image_size``) into one uint8
    ``[N, C, H, W]`` tensor; items are ``{"image": uint8 [C, H, W], "label", "index"}`` (plus ``text``
    for captioned sources), augmented later on the device. Pinned when CUDA is available, so the
    batches' copies to the GPU can be asynchronous."""

    def __init__(self, images: LabeledImages, cfg: PreprocessConfig, indices: np.ndarray | None = None) -> None:
        self.indices = np.arange(len(images)) if indices is None else np.asarray(indices)
        self.source = images
        try:
            interpolation = T.InterpolationMode(cfg.interpolation)
        except ValueError:  # as robustft.data.transforms: unknown names resize bilinearly
            interpolation = T.InterpolationMode.BILINEAR
        resize = T.Compose([
            T.Resize(cfg.image_size, interpolation=interpolation), T.CenterCrop(cfg.image_size), T.PILToTensor(),
        ])
        decoded = torch.empty((len(self.indices), 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
        for row, source_index in enumerate(self.indices):
            decoded[row] = resize(images.load_image(int(source_index)).convert("RGB"))
        self.images = decoded.pin_memory() if torch.cuda.is_available() else decoded
        self.label_values = torch.as_tensor(np.asarray(images.labels)[self.indices], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return self.label_values.numpy()

    def __getitem__(self, position: int) -> dict:
        sample = {"image": self.images[position], "label": int(self.label_values[position]), "index": position}
        texts = getattr(self.source, "texts", None)
        if texts is not None:
            sample["text"] = texts[int(self.indices[position])]
        return sample


class ChannelsLast(pl.Callback):
    """Put the model in channels-last memory format before training / evaluation (``trainer.callbacks:
    [{class_path: robustft.data.device_augment.ChannelsLast}]``). Convolutions follow their weight's
    format, so inputs need no conversion; a no-op for models without 4-d weights."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.to(memory_format=torch.channels_last)
