import json
import random

import pytest

from omni.data import text_tokenizer as TT

# Text the BPE never saw: accents, CJK, emoji (incl. a ZWJ sequence), control characters, whitespace runs.
UNSEEN = [
    "",
    " ",
    "   leading and trailing   ",
    "tabs\tand\nnewlines\r\n\n\n",
    "héllo wörld — naïve café",
    "日本語のテキスト 한국어 العربية",
    "emoji 🎉🚀 👩‍👩‍👧 flags 🇫🇷",
    "\x00\x01 control \x7f chars",
    "CamelCaseIdentifiers_and_snake_case 12345.678e-9",
]


def corpus(n=400, seed=0):
    """A few hundred generated sentences with repeated words, so BPE has pairs worth merging."""
    rng = random.Random(seed)
    subjects = ["the quick fox", "a lazy dog", "my neighbour", "the old machine", "every student", "café owner"]
    verbs = ["jumps over", "looks at", "repairs", "writes about", "remembers", "photographs"]
    objects = ["the fence", "a red circle", "the blue square", "tomorrow's weather", "an audio clip", "数字 42"]
    return [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} number {rng.randrange(1000)}."
            for _ in range(n)]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    TT.train_bpe(corpus(), 400, out)
    return out


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    sentencepiece = pytest.importorskip("sentencepiece")
    out = tmp_path_factory.mktemp("spm")
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_prefix=str(out / "tiny"),
                                             vocab_size=100, hard_vocab_limit=False, minloglevel=2)
    return out / "tiny.model"


def test_bytes_round_trip_and_identity():
    tok = TT.load_tokenizer("bytes")
    assert isinstance(tok, TT.ByteTokenizer) and TT.load_tokenizer("byte").kind == "bytes"
    for text in UNSEEN:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
    assert tok.files() == []
    assert tok.identity() == {"kind": "bytes", "name": "bytes", "vocab_size": 256, "sha256": None}


def test_bpe_reaches_vocab_size_and_writes_meta(bpe_dir):
    tok = TT.load_tokenizer(bpe_dir)
    assert isinstance(tok, TT.HFTokenizer)
    assert tok.vocab_size == 400
    meta = json.loads((bpe_dir / TT.META_FILE).read_text())
    assert meta["vocab_size"] == 400 and meta["num_texts"] == 400 and meta["tokenizers_version"]


def test_bpe_round_trips_anything_exactly(bpe_dir):
    tok = TT.load_tokenizer(bpe_dir / "tokenizer.json")
    for text in UNSEEN + corpus(20, seed=1):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text, text
    # Random unicode strings (any code point but surrogates, which are not UTF-8) come back unchanged too.
    rng = random.Random(0)
    for _ in range(50):
        text = "".join(chr(rng.choice([rng.randrange(0x20, 0x7f), rng.randrange(0xa0, 0xd800),
                                       rng.randrange(0xe000, 0x110000), 0x20, 0x0a])) for _ in range(20))
        assert tok.decode(tok.encode(text)) == text


def test_bpe_compresses_training_text(bpe_dir):
    tok = TT.load_tokenizer(bpe_dir)
    text = " ".join(corpus())
    n_ids, n_bytes = len(tok.encode(text)), len(text.encode("utf-8"))
    assert n_ids < n_bytes / 2, (n_ids, n_bytes)


def test_bpe_adds_no_special_tokens_and_drops_out_of_range_ids(bpe_dir):
    tok = TT.load_tokenizer(bpe_dir)
    assert tok.encode("") == []
    ids = tok.encode("a red circle")
    assert tok.decode(ids + [tok.vocab_size, -1, 10**9]) == "a red circle"


def test_bpe_small_corpus_says_why_vocab_is_short(tmp_path):
    with pytest.warns(UserWarning, match="no more pairs to merge"):
        tok = TT.train_bpe(["abab"] * 3, 1000, tmp_path)
    assert 256 < tok.vocab_size < 1000
    assert json.loads((tmp_path / TT.META_FILE).read_text())["requested_vocab_size"] == 1000


def test_bpe_rejects_tiny_vocab_and_no_text(tmp_path):
    with pytest.raises(TT.TokenizerError, match="at least 256"):
        TT.train_bpe(["hello"], 100, tmp_path)
    with pytest.raises(TT.TokenizerError, match="no text"):
        TT.train_bpe([], 300, tmp_path / "empty")
    with pytest.raises(TT.TokenizerError, match="no text"):
        TT.train_bpe(["", ""], 300, tmp_path / "empty")
    assert not (tmp_path / "empty").exists()


def test_save_and_reload_gives_identical_ids(bpe_dir, sp_model, tmp_path):
    text = " ".join(corpus(30, seed=2)) + " " + " ".join(UNSEEN)
    for i, tok in enumerate([TT.load_tokenizer(bpe_dir), TT.load_tokenizer(sp_model), TT.ByteTokenizer()]):
        out = tmp_path / f"export{i}"
        written = TT.save_tokenizer(tok, out)
        assert out / TT.IDENTITY_FILE in written
        again = TT.load_tokenizer(out) if tok.files() else TT.load_tokenizer("bytes")
        assert type(again) is type(tok)
        assert again.encode(text) == tok.encode(text)
        assert again.identity() == tok.identity() == json.loads((out / TT.IDENTITY_FILE).read_text())
    assert (tmp_path / "export0" / TT.META_FILE).is_file()  # the trained BPE's meta travels with it


def test_sentencepiece_matches_the_library(sp_model):
    import sentencepiece

    reference = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    for spec in (sp_model, sp_model.parent, str(sp_model)):
        tok = TT.load_tokenizer(spec)
        assert isinstance(tok, TT.SentencePieceTokenizer) and tok.kind == "sentencepiece"
        assert tok.vocab_size == reference.get_piece_size()
    for text in corpus(20, seed=3):
        ids = tok.encode(text)
        assert ids == reference.encode(text, out_type=int)
        assert reference.bos_id() not in ids and reference.eos_id() not in ids
        assert tok.decode(ids) == text
    # SentencePiece folds whitespace: leading, trailing and repeated spaces do not come back.
    assert tok.decode(tok.encode("  the  fence ")) == "the fence"
    assert tok.decode(tok.encode("a red circle") + [tok.vocab_size]) == "a red circle"


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(TT.TokenizerError, match="no such file") as e:
        TT.load_tokenizer(missing)
    assert str(missing) in str(e.value) and '"bytes"' in str(e.value)

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "tokenizer.json").write_text("{not json")
    for spec in (corrupt, corrupt / "tokenizer.json"):
        with pytest.raises(TT.TokenizerError, match="cannot load tokenizer.json") as e:
            TT.load_tokenizer(spec)
        assert str(corrupt / "tokenizer.json") in str(e.value) and "Accepted" in str(e.value)

    bad_model = tmp_path / "bad.model"
    bad_model.write_bytes(b"not a protobuf")
    with pytest.raises(TT.TokenizerError, match="cannot load SentencePiece model") as e:
        TT.load_tokenizer(bad_model)
    assert str(bad_model) in str(e.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TT.TokenizerError, match="no tokenizer.json and no") as e:
        TT.load_tokenizer(empty)
    assert str(empty) in str(e.value)

    (empty / "a.model").write_bytes(b"")
    (empty / "b.model").write_bytes(b"")
    with pytest.raises(TT.TokenizerError, match="a.model, b.model"):
        TT.load_tokenizer(empty)

    other = tmp_path / "vocab.txt"
    other.write_text("a\nb\n")
    with pytest.raises(TT.TokenizerError, match="cannot tell the tokenizer format"):
        TT.load_tokenizer(other)


def test_identity_changes_with_the_file(bpe_dir, tmp_path):
    tok = TT.load_tokenizer(bpe_dir)
    TT.save_tokenizer(tok, tmp_path)
    before = TT.load_tokenizer(tmp_path).identity()
    assert before["sha256"] == tok.identity()["sha256"] and len(before["sha256"]) == 64
    # Same tokenizer, one merge fewer: a different file, so a different identity.
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["model"]["merges"] = data["model"]["merges"][:-1]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    after = TT.load_tokenizer(tmp_path).identity()
    assert after["sha256"] != before["sha256"]
