"""Hardware profiles: what a GPU (or a CPU worker) and the links between nodes can do.

Pure data and arithmetic (standard library only): the manifest schema, ``sana-ray plan`` and the
trainer's NCCL environment all read from here, and none of them may pull in torch or Ray.

Spec-sheet figures (memory, dense bf16 tensor throughput, NVLink / PCIe bandwidth) are cited in
docs/hardware.md. Figures marked *assumed* (link efficiency, the bandwidth a GPU without
peer-to-peer gets through host memory) are ours: check them against your own measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
GB = 1e9

# Share of a link's line rate that NCCL's ring all-reduce achieves as bus bandwidth (assumed;
# nccl-tests typically report 75-90% on NVLink, InfiniBand and well-tuned Ethernet).
LINK_EFFICIENCY = 0.8
# Without peer-to-peer (GeForce cards), NCCL stages GPU-to-GPU copies through host memory
# (its SHM transport): every byte crosses PCIe twice. Assumed to halve the bandwidth.
NO_P2P_FACTOR = 0.5
# Share of GPU memory a run may use: the CUDA context, NCCL buffers, cuBLAS workspaces and the
# caching allocator's fragmentation take the rest (assumed).
USABLE_MEMORY_FRACTION = 0.92


@dataclass(frozen=True)
class Profile:
    """One accelerator (or a CPU worker) as ``sana-ray plan`` and the launcher see it."""

    name: str
    description: str
    gpu: bool
    memory_mib: int  # per device, as nvidia-smi reports it (ECC reservation included where on by default)
    bf16_tflops: float  # dense tensor-core bf16 (fp32 accumulate), no sparsity
    fp32_tflops: float  # non-tensor fp32 (what torch uses without TF32)
    p2p: bool  # GPU peer-to-peer over PCIe/NVLink works (NCCL_P2P_DISABLE=1 otherwise)
    nvlink_gbs: float  # NVLink bandwidth per GPU, both directions together, GB/s (0: none)
    pcie_gbs: float  # PCIe x16 bandwidth per direction, GB/s
    typical_interconnect: str  # what nodes of this kind usually have between them (INTERCONNECTS)
    memory_gbs: float  # device memory bandwidth, GB/s (datasheet): what the optimizer step is bound by
    notes: str = ""

    @property
    def memory_gib(self) -> float:
        return self.memory_mib / 1024

    @property
    def usable_memory_bytes(self) -> float:
        return self.memory_mib * 2**20 * USABLE_MEMORY_FRACTION

    def intra_node_bandwidth(self) -> float:
        """Effective ring all-reduce bus bandwidth between GPUs of one node, bytes/s."""
        if self.nvlink_gbs:
            return self.nvlink_gbs / 2 * GB * LINK_EFFICIENCY  # one direction of the link
        factor = 1.0 if self.p2p else NO_P2P_FACTOR
        return self.pcie_gbs * GB * LINK_EFFICIENCY * factor

    def tflops(self, precision: str) -> float:
        return self.fp32_tflops if precision == "fp32" else self.bf16_tflops  # fp16 runs at the bf16 rate


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("rtx4090", "NVIDIA GeForce RTX 4090 (Ada, 24 GB GDDR6X)", True, 24564, 165.2, 82.6, False, 0, 31.5,
                "ethernet-10g", 1008, "consumer card: no NVLink, P2P disabled by the driver (NCCL hangs without NCCL_P2P_DISABLE=1)"),
        Profile("a6000", "NVIDIA RTX A6000 (Ampere, 48 GB GDDR6)", True, 49140, 154.8, 38.7, True, 0, 31.5,
                "ethernet-25g", 768, "an NVLink bridge joins pairs only (112.5 GB/s); planned as PCIe"),
        Profile("l40s", "NVIDIA L40S (Ada, 48 GB GDDR6)", True, 46068, 362.05, 91.6, True, 0, 31.5,
                "ethernet-100g", 864, "no NVLink; PCIe Gen4 x16; ECC on by default: 46,068 MiB of 48 GB usable"),
        Profile("a100-40g", "NVIDIA A100 SXM4 40 GB (Ampere, HBM2)", True, 40960, 312, 19.5, True, 600, 31.5,
                "infiniband-hdr", 1555, "NVLink 3 (600 GB/s) within a node"),
        Profile("a100-80g", "NVIDIA A100 SXM4 80 GB (Ampere, HBM2e)", True, 81920, 312, 19.5, True, 600, 31.5,
                "infiniband-hdr", 2039, "NVLink 3 (600 GB/s) within a node"),
        Profile("h100", "NVIDIA H100 SXM5 80 GB (Hopper, HBM3)", True, 81559, 989.4, 67.0, True, 900, 63,
                "infiniband-ndr", 3350, "NVLink 4 (900 GB/s) within a node; PCIe Gen5"),
        Profile("h200", "NVIDIA H200 SXM 141 GB (Hopper, HBM3e)", True, 143771, 989.4, 67.0, True, 900, 63,
                "infiniband-ndr", 4800, "the H100's compute with 141 GB at 4.8 TB/s; NVLink 4 within a node; PCIe Gen5"),
        Profile("cpu", "CPU worker (gloo; figures are rough assumptions)", False, 65536, 1.0, 1.0, True, 0, 10,
                "ethernet-10g", 50, "memory = host RAM assumed per worker; throughput assumed ~1 TFLOPS"),
    )
}


@dataclass(frozen=True)
class Interconnect:
    """A link between nodes: line rate per node and whether NCCL can use InfiniBand/RoCE verbs on it."""

    name: str
    gbit_s: float
    infiniband: bool

    @property
    def bandwidth(self) -> float:
        """Effective bus bandwidth for NCCL, bytes/s."""
        return self.gbit_s / 8 * GB * LINK_EFFICIENCY


INTERCONNECTS: dict[str, Interconnect] = {
    i.name: i
    for i in (
        Interconnect("ethernet-1g", 1, False),
        Interconnect("ethernet-10g", 10, False),
        Interconnect("ethernet-25g", 25, False),
        Interconnect("ethernet-40g", 40, False),
        Interconnect("ethernet-100g", 100, False),
        Interconnect("ethernet-200g", 200, False),
        Interconnect("ethernet-400g", 400, False),
        Interconnect("infiniband-edr", 100, True),
        Interconnect("infiniband-hdr", 200, True),
        Interconnect("infiniband-ndr", 400, True),
        Interconnect("roce-100g", 100, True),
        Interconnect("roce-200g", 200, True),
        Interconnect("roce-400g", 400, True),
    )
}


def interconnect(name: str, gbit_s: float | None = None) -> Interconnect:
    """The named link, with its line rate replaced by ``gbit_s`` when given (e.g. 8 NICs per node)."""
    link = INTERCONNECTS[name]
    return Interconnect(link.name, gbit_s, link.infiniband) if gbit_s else link


def nccl_env(profiles: list[str], link: str | None, socket_ifname: str | None = None,
             extra: dict[str, str] | None = None) -> dict[str, str]:
    """NCCL variables for every training worker (one environment for the whole worker group).

    * ``NCCL_P2P_DISABLE=1`` when any GPU in the run lacks peer-to-peer (RTX 4090: NCCL's P2P
      transport hangs or corrupts data on GeForce cards whose driver disables P2P);
    * ``NCCL_IB_DISABLE=1`` when the nodes are not joined by InfiniBand/RoCE, so NCCL does not
      probe for verbs devices and uses sockets;
    * ``NCCL_SOCKET_IFNAME`` when given (the interface that carries inter-node traffic);
    * ``extra`` (the manifest's ``hardware.nccl_env``) last, so a user can override any of these.
    """
    env: dict[str, str] = {}
    chosen = [PROFILES[p] for p in profiles]
    if any(p.gpu and not p.p2p for p in chosen):
        env["NCCL_P2P_DISABLE"] = "1"
    gpu = any(p.gpu for p in chosen)
    if gpu and link is not None and not INTERCONNECTS[link].infiniband:
        env["NCCL_IB_DISABLE"] = "1"
    if socket_ifname:
        env["NCCL_SOCKET_IFNAME"] = socket_ifname
        env.setdefault("GLOO_SOCKET_IFNAME", socket_ifname)
    env.update(extra or {})
    return env
