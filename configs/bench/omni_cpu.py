"""A small benchmark config that runs in seconds on CPU (checks the benchmark itself; no speed target).

    omni bench --config configs/bench/omni_cpu.py [--text-only]

The same synthetic packed batches as configs/bench/omni_1b.py at d 128, 4 layers, seq 256, batch 8, float32
(CPUs run bf16 matmuls slower), vocab 32768. Measured on this project's 2-core CPU (4 runs): step 1.40-1.48 s,
~1.4k tokens/s, 0.043-0.045 TFLOP/s, compile 4.4-4.9 s; the float32 matmul measured beside it varies between
0.11 and 0.20 TFLOP/s from run to run on this shared machine, so MFU reads 21-39%.
"""

from omni.config import Config


def get_config() -> Config:
    cfg = Config(name="omni_cpu")
    cfg.model.d = 128
    cfg.model.layers = 4
    cfg.model.heads = 4
    cfg.model.kv_heads = 4
    cfg.model.dtype = "float32"
    cfg.data.seq_len = 256
    cfg.data.patch_size = 8
    cfg.data.max_image_patches = 16
    cfg.data.row_patches = 48  # patch slots per row: the most the synthetic rows hold
    cfg.train.batch_size = 8
    return cfg
