"""The cluster definitions in clusters/: they parse, and the fields a run depends on are right."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from sana_ray.hardware import nccl_env
from sana_ray.manifest import load_manifest
from sana_ray.plan import make_plan

REPO = Path(__file__).resolve().parents[2]
CLUSTERS = REPO / "clusters"
GROUPS = {"rtx4090", "a6000", "l40s"}


def load_all(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, path
    return docs


def test_every_cluster_file_parses():
    files = sorted(CLUSTERS.rglob("*.yaml"))
    assert {f.relative_to(CLUSTERS).as_posix() for f in files} >= {
        "onprem.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/storage.yaml",
        "manifests/sana-600m-1024-mixed.yaml",
    }
    for f in files:
        load_all(f)


# --------------------------------------------------------------------------------------
# On-prem: Ray cluster launcher with the local provider
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onprem() -> dict:
    (doc,) = load_all(CLUSTERS / "onprem.yaml")
    return doc


def test_onprem_launcher_file(onprem):
    provider = onprem["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and len(provider["worker_ips"]) >= 1
    assert onprem["min_workers"] == onprem["max_workers"] == len(provider["worker_ips"])
    assert any("pip install" in c and "sana-ray" in c for c in onprem["setup_commands"])
    assert onprem["file_mounts"]["~/.ray/auth_token"]  # the same token on every node
    head = " ".join(onprem["head_start_ray_commands"])
    assert "ray start --head" in head and f"--node-ip-address={provider['head_ip']}" in head
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    worker = " ".join(onprem["worker_start_ray_commands"])
    assert "--address=$RAY_HEAD_IP:6379" in worker and "--node-ip-address=$NODE_IP" in worker
    assert "RAY_AUTH_MODE=token" in worker


@pytest.mark.parametrize("gpu, count, profile", [("NVIDIA GeForce RTX 4090", 4, "rtx4090"),
                                                 ("NVIDIA L40S", 4, "l40s"), ("NVIDIA RTX A6000", 2, "a6000"),
                                                 (None, 0, "cpu")])
def test_onprem_worker_start_labels_the_node_by_its_gpu(onprem, tmp_path, gpu, count, profile):
    # Run the real start command with stand-ins for nvidia-smi, ip and ray that record what they got.
    bin_dir = tmp_path / "bin"
    ray_dir = tmp_path / "sana-ray-venv" / "bin"
    bin_dir.mkdir()
    ray_dir.mkdir(parents=True)
    listing = "".join(f"GPU {i}: {gpu} (UUID: x)\\n" for i in range(count)) if gpu else ""
    stubs = {
        bin_dir / "nvidia-smi": (f'case "$1" in -L) printf "{listing}";; *) printf "{gpu}\\n";; esac'
                                 if gpu else "exit 9"),
        bin_dir / "ip": 'echo "10.0.0.10 dev eth0 src 10.0.0.11 uid 1000"',
        ray_dir / "ray": f'printf "%s\\n" "$@" >> {tmp_path}/ray-args',
    }
    for path, body in stubs.items():
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "RAY_HEAD_IP": "10.0.0.10"}
    for command in onprem["worker_start_ray_commands"]:
        result = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
    args = (tmp_path / "ray-args").read_text().splitlines()
    assert args[0] == "stop" and args[1] == "start"
    assert "--address=10.0.0.10:6379" in args and "--node-ip-address=10.0.0.11" in args
    assert f"--labels=sana-ray/gpu={profile}" in args
    resources = [a for a in args if a.startswith("--resources=")]
    assert resources == ([f'--resources={{"{profile}":{count}}}'] if count else [])


# --------------------------------------------------------------------------------------
# KubeRay
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raycluster() -> dict:
    (doc,) = load_all(CLUSTERS / "kuberay" / "raycluster.yaml")
    return doc


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_raycluster_worker_groups(raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1" and raycluster["kind"] == "RayCluster"
    groups = {g["groupName"]: g for g in raycluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == GROUPS
    storage = load_all(CLUSTERS / "kuberay" / "storage.yaml")
    claims = {d["metadata"]["name"] for d in storage if d["kind"] == "PersistentVolumeClaim"}
    for name, group in groups.items():
        # The Ray node label and custom resource the manifest selects with, and the GPU count they promise.
        assert group["rayStartParams"]["labels"] == f"sana-ray/gpu={name}"
        resources = yaml.safe_load(yaml.safe_load(group["rayStartParams"]["resources"]))  # KubeRay's quoted JSON
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert resources == {name: gpus} and container["resources"]["requests"]["nvidia.com/gpu"] == gpus
        assert pod["nodeSelector"]["nvidia.com/gpu.product"]
        assert group["template"]["metadata"]["labels"]["sana-ray/gpu"] == name
        # The NCCL variables are exactly what sana-ray derives for this profile over Ethernet.
        env = env_of(container)
        nccl = {k: v for k, v in env.items() if k.startswith("NCCL_")}
        assert nccl == {k: v for k, v in nccl_env([name], "ethernet-25g", "eth0").items() if k.startswith("NCCL_")}
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"]["secretKeyRef"]["name"] == "sana-ray-auth"
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert mounts["shared"] == "/mnt/shared" and volumes["shared"]["persistentVolumeClaim"]["claimName"] in claims
        assert mounts["dshm"] == "/dev/shm" and volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert groups["rtx4090"]["template"]["spec"]["containers"][0]["env"][0] == {"name": "NCCL_P2P_DISABLE", "value": "1"}
    head = raycluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert env_of(head["template"]["spec"]["containers"][0])["RAY_AUTH_MODE"] == "token"


def test_rayjob_runs_sana_ray_apply_on_the_same_cluster(raycluster):
    (job,) = load_all(CLUSTERS / "kuberay" / "rayjob.yaml")
    assert job["kind"] == "RayJob"
    entrypoint = job["spec"]["entrypoint"].split()
    assert entrypoint[:2] == ["sana-ray", "apply"] and entrypoint[2].startswith("/mnt/shared/")
    assert "hardware.ray_address=auto" in entrypoint  # join the RayJob's cluster, do not start a local one
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["rayClusterSpec"] == raycluster["spec"], "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml"
    (submitter,) = job["spec"]["submitterPodTemplate"]["spec"]["containers"]
    assert env_of(submitter)["RAY_AUTH_MODE"] == "token"


def test_example_manifest_matches_the_clusters_and_fits(raycluster):
    manifest = load_manifest(CLUSTERS / "manifests" / "sana-600m-1024-mixed.yaml", [])
    hw = manifest.spec.hardware
    assert hw.ray_address == "auto" and hw.num_workers == 12 and hw.use_gpu
    labels = {p.labels["sana-ray/gpu"] for p in hw.nodes}
    groups = {g["groupName"] for g in raycluster["spec"]["workerGroupSpecs"]}
    assert labels <= groups
    assert {p.profile for p in hw.nodes} == labels
    assert str(manifest.spec.output.dir).startswith("/mnt/shared")
    plan = make_plan(manifest)
    assert plan.chosen.fits and plan.chosen.comm_fraction <= plan.max_comm_fraction


def test_cluster_files_hold_no_secrets():
    # Tokens come from ~/.ray/auth_token (on-prem) or the sana-ray-auth Secret (KubeRay), never a file here.
    for f in CLUSTERS.rglob("*"):
        if f.is_file():
            text = f.read_text()
            assert "PRIVATE KEY" not in text and not re.search(r"\b[0-9a-f]{64}\b", text), f
