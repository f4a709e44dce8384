"""Shared test fixtures. Keep each fixture clearly named after what it provides."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, then restore. Tiny CPU models on a shared, busy machine run far
    faster single-threaded (measured ~20x per training step with 2 threads on 2 oversubscribed cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _thread_count_is_restored() -> Iterator[None]:
    """A test that changes torch's intra-op thread count must restore it: stored reports of later tests
    are compared at a fixed thread count (float sums differ with it), so a leak fails them far away."""
    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    if after != before:
        torch.set_num_threads(before)
        pytest.fail(f"the test left torch.get_num_threads() at {after} (was {before}); use conftest.torch_threads")


# ---- CLIP: a micro CLIP pre-trained once per session (tests/methods/test_clip_methods.py) -------------


@dataclass(frozen=True)
class PretrainedCLIP:
    """Weights of ``robustft-micro-vit`` pre-trained on the bundled CIFAR-10 train subset."""

    weights: Path  # plain open_clip state dict written by ExportCLIPWeights
    clip_model: str
    seconds: float  # wall time of the pre-training `fit`


@pytest.fixture(scope="session")
def clip_micro_pretrained(tmp_path_factory: pytest.TempPathFactory) -> PretrainedCLIP:
    """Pre-train the micro CLIP ONCE per test session through the real CLI (``fit`` of
    ``tests/conf/clip_micro_pretrain.yaml``: 6 epochs of the CLIP loss on 2,500 CIFAR-10 train images,
    20-50 s single-threaded) and export its open_clip weights with ``ExportCLIPWeights``."""
    from robustft.cli import main

    out = tmp_path_factory.mktemp("clip_micro_pretrain")
    with pytest.MonkeyPatch.context() as mp, torch_threads(1):
        mp.chdir(REPO)  # the config uses repo-relative data paths
        start = time.perf_counter()
        main(["fit", "--config", "tests/conf/clip_micro_pretrain.yaml", "--trainer.default_root_dir", str(out)])
        seconds = time.perf_counter() - start
    weights = out / "open_clip_weights.pt"
    assert weights.is_file(), f"ExportCLIPWeights did not write {weights}"
    return PretrainedCLIP(weights=weights, clip_model="robustft-micro-vit", seconds=seconds)

