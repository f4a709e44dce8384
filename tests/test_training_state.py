"""robustft.training_state in one process: EMA arithmetic, queue wrap-around and fill count, exact
state_dict round trips, and the cross-rank helpers' single-process behaviour (identity / errors).
The two-process behaviour is in tests/distributed/test_synced_buffers.py."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from robustft.training_state import (
    EMAModule,
    LabeledQueue,
    all_gather_cat,
    all_reduce_mean_,
    all_reduce_sum_,
    broadcast_,
    sync_buffers,
)


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        for param in net.parameters():  # BatchNorm starts at 1 / 0: give every parameter seed-specific values
            param.copy_(torch.randn_like(param))
    return net


def _roundtrip(state: dict) -> dict:
    """Through torch.save / torch.load, as a checkpoint does."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ------------------------------------------------------------------------------------------------ EMA


def test_ema_copy_is_frozen_and_independent_of_the_source():
    source = _net(0)
    ema = EMAModule(source, momentum=0.9)
    assert all(not p.requires_grad for p in ema.parameters())
    assert all(p.requires_grad for p in source.parameters())
    for (name, p), (_, q) in zip(ema.module.named_parameters(), source.named_parameters(), strict=True):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name
    x = torch.randn(5, 4)
    source.eval(), ema.eval()
    assert torch.equal(ema(x), source(x))
    with torch.no_grad():
        source[0].weight.add_(1.0)  # changing the source does not change the copy
    assert not torch.equal(ema.module[0].weight, source[0].weight)


@pytest.mark.parametrize("m", [0.999, 0.9, 0.37])
def test_one_update_is_m_old_plus_one_minus_m_new_exactly(m):
    source = _net(0)
    ema = EMAModule(source, momentum=m)
    old = {n: p.detach().clone() for n, p in ema.module.named_parameters()}
    new_source = _net(1)  # same structure, other values
    ema.update(new_source)
    for name, p in ema.module.named_parameters():
        new = dict(new_source.named_parameters())[name].detach()
        expected = m * old[name] + (1 - m) * new
        assert torch.equal(p, expected), name
        assert not torch.equal(p, old[name]) and not torch.equal(p, new), name
    assert int(ema.num_updates) == 1
    # a second step from the result, with a per-call momentum (schedules)
    before = {n: p.detach().clone() for n, p in ema.module.named_parameters()}
    ema.update(new_source, momentum=0.5)
    for name, p in ema.module.named_parameters():
        new = dict(new_source.named_parameters())[name].detach()
        assert torch.equal(p, 0.5 * before[name] + 0.5 * new), name
    assert int(ema.num_updates) == 2


def test_momentum_limits_and_no_grad():
    source, other = _net(0), _net(1)
    frozen = EMAModule(source, momentum=1.0)
    frozen.update(other)
    for p, q in zip(frozen.module.parameters(), source.parameters(), strict=True):
        assert torch.equal(p, q)
    follower = EMAModule(source, momentum=0.0)
    follower.update(other)
    for p, q in zip(follower.module.parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q) and not p.requires_grad and p.grad_fn is None
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        EMAModule(source, momentum=1.5)
    with pytest.raises(ValueError, match="differ"):
        follower.update(nn.Linear(4, 3))


@pytest.mark.parametrize("mode", ["copy", "ema", "own"])
def test_buffer_modes(mode):
    source = _net(0)
    ema = EMAModule(source, momentum=0.75, buffers=mode)
    bn_ema, bn_src = ema.module[1], source[1]
    start_mean = bn_ema.running_mean.clone()
    source.train()
    source(torch.randn(8, 4) * 3 + 1)  # moves the source's running statistics
    assert not torch.equal(bn_src.running_mean, start_mean)
    ema.update(source)
    if mode == "copy":
        assert torch.equal(bn_ema.running_mean, bn_src.running_mean)
        assert torch.equal(bn_ema.running_var, bn_src.running_var)
    elif mode == "ema":
        assert torch.equal(bn_ema.running_mean, 0.75 * start_mean + 0.25 * bn_src.running_mean)
    else:
        assert torch.equal(bn_ema.running_mean, start_mean)
    if mode != "own":  # integer buffers are copied, never averaged
        assert torch.equal(bn_ema.num_batches_tracked, bn_src.num_batches_tracked)
    else:
        assert int(bn_ema.num_batches_tracked) == 0


def test_ema_state_dict_restores_exactly():
    source = _net(0)
    ema = EMAModule(source, momentum=0.9, buffers="ema")
    for seed in (1, 2, 3):
        source.train()
        source(torch.randn(8, 4, generator=torch.Generator().manual_seed(seed)))
        ema.update(_net(seed))
    state = _roundtrip(ema.state_dict())
    assert "num_updates" in state and "module.1.running_mean" in state
    restored = EMAModule(_net(7), momentum=0.9, buffers="ema")  # other starting values
    restored.load_state_dict(state)
    for key, value in ema.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    assert int(restored.num_updates) == 3
    # and the next step is the same from both
    nxt = _net(4)
    ema.update(nxt)
    restored.update(nxt)
    for key, value in ema.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_ema_lives_in_a_parent_state_dict_and_not_in_the_trainable_parameters():
    class Method(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = _net(0)
            self.key_encoder = EMAModule(self.encoder, momentum=0.99)

    method = Method()
    keys = method.state_dict().keys()
    assert "key_encoder.module.0.weight" in keys and "key_encoder.num_updates" in keys
    trainable = [n for n, p in method.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("encoder.") for n in trainable)


# ------------------------------------------------------------------------------------------------ queue


def _keys(start: int, n: int, dim: int = 3) -> torch.Tensor:
    """Row i = (start + i) * [1, 10, 100]: every key is recognisable."""
    rows = torch.arange(start, start + n, dtype=torch.float32)[:, None]
    return (rows * torch.tensor([1.0, 10.0, 100.0]))[:, :dim]


def test_queue_fills_then_wraps_around_with_a_batch_crossing_the_end():
    q = LabeledQueue(capacity=5, dim=3)
    assert len(q) == 0 and not q.valid_mask().any()
    assert q.entries().keys.shape == (0, 3)

    q.enqueue(_keys(0, 2), torch.tensor([10, 11]), torch.tensor([100, 101]))
    assert len(q) == 2 and int(q.ptr) == 2
    assert q.valid_mask().tolist() == [True, True, False, False, False]
    e = q.entries()
    assert torch.equal(e.keys, _keys(0, 2)) and e.labels.tolist() == [10, 11] and e.ids.tolist() == [100, 101]

    q.enqueue(_keys(2, 2), torch.tensor([12, 13]), torch.tensor([102, 103]))
    assert len(q) == 4 and int(q.ptr) == 4 and not q.is_full

    # 3 entries at ptr 4: slot 4, then slots 0 and 1 (the two oldest are overwritten)
    q.enqueue(_keys(4, 3), torch.tensor([14, 15, 16]), torch.tensor([104, 105, 106]))
    assert len(q) == 5 and q.is_full and int(q.ptr) == 2
    assert q.ids.tolist() == [105, 106, 102, 103, 104]
    assert q.labels.tolist() == [15, 16, 12, 13, 14]
    assert torch.equal(q.keys, _keys(0, 7)[[5, 6, 2, 3, 4]])
    chrono = q.entries(chronological=True)
    assert chrono.ids.tolist() == [102, 103, 104, 105, 106]
    assert torch.equal(chrono.keys, _keys(2, 5))
    assert q.valid_mask().all()


def test_queue_batch_longer_than_capacity_keeps_its_newest_entries():
    q = LabeledQueue(capacity=4, dim=3)
    q.enqueue(_keys(0, 1), torch.tensor([0]), torch.tensor([0]))  # ptr 1
    q.enqueue(_keys(1, 6), torch.arange(1, 7), torch.arange(1, 7))  # ids 1..6, only 3..6 fit
    assert len(q) == 4 and int(q.ptr) == (1 + 6) % 4
    assert q.entries(chronological=True).ids.tolist() == [3, 4, 5, 6]
    assert torch.equal(q.entries(chronological=True).keys, _keys(3, 4))
    # the oldest slot is at the pointer
    assert int(q.ids[int(q.ptr)]) == 3


def test_queue_detaches_casts_and_validates():
    q = LabeledQueue(capacity=4, dim=2, dtype=torch.float64)
    keys = torch.randn(3, 2, requires_grad=True)
    q.enqueue(keys * 2, torch.tensor([1, 2, 3]))
    assert q.keys.dtype == torch.float64 and not q.keys.requires_grad
    assert q.ids.tolist() == [-1, -1, -1, -1] and q.labels.tolist() == [1, 2, 3, -1]
    q.enqueue(torch.zeros(0, 2))  # an empty batch changes nothing
    assert len(q) == 3 and int(q.ptr) == 3
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        q.enqueue(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="labels must be"):
        q.enqueue(torch.zeros(2, 2), torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="integers"):
        q.enqueue(torch.zeros(1, 2), ids=torch.tensor([0.5]))
    q.reset()
    assert len(q) == 0 and int(q.ptr) == 0 and q.labels.tolist() == [-1] * 4


def test_queue_state_dict_restores_exactly_including_the_pointer():
    q = LabeledQueue(capacity=6, dim=3)
    for step in range(3):  # 15 entries into 6 slots: wrapped twice, pointer in the middle
        q.enqueue(_keys(step * 5, 5), torch.arange(5) + step, torch.arange(step * 5, step * 5 + 5))
    assert int(q.ptr) == 15 % 6 == 3 and len(q) == 6
    state = _roundtrip(q.state_dict())
    assert set(state) == {"keys", "labels", "ids", "ptr", "num_filled"}
    restored = LabeledQueue(capacity=6, dim=3)
    restored.enqueue(_keys(100, 2), torch.tensor([9, 9]), torch.tensor([9, 9]))  # other state before loading
    restored.load_state_dict(state)
    for key, value in q.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    assert int(restored.ptr) == 3 and len(restored) == 6
    # the next enqueue lands in the same slots in both
    q.enqueue(_keys(50, 4), torch.arange(4), torch.arange(50, 54))
    restored.enqueue(_keys(50, 4), torch.arange(4), torch.arange(50, 54))
    for key, value in q.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    assert q.entries(chronological=True).ids.tolist() == [13, 14, 50, 51, 52, 53]


def test_partially_filled_queue_resumes_with_its_fill_count():
    q = LabeledQueue(capacity=8, dim=3)
    q.enqueue(_keys(0, 3), torch.arange(3), torch.arange(3))
    restored = LabeledQueue(capacity=8, dim=3)
    restored.load_state_dict(_roundtrip(q.state_dict()))
    assert len(restored) == 3 and restored.entries().ids.tolist() == [0, 1, 2]
    assert restored.valid_mask().tolist() == [True] * 3 + [False] * 5


# ------------------------------------------------------------------------------------------------ helpers


def test_sync_helpers_are_the_identity_in_one_process():
    x = torch.randn(3, 2)
    assert torch.equal(all_gather_cat(x), x)
    y = x.clone()
    assert all_reduce_mean_(y) is y and torch.equal(y, x)
    assert all_reduce_sum_(y) is y and torch.equal(y, x)
    assert broadcast_(y) is y and torch.equal(y, x)
    with pytest.raises(TypeError, match="floating"):
        all_reduce_mean_(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="0-d"):
        all_gather_cat(torch.tensor(1.0))
    q = LabeledQueue(4, 2)
    assert sync_buffers(q, ["keys", "ptr"]) is q
    with pytest.raises(KeyError, match="prototypes"):
        sync_buffers(q, ["prototypes"])
    with pytest.raises(ValueError, match="mode"):
        sync_buffers(q, mode="max")  # type: ignore[arg-type]
