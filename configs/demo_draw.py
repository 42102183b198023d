"""Drawing: a small omni model learns to draw "a red circle at the top left" as image codes.

    omni train --config configs/demo_draw.py --workdir runs/draw
    omni export --workdir runs/draw --out exported/draw
    omni generate --model exported/draw --prompt "draw a red circle at the top left" --target image --out red.png

The corpus (data.dataset=demo-draw, omni/demo/draw.py) is the caption task's scenes turned around: the text
prompt is given, the 32 x 32 image is learned as the codes of a PatchRVQTokenizer (8 x 8 pixel cells, 2 x 64
codes) fitted on the train images when the corpus is built. At the end of the run, held-out prompts are drawn
greedily and the colour and place of the drawn shape are read from the decoded pixels (chance 17% and 20%).
Measured figures: docs/demo.md.
"""

from omni.config import Config


def get_config() -> Config:
    cfg = Config(name="demo_draw")
    cfg.model.d = 128
    cfg.model.layers = 4
    cfg.model.heads = 4
    cfg.model.kv_heads = 2
    cfg.model.dtype = "float32"  # CPUs run bf16 matmuls slower than fp32; use bfloat16 on GPU/TPU
    cfg.data.dataset = "demo-draw"
    cfg.data.seq_len = 256
    cfg.train.steps = 600
    cfg.train.batch_size = 16
    cfg.train.lr = 3e-3
    cfg.train.warmup_steps = 50
    cfg.train.eval_every = 200
    cfg.train.checkpoint_every = 200
    return cfg
