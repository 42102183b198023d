import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from omni.batch import AUDIO, IMAGE, TEXT, patch_dim
from omni.data import pipeline as data
from omni.data.audio import write_wav
from omni.data.codec import PrecomputedCodec, ToneCodec
from omni.demo import corpus as demo_data
from omni.errors import GenerateError
from omni.loss import masked_next_token_loss
from omni.model.transformer import OmniTransformer, init_cache
from omni.tokens import AUDIO_DELAY, BOA, EOA, EOS, IMAGE_PATCH, encode_example
from omni.tools import generate as generate_module
from omni.tools.generate import decode_output, fit_to_context, generate, parse_prompt, prompt_arrays
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def setup():
    """The tiny test config, its demo vocabulary, a randomly initialised model, held-out examples."""
    cfg = tiny_config()
    vocab, tokenizer = data.vocab_for(cfg), data.tokenizer_for(cfg)
    model = OmniTransformer(cfg.model, vocab.size, patch_dim(cfg.data), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    examples = data.examples(cfg, "eval", limit=12)
    return cfg, vocab, tokenizer, graphdef, params, examples


def _variant(setup, **changes):
    """The setup model with other layer settings, same weights (unstacked for scan_layers=False); mot, whose
    weights have other shapes, newly initialised."""
    cfg, vocab, *_ = setup
    model_cfg = dataclasses.replace(cfg.model, **changes)
    if model_cfg.fusion == "mot":
        graphdef, params = nnx.split(OmniTransformer(model_cfg, vocab.size, patch_dim(cfg.data), rngs=nnx.Rngs(1)),
                                     nnx.Param)
        return model_cfg, graphdef, params
    abstract = nnx.eval_shape(lambda: OmniTransformer(model_cfg, vocab.size, patch_dim(cfg.data),
                                                      rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    weights = nnx.to_pure_dict(setup[4])
    if not model_cfg.scan_layers:
        weights["blocks"] = {i: jax.tree.map(lambda x: x[i], weights["blocks"]) for i in range(model_cfg.layers)}
    nnx.replace_by_pure_dict(params, weights)
    return model_cfg, graphdef, params


# ----------------------------------------------------------------------------------------------- the cache path

@pytest.mark.parametrize("changes", [{}, {"scan_layers": False}, {"remat": "full"}, {"fusion": "mot"}])
def test_prefill_then_decode_gives_the_full_forward_logits(setup, changes):
    model_cfg, graphdef, params = _variant(setup, **changes)
    pdim, length = patch_dim(setup[0].data), 12
    forward = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b))
    prefill = jax.jit(lambda p, b, c: nnx.merge(graphdef, p).prefill(b, c))
    decode_step = jax.jit(lambda p, b, c: nnx.merge(graphdef, p).decode_step(b, c))
    rng = np.random.default_rng(0)
    tokens, modality = rng.integers(16, 300, (2, length)), np.full((2, length), TEXT)
    tokens[:, 1:4], modality[:, 1:4] = IMAGE_PATCH, IMAGE  # image patches inside both prompts
    full = {"tokens": jnp.array(tokens, jnp.int32), "modality": jnp.array(modality, jnp.int32),
            "patches": jnp.array(rng.integers(0, 256, (2, 3, pdim)), jnp.uint8),
            "patch_positions": jnp.array([[1, 2, 3]] * 2, jnp.int32),
            "segment_ids": jnp.ones((2, length), jnp.int32),
            "positions": jnp.tile(jnp.arange(length, dtype=jnp.int32), (2, 1))}
    reference = forward(params, full)

    lengths, width = np.array([5, 8]), 8  # two prompts of different lengths, right-padded to 8
    prompt = {k: v if k.startswith("patch") else v[:, :width] for k, v in full.items()}
    prompt["segment_ids"] = jnp.array(np.arange(width)[None] < lengths[:, None], jnp.int32)
    logits, cache = prefill(params, prompt, init_cache(model_cfg, 2, length))
    assert cache["k"].shape == (2, 2, length, 2, 8)
    for i in range(2):
        np.testing.assert_allclose(logits[i, :lengths[i]], reference[i, :lengths[i]], rtol=1e-5, atol=1e-5)
    rows, slot = np.arange(2), lengths.copy()
    for _ in range(length - width):  # both rows decode their own next tokens at their own slots
        step = {"tokens": full["tokens"][rows, slot][:, None], "modality": full["modality"][rows, slot][:, None],
                "patches": jnp.zeros((2, 1, pdim), jnp.uint8), "patch_positions": jnp.ones((2, 1), jnp.int32),
                "segment_ids": jnp.ones((2, 1), jnp.int32),
                "positions": jnp.array(slot[:, None], jnp.int32)}
        logits, cache = decode_step(params, step, cache)
        np.testing.assert_allclose(logits[:, 0], reference[rows, slot], rtol=1e-5, atol=1e-5)
        slot += 1


# ----------------------------------------------------------------------------------------------- generation

def _prompts(setup, target):
    """Prompts of different lengths: an image and melodies for text answers, texts for audio answers."""
    cfg, vocab, tokenizer, *_, examples = setup
    if target == "audio":
        texts = ["play soft c", "play loud c e g a", "hi"]
        return [prompt_arrays([{"text": t}], vocab, tokenizer, cfg.data.patch_size, "flat", target) for t in texts]
    by_length = {}
    for e in examples:
        if e["meta"]["task"] in ("caption", "describe"):
            prompt = prompt_arrays([s for s in e["segments"] if "text" not in s], vocab, tokenizer,
                                   cfg.data.patch_size, "flat", target)
            by_length.setdefault(len(prompt["tokens"]), prompt)
    return list(by_length.values())[:3]


def _next_logits(setup, prompt, generated, target):
    """The reference: the full forward over prompt + generated, logits of the next token with only the ids
    allowed there (text ids and <eos>; or flat audio codes of the next codebook, <eoa> at frame boundaries)."""
    cfg, vocab, _, graphdef, params, _ = setup
    n, k = len(prompt["tokens"]) + len(generated), len(vocab.codebook_sizes)
    batch = {"tokens": np.concatenate([prompt["tokens"], generated]).astype(np.int32)[None],
             "patches": prompt["patches"][None], "patch_positions": prompt["patch_positions"][None],
             "modality": np.concatenate([prompt["modality"], np.full(len(generated), TEXT if target == "text"
                                                                     else AUDIO)]).astype(np.int32)[None],
             "segment_ids": np.ones((1, n), np.int32), "positions": np.arange(n, dtype=np.int32)[None]}
    logits = np.asarray(_forward(graphdef, params, batch)[0, -1])
    allowed = np.zeros(vocab.size, bool)
    if target == "text":
        allowed[vocab.text_offset:vocab.text_offset + vocab.text_size] = True
        allowed[EOS] = True
    else:
        codebook = len(generated) % k
        allowed[vocab.audio_offset(codebook):vocab.audio_offset(codebook) + vocab.codebook_sizes[codebook]] = True
        allowed[EOA] = codebook == 0
    return np.where(allowed, logits, -np.inf)


_FORWARD = {}


def _forward(graphdef, params, batch):
    """Logits of a one-row batch, right-padded to a fixed width (96 or 192) so the jitted forward compiles once
    or twice."""
    if id(graphdef) not in _FORWARD:
        _FORWARD[id(graphdef)] = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b))
    n = batch["tokens"].shape[1]
    width = 96 if n <= 96 else 192
    padded = {k: np.pad(v, [(0, 0), (0, width - n)] + [(0, 0)] * (v.ndim - 2)) for k, v in batch.items()}
    return _FORWARD[id(graphdef)](params, padded)[:, :n]


def _naive_greedy(setup, prompts, target, max_new):
    outputs = []
    for prompt in prompts:
        out = []
        while len(out) < max_new:
            token = int(np.argmax(_next_logits(setup, prompt, out, target)))
            if token in (EOS, EOA):
                break
            out.append(token)
        outputs.append(out)
    return outputs


@pytest.mark.parametrize("target", ["text", "audio"])
def test_cached_greedy_equals_recomputing_the_prefix(setup, target):
    cfg, vocab, _, graphdef, params, _ = setup
    prompts = _prompts(setup, target)
    assert len({len(p["tokens"]) for p in prompts}) == len(prompts)
    result = generate(graphdef, params, cfg.model, vocab, prompts, target=target, max_new_tokens=12)
    assert result.tokens == _naive_greedy(setup, prompts, target, 12)
    assert result.decode_tokens == sum(len(t) for t in result.tokens) - len(prompts)  # none stopped early
    assert result.decode_s > 0 and result.decode_tokens_per_s > 0
    again = generate(graphdef, params, cfg.model, vocab, prompts, target=target, max_new_tokens=12)
    assert again.tokens == result.tokens and again.compile_s == 0.0  # compiled once per shapes


@pytest.mark.slow
@pytest.mark.parametrize("fusion", [{"fusion": "late", "late_layers": 1}, {"fusion": "cross", "encoder_layers": 1},
                                    {"fusion": "mot"}])
def test_late_cross_and_mot_fusion_generate_the_reference_tokens(setup, fusion):
    """late and cross have no KV cache (each step reruns the sequence so far), mot has one (each decoded token
    through its modality's slice): all must equal the reference."""
    cfg, vocab, tokenizer, *_, examples = setup
    model_cfg = dataclasses.replace(cfg.model, **fusion)
    model = OmniTransformer(model_cfg, vocab.size, patch_dim(cfg.data), rngs=nnx.Rngs(1))
    if model_cfg.fusion == "cross":  # open the gates so the images matter
        for gate in (model.cross_blocks.attn_gate, model.cross_blocks.mlp_gate):
            gate[...] = jnp.full_like(gate[...], 0.7)
    graphdef, params = nnx.split(model, nnx.Param)
    variant = (cfg, vocab, tokenizer, graphdef, params, examples)
    prompts = _prompts(variant, "text")
    result = generate(graphdef, params, model_cfg, vocab, prompts, target="text", max_new_tokens=8)
    assert result.tokens == _naive_greedy(variant, prompts, "text", 8)


def test_text_generation_yields_only_text_ids(setup):
    cfg, vocab, _, graphdef, params, _ = setup
    prompts = _prompts(setup, "text")
    result = generate(graphdef, params, cfg.model, vocab, prompts, target="text", max_new_tokens=16,
                      temperature=2.0, seed=3)
    ids = np.concatenate(result.tokens)
    assert len(ids) >= 16 and np.all((ids >= vocab.text_offset) & (ids < vocab.text_offset + vocab.text_size))
    # unrestricted, the same random model spends many of its top picks outside the text range
    logits = nnx.merge(graphdef, params)({k: v[None] for k, v in dict(
        prompts[0], segment_ids=np.ones(len(prompts[0]["tokens"]), np.int32),
        positions=np.arange(len(prompts[0]["tokens"]), dtype=np.int32)).items()})[0]
    top = np.argmax(np.asarray(logits), axis=-1)
    assert np.any((top < vocab.text_offset) | (top >= vocab.text_offset + vocab.text_size))


@pytest.mark.parametrize("layout", ["flat", "delay"])
def test_audio_codes_keep_codebook_order_and_end_on_a_frame_boundary(setup, layout):
    cfg, vocab, tokenizer, graphdef, params, _ = setup
    k = len(vocab.codebook_sizes)
    # a zero unembedding makes every allowed id equally likely, so <eoa> is drawn now and then
    flat = nnx.to_pure_dict(params)
    flat["unembed"] = np.zeros_like(flat["unembed"])
    uniform = nnx.state(nnx.merge(graphdef, params), nnx.Param)
    nnx.replace_by_pure_dict(uniform, flat)
    prompts = [prompt_arrays([{"text": "play c"}], vocab, tokenizer, cfg.data.patch_size, layout, "audio")] * 24
    result = generate(graphdef, uniform, cfg.model, vocab, prompts, target="audio", max_new_tokens=41,
                      temperature=1.0, seed=0, audio_layout=layout)
    ended = [len(t) for t, s in zip(result.tokens, result.stopped) if s == EOA]
    assert ended and all(n % k == 0 for n in ended)  # some rows closed the span, all at a frame boundary
    assert any(s is None for s in result.stopped)
    delays = 0
    for row in result.tokens:
        for n, token in enumerate(row):
            delays += token == AUDIO_DELAY
            if token != AUDIO_DELAY or layout == "flat":
                assert vocab.audio_codebook_of(token) == n % k, (n, token)
    assert (delays > 0) == (layout == "delay")
    out = decode_output(result.tokens[0], "audio", vocab, tokenizer, ToneCodec(), layout)
    assert out["codes"].shape[1] == k and out["sample_rate"] == ToneCodec.sample_rate


def test_decoding_in_chunks_of_any_size_gives_the_same_tokens(setup, monkeypatch):
    """The loop returns to the host between chunks (so Ctrl-C lands); chunk boundaries change nothing."""
    cfg, vocab, _, graphdef, params, _ = setup
    prompts = _prompts(setup, "text")

    def run(chunk_s):
        monkeypatch.setattr(generate_module, "DECODE_CHUNK_S", chunk_s)
        return generate(graphdef, params, cfg.model, vocab, prompts, target="text", max_new_tokens=30,
                        temperature=1.0, seed=4)

    one_step, calls = run(0.0), []  # chunks shrink to a single step
    real = generate_module._decode_in_chunks

    def counting(decode, *args):
        return real(lambda *a: calls.append(1) or decode(*a), *args)

    monkeypatch.setattr(generate_module, "_decode_in_chunks", counting)
    run(0.0)
    assert len(calls) >= 20  # 29 steps after prefill, in chunks of 8, 2, then 1
    whole = run(1e9)  # chunks grow past the end at once
    assert one_step.tokens == whole.tokens and one_step.decode_steps == whole.decode_steps == 29


def test_sampling_is_seeded_and_top_k_1_is_greedy(setup):
    cfg, vocab, _, graphdef, params, _ = setup
    prompts = _prompts(setup, "text")

    def run(**kw):
        return generate(graphdef, params, cfg.model, vocab, prompts, target="text", max_new_tokens=12, **kw).tokens

    first, same, other = run(temperature=1.5, seed=1), run(temperature=1.5, seed=1), run(temperature=1.5, seed=2)
    assert first == same and first != other
    assert run(temperature=0.7, top_k=1, seed=5) == run()
    hot = run(temperature=100.0, top_k=2, seed=0)  # near-uniform over exactly the two likeliest allowed ids
    assert hot != run()
    for prompt, row in zip(prompts, hot):
        for n, token in enumerate(row):
            assert token in np.argsort(_next_logits(setup, prompt, row[:n], "text"))[-2:]


# ----------------------------------------------------------------------------------------------- prompts

def test_parse_prompt_tags_whitespace_and_files(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((40, 16, 3), 200, np.uint8)).save(tmp_path / "a.png")
    codec = ToneCodec()
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(4000) / 16000)
    write_wav(tmp_path / "a.wav", tone, 16000)
    write_wav(tmp_path / "b.wav", tone, 8000)  # resampled to the codec's rate
    np.save(tmp_path / "c.npy", np.array([[3, 4], [5, 6]]))
    text = f"  look at <image:{tmp_path}/a.png>\n and <audio: {tmp_path}/a.wav > <codes:{tmp_path}/c.npy>then  "
    segments = parse_prompt(text, [tmp_path / "b.wav"], patch_size=8, max_image_patches=4, codec=codec)
    kinds = [next(iter(s)) for s in segments]
    assert kinds == ["text", "image", "text", "audio", "audio", "text", "audio"]
    assert segments[0]["text"] == "  look at" and segments[2]["text"] == "and" and segments[5]["text"] == "then"
    assert segments[1]["image"].shape == (24, 8, 3)  # fitted to 3 x 1 patches of 8: the aspect ratio kept
    assert segments[3]["audio"].shape == (6, 2) and segments[3]["audio"][0, 0] == ToneCodec.note_code(440)
    assert segments[4]["audio"].tolist() == [[3, 4], [5, 6]] and segments[6]["audio"].shape == (12, 2)
    assert parse_prompt("just text") == [{"text": "just text"}]

    missing = tmp_path / "nope.png"
    with pytest.raises(GenerateError, match=str(missing)):
        parse_prompt(f"x <image:{missing}>")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(GenerateError, match="bad.png"):
        parse_prompt(f"<image:{tmp_path}/bad.png>")
    with pytest.raises(GenerateError, match="nope.wav"):
        parse_prompt("x", [tmp_path / "nope.wav"], codec=codec)
    with pytest.raises(GenerateError, match="no audio codec"):
        parse_prompt(f"<audio:{tmp_path}/a.wav>")
    with pytest.raises(GenerateError, match="<codes:"):
        parse_prompt(f"<audio:{tmp_path}/a.wav>", codec=PrecomputedCodec("mimi", 12.5, [2048] * 8))
    with pytest.raises(GenerateError, match="c.npy"):
        parse_prompt(f"<codes:{tmp_path}/c.npy>", codec=PrecomputedCodec("mimi", 12.5, [2048] * 8))


def test_parse_prompt_rejects_unknown_and_empty_tags_and_empty_prompts(tmp_path):
    for text in ("<video:x.mp4>", "see <Image:a.png> now", "<x-ray:scan.png>"):
        with pytest.raises(GenerateError, match="unknown tag <.*; the known tags are <image:PATH>, "
                                                "<audio:PATH.wav>, <codes:PATH.npy>"):
            parse_prompt(text)
    for text in ("<image:>", "x <audio: > y", "<codes:\t>"):
        with pytest.raises(GenerateError, match="names no file"):
            parse_prompt(text, codec=ToneCodec())
    for text in ("", " ", "\n\t  "):
        with pytest.raises(GenerateError, match="the prompt is empty"):
            parse_prompt(text)
    # other uses of < and > stay text; an empty prompt with an --audio file is fine
    for text in ("a < b > c", "<b>bold</b>", "at <12:30>", "x<>y", "<:x>"):
        assert parse_prompt(text) == [{"text": text}]
    write_wav(tmp_path / "a.wav", 0.3 * np.sin(2 * np.pi * 440 * np.arange(4000) / 16000), 16000)
    assert [next(iter(s)) for s in parse_prompt("", [tmp_path / "a.wav"], codec=ToneCodec())] == ["audio"]


def test_fit_to_context_caps_new_tokens_to_the_trained_sequence_length():
    assert fit_to_context(200, 16, 256) == 200
    assert fit_to_context(1_000_000, 16, 256) == 240
    assert fit_to_context(240, 16, 256) == 240
    assert fit_to_context(5, 255, 256) == 1
    for prompt_len in (256, 300):
        with pytest.raises(GenerateError, match=f"the prompt has {prompt_len} tokens but the model was trained on "
                                                f"256-token sequences"):
            fit_to_context(10, prompt_len, 256)
    for count in (0, -3):
        with pytest.raises(GenerateError, match=f"at least 1; got {count}"):
            fit_to_context(count, 16, 256)


def test_prompt_arrays_are_the_training_prefix(setup):
    cfg, vocab, tokenizer, *_, examples = setup
    caption = next(e for e in examples if e["meta"]["task"] == "caption")
    encoded = encode_example(caption, vocab, tokenizer, cfg.data.patch_size)
    first_answer = int(np.argmax(encoded["is_target"]))
    prompt = prompt_arrays(caption["segments"][:1], vocab, tokenizer, cfg.data.patch_size)
    for name in ("tokens", "modality"):
        np.testing.assert_array_equal(prompt[name], encoded[name][:first_answer])
    assert len(prompt["patches"]) == len(encoded["patches"]) > 0  # the image precedes the answer
    np.testing.assert_array_equal(prompt["patches"], encoded["patches"])
    np.testing.assert_array_equal(prompt["patch_positions"], encoded["patch_positions"])
    audio = prompt_arrays([{"text": "play c"}], vocab, tokenizer, cfg.data.patch_size, target="audio")
    assert audio["tokens"][-1] == BOA and EOS not in audio["tokens"].tolist()


# ----------------------------------------------------------------------------------------------- a trained model

def test_a_model_that_memorised_captions_generates_them_from_their_images(setup):
    cfg, vocab, tokenizer, graphdef, params, _ = setup  # trains the randomly initialised tiny model
    examples = demo_data.make_split("train", 24, cfg.demo.image_size, seed=5)
    captions = [e for e in examples if e["meta"]["task"] == "caption"][:6]
    encoded = [encode_example(e, vocab, tokenizer, cfg.data.patch_size) for e in captions]
    width = max(len(e["tokens"]) for e in encoded)
    batch = {name: np.zeros((len(encoded), width) + e0.shape[1:], e0.dtype) for name, e0 in encoded[0].items()}
    batch["segment_ids"] = np.zeros((len(encoded), width), np.int32)
    batch["positions"] = np.tile(np.arange(width, dtype=np.int32), (len(encoded), 1))
    for i, e in enumerate(encoded):
        for name, value in e.items():
            batch[name][i, :len(value)] = value
        batch["segment_ids"][i, :len(e["tokens"])] = 1

    tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 5e-3, 10, 250, 5e-4))

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: masked_next_token_loss(nnx.merge(graphdef, p)(batch), batch)[0])(
            params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    for _ in range(250):
        params, opt_state, loss = step(params, opt_state)
    assert float(loss) < 0.01

    prompts = [prompt_arrays(e["segments"][:1], vocab, tokenizer, cfg.data.patch_size) for e in captions]
    result = generate(graphdef, params, cfg.model, vocab, prompts, target="text", max_new_tokens=40)
    texts = [decode_output(t, "text", vocab, tokenizer) for t in result.tokens]
    assert texts == [e["meta"]["answer"] for e in captions]
    assert result.stopped == [EOS] * len(captions)


# ----------------------------------------------------------------------------------------------- many prompts

def _mixed_prompts(setup):
    """Text-answer prompts of very different lengths: 2 tokens, an image, a melody, and ~110 text bytes."""
    cfg, vocab, tokenizer, *_ = setup
    prompts = _prompts(setup, "text")
    long_text = "describe " + "the quick brown fox jumps over a lazy dog " * 2 + "and then"
    for text in ("x", long_text, "play c"):
        prompts.append(prompt_arrays([{"text": text}], vocab, tokenizer, cfg.data.patch_size, "flat", "text"))
    return prompts


@pytest.mark.parametrize("target", ["text", "audio"])
def test_batched_generation_equals_one_prompt_at_a_time(setup, target):
    """generate_many (sorted, batched, padded to buckets) gives every prompt the tokens it gets alone, greedy,
    for prompts from 2 to ~110 tokens, each with its own max_new_tokens."""
    cfg, vocab, tokenizer, graphdef, params, _ = setup
    if target == "text":
        prompts = _mixed_prompts(setup)
    else:
        texts = ["p", "play loud c e g a " * 6, "play soft c", "hi there"]
        prompts = [prompt_arrays([{"text": t}], vocab, tokenizer, cfg.data.patch_size, "flat", "audio") for t in texts]
    lengths = sorted(len(p["tokens"]) for p in prompts)
    assert lengths[0] <= 3 and lengths[-1] >= 100
    requests = [generate_module.Request(p, target, 6 + 3 * i) for i, p in enumerate(prompts)]
    batched = generate_module.generate_many(graphdef, params, cfg.model, vocab, requests, batch_size=64)
    assert len(batched.batches) == 1
    for request, tokens, stopped in zip(requests, batched.tokens, batched.stopped):
        alone = generate(graphdef, params, cfg.model, vocab, [request.prompt], target=target,
                         max_new_tokens=request.max_new_tokens, buckets=False)
        assert tokens == alone.tokens[0] and stopped == alone.stopped[0]
        assert len(tokens) + (stopped is not None) <= request.max_new_tokens
    for request, tokens in zip(requests, batched.tokens):
        assert tokens == _naive_greedy(setup, [request.prompt], target, request.max_new_tokens)[0]
    in_pairs = generate_module.generate_many(graphdef, params, cfg.model, vocab, requests, batch_size=2)
    assert in_pairs.tokens == batched.tokens and len(in_pairs.batches) == -(-len(prompts) // 2)


def test_batches_of_similar_shape_reuse_one_compiled_program(setup):
    cfg, vocab, tokenizer, graphdef, params, _ = setup
    prompts = [prompt_arrays([{"text": t}], vocab, tokenizer, cfg.data.patch_size) for t in ("a", "bb c", "hello")]
    first = generate(graphdef, params, cfg.model, vocab, prompts[:3], target="text", max_new_tokens=10)
    # 4 rows (bucket 4), the same width bucket, 12 new tokens (bucket 16): nothing to compile
    again = generate(graphdef, params, cfg.model, vocab, prompts[:3] + prompts[:1], target="text", max_new_tokens=12)
    assert again.compile_s == 0.0
    assert [t[:len(f)] for t, f in zip(again.tokens, first.tokens)] == first.tokens
    assert generate_module.bucket(1) == 1 and generate_module.bucket(5) == 8 and generate_module.bucket(3, 16) == 16


def test_task_of_an_example_prompts_with_what_comes_before_the_answer(setup):
    *_, examples = setup
    caption = next(e for e in examples if e["meta"]["task"] == "caption")
    task = generate_module.task_of(caption)
    assert [next(iter(s)) for s in task.segments] == ["image"] and task.truth == caption["meta"]["answer"]
    assert task.target == "text" and task.stop_ids == (EOS,) and task.group == "caption"
    synth = next(e for e in examples if e["meta"]["task"] == "synth")
    task = generate_module.task_of(synth)
    assert task.segments == [{"text": synth["segments"][0]["text"]}] and task.target == "audio"
    assert task.stop_ids == (EOA,) and task.truth.shape[1] == 2
    spoken = {"id": "s", "targets": ["text", "audio"], "segments": [
        {"image": np.zeros((8, 8, 3), np.uint8)}, {"text": "a cat"}, {"audio": np.zeros((3, 2), np.int64)}]}
    task = generate_module.task_of(spoken)
    assert task.truth == "a cat" and task.stop_ids == (BOA,) and task.group == "text"
    with pytest.raises(GenerateError, match="no segment of its targets"):
        generate_module.task_of({"id": "q", "targets": ["text"], "segments": [{"text": "q", "target": False}]})


def test_read_prompts_takes_manifest_and_inline_lines_and_names_bad_lines(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(tmp_path / "a.png")
    np.save(tmp_path / "c.npy", np.array([[3, 4], [5, 6]]))
    np.save(tmp_path / "big.npy", np.array([[3, 4], [500, 6]]))
    lines = [{"id": "cap", "segments": [{"image": "a.png"}, {"text": "a grey square"}], "targets": ["text"]},
             {"prompt": "what is <image:a.png>"},
             {"prompt": "play <codes:c.npy>", "target": "audio", "id": 7}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    tasks = generate_module.read_prompts(path, patch_size=8, max_image_patches=16, codec=ToneCodec())
    assert [t.id for t in tasks] == ["cap", "line2", "7"] and [t.line for t in tasks] == [1, 2, 3]
    assert tasks[0].truth == "a grey square" and tasks[0].segments[0]["image"].shape == (16, 16, 3)
    assert tasks[1].truth is None and [next(iter(s)) for s in tasks[1].segments] == ["text", "image"]
    assert tasks[2].target == "audio" and tasks[2].segments[1]["audio"].tolist() == [[3, 4], [5, 6]]

    def bad(text, message):
        path.write_text(json.dumps(lines[0]) + "\n" + text + "\n")
        with pytest.raises(GenerateError, match=message):
            generate_module.read_prompts(path, patch_size=8, max_image_patches=16, codec=ToneCodec())

    bad('{"prompt": "x"', f"{path}:2: not valid JSON")
    bad('{"prompt": "<video:a.mp4>"}', f"{path}:2: unknown tag <video:a.mp4>")
    bad('{"prompt": "<image:nope.png>"}', f"{path}:2: image file {tmp_path / 'nope.png'} does not exist")
    bad('{"prompt": "<codes:big.npy>"}', f"{path}:2: codes .*big.npy do not fit codec 'tone-v1': code 500")
    bad('{"prompt": "x", "target": "video"}', f"{path}:2: target 'video' is not one of")
    bad('{"text": "x"}', f"{path}:2: a line is a manifest line")
    bad('{"segments": [{"text": "x"}, {"codes": "big.npy"}], "targets": ["audio"]}', f"{path}:2: segment 1: code 500")
    bad('{"segments": [{"image": "nope.png"}, {"text": "x"}], "targets": ["text"]}', f"{path}:2: image file not found")


def test_a_prompt_that_fills_the_context_is_an_error_naming_its_line(setup, tmp_path):
    cfg, vocab, tokenizer, *_ = setup
    tasks = [generate_module.Task("a", [{"text": "hi"}], "text", (EOS,), line=1),
             generate_module.Task("b", [{"text": "x" * 200}], "text", (EOS,), line=2)]
    with pytest.raises(GenerateError, match="p.jsonl:2: the prompt has 201 tokens but the model was trained on "
                                            "128-token sequences"):
        generate_module.requests_for(tasks, vocab, tokenizer, 8, "flat", 128, 10, source="p.jsonl")
    requests = generate_module.requests_for(tasks[:1], vocab, tokenizer, 8, "flat", 128, None)
    assert requests[0].max_new_tokens == 128 - 3  # None: up to the end of the context (<bos> h i)
