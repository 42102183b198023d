"""The demo: a small omni model learns captions, melody descriptions and melody synthesis from the embedded corpus.

    omni train --config configs/demo.py --workdir runs/demo

On 2 CPU cores this takes about 6-7 minutes after a ~1 minute install (building the demo corpus, compile a few
seconds, 600 steps at ~7-8k tokens/s, evals). Expect the held-out loss to fall from ~6 to under 0.1 for text and
audio, and at the end greedy captions of held-out images with colour and place right ~100% and the whole caption
~80-90% (chance 1.1%), melody descriptions and synthesized pitches near 100%. A measured run: docs/demo.md.
Re-running the same command resumes from the last checkpoint in runs/demo/checkpoints.
"""

from omni.config import Config


def get_config() -> Config:
    cfg = Config(name="demo")
    cfg.model.d = 128
    cfg.model.layers = 4
    cfg.model.heads = 4
    cfg.model.kv_heads = 2
    cfg.model.dtype = "float32"  # CPUs run bf16 matmuls slower than fp32; use bfloat16 on GPU/TPU
    cfg.data.seq_len = 256
    cfg.train.steps = 600
    cfg.train.batch_size = 16
    cfg.train.lr = 3e-3
    cfg.train.warmup_steps = 50
    cfg.train.eval_every = 200
    cfg.train.checkpoint_every = 200
    return cfg
