"""Images as codes end to end: `omni data build --image-tokenizer`, packing and masking beside text and audio
codes, and a tiny model whose loss/image falls."""

import json

import numpy as np
import pytest
from PIL import Image

from omni.batch import AUDIO, IMAGE, IMAGE_PATCH, TEXT, check_batch, patch_dim
from omni.data.codec import ToneCodec
from omni.data.image_tokenizer import PatchRVQTokenizer
from tests.conftest import tiny_config
from tests.test_cli import omni
from tests.test_image_tokenizer import PALETTE, flat_shapes

NAMES = ["red", "green", "blue", "yellow", "white", "black"]
TONE = {"name": ToneCodec.name, "frame_rate": ToneCodec.frame_rate, "codebook_sizes": list(ToneCodec.codebook_sizes)}


def _colour_name(image):
    return NAMES[int(np.argmin(((PALETTE.astype(int) - image[0, 0].astype(int)) ** 2).sum(1)))]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A manifest mixing every way in: learned codes, patches, both, precomputed image codes as input, audio codes."""
    root = tmp_path_factory.mktemp("image_codes")
    (root / "img").mkdir()
    images = flat_shapes(120, size=16)
    tok = PatchRVQTokenizer.fit(images, patch_size=4, codebooks=2, codebook_size=16, iters=8)
    tok.save(root / "tok")
    identity = {"name": tok.name, "codebook_sizes": list(tok.codebook_sizes)}
    lines = []
    for i, image in enumerate(images):
        Image.fromarray(image).save(root / "img" / f"{i}.png")
        split = {"split": "eval"} if i % 12 == 0 else {}
        colour = _colour_name(image)
        kind = i % 5
        if kind in (0, 1):  # text -> image: the image is learned, so it enters as codes by default
            line = {"segments": [{"text": f"draw on {colour}", "target": False}, {"image": f"img/{i}.png"}],
                    "targets": ["image"]}
        elif kind == 2:  # captioning from patches, as before image codes
            line = {"segments": [{"image": f"img/{i}.png"}, {"text": colour}], "targets": ["text"]}
        elif kind == 3:  # both: patches in, codes out
            line = {"segments": [{"image": f"img/{i}.png", "as": "both"}], "targets": ["image"]}
        else:  # precomputed image codes as input, and audio codes as the target
            np.save(root / f"{i}.npy", tok.encode(image))
            np.save(root / f"{i}_tone.npy", np.stack([np.full(6, 1 + kind), np.arange(6) % 16], 1))
            line = {"segments": [{"image_codes": f"{i}.npy", "target": False}, {"codes": f"{i}_tone.npy"}],
                    "targets": ["audio"], "image_tokenizer": identity, "codec": TONE}
        lines.append(dict(line, id=f"ex{i}", **split))
    (root / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    run = omni("data", "build", "--manifest", str(root / "m.jsonl"), "--out", str(root / "ds"),
               "--image-tokenizer", str(root / "tok"), "--no-progress")
    assert run.returncode == 0, run.stderr[-2000:]
    return root


def _cfg(root):
    cfg = tiny_config()
    cfg.data.dataset = str(root / "ds")
    cfg.data.patch_size = 4
    cfg.data.max_image_patches = 16
    return cfg


def test_packed_batches_mix_all_three_discrete_modalities_and_mask_them_apart(built):
    from omni.data import pipeline
    from omni.loss import target_mask

    cfg = _cfg(built)
    vocab = pipeline.vocab_for(cfg)
    assert vocab.image_codebook_sizes == (16, 16) and vocab.codebook_sizes == ToneCodec.codebook_sizes
    batch = next(iter(pipeline.train_dataset(cfg)))
    check_batch(batch, cfg.data.seq_len, patch_dim(cfg.data))
    tokens, modality, segments = batch["tokens"], batch["modality"], batch["segment_ids"]
    is_code = (tokens >= vocab.image_offset(0)) & (tokens < vocab.used_size)
    is_audio = (tokens >= vocab.audio_offset(0)) & (tokens < vocab.image_offset(0))
    assert is_code.any() and is_audio.any() and (tokens == IMAGE_PATCH).any()
    assert np.all(modality[is_code] == IMAGE) and np.all(modality[is_audio] == AUDIO)
    assert not np.any((tokens == IMAGE_PATCH) & batch["is_target"])  # patches are never targets
    assert (batch["patch_positions"] < cfg.data.seq_len).sum() == (tokens == IMAGE_PATCH).sum()
    mask = np.asarray(target_mask(batch))
    next_modality = modality[:, 1:]
    for m in (TEXT, IMAGE, AUDIO):
        assert (mask & (next_modality == m)).any(), m
    # learned codes are targets, input codes (the precomputed ones under "target": false) are not
    assert (is_code & batch["is_target"]).any() and (is_code & ~batch["is_target"]).any()
    # no prediction crosses from one packed example into the next
    assert not np.any(mask & (segments[:, :-1] != segments[:, 1:]))


def test_a_tiny_model_learns_image_codes(built, tmp_path):
    from omni.train import loop

    cfg = _cfg(built)
    cfg.train.steps = 16
    cfg.train.lr = 1e-2
    cfg.train.log_every = 4
    result = loop.train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first_eval = next(r["eval/loss/image"] for r in rows if r.get("eval/loss/image") is not None)
    train_curve = [r["loss/image"] for r in rows if r.get("loss/image") is not None]
    assert result["eval"]["tokens/image"] > 0 and result["eval"]["tokens/audio"] > 0
    assert result["eval"]["loss/image"] < 0.7 * first_eval, (first_eval, result["eval"])
    assert train_curve[-1] < train_curve[0]


@pytest.mark.parametrize("kind, target", [(0, "image"), (2, "text"), (3, "image")])
def test_a_manifest_line_enters_training_and_generation_as_the_same_tokens(built, kind, target):
    """One input path (omni.data.image_entry): the line's prompt through the training pipeline (build, prepare,
    encode_example) and through generation (read_prompts, prompt_arrays) gives identical tokens, modalities,
    patches and patch positions, for an image entering as codes (0), as patches (2) and as both (3)."""
    from omni.data import dataset, pipeline
    from omni.tokens import encode_example
    from omni.tools import generate

    cfg = _cfg(built)
    ds = dataset.open_dataset(cfg.data.dataset)
    tok, vocab, image_tokenizer = pipeline.tokenizer_for(cfg), pipeline.vocab_for(cfg), pipeline.image_tokenizer_for(cfg)
    line = next(json.loads(l) for l in (built / "m.jsonl").read_text().splitlines()
                if int(json.loads(l)["id"][2:]) % 5 == kind and "split" not in json.loads(l))
    source = ds.source("train")
    record = next(source[i] for i in range(len(source))
                  if dataset.decode_record(source[i], len(ds.codebook_sizes), 2)["id"] == line["id"])
    trained = encode_example(pipeline.prepare(record, cfg.data, len(ds.codebook_sizes), image_tokenizer), vocab,
                             tok, cfg.data.patch_size, cfg.data.audio_layout)

    prompts = built / f"prompt-{kind}.jsonl"
    prompts.write_text(json.dumps(line) + "\n")
    (task,) = generate.read_prompts(prompts, patch_size=cfg.data.patch_size, max_image_patches=16,
                                    image_tokenizer=image_tokenizer)
    assert task.target == target
    prompt = generate.prompt_arrays(task.segments, vocab, tok, cfg.data.patch_size, cfg.data.audio_layout, target)
    n = len(prompt["tokens"])
    assert n < len(trained["tokens"])
    np.testing.assert_array_equal(prompt["tokens"], trained["tokens"][:n])
    np.testing.assert_array_equal(prompt["modality"], trained["modality"][:n])
    inside = trained["patch_positions"] < n
    np.testing.assert_array_equal(prompt["patch_positions"], trained["patch_positions"][inside])
    np.testing.assert_array_equal(prompt["patches"], trained["patches"][inside])
    assert (len(prompt["patches"]) > 0) == (kind in (2, 3))  # the patches are really there where they enter
    if target == "image":  # the truth generation scores against is the codes training learns
        np.testing.assert_array_equal(task.truth, [s for s in pipeline.prepare(record, cfg.data, len(
            ds.codebook_sizes), image_tokenizer)["segments"] if "image_codes" in s][0]["image_codes"])
