"""LLaVA-style stage 2: everything trains, starting from stage 1's last checkpoint.

    omni train --config configs/llava_stage2.py --workdir runs/stage2 --set model.init_from=runs/stage1 \
        --set model.d=2048 --set model.layers=16 ...     # the same sizes as stage 1

model.init_from names stage 1's workdir: the parameters of its latest checkpoint are loaded as saved (every
tensor must have this model's shape), with a fresh optimizer, and the text tokenizer is the one stage 1 used.
Every parameter trains, at a lower peak lr than stage 1 (LLaVA: 2e-5 for the full fine-tune of a 7B model; raise it
for small models). See configs/llava_stage1.py and docs/hf.md.
"""

from omni.config import Config


def get_config() -> Config:
    cfg = Config(name="llava_stage2")
    cfg.model.dtype = "float32"  # CPUs run bf16 matmuls slower than fp32; use bfloat16 on GPU/TPU
    cfg.data.seq_len = 256
    cfg.train.steps = 300
    cfg.train.batch_size = 16
    cfg.train.lr = 2e-4
    cfg.train.warmup_steps = 30
    cfg.train.eval_every = 100
    cfg.train.checkpoint_every = 100
    return cfg
