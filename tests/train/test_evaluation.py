"""The stable evaluation loss (train.evaluation) on the tiny random transformer, without Ray.

Eval data are random latents and embeddings written as real cache shards (``data.cache.synthetic``:
the build's own writer, no encoders) and read back by the training workers' ``CacheReader``, so no
cache build is needed. The sharding is checked two ways: by summing the per-rank item vectors of 1, 2
and 3 simulated ranks in one process, and with two real gloo processes running DeepSpeed ZeRO-3
(whose every forward is a collective: the case where ranks must stay in lock-step).
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from sana_ray.data.cache import CacheReader, open_reader
from sana_ray.data.cache.synthetic import cache_set, write_latent_cache, write_text_cache
from sana_ray.manifest import ManifestError, load_manifest
from sana_ray.manifest.schema import Spec
from sana_ray.train.evaluation import (
    Evaluator,
    eval_due,
    eval_sigmas,
    noise_seed,
    plan_items,
    rank_items,
    sigma_label,
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny tensors: one intra-op thread is as fast, and far faster when the 2 cores are busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _transformer(seed: int = 0):
    from diffusers import SanaTransformer2DModel

    from sana_ray.model.tiny import TRANSFORMER_CONFIG

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SanaTransformer2DModel(**TRANSFORMER_CONFIG).train()


_ROOT = Path(tempfile.mkdtemp(prefix="sana-ray-test-eval-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


def eval_data(count: int, seed: int, shapes=((4, 8, 8),), text_len: int = 12) -> CacheReader:
    """``count`` samples, sample ``i`` in bucket ``i % len(shapes)``, each with its own caption row."""
    generator = torch.Generator().manual_seed(seed)
    latents = [torch.randn(*shapes[i % len(shapes)], generator=generator) for i in range(count)]
    mask = torch.ones(count, text_len, dtype=torch.int64)
    mask[:, text_len // 2 :] = torch.randint(0, 2, (count, text_len - text_len // 2), generator=generator)
    embeds = torch.randn(count, text_len, 32, generator=generator)
    folder = Path(tempfile.mkdtemp(dir=_ROOT))
    text = write_text_cache(folder / "text" / "t", [f"caption {i}" for i in range(count)], zip(embeds, mask), shard_size=2)
    images = write_latent_cache(folder / "latents" / "l", [f"/held/{i}.png" for i in range(count)], latents, shard_size=3)
    return open_reader(cache_set(text, images, [(i,) for i in range(count)], dataset="held"))


SETS = [("holdout", eval_data(5, seed=1, shapes=((4, 8, 8), (4, 8, 12)))), ("faces", eval_data(3, seed=2))]
# 5 + 3 samples in batches of 2 within buckets: 5 batches; x 3 sigmas = 15 items, odd, so 2 ranks split unevenly.


def _spec(**training) -> Spec:
    return Spec.model_validate({
        "model": {"pretrained": "tiny"},
        "datasets": [{"name": "train", "path": "."}, {"name": "holdout", "path": ".", "dataset_type": "eval"},
                     {"name": "faces", "path": ".", "dataset_type": "eval"}],
        "training": {"steps": 10, "batch_size": 2, "checkpoint_every": 5} | training,
        "evaluation": {"num_timesteps": 3},
    })


def _evaluator(spec: Spec | None = None, *, rank: int = 0, world_size: int = 1, sets=SETS) -> Evaluator:
    return Evaluator.from_spec(spec or _spec(), sets, rank=rank, world_size=world_size, device=torch.device("cpu"))


# --- the sigmas and the plan


def test_sigmas_are_evenly_spaced_midpoints_and_ignore_the_flow_shift():
    sigmas = eval_sigmas(28)
    assert sigmas.shape == (28,) and sigmas.dtype == torch.float32
    assert sigmas[0].item() == pytest.approx(1 / 56) and sigmas[-1].item() == pytest.approx(1 - 1 / 56)
    torch.testing.assert_close(sigmas.diff(), torch.full((27,), 1 / 28), rtol=0, atol=1e-6)
    assert (sigmas > 0).all() and (sigmas < 1).all()
    assert len({sigma_label(s) for s in eval_sigmas(1000).tolist()}) == 1000  # metric names stay distinct
    assert sigma_label(0.017857) == "sigma_0.0179"

    # Neither the shift, the timestep sampling nor the training seed / lr moves them.
    base = _evaluator(_spec(flow_shift=1.0))
    for other in (_spec(flow_shift=6.0), _spec(timestep_sampling={"scheme": "uniform"}), _spec(seed=3, optimizer={"lr": 1.0})):
        assert torch.equal(_evaluator(other).sigmas, base.sigmas)
    torch.testing.assert_close(base.sigmas, eval_sigmas(3))


def test_plan_batches_within_buckets_and_every_rank_runs_as_many_forwards():
    items = plan_items([[0, 1, 0, 1, 0], [0, 0]], batch_size=2, num_timesteps=3)
    batches = sorted({(item.dataset, item.samples) for item in items})
    assert batches == [(0, (0, 2)), (0, (1, 3)), (0, (4,)), (1, (0, 1))]
    assert len(items) == 4 * 3 and {item.timestep for item in items} == {0, 1, 2}
    for world_size in (1, 2, 3, 5, 13):
        runs = [rank_items(len(items), rank, world_size) for rank in range(world_size)]
        assert len({len(r) for r in runs}) == 1 and len(runs[0]) == math.ceil(len(items) / world_size)
        counted = sorted(i for r in runs for i, c in r if c)
        assert counted == list(range(len(items)))  # each item exactly once, on exactly one rank


def test_noise_seed_depends_only_on_seed_dataset_sample_and_timestep():
    seeds = {noise_seed(0, d, s, t) for d in ("a", "b") for s in range(3) for t in range(4)}
    assert len(seeds) == 24 and all(0 <= x < 2**63 for x in seeds)
    assert noise_seed(0, "a", 1, 2) == noise_seed(0, "a", 1, 2) != noise_seed(1, "a", 1, 2)


def test_eval_due_defaults_to_every_checkpoint_and_the_last_step():
    spec = _spec(steps=12, checkpoint_every=5)
    assert [s for s in range(1, 13) if eval_due(s, spec)] == [5, 10, 12]
    spec.evaluation.every_steps = 4
    assert [s for s in range(1, 13) if eval_due(s, spec)] == [4, 8, 12]


# --- the loss


def test_same_weights_same_loss_and_other_weights_another():
    transformer = _transformer()
    evaluator = _evaluator()
    first = evaluator.evaluate(transformer)
    second = evaluator.evaluate(transformer)
    assert first.loss == second.loss and first.per_timestep == second.per_timestep
    assert math.isfinite(first.loss) and first.loss > 0
    assert transformer.training  # mode restored
    assert all(p.grad is None for p in transformer.parameters())  # no graph, no gradients

    # Another training seed, lr or shift: the same eval loss for the same weights.
    for other in (_spec(flow_shift=6.0), _spec(seed=123, optimizer={"lr": 0.5})):
        assert _evaluator(other).evaluate(transformer).loss == first.loss

    with torch.no_grad():
        transformer.proj_out.weight.add_(0.05)
    assert evaluator.evaluate(transformer).loss != first.loss


def test_eval_loss_is_the_training_loss_at_fixed_sigmas_and_noise():
    """One sample, one sigma: exactly flow_matching_loss with the documented noise."""
    from sana_ray.model.flow import flow_matching_loss

    data = eval_data(1, seed=4)
    transformer = _transformer().eval()
    result = Evaluator([("one", data)], num_timesteps=2, seed=9, batch_size=1).evaluate(transformer)
    batch = data.batch([0])
    with torch.no_grad():
        expected = [
            flow_matching_loss(transformer, batch["latents"], batch["prompt_embeds"], batch["prompt_attention_mask"],
                               sigmas=torch.tensor([sigma]),
                               noise=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(noise_seed(9, "one", 0, t)))).item()
            for t, sigma in enumerate((0.25, 0.75))
        ]
    assert result.sigmas == [0.25, 0.75]
    assert result.per_timestep == pytest.approx(expected, rel=1e-6)


def test_per_timestep_values_average_to_the_total_and_datasets_pool_by_size():
    result = _evaluator().evaluate(_transformer())
    assert len(result.per_timestep) == len(result.sigmas) == 3
    assert sum(result.per_timestep) / 3 == pytest.approx(result.loss, rel=1e-12)
    holdout, faces = result.datasets
    assert (holdout.name, holdout.samples, faces.name, faces.samples) == ("holdout", 5, "faces", 3)
    for d in result.datasets:
        assert sum(d.per_timestep) / 3 == pytest.approx(d.loss, rel=1e-12)
    assert result.loss == pytest.approx((5 * holdout.loss + 3 * faces.loss) / 8, rel=1e-12)
    metrics = result.mlflow_metrics()
    assert metrics["eval_loss"] == result.loss and metrics["eval_loss/sigma_0.1667"] == result.per_timestep[0]
    assert metrics["eval_loss/faces"] == faces.loss and "eval_loss/holdout/sigma_0.8333" in metrics
    assert "eval_time_s" in metrics
    assert result.report_metrics() == {"eval_loss": result.loss, "eval_loss/holdout": holdout.loss, "eval_loss/faces": faces.loss}
    # one eval dataset: no per-dataset duplicates in MLflow
    single = Evaluator(SETS[:1], num_timesteps=3, seed=0, batch_size=2).evaluate(_transformer())
    assert not any(k.startswith("eval_loss/holdout") for k in single.mlflow_metrics())


def test_sharded_sums_are_exactly_the_single_process_result():
    """Ranks 0..W-1 each fill their items' slots; their sum (what all-reduce does) combines to the
    1-process result bit for bit, for W = 2 and 3 (an uneven split: padded ranks)."""
    transformer = _transformer()
    single = _evaluator().evaluate(transformer)
    for world_size in (2, 3):
        ranks = [_evaluator(rank=r, world_size=world_size) for r in range(world_size)]
        assert len({e.num_forwards for e in ranks}) == 1
        with torch.no_grad():
            summed = sum(e.local_sums(transformer) for e in ranks)
        sharded = ranks[0].combine(summed)
        assert sharded.loss == single.loss and sharded.per_timestep == single.per_timestep
        assert [d.loss for d in sharded.datasets] == [d.loss for d in single.datasets]


def test_an_eval_set_needs_samples():
    with pytest.raises(ValueError, match="no eval datasets"):
        Evaluator([], num_timesteps=2, seed=0, batch_size=1)


# --- two real ranks: gloo + DeepSpeed ZeRO-3 (every forward all-gathers the weights)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _zero3_rank(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size)})
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    from sana_ray.manifest.schema import HardwareSpec, TrainingSpec
    from sana_ray.train.optim import build_lr_scheduler, build_optimizer
    from sana_ray.train.strategy import build_strategy

    training = TrainingSpec(steps=1, batch_size=2)
    transformer = _transformer()
    optimizer = build_optimizer(transformer.parameters(), training)
    strategy = build_strategy(training, HardwareSpec(strategy="deepspeed", deepspeed={"stage": 3}),
                              torch.device("cpu"), world_size)
    strategy.prepare(transformer, optimizer, build_lr_scheduler(optimizer, training))
    assert strategy.shards_weights
    evaluator = _evaluator(rank=rank, world_size=world_size)
    assert evaluator.num_forwards * world_size > len(evaluator.items)  # uneven: rank 1 pads
    result = evaluator.evaluate(strategy.model, strategy.module, strategy.autocast)
    assert strategy.module.training  # train mode is back for the next step
    torch.save({"loss": result.loss, "per_timestep": result.per_timestep}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_two_gloo_ranks_under_zero3_match_one_process(tmp_path):
    import time

    import deepspeed  # noqa: F401  (imported here, once: the forked ranks inherit it and start in a second)
    import torch.multiprocessing as mp

    single = _evaluator().evaluate(_transformer())
    evaluator = _evaluator(rank=0, world_size=2)
    assert len(evaluator.items) % 2 == 1  # the padding path runs
    out = str(tmp_path / "result")
    # fork, not spawn: a spawned rank re-imports torch, diffusers and DeepSpeed (a minute on 2 busy cores).
    context = mp.start_processes(_zero3_rank, args=(2, _free_port(), out), nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 300  # ranks out of lock-step would wait for each other forever
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two ranks did not finish within 300 s (out of lock-step?)")
    for rank in range(2):
        result = torch.load(f"{out}.{rank}")
        # ZeRO-3 gathers the same fp32 weights (seen bit-identical; a tolerance in case a kernel differs).
        assert result["loss"] == pytest.approx(single.loss, rel=1e-6)
        assert result["per_timestep"] == pytest.approx(single.per_timestep, rel=1e-6)


# --- the manifest


MANIFEST = {
    "apiVersion": "sana-ray/v1",
    "kind": "TrainingRun",
    "metadata": {"name": "m"},
    "spec": {
        "model": {"pretrained": "tiny"},
        "datasets": [{"name": "train", "path": "."}],
        "training": {"steps": 4},
    },
}


def _load(tmp_path, **spec):
    doc = {**MANIFEST, "spec": {**MANIFEST["spec"], **spec}}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_manifest(path)


def test_manifest_defaults_and_asking_for_eval_without_eval_data(tmp_path):
    manifest = _load(tmp_path)
    evaluation = manifest.spec.evaluation
    assert (evaluation.enabled, evaluation.every_steps, evaluation.num_timesteps, evaluation.seed, evaluation.batch_size) == (
        None, None, 28, 0, None)
    assert manifest.spec.evaluation_datasets() == []  # no eval data: the run does not evaluate

    with pytest.raises(ManifestError) as error:
        _load(tmp_path, evaluation={"enabled": True})
    assert "evaluation.enabled is true but no enabled dataset has dataset_type: eval" in str(error.value)
    assert "m.yaml:" in str(error.value)

    with pytest.raises(ManifestError) as error:
        _load(tmp_path, evaluation={"num_timesteps": 8})
    assert "evaluation.num_timesteps is set but no enabled dataset has dataset_type: eval" in str(error.value)
    assert _load(tmp_path, evaluation={"num_timesteps": 8, "enabled": False}).spec.evaluation_datasets() == []
    # a resolved manifest (every default spelled out) loads again
    resolved = manifest.model_dump(mode="json")
    assert type(manifest).model_validate(resolved).spec.evaluation == evaluation

    held = [{"name": "train", "path": "."}, {"name": "held", "path": ".", "dataset_type": "eval"}]
    assert _load(tmp_path, datasets=held).spec.evaluation_datasets() == ["held"]
    assert _load(tmp_path, datasets=held, evaluation={"enabled": False}).spec.evaluation_datasets() == []
    disabled = [held[0], held[1] | {"disabled": True}]
    with pytest.raises(ManifestError, match="evaluation.enabled is true"):
        _load(tmp_path, datasets=disabled, evaluation={"enabled": True})
    with pytest.raises(ManifestError, match="num_timesteps"):
        _load(tmp_path, datasets=held, evaluation={"num_timesteps": 0})
