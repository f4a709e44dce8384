"""Image transforms derived from the backbone's :class:`PreprocessConfig`.

The backbone decides size and normalisation; the config only picks an augmentation recipe for
training. That keeps pretrained weights and their normalisation from drifting apart.
"""

from __future__ import annotations

from collections.abc import Callable

from torchvision import transforms as T

from robustft.backbones.base import PreprocessConfig

_INTERPOLATION = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "nearest": T.InterpolationMode.NEAREST,
}

AUGMENTATIONS = ("none", "crop_flip", "random_resized_crop")


def _interpolation(cfg: PreprocessConfig) -> T.InterpolationMode:
    return _INTERPOLATION.get(cfg.interpolation, T.InterpolationMode.BILINEAR)


def eval_transform(cfg: PreprocessConfig) -> Callable:
    """Resize the short side to the input size, centre-crop, normalise."""
    return T.Compose(
        [
            T.Resize(cfg.image_size, interpolation=_interpolation(cfg)),
            T.CenterCrop(cfg.image_size),
            T.ToTensor(),
            T.Normalize(cfg.mean, cfg.std),
        ]
    )


def train_transform(cfg: PreprocessConfig, augmentation: str) -> Callable:
    """Training transform: ``none`` (as eval), ``crop_flip`` (the CIFAR recipe: pad-4 random crop +
    horizontal flip) or ``random_resized_crop`` (scale 0.9-1, the FLYP/CMA CLIP recipe) + flip."""
    if augmentation == "none":
        return eval_transform(cfg)
    if augmentation == "crop_flip":
        geometric = [
            T.Resize(cfg.image_size, interpolation=_interpolation(cfg)),
            T.CenterCrop(cfg.image_size),
            T.RandomCrop(cfg.image_size, padding=max(1, cfg.image_size // 8)),
            T.RandomHorizontalFlip(),
        ]
    elif augmentation == "random_resized_crop":
        geometric = [
            T.RandomResizedCrop(cfg.image_size, scale=(0.9, 1.0), interpolation=_interpolation(cfg)),
            T.RandomHorizontalFlip(),
        ]
    else:
        raise ValueError(f"data.augmentation: unknown '{augmentation}'; choose one of {', '.join(AUGMENTATIONS)}")
    return T.Compose([*geometric, T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
