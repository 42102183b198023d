"""Devices that are not here: compile-only H100/H200/B200 GPUs and TPU pod slices, for `omni compile --target`.

    target = resolve("h100")             # or "h200", "b200", a GpuTargetConfigProto file, "v5p-8", "v6e-256", ...
    devices = target.devices(slices=1)   # jax devices XLA compiles for; nothing can run on them

A GPU target is a `GpuTargetConfigProto` in text form (the shipped ones are in gpu_targets/, each naming its
source); jax-cuda12-plugin turns it into compile-only devices of that kind. A TPU target is a pod slice name as
Cloud TPU and MaxText spell it (v4-N and v5p-N count TensorCores, two per chip; v5e-N and v6e-N count chips);
libtpu builds its topology. Both need their plugin installed (the `aot-gpu` / `aot-tpu` extras); without it
the error names the extra. The figures a report compares against (memory, peak FLOP/s, bandwidth) are in
`Target`; GPU ones come from the target file, TPU ones from Google's published per-chip figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import os
import re

from omni import storage
from omni.errors import ConfigError

GPU_TARGETS = {"h100": "h100_sxm.txtpb", "h200": "h200_sxm.txtpb", "b200": "b200.txtpb"}
# Dense bf16 matmul peak per GPU, FLOP/s (NVIDIA datasheets, SXM parts), by compute capability major + memory.
GPU_PEAK_BF16 = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA B200": 2250e12}

# Per chip: HBM bytes, dense bf16 FLOP/s, HBM bytes/s (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e).
TPU_CHIPS = {
    "v4": {"hbm": 32 * 2**30, "peak": 275e12, "bandwidth": 1228e9, "family": "v4", "cores_per_chip": 2},
    "v5e": {"hbm": 16 * 2**30, "peak": 197e12, "bandwidth": 819e9, "family": "v5e", "cores_per_chip": 1},
    "v5p": {"hbm": 95 * 2**30, "peak": 459e12, "bandwidth": 2765e9, "family": "v5", "cores_per_chip": 2},
    "v6e": {"hbm": 32 * 2**30, "peak": 918e12, "bandwidth": 1640e9, "family": "v6e", "cores_per_chip": 1},
}
# Chip grids of the slice sizes Cloud TPU sells (as MaxText's accelerator_to_spec_map.py lists them): 3-D for
# v4/v5p (a full 4x4x4 cube and larger wrap around into a torus), 2-D for v5e/v6e (16x16 wraps both ways).
TPU_GRIDS_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
                256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
TPU_GRIDS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}

EXTRAS = {"gpu": "pip install -e '.[aot-gpu]' (jax[cuda12]: the CUDA plugin, cuDNN and ptxas, about 5.7 GB)",
          "tpu": "pip install -e '.[aot-tpu]' (jax[tpu]: libtpu, about 1.3 GB)"}


@dataclasses.dataclass(frozen=True)
class Target:
    """What a target is and the figures a compile report compares against, per device."""
    name: str                 # as the user wrote it: h100, v5p-8, a file path
    platform: str             # "gpu" or "tpu"
    kind: str                 # the device kind XLA reports: "NVIDIA H100 80GB HBM3", "TPU v5"
    memory_bytes: int         # device memory (HBM) of one device
    peak_flops: float | None  # dense bf16 matmul FLOP/s of one device (datasheet)
    bandwidth: float          # HBM bytes/s of one device
    devices_per_slice: int    # GPUs on the host (--devices) or TPU chips in the slice
    compute_capability: str | None = None  # GPUs: "9.0"
    source: str = ""          # where the description came from
    config_text: str = ""     # GPUs: the GpuTargetConfigProto text
    topology: dict = dataclasses.field(default_factory=dict)  # TPUs: get_topology_desc arguments

    def devices(self, slices: int = 1) -> list:
        """The compile-only jax devices: devices_per_slice x slices of them."""
        prepare_environment()
        if slices < 1:
            raise ConfigError(f"--slices must be >= 1; got {slices}")
        from jax.experimental import topologies

        if self.platform == "gpu":
            require("gpu")
            if slices != 1:
                raise ConfigError("--slices is for TPU multislice; for several GPU hosts compile one host's "
                                  "--devices (the data-parallel copies across hosts run the same program)")
            desc = topologies.get_topology_desc(platform="cuda", target_config=self.config_text,
                                                topology=f"1x1x{self.devices_per_slice}")
            return list(desc.devices)
        require("tpu")
        desc = topologies.get_topology_desc(platform="tpu", num_slices=slices, **self.topology)
        return list(desc.devices)


def prepare_environment() -> None:
    """Before jax starts its backends: the CUDA plugin would call cuInit (no GPU here: an error and a traceback)
    and libtpu would ask a TPU VM's metadata server; neither is needed to compile for a described device."""
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


def require(family: str) -> None:
    """ConfigError naming the extra to install unless the plugin for `family` ("gpu", "tpu") is importable."""
    module = {"gpu": "jax_cuda12_plugin", "tpu": "libtpu"}[family]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"compiling for a {family.upper()} target needs {module}, which is not installed: "
                          f"{EXTRAS[family]}")


def installed() -> list[str]:
    """The target families whose compiler plugin is installed here."""
    return [f for f, m in (("gpu", "jax_cuda12_plugin"), ("tpu", "libtpu")) if importlib.util.find_spec(m)]


def resolve(name: str, gpus: int = 1) -> Target:
    """A target from its name (module docstring); `gpus` devices for a GPU target (one host's GPUs)."""
    text = str(name).strip()
    key = text.lower()
    if key in GPU_TARGETS:
        return gpu_target(_shipped(GPU_TARGETS[key]), key, gpus, f"omni/tools/gpu_targets/{GPU_TARGETS[key]}")
    match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", key)
    if match:
        return tpu_target(match.group(1).replace("v5litepod", "v5e"), int(match.group(2)), text)
    if key.endswith((".txtpb", ".pbtxt", ".textproto")) or "/" in key:
        location = storage.path(text)
        if not location.exists():
            raise ConfigError(f"--target {text}: no such file (a GpuTargetConfigProto text file, e.g. what "
                              "XLA_FLAGS=--xla_dump_to=DIR writes as *.gpu_target_config.pbtxt)")
        return gpu_target(location.read_text(), text, gpus, str(location))
    raise ConfigError(f"--target {text!r} is not a target: use one of {', '.join(GPU_TARGETS)}, a TPU slice "
                      "(v4-8, v5p-8 ... v5p-4096, v5e-1 ... v5e-256, v6e-1 ... v6e-256) or a "
                      "GpuTargetConfigProto text file")


@functools.cache
def _shipped(filename: str) -> str:
    return storage.path(__file__).parent.joinpath("gpu_targets", filename).read_text()


def gpu_target(config_text: str, name: str, gpus: int, source: str) -> Target:
    if gpus < 1:
        raise ConfigError(f"--devices must be >= 1; got {gpus}")

    def field(key, cast=int):
        m = re.search(rf"\b{key}\s*:\s*([0-9.]+)", config_text)
        if not m:
            raise ConfigError(f"--target {name}: the target description has no {key} (is it a "
                              "GpuTargetConfigProto in text form?)")
        return cast(m.group(1))

    kind = re.search(r'device_description_str\s*:\s*"([^"]*)"', config_text)
    kind = kind.group(1) if kind else "GPU"
    cc = re.search(r"cuda_compute_capability\s*\{\s*major\s*:\s*(\d+)(?:\s*minor\s*:\s*(\d+))?", config_text)
    capability = f"{cc.group(1)}.{cc.group(2) or 0}" if cc else None
    peak = next((p for prefix, p in GPU_PEAK_BF16.items() if kind.startswith(prefix)), None)
    return Target(name=name, platform="gpu", kind=kind, memory_bytes=field("device_memory_size"), peak_flops=peak,
                  bandwidth=field("memory_bandwidth", float), devices_per_slice=gpus, compute_capability=capability,
                  source=source, config_text=config_text)


def tpu_target(version: str, count: int, name: str) -> Target:
    chip = TPU_CHIPS[version]
    chips, rest = divmod(count, chip["cores_per_chip"])
    grids = TPU_GRIDS_3D if chip["cores_per_chip"] == 2 else TPU_GRIDS_2D
    if rest or chips not in grids:
        unit = "TensorCores (2 per chip)" if chip["cores_per_chip"] == 2 else "chips"
        sizes = ", ".join(f"{version}-{n * chip['cores_per_chip']}" for n in grids)
        raise ConfigError(f"--target {name}: {version} slices count {unit}; the sizes known here are {sizes}")
    grid = grids[chips]
    if len(grid) == 3:
        wrap = (True, True, True) if min(grid) >= 4 else (False, False, False)
        topology = {"topology_name": f"{chip['family']}:{'x'.join(map(str, grid))}", "chip_config_name": "megacore",
                    "chips_per_host_bounds": (2, 2, 1), "wrap": wrap}
    else:
        wrap = (grid[0] >= 16, grid[1] >= 16, False)
        bounds = (1, 1, 1) if chips == 1 else (2, 2, 1)
        topology = {"topology_name": f"{chip['family']}:{'x'.join(map(str, grid))}", "chip_config_name": "default",
                    "chips_per_host_bounds": bounds, "wrap": wrap}
    return Target(name=name, platform="tpu", kind=f"TPU {version}", memory_bytes=chip["hbm"], peak_flops=chip["peak"],
                  bandwidth=chip["bandwidth"], devices_per_slice=chips, source="Cloud TPU per-chip figures; "
                  f"topology {topology['topology_name']}", topology=topology)



@contextlib.contextmanager
def cudnn_answers_for(target: Target):
    """While lowering for a compile-only GPU: jax's cuDNN attention asks the *local* GPU for its compute
    capability (fused_attention_stablehlo.check_compute_capability / is_cuda_compute_capability_equal), and
    this host has none, so packed flash attention would raise "requires Hopper". Inside this block they answer
    from the target instead. A no-op for TPU targets."""
    if target.platform != "gpu" or target.compute_capability is None:
        yield
        return
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    have = tuple(int(x) for x in target.compute_capability.split("."))
    saved = cudnn.check_compute_capability, cudnn.is_cuda_compute_capability_equal

    def at_least(capability):
        return have >= tuple(int(x) for x in capability.split("."))

    def equal(capability):
        return have == tuple(int(x) for x in capability.split("."))

    cudnn.check_compute_capability, cudnn.is_cuda_compute_capability_equal = at_least, equal
    try:
        yield
    finally:
        cudnn.check_compute_capability, cudnn.is_cuda_compute_capability_equal = saved
