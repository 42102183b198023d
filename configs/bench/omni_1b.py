"""The 1B-class omni benchmark model (issue: ahead of MaxText on one H100).

    omni bench --config configs/bench/omni_1b.py                 # all three modalities, packed
    omni bench --config configs/bench/omni_1b.py --text-only     # the same size on text only

d 2048, 16 layers, 16 heads (no GQA), SwiGLU hidden 5504 (3 x 2048 x 5504 ~ the 2 x 2048 x 8192 of the GELU
MLP MaxText's reference uses), vocab 32768 (--vocab), seq 2048, batch 16, bf16 compute, fp32 weights,
remat saving the weight matmuls and the cuDNN attention kernel's outputs (dots_attn), cuDNN packed-sequence
attention on GPU (segments as offsets, at most 16 per row; the synthetic batches hold up to 7). Prints one JSON
line (omni/tools/bench.py documents every field and the FLOP formula). On a GPU host, launch/bench_gpu.sh runs it
with --text-only, the remat and attention variants and ../shared/bench/plain_jax_step.py in one go.
Nothing has been measured with it on an accelerator yet; on CPU it is far too big, use
configs/bench/omni_cpu.py there.
"""

from omni.config import Config


def get_config() -> Config:
    cfg = Config(name="omni_1b")
    cfg.model.d = 2048
    cfg.model.layers = 16
    cfg.model.heads = 16
    cfg.model.kv_heads = 16
    cfg.model.mlp = 5504
    cfg.model.dtype = "bfloat16"
    cfg.model.param_dtype = "float32"
    cfg.model.remat = "dots_attn"
    cfg.model.attention = "auto"
    cfg.model.max_segments = 16
    cfg.data.seq_len = 2048
    cfg.data.patch_size = 16
    cfg.data.max_image_patches = 256
    cfg.data.row_patches = 1024  # patch slots per row: the most the synthetic rows hold (uint8, 12 MiB per step)
    cfg.train.batch_size = 16
    return cfg
