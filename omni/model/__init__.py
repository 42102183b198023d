"""The model: a decoder-only transformer over the interleaved text / image-patch / audio-code sequence.

    layers.py       parameters with logical axis names, RMSNorm, RoPE, per-modality dense maps, SwiGLU
    attention.py    GQA attention with a KV cache; XLA (dense mask) and cuDNN (packed segments) kernels
    routing.py      per-modality weights: each token through its own modality's slice, grouped by modality
    transformer.py  OmniTransformer: blocks, the fusion variants (early / late / mot / cross), remat, the KV cache
    counting.py     parameters and training FLOPs per token of each variant, from the config alone

It knows the batch layout (omni.batch), the token ids (omni.tokens) and the sharding rules (omni.sharding);
it imports nothing of the data pipeline, the trainer, the tools or the CLI (tests/test_layering.py).
"""
