"""Tests for robustft.averaging: exact endpoints, soups, checks and checkpoint loading."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from robustft.averaging import (
    GreedySoupResult,
    StateDictMismatchError,
    greedy_soup,
    interpolate_state_dicts,
    load_state_dict_file,
    uniform_soup,
    weighted_average,
)


def _tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def _finetune(net: nn.Module, steps: int = 3, seed: int = 1) -> nn.Module:
    """A few SGD steps in train mode: weights, BN running stats and num_batches_tracked all change."""
    torch.manual_seed(seed)
    tuned = copy.deepcopy(net).train()
    opt = torch.optim.SGD(tuned.parameters(), lr=0.5)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 3, (8,))
        opt.zero_grad()
        nn.functional.cross_entropy(tuned(x), y).backward()
        opt.step()
    return tuned.eval()


@pytest.fixture(scope="module")
def endpoints() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    net0 = _tiny_net().eval()
    return net0, _finetune(net0)


def _bits(t: Tensor) -> Tensor:
    """Raw bytes of a tensor: distinguishes -0.0 from 0.0 and compares NaN payloads."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _assert_bitwise_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(_bits(a[k]), _bits(b[k])), k


def _loaded(sd: dict[str, Tensor]) -> nn.Module:
    net = _tiny_net().eval()
    net.load_state_dict(sd)
    return net


# --------------------------------------------------------------------------------------------------
# interpolation


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_endpoints_are_bit_exact_and_reproduce_outputs(endpoints, alpha):
    net0, net1 = endpoints
    theta0, theta1 = net0.state_dict(), net1.state_dict()
    assert not torch.equal(theta0["1.num_batches_tracked"], theta1["1.num_batches_tracked"])
    merged = interpolate_state_dicts(theta0, theta1, alpha)
    target_net = net0 if alpha == 0.0 else net1
    _assert_bitwise_equal(merged, target_net.state_dict())
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(_loaded(merged)(x), target_net(x))


def test_endpoints_exact_where_the_naive_formula_is_not():
    theta0 = {"w": torch.tensor([-0.0, 1.0, math.nan, 2.0])}
    theta1 = {"w": torch.tensor([math.inf, 2.0, 3.0, -math.inf])}
    _assert_bitwise_equal(interpolate_state_dicts(theta0, theta1, 0.0), theta0)
    _assert_bitwise_equal(interpolate_state_dicts(theta0, theta1, 1.0), theta1)


def test_half_is_the_manual_mean_and_counters_stay_integer(endpoints):
    theta0, theta1 = endpoints[0].state_dict(), endpoints[1].state_dict()
    merged = interpolate_state_dicts(theta0, theta1, 0.5)
    for k, v in merged.items():
        assert v.dtype == theta0[k].dtype
        if v.is_floating_point():
            assert torch.equal(v, (theta0[k] + theta1[k]) / 2), k
    assert merged["1.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(merged["1.num_batches_tracked"], theta0["1.num_batches_tracked"])


@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.7, 0.999])
def test_general_alpha_and_counter_rule(endpoints, alpha):
    theta0, theta1 = endpoints[0].state_dict(), endpoints[1].state_dict()
    merged = interpolate_state_dicts(theta0, theta1, alpha)
    for k, v in merged.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, (1 - alpha) * theta0[k] + alpha * theta1[k], rtol=1e-6, atol=1e-7)
    assert torch.equal(merged["1.num_batches_tracked"], theta0["1.num_batches_tracked"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_preserved(dtype):
    torch.manual_seed(0)
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    merged = interpolate_state_dicts({"w": a.to(dtype)}, {"w": b.to(dtype)}, 0.25)
    assert merged["w"].dtype == dtype
    expected = (0.75 * a.to(dtype).double() + 0.25 * b.to(dtype).double()).to(dtype)
    assert torch.equal(merged["w"], expected)


def test_result_does_not_alias_inputs():
    theta0, theta1 = {"w": torch.zeros(3)}, {"w": torch.ones(3)}
    for alpha in (0.0, 0.5, 1.0):
        merged = interpolate_state_dicts(theta0, theta1, alpha)
        merged["w"].add_(10)
    assert torch.equal(theta0["w"], torch.zeros(3)) and torch.equal(theta1["w"], torch.ones(3))


def test_alpha_range_and_extrapolation():
    theta0, theta1 = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}
    for bad in (-0.1, 1.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="alpha"):
            interpolate_state_dicts(theta0, theta1, bad)
    out = interpolate_state_dicts(theta0, theta1, 1.5, allow_extrapolation=True)
    assert torch.equal(out["w"], torch.tensor([4.0, 8.0]))
    out = interpolate_state_dicts(theta0, theta1, -0.5, allow_extrapolation=True)
    assert torch.equal(out["w"], torch.tensor([0.0, 0.0]))


# --------------------------------------------------------------------------------------------------
# checks


def test_mismatched_keys_are_named():
    theta0 = {"a": torch.zeros(1), "b": torch.zeros(1), "shared": torch.zeros(2)}
    theta1 = {"shared": torch.zeros(2), "c": torch.zeros(1)}
    with pytest.raises(StateDictMismatchError) as info:
        interpolate_state_dicts(theta0, theta1, 0.5)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "a, b" in msg and "missing" in msg and "unexpected" in msg and "c" in msg
    assert "Fix:" in msg


def test_shape_mismatch_shows_both_shapes():
    with pytest.raises(StateDictMismatchError, match=r"fc.weight: \(3, 4\) vs \(4, 3\)"):
        interpolate_state_dicts({"fc.weight": torch.zeros(3, 4)}, {"fc.weight": torch.zeros(4, 3)}, 0.5)


def test_at_most_ten_keys_are_listed():
    theta0 = {f"k{i:02d}": torch.zeros(1) for i in range(25)}
    with pytest.raises(StateDictMismatchError) as info:
        interpolate_state_dicts(theta0, {}, 0.5)
    msg = str(info.value)
    assert "k09" in msg and "k10" not in msg and "+15 more" in msg


def test_mismatch_detected_even_at_endpoints():
    with pytest.raises(StateDictMismatchError):
        interpolate_state_dicts({"a": torch.zeros(2)}, {"a": torch.zeros(3)}, 0.0)


def test_dtype_and_integer_buffer_mismatches():
    with pytest.raises(StateDictMismatchError, match="dtype"):
        interpolate_state_dicts({"w": torch.zeros(2)}, {"w": torch.zeros(2, dtype=torch.float16)}, 0.5)
    ids0 = {"position_ids": torch.arange(4)}
    ids1 = {"position_ids": torch.arange(4).flip(0)}
    with pytest.raises(StateDictMismatchError, match="position_ids"):
        interpolate_state_dicts(ids0, ids1, 0.5)
    same = interpolate_state_dicts(ids0, {"position_ids": torch.arange(4)}, 0.5)
    assert torch.equal(same["position_ids"], torch.arange(4)) and same["position_ids"].dtype == torch.int64


def test_weighted_average_weight_checks():
    sds = [{"w": torch.zeros(1)}, {"w": torch.ones(1)}]
    with pytest.raises(ValueError, match="sum to 1"):
        weighted_average(sds, [0.5, 0.6])
    with pytest.raises(ValueError, match="allow_extrapolation"):
        weighted_average(sds, [-0.5, 1.5])
    with pytest.raises(ValueError, match="2 state dicts"):
        weighted_average(sds, [1.0])
    with pytest.raises(TypeError, match="non-tensor"):
        weighted_average([{"w": 1.0}], [1.0])  # type: ignore[list-item]


# --------------------------------------------------------------------------------------------------
# soups


@pytest.mark.parametrize("n", [1, 3, 5, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uniform_soup_of_identical_state_dicts_is_identity(endpoints, n, dtype):
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in endpoints[1].state_dict().items()}
    _assert_bitwise_equal(uniform_soup([sd] * n), sd)


def test_uniform_soup_is_the_mean(endpoints):
    sds = [endpoints[0].state_dict(), endpoints[1].state_dict(), _finetune(endpoints[0], seed=7).state_dict()]
    soup = uniform_soup(sds)
    for k, v in soup.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, sum(sd[k] for sd in sds) / 3, rtol=1e-6, atol=1e-7)
    assert torch.equal(soup["1.num_batches_tracked"], sds[0]["1.num_batches_tracked"])
    _assert_bitwise_equal(uniform_soup(sds[:2]), interpolate_state_dicts(sds[0], sds[1], 0.5))
    with pytest.raises(ValueError, match="at least one"):
        uniform_soup([])


def _closeness_to_zero(sd: dict[str, Tensor]) -> float:
    return -float(sd["w"].double().pow(2).sum())


def test_greedy_soup_constructed_case():
    values = [1.0, -1.0, 3.0, -0.9]
    ingredients = [{"w": torch.tensor([v])} for v in values]
    result = greedy_soup(ingredients, _closeness_to_zero)
    assert isinstance(result, GreedySoupResult)
    # ranking: -0.9 (index 3), then 1.0 and -1.0 (tie, list order), then 3.0;
    # {-0.9, 1.0} averages to 0.05 (better), adding -1.0 or 3.0 moves the mean away from 0.
    assert result.selected_indices == (3, 0)
    torch.testing.assert_close(result.state_dict["w"], torch.tensor([0.05]))
    assert result.scores == tuple(_closeness_to_zero(sd) for sd in ingredients)
    assert result.soup_score == pytest.approx(-(0.05**2))


def test_greedy_soup_tie_rule():
    ingredients = [{"w": torch.tensor([1.0])} for _ in range(3)]
    assert greedy_soup(ingredients, _closeness_to_zero).selected_indices == (0, 1, 2)
    assert greedy_soup(ingredients, _closeness_to_zero, accept_ties=False).selected_indices == (0,)


@pytest.mark.parametrize("seed", range(6))
def test_greedy_soup_never_below_best_ingredient(seed):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(6, generator=gen)
    ingredients = [{"w": torch.randn(6, generator=gen) * 2, "n": torch.tensor(seed)} for _ in range(8)]

    def evaluate(sd: dict[str, Tensor]) -> float:  # deterministic, non-convex "held-out accuracy"
        d = sd["w"] - target
        return float(torch.cos(3 * d).mean() - 0.1 * d.abs().sum())

    result = greedy_soup(ingredients, evaluate)
    best = max(result.scores)
    assert result.soup_score >= best
    assert evaluate(result.state_dict) == result.soup_score
    assert result.selected_indices[0] == result.scores.index(best)
    assert len(set(result.selected_indices)) == len(result.selected_indices)
    _assert_bitwise_equal(result.state_dict, uniform_soup([ingredients[i] for i in result.selected_indices]))


def test_greedy_soup_rejects_nan_and_mismatch():
    with pytest.raises(ValueError, match="NaN"):
        greedy_soup([{"w": torch.zeros(1)}], lambda sd: math.nan)
    with pytest.raises(StateDictMismatchError, match="ingredient 1"):
        greedy_soup([{"w": torch.zeros(1)}, {"v": torch.zeros(1)}], _closeness_to_zero)
    with pytest.raises(ValueError, match="at least one"):
        greedy_soup([], _closeness_to_zero)


# --------------------------------------------------------------------------------------------------
# loading


def test_load_plain_wrapped_and_prefixed(tmp_path: Path, endpoints):
    sd = endpoints[1].state_dict()
    files = {
        "plain.pt": sd,
        "wrapped.pt": {"state_dict": sd},
        "ddp.pt": {f"module.{k}": v for k, v in sd.items()},
        "compiled_ddp.pt": {"state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}},
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
        _assert_bitwise_equal(load_state_dict_file(tmp_path / name), sd)


def test_load_pickled_module_needs_trust(tmp_path: Path, endpoints):
    path = tmp_path / "module.pt"
    torch.save(endpoints[1], path)
    with pytest.raises(ValueError, match="weights_only=False"):
        load_state_dict_file(path)
    _assert_bitwise_equal(load_state_dict_file(path, weights_only=False), endpoints[1].state_dict())


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")  # emitted inside Lightning, not by robustft
def test_load_lightning_checkpoint(tmp_path: Path):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _tiny_net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 6, 6), torch.randint(0, 3, (8,)))
    module = Tiny()
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)

    full = load_state_dict_file(ckpt)
    assert set(full) == {f"model.{k}" for k in module.model.state_dict()}
    net = load_state_dict_file(ckpt, prefix="model.")
    _assert_bitwise_equal(net, module.model.state_dict())
    with pytest.raises(ValueError, match="no key starts with prefix 'backbone.'"):
        load_state_dict_file(ckpt, prefix="backbone.")


def test_load_errors_name_the_path(tmp_path: Path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_state_dict_file(missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pt.*torch\.save"):
        load_state_dict_file(garbage)
    with pytest.raises(ValueError, match="directory"):
        load_state_dict_file(tmp_path)
    odd = tmp_path / "odd.pt"
    torch.save({"epoch": 3, "weights": [1, 2]}, odd)
    with pytest.raises(ValueError, match=r"odd\.pt.*epoch, weights"):
        load_state_dict_file(odd)
