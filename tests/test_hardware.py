"""Hardware profiles, the manifest's hardware section, and what reaches the Ray workers."""

from __future__ import annotations

from pathlib import Path

import pytest

from sana_ray.hardware import INTERCONNECTS, PROFILES, nccl_env
from sana_ray.launch.ray_cluster import RAY_ENV, worker_env, worker_label_selectors
from sana_ray.manifest import ManifestError, load_manifest

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "manifests" / "quickstart.yaml"
SANA_1600M = REPO / "manifests" / "sana-1600m-1024.yaml"


def test_profiles_cover_the_cards_users_train_on():
    assert {"rtx4090", "a6000", "l40s", "a100-40g", "a100-80g", "h100", "cpu"} <= set(PROFILES)
    # The figures the planner's decisions hinge on (spec sheets, docs/hardware.md).
    # Memory as nvidia-smi reports it: the L40S keeps ECC on, so 46,068 MiB of its 48 GB are usable.
    assert PROFILES["rtx4090"].memory_mib == 24564 and not PROFILES["rtx4090"].p2p
    assert PROFILES["l40s"].memory_mib == 46068 and PROFILES["a6000"].memory_mib == 49140
    assert PROFILES["l40s"].bf16_tflops > PROFILES["rtx4090"].bf16_tflops > PROFILES["a6000"].bf16_tflops
    assert PROFILES["h100"].nvlink_gbs == 900 and PROFILES["a100-80g"].nvlink_gbs == 600
    assert PROFILES["l40s"].nvlink_gbs == PROFILES["rtx4090"].nvlink_gbs == 0
    for profile in PROFILES.values():
        assert profile.typical_interconnect in INTERCONNECTS
        assert profile.intra_node_bandwidth() > 0
    # Without P2P, traffic goes through host memory: half of a P2P card on the same PCIe link.
    assert PROFILES["rtx4090"].intra_node_bandwidth() == pytest.approx(PROFILES["l40s"].intra_node_bandwidth() / 2)


def test_nccl_env_per_profile_and_link():
    assert nccl_env(["rtx4090"], None) == {"NCCL_P2P_DISABLE": "1"}
    assert nccl_env(["l40s"], "ethernet-100g") == {"NCCL_IB_DISABLE": "1"}
    assert nccl_env(["h100"], "infiniband-ndr") == {}
    env = nccl_env(["a6000"], "ethernet-25g", "enp1s0", {"NCCL_DEBUG": "INFO", "NCCL_IB_DISABLE": "0"})
    assert env == {"NCCL_IB_DISABLE": "0", "NCCL_SOCKET_IFNAME": "enp1s0", "GLOO_SOCKET_IFNAME": "enp1s0",
                   "NCCL_DEBUG": "INFO"}  # the user's nccl_env wins
    assert nccl_env(["cpu"], "ethernet-10g") == {}  # gloo: NCCL variables mean nothing


BARE = """\
apiVersion: sana-ray/v1
kind: TrainingRun
metadata: {name: hw}
spec:
  model: {pretrained: tiny}
  datasets: [{name: shapes, path: data/shapes, resolution: 64}]
  training: {steps: 1}
"""


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hw") / "bare.yaml"
    path.write_text(BARE)
    return path


def hardware(bare: Path, *overrides: str):
    """The hardware section of a manifest that says nothing about hardware, plus ``overrides``."""
    return load_manifest(bare, list(overrides)).spec.hardware


def test_existing_manifests_keep_their_meaning(bare):
    assert (hardware(bare).num_workers, hardware(bare).use_gpu) == (1, False)  # the defaults
    hw = load_manifest(QUICKSTART, []).spec.hardware
    assert (hw.num_workers, hw.use_gpu, hw.profile, hw.nodes) == (2, False, None, [])
    assert worker_env(hw) == RAY_ENV and worker_label_selectors(hw) is None
    hw = load_manifest(SANA_1600M, []).spec.hardware
    assert (hw.num_workers, hw.use_gpu) == (4, True)
    assert worker_env(hw) == RAY_ENV  # no profile: NCCL left to its defaults


def test_node_pools_set_num_workers_use_gpu_env_and_placement(bare):
    hw = hardware(
        bare,
        "hardware.nodes=[{name: r4090, count: 2, gpus_per_node: 4, profile: rtx4090, labels: {sana-ray/gpu: rtx4090}},"
        " {name: big, gpus_per_node: 2, profile: l40s, labels: {sana-ray/gpu: l40s}}]",
        "hardware.interconnect=ethernet-25g", "hardware.nccl_socket_ifname=eth0",
        "hardware.nccl_env={NCCL_DEBUG: WARN}", "hardware.worker_resources={sana-node: 1}",
    )
    assert hw.num_workers == 10 and hw.use_gpu  # 2 x 4 + 1 x 2, derived; GPUs implied by the profiles
    env = worker_env(hw)
    assert {k: env[k] for k in RAY_ENV} == RAY_ENV
    assert env["NCCL_P2P_DISABLE"] == "1" and env["NCCL_IB_DISABLE"] == "1"
    assert env["NCCL_SOCKET_IFNAME"] == "eth0" and env["NCCL_DEBUG"] == "WARN"
    assert worker_label_selectors(hw) == [{"sana-ray/gpu": "rtx4090"}] * 8 + [{"sana-ray/gpu": "l40s"}] * 2
    assert hw.worker_resources == {"sana-node": 1.0}


def test_single_profile_implies_gpu(bare):
    hw = hardware(bare, "hardware.profile=l40s", "hardware.num_workers=4")
    assert hw.use_gpu and worker_env(hw) == RAY_ENV  # one L40S node: P2P works, no link declared
    assert not hardware(bare, "hardware.profile=cpu").use_gpu


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["hardware.num_workers=3", "hardware.nodes=[{name: a, count: 2, gpus_per_node: 4, profile: rtx4090}]"],
         "num_workers is 3 but the node pools hold 2x4 = 8 GPUs"),
        (["hardware.nodes=[{name: a, gpus_per_node: 4}]"], "nodes.0.profile is not set"),
        (["hardware.nodes=[{name: a, profile: l40s}, {name: a, profile: l40s}]"], "pool names must be unique"),
        (["hardware.profile=rtx4090", "hardware.use_gpu=false"], "use_gpu is false but profile 'rtx4090' is a GPU"),
        (["hardware.profile=cpu", "hardware.use_gpu=true"], "profile 'cpu' has no GPU"),
        (["hardware.profile=rtx4080"], "did you mean 'rtx4090'"),
        (["hardware.interconnect=10gbe"], "ethernet-10g"),
        (["hardware.nccl_env={DEBUG: INFO}"], "NCCL_* variables"), (["hardware.nccl_env={DEBUG: INFO}"], "not: DEBUG"),
        (["hardware.nodes=[{name: a, profile: l40s, labels: {ray.io/node-id: x}}]"], "reserved"),
        (["hardware.nodes=[{name: a, profile: l40s, labels: {gpu: 'L40S GPU'}}]"], "value 'L40S GPU'"),
    ],
)
def test_bad_hardware_is_a_clear_error_naming_the_field(bare, overrides, message):
    with pytest.raises(ManifestError) as error:
        hardware(bare, *overrides)
    text = str(error.value)
    assert message in text and "spec.hardware" in text
