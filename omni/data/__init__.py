"""From files to batches: manifests, dataset builds, catalog adapters, the grain pipeline and its parts.

    manifest.py        the JSONL manifest: one example per line, checked with the line number
    dataset.py         manifest lines -> a TFDS array_record dataset; opening one (or a generated corpus)
    claim.py           one build per --out at a time: the claim marker beside it (flock, or a gs:// object)
    adapters.py        TFDS catalog datasets (coco_captions, librispeech) -> the same examples
    pipeline.py        dataset -> shuffle -> tokenise -> pack -> batches (grain), sharded over processes
    prefetch.py        batches made ready ahead of the step on a background thread
    images.py          decode and fit images to the patch budget
    text_tokenizer.py  bytes, BPE (tokenizers) and SentencePiece text tokenizers
    codec.py, audio.py audio codecs (tone, mel residual VQ, precomputed codes) and WAV reading / resampling
    image_tokenizer.py image tokenizers (patch residual VQ, precomputed image codes): pixels <-> codes [R, C, K]

Importing this package imports nothing: inference (omni.tools.generate) uses images, audio and codecs on hosts
without grain or tensorflow-datasets. The data pipeline knows no model and no trainer (tests/test_layering.py).
"""
