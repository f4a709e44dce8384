"""One LightningModule per method, all subclasses of :class:`robustft.methods.base.OODMethod`.

The methods built on open_clip are exported lazily (PEP 562 ``__getattr__``): ``robustft.methods.CLIPN``
imports its module on first use, so a ResNet run, ``--help`` or ``import robustft`` never pays for
open_clip. The CLI imports the module of any method a command names by bare class name
(:func:`robustft.cli.import_named_methods`), so ``--model CLIPN`` still works.
"""

from importlib import import_module
from typing import Any

from robustft.methods.base import ConfigMismatchError, OODMethod
from robustft.methods.classifier import Classifier
from robustft.methods.dro_ssl import DROSSL
from robustft.methods.finetune import Finetune
from robustft.methods.levi import LEVI
from robustft.methods.look import LOOK
from robustft.methods.palm import PALM

_LAZY: dict[str, str] = {
    "CLIPN": "robustft.methods.clipn",
    "ContrastiveFinetune": "robustft.methods.contrastive_ft",
    "LocalPrompt": "robustft.methods.local_prompt",
    "ZeroShotCLIP": "robustft.methods.zero_shot",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'robustft.methods' has no attribute '{name}'")


__all__ = [
    "CLIPN",
    "Classifier",
    "ConfigMismatchError",
    "ContrastiveFinetune",
    "DROSSL",
    "Finetune",
    "LEVI",
    "LOOK",
    "LocalPrompt",
    "OODMethod",
    "PALM",
    "ZeroShotCLIP",
]
