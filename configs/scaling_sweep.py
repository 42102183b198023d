"""A fusion scaling sweep on the demo corpus: early, late:1, mot and cross at 4 widths x 2 seeds, FLOPs matched.

    omni ablate --config configs/scaling_sweep.py --workdir runs/sweep

Every run is a 2-layer model trained 150 steps x 8 x 256 = 307,200 tokens in the same data order (ablate.budget
'fixed'), at model.d = 32, 48, 64 and 96 for the reference (early); late:1, mot and cross are matched to early's
training FLOPs per token at each width. The report (runs/sweep/ablation.md) adds a Scaling section: final held-out
loss per modality against training FLOPs, a fit of L = E + A * C^-alpha per variant and modality, and each
variant's compute ratio against early at early's best loss, over the two seeds; scaling.png draws the points and
the fits the points support. 32 runs: 53 minutes on a 2-core CPU shared with other jobs. A measured result and
what it does and does not say: docs/ablation.md.
"""

from omni.config import Config


def get_config() -> Config:
    cfg = Config(name="scaling_sweep")
    cfg.model.layers = 2
    cfg.model.heads = 4
    cfg.model.kv_heads = 2
    cfg.model.dtype = "float32"  # CPUs run bf16 matmuls slower than fp32; use bfloat16 on GPU/TPU
    cfg.model.encoder_layers = 1
    cfg.model.cross_every = 1
    cfg.data.seq_len = 256
    cfg.train.steps = 150
    cfg.train.batch_size = 8
    cfg.train.lr = 3e-3
    cfg.train.warmup_steps = 30
    cfg.train.eval_every = 50
    cfg.train.checkpoint_every = 150
    cfg.demo.scored_examples = 16
    cfg.ablate.variants = ["early", "late:1", "mot", "cross"]
    cfg.ablate.seeds = 2
    cfg.ablate.match = "flops"
    cfg.ablate.sweep = {"model.d": [32, 48, 64, 96]}
    return cfg
