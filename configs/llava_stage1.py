"""LLaVA-style stage 1: a pretrained Llama learns to read images and audio codes while the language model stays frozen.

    omni train --config configs/llava_stage1.py --workdir runs/stage1 --set model.init_from=/models/my-llama \
        --set model.d=2048 --set model.layers=16 ...     # the folder's sizes; a mismatch is an error listing them
    omni train --config configs/llava_stage2.py --workdir runs/stage2 --set model.init_from=runs/stage1 ...

model.init_from loads every Llama tensor and the embedding / lm_head rows of the tokens the Llama knows (matched
by token string; the text tokenizer becomes the folder's tokenizer.json). Stage 1 trains only what is new: the
image patch projection and the vocabulary rows the Llama never had (omni's specials, audio codes):
train.trainable = patch_proj, patch_bias, embed, unembed with train.freeze_loaded_rows, so every Llama tensor
and row stays bitwise as loaded and the blocks hold no optimizer state (the log prints how many parameters
train). Stage 2 (configs/llava_stage2.py) starts from stage 1's last checkpoint and trains everything.
Without model.init_from this config stops at once (train.freeze_loaded_rows needs it). A run with a tiny random
Llama made by transformers, and what it printed: docs/hf.md.
"""

from omni.config import Config


def get_config() -> Config:
    cfg = Config(name="llava_stage1")
    cfg.model.dtype = "float32"  # CPUs run bf16 matmuls slower than fp32; use bfloat16 on GPU/TPU
    cfg.data.seq_len = 256
    cfg.train.steps = 300
    cfg.train.batch_size = 16
    cfg.train.lr = 1e-3           # LLaVA's stage-1 lr for the projector
    cfg.train.warmup_steps = 30
    cfg.train.weight_decay = 0.0
    cfg.train.eval_every = 100
    cfg.train.checkpoint_every = 100
    cfg.train.trainable = ["patch_proj", "patch_bias", "embed", "unembed"]
    cfg.train.freeze_loaded_rows = True
    return cfg
