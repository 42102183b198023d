"""Spoken captions: images of shapes, their captions and the captions spoken (needs espeak-ng installed).

    omni train --config configs/demo_speech.py --workdir runs/demo_speech

The corpus (data.dataset=demo-speech) is synthesised with espeak-ng, varied in pitch and speed, and its
audio goes through a MelRVQCodec (50 frames/s, 4 x 64 codes) fitted on the train clips when the corpus is
built. Half the examples are image -> caption -> spoken caption, half are speech -> transcript. Without
espeak-ng the command stops at once with a message saying so.
"""

from omni.config import Config


def get_config() -> Config:
    cfg = Config(name="demo_speech")
    cfg.model.d = 128
    cfg.model.layers = 4
    cfg.model.heads = 4
    cfg.model.kv_heads = 2
    cfg.model.dtype = "float32"  # CPUs run bf16 matmuls slower than fp32; use bfloat16 on GPU/TPU
    cfg.train.steps = 600
    cfg.train.lr = 3e-3
    cfg.train.warmup_steps = 50
    cfg.train.eval_every = 200
    cfg.train.checkpoint_every = 200
    cfg.data.dataset = "demo-speech"
    cfg.demo.train_examples = 2000
    cfg.demo.eval_examples = 100
    cfg.data.seq_len = 1024
    cfg.train.batch_size = 8
    return cfg
