"""Zero-shot CLIP OOD detection: MCM, GL-MCM and NegLabel on a (pre-trained or fine-tuned) CLIP.

Nothing is trained. ``forward_eval`` runs the vision tower ONCE per batch and compares the image
embeddings with text embeddings that are computed once and cached (``CLIPBackbone.text_classifier``):
the K ID class prompts (template ensemble) and, for NegLabel, the mined negative labels. The cache
is keyed on the text tower's parameter versions, so it is recomputed exactly when the text tower
changes (after fine-tuning steps), never per batch.

Outputs (see ``robustft.ood.clip_scores``): ``logits`` = ``logit_scale · cosine`` (ID accuracy, MSP,
MaxLogit, Energy), ``cosine`` [B, K], ``local_cosine`` [B, P, K] (only when a configured score reads it),
``neg_cosine`` [B, N] (only when a configured score reads it) and ``features`` (normalised image
embedding, for KNN/MDS if configured).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from robustft.backbones.base import PreprocessConfig
from robustft.backbones.clip import CLIPBackbone
from robustft.backbones.clip.neglabel import Candidates, NegativeLabels
from robustft.methods.base import ConfigMismatchError, OODMethod

__all__ = ["CIFAR_TEMPLATES", "CLIP_CIFAR_TEMPLATES", "ZeroShotCLIP"]


#: the 18 CIFAR prompt templates of the CLIP paper's evaluation notebook
CLIP_CIFAR_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)
#: default ID templates: the nine "a ..." variants of the CLIP CIFAR templates (the "the ..." variants
#: add almost nothing to the ensemble and double the text encoding)
CIFAR_TEMPLATES = CLIP_CIFAR_TEMPLATES[:9]

#: checkpoint entry holding what a CLIP method resolves after construction
CLIP_STATE_KEY = "robustft_clip"


class ZeroShotCLIP(OODMethod):
    """Zero-shot CLIP classifier and OOD detector (MCM / GL-MCM / NegLabel + logit scores).

    Args:
        clip_model: open_clip model name (``ViT-B-16``, the CPU test models ``robustft-micro-vit`` /
            ``robustft-tiny-vit``, ``local-dir:/path``, ``hf-hub:org/repo``).
        pretrained: ``None`` (random init), an open_clip tag (needs internet) or a local weights file
            (a plain open_clip state dict, e.g. written by ``ExportCLIPWeights``, or a Lightning checkpoint).
        num_classes: number of ID classes; optional, taken from ``class_names`` or the datamodule.
        class_names: ID class names used in the prompts; default: the datamodule's training-set names.
        templates: ID prompt templates (``"a photo of a {}."``); the class embedding is the normalised
            mean over templates. Default: :data:`CIFAR_TEMPLATES`. The official MCM uses
            ``["a photo of a {}."]``; NegLabel and CMA use ``["the nice {}"]``.
        context_length: text context length (``None``: the model's).
        neg_candidates: NegLabel candidate word file (``word`` or ``word<TAB>noun|adj`` lines); ``None``:
            the bundled pool ``robustft/assets/neglabel_candidates.txt``.
        neg_templates: templates per candidate kind (``noun``, ``adj``, ``any``); kinds not listed use
            ``[templates[0]]``. Official NegLabel: ``{noun: ["the nice {}"], adj: ["this is a {} photo"]}``
            with ``templates: ["the nice {}"]``.
        neg_eta, neg_topk: NegMining quantile η and kept fraction (0.95, 0.15 as the official code).
        scores: OOD scores to report; default ``[mcm, glmcm, neglabel, msp, maxlogit, energy]``.
        score_kwargs: per-score hyper-parameters, e.g. ``{"glmcm": {"lambda_local": 0.5}}``.

    Negative labels are mined once, the first time they are needed (``on_fit_start`` for fine-tuning
    methods, i.e. with the pre-trained weights as in the official protocol; otherwise at the first
    evaluation), stored in checkpoints, and re-encoded with the current text tower whenever it changes.
    """

    default_score = "mcm"
    default_scores = ("mcm", "glmcm", "neglabel", "msp", "maxlogit", "energy")
    #: whether ``fit`` makes sense for this method
    trainable: ClassVar[bool] = False

    def __init__(
        self,
        clip_model: str,
        pretrained: str | None = None,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        templates: list[str] | None = None,
        context_length: int | None = None,
        neg_candidates: str | None = None,
        neg_templates: dict[str, list[str]] | None = None,
        neg_eta: float = 0.95,
        neg_topk: float = 0.15,
        scores: list[str] | None = None,
        score_kwargs: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        if class_names is not None and num_classes is not None and len(class_names) != num_classes:
            raise ConfigMismatchError(
                f"model.num_classes is {num_classes} but model.class_names lists {len(class_names)} names"
            )
        if class_names is not None and not class_names:
            raise ConfigMismatchError("model.class_names is empty; list the ID class names or leave it unset")
        provisional = num_classes or (len(class_names) if class_names else 1)
        super().__init__(provisional, scores, score_kwargs)
        self.save_hyperparameters()
        self.templates = list(templates) if templates is not None else list(CIFAR_TEMPLATES)
        for t in self.templates:
            if not isinstance(t, str) or t.count("{}") != 1:
                raise ValueError(f"model.templates: each template needs exactly one '{{}}', got {t!r}")
        self.neg_templates = {str(k): list(v) for k, v in (neg_templates or {}).items()}
        #: NegLabel's negatives: the component mines, caches embeddings and holds the checkpoint state
        self.negatives = NegativeLabels(neg_candidates, self.neg_templates, eta=neg_eta, topk=neg_topk)
        self.backbone = CLIPBackbone(clip_model, pretrained, context_length)
        self._num_classes_given = num_classes is not None
        self._class_names: list[str] | None = None
        if class_names is not None:
            self._set_class_names(class_names, "model.class_names")
        if pretrained is None and type(self) is ZeroShotCLIP:
            rank_zero_warn(
                f"ZeroShotCLIP with pretrained=None: '{clip_model}' is randomly initialised, so zero-shot "
                "predictions are at chance level; set model.init_args.pretrained to a tag or a weights file"
            )

    # ------------------------------------------------------------------ classes
    def _set_class_names(self, names: Sequence[str], where: str) -> None:
        names = [str(n) for n in names]
        if all(n.isdigit() for n in names):
            raise ConfigMismatchError(
                f"{where} are label ids ({', '.join(names[:3])}, ...), not class names, so there is nothing to "
                "prompt with; set model.init_args.class_names: [...] (e.g. an npz without a 'class_names' array)"
            )
        if self._num_classes_given and len(names) != self.num_classes:
            raise ConfigMismatchError(
                f"model.num_classes is {self.num_classes} but {where} lists {len(names)} classes "
                f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); fix one of them"
            )
        self._class_names = names
        self.num_classes = len(names)

    @property
    def class_names(self) -> list[str]:
        if self._class_names is None:
            raise ConfigMismatchError(
                f"{type(self).__name__} has no class names to build prompts from: set "
                "model.init_args.class_names: [...] or run it with a datamodule whose training set names its "
                "classes (npz 'class_names', class folders, CIFAR metadata)"
            )
        return self._class_names

    def setup(self, stage: str) -> None:
        if stage == "fit" and not self.trainable:
            raise RuntimeError(self._nothing_to_fit())
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_names = getattr(datamodule, "class_names", None) if datamodule is not None else None
        if self.hparams.class_names is None and data_names:
            self._set_class_names(data_names, "data.train's class names")
        elif data_names and len(data_names) != len(self.class_names):
            raise ConfigMismatchError(
                f"model.class_names lists {len(self.class_names)} classes but the training data (data.train) has "
                f"{len(data_names)}: {', '.join(map(str, data_names[:5]))}{', ...' if len(data_names) > 5 else ''}"
            )
        super().setup(stage)

    # ------------------------------------------------------------------ contract
    @property
    def preprocess(self) -> PreprocessConfig:
        return self.backbone.preprocess

    def _required(self) -> set[str]:
        from robustft.ood.scores import SCORES

        return set().union(*(SCORES.get(name).requires for name in self.score_names))

    def output_keys(self) -> set[str]:
        keys = {"logits", "cosine", "features"}
        return keys | (self._required() & {"local_cosine", "neg_cosine"})

    def class_text_features(self) -> Tensor:
        """``[K, E]`` ID class embeddings (template ensemble), cached by the backbone."""
        return self.backbone.text_classifier(self.class_names, self.templates)

    @property
    def negative_labels(self) -> Candidates:
        """The mined negative labels ``{kind: [words]}`` (mined on first access)."""
        return self.negatives.labels(self.backbone, self.class_names, self.templates)

    def mine_negatives(self) -> Candidates:
        """(Re-)run NegMining with the current weights and keep the result."""
        words = self.negatives.mine(self.backbone, self.class_names, self.templates)
        ngroup = int(self.score_kwargs.get("neglabel", {}).get("ngroup", 1))
        if ngroup > max(len(self.negatives), 1):
            rank_zero_warn(
                f"NegLabel ngroup={ngroup} exceeds the {len(self.negatives)} mined negatives; each forms its own group"
            )
        return words

    def negative_text_features(self) -> Tensor:
        """``[N, E]`` negative label embeddings, re-encoded only when the text tower changed."""
        if self.negatives.words is None:
            self.mine_negatives()
        return self.negatives.text_features(self.backbone, self.class_names, self.templates)

    def forward_eval(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """ONE pass of the vision tower (with local features only when a score reads them)."""
        required = self._required()
        images = batch["image"]
        if "local_cosine" in required:
            image, local = self.backbone.encode_image_with_local(images, normalize=True)
        else:
            image, local = self.backbone.encode_image(images, normalize=True), None
        text = self.class_text_features().to(image.dtype)
        cosine = image @ text.T
        out = {"logits": self.backbone.logit_scale * cosine, "cosine": cosine, "features": image}
        if local is not None:
            out["local_cosine"] = local @ text.T
        if "neg_cosine" in required:
            out["neg_cosine"] = image @ self.negative_text_features().to(image.dtype).T
        return out

    def _nothing_to_fit(self) -> str:
        return (
            f"{type(self).__name__} is zero-shot: it has nothing to fit. Run `validate`, `test` or `evaluate` "
            "instead, or fine-tune with robustft.methods.ContrastiveFinetune (FLYP / CMA)."
        )

    def training_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        raise RuntimeError(self._nothing_to_fit())

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CLIP_STATE_KEY] = {"class_names": self._class_names, **self.negatives.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # class names first: ``load_from_checkpoint`` without a datamodule starts with a provisional class
        # count, which the base class compares with the checkpoint's
        state = checkpoint.get(CLIP_STATE_KEY) or {}
        saved = state.get("class_names")
        if saved is not None and self._class_names is None:
            self._set_class_names(saved, "the checkpoint's class names")
        super().on_load_checkpoint(checkpoint)
        if saved is not None:
            if list(saved) != self._class_names:
                rank_zero_warn(
                    f"the checkpoint was trained with class names {saved[:5]}... but the model now prompts with "
                    f"{self._class_names[:5]}...; evaluating with the current names"
                )
        self.negatives.load_state_dict(state)
