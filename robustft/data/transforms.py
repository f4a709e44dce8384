"""Image transforms derived from the backbone's :class:`PreprocessConfig`.

The backbone decides size and normalisation; the config only picks a *named* training recipe
(``data.augmentation``) from :data:`TRAIN_TRANSFORMS`. That keeps pretrained weights and their
normalisation from drifting apart. A new recipe is one decorated function::

    @TRAIN_TRANSFORMS.register("my_recipe")
    def my_recipe(cfg: PreprocessConfig) -> Callable: ...
"""

from __future__ import annotations

from collections.abc import Callable

from torchvision import transforms as T

from robustft.backbones.base import PreprocessConfig
from robustft.registry import Registry

_INTERPOLATION = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "nearest": T.InterpolationMode.NEAREST,
}

#: name -> ``fn(PreprocessConfig) -> PIL image -> normalised tensor``; ``data.augmentation`` picks one
TRAIN_TRANSFORMS: Registry[Callable[[PreprocessConfig], Callable]] = Registry("training transform")


def _interpolation(cfg: PreprocessConfig) -> T.InterpolationMode:
    return _INTERPOLATION.get(cfg.interpolation, T.InterpolationMode.BILINEAR)


def _to_normalised_tensor(cfg: PreprocessConfig) -> list[Callable]:
    return [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]


def eval_transform(cfg: PreprocessConfig) -> Callable:
    """Resize the short side to the input size, centre-crop, normalise."""
    return T.Compose(
        [
            T.Resize(cfg.image_size, interpolation=_interpolation(cfg)),
            T.CenterCrop(cfg.image_size),
            *_to_normalised_tensor(cfg),
        ]
    )


@TRAIN_TRANSFORMS.register("none")
def no_augmentation(cfg: PreprocessConfig) -> Callable:
    """The evaluation transform (deterministic)."""
    return eval_transform(cfg)


@TRAIN_TRANSFORMS.register("crop_flip")
def crop_flip(cfg: PreprocessConfig) -> Callable:
    """The CIFAR recipe: resize + centre-crop to the input size, pad-(size/8) random crop, horizontal flip."""
    return T.Compose(
        [
            T.Resize(cfg.image_size, interpolation=_interpolation(cfg)),
            T.CenterCrop(cfg.image_size),
            T.RandomCrop(cfg.image_size, padding=max(1, cfg.image_size // 8)),
            T.RandomHorizontalFlip(),
            *_to_normalised_tensor(cfg),
        ]
    )


@TRAIN_TRANSFORMS.register("random_resized_crop")
def random_resized_crop(cfg: PreprocessConfig) -> Callable:
    """The FLYP / CMA / WiSE-FT CLIP recipe: random resized crop of scale 0.9-1, horizontal flip."""
    return T.Compose(
        [
            T.RandomResizedCrop(cfg.image_size, scale=(0.9, 1.0), interpolation=_interpolation(cfg)),
            T.RandomHorizontalFlip(),
            *_to_normalised_tensor(cfg),
        ]
    )


@TRAIN_TRANSFORMS.register("random_resized_crop_full")
def random_resized_crop_full(cfg: PreprocessConfig) -> Callable:
    """Dassl/CoOp's ``random_resized_crop`` + ``random_flip``: scale 0.08-1 (torchvision's default), so
    views range from the whole image to small patches of background (Local-Prompt's negative views)."""
    return T.Compose(
        [
            T.RandomResizedCrop(cfg.image_size, scale=(0.08, 1.0), interpolation=_interpolation(cfg)),
            T.RandomHorizontalFlip(),
            *_to_normalised_tensor(cfg),
        ]
    )


@TRAIN_TRANSFORMS.register("simclr")
def simclr(cfg: PreprocessConfig) -> Callable:
    """The SimCLR / SupCon augmentation that PALM and LOOK train with (PALM's CIFAR recipe): random resized
    crop of scale 0.2-1, horizontal flip, colour jitter (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale with
    p=0.2. Use it with ``data.n_views: 2`` for two independently augmented views per image."""
    return T.Compose(
        [
            T.RandomResizedCrop(cfg.image_size, scale=(0.2, 1.0), interpolation=_interpolation(cfg)),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            *_to_normalised_tensor(cfg),
        ]
    )


#: the registered recipe names (kept for ``name in AUGMENTATIONS`` checks)
AUGMENTATIONS = TRAIN_TRANSFORMS


def train_transform(cfg: PreprocessConfig, augmentation: str) -> Callable:
    """The training transform registered as ``augmentation`` in :data:`TRAIN_TRANSFORMS`.

    Raises:
        robustft.registry.UnknownNameError: an unknown name; the message lists the close matches.
    """
    return TRAIN_TRANSFORMS.get(augmentation)(cfg)


def apply_views(transform: Callable, image: object, n_views: int = 1) -> object:
    """``transform(image)`` for one view; ``n_views`` > 1: the ``[V, C, H, W]`` stack of ``n_views``
    independent draws of ``transform`` on the same image (``data.n_views``)."""
    if n_views == 1:
        return transform(image)
    import torch

    return torch.stack([transform(image) for _ in range(n_views)])
