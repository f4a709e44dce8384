"""One LightningModule per method, all subclasses of :class:`robustft.methods.base.OODMethod`."""

from robustft.methods.base import ConfigMismatchError, OODMethod
from robustft.methods.classifier import Classifier
from robustft.methods.clipn import CLIPN
from robustft.methods.contrastive_ft import ContrastiveFinetune
from robustft.methods.dro_ssl import DROSSL
from robustft.methods.finetune import Finetune
from robustft.methods.levi import LEVI
from robustft.methods.local_prompt import LocalPrompt
from robustft.methods.look import LOOK
from robustft.methods.palm import PALM
from robustft.methods.zero_shot import ZeroShotCLIP

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
