"""From an interleaved example to one token stream: the vocabulary layout, text bytes, image patches, image and
audio codes.

An example (before tokenisation) is a dict:

    {"segments": [{"text": "a red circle"}, {"image": uint8[H, W, 3]}, {"image_codes": int[R, C, K]},
                  {"audio": int[T, K]}, ...],
     "targets": ["text"]}         # modalities the loss learns for this example: "text", "audio" and/or "image"

A segment may carry `"target": False` to keep one span of a target modality out of the loss (a text prompt
before a text answer, say). The example becomes `<bos> span span ... <eos>` where the spans are

    text    byte ids shifted into the text range
    image   <boi> p p p p <row> p p p p <row> ... <eoi>   one IMAGE_PATCH token per P x P patch (Fuyu-style),
            the pixels themselves ride along in `patches` and are projected by the model; never a target
    image_codes
            <boi> c(0,0,0) .. c(0,0,K-1) c(0,1,0) .. <row> c(1,0,0) .. <row> ... <eoi>   an image tokenizer's
            codes [R, C, K] (omni.data.image_tokenizer), each row flattened cell-major then codebook, a <row>
            after each row as for patches; codebook k in its own id range (after the audio ranges), so these
            positions are looked up in the embedding table like text and audio, and can be targets
    audio   <boa> c(0,0) c(0,1) .. c(0,K-1) c(1,0) .. <eoa>   codec codes [T, K] flattened frame-major, codebook k
            in its own id range so the model always knows which codebook comes next (audio_layout "flat");
            with the delay pattern (audio_layout "delay", MusicGen-style) step s holds c(s,0) c(s-1,1) ..
            c(s-K+1,K-1), T+K-1 steps, <delay> where a codebook has not started or has ended, so coarse codes
            of a frame come before the fine codes that depend on them by a whole step

Every position of an image span (patches or codes, markers included) has modality IMAGE; only patch positions
hold IMAGE_PATCH, which is what makes the model project pixels there. Opening and closing markers (and <row>s)
of a target audio or image-code span are targets (the model must learn to open, break and close them); `<eos>`
is a target when the example's last span is. Patch positions are never targets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import einops
import numpy as np

from omni.batch import AUDIO, IMAGE, IMAGE_PATCH, TARGET_MODALITIES, TEXT

# Special token ids; ids below NUM_SPECIAL are reserved for markers.
PAD_ID, BOS, EOS, BOI, EOI, ROW, BOA, EOA, _IMAGE_PATCH, AUDIO_DELAY = range(10)
assert _IMAGE_PATCH == IMAGE_PATCH  # the id the batch contract names (omni.batch)
NUM_SPECIAL = 16
SPECIAL_NAMES = {PAD_ID: "<pad>", BOS: "<bos>", EOS: "<eos>", BOI: "<boi>", EOI: "<eoi>", ROW: "<row>",
                 BOA: "<boa>", EOA: "<eoa>", IMAGE_PATCH: "<patch>", AUDIO_DELAY: "<delay>"}
AUDIO_LAYOUTS = ("flat", "delay")
SEGMENT_KINDS = ("text", "image", "image_codes", "audio")  # what encode_example takes
MODALITY_OF = {"text": "text", "image": "image", "image_codes": "image", "audio": "audio"}


@dataclass(frozen=True)
class Vocab:
    """Id ranges of the one shared vocabulary:

        [specials | text | audio codebook 0 | audio codebook 1 | ... | image codebook 0 | image codebook 1 | ...]

    Image codebooks come last, so a vocabulary without them has exactly the ids (and size) it had before image
    codes existed: older checkpoints and exports load unchanged."""

    text_size: int
    codebook_sizes: tuple[int, ...]  # the audio codec's codebooks
    pad_to: int = 128  # the embedding/unembedding rows are padded so they shard and tile evenly
    image_codebook_sizes: tuple[int, ...] = ()  # the image tokenizer's codebooks (omni.data.image_tokenizer)

    @property
    def text_offset(self) -> int:
        return NUM_SPECIAL

    def audio_offset(self, codebook: int) -> int:
        return NUM_SPECIAL + self.text_size + sum(self.codebook_sizes[:codebook])

    def image_offset(self, codebook: int) -> int:
        return NUM_SPECIAL + self.text_size + sum(self.codebook_sizes) + sum(self.image_codebook_sizes[:codebook])

    @property
    def used_size(self) -> int:
        return NUM_SPECIAL + self.text_size + sum(self.codebook_sizes) + sum(self.image_codebook_sizes)

    @property
    def size(self) -> int:
        return -(-self.used_size // self.pad_to) * self.pad_to

    def audio_codebook_of(self, token_id: int) -> int | None:
        for k in range(len(self.codebook_sizes)):
            if self.audio_offset(k) <= token_id < self.audio_offset(k) + self.codebook_sizes[k]:
                return k
        return None

    def image_codebook_of(self, token_id: int) -> int | None:
        for k in range(len(self.image_codebook_sizes)):
            if self.image_offset(k) <= token_id < self.image_offset(k) + self.image_codebook_sizes[k]:
                return k
        return None


def token_names(vocab: Vocab, text_names) -> list[str]:
    """A readable name for every id of the vocabulary, as a tokenizer.json spells its tokens (omni export
    --format hf writes them; model.init_from matches vocabularies by them). A text token spelt like one of the
    other names would clash; callers that need unique names check:

        specials      SPECIAL_NAMES (<pad>, <bos>, ...), the unnamed reserved ids <special_10> .. <special_15>
        text          text_names[t] (the text tokenizer's own strings, omni.data.text_tokenizer.token_strings)
        audio         <audio_K_C>: code C of audio codebook K
        image codes   <image_K_C>: code C of image codebook K
        the rest      <unused_ID>: padding rows, and text ids the tokenizer has no token at (None in text_names)
    """
    if len(text_names) != vocab.text_size:
        raise ValueError(f"{len(text_names)} text names for a vocabulary of {vocab.text_size} text ids")
    names = [SPECIAL_NAMES.get(i, f"<special_{i}>") for i in range(NUM_SPECIAL)]
    names += list(text_names)
    for k, size in enumerate(vocab.codebook_sizes):
        names += [f"<audio_{k}_{c}>" for c in range(size)]
    for k, size in enumerate(vocab.image_codebook_sizes):
        names += [f"<image_{k}_{c}>" for c in range(size)]
    names += [None] * (vocab.size - len(names))
    return [name if name is not None else f"<unused_{i}>" for i, name in enumerate(names)]


def patchify(image_HxWx3: np.ndarray, patch_size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [H/P, W/P, P*P*3], the raw pixels of each patch (the model scales them)."""
    image_HxWx3 = np.asarray(image_HxWx3)
    if image_HxWx3.ndim != 3:
        raise ValueError(f"image of shape {image_HxWx3.shape} is not [H, W, 3]")
    h, w, c = image_HxWx3.shape
    if c != 3 or h % patch_size or w % patch_size:
        raise ValueError(f"image of shape {image_HxWx3.shape} is not [H, W, 3] with H and W multiples of "
                         f"patch size {patch_size}")
    if image_HxWx3.dtype != np.uint8:
        raise ValueError(f"image pixels are {image_HxWx3.dtype}, expected uint8 (0..255)")
    return einops.rearrange(image_HxWx3, "(h p1) (w p2) c -> h w (p1 p2 c)", p1=patch_size, p2=patch_size)


def scale_pixels(patches):
    """uint8 pixels -> float32 in [-1, 1], as the model sees them (numpy or jax arrays)."""
    return patches.astype(np.float32) / 127.5 - 1.0


def unpatchify(patches_RxCxD: np.ndarray, patch_size: int) -> np.ndarray:
    """The inverse of patchify, back to uint8 [H, W, 3]."""
    return einops.rearrange(np.asarray(patches_RxCxD, np.uint8), "h w (p1 p2 c) -> (h p1) (w p2) c",
                            p1=patch_size, p2=patch_size)


def check_codes(codes: np.ndarray, codebook_sizes, allow_empty: bool = False) -> None:
    """ValueError unless codes are int [frames >= 1 (>= 0 with allow_empty), K] with code k in
    [0, codebook_sizes[k]): the one check of audio codes, wherever they come from (a build, a prompt, a model)."""
    codes = np.asarray(codes)
    k = len(codebook_sizes)
    if codes.ndim != 2 or codes.shape[1] != k:
        raise ValueError(f"codes of shape {list(codes.shape)} do not match the codec's {k} codebooks "
                         f"(expected [frames, {k}])")
    if len(codes) == 0 and not allow_empty:
        raise ValueError("codes have no frames")
    sizes = np.asarray(codebook_sizes)
    bad = (codes < 0) | (codes >= sizes[None, :])
    if bad.any():
        t, j = np.argwhere(bad)[0]
        raise ValueError(f"code {codes[t, j]} at frame {t}, codebook {j} is outside [0, {sizes[j]}) "
                         f"(codebook sizes {list(codebook_sizes)})")


def check_image_codes(codes_RxCxK: np.ndarray, codebook_sizes) -> None:
    """ValueError unless codes are int [rows >= 1, cols >= 1, K] with code k in [0, codebook_sizes[k]): the one
    check of image codes, from a tokenizer or a user's .npy."""
    codes = np.asarray(codes_RxCxK)
    k = len(codebook_sizes)
    if codes.ndim != 3 or codes.shape[2] != k or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"image codes {codes.dtype}{list(codes.shape)} do not match the image tokenizer's {k} "
                         f"codebooks (expected integers [rows, cols, {k}])")
    if codes.shape[0] == 0 or codes.shape[1] == 0:
        raise ValueError(f"image codes of shape {list(codes.shape)} have no cells")
    sizes = np.asarray(codebook_sizes)
    bad = (codes < 0) | (codes >= sizes[None, None, :])
    if bad.any():
        r, c, j = np.argwhere(bad)[0]
        raise ValueError(f"image code {codes[r, c, j]} at row {r}, column {c}, codebook {j} is outside "
                         f"[0, {sizes[j]}) (image codebook sizes {list(codebook_sizes)})")


def flatten_image_codes(codes_RxCxK: np.ndarray, vocab: Vocab) -> np.ndarray:
    """Image codes [R, C, K] -> token ids [R, C*K]: each row cell-major then codebook, codebook k shifted into its
    own id range (the <row> markers between rows are the caller's)."""
    codes = np.asarray(codes_RxCxK)
    check_image_codes(codes, vocab.image_codebook_sizes)
    offsets = np.asarray([vocab.image_offset(k) for k in range(len(vocab.image_codebook_sizes))])
    return (codes + offsets[None, None, :]).astype(np.int32).reshape(codes.shape[0], -1)


def unflatten_image_codes(token_ids: np.ndarray, vocab: Vocab, cols: int) -> np.ndarray:
    """Image code ids of whole rows [R * C * K] (no markers) -> codes [R, C, K]; the inverse of flatten_image_codes."""
    k = len(vocab.image_codebook_sizes)
    offsets = np.asarray([vocab.image_offset(i) for i in range(k)])
    return np.asarray(token_ids).reshape(-1, cols, k) - offsets[None, None, :]


def flatten_codes(codes_TxK: np.ndarray, vocab: Vocab, layout: str = "flat") -> np.ndarray:
    """Codec codes [T, K] -> token ids, codebook k shifted into its own id range; [T*K] frame-major for the
    "flat" layout, [(T+K-1)*K] for the "delay" layout (module docstring)."""
    codes = np.asarray(codes_TxK)
    check_codes(codes, vocab.codebook_sizes, allow_empty=True)
    sizes = np.asarray(vocab.codebook_sizes)
    offsets = np.asarray([vocab.audio_offset(k) for k in range(len(sizes))])
    ids = (codes + offsets[None, :]).astype(np.int32)
    if layout == "flat":
        return ids.reshape(-1)
    if layout != "delay":
        raise ValueError(f"audio layout {layout!r} is not one of {AUDIO_LAYOUTS}")
    t, k = ids.shape
    delayed = np.full((t + k - 1, k), AUDIO_DELAY, np.int32)
    for j in range(k):
        delayed[j:j + t, j] = ids[:, j]
    return delayed.reshape(-1)


def unflatten_codes(token_ids: np.ndarray, vocab: Vocab, layout: str = "flat") -> np.ndarray:
    """Audio token ids (whole steps of K) -> codes [T, K]; the inverse of flatten_codes."""
    k = len(vocab.codebook_sizes)
    ids = np.asarray(token_ids)[: len(token_ids) // k * k].reshape(-1, k)
    offsets = np.asarray([vocab.audio_offset(i) for i in range(k)])
    if layout == "delay":
        t = len(ids) - k + 1
        if t <= 0:
            return np.zeros((0, k), np.int64)
        ids = np.stack([ids[j:j + t, j] for j in range(k)], axis=1)
    return ids - offsets[None, :]


def encode_example(example: dict, vocab: Vocab, tokenizer, patch_size: int, audio_layout: str = "flat") -> dict:
    """An example dict (module docstring) -> per-position arrays of one segment, length n.

    Returns tokens int32[n], modality int32[n], is_target bool[n], and the example's image patches in order:
    patches uint8[p, P*P*3] with patch_positions int32[p], each patch's position in the example.
    """
    targets = set(example.get("targets", ()))
    unknown = targets - set(TARGET_MODALITIES)
    if unknown:
        raise ValueError(f"targets {sorted(unknown)} are not learnable modalities; choose from {TARGET_MODALITIES}")
    patch_dim = patch_size * patch_size * 3
    tokens: list[np.ndarray] = []
    modality: list[np.ndarray] = []
    target: list[np.ndarray] = []
    patches: list[tuple[int, np.ndarray]] = []  # (position, [P*P*3]) of every image patch
    length = 0

    def emit(ids, mod, is_target):
        nonlocal length
        ids = np.asarray(ids, np.int32).reshape(-1)
        tokens.append(ids)
        modality.append(np.full(len(ids), mod, np.int32))
        target.append(np.full(len(ids), is_target, bool))
        length += len(ids)

    segments = example.get("segments") or []
    if not segments:
        raise ValueError("example has no segments")
    emit([BOS], TEXT, False)
    last_is_target = False
    for i, segment in enumerate(segments):
        kinds = [k for k in SEGMENT_KINDS if k in segment]
        if len(kinds) != 1:
            raise ValueError(f"segment {i} must have exactly one of {'/'.join(SEGMENT_KINDS)}, has {kinds or 'none'}")
        kind = kinds[0]
        # patches are inputs only: an image is learned only as codes
        is_target = kind != "image" and MODALITY_OF[kind] in targets and segment.get("target", True)
        if kind == "text":
            ids = np.asarray(tokenizer.encode(segment["text"]), np.int32) + vocab.text_offset
            emit(ids, TEXT, is_target)
        elif kind == "image":
            grid = patchify(np.asarray(segment["image"]), patch_size)
            emit([BOI], IMAGE, False)
            for row in grid:
                for patch in row:
                    patches.append((length, patch))
                    emit([IMAGE_PATCH], IMAGE, False)
                emit([ROW], IMAGE, False)
            emit([EOI], IMAGE, False)
        elif kind == "image_codes":
            emit([BOI], IMAGE, is_target)
            for row in flatten_image_codes(segment["image_codes"], vocab):
                emit(row, IMAGE, is_target)
                emit([ROW], IMAGE, is_target)
            emit([EOI], IMAGE, is_target)
        else:
            emit([BOA], AUDIO, is_target)
            emit(flatten_codes(segment["audio"], vocab, audio_layout), AUDIO, is_target)
            emit([EOA], AUDIO, is_target)
        last_is_target = is_target
    emit([EOS], TEXT, last_is_target)

    return {
        "tokens": np.concatenate(tokens),
        "modality": np.concatenate(modality),
        "is_target": np.concatenate(target),
        "patches": (np.stack([patch for _, patch in patches]) if patches
                    else np.zeros((0, patch_dim), np.uint8)),
        "patch_positions": np.asarray([position for position, _ in patches], np.int32),
    }


def describe_tokens(token_ids, vocab: Vocab, tokenizer) -> str:
    """A readable rendering of a token stream (for logs and debugging)."""
    out, text = [], []
    for t in map(int, token_ids):
        if vocab.text_offset <= t < vocab.text_offset + vocab.text_size:
            text.append(t - vocab.text_offset)
            continue
        if text:
            out.append(tokenizer.decode(text))
            text = []
        k, j = vocab.audio_codebook_of(t), vocab.image_codebook_of(t)
        name = (f"<a{k}:{t - vocab.audio_offset(k)}>" if k is not None else
                f"<i{j}:{t - vocab.image_offset(j)}>" if j is not None else f"<{t}>")
        out.append(SPECIAL_NAMES.get(t, name))
    if text:
        out.append(tokenizer.decode(text))
    return "".join(out)


MAX_CHUNKS = 64  # the most pieces data.overlong="split" cuts one example into
_pipeline_log = logging.getLogger("omni.data")  # the input pipeline applies this rule and owns its warnings


def slice_positions(encoded: dict, start: int, stop: int) -> dict:
    """Positions start..stop-1 of an encoded example (encode_example), its patches with them, renumbered."""
    inside = (encoded["patch_positions"] >= start) & (encoded["patch_positions"] < stop)
    out = {k: encoded[k][start:stop] for k in ("tokens", "modality", "is_target")}
    out["patches"] = encoded["patches"][inside]
    out["patch_positions"] = (encoded["patch_positions"][inside] - start).astype(np.int32)
    return out


def fit_to_length(encoded: dict, seq_len: int, overlong: str, example_id: str) -> list[dict]:
    """The example as pieces of at most seq_len positions, by the data.overlong rule."""
    n = len(encoded["tokens"])
    if n <= seq_len:
        return [encoded]
    if overlong == "error":
        raise ValueError(f"example {example_id} has {n} tokens, more than data.seq_len={seq_len}; raise "
                         "data.seq_len or set data.overlong=split|truncate")
    if overlong == "truncate":
        _pipeline_log.warning("example %s: %d tokens truncated to data.seq_len=%d", example_id, n, seq_len)
        return [slice_positions(encoded, 0, seq_len)]
    if n > MAX_CHUNKS * seq_len:
        raise ValueError(f"example {example_id} has {n} tokens, more than {MAX_CHUNKS} x data.seq_len; "
                         "raise data.seq_len or shorten the example")
    return [slice_positions(encoded, start, start + seq_len) for start in range(0, n, seq_len)]
