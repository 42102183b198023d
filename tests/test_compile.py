"""`omni compile --target`: programs compiled for GPUs and TPUs that are not here.

The target descriptions, HLO reading and the report's arithmetic run everywhere. The compiles themselves need
the compiler plugins (`.[aot-gpu]`: jax[cuda12]; `.[aot-tpu]`: jax[tpu]); without them those tests skip and
say which extra to install. CI installs both into a second virtualenv and runs this file there."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import tiny_config
from omni.config import ConfigError
from omni.tools import compile as compile_tool
from omni.tools import targets
from omni.train import perf

HAS_GPU_PLUGIN = importlib.util.find_spec("jax_cuda12_plugin") is not None
HAS_TPU_PLUGIN = importlib.util.find_spec("libtpu") is not None
needs_gpu = pytest.mark.skipif(not HAS_GPU_PLUGIN, reason="the GPU compiler plugin is not installed: "
                               "pip install -e '.[aot-gpu]'")
needs_tpu = pytest.mark.skipif(not HAS_TPU_PLUGIN, reason="the TPU compiler (libtpu) is not installed: "
                               "pip install -e '.[aot-tpu]'")


def small_config(dtype="bfloat16", **mesh):
    cfg = tiny_config(**mesh)
    cfg.model.dtype = dtype
    cfg.model.d, cfg.model.heads, cfg.model.kv_heads = 64, 4, 4
    cfg.data.seq_len = 256
    return cfg


# ------------------------------------------------------------------------------------------ targets


def test_shipped_gpu_targets_describe_their_devices():
    h100, h200, b200 = (targets.resolve(n) for n in ("h100", "h200", "b200"))
    assert (h100.kind, h100.memory_bytes, h100.bandwidth, h100.compute_capability) == \
        ("NVIDIA H100 80GB HBM3", 84_978_434_048, 3.35232e12, "9.0")
    assert (h200.kind, h200.memory_bytes, h200.bandwidth) == ("NVIDIA H200 141GB HBM3e", 151_397_597_184, 4.8e12)
    assert (b200.kind, b200.compute_capability, b200.memory_bytes) == ("NVIDIA B200", "10.0", 191_514_411_008)
    assert h100.peak_flops == 989e12 and b200.peak_flops == 2250e12
    assert targets.resolve("H100", gpus=8).devices_per_slice == 8


def test_tpu_slice_names_map_to_libtpu_topologies():
    v5p8 = targets.resolve("v5p-8")  # 8 TensorCores = 4 megacore chips
    assert v5p8.devices_per_slice == 4 and v5p8.topology["topology_name"] == "v5:2x2x1"
    assert v5p8.topology["chip_config_name"] == "megacore" and v5p8.memory_bytes == 95 * 2**30
    v5p128 = targets.resolve("v5p-128")
    assert v5p128.topology["topology_name"] == "v5:4x4x4" and v5p128.topology["wrap"] == (True, True, True)
    v6e = targets.resolve("v6e-256")
    assert v6e.devices_per_slice == 256 and v6e.topology["topology_name"] == "v6e:16x16"
    assert v6e.topology["wrap"] == (True, True, False)
    assert targets.resolve("v5litepod-16").topology["topology_name"] == "v5e:4x4"


@pytest.mark.parametrize("name, words", [
    ("a100x", "is not a target"),
    ("v5p-7", "v5p slices count TensorCores"),
    ("v5e-3", "the sizes known here are"),
    ("no/such/target.txtpb", "no such file"),
])
def test_a_target_that_does_not_exist_says_what_does(name, words):
    with pytest.raises(ConfigError, match=words):
        targets.resolve(name)


def test_a_target_file_is_read_and_checked(tmp_path):
    text = targets.resolve("h100").config_text.replace("NVIDIA H100 80GB HBM3", "NVIDIA H100 dumped")
    (tmp_path / "dumped.gpu_target_config.pbtxt").write_text(text)
    target = targets.resolve(str(tmp_path / "dumped.gpu_target_config.pbtxt"))
    assert target.kind == "NVIDIA H100 dumped" and target.memory_bytes == 84_978_434_048
    (tmp_path / "bad.txtpb").write_text("platform_name: \"CUDA\"\n")
    with pytest.raises(ConfigError, match="has no device_memory_size"):
        targets.resolve(str(tmp_path / "bad.txtpb"))


def test_a_missing_plugin_names_the_extra_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[aot-gpu\]'"):
        targets.resolve("h100").devices()
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[aot-tpu\]'"):
        targets.resolve("v5e-4").devices()


# ------------------------------------------------------------------------------------------ reading HLO


def test_collective_device_groups_in_every_hlo_spelling():
    assert perf.group_members("{{0,1},{2,3}}") == [[0, 1], [2, 3]]
    assert perf.group_members("[2,4]<=[8]") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert perf.group_members("[4,2]<=[2,4]T(1,0)") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert perf.group_members("mesh['a'=4,'b'=2] {'a'}") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert perf.group_members("mesh['a'=4,'b'=2] {'b'}") == [[0, 1], [2, 3], [4, 5], [6, 7]]


HLO = """HloModule m, entry_computation_layout={()->()}

%body (p: (s32[], bf16[16,128,256])) -> (s32[], bf16[16,128,256]) {
  %p = (s32[], bf16[16,128,256]) parameter(0)
  %x = bf16[16,128,256]{2,1,0} get-tuple-element(%p), index=1
  %w = bf16[256,256,1]{2,1,0} constant({...})
  %convolution.1 = bf16[16,128,256]{2,1,0} convolution(%x, %w), window={size=1}, dim_labels=0bf_io0->0bf
  %all-reduce.1 = bf16[16,128,256]{2,1,0} all-reduce(%convolution.1), replica_groups=[2,4]<=[8], to_apply=%add
  %all-gather-start = (bf16[4,256]{1,0}, bf16[16,256]{1,0}) all-gather-start(%x), replica_groups={{0,4},{1,5},{2,6},{3,7}}, dimensions={0}
  %cc = bf16[16,128,256]{2,1,0} custom-call(%x), custom_call_target="__cudnn$fmhaSoftmax"
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], bf16[16,128,256]) tuple(%i, %all-reduce.1)
}

%cond (p: (s32[], bf16[16,128,256])) -> pred[] {
  %p = (s32[], bf16[16,128,256]) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main () -> () {
  %init = (s32[], bf16[16,128,256]) parameter(0)
  %loop = (s32[], bf16[16,128,256]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %done = () tuple()
}
"""


class _Device:
    def __init__(self, i):
        self.slice_index = i // 4  # devices 0-3 in slice 0, 4-7 in slice 1


class _Mesh:
    class devices:  # noqa: N801 - stands in for Mesh.devices
        flat = [_Device(i) for i in range(8)]


def test_a_loop_without_a_known_trip_count_takes_it_from_its_counter_condition():
    """libtpu's HLO gives scans no known_trip_count: `counter < 3` in the condition says the same."""
    bare = HLO.replace(', backend_config={"known_trip_count":{"n":"3"}}', "").replace(
        "  ROOT %c = pred[] constant(true)",
        "  %n = s32[] constant(3)\n  %k = s32[] get-tuple-element(%p), index=0\n"
        "  ROOT %c = pred[] compare(%k, %n), direction=LT")
    counts = perf.hlo_step_counts(bare)
    assert counts["loops"] == [3] and counts["unknown_trip_loops"] == 0
    assert counts["flops"] == perf.hlo_step_counts(HLO)["flops"]
    data_dependent = bare.replace("compare(%k, %n), direction=LT", "compare(%k, %n), direction=NE")
    assert perf.hlo_step_counts(data_dependent)["unknown_trip_loops"] == 1


def test_convolutions_collectives_and_library_kernels_are_counted_per_executed_step():
    counts = perf.hlo_step_counts(HLO)
    assert counts["flops"] == 3 * 2 * (16 * 128 * 256) * 256  # a TPU matmul is a convolution; 3 loop trips
    assert counts["custom_calls"] == {"__cudnn$fmhaSoftmax": 3}
    found = compile_tool._collectives(counts["collectives"], _Mesh)
    reduced = 16 * 128 * 256 * 2
    # the all-reduce groups {0..3} and {4..7} stay in their slice; the all-gather pairs cross slices
    assert found["all-reduce"] == {"count": 3, "bytes": 3 * reduced, "ici_bytes": 3 * reduced, "dcn_bytes": 0.0}
    assert found["all-gather"]["dcn_bytes"] == 3 * 16 * 256 * 2 and found["all-gather"]["ici_bytes"] == 0


def test_settings_tried_when_the_step_does_not_fit_are_the_ones_that_lower_memory():
    cfg = small_config()
    cfg.model.remat = "none"
    assert compile_tool.candidate_settings(cfg, devices=8) == [
        ["model.remat=full"], ["train.grad_accum=2"], ["train.grad_accum=4"],
        ["mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1"], ["model.remat=full", "train.grad_accum=2"]]
    cfg.model.remat, cfg.train.batch_size = "full", 2
    assert compile_tool.candidate_settings(cfg, devices=1) == [["train.grad_accum=2"]]


# ------------------------------------------------------------------------------------------ compiling


@needs_gpu
def test_attention_auto_picks_cudnn_for_a_compile_only_h100_mesh_on_a_cpu_host():
    import jax

    from omni import sharding
    from omni.model.attention import attention_implementation

    cfg = small_config()
    assert jax.default_backend() == "cpu" and attention_implementation(cfg.model) == "xla"
    mesh = sharding.make_mesh(cfg.mesh, targets.resolve("h100").devices())
    with sharding.activate(mesh, cfg.mesh.rules):
        assert attention_implementation(cfg.model) == "cudnn"
    report = compile_tool.run(cfg, compile_tool.Options(target="h100", programs=("train",)))
    train = report["programs"]["train"]
    assert report["attention"] == "cudnn" and report["device"] == "NVIDIA H100 80GB HBM3"
    # packed flash attention forward and backward, once per layer each
    assert train["library_kernels"]["__cudnn$fmhaSoftmax"] == cfg.model.layers
    assert train["library_kernels"]["__cudnn$fmhaSoftmaxBackward"] == cfg.model.layers
    assert train["fits"] and 0 < train["peak_memory_gib"] < 1 and train["flops"] > 0 and train["kernels"] > 0
    assert 0 < train["estimated_mfu"] <= 1


@needs_gpu
def test_the_reference_is_compiled_beside_omni_for_the_same_gpu():
    cfg = small_config()
    report = compile_tool.run(cfg, compile_tool.Options(target="h100", programs=("train",), reference=True))
    omni, ref = report["programs"]["train"], report["reference"]
    assert ref["library_kernels"]["__cudnn$fmhaSoftmax"] == cfg.model.layers
    assert report["ratios"]["kernels_ratio"] == omni["kernels"] / ref["kernels"]
    assert 0.95 < report["ratios"]["flops_ratio"] < 1.05  # the same model size does the same matmuls


@needs_gpu
def test_a_step_that_does_not_fit_says_by_how_much_and_which_settings_fit():
    cfg = small_config()
    cfg.model.remat = "none"
    fits = compile_tool.run(cfg, compile_tool.Options(target="h100", programs=("train",), suggest=False))
    peak = fits["programs"]["train"]["peak_memory_gib"]
    fraction = peak * 0.9 * 2**30 / targets.resolve("h100").memory_bytes  # 10% less than the step needs
    report = compile_tool.run(cfg, compile_tool.Options(target="h100", programs=("train",),
                                                        memory_fraction=fraction))
    train = report["programs"]["train"]
    assert not train["fits"] and train["over_by_gib"] == pytest.approx(peak * 0.1, rel=1e-3)
    tried = {tuple(s["set"]): s for s in report["suggestions"]}
    assert ("model.remat=full",) in tried and ("train.grad_accum=2",) in tried
    assert all(s["fits"] == (s["peak_memory_gib"] <= report["usable_memory_gib"]) for s in tried.values())
    assert any(s["fits"] for s in tried.values())
    text = compile_tool.format_report(report)
    assert "DOES NOT FIT" in text
    first_fit = next(s for s in report["suggestions"] if s["fits"])
    assert f"try --set {' --set '.join(first_fit['set'])}: fits ({first_fit['peak_memory_gib']:.2f} GiB)" in text


@needs_tpu
def test_a_tpu_slice_compiles_with_matmuls_and_collectives_counted():
    cfg = small_config()
    cfg.mesh.data = -1
    report = compile_tool.run(cfg, compile_tool.Options(target="v5e-4", programs=("train",)))
    train = report["programs"]["train"]
    assert report["devices"] == 4 and report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert train["fits"] and train["flops"] > 0 and train["estimated_mfu"] > 0
    assert train["collectives"]["all-reduce"]["ici_bytes"] > 0  # the data-parallel gradient sum
    assert train["collectives"]["all-reduce"]["dcn_bytes"] == 0


@needs_tpu
def test_two_tpu_slices_send_the_dcn_axis_over_dcn():
    cfg = small_config()
    cfg.mesh.data, cfg.mesh.dcn_data = -1, 2
    report = compile_tool.run(cfg, compile_tool.Options(target="v5e-4", slices=2, programs=("train",)))
    collectives = report["programs"]["train"]["collectives"]
    assert report["devices"] == 8 and report["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert collectives["all-reduce"]["dcn_bytes"] == 0  # within each slice
    assert collectives["megascale-send"]["dcn_bytes"] > 0  # the gradient sum across the two slices


@needs_tpu
def test_a_tpu_program_too_big_for_hbm_is_reported_not_raised():
    cfg = small_config()
    cfg.mesh.data = -1
    cfg.model.remat = "none"
    cfg.train.batch_size, cfg.data.seq_len = 2048, 2048
    report = compile_tool.run(cfg, compile_tool.Options(target="v5e-4", programs=("train",), suggest=False))
    train = report["programs"]["train"]
    assert not train["fits"] and "RESOURCE_EXHAUSTED" in train["compile_error"]
    assert train["peak_memory_gib"] > 16 and train["over_by_gib"] > 0
    assert "DOES NOT FIT" in compile_tool.format_report(report)


@pytest.mark.skipif(not (HAS_GPU_PLUGIN or HAS_TPU_PLUGIN), reason="no compiler plugin installed: "
                    "pip install -e '.[aot-gpu]' or '.[aot-tpu]'")
def test_the_command_prints_the_report_and_json(tmp_path):
    config = tmp_path / "small.json"
    from omni.config import save_config

    save_config(small_config(), config)
    target = "h100" if HAS_GPU_PLUGIN else "v5e-1"
    env = dict(os.environ)
    base = [sys.executable, "-m", "omni.cli", "compile", "--config", str(config), "--target", target,
            "--programs", "train"]
    shown = subprocess.run(base, capture_output=True, text=True, env=env, timeout=600)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "train:" in shown.stdout and "memory per device" in shown.stdout and "roofline, not measured" in shown.stdout
    as_json = subprocess.run(base + ["--json", "--out", str(tmp_path / "r.jsonl")], capture_output=True, text=True,
                             env=env, timeout=600)
    report = json.loads(as_json.stdout.strip().splitlines()[-1])
    assert report["programs"]["train"]["fits"] is True
    assert json.loads((tmp_path / "r.jsonl").read_text()) == report
    bad = subprocess.run(base[:-2] + ["--programs", "train,sample"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "choose from train, eval, generate" in bad.stderr


@needs_gpu
@pytest.mark.parametrize("name, kind", [("h200", "NVIDIA H200 141GB HBM3e"), ("b200", "NVIDIA B200")])
def test_the_other_shipped_gpus_compile_with_cudnn_attention(name, kind):
    cfg = small_config()
    report = compile_tool.run(cfg, compile_tool.Options(target=name, programs=("train",)))
    assert report["device"] == kind and report["attention"] == "cudnn"
    assert report["programs"]["train"]["library_kernels"]["__cudnn$fmhaSoftmax"] == cfg.model.layers
    assert report["usable_memory_gib"] == pytest.approx(targets.resolve(name).memory_bytes * 0.75 / 2**30)


@pytest.mark.skipif(not (HAS_GPU_PLUGIN and HAS_TPU_PLUGIN), reason="needs both compiler plugins: "
                    "pip install -e '.[aot-gpu,aot-tpu]'")
def test_tpu_and_gpu_programs_of_one_model_count_the_same_matmul_flops():
    """libtpu writes matmuls as (windowed) convolutions and gives scans no trip count; read right, a 4-chip
    data-parallel step does a quarter of one H100's matmul FLOPs per chip."""
    cfg = small_config(dtype="float32")  # XLA attention on both: the same dense score matmuls
    cfg.mesh.data = -1
    gpu = compile_tool.run(cfg, compile_tool.Options(target="h100", programs=("train",)))["programs"]["train"]
    tpu = compile_tool.run(cfg, compile_tool.Options(target="v5e-4", programs=("train",)))["programs"]["train"]
    assert tpu["flops"] * 4 == pytest.approx(gpu["flops"], rel=0.01)
