"""The CLIP layer every CLIP method shares (MCM, GL-MCM, CoOp/Local-Prompt, CLIPN, CMA, WiSE-FT ...).

One module per concern; every public name is importable from ``robustft.backbones.clip``:

* :mod:`~robustft.backbones.clip.loading`: open_clip models by name, tag or local file
  (``build_open_clip_model``, ``load_clip_weights``), the tiny test configs (``register_clip_configs``,
  run on import: ``robustft-micro-vit``, ``robustft-tiny-vit`` from ``robustft/assets/clip_configs``);
* :mod:`~robustft.backbones.clip.features`: intermediate block/stage features of any open_clip vision
  tower (``visual_forward_intermediates``) and MaskCLIP-style local features (``vit_global_and_local``);
* :mod:`~robustft.backbones.clip.text`: ``TextTower``, the text transformer as one copyable module
  encoding token ids or prompt embeddings;
* :mod:`~robustft.backbones.clip.model`: ``CLIPBackbone``, the open_clip model wrapper (image features,
  tokenisation, the cached zero-shot classifier, ``text_tower``);
* :mod:`~robustft.backbones.clip.prompts`: ``PromptTextEncoder`` and ``PromptLearner`` (CoOp, with or
  without class names);
* :mod:`~robustft.backbones.clip.neglabel`: NegLabel negative-label mining (``mine_negative_labels``).
"""

from __future__ import annotations

from robustft.backbones.clip.features import (
    visual_forward_intermediates,
    visual_num_intermediates,
    vit_global_and_local,
)
from robustft.backbones.clip.loading import (
    CLIP_CONFIG_DIR,
    build_open_clip_model,
    load_clip_weights,
    register_clip_configs,
)
from robustft.backbones.clip.model import CLIPBackbone, freeze
from robustft.backbones.clip.neglabel import (
    DEFAULT_CANDIDATES,
    Candidates,
    NegativeLabels,
    label_features,
    mine_negative_labels,
    read_candidates,
)
from robustft.backbones.clip.prompts import PromptLearner, PromptTextEncoder
from robustft.backbones.clip.text import TextTower

__all__ = [
    "CLIP_CONFIG_DIR",
    "DEFAULT_CANDIDATES",
    "CLIPBackbone",
    "Candidates",
    "PromptLearner",
    "PromptTextEncoder",
    "TextTower",
    "build_open_clip_model",
    "freeze",
    "label_features",
    "load_clip_weights",
    "NegativeLabels",
    "mine_negative_labels",
    "read_candidates",
    "register_clip_configs",
    "visual_forward_intermediates",
    "visual_num_intermediates",
    "vit_global_and_local",
]
