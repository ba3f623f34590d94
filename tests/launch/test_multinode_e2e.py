"""Multi-node training on one machine: a real 2-node Ray cluster (``ray.cluster_utils.Cluster``).

The cluster: a head holding no CPU (GCS, dashboard / state API, the driver) and two worker nodes of
2 CPUs each, labelled and resourced like a 4090 node and an L40S node (``sana-ray/gpu=rtx4090`` +
``{rtx4090: 2}``, ``sana-ray/gpu=l40s`` + ``{l40s: 2}``, what clusters/ gives real nodes). Each node
could hold both workers, so only the manifest's pool labels (``hardware.nodes[*].labels`` -> one Ray
``label_selector`` per worker) can put one worker on each.

Every run goes through the real ``apply`` with ``hardware.ray_address`` set to the cluster's GCS
address (``ensure_ray`` joins it instead of starting a local Ray). Three fits of the same tiny
manifest (64 px, 8 steps, a checkpoint at the end only, no validation prompts):

* one node: one pool of 1 node x 2 workers labelled rtx4090 (both workers on that node);
* DDP over two nodes: pools rtx4090 1x1 + l40s 1x1;
* DeepSpeed ZeRO-2 over the same two nodes.

Where the workers ran is read back from the cluster, not from the manifest: Ray Train's own record
of each run (``RAY_TRAIN_ENABLE_STATE_TRACKING``: world rank -> worker actor -> node id) must agree
with the GCS actor table (state API: the ``RayTrainWorker`` actors the run created and their node
ids), and the node's labels are the ones the cluster reports for it. The two-node DDP run must
reproduce the one-node run (same per-step losses, same exported weights, 1e-5 relative; measured:
bit-identical), and ZeRO-2 must match DDP within the tolerance justified in its test.

The session's local Ray (``ray_local`` in tests/conftest.py) is disconnected for this module and
started again afterwards if it was running, so the module runs alone or inside the suite.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from sana_ray.launch.ray_cluster import RAY_ENV

pytestmark = pytest.mark.e2e

# Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when it is first imported: set to 0, the driver
# keeps 127.0.0.1 in a GCS address; otherwise ray.init("127.0.0.1:PORT") rewrites it to the machine's
# address, where the loopback-bound GCS does not listen, and retries for many minutes. Collection
# runs before any test imports Ray, so this is early enough; the same values ensure_ray sets.
for _key, _value in RAY_ENV.items():
    os.environ.setdefault(_key, _value)

STEPS = 8
LABEL = "sana-ray/gpu"
GPUS = ("rtx4090", "l40s")  # the two node types this cluster stands for


@dataclass(frozen=True)
class TwoNodeCluster:
    address: str  # GCS address: what hardware.ray_address joins
    dashboard: str  # http://127.0.0.1:PORT: the state API
    node_ids: dict[str, str]  # "rtx4090" / "l40s" -> the Ray node id of that worker node


@dataclass(frozen=True)
class Run:
    outcome: dict  # run.json
    rank_nodes: list[str]  # the node id each world rank ran on (index = rank)


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    from sana_ray.launch.ray_cluster import ensure_ray

    # A driver is connected to one cluster at a time: leave the session's local Ray (if any).
    had_session_ray = ray.is_initialized()
    ray.shutdown()
    patch = pytest.MonkeyPatch()
    if ray_constants.ENABLE_RAY_CLUSTER:  # Ray was imported before the module set RAY_ENV (see the top)
        patch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    # Ray Train records each run's workers (world rank, actor, node) in a state actor on the head.
    patch.setenv("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    # The node processes inherit RAY_ENV (loopback only, fast Train reports), as ensure_ray's do.
    common = {"node_ip_address": "127.0.0.1", "object_store_memory": 150 * 1024 * 1024}
    cluster = Cluster()
    try:
        cluster.add_node(**common, num_cpus=0, include_dashboard=True, dashboard_host="127.0.0.1",
                         dashboard_port=None)  # None: a free port (8265 may be another Ray's)
        nodes = {gpu: cluster.add_node(num_cpus=2, labels={LABEL: gpu}, resources={gpu: 2}, **common) for gpu in GPUS}
        cluster.wait_for_nodes()
        yield TwoNodeCluster(
            address=cluster.address,
            dashboard=f"http://{cluster.webui_url}",
            node_ids={gpu: node.node_id for gpu, node in nodes.items()},
        )
    finally:
        ray.shutdown()  # the driver connection apply's ensure_ray made
        cluster.shutdown()
        patch.undo()
        if had_session_ray:
            ensure_ray(num_cpus=2)  # what the session fixture started, for the modules after this one


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One folder for every run of the module: one tiny model, one cache, one MLflow store."""
    return tmp_path_factory.mktemp("multinode")


def _pool(gpu: str, workers: int) -> dict:
    # profile cpu: these CPU workers stand for the GPUs the labels name (gloo instead of NCCL).
    return {"name": gpu, "count": 1, "gpus_per_node": workers, "profile": "cpu", "labels": {LABEL: gpu}}


def _worker_actors(cluster: TwoNodeCluster) -> dict[str, str]:
    """The GCS actor table (state API): every Ray Train worker actor, alive or dead -> its node id."""
    from ray.util.state import list_actors

    actors = list_actors(
        address=cluster.dashboard, filters=[("class_name", "=", "RayTrainWorker")], limit=10_000,
        raise_on_missing_output=False,
    )
    return {a.actor_id: a.node_id for a in actors}


def _train_runs() -> dict[str, list]:
    """Ray Train's record (RAY_TRAIN_ENABLE_STATE_TRACKING): run id -> its last attempt's workers,
    by world rank (TrainWorker: world_rank, actor_id, node_id, ...)."""
    import ray

    if not ray.is_initialized():  # before the first apply joined the cluster: no run yet
        return {}
    from ray.train.v2._internal.state.state_actor import get_state_actor

    actor = get_state_actor()
    attempts = ray.get(actor.get_train_run_attempts.remote()) if actor is not None else {}
    return {run: list(by_id.values())[-1].workers for run, by_id in attempts.items() if by_id}


def _apply(cluster: TwoNodeCluster, workdir: Path, shapes: Path, name: str, *, pools: list[dict], **hardware) -> Run:
    from sana_ray.launch.apply import apply
    from sana_ray.manifest import load_manifest

    manifest = {
        "apiVersion": "sana-ray/v1",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": {
            "model": {"pretrained": "tiny"},
            "datasets": [{"name": "shapes", "path": str(shapes), "resolution": 64, "crop": True}],
            "training": {
                "steps": STEPS,
                "batch_size": 2,
                "seed": 7,
                "optimizer": {"lr": 1e-3},
                "lr_scheduler": {"warmup_steps": 2},
                "checkpoint_every": STEPS,
            },
            "hardware": {"nodes": pools, "ray_address": cluster.address} | hardware,
            "output": {"dir": str(workdir / "runs"), "cache_dir": str(workdir / "cache")},
        },
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    actors_before, runs_before = _worker_actors(cluster), _train_runs()
    assert apply(load_manifest(path)) == 0
    outcome = json.loads((workdir / "runs" / name / "run.json").read_text())
    assert outcome["status"] == "completed" and outcome["steps"] == STEPS

    # Where the workers ran, from two records: Ray Train's (rank -> actor, node) and the GCS's
    # (actor -> node). They must agree, and the run must have had exactly 2 workers (no restart).
    actors = {a: node for a, node in _worker_actors(cluster).items() if a not in actors_before}
    runs = [workers for run, workers in _train_runs().items() if run not in runs_before]
    assert len(runs) == 1, runs
    assert [w.world_rank for w in runs[0]] == [0, 1]
    assert {w.actor_id: w.node_id for w in runs[0]} == actors
    return Run(outcome=outcome, rank_nodes=[w.node_id for w in runs[0]])


def _rank_gpus(cluster: TwoNodeCluster, run: Run) -> list[str]:
    """The sana-ray/gpu label of the node each rank ran on, as the cluster reports its nodes."""
    from ray.util.state import list_nodes

    labels = {n.node_id: n.labels for n in list_nodes(address=cluster.dashboard, detail=True)}
    return [labels[node].get(LABEL, "<none>") for node in run.rank_nodes]


def _losses(outcome: dict) -> list[float]:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(outcome["mlflow_tracking_uri"]).get_metric_history(outcome["mlflow_run_id"], "loss")
    by_step = {m.step: m.value for m in history}
    assert sorted(by_step) == list(range(1, STEPS + 1))
    return [by_step[s] for s in range(1, STEPS + 1)]


def _safetensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, folder
    weights = {}
    for file in files:
        weights |= load_file(str(file))
    return weights


def _exported(outcome: dict) -> dict:
    """The transformer weights of the run's diffusers export."""
    return _safetensors(Path(outcome["export_path"]) / "transformer")


def _initial(workdir: Path) -> dict:
    """The tiny model's initial transformer weights (the base model every run started from)."""
    from sana_ray.model.loading import resolve_pretrained

    return _safetensors(Path(resolve_pretrained("tiny", workdir / "cache")) / "transformer")


@pytest.fixture(scope="module")
def one_node(cluster, workdir, shapes) -> Run:
    """The reference: DDP, both workers on the rtx4090 node."""
    run = _apply(cluster, workdir, shapes, "one-node", pools=[_pool("rtx4090", 2)])
    assert run.rank_nodes == [cluster.node_ids["rtx4090"]] * 2
    assert _rank_gpus(cluster, run) == ["rtx4090", "rtx4090"]
    return run


def test_ddp_on_two_nodes_matches_one_node(cluster, workdir, shapes, one_node):
    import torch

    run = _apply(cluster, workdir, shapes, "ddp-two-nodes", pools=[_pool("rtx4090", 1), _pool("l40s", 1)])

    # One worker on each node, pool by pool: rank 0 (pool rtx4090) on the rtx4090 node, rank 1 on the
    # l40s one. (Without label selectors Ray Train packs both workers onto one 2-CPU node.)
    assert run.rank_nodes == [cluster.node_ids["rtx4090"], cluster.node_ids["l40s"]]
    assert _rank_gpus(cluster, run) == ["rtx4090", "l40s"]

    # The data and noise of each step are a function of (seed, rank, micro-batch), and a 2-rank
    # all-reduce is a + b on either node: the same losses and weights, wherever the ranks ran.
    assert _losses(run.outcome) == pytest.approx(_losses(one_node.outcome), rel=1e-5)
    assert run.outcome["final_loss"] == pytest.approx(one_node.outcome["final_loss"], rel=1e-5)
    reference, weights = _exported(one_node.outcome), _exported(run.outcome)
    assert weights.keys() == reference.keys()
    for name, value in weights.items():
        torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-7, msg=name)
    # ... and it trained: the weights moved from the tiny model's initial ones.
    initial = _initial(workdir)
    assert initial.keys() == reference.keys()
    assert any(not torch.equal(value, reference[name]) for name, value in initial.items())


def test_zero2_on_two_nodes_matches_ddp(cluster, workdir, shapes, one_node):
    import torch

    run = _apply(cluster, workdir, shapes, "zero2-two-nodes", pools=[_pool("rtx4090", 1), _pool("l40s", 1)],
                 strategy="deepspeed", deepspeed={"stage": 2})
    assert run.rank_nodes == [cluster.node_ids["rtx4090"], cluster.node_ids["l40s"]]
    assert _rank_gpus(cluster, run) == ["rtx4090", "l40s"]

    # ZeRO-2 computes the same fp32 step with other reductions (bucketed reduce-scatter of flat
    # gradients, a gradient norm summed from per-rank partitions) and AdamW over flat partitions:
    # rounding differences of ~1e-7 relative per step. Adam divides by sqrt(v), which enlarges
    # them only for elements whose gradient is ~eps, and each step moves a weight by at most
    # ~lr = 1e-3. So: losses within 1e-4 relative; weights within 1e-4 relative per tensor
    # (norm of the difference over the norm of the DDP weights), and no element further than
    # one step of lr away. Measured (8 steps): losses equal to 1e-7 relative, weights at most
    # 7.7e-6 relative per tensor and 2e-6 absolute.
    assert _losses(run.outcome) == pytest.approx(_losses(one_node.outcome), rel=1e-4)
    reference, weights = _exported(one_node.outcome), _exported(run.outcome)
    assert weights.keys() == reference.keys()
    for name, value in weights.items():
        expected = reference[name]
        assert value.dtype == expected.dtype == torch.float32, name
        difference = (value - expected).norm() / expected.norm().clamp_min(1e-12)
        assert difference < 1e-4, (name, float(difference))
        assert (value - expected).abs().max() <= 1e-3, name
