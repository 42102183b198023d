"""Images as answers end to end: a tiny model trained on "draw" prompts -> `omni export` (the image tokenizer
saved beside it) -> `omni generate --target image` from the export alone, single and batched, scored."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from omni.train import artifact
from omni.data.image_tokenizer import PatchRVQTokenizer
from omni.tools import export as export_lib
from omni.tools import tasks as tasks_lib
from tests.conftest import tiny_config
from tests.test_cli import omni

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (240, 220, 40)}
PLACES = {"top left": (0, 0), "top right": (0, 4), "bottom left": (4, 0), "bottom right": (4, 4)}


def square(colour: str, place: str) -> np.ndarray:
    """8 x 8 pixels: black, with a 4 x 4 square of the colour in one quadrant (2 x 2 cells of 4 pixels)."""
    image = np.zeros((8, 8, 3), np.uint8)
    y, x = PLACES[place]
    image[y:y + 4, x:x + 4] = COLOURS[colour]
    return image


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every colour x place drawn once (the eval split repeats four training prompts), a tiny model trained until
    it knows them, exported as float32; the dataset folder is then moved away, so only the export is left."""
    from omni.train import loop

    root = tmp_path_factory.mktemp("draw")
    (root / "img").mkdir()
    pairs = [(c, p) for c in COLOURS for p in PLACES]
    tok = PatchRVQTokenizer.fit([square(c, p) for c, p in pairs], patch_size=4, codebooks=2, codebook_size=8, iters=8)
    tok.save(root / "tok")
    lines = []
    for i, (colour, place) in enumerate(pairs):
        Image.fromarray(square(colour, place)).save(root / "img" / f"{i}.png")
        line = {"segments": [{"text": f"{colour} {place}", "target": False}, {"image": f"img/{i}.png"}],
                "targets": ["image"]}
        lines.append(dict(line, id=f"{colour} {place}"))
        if i % 4 == 0:
            lines.append(dict(line, id=f"again {colour} {place}", split="eval"))
    (root / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    run = omni("data", "build", "--manifest", str(root / "m.jsonl"), "--out", str(root / "ds"),
               "--image-tokenizer", str(root / "tok"), "--no-progress")
    assert run.returncode == 0, run.stderr[-2000:]

    cfg = tiny_config()
    # a budget of 16 cells: its largest square (4 x 4) is not the 2 x 2 grid the recorded 8 x 8 images have
    cfg.data.dataset, cfg.data.patch_size, cfg.data.max_image_patches, cfg.data.seq_len = str(root / "ds"), 4, 16, 64
    cfg.train.steps, cfg.train.lr, cfg.train.warmup_steps, cfg.train.weight_decay = 150, 1e-2, 10, 0.0
    cfg.train.log_every, cfg.train.checkpoint_every = 50, 150
    loop.train(cfg, root / "run", progress=False)
    run = omni("export", "--workdir", str(root / "run"), "--out", str(root / "export"), "--dtype", "float32",
               "--no-progress")
    assert run.returncode == 0, run.stderr[-2000:]
    shutil.move(root / "ds", root / "ds-moved")
    return root


def test_the_export_carries_the_image_tokenizer_and_the_image_code_ids(exported):
    folder = exported / "export"
    info = json.loads((folder / "config.json").read_text())["export"]
    assert info["vocab"]["image_codebook_sizes"] == [8, 8]
    assert info["image_tokenizer"]["name"] == PatchRVQTokenizer.name
    assert info["image_tokenizer"]["image_size"] == [8, 8]  # recorded by data build, the size generation draws
    readme = (folder / "README.md").read_text()
    assert "`image_tokenizer/`" in readme and "image_offsets = [" in readme
    model = artifact.from_export(folder)
    assert model.image_tokenizer.codebook_sizes == (8, 8)
    original = PatchRVQTokenizer.load(exported / "tok")
    np.testing.assert_array_equal(model.image_tokenizer.codewords, original.codewords)


def test_generate_draws_a_training_prompt_from_the_export_alone(exported, tmp_path):
    png = tmp_path / "red.png"
    run = omni("generate", "--model", str(exported / "export"), "--prompt", "red top left", "--target", "image",
               "--out", str(png))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "2 x 2 cells" in run.stdout and "tokens until a stop token" in run.stderr
    drawn = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert drawn.shape == (8, 8, 3)
    truth = square("red", "top left").astype(int)
    assert np.abs(drawn - truth).mean() < 20, drawn[::4, ::4]


def test_batched_generation_and_scores_of_image_answers(exported, tmp_path):
    preds = tmp_path / "preds.jsonl"
    run = omni("generate", "--model", str(exported / "export"), "--prompts", str(exported / "m.jsonl"),
               "--out", str(preds), "--image-dir", str(tmp_path / "png"))
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 20 and all(r["target"] == "image" and r["stop"] == "stop token" for r in rows)
    assert all(np.shape(r["codes"]) == (2, 2, 2) == np.shape(r["truth"]) for r in rows)
    assert all(Image.open(r["png"]).size == (8, 8) for r in rows)
    model = artifact.from_export(exported / "export")
    scores = tasks_lib.score_predictions(rows, image_tokenizer=model.image_tokenizer)["image"]
    assert scores["n"] == 20 and scores["code_acc"][0] >= 0.8, scores  # greedy, on the prompts it trained on
    assert scores["psnr_db"] > 20, scores
    assert "PSNR" in tasks_lib.describe("image", scores)


def test_an_export_without_its_image_tokenizer_says_what_to_do(exported, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(exported / "export", copy)
    shutil.rmtree(copy / "image_tokenizer")
    run = omni("generate", "--model", str(copy), "--prompt", "red top left", "--target", "image")
    assert run.returncode == 2 and "export the checkpoint again" in run.stderr, run.stderr


def test_the_hf_export_carries_image_codes_and_their_tokenizer(exported, tmp_path):
    """--format hf of an image-code run: the image tokenizer beside the Llama, <image_K_C> tokens at omni's ids,
    and transformers' logits on a prompt with image codes equal omni's."""
    torch = pytest.importorskip("torch", reason="the HF export check needs torch (pip install omni[hf])")
    transformers = pytest.importorskip("transformers", reason="the HF export check needs transformers (omni[hf])")
    from omni.tokens import BOI, ROW
    from omni.tools import generate, hf

    shutil.move(exported / "ds-moved", exported / "ds")  # the fitted tokenizer is read from the dataset folder
    try:
        out = hf.export_hf(exported / "run", tmp_path / "hf", dtype="float32")
    finally:
        shutil.move(exported / "ds", exported / "ds-moved")
    saved = artifact.load_image_tokenizer_folder(out / artifact.IMAGE_TOKENIZER_DIR)
    np.testing.assert_array_equal(saved.codewords, PatchRVQTokenizer.load(exported / "tok").codewords)
    ours = artifact.from_export(exported / "export")
    vocab = ours.vocab
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_ids_to_tokens(vocab.image_offset(1) + 3) == "<image_1_3>"
    codes = np.array([[[1, 2], [3, 4]], [[5, 6], [7, 0]]])  # a whole 2 x 2 grid of 2 codebooks
    prompt = generate.prompt_arrays([{"text": "red top left"}, {"image_codes": codes}, {"text": "and"}], vocab,
                                    ours.tokenizer, 4, target="image")
    ids = prompt["tokens"].tolist()
    assert ids.count(ROW) == 2 and ids[-1] == BOI and vocab.image_offset(1) + 6 in ids
    batch = generate.prompt_batch([prompt], 1, len(ids))
    want = np.asarray(ours.model()({k: v for k, v in batch.items()}))[0]
    llama = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = llama(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - want).max() <= 1e-4
