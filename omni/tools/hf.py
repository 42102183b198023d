"""`omni export --format hf`: an early-fusion checkpoint as a folder transformers loads with no custom code.

    omni export --format hf --workdir runs/demo --out exported/demo-hf [--dtype bfloat16] [--max-shard-size 5GB]

writes

    OUT/config.json                   LlamaConfig (omni.model.hf_llama.llama_config) + an "omni" block: the vocabulary
                                      layout, special ids, patch size, the run's omni config, step and identities
    OUT/model.safetensors             the weights under HF names (omni.model.hf_llama), or, when they exceed the
                                      shard size, model-0000i-of-0000n.safetensors + model.safetensors.index.json
    OUT/generation_config.json        bos/eos/pad ids (eos: <eos> and <eoa>), greedy
    OUT/tokenizer.json                a `tokenizers` file over omni's WHOLE id space: HF id == omni id. Specials,
    OUT/tokenizer_config.json         audio codes (<audio_K_C>), image codes (<image_K_C>) and padding rows
    OUT/special_tokens_map.json       (<unused_ID>) are added special tokens; text tokens are the trained
                                      tokenizer's, shifted past the specials; encoding puts <bos> first, as omni's
                                      prompts start
    OUT/patch_projection.safetensors  the image patch projection as an nn.Linear(P, d): weight [d, P], bias [d]
    OUT/codec/                        the audio codec (as omni export writes it), absent without audio
    OUT/image_tokenizer/              the image tokenizer (as omni export writes it), absent without image codes
    OUT/README.md                     what is where, and the inputs_embeds recipe for images (INPUTS_EMBEDS_SNIPPET)

AutoModelForCausalLM / AutoTokenizer load the folder as it is. Images have no place in LlamaForCausalLM: build
`inputs_embeds` with INPUTS_EMBEDS_SNIPPET (docs/hf.md). Needs numpy, safetensors and tokenizers, not torch.
"""

from __future__ import annotations

import json
import re

import numpy as np
from safetensors.numpy import save_file

from omni import config as config_lib
from omni import storage, tokens
from omni.config import Config
from omni.data.codec import codec_identity
from omni.data.text_tokenizer import ByteTokenizer, HFTokenizer, token_strings
from omni.errors import ExportError
from omni.model import hf_llama
from omni.progress import silent
from omni.tokens import Vocab
from omni.tools import export as omni_export
from omni.train import artifact

FORMAT = "omni-hf"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD = "5GB"
STOP_IDS = (tokens.EOS, tokens.EOA)  # text answers end at <eos>, audio answers at <eoa>


def parse_size(text) -> int:
    """'5GB', '500MB', '10KB', '2GiB' or a plain count of bytes -> bytes (the units of save_pretrained's max_shard_size)."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(text), re.I)
        if not match:
            raise ExportError(f"--max-shard-size {text!r} is not a size; write e.g. 5GB, 500MB or a number of bytes")
        unit = (match.group(2) or "B").upper()
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
        size = int(float(match.group(1)) * scale)
    if size <= 0:
        raise ExportError(f"--max-shard-size must be positive, got {text!r}")
    return size


# ----------------------------------------------------------------------------------------------------------
# The tokenizer over omni's whole vocabulary.


def vocabulary_tokenizer(text_tokenizer, vocab: Vocab):
    """A `tokenizers.Tokenizer` whose id i is omni id i (text tokens as trained, everything else added tokens)."""
    import tokenizers
    from tokenizers import processors

    names = tokens.token_names(vocab, token_strings(text_tokenizer))
    seen = {}
    for i, name in enumerate(names):
        if name in seen:
            raise ExportError(f"the text tokenizer's token {seen[name] - vocab.text_offset} is spelt {name!r}, "
                              f"like omni id {i}; the HF tokenizer needs one id per string, so this tokenizer "
                              f"cannot be exported with --format hf")
        seen[name] = i
    text_ids = range(vocab.text_offset, vocab.text_offset + vocab.text_size)
    if text_tokenizer.kind == ByteTokenizer.kind:
        data = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
                "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                                  "use_regex": False},
                "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": False,
                                                     "trim_offsets": False, "use_regex": False},
                "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                          "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                          "ignore_merges": False, "vocab": {}, "merges": []}}
    elif text_tokenizer.kind == HFTokenizer.kind:
        data = json.loads(storage.path(text_tokenizer.path).read_text(encoding="utf-8"))
    else:
        raise ExportError(f"--format hf writes a tokenizer.json; the run's text tokenizer is a {text_tokenizer.kind} "
                          f"model ({text_tokenizer.name}), which has no tokenizer.json form here. Train with "
                          f"data.tokenizer=bytes or a tokenizer.json")
    model = data["model"]
    if model["type"] in ("BPE", "WordPiece", "WordLevel"):
        model["vocab"] = {name: i for i, name in enumerate(names)}
    elif model["type"] == "Unigram":
        scores = [score for _, score in model["vocab"]]
        model["vocab"] = [[name, scores[i - vocab.text_offset] if i in text_ids else 0.0]
                          for i, name in enumerate(names)]
        if model.get("unk_id") is not None:
            model["unk_id"] += vocab.text_offset
    else:
        raise ExportError(f"the text tokenizer {text_tokenizer.path} has a {model['type']} model; --format hf "
                          f"handles BPE, WordPiece, WordLevel and Unigram tokenizer.json files")
    # The file's own added tokens keep their flags at their shifted ids; every non-text id is a special token.
    own = {t["content"]: t for t in data.get("added_tokens") or []}
    data["added_tokens"] = []
    for i, name in enumerate(names):
        if i in text_ids and name not in own:
            continue
        entry = dict(own.get(name) or {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                                        "special": True}, id=i, content=name)
        data["added_tokens"].append(entry)
    data["post_processor"], data["truncation"], data["padding"] = None, None, None  # its ids were pre-shift ones
    tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    bos = tokens.SPECIAL_NAMES[tokens.BOS]
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                             special_tokens=[(bos, tokens.BOS)])
    wrong = next((i for i, name in enumerate(names) if tokenizer.token_to_id(name) != i), None)
    if wrong is not None:  # `tokenizers` renumbers added tokens it cannot place: never ship such a file
        raise ExportError(f"the HF tokenizer puts {names[wrong]!r} at id {tokenizer.token_to_id(names[wrong])}, "
                          f"not at omni id {wrong}; this tokenizer cannot be exported with --format hf")
    return tokenizer


def _tokenizer_files(text_tokenizer, vocab: Vocab, context: int, folder) -> None:
    tokenizer = vocabulary_tokenizer(text_tokenizer, vocab)
    tokenizer.save(str(folder / "tokenizer.json"))
    special = {"bos_token": tokens.SPECIAL_NAMES[tokens.BOS], "eos_token": tokens.SPECIAL_NAMES[tokens.EOS],
               "pad_token": tokens.SPECIAL_NAMES[tokens.PAD_ID]}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = dict(special, tokenizer_class="PreTrainedTokenizerFast", model_max_length=context,
                  clean_up_tokenization_spaces=False)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------
# Weights.


def hf_tensors(tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """{omni export name: array} -> ({HF name: array} of LlamaForCausalLM, {weight, bias} of the patch projection)."""
    model, patch = {}, {}
    for name, x in tensors.items():
        (patch if name in hf_llama.PATCH_NAMES else model)[hf_llama.hf_name(name)] = hf_llama.to_hf(name, x)
    return model, patch


def write_shards(tensors: dict[str, np.ndarray], folder, max_shard_bytes: int, metadata: dict) -> list:
    """model.safetensors, or shards of at most max_shard_bytes (a bigger tensor gets a shard of its own) and the
    index transformers reads (weight_map: tensor name -> file). Returns the files written."""
    shards, current, size = [], {}, 0
    for name, x in tensors.items():
        if current and size + x.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = x
        size += x.nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], folder / WEIGHTS_FILE, metadata=metadata)
        return [folder / WEIGHTS_FILE]
    files, weight_map = [], {}
    for n, shard in enumerate(shards, 1):
        file = folder / f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, file, metadata=metadata)
        files.append(file)
        weight_map.update({name: file.name for name in shard})
    index = {"metadata": {"total_size": sum(x.nbytes for x in tensors.values())}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return files


# ----------------------------------------------------------------------------------------------------------
# The export.


def export_hf(workdir, out, step: int | None = None, dtype: str = "bfloat16", max_shard_size=DEFAULT_MAX_SHARD,
              progress=silent):
    """Exports a checkpoint of `workdir` (the latest, or `step`) as an HF Llama folder `out`; returns it.

    Like omni export: `out` must be new or empty, and appears whole or not at all (omni.storage.staged_folder;
    on a bucket config.json is uploaded last)."""
    if dtype not in omni_export.DTYPES:
        raise ExportError(f"unknown --dtype {dtype!r}; allowed: {', '.join(omni_export.DTYPES)}")
    max_shard_bytes = parse_size(max_shard_size)
    out = omni_export.check_new_folder(out)
    def writable(ckpt):
        if ckpt.config.model.fusion != "early":
            raise ExportError(f"{ckpt.path} is a model.fusion='{ckpt.config.model.fusion}' run; --format hf writes "
                              "early-fusion models only (LlamaForCausalLM has no per-modality layers or "
                              "cross-attention)")

    ckpt = artifact.open_checkpoint(workdir, step, check=writable)
    cfg, vocab = ckpt.config, ckpt.vocab
    checked = ckpt.tensors()
    with progress("export", total=len(checked) + 1, unit="tensor") as bar:
        tensors = omni_export.cast_tensors(checked, dtype, bar)
        model_tensors, patch_tensors = hf_tensors(tensors)
        info = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": ckpt.step, "dtype": dtype,
                "checkpoint": str(storage.absolute(ckpt.path)),
                "vocab": artifact.vocab_block(vocab, cfg.data.audio_layout),
                "patch_size": cfg.data.patch_size, "max_image_patches": cfg.data.max_image_patches,
                "patch_file": hf_llama.PATCH_FILE,
                "tokenizer": ckpt.tokenizer.identity(),
                "codec": None if ckpt.codec is None else codec_identity(ckpt.codec),
                "image_tokenizer": ckpt.meta.get("image_tokenizer"),
                "config": config_lib.to_dict(cfg)}
        with storage.staged_folder(out, last="config.json") as tmp:
            _write(tmp, cfg, vocab, dtype, info, model_tensors, patch_tensors, ckpt.tokenizer, ckpt.codec,
                   max_shard_bytes)
            if ckpt.image_tokenizer is not None:  # image code ids are in the vocabulary: their decoder goes beside it
                artifact.save_image_tokenizer_folder(ckpt.image_tokenizer, tmp / artifact.IMAGE_TOKENIZER_DIR)
            bar.update(1, files=len(list(tmp.iterdir())))
    return out


def _write(folder, cfg: Config, vocab: Vocab, dtype: str, info: dict, model_tensors, patch_tensors, tokenizer,
           codec, max_shard_bytes: int) -> None:
    special_ids = {"bos": tokens.BOS, "eos": tokens.EOS, "pad": tokens.PAD_ID}
    llama = hf_llama.llama_config(cfg.model, vocab.size, cfg.data.seq_len, dtype, special_ids)
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    write_shards(model_tensors, folder, max_shard_bytes, metadata)
    save_file(patch_tensors, folder / hf_llama.PATCH_FILE, metadata=dict(metadata, pixels="uint8/127.5-1"))
    (folder / "config.json").write_text(json.dumps(dict(llama, omni=info), indent=2) + "\n")
    generation = {"bos_token_id": tokens.BOS, "eos_token_id": list(STOP_IDS), "pad_token_id": tokens.PAD_ID,
                  "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    _tokenizer_files(tokenizer, vocab, cfg.data.seq_len, folder)
    if codec is not None:
        artifact.save_codec_folder(codec, folder / artifact.CODEC_DIR)
    (folder / "README.md").write_text(readme(cfg, info, vocab))


# ----------------------------------------------------------------------------------------------------------
# Images: the inputs_embeds recipe. The same text is in docs/hf.md and each export's README; tests run it.

INPUTS_EMBEDS_SNIPPET = '''\
import json

import numpy as np
import torch
from safetensors.torch import load_file


def image_span(image, patch_size, ids):
    """uint8 image [H, W, 3], sides multiples of patch_size -> (token ids of omni's image span, patches uint8
    [M, P*P*3] in the order of its <patch> tokens): <boi>, per row of patches: <patch> x cols, <row>; <eoi>."""
    rows, cols = image.shape[0] // patch_size, image.shape[1] // patch_size
    patches = (image.reshape(rows, patch_size, cols, patch_size, 3).transpose(0, 2, 1, 3, 4)
               .reshape(rows * cols, patch_size * patch_size * 3))
    span = [ids["<boi>"]] + ([ids["<patch>"]] * cols + [ids["<row>"]]) * rows + [ids["<eoi>"]]
    return span, patches


def omni_inputs_embeds(model, projection, token_ids, patches, patch_id):
    """token_ids long [1, L], patches uint8 [M, P*P*3] (one per <patch> token, in order) -> inputs_embeds
    [1, L, d]: token embeddings, each <patch> position replaced by its projected pixels, scaled to [-1, 1]."""
    embeds = model.get_input_embeddings()(token_ids)
    weight, bias = projection["weight"].float(), projection["bias"].float()
    pixels = torch.as_tensor(np.asarray(patches), dtype=torch.float32) / 127.5 - 1.0
    embeds[0, token_ids[0] == patch_id] = (pixels @ weight.T + bias).to(embeds.dtype)
    return embeds


def image_text_prompt(folder, tokenizer, model, image, text):
    """omni's prompt "<bos> <image> text" as (token_ids [1, L], inputs_embeds [1, L, d])."""
    omni = json.load(open(f"{folder}/config.json"))["omni"]
    ids = omni["vocab"]["special_tokens"]
    span, patches = image_span(image, omni["patch_size"], ids)
    text_ids = tokenizer(text, add_special_tokens=False).input_ids
    token_ids = torch.tensor([[ids["<bos>"]] + span + text_ids])
    projection = load_file(f"{folder}/{omni['patch_file']}")
    return token_ids, omni_inputs_embeds(model, projection, token_ids, patches, ids["<patch>"])

# Use:
#   tokenizer = AutoTokenizer.from_pretrained(folder)
#   model = AutoModelForCausalLM.from_pretrained(folder)
#   token_ids, embeds = image_text_prompt(folder, tokenizer, model, image, "what is this")
#   logits = model(inputs_embeds=embeds).logits
#   new_ids = model.generate(inputs_embeds=embeds, max_new_tokens=20, suppress_tokens=not_text_ids)
'''


def readme(cfg: Config, info: dict, vocab: Vocab) -> str:
    m = cfg.model
    rows = [f"| `{generic}` | `{hf}` |" for generic, hf in hf_llama.HF_NAMES.items()]
    rows += [f"| `{generic}` | `{hf}` in `{hf_llama.PATCH_FILE}` |" for generic, hf in hf_llama.PATCH_NAMES.items()]
    return f"""# {cfg.name}: omni checkpoint as a Hugging Face Llama, step {info['step']}

Exported by `omni export --format hf` from `{info['checkpoint']}` ({info['dtype']}). Load it with no custom code:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(FOLDER)
model = AutoModelForCausalLM.from_pretrained(FOLDER)
```

The model: {m.layers} layers, d={m.d}, {m.heads} query / {m.kv_heads} key-value heads, RoPE theta {m.rope_theta:g}
(rotate-half, as Llama), trained on sequences of {cfg.data.seq_len} tokens.

The tokenizer covers all {vocab.size} ids of omni's vocabulary, id for id: specials below {tokens.NUM_SPECIAL}
(`<bos>` {tokens.BOS}, `<eos>` {tokens.EOS}, `<boa>` {tokens.BOA}, `<eoa>` {tokens.EOA}, `<patch>` {tokens.IMAGE_PATCH}, ...),
text from {vocab.text_offset}, audio code C of codebook K as `<audio_K_C>` (layout `{cfg.data.audio_layout}`),
image code C of image codebook K as `<image_K_C>`, padding rows as `<unused_ID>`. `tokenizer(text)` starts
with `<bos>`, as omni's prompts do. omni restricts each generated token to the answer's modality; to do the
same, pass `suppress_tokens` = every id that is not text (or `<eos>`) to `model.generate`.

Images: `<patch>` positions take `{hf_llama.PATCH_FILE}` (an `nn.Linear({cfg.data.patch_size ** 2 * 3}, {m.d})`)
of their pixels scaled to [-1, 1] instead of an embedding row; patch size {cfg.data.patch_size}, at most
{cfg.data.max_image_patches} patches per image (omni resizes larger images down first). Build `inputs_embeds`:

```python
{INPUTS_EMBEDS_SNIPPET}```

| omni tensor | HF tensor |
| --- | --- |
{chr(10).join(rows)}
"""
