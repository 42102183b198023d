"""Hugging Face interop: `omni export --format hf` (omni.tools.hf) and model.init_from (omni.train.init_from).

The omni side is a tiny model trained a few steps; the HF side is the real transformers + torch on CPU, float32.
Logits are compared over the whole vocabulary (max abs difference <= 1e-4).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omni.train import artifact
from omni.batch import TEXT
from omni.data.text_tokenizer import load_tokenizer
from omni.errors import ExportError, InitFromError
from omni.model import hf_llama
from omni.tokens import NUM_SPECIAL, Vocab
from omni.tools import export, generate, hf
from omni.train import init_from, loop
from omni.train.step import build_model
from tests.conftest import tiny_config

torch = pytest.importorskip("torch", reason="the HF interop tests need torch (pip install omni[hf])")
transformers = pytest.importorskip("transformers", reason="the HF interop tests need transformers (omni[hf])")

STEPS = 4
TOLERANCE = 1e-4
DOCS = Path(__file__).resolve().parents[1] / "docs" / "hf.md"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny early-fusion model (text, images, tone-codec audio) trained 4 steps, exported with --format hf."""
    root = tmp_path_factory.mktemp("hf")
    cfg = tiny_config()
    cfg.train.steps, cfg.train.checkpoint_every, cfg.train.eval_batches = STEPS, STEPS, 1
    loop.train(cfg, root / "run", progress=False)
    out = hf.export_hf(root / "run", root / "hf", dtype="float32")
    return cfg, root, out


@pytest.fixture(scope="module")
def omni_model(run):
    return artifact.from_checkpoint(run[1] / "run")


@pytest.fixture(scope="module")
def hf_model(run):
    out = run[2]
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(out)


def omni_logits(exported, prompt) -> np.ndarray:
    """[L, V] logits of omni's own model for one prompt (prompt_arrays form)."""
    batch = generate.prompt_batch([prompt], 1, len(prompt["tokens"]))
    return np.asarray(exported.model()({k: jnp.asarray(v) for k, v in batch.items()}))[0]


def prompt_of(exported, segments, target="text"):
    cfg = exported.config
    return generate.prompt_arrays(segments, exported.vocab, exported.tokenizer, cfg.data.patch_size,
                                  cfg.data.audio_layout, target)


def snippet_scope() -> dict:
    scope = {}
    exec(hf.INPUTS_EMBEDS_SNIPPET, scope)  # the recipe of docs/hf.md and the export's README, as written
    return scope


def an_image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (16, 24, 3), dtype=np.uint8)  # 2 x 3 patches of 8


# ------------------------------------------------------------------------------------------- export

def test_hf_logits_equal_omni_on_text_audio_and_image_prompts(run, omni_model, hf_model):
    out = run[2]
    model, tokenizer = hf_model
    rng = np.random.default_rng(1)
    codes = np.stack([rng.integers(0, size, 6) for size in omni_model.vocab.codebook_sizes], axis=1)
    image = an_image()
    diffs = {}
    with torch.no_grad():
        text = prompt_of(omni_model, [{"text": "a red circle"}])
        assert tokenizer("a red circle").input_ids == text["tokens"].tolist()  # <bos> + text, as omni prompts
        got = model(torch.tensor(text["tokens"][None], dtype=torch.long)).logits[0].numpy()
        diffs["text"] = np.abs(got - omni_logits(omni_model, text)).max()

        audio = prompt_of(omni_model, [{"audio": codes}], target="audio")
        got = model(torch.tensor(audio["tokens"][None], dtype=torch.long)).logits[0].numpy()
        diffs["audio"] = np.abs(got - omni_logits(omni_model, audio)).max()

        # RoPE at every trained position (a wrong rotary layout shows most at far positions)
        ids = rng.integers(0, omni_model.vocab.size, run[0].data.seq_len).astype(np.int32)
        far = {"tokens": ids, "modality": np.full(len(ids), TEXT, np.int32),
               "patches": np.zeros((0, 8 * 8 * 3), np.uint8), "patch_positions": np.zeros(0, np.int32)}
        got = model(torch.tensor(ids[None], dtype=torch.long)).logits[0].numpy()
        diffs["128 positions"] = np.abs(got - omni_logits(omni_model, far)).max()

        both = prompt_of(omni_model, [{"image": image}, {"text": "what is this"}])
        token_ids, embeds = snippet_scope()["image_text_prompt"](out, tokenizer, model, image, "what is this")
        assert token_ids[0].tolist() == both["tokens"].tolist()
        got = model(inputs_embeds=embeds).logits[0].numpy()
        diffs["image"] = np.abs(got - omni_logits(omni_model, both)).max()
    print("max abs logit diff", {k: float(v) for k, v in diffs.items()})
    assert all(d <= TOLERANCE for d in diffs.values()), diffs


def not_text_ids(vocab: Vocab, stop: int) -> list[int]:
    """What omni's text generation never emits (omni.tools.generate.allowed_table): HF's suppress_tokens."""
    allowed = generate.allowed_table(vocab, "text", "flat", [stop])[0]
    return [int(i) for i in np.flatnonzero(~allowed)]


def test_greedy_generation_in_transformers_matches_omni(run, omni_model, hf_model):
    out = run[2]
    model, tokenizer = hf_model
    vocab, eos = omni_model.vocab, generate.DEFAULT_STOP["text"][0]
    image = an_image(2)
    for segments in ([{"text": "a red"}], [{"image": image}, {"text": "what"}]):
        prompt = prompt_of(omni_model, segments)
        want = generate.generate(omni_model.graphdef, omni_model.params, omni_model.config.model, vocab, [prompt],
                                 target="text", max_new_tokens=12)
        want = want.tokens[0] + ([want.stopped[0]] if want.stopped[0] is not None else [])
        settings = dict(max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0,
                        suppress_tokens=not_text_ids(vocab, eos))
        with torch.no_grad():
            if "image" in segments[0]:
                _, embeds = snippet_scope()["image_text_prompt"](out, tokenizer, model, image, "what")
                got = model.generate(inputs_embeds=embeds, **settings)[0].tolist()  # the new tokens only
            else:
                ids = torch.tensor(prompt["tokens"][None], dtype=torch.long)
                got = model.generate(ids, **settings)[0, len(prompt["tokens"]):].tolist()
        assert got == want, segments


def test_tokenizer_covers_omni_ids_one_for_one(run, omni_model, hf_model):
    _, tokenizer = hf_model
    vocab = omni_model.vocab
    assert len(tokenizer) == vocab.size
    names = tokenizer.convert_ids_to_tokens(list(range(vocab.size)))
    assert names[:3] == ["<pad>", "<bos>", "<eos>"] and names[8] == "<patch>" and names[12] == "<special_12>"
    assert names[vocab.text_offset + ord("a")] == "a"
    assert names[vocab.audio_offset(1) + 3] == "<audio_1_3>" and names[-1] == f"<unused_{vocab.size - 1}>"
    ids = tokenizer("hi <boa><audio_0_5><eoa>", add_special_tokens=False).input_ids
    assert ids[-3:] == [6, vocab.audio_offset(0) + 5, 7]  # added tokens are split out of text
    assert tokenizer.decode(tokenizer("a red circle").input_ids, skip_special_tokens=True) == "a red circle"
    saved = json.loads((run[2] / "config.json").read_text())
    assert saved["model_type"] == "llama" and saved["vocab_size"] == vocab.size
    assert saved["tie_word_embeddings"] is False and saved["omni"]["step"] == STEPS


def test_sharded_export_loads_the_same_model(run, hf_model, tmp_path):
    _, root, single = run
    out = hf.export_hf(root / "run", tmp_path / "sharded", dtype="float32", max_shard_size="40KB")
    index = json.loads((out / hf.INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (out / hf.WEIGHTS_FILE).exists()
    for file in files:  # at most 40 kB of tensors, or a single bigger tensor (the [384, 32] float32 embedding)
        names = [n for n, f in index["weight_map"].items() if f == file]
        assert os.path.getsize(out / file) <= 40_000 + 4096 or len(names) == 1, (file, names)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, hf_model[0](ids).logits)
    assert hf.parse_size("2GB") == 2 * 10**9 and hf.parse_size("1MiB") == 2**20 and hf.parse_size(123) == 123


def test_docs_and_readme_hold_the_tested_snippet(run):
    readme = (run[2] / "README.md").read_text()
    assert hf.INPUTS_EMBEDS_SNIPPET in readme
    docs = DOCS.read_text()
    block = re.search(r"<!-- inputs_embeds snippet: omni.tools.hf.INPUTS_EMBEDS_SNIPPET -->\n```python\n(.*?)```",
                      docs, re.S)
    assert block and block.group(1) == hf.INPUTS_EMBEDS_SNIPPET


def test_export_errors(run, tmp_path):
    _, root, _ = run
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    with pytest.raises(ExportError, match="already exists and is not empty; pass a new --out or delete it"):
        hf.export_hf(root / "run", busy)
    assert [p.name for p in busy.iterdir()] == ["mine.txt"]
    with pytest.raises(ExportError, match="--max-shard-size 'lots' is not a size"):
        hf.export_hf(root / "run", tmp_path / "a", max_shard_size="lots")
    late = tmp_path / "late"
    shutil.copytree(root / "run", late)
    meta_file = late / "checkpoints" / str(STEPS) / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["config"]["model"].update(fusion="late", late_layers=1)
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="model.fusion='late' run; --format hf writes early-fusion models only"):
        hf.export_hf(late, tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "late"]  # nothing half-written


def test_cli_exports_hf(run, tmp_path, capsys):
    from omni import cli

    assert cli.main(["export", "--format", "hf", "--workdir", str(run[1] / "run"), "--out", str(tmp_path / "o"),
                     "--dtype", "float32", "--no-progress"]) == 0
    assert "Hugging Face Llama folder" in capsys.readouterr().out
    assert (tmp_path / "o" / "tokenizer.json").is_file()


# ------------------------------------------------------------------------------------------- init_from

def test_round_trip_export_transformers_save_pretrained_init_from(run, omni_model, tmp_path, monkeypatch):
    """export -> transformers -> save_pretrained -> model.init_from in the trainer: the same logits (the one step it
    takes is the first of the warmup, whose learning rate is 0, so it changes nothing). Run again, the workdir's
    checkpoint wins: init_from is not loaded."""
    cfg, _, out = run
    saved = tmp_path / "saved"
    transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).save_pretrained(saved)
    transformers.AutoTokenizer.from_pretrained(out).save_pretrained(saved)
    shutil.copy(out / hf_llama.PATCH_FILE, saved)  # the image projection lives beside the Llama
    started = tiny_config()
    started.train.steps, started.train.eval_batches = 1, 1  # train.lr must be > 0; warmup step 0 has rate 0
    started.model.init_from = str(saved)
    loop.train(started, tmp_path / "run", progress=False)
    back = artifact.from_checkpoint(tmp_path / "run")
    assert back.config.data.tokenizer == ""  # an omni folder's tokenizer.json is not a text tokenizer
    prompt = prompt_of(omni_model, [{"image": an_image(3)}, {"text": "what"}])
    diff = np.abs(omni_logits(back, prompt) - omni_logits(omni_model, prompt)).max()
    print("round trip max abs logit diff", float(diff))
    assert diff <= TOLERANCE

    def no_load(*args, **kwargs):
        raise AssertionError("init_from.load called although the workdir has a checkpoint")

    monkeypatch.setattr(init_from, "load", no_load)
    started.train.steps = 2
    loop.train(started, tmp_path / "run", progress=False)  # resumes from step 1
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["step"] == 2


def make_llama(folder: Path, tie: bool, **sizes) -> Path:
    """A random LlamaForCausalLM of tiny sizes and a BPE tokenizer trained here, saved by transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10_000.0, vocab_size=320,
                  tie_word_embeddings=tie, initializer_range=0.2)
    config.update(sizes)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).save_pretrained(folder)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = ["a red circle on a blue square", "the quick brown fox jumps over the lazy dog"] * 20
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    return folder


def omni_from(folder: Path, **model) -> tuple:
    """(model, vocab, cfg, counts) of an omni model over `folder`'s tokenizer started by init_from (no trainer)."""
    cfg = tiny_config()
    cfg.model.init_from, cfg.data.tokenizer = str(folder), str(folder)
    for key, value in model.items():
        setattr(cfg.model, key, value)
    text = load_tokenizer(str(folder))
    vocab = Vocab(text_size=text.vocab_size, codebook_sizes=(8, 8))
    graphdef, params = nnx.split(build_model(cfg, vocab), nnx.Param)
    fresh = nnx.to_pure_dict(params)
    loaded = init_from.load(cfg, vocab, text, fresh)
    return nnx.merge(graphdef, init_from.place(fresh, loaded)), vocab, cfg, loaded.counts, fresh


def checked_against(folder: Path, **model):
    """init_from.load of `folder` for a model given as shapes only (nothing allocated): the checks, fast."""
    cfg = tiny_config()
    cfg.model.init_from = str(folder)
    for key, value in model.items():
        setattr(cfg.model, key, value)
    text = load_tokenizer(str(folder))
    vocab = Vocab(text_size=text.vocab_size, codebook_sizes=(8, 8))
    abstract = nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: build_model(cfg, vocab)), nnx.Param)[1])
    return init_from.load(cfg, vocab, text, abstract)


@pytest.mark.parametrize("tie", [False, True])
def test_init_from_a_transformers_llama_gives_its_text_logits(tmp_path, tie):
    folder = make_llama(tmp_path / "llama", tie)
    model, vocab, _, counts, fresh = omni_from(folder)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = hf_tok("the red fox on a blue circle", add_special_tokens=False).input_ids
    batch = generate.prompt_batch([{"tokens": np.asarray(ids, np.int32) + vocab.text_offset,
                                    "modality": np.full(len(ids), TEXT, np.int32),
                                    "patches": np.zeros((0, 8 * 8 * 3), np.uint8),
                                    "patch_positions": np.zeros(0, np.int32)}], 1, len(ids))
    got = np.asarray(model({k: jnp.asarray(v) for k, v in batch.items()}))[0]
    llama = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        want = llama(torch.tensor([ids])).logits[0].numpy()
    text = slice(vocab.text_offset, vocab.text_offset + vocab.text_size)
    diff = np.abs(got[:, text] - want[:, :vocab.text_size]).max()
    print(f"tie={tie}: init_from Llama max abs text logit diff {diff:.2e}")
    assert diff <= TOLERANCE
    assert counts["text"] == (vocab.text_size, vocab.text_size) and counts["special"] == (0, NUM_SPECIAL)
    assert counts["audio"] == (0, 16) and not counts["patch_projection"]
    # rows the Llama has no token for keep the fresh (normal) init
    assert np.array_equal(np.asarray(model.embed[...])[:NUM_SPECIAL], np.asarray(fresh["embed"])[:NUM_SPECIAL])
    assert np.array_equal(np.asarray(model.patch_proj[...]), np.asarray(fresh["patch_proj"]))
    assert f"text {vocab.text_size}/{vocab.text_size}," in init_from.describe(counts) and "patch projection newly initialised" in init_from.describe(counts)


def test_init_from_an_omni_export(run, omni_model, tmp_path):
    """The `omni export` format too: every row and tensor found, the checkpoint's logits."""
    exported = export.export(run[1] / "run", tmp_path / "omni", dtype="float32")
    cfg = tiny_config()
    cfg.model.init_from = str(exported)
    graphdef, params = nnx.split(build_model(cfg, omni_model.vocab), nnx.Param)
    fresh = nnx.to_pure_dict(params)
    loaded = init_from.load(cfg, omni_model.vocab, omni_model.tokenizer, fresh)
    assert all(got == total for got, total in (loaded.counts[k] for k in init_from.ROW_KINDS))
    model = nnx.merge(graphdef, init_from.place(fresh, loaded))
    prompt = prompt_of(omni_model, [{"image": an_image(4)}, {"text": "a"}])
    batch = generate.prompt_batch([prompt], 1, len(prompt["tokens"]))
    got = np.asarray(model({k: jnp.asarray(v) for k, v in batch.items()}))[0]
    assert np.abs(got - omni_logits(omni_model, prompt)).max() <= TOLERANCE


def test_the_text_tokenizer_comes_from_a_llama_folder(run, tmp_path):
    folder = make_llama(tmp_path / "llama", tie=False)
    cfg = tiny_config()
    cfg.model.init_from = str(folder)
    logged = []
    assert init_from.with_source_tokenizer(cfg, logged.append).data.tokenizer == str(folder)
    assert "tokenizer.json" in logged[0] and cfg.data.tokenizer == ""  # a new config; the caller's is untouched
    cfg.data.tokenizer = "bytes"
    assert init_from.with_source_tokenizer(cfg).data.tokenizer == "bytes"  # an explicit choice stays
    cfg.model.init_from, cfg.data.tokenizer = str(run[2]), ""
    assert init_from.with_source_tokenizer(cfg).data.tokenizer == ""  # omni's own export: the dataset's


def test_init_from_errors_name_the_file_or_tensor(tmp_path):
    folder = make_llama(tmp_path / "llama", tie=False)
    cases = [
        (dict(init_from=str(tmp_path / "nowhere")), rf"model.init_from={tmp_path}/nowhere: no such folder"),
        (dict(init_from=str(tmp_path)), rf"{tmp_path}/config.json is missing"),
        (dict(d=64, mlp=64), r"tensor 'model.embed_tokens.weight' in .* has shape \[320, 32\] but this model needs "
                             r"\[\d+, 64\]; set model.d=32 model.head_dim=8"),
        (dict(layers=3), r"has no tensor 'model.layers.2.input_layernorm.weight' .*; set model.layers=2"),
        (dict(layers=1), r"holds 2 layers, model.layers is 1; set model.layers=2"),
        (dict(rope_theta=500_000.0), r"config.json has rope_theta 10000 but model.rope_theta is 500000; "
                                     r"set model.rope_theta=10000"),
        (dict(fusion="late", late_layers=1), "model.init_from starts early-fusion models only"),
    ]
    for model, message in cases:
        with pytest.raises(InitFromError, match=message):
            checked_against(folder, **model)
    mistral = tmp_path / "mistral"
    shutil.copytree(folder, mistral)
    config = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps(dict(config, model_type="mistral")))
    with pytest.raises(InitFromError, match=r"mistral/config.json has model_type 'mistral'; model.init_from reads "
                                            r"Llama models"):
        checked_against(mistral)
    (mistral / "config.json").write_text("{ not json")
    with pytest.raises(InitFromError, match=r"mistral/config.json: not valid JSON"):
        checked_against(mistral)
    (mistral / "config.json").write_text((folder / "config.json").read_text())
    (mistral / "model.safetensors").unlink()
    with pytest.raises(InitFromError, match=r"neither model.safetensors nor model.safetensors.index.json is there"):
        checked_against(mistral)
    (mistral / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "x.safetensors"}}))
    with pytest.raises(InitFromError, match=r"model.safetensors.index.json names x.safetensors, which is missing"):
        checked_against(mistral)


BLOCK_TORCH = """
import sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Blocked())
from flax import nnx
from omni.data.text_tokenizer import load_tokenizer
from omni.tokens import Vocab
from omni.train import init_from
from omni.train.step import build_model
from tests.conftest import tiny_config
cfg = tiny_config()
cfg.model.init_from = sys.argv[1]
text = load_tokenizer(sys.argv[1])
vocab = Vocab(text_size=text.vocab_size, codebook_sizes=())
fresh = nnx.to_pure_dict(nnx.state(build_model(cfg, vocab), nnx.Param))
print(init_from.describe(init_from.load(cfg, vocab, text, fresh).counts))
"""


def test_init_from_needs_neither_torch_nor_transformers(tmp_path):
    folder = make_llama(tmp_path / "llama", tie=True)
    done = subprocess.run([sys.executable, "-c", BLOCK_TORCH, str(folder)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"text (\d+)/\1, special 0/16", done.stdout), done.stdout


def _tokenizer_json(kind: str, folder: Path) -> Path:
    """A small tokenizer.json of one model kind, with an added token of its own, trained here."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = ["a red circle on a blue square", "the quick brown fox jumps over the lazy dog"] * 20
    model, trainer = {
        "BPE": (models.BPE(unk_token="[UNK]"), trainers.BpeTrainer(vocab_size=80, special_tokens=["[UNK]", "<|x|>"])),
        "Unigram": (models.Unigram(), trainers.UnigramTrainer(vocab_size=60, special_tokens=["[UNK]", "<|x|>"],
                                                              unk_token="[UNK]")),
        "WordLevel": (models.WordLevel(unk_token="[UNK]"), trainers.WordLevelTrainer(special_tokens=["[UNK]",
                                                                                                     "<|x|>"])),
        "WordPiece": (models.WordPiece(unk_token="[UNK]"), trainers.WordPieceTrainer(vocab_size=80, special_tokens=[
            "[UNK]", "<|x|>"])),
    }[kind]
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainer)
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


@pytest.mark.parametrize("kind", ["BPE", "Unigram", "WordLevel", "WordPiece"])
def test_a_tokenizer_json_run_gets_a_whole_vocabulary_tokenizer(tmp_path, kind):
    text = load_tokenizer(str(_tokenizer_json(kind, tmp_path / kind)))
    vocab = Vocab(text_size=text.vocab_size, codebook_sizes=(4, 4), image_codebook_sizes=(3,))
    whole = hf.vocabulary_tokenizer(text, vocab)
    assert whole.get_vocab_size(with_added_tokens=True) == vocab.size
    for sentence in ("the red fox", "a blue <|x|> dog jumps", "zebra!"):
        want = [vocab.text_offset + i for i in text.encode(sentence)]
        assert whole.encode(sentence, add_special_tokens=False).ids == want, (kind, sentence)
        assert whole.encode(sentence).ids == [1] + want  # <bos> first
    assert whole.id_to_token(vocab.audio_offset(1) + 2) == "<audio_1_2>" and whole.id_to_token(4) == "<eoi>"
    assert whole.id_to_token(vocab.image_offset(0) + 2) == "<image_0_2>"


def test_a_sentencepiece_run_is_refused_by_name(tmp_path):
    class SentencePieceLike:
        kind, name, vocab_size = "sentencepiece", "spm8k", 4

        class processor:
            id_to_piece = staticmethod(lambda i: f"p{i}")

    with pytest.raises(ExportError, match="text tokenizer is a sentencepiece model \\(spm8k\\)"):
        hf.vocabulary_tokenizer(SentencePieceLike(), Vocab(text_size=4, codebook_sizes=()))


@pytest.mark.slow
def test_llava_two_stage_recipe(tmp_path, capsys):
    """configs/llava_stage1.py then llava_stage2.py on a transformers-made Llama: stage 1 leaves every Llama tensor
    and row bitwise as loaded while the patch projection and the new rows learn; stage 2 starts from stage 1's
    checkpoint and trains everything."""
    from omni import config as config_lib
    from omni.data import pipeline
    from omni.train import checkpoint

    folder = make_llama(tmp_path / "llama", tie=False)
    tiny = ["model.d=32", "model.layers=2", "model.heads=4", "model.kv_heads=2", "model.mlp=64", "data.seq_len=128",
            "train.batch_size=8", "train.eval_every=0", "train.eval_batches=1", "demo.train_examples=300",
            "demo.eval_examples=48", "demo.scored_examples=0", "train.async_checkpoint=False"]
    root = Path(__file__).resolve().parents[1] / "configs"
    stage1 = config_lib.apply_overrides(config_lib.load_config(root / "llava_stage1.py"),
                                        tiny + ["train.steps=3", "train.checkpoint_every=3",
                                                f"model.init_from={folder}"])
    loop.train(stage1, tmp_path / "stage1", progress=False)
    out = capsys.readouterr().out
    assert "parameters train (4 of 14 tensors; frozen: blocks/" in out
    assert re.search(r"freeze_loaded_rows: 300 of \d+ vocabulary rows of embed and unembed stay", out)

    resolved = init_from.with_source_tokenizer(stage1)
    vocab = pipeline.vocab_for(resolved)
    after1 = checkpoint.restore_params(tmp_path / "stage1", 3)
    loaded = init_from.load(resolved, vocab, pipeline.tokenizer_for(resolved), after1)
    rows = loaded.from_source_rows
    for path, value in init_from._param_paths(after1):
        name = "/".join(path)
        if path[0] in ("blocks", "final_norm"):
            assert np.array_equal(value, init_from._get(loaded.params, path)), name
    assert np.array_equal(after1["embed"][rows], loaded.params["embed"][rows])
    assert np.array_equal(after1["unembed"][:, rows], loaded.params["unembed"][:, rows])
    new_rows = ~rows & (np.arange(vocab.size) < vocab.used_size)
    assert not np.array_equal(after1["embed"][new_rows], np.asarray(build_model(resolved, vocab).embed[...])[new_rows])

    stage2 = config_lib.apply_overrides(config_lib.load_config(root / "llava_stage2.py"),
                                        tiny + ["train.steps=2", "train.checkpoint_every=2",
                                                f"model.init_from={tmp_path / 'stage1'}"])
    loop.train(stage2, tmp_path / "stage2", progress=False)
    out = capsys.readouterr().out
    assert f"model.init_from={tmp_path / 'stage1'} (omni run, step 3): all 14 tensors loaded as saved" in out
    assert f"the text tokenizer is {folder}" in out
    after2 = checkpoint.restore_params(tmp_path / "stage2", 2)
    assert not np.array_equal(after2["blocks"]["attn"]["wq"], after1["blocks"]["attn"]["wq"])  # everything trains

    wider = config_lib.apply_overrides(stage2, ["model.d=48", "model.mlp=96"])
    abstract = nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: build_model(wider, vocab)), nnx.Param)[1])
    with pytest.raises(InitFromError, match=r"parameter 'blocks/attn/wk' of its step 3 checkpoint has shape "
                                            r"\[2, 32, 2, 8\] but this model needs \[2, 48, 2, 12\]"):
        init_from.load(wider, vocab, pipeline.tokenizer_for(resolved), abstract)
