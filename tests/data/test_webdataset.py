"""webdataset shards: make_shards round trip, plain-tar shards, exact sharded evaluation reads, and the
training stream's fixed number of batches per epoch on every rank."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from robustft.data import DataConfigError, DatasetSpec, IndexedDataset, WebDataModule, load_dataset
from robustft.data.webdataset_source import ShardImages, StreamLoader, WebDatasetTrainStream, resolve_shards
from robustft.evaluation.distributed import ShardSampler

REPO = Path(__file__).resolve().parents[2]
TEST_2K = REPO / "data" / "cifar10" / "cifar10_test_2k.npz"
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _make_shards_module():
    spec = importlib.util.spec_from_file_location("make_shards", REPO / "tools" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference():
    return load_dataset(DatasetSpec(source="npz", path=str(TEST_2K)), "data.test")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled 2k CIFAR-10 test npz written by tools/make_shards.py: 7 shards (6 x 300 + 200)."""
    out = tmp_path_factory.mktemp("shards")
    _make_shards_module().main([
        "--source", "npz", "--path", str(TEST_2K), "--out", str(out), "--prefix", "test",
        "--maxcount", "300", "--caption", "a photo of a {}.", "--quiet",
    ])
    return out


def test_make_shards_writes_manifest(shards: Path) -> None:
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["total"] == 2000
    assert [s["count"] for s in manifest["shards"]] == [300] * 6 + [200]
    assert [s["url"] for s in manifest["shards"]] == [f"test-{i:06d}.tar" for i in range(7)]
    assert manifest["class_names"] == CIFAR10_NAMES
    with tarfile.open(shards / "test-000000.tar") as tar:
        names = tar.getnames()[:3]
        assert names == ["000000.cls", "000000.png", "000000.txt"]
        assert tar.extractfile("000000.txt").read().decode() == "a photo of a airplane."


def test_shard_captions_reach_the_batch_as_text(shards: Path, reference) -> None:
    """``.txt`` members are the captions of map-style shards: a subset keeps each caption with its image,
    and the datamodule's training batch carries them as ``text``."""
    from robustft.data import OODDataModule

    spec = {"source": "webdataset", "path": str(shards / "manifest.json"), "max_samples": 64, "seed": 3}
    images = load_dataset(DatasetSpec(**spec), "data.train")
    assert images.texts == [f"a photo of a {CIFAR10_NAMES[label]}." for label in images.labels]
    data = OODDataModule(train=spec, test={"source": "npz", "path": str(TEST_2K), "max_samples": 8},
                         batch_size=16, val_fraction=0.0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["text"] == [f"a photo of a {CIFAR10_NAMES[int(label)]}." for label in batch["label"]]


@pytest.mark.parametrize("form", ["manifest", "braces", "directory"])
def test_round_trip_every_sample(shards: Path, reference, form: str) -> None:
    path = {
        "manifest": shards / "manifest.json",
        "braces": shards / "test-{000000..000006}.tar",
        "directory": shards,
    }[form]
    images = load_dataset(DatasetSpec(source="webdataset", path=str(path)), "data.test")
    assert isinstance(images, ShardImages)
    assert len(images) == 2000 and images.class_names == CIFAR10_NAMES
    np.testing.assert_array_equal(images.labels, reference.labels)
    for i in range(len(images)):  # PNG is lossless: the very same pixels
        np.testing.assert_array_equal(np.asarray(images.load_image(i)), reference.images[i])


def test_subset_and_webdataset_streaming_reader_agree(shards: Path, reference) -> None:
    subset = load_dataset(DatasetSpec(source="webdataset", path=str(shards), max_samples=50, seed=3), "data.test")
    expected = load_dataset(DatasetSpec(source="npz", path=str(TEST_2K), max_samples=50, seed=3), "data.test")
    np.testing.assert_array_equal(subset.labels, expected.labels)
    np.testing.assert_array_equal(np.asarray(subset[7][0]), np.asarray(expected[7][0]))
    # webdataset's own reader sees the same samples in the same order (ShardWriter format)
    stream = wds.WebDataset(resolve_shards(str(shards)).paths, shardshuffle=False).decode("pil")
    for i, sample in zip(range(0, 600, 37), list(stream)[0:600:37], strict=True):
        assert int(sample["cls"]) == reference.labels[i]
        np.testing.assert_array_equal(np.asarray(sample["png"].convert("RGB")), reference.images[i])


def test_manifest_count_mismatch_is_refused(shards: Path, tmp_path: Path) -> None:
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"][0]["count"] = 301
    for entry in manifest["shards"]:
        entry["url"] = str(shards / entry["url"])
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    with pytest.raises(DataConfigError, match="truncated or the manifest is stale"):
        load_dataset(DatasetSpec(source="webdataset", path=str(tmp_path / "m.json")), "data.test")
    with pytest.raises(DataConfigError, match="data.ood.far.x.path: 1 of 1 shards .* do not exist"):
        load_dataset(DatasetSpec(source="webdataset", path=str(tmp_path / "missing.tar")), "data.ood.far.x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataConfigError, match="names no .tar shards"):
        load_dataset(DatasetSpec(source="webdataset", path=str(tmp_path / "empty")), "data.ood.far.x")


def _write_files(folder: Path, reference, indices, labeled: bool = True) -> list[str]:
    folder.mkdir(parents=True)
    names = []
    for i in indices:
        Image.fromarray(reference.images[i]).save(folder / f"{i:06d}.png")
        names.append(f"{i:06d}.png")
        if labeled:
            (folder / f"{i:06d}.cls").write_text(str(int(reference.labels[i])))
            names.append(f"{i:06d}.cls")
    return sorted(names)


def test_plain_tar_shards_are_read(tmp_path: Path, reference) -> None:
    """Shards made by plain `tar`: one of sorted file names, one of a whole folder (`./` prefixes,
    a directory entry, readdir order that need not keep a sample's files adjacent)."""
    (tmp_path / "shards").mkdir()
    names = _write_files(tmp_path / "a", reference, range(0, 20))
    subprocess.run(["tar", "-cf", str(tmp_path / "shards" / "part-0.tar"), "-C", str(tmp_path / "a"), *names],
                   check=True, capture_output=True)
    _write_files(tmp_path / "b", reference, range(20, 45))
    subprocess.run(["tar", "-cf", str(tmp_path / "shards" / "part-1.tar"), "-C", str(tmp_path / "b"), "."],
                   check=True, capture_output=True)
    images = load_dataset(DatasetSpec(source="webdataset", path=str(tmp_path / "shards")), "data.test")
    assert len(images) == 45
    order = [int(Path(k).name) for k in images.keys]
    assert order[:20] == list(range(20)) and sorted(order[20:]) == list(range(20, 45))
    for position, i in enumerate(order):
        assert images.labels[position] == reference.labels[i]
        np.testing.assert_array_equal(np.asarray(images[position][0]), reference.images[i])
    assert images.class_names == [str(c) for c in range(int(images.labels.max()) + 1)]


def test_unlabeled_shards_give_label_zero(tmp_path: Path, reference) -> None:
    names = _write_files(tmp_path / "u", reference, range(5), labeled=False)
    (tmp_path / "s").mkdir()
    subprocess.run(["tar", "-cf", str(tmp_path / "s" / "ood.tar"), "-C", str(tmp_path / "u"), *names],
                   check=True, capture_output=True)
    images = load_dataset(DatasetSpec(source="webdataset", path=str(tmp_path / "s" / "ood.tar")), "data.ood.far.x")
    assert len(images) == 5 and images.class_names == ["unlabeled"] and not images.labels.any()


class _LoggedShardImages(ShardImages):
    """Logs every image read to a per-process file (DataLoader workers are forked processes)."""

    log_dir: str = ""

    def load_image(self, index: int):
        with open(os.path.join(self.log_dir, f"reads.{os.getpid()}"), "a") as handle:
            handle.write(f"{index}\n")
        return super().load_image(index)


def test_two_ranks_two_workers_read_each_eval_sample_once(shards: Path, tmp_path: Path, reference) -> None:
    base = ShardImages.from_shards(resolve_shards(str(shards / "manifest.json")))
    images = _LoggedShardImages(base.shards, base.shard_index, base.offsets, base.sizes, base.labels, base.class_names)
    images.log_dir = str(tmp_path)
    dataset = IndexedDataset(images, T.PILToTensor())
    seen = []
    for rank in range(2):
        loader = DataLoader(dataset, batch_size=64, sampler=ShardSampler(len(dataset), rank=rank, world_size=2),
                            num_workers=2)
        for batch in loader:
            seen += batch["index"].tolist()
            for image, index in zip(batch["image"][:2], batch["index"][:2], strict=True):
                assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(reference.images[int(index)]))
    assert sorted(seen) == list(range(2000))
    logs = list(tmp_path.glob("reads.*"))
    assert len(logs) == 4  # 2 ranks x 2 worker processes
    reads = sorted(int(line) for log in logs for line in log.read_text().split())
    assert reads == list(range(2000))  # every image read from the shards exactly once


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_stream_gives_the_same_number_of_batches_on_every_rank(shards: Path, num_workers: int) -> None:
    urls = resolve_shards(str(shards)).paths
    expected = math.ceil(math.ceil(1000 / (32 * 2)) / max(1, num_workers)) * max(1, num_workers)
    for rank in range(2):
        stream = WebDatasetTrainStream(urls, T.ToTensor(), batch_size=32, epoch_samples=1000, num_workers=num_workers,
                                       rank=rank, world_size=2, shuffle_buffer=200, seed=0)
        assert len(stream) == expected
        batches = list(DataLoader(stream, batch_size=None, num_workers=num_workers))
        assert len(batches) == expected
        assert all(b["image"].shape == (32, 3, 32, 32) and b["label"].shape == (32,) for b in batches)
        assert all(0 <= int(b["label"].min()) and int(b["label"].max()) <= 9 for b in batches)
        # the shards' .txt captions travel with their images
        assert all(b["text"] == [f"a photo of a {CIFAR10_NAMES[int(y)]}." for y in b["label"]] for b in batches)


def test_train_stream_is_reproducible_per_epoch_and_rank(shards: Path) -> None:
    urls = resolve_shards(str(shards)).paths

    def labels(rank: int, epoch: int, resampled: bool = True) -> list[int]:
        stream = WebDatasetTrainStream(urls, T.ToTensor(), batch_size=16, epoch_samples=160, rank=rank, world_size=2,
                                       shuffle_buffer=100, resampled=resampled, seed=5)
        stream.set_epoch(epoch)
        out = [label for b in stream for label in b["label"].tolist()]
        assert len(out) == 5 * 16
        return out

    assert labels(0, 0) == labels(0, 0)
    assert labels(0, 0) != labels(0, 1) and labels(0, 0) != labels(1, 0)
    assert labels(1, 2, resampled=False) == labels(1, 2, resampled=False)
    with pytest.raises(DataConfigError, match="cannot be partitioned"):
        WebDatasetTrainStream(urls, T.ToTensor(), batch_size=16, epoch_samples=160, num_workers=2, rank=0,
                              world_size=4, resampled=False)


def test_stream_loader_sets_the_epoch(shards: Path) -> None:
    stream = WebDatasetTrainStream(resolve_shards(str(shards)).paths, T.ToTensor(), batch_size=8, epoch_samples=16,
                                   rank=0, world_size=1)
    epochs = iter([3, 4])
    loader = StreamLoader(stream, epoch_fn=lambda: next(epochs))
    assert len(loader) == 2
    list(loader)
    assert stream.epoch == 3
    list(loader)
    assert stream.epoch == 4


def test_webdatamodule_trains_from_shards_via_the_cli(shards: Path, tmp_path: Path, monkeypatch) -> None:
    """``class_path: robustft.data.WebDataModule`` + ``source: webdataset`` from YAML: a streamed epoch of
    ``epoch_samples`` and OOD evaluation on a sharded ID test set."""
    from robustft.cli import main

    monkeypatch.chdir(REPO)
    config = tmp_path / "wds.yaml"
    config.write_text(yaml.safe_dump({
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_epochs": 1, "limit_val_batches": 1, "num_sanity_val_steps": 0,
            "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
            "default_root_dir": str(tmp_path / "run"),
            "callbacks": [{"class_path": "robustft.callbacks.OODEvaluation",
                           "init_args": {"every_n_epochs": 1, "report_dir": str(tmp_path / "report"), "plots": False}}],
        },
        "model": {"class_path": "robustft.methods.Classifier", "init_args": {
            "num_classes": 10, "backbone": "cifar_resnet20", "backbone_weights": "data/weights/resnet20-12fca82f.th",
            "scores": ["msp", "energy"]}},
        "data": {"class_path": "robustft.data.WebDataModule", "init_args": {
            "train": {"source": "webdataset", "path": str(shards / "manifest.json")},
            "val": {"source": "webdataset", "path": str(shards / "test-000006.tar"), "max_samples": 32},
            "test": {"source": "webdataset", "path": str(shards / "test-{000000..000001}.tar"), "max_samples": 101},
            "ood": {"far": {"dtd": {"source": "npz", "path": "data/dtd/dtd_10class_32.npz", "max_samples": 40}}},
            "batch_size": 16,
            "eval_batch_size": 64,
            "stream": {"epoch_samples": 64, "shuffle_buffer": 50},
        }},
    }))
    cli = main(["fit", "--config", str(config)])
    assert cli.trainer.global_step == 4  # 64 samples / batch 16
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["id"]["n"] == 101 and report["ood"]["dtd"]["msp"]["n"] == 40
    assert cli.datamodule.class_names == CIFAR10_NAMES


def test_webdatamodule_refuses_a_validation_split_of_a_stream(shards: Path) -> None:
    from robustft.data import WebDataModule

    train = DatasetSpec(source="webdataset", path=str(shards))
    with pytest.raises(DataConfigError, match="cannot hold out a validation split"):
        WebDataModule(train=train, test=train, val_fraction=0.1)
    with pytest.raises(DataConfigError, match="streams webdataset shards"):
        WebDataModule(train=DatasetSpec(source="npz", path=str(TEST_2K)), test=train)


@pytest.mark.parametrize("option", [{"n_views": 2}, {"shots_per_class": 4},
                                    {"unlabeled": {"u": {"source": "npz", "path": "x.npz"}}}])
def test_webdatamodule_refuses_options_its_stream_would_ignore(option: dict) -> None:
    name = next(iter(option))
    with pytest.raises(DataConfigError, match=rf"data\.{name}: not supported by WebDataModule"):
        WebDataModule(train={"source": "webdataset", "path": "shards/"}, test={"source": "npz", "path": "t.npz"},
                      **option)
