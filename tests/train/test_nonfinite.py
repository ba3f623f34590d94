"""Non-finite steps are counted, reset by a finite one, and K in a row stop with the batch's files."""

from __future__ import annotations

import math

import pytest

from sana_ray.data.sampler import BatchPlan
from sana_ray.train.loop import _batch_files
from sana_ray.train.nonfinite import NonFiniteGuard, NonFiniteTraining


def test_counting_and_reset():
    guard = NonFiniteGuard(3)
    files = lambda: ["x.png"]  # noqa: E731
    assert guard.observe(1, math.nan, applied=False, loss_scaling=False, batch_files=files)
    assert guard.observe(2, 0.5, applied=False, loss_scaling=False, batch_files=files)  # NaN gradient
    assert (guard.total, guard.in_a_row) == (2, 2)
    assert not guard.observe(3, 0.5, applied=True, loss_scaling=False, batch_files=files)
    assert (guard.total, guard.in_a_row) == (2, 0)
    # fp16 loss scaling: an overflow-skipped step with a finite loss is the scaler's business
    assert not guard.observe(4, 0.5, applied=False, loss_scaling=True, batch_files=files)
    assert guard.observe(5, math.inf, applied=False, loss_scaling=True, batch_files=files)


def test_k_in_a_row_stop_with_the_image_files():
    guard = NonFiniteGuard(2, total=4, in_a_row=1)  # as restored from a checkpoint
    with pytest.raises(NonFiniteTraining) as error:
        guard.observe(7, math.nan, applied=False, loss_scaling=False, batch_files=lambda: ["/d/a.png", "/d/b.png"])
    message = str(error.value)
    assert "steps 6-7" in message and "/d/a.png" in message and "/d/b.png" in message
    assert "max_nonfinite_steps: 2" in message


def test_batch_files_cover_every_micro_batch_and_rank():
    class Cache:
        image_paths = [f"/d/{i}.png" for i in range(8)]

    plan = BatchPlan([0] * 8, [0] * 8, batch_size=1, world_size=2, seed=0)
    files = _batch_files(Cache, plan, first_micro_batch=2, accumulation=2, world_size=2)
    expected = {Cache.image_paths[i] for m in (2, 3) for r in (0, 1) for i in plan.batch(m, r)}
    assert set(files) == expected and len(files) == 4
