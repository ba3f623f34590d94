"""EMA of the weights: the update rule, intervals, start step, CPU placement and save/load."""

from __future__ import annotations

import pytest
import torch

from sana_ray.manifest.schema import EmaSpec
from sana_ray.train.ema import EMA


def test_update_rule_interval_and_start_step(tmp_path):
    w = {"a": torch.tensor([0.0, 2.0])}
    ema = EMA(w, EmaSpec(enabled=True, decay=0.9, update_every=2, start_step=2))
    w["a"] = torch.tensor([1.0, 1.0])
    assert not ema.update(w, 1)  # not an update step
    assert torch.equal(ema.shadow["a"], torch.tensor([0.0, 2.0]))
    assert ema.update(w, 2)  # step <= start_step: copies
    assert torch.equal(ema.shadow["a"], torch.tensor([1.0, 1.0]))
    w["a"] = torch.tensor([11.0, -9.0])
    ema.update(w, 3)  # skipped (interval)
    ema.update(w, 4)  # 0.9 * 1 + 0.1 * 11 = 2.0; 0.9 * 1 + 0.1 * -9 = 0.0
    torch.testing.assert_close(ema.shadow["a"], torch.tensor([2.0, 0.0]))

    # n updates towards a constant target: ema = target + decay^n (start - target)
    target = {"a": torch.full((2,), 5.0)}
    for step in range(6, 16, 2):
        ema.update(target, step)
    torch.testing.assert_close(ema.shadow["a"], 5.0 + 0.9**5 * (torch.tensor([2.0, 0.0]) - 5.0))

    ema.save(tmp_path, rank=0)
    other = EMA({"a": torch.zeros(2)}, ema.spec)
    other.load(tmp_path, rank=0)
    assert torch.equal(other.shadow["a"], ema.shadow["a"])


def test_shadow_is_float32_and_can_live_on_the_cpu():
    w = {"a": torch.ones(3, dtype=torch.bfloat16)}
    ema = EMA(w, EmaSpec(enabled=True, on_cpu=True))
    assert ema.shadow["a"].dtype == torch.float32 and ema.shadow["a"].device.type == "cpu"
    assert ema.shadow["a"].data_ptr() != w["a"].data_ptr()


def test_sharded_ema_writes_one_file_per_rank_and_unsharded_only_on_rank_0(tmp_path):
    sharded = EMA({"a": torch.ones(2)}, EmaSpec(enabled=True), sharded=True)
    sharded.save(tmp_path / "s", rank=1)
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["ema-rank-00001.safetensors"]
    whole = EMA({"a": torch.ones(2)}, EmaSpec(enabled=True))
    whole.save(tmp_path / "w", rank=1)
    assert not (tmp_path / "w").exists()
    with pytest.raises(KeyError, match="lacks 1 weights"):
        EMA({"a": torch.ones(2), "b": torch.ones(1)}, EmaSpec(enabled=True), sharded=True).load(tmp_path / "s", rank=1)
