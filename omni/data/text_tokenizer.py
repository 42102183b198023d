"""Text tokenizers behind one small interface: UTF-8 bytes, a Hugging Face `tokenizer.json`, a SentencePiece model.

Every tokenizer here has

    kind        "bytes" | "tokenizer.json" | "sentencepiece"
    name        a readable name (logs, exports)
    vocab_size  every id encode can return is in [0, vocab_size)
    encode(text) -> list[int]   plain text ids, never <bos>/<eos> of its own (omni adds its own markers and
                                shifts the ids into the text range of the shared vocabulary, omni.tokens.Vocab)
    decode(ids) -> str          ids outside [0, vocab_size) are dropped, as ByteTokenizer does
    files()    -> list[Path]    what it takes to load it again (empty for bytes)
    identity() -> dict          {kind, name, vocab_size, sha256}: a checkpoint records it, so a model is never
                                fed ids from a different tokenizer than the one it was trained with

`load_tokenizer(spec)` turns a command-line spec into one of them, `train_bpe` trains a byte-level BPE locally,
and `save_tokenizer` copies a tokenizer's files next to an export.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
from typing import Iterable, Protocol

from omni import storage
from omni.errors import TokenizerError

Path = storage.Path  # a local path or a gs:// URL (omni.storage)

HF_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"          # written by train_bpe: how the tokenizer was made
IDENTITY_FILE = "tokenizer_identity.json"  # written by save_tokenizer: what was saved
BYTE_ALPHABET = 256

# Limits of a tokenizer file (docs/data.md). The largest tokenizers in use are well inside them (Gemma 3's
# tokenizer.json: 33 MB, 262,144 tokens); a file past them would take gigabytes and minutes to load, and a vocabulary
# that size would make the model's embedding table the whole model.
MAX_TOKENIZER_BYTES = 48 * 2**20      # bytes of a tokenizer.json or SentencePiece .model
MAX_TOKENIZER_TOKENS = 2**20          # tokens in it (and the largest id + 1)

ACCEPTED_FORMS = (
    '"bytes" (UTF-8 bytes, no file); '
    "a tokenizer.json file (Hugging Face `tokenizers`) or a directory containing one; "
    "a SentencePiece .model file or a directory containing exactly one *.model"
)




class _Refused(TokenizerError):
    """A file refused for what it is (not a regular file, over a limit): its message is complete as it is."""


def _kind_of(mode: int) -> str | None:
    """What a non-regular file is, in words (None for a regular file)."""
    for test, words in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return words
    return None if stat.S_ISREG(mode) else "not a regular file"


def check_file(path, what: str, limit: int | None = None) -> None:
    """TokenizerError naming `path` and the limit, before anything reads it, when the tokenizer file is not a
    regular file (/dev/zero, a pipe: reading would never end) or is larger than `limit` (default
    MAX_TOKENIZER_BYTES; a URL is checked as it is read, read_limited)."""
    path, limit = storage.path(path), MAX_TOKENIZER_BYTES if limit is None else limit
    if storage.is_remote(path):
        return
    try:
        info = os.stat(os.fspath(path))
    except OSError as e:
        raise TokenizerError(f"cannot read {what} {path}: {e.strerror or e}") from None
    kind = _kind_of(info.st_mode)
    if kind is not None:
        raise _Refused(f"{what} {path} is {kind}, not a file; give a tokenizer.json or SentencePiece .model file")
    if info.st_size > limit:
        raise _too_big(path, what, info.st_size, limit)


def read_limited(path, what: str, limit: int | None = None) -> bytes:
    """The bytes of the tokenizer file `path` after check_file; never more than limit + 1 bytes are read (a file
    that grows, a size the file system does not report)."""
    path, limit = storage.path(path), MAX_TOKENIZER_BYTES if limit is None else limit
    check_file(path, what, limit)
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise TokenizerError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise _too_big(path, what, None, limit)
    return data


def _too_big(path, what: str, size, limit: int) -> TokenizerError:
    size = f"{size / 2**20:,.1f} MiB" if size is not None else "larger than that"
    return _Refused(f"{what} {path} is {size}, more than the limit of {limit / 2**20:g} MiB for a tokenizer file "
                    "(omni.data.text_tokenizer.MAX_TOKENIZER_BYTES; the largest tokenizers in use are about 33 MB); "
                    "use a smaller tokenizer")


def _check_tokens(path, what: str, count: int, largest_id: int | None = None) -> None:
    """_Refused when a tokenizer holds more than MAX_TOKENIZER_TOKENS tokens, or ids that reach past it."""
    if count > MAX_TOKENIZER_TOKENS:
        detail = f"{count:,} tokens"
    elif largest_id is not None and largest_id >= MAX_TOKENIZER_TOKENS:
        detail = f"a token with id {largest_id:,}"
    else:
        return
    raise _Refused(f"{what} {path} has {detail}, more than the limit of {MAX_TOKENIZER_TOKENS:,} tokens "
                   "(omni.data.text_tokenizer.MAX_TOKENIZER_TOKENS; the largest vocabularies in use have about "
                   "262,000); use a tokenizer with a smaller vocabulary")


class TextTokenizer(Protocol):
    kind: str
    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids) -> str: ...
    def files(self) -> list[Path]: ...
    def identity(self) -> dict: ...


def sha256_of(paths: list[Path]) -> str | None:
    """sha256 of one file's bytes; of several, sha256 over their names and hashes in order; None for no file."""
    if not paths:
        return None
    digests = [hashlib.sha256(storage.path(p).read_bytes()).hexdigest() for p in paths]
    if len(digests) == 1:
        return digests[0]  # so it can be checked with `sha256sum tokenizer.json`
    joined = "".join(f"{storage.path(p).name}:{d}\n" for p, d in zip(paths, digests))
    return hashlib.sha256(joined.encode()).hexdigest()


def _identity(tok) -> dict:
    return {"kind": tok.kind, "name": tok.name, "vocab_size": tok.vocab_size, "sha256": sha256_of(tok.files())}


class ByteTokenizer:
    """UTF-8 bytes as tokens (the default): 256 ids, no training, no unknown words, no file."""

    kind = "bytes"
    name = "bytes"
    vocab_size = BYTE_ALPHABET

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= i < BYTE_ALPHABET).decode("utf-8", errors="replace")

    def files(self) -> list[Path]:
        return []

    def identity(self) -> dict:
        return _identity(self)


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` read from a tokenizer.json (one trained by train_bpe, or a user's)."""

    kind = "tokenizer.json"

    def __init__(self, path: str | os.PathLike, name: str | None = None):
        import tokenizers  # imported here so byte-level runs do not need the library

        self.path = storage.path(path)
        data = read_limited(self.path, "tokenizer.json")
        try:
            self.tokenizer = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # the Rust side raises a bare Exception for missing, unreadable and bad files
            raise TokenizerError(f"cannot load tokenizer.json {self.path}: {_short(e)}; it must be a file saved by "
                                 f"Hugging Face `tokenizers` (Tokenizer.save) or by omni's train_bpe") from None
        _check_tokens(self.path, "tokenizer.json", self.tokenizer.get_vocab_size(with_added_tokens=True))
        # Added tokens may sit above the model's own vocabulary, so the size is the largest id + 1, not the count.
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        if not vocab:
            raise TokenizerError(f"tokenizer.json {self.path} has an empty vocabulary; train or pick another one")
        self.vocab_size = max(vocab.values()) + 1
        _check_tokens(self.path, "tokenizer.json", len(vocab), self.vocab_size - 1)
        self.name = name or _name_from_path(self.path)

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: the file's post-processor may add its own [CLS]/<s>; omni adds <bos>/<eos>.
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        # Special tokens are kept: any that encode produced came from the text itself, so dropping them would
        # not give the text back.
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def files(self) -> list[Path]:
        return [self.path]

    def identity(self) -> dict:
        return _identity(self)


class SentencePieceTokenizer:
    """A SentencePiece model (.model) read with the `sentencepiece` library.

    SentencePiece normalises text before it tokenises (NFKC and whitespace folding by default), so decode gives
    back the normalised text, not always the input: leading/trailing spaces and runs of spaces are lost, and
    characters missing from the model become <unk> (decoded as " ⁇ ") unless it was trained with byte_fallback.
    """

    kind = "sentencepiece"

    def __init__(self, path: str | os.PathLike, name: str | None = None):
        import sentencepiece

        self.path = storage.path(path)
        data = read_limited(self.path, "SentencePiece model")
        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_proto=data)
        except (OSError, RuntimeError, TypeError) as e:
            raise TokenizerError(f"cannot load SentencePiece model {self.path}: {_short(e)}; it must be a .model "
                                 f"file written by SentencePieceTrainer") from None
        self.vocab_size = self.processor.get_piece_size()
        _check_tokens(self.path, "SentencePiece model", self.vocab_size)
        self.name = name or _name_from_path(self.path)

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text, out_type=int, add_bos=False, add_eos=False)

    def decode(self, ids) -> str:
        # sentencepiece raises on an out-of-range id; drop them instead, like the other tokenizers.
        return self.processor.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def files(self) -> list[Path]:
        return [self.path]

    def identity(self) -> dict:
        return _identity(self)


def _short(e: BaseException) -> str:
    """An error's text on one line, cut to 300 characters (the Rust side may quote much of a bad file)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _name_from_path(path: Path) -> str:
    """'runs/bpe8k/tokenizer.json' -> 'bpe8k'; 'spm/llama.model' -> 'llama'."""
    if path.name == HF_FILE and path.parent.name:
        return path.parent.name
    return path.stem


def byte_level_chars() -> list[str]:
    """The printable character GPT-2's byte-level BPE (and `tokenizers`' ByteLevel) writes for each byte 0..255:
    printable Latin-1 bytes stand for themselves, the others for chr(256 + n) in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = {}, 0
    for b in range(BYTE_ALPHABET):
        if b in kept:
            chars[b] = chr(b)
        else:
            chars[b] = chr(BYTE_ALPHABET + extra)
            extra += 1
    return [chars[b] for b in range(BYTE_ALPHABET)]


def token_strings(tok: TextTokenizer) -> list[str | None]:
    """The string of every id in [0, vocab_size) (None for an id the tokenizer has no token at): what a token
    is called in a tokenizer.json, so vocabularies can be matched by string (model.init_from, export --format hf).
    Bytes are named by the byte-level alphabet (byte_level_chars), as a byte-level BPE names its first 256 tokens."""
    if tok.kind == ByteTokenizer.kind:
        return byte_level_chars()
    if tok.kind == HFTokenizer.kind:
        return [tok.tokenizer.id_to_token(i) for i in range(tok.vocab_size)]
    return [tok.processor.id_to_piece(i) for i in range(tok.vocab_size)]


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike) -> HFTokenizer:
    """Trains a byte-level BPE on `texts` and saves it as out_dir/tokenizer.json (+ tokenizer_meta.json).

    Byte-level: text is split into UTF-8 bytes before merging (ByteLevel pre-tokenizer and decoder, all 256 bytes
    in the initial alphabet), so every string encodes without <unk> and decodes back exactly. No normaliser and no
    prefix space, for the same reason. The vocabulary can end up smaller than asked when the corpus runs out of
    pairs to merge; a warning says so and the meta file records both sizes.
    """
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    out_dir = storage.path(out_dir)
    if vocab_size < BYTE_ALPHABET:
        raise TokenizerError(f"BPE vocab_size {vocab_size} is smaller than the {BYTE_ALPHABET}-byte alphabet it "
                             f"starts from; ask for at least {BYTE_ALPHABET} (a few thousand is usual)")
    stats = {"texts": 0, "chars": 0}

    def counted(texts):
        for text in texts:
            if not isinstance(text, str):
                raise TokenizerError(f"train_bpe got a {type(text).__name__} among its texts; pass strings")
            stats["texts"] += 1
            stats["chars"] += len(text)
            yield text

    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tokenizer.train_from_iterator(counted(texts), trainer=trainer)
    if stats["chars"] == 0:
        raise TokenizerError(f"train_bpe got no text ({stats['texts']} texts, all empty); nothing was written to "
                             f"{out_dir}; pass the training corpus as an iterable of strings")

    got = tokenizer.get_vocab_size(with_added_tokens=True)
    if got < vocab_size:
        warnings.warn(f"BPE vocabulary has {got} tokens, not the {vocab_size} asked for: the {stats['texts']} "
                      f"training texts ({stats['chars']} characters) have no more pairs to merge; train on more "
                      f"text or ask for fewer tokens", stacklevel=2)
    out_dir.mkdir(parents=True, exist_ok=True)
    storage.write_text(out_dir / HF_FILE, tokenizer.to_str())
    meta = {"kind": "byte-level BPE", "vocab_size": got, "requested_vocab_size": vocab_size,
            "num_texts": stats["texts"], "num_chars": stats["chars"], "tokenizers_version": tokenizers.__version__}
    storage.write_text(out_dir / META_FILE, json.dumps(meta, indent=2) + "\n")
    return HFTokenizer(out_dir / HF_FILE)


def _error(spec, why: str) -> TokenizerError:
    return TokenizerError(f"text tokenizer {str(spec)!r}: {why}. Accepted: {ACCEPTED_FORMS}")


def load_tokenizer(spec: str | os.PathLike) -> TextTokenizer:
    """'bytes' -> ByteTokenizer; a tokenizer.json (or its directory) -> HFTokenizer; a .model (or a directory with
    one) -> SentencePieceTokenizer. A directory with both uses tokenizer.json (Hub model directories often ship the
    same tokenizer in both formats)."""
    if isinstance(spec, str) and spec.strip().lower() in ("bytes", "byte"):
        return ByteTokenizer()
    try:
        path = storage.path(spec)
    except storage.StorageError as e:
        raise _error(spec, str(e)) from None
    if path.is_dir():
        if (path / HF_FILE).is_file():
            return _load(HFTokenizer, path / HF_FILE, spec)
        sp_models = sorted(p for p in path.glob("*.model") if p.is_file())
        if len(sp_models) == 1:
            return _load(SentencePieceTokenizer, sp_models[0], spec)
        if sp_models:
            names = ", ".join(p.name for p in sp_models)
            raise _error(spec, f"directory holds several SentencePiece models ({names}); name the one to use")
        raise _error(spec, f"directory has no {HF_FILE} and no *.model file")
    if not path.exists():
        raise _error(spec, "no such file or directory")
    if not storage.is_remote(path):
        kind = _kind_of(os.stat(os.fspath(path)).st_mode)
        if kind is not None:
            raise _Refused(f"text tokenizer {str(spec)!r} is {kind}, not a file; give a tokenizer.json or "
                           "SentencePiece .model file (or a folder holding one), or \"bytes\"")
    if path.suffix == ".json":
        return _load(HFTokenizer, path, spec)
    if path.suffix == ".model":
        return _load(SentencePieceTokenizer, path, spec)
    raise _error(spec, "cannot tell the tokenizer format from the file name (expected .json or .model)")


def _load(cls, path: Path, spec) -> TextTokenizer:
    check_file(path, "tokenizer.json" if cls is HFTokenizer else "SentencePiece model")  # before _saved_name reads it
    try:
        return cls(path, name=_saved_name(path))
    except _Refused:
        raise
    except TokenizerError as e:  # add the accepted forms: maybe the user meant another file
        raise _error(spec, str(e)) from None


def _saved_name(path: Path) -> str | None:
    """The name save_tokenizer recorded next to `path`, if the file is still the one it saved (else None: the
    name then comes from the path). Keeps a tokenizer's identity the same across save and load."""
    try:
        if not (path.parent / IDENTITY_FILE).exists():
            return None
        saved = json.loads(read_limited(path.parent / IDENTITY_FILE, "tokenizer identity", limit=2**20))
        same = isinstance(saved, dict) and saved.get("sha256") == sha256_of([path])
    except (OSError, ValueError):  # (TokenizerError is a ValueError)
        return None  # no identity file (or an unreadable one): loading reports any real problem with `path`
    return (saved.get("name") or None) if same else None


def save_tokenizer(tok: TextTokenizer, out_dir: str | os.PathLike) -> list[Path]:
    """Copies the tokenizer's files into out_dir so load_tokenizer(out_dir) gives it back, and writes
    tokenizer_identity.json. Returns the paths written. A tokenizer.json is always saved under that name (so the
    directory loads); a trained BPE's tokenizer_meta.json goes along with it."""
    out_dir = storage.path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for src in tok.files():
        src = storage.path(src)
        dst = out_dir / (HF_FILE if tok.kind == HFTokenizer.kind else src.name)
        _copy(src, dst)
        written.append(dst)
        if tok.kind == HFTokenizer.kind and (src.parent / META_FILE).is_file():
            _copy(src.parent / META_FILE, out_dir / META_FILE)
            written.append(out_dir / META_FILE)
    storage.write_text(out_dir / IDENTITY_FILE, json.dumps(tok.identity(), indent=2) + "\n")
    written.append(out_dir / IDENTITY_FILE)
    return written


def _copy(src: Path, dst: Path) -> None:
    if storage.same(src, dst):
        return  # saving into the directory it was loaded from
    try:
        storage.write_bytes(dst, storage.path(src).read_bytes())
    except OSError as e:
        raise TokenizerError(f"cannot copy tokenizer file {src} to {dst}: {e}; check that {src} still exists and "
                             f"{dst.parent} is writable") from e
