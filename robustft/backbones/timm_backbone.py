"""Any timm image model as a feature extractor (classifier removed, pooled features out)."""

from __future__ import annotations

from torch import Tensor

from robustft.backbones.base import Backbone, PreprocessConfig


class TimmBackbone(Backbone):
    """``timm.create_model(name, num_classes=0)``; preprocessing from timm's data config.

    ``pretrained=True`` asks timm for its default weights (needs internet); offline users pass a local
    weights file to :func:`robustft.backbones.create_backbone` instead.
    """

    def __init__(self, model_name: str, pretrained: bool = False, **kwargs) -> None:
        super().__init__()
        import timm
        from timm.data import resolve_data_config

        if model_name not in timm.list_models() and model_name.split(".")[0] not in timm.list_models():
            import difflib

            close = difflib.get_close_matches(model_name, timm.list_models(), n=3)
            raise ValueError(f"unknown timm model '{model_name}'" + (f"; did you mean {close}?" if close else ""))
        self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **kwargs)
        self.model_name = model_name
        self.feature_dim = int(self.model.num_features)
        config = resolve_data_config({}, model=self.model)
        self.preprocess = PreprocessConfig(
            image_size=int(config["input_size"][-1]),
            mean=tuple(config["mean"]),
            std=tuple(config["std"]),
            interpolation=config.get("interpolation", "bilinear"),
        )
        classifier = self.model.pretrained_cfg.get("classifier", "fc")
        self.head_prefix = f"model.{classifier}."

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)
