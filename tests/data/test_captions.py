"""Captions: the source's own (npz ``texts``) in the batch, else class names in templates (one function)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from robustft.data import DataConfigError, DatasetSpec, OODDataModule, load_dataset
from robustft.data.captions import batch_captions, caption_codes, captions_for

NAMES = ["cat", "dog", "ship"]


def test_one_template_is_deterministic_and_draws_nothing() -> None:
    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert captions_for(torch.tensor([2, 0, 1]), NAMES, ["a photo of a {}."]) == [
        "a photo of a ship.", "a photo of a cat.", "a photo of a dog."]
    assert torch.equal(torch.get_rng_state(), state)


def test_codes_draw_what_contrastive_finetune_drew() -> None:
    """Without a generator: ``label * T + torch.randint(T, labels.shape)`` on the global RNG (CMA's draw)."""
    labels = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    torch.manual_seed(3)
    codes = caption_codes(labels, 4)
    torch.manual_seed(3)
    assert torch.equal(codes, labels * 4 + torch.randint(4, labels.shape))


def test_captions_match_their_codes_and_use_every_template() -> None:
    templates = ["a photo of a {}.", "a drawing of a {}.", "itap of a {}."]
    labels = torch.arange(3).repeat(100)
    captions = captions_for(labels, NAMES, templates, generator=torch.Generator().manual_seed(1))
    codes = caption_codes(labels, 3, generator=torch.Generator().manual_seed(1))
    assert captions == [templates[c % 3].format(NAMES[c // 3]) for c in codes.tolist()]
    assert all(NAMES[label] in caption for label, caption in zip(labels.tolist(), captions, strict=True))
    assert {c.split(" of ")[0] for c in captions} == {"a photo", "a drawing", "itap"}
    again = captions_for(labels, NAMES, templates, generator=torch.Generator().manual_seed(1))
    other = captions_for(labels, NAMES, templates, generator=torch.Generator().manual_seed(2))
    assert again == captions and other != captions


@pytest.mark.parametrize(("templates", "message"), [([], "at least one"), (["no slot"], "exactly one '{}'"),
                                                    (["{} and {}"], "exactly one '{}'")])
def test_bad_templates(templates: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        captions_for(torch.tensor([0]), NAMES, templates)


def test_labels_outside_the_class_names_are_refused() -> None:
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        captions_for(torch.tensor([3]), NAMES, ["a {}"])


def test_batch_captions_prefers_the_sources_text() -> None:
    batch = {"label": torch.tensor([0, 1]), "text": ["a cat on a mat", "a dog in fog"]}
    assert batch_captions(batch, NAMES, ["a photo of a {}."]) == ["a cat on a mat", "a dog in fog"]
    del batch["text"]
    assert batch_captions(batch, NAMES, ["a photo of a {}."]) == ["a photo of a cat.", "a photo of a dog."]


def _captioned_npz(path: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 3
    texts = np.array([f"image {i} shows a {NAMES[label]}" for i, label in enumerate(labels)])
    np.savez(path, images=rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8), labels=labels, class_names=NAMES,
             texts=texts)
    return path


def test_npz_texts_travel_with_their_images_into_the_batch(tmp_path: Path) -> None:
    spec = DatasetSpec(source="npz", path=str(_captioned_npz(tmp_path / "captioned.npz")), max_samples=7, seed=2)
    images = load_dataset(spec, "data.train")
    assert len(images.texts) == 7
    assert all(NAMES[label] in text for label, text in zip(images.labels, images.texts, strict=True))
    dm = OODDataModule(train=spec, test=spec, val_fraction=0.0, batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["text"]) == 4
    for label, index, text in zip(batch["label"].tolist(), batch["index"].tolist(), batch["text"], strict=True):
        assert text == images.texts[index] and NAMES[label] in text


def test_texts_of_the_wrong_length_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((3, 8, 8, 3), np.uint8), labels=np.zeros(3, int), texts=np.array(["a", "b"]))
    with pytest.raises(DataConfigError, match=r"^data\.train: in .*3 images but 2 texts"):
        load_dataset(DatasetSpec(source="npz", path=str(path)), "data.train")


def test_no_captions_no_text_key() -> None:
    spec = DatasetSpec(source="npz", path=str(Path(__file__).resolve().parents[2] / "data/cifar10/cifar10_test_2k.npz"),
                       max_samples=8)
    dm = OODDataModule(train=spec, test=spec, val_fraction=0.0, batch_size=4)
    dm.setup("fit")
    assert set(next(iter(dm.train_dataloader()))) == {"image", "label", "index"}
