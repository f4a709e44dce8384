"""``data.unlabeled``: the unlabelled stream next to the labelled one (CombinedLoader, min_size)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.utilities import CombinedLoader

from robustft.data import DataConfigError, DatasetSpec, OODDataModule
from robustft.data.unlabeled import UnlabeledImages, UnlabeledLoader, UnlabeledStream

REPO = Path(__file__).resolve().parents[2]
TEST_2K = str(REPO / "data" / "cifar10" / "cifar10_test_2k.npz")
TIN = str(REPO / "data" / "tinyimagenet" / "tin_test_32.npz")
DTD = str(REPO / "data" / "dtd" / "dtd_10class_32.npz")


def make_dm(**kwargs) -> OODDataModule:
    kwargs.setdefault("train", DatasetSpec(source="npz", path=TEST_2K, max_samples=30))
    kwargs.setdefault("test", DatasetSpec(source="npz", path=TEST_2K, max_samples=8))
    kwargs.setdefault("val_fraction", 0.0)
    module = OODDataModule(**kwargs)
    module.setup("fit")
    return module


def epochs(loader, n: int) -> list[list]:
    """What the trainer does: iterate the loader anew (one ``iter``) every epoch; ``(labeled, unlabeled)`` batches."""
    out = []
    for _ in range(n):
        out.append([(batch["labeled"], batch["unlabeled"]) for batch, _, _ in loader])
    return out


def test_batch_structure_and_epoch_length_follow_the_labelled_loader() -> None:
    dm = make_dm(batch_size=8, unlabeled={"tin": DatasetSpec(source="npz", path=TIN, max_samples=23)},
                 unlabeled_batch_size=5)
    loader = dm.train_dataloader()
    assert isinstance(loader, CombinedLoader) and loader._mode == "min_size"
    assert set(loader.iterables) == {"labeled", "unlabeled"}
    (first_epoch,) = epochs(loader, 1)
    assert len(loader) == len(first_epoch) == 4  # ceil(30 / 8): the labelled epoch, as without `unlabeled`
    labeled, unlabeled = first_epoch[0]
    assert set(labeled) == {"image", "label", "index"} and labeled["image"].shape == (8, 3, 32, 32)
    assert set(unlabeled) == {"image", "true_label", "index", "source"}
    assert unlabeled["image"].shape == (5, 3, 32, 32)
    tin = dm._loaded["unlabeled/tin"]
    assert unlabeled["true_label"].tolist() == [int(tin.labels[i]) for i in unlabeled["index"].tolist()]
    assert unlabeled["source"].tolist() == [0] * 5


def test_without_unlabeled_the_loader_is_todays() -> None:
    dm = make_dm(batch_size=8)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label", "index"}
    assert set(dm.state_dict()) == set()  # no trainer: nothing to save; no unlabeled entry ever appears


def test_every_unlabelled_sample_once_per_unlabelled_epoch_across_trainer_epochs() -> None:
    n, batch_size = 23, 5  # 5 unlabelled batches per unlabelled epoch, the last one of 3
    dm = make_dm(batch_size=8, unlabeled=[DatasetSpec(source="npz", path=TIN, max_samples=n)],
                 unlabeled_batch_size=batch_size)
    trainer_epochs = epochs(dm.train_dataloader(), 5)  # 5 x 4 = 20 unlabelled batches = 4 unlabelled epochs
    stream = [u["index"].tolist() for epoch in trainer_epochs for _, u in epoch]
    assert [len(b) for b in stream] == [5, 5, 5, 5, 3] * 4
    passes = [sum(stream[5 * u : 5 * u + 5], []) for u in range(4)]
    for indices in passes:
        assert sorted(indices) == list(range(n))  # each sample exactly once per unlabelled epoch
    assert len({tuple(p) for p in passes}) == 4  # a fresh order every unlabelled epoch
    # the labelled stream is the one it would be without the unlabelled stream
    labelled = [l_["index"].tolist() for epoch in trainer_epochs for l_, _ in epoch]
    loader = make_dm(batch_size=8).train_dataloader()
    assert labelled == [b["index"].tolist() for _ in range(5) for b in loader]


def test_several_sets_by_name_with_source_ids_and_views() -> None:
    dm = make_dm(batch_size=8, n_views=2,
                 unlabeled={"tin": DatasetSpec(source="npz", path=TIN, max_samples=7),
                            "dtd": DatasetSpec(source="npz", path=DTD, max_samples=5)},
                 unlabeled_batch_size=12)
    dataset = dm.unlabeled_dataset()
    assert isinstance(dataset, UnlabeledImages) and len(dataset) == 12 and dataset.names == ["tin", "dtd"]
    (epoch,) = epochs(dm.train_dataloader(), 1)
    _, unlabeled = epoch[0]
    assert unlabeled["image"].shape == (12, 2, 3, 32, 32)
    assert sorted(unlabeled["index"].tolist()) == list(range(12))
    source = dict(zip(unlabeled["index"].tolist(), unlabeled["source"].tolist(), strict=True))
    assert [source[i] for i in range(12)] == [0] * 7 + [1] * 5
    dtd = dm._loaded["unlabeled/dtd"]
    for i, label in zip(unlabeled["index"].tolist(), unlabeled["true_label"].tolist(), strict=True):
        if i >= 7:
            assert label == int(dtd.labels[i - 7])


def test_loader_resumes_at_the_saved_count() -> None:
    dataset = UnlabeledImages([_Tiny(11)], transform=lambda x: x)
    fresh = UnlabeledLoader(UnlabeledStream(dataset, batch_size=3, seed=4))
    iterator = iter(fresh)
    reference = [next(iterator)["index"].tolist() for _ in range(10)]  # 4 batches per epoch: crosses 2 epochs
    assert fresh.position()["batches_done"] == 10 and fresh.position()["batches_per_epoch"] == 4
    for done in (0, 3, 4, 7):
        resumed = UnlabeledLoader(UnlabeledStream(dataset, batch_size=3, seed=4), resume_state={"batches_done": done})
        iterator = iter(resumed)
        assert [next(iterator)["index"].tolist() for _ in range(10 - done)] == reference[done:]
    other_seed = UnlabeledLoader(UnlabeledStream(dataset, batch_size=3, seed=5))
    assert [b["index"].tolist() for b, _ in zip(other_seed, range(4), strict=False)] != reference[:4]


def test_ranks_share_each_unlabelled_epoch_without_overlap() -> None:
    dataset = UnlabeledImages([_Tiny(10)], transform=lambda x: x)
    seen = []
    for rank in range(3):
        stream = UnlabeledStream(dataset, batch_size=2, seed=1, rank=rank, world_size=3)
        seen.append(sum((stream.batch_indices(k) for k in range(stream.batches_per_epoch)), []))
    assert sorted(sum(seen, [])) == list(range(10)) and [len(s) for s in seen] == [4, 3, 3]
    with pytest.raises(DataConfigError, match=r"^data\.unlabeled: 2 unlabelled samples cannot be shared by 3"):
        UnlabeledStream(UnlabeledImages([_Tiny(2)], transform=lambda x: x), batch_size=2, rank=2, world_size=3)


@pytest.mark.parametrize("bad", [0, -3])
def test_unlabeled_batch_size_must_be_positive(bad: int) -> None:
    with pytest.raises(DataConfigError, match=r"^data\.unlabeled_batch_size: must be >= 1"):
        OODDataModule(train=DatasetSpec(source="npz", path=TEST_2K), test=DatasetSpec(source="npz", path=TEST_2K),
                      unlabeled={"tin": DatasetSpec(source="npz", path=TIN)}, unlabeled_batch_size=bad)


def test_a_bad_unlabelled_path_fails_at_setup_naming_the_field(tmp_path: Path) -> None:
    dm = OODDataModule(train=DatasetSpec(source="npz", path=TEST_2K, max_samples=10),
                       test=DatasetSpec(source="npz", path=TEST_2K, max_samples=10),
                       unlabeled={"web": DatasetSpec(source="npz", path=str(tmp_path / "missing.npz"))})
    with pytest.raises(DataConfigError, match=r"^data\.unlabeled\.web\.path: "):
        dm.setup("fit")


class _Tiny:
    """n images (the index as a 1x1 tensor) with label ``index % 2``."""

    def __init__(self, n: int) -> None:
        self.labels = np.arange(n) % 2

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.tensor([float(index)]), int(self.labels[index])
