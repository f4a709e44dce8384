"""One LightningModule per method, all subclasses of :class:`robustft.methods.base.OODMethod`."""

from robustft.methods.base import ConfigMismatchError, OODMethod
from robustft.methods.classifier import Classifier

__all__ = ["Classifier", "ConfigMismatchError", "OODMethod"]
