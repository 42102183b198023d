"""The whole road out of omni through the CLI: train -> `omni export` -> `omni generate` from an image file."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

from omni.tokens import EOS

from omni.demo import corpus
from omni.train import loop
from tests.conftest import tiny_config


def _omni(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omni.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """(export, [(image, caption)], workdir): a tiny model trained until it knows its few demo captions by heart,
    exported as float32."""
    workdir = tmp_path_factory.mktemp("run")
    cfg = tiny_config()
    cfg.model.d = 64
    cfg.demo.train_examples, cfg.demo.eval_examples = 12, 6
    cfg.train.steps, cfg.train.lr, cfg.train.warmup_steps, cfg.train.weight_decay = 300, 1e-2, 20, 0.0
    cfg.train.log_every, cfg.train.checkpoint_every = 50, 300
    loop.train(cfg, workdir, progress=False)
    out = tmp_path_factory.mktemp("export") / "model"
    result = _omni("export", "--workdir", str(workdir), "--out", str(out), "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    manifest = corpus.built_path(cfg).with_name(corpus.built_path(cfg).name + ".source") / "manifest.jsonl"
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    captions = [(manifest.parent / line["segments"][0]["image"], line["meta"]["answer"]) for line in lines
                if line["meta"]["task"] == "caption" and line.get("split") == "train"]
    assert captions
    return out, captions, workdir


def test_generate_writes_the_caption_of_a_memorised_image(memorised):
    out, captions, *_ = memorised
    for image, caption in captions:
        result = _omni("generate", "--model", str(out), "--prompt", f"<image:{image}>", "--target", "text")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == caption
        assert "tokens until a stop token" in result.stderr and "decode" in result.stderr


def test_generate_audio_writes_a_wav_through_the_codec(memorised, tmp_path):
    out, *_ = memorised
    wav = tmp_path / "melody.wav"
    result = _omni("generate", "--model", str(out), "--prompt", "play loud c e g", "--target", "audio",
                   "--max-new-tokens", "12", "--out", str(wav))
    assert result.returncode == 0, result.stderr
    from omni.data.audio import read_wav

    wave, rate = read_wav(wav)
    assert rate == 16000 and len(wave) > 0


def test_generate_names_a_missing_image_and_a_folder_that_is_not_an_export(memorised, tmp_path):
    out, *_ = memorised
    missing = _omni("generate", "--model", str(out), "--prompt", f"<image:{tmp_path / 'cat.png'}>")
    assert missing.returncode == 2 and f"{tmp_path / 'cat.png'}" in missing.stderr
    not_export = _omni("generate", "--model", str(tmp_path), "--prompt", "hi")
    assert not_export.returncode == 2 and "not an omni export" in not_export.stderr


def _endless(export, out, seq_len):
    """A copy of `export` that never ends a text answer (greedy): the <eos> unembedding is the mean of the text
    ids' ones, so its logit is never the largest; its config claims training on `seq_len`-token sequences (the
    model has rotary positions, so any length runs)."""
    shutil.copytree(export, out)
    raw = json.loads((out / "config.json").read_text())
    raw["data"]["seq_len"] = seq_len
    (out / "config.json").write_text(json.dumps(raw))
    vocab, tensors = raw["export"]["vocab"], load_file(out / "model.safetensors")
    unembed = tensors["unembed"]
    unembed[:, EOS] = unembed[:, vocab["text_offset"]:vocab["text_offset"] + vocab["text_size"]].mean(axis=1)
    save_file(tensors, out / "model.safetensors", metadata={"format": raw["export"]["format"], "dtype": "float32",
                                                            "format_version": str(raw["export"]["format_version"])})
    return out


def _one_error_line(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("omni: error: "), result.stderr
    return lines[0]


def test_generate_caps_max_new_tokens_to_the_trained_context(memorised, tmp_path):
    """--max-new-tokens 1000000 on a model that never stops ran for over ten minutes: now it stops where the
    model's 128-token training context ends, and says so."""
    out, *_ = memorised
    endless = _endless(out, tmp_path / "endless", 128)
    result = _omni("generate", "--model", str(endless), "--prompt", "play loud c e g", "--max-new-tokens", "1000000")
    assert result.returncode == 0, result.stderr
    note = re.fullmatch(r"omni: --max-new-tokens 1000000 capped to (\d+): the model was trained on 128-token "
                        r"sequences and the prompt has (\d+)", result.stderr.splitlines()[0])
    assert note, result.stderr
    capped, prompt = int(note.group(1)), int(note.group(2))
    assert prompt == len("play loud c e g") + 1 and capped == 128 - prompt  # bytes and <bos>
    assert f"omni: {capped} tokens until the 128-token context was full; prompt {prompt} tokens" in result.stderr
    assert len(result.stdout.rstrip("\n")) > 0


@pytest.mark.parametrize("prompt,tokens,message", [
    ("x" * 200, "1", "the prompt has 201 tokens but the model was trained on 128-token sequences"),
    ("hi", "0", "--max-new-tokens must be at least 1; got 0"),
    ("hi", "-5", "--max-new-tokens must be at least 1; got -5"),
])
def test_generate_rejects_a_prompt_that_fills_the_context_and_a_count_below_one(memorised, prompt, tokens,
                                                                               message):
    out, *_ = memorised
    result = _omni("generate", "--model", str(out), "--prompt", prompt, "--max-new-tokens", tokens)
    assert message in _one_error_line(result)


@pytest.mark.slow
def test_ctrl_c_stops_generation_at_once_with_exit_code_130(memorised, tmp_path):
    """A decode of ~65,000 steps over a 65,536-slot cache (minutes): SIGINT in the middle ends it in seconds."""
    out, *_ = memorised
    endless = _endless(out, tmp_path / "endless", 65536)
    cache = tmp_path / "compile-cache"  # its own: a compiled program lands here when its compile is done
    process = subprocess.Popen([sys.executable, "-m", "omni.cli", "generate", "--model", str(endless), "--prompt",
                                "play c", "--max-new-tokens", "1000000"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMNI_COMPILE_CACHE": str(cache)})
    try:
        first = process.stderr.readline()  # printed once the prompt is built, just before compiling and decoding
        assert "capped to 65529" in first, first + process.stderr.read()
        # Ctrl-C is promised between decode chunks, not inside an XLA compile (seconds alone, more on a loaded
        # machine): wait until the programs are compiled (the cache stops growing), then decoding is under way.
        seen, stable_since, deadline = -1, time.monotonic(), time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            count = len(list(cache.rglob("*"))) if cache.exists() else 0
            if count != seen:
                seen, stable_since = count, time.monotonic()
            elif count > 0 and time.monotonic() - stable_since > 8:
                break
            time.sleep(0.5)
        time.sleep(2)
        assert process.poll() is None, "generation ended before it was interrupted"
        sent = time.monotonic()
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=90)
        took = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, (process.returncode, stderr)
    assert took < 45, took  # decoding every step takes minutes; a chunk (or a compile still running) seconds
    assert stderr.strip().splitlines() == ["omni: interrupted"] and "Traceback" not in stderr
    assert stdout == ""


@pytest.mark.parametrize("prompt,message", [
    ("", "the prompt is empty"),
    ("  \n\t ", "the prompt is empty"),
    ("describe <video:x.mp4>", "unknown tag <video:x.mp4>"),
    ("<image:>", "tag <image:> in the prompt names no file"),
    ("play <audio: >", "tag <audio: > in the prompt names no file"),
    ("<codes:> then", "tag <codes:> in the prompt names no file"),
])
def test_generate_rejects_empty_prompts_and_unknown_or_empty_tags(memorised, prompt, message):
    out, *_ = memorised
    line = _one_error_line(_omni("generate", "--model", str(out), "--prompt", prompt, "--max-new-tokens", "4"))
    assert message in line
    if "tag" in message:  # the known tags are listed
        assert all(f"<{kind}:PATH" in line for kind in ("image", "audio", "codes")), line


def test_angle_brackets_outside_the_tag_shape_are_prompt_text(memorised):
    out, *_ = memorised
    result = _omni("generate", "--model", str(out), "--prompt", "a < b > c <b>x</b>", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert "prompt 19 tokens" in result.stderr  # 18 bytes of text and <bos>


def test_generate_prompts_file_batches_and_matches_the_single_prompt_form(memorised, tmp_path):
    """`--prompts`: manifest lines (the caption is the answer, left out of the prompt) and an inline-tag line,
    in one run; each result line carries the id, the output, the stop reason and the token count, in file order,
    and equals what the single-prompt form gives. A training workdir serves as --model as well as its export."""
    out, captions, *_ = memorised
    lines = [{"id": f"cap{i}", "segments": [{"image": str(image)}, {"text": caption}], "targets": ["text"]}
             for i, (image, caption) in enumerate(captions)]
    lines.append({"prompt": "play loud c e g", "target": "audio", "id": "melody"})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    preds, wavs = tmp_path / "preds.jsonl", tmp_path / "wavs"
    result = _omni("generate", "--model", str(out), "--prompts", str(prompts), "--out", str(preds),
                   "--wav-dir", str(wavs), "--max-new-tokens", "40")
    assert result.returncode == 0, result.stderr
    assert f"omni: {len(lines)} prompts -> {preds}" in result.stderr
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["id"] for r in rows] == [line["id"] for line in lines]
    for row, (_, caption) in zip(rows, captions):
        assert row["text"] == row["truth"] == caption
        assert row["stop"] == "stop token" and row["tokens"] == len(caption) + 1
    melody = rows[-1]
    assert melody["target"] == "audio" and len(melody["codes"]) > 0 and "truth" not in melody
    single = tmp_path / "single.wav"
    alone = _omni("generate", "--model", str(out), "--prompt", "play loud c e g", "--target", "audio",
                  "--max-new-tokens", "40", "--out", str(single))
    assert alone.returncode == 0, alone.stderr
    assert (wavs / "melody.wav").read_bytes() == single.read_bytes()
    assert f"omni: {melody['tokens']} tokens until" in alone.stderr

    workdir = Path(json.loads((out / "config.json").read_text())["export"]["checkpoint"]).parents[1]
    from_workdir = _omni("generate", "--model", str(workdir), "--prompts", str(prompts), "--out",
                         str(tmp_path / "w.jsonl"), "--max-new-tokens", "40")
    assert from_workdir.returncode == 0, from_workdir.stderr
    assert [json.loads(line).get("text") for line in (tmp_path / "w.jsonl").read_text().splitlines()] == [
        r.get("text") for r in rows]


def test_generate_prompts_names_the_bad_line(memorised, tmp_path):
    out, *_ = memorised
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n{"prompt": "see <video:x.mp4>"}\n')
    line = _one_error_line(_omni("generate", "--model", str(out), "--prompts", str(prompts), "--out",
                                 str(tmp_path / "o.jsonl")))
    assert f"{prompts}:2: unknown tag <video:x.mp4>" in line and not (tmp_path / "o.jsonl").exists()
    prompts.write_text('{"prompt": "hi"}\n' + json.dumps({"prompt": "x" * 200}) + "\n")
    line = _one_error_line(_omni("generate", "--model", str(out), "--prompts", str(prompts), "--out",
                                 str(tmp_path / "o.jsonl")))
    assert f"{prompts}:2: the prompt has 201 tokens but the model was trained on 128-token sequences" in line


def test_outputs_are_checked_before_the_work_and_disk_errors_are_one_line(memorised, tmp_path):
    """--out naming a folder, a folder that does not exist (never made silently), a read-only place (export and
    generate, before the checkpoint is read or anything generated) and a disk that fills while the answer or an
    export (both formats) is written: each one `omni: error:` line, exit 2, nothing left behind."""
    from tests.conftest import run_in_namespace

    out, _, workdir = memorised
    folder = _omni("generate", "--model", str(out), "--prompt", "play loud c e g", "--target", "audio",
                   "--out", str(tmp_path))
    assert folder.returncode == 2 and f"--out {tmp_path} is a folder; name a file inside it, e.g. " \
        f"{tmp_path}/generated.wav" in folder.stderr, folder.stderr
    missing = tmp_path / "nope" / "deeper" / "x.png"
    result = _omni("generate", "--model", str(out), "--prompt", "a red circle", "--target", "audio",
                   "--out", str(missing))
    assert result.returncode == 2 and f"the folder {missing.parent} does not exist; create it first" in result.stderr
    assert not (tmp_path / "nope").exists()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "play loud c e g"}\n')
    result = _omni("generate", "--model", str(out), "--prompts", str(prompts), "--out", str(tmp_path))
    assert result.returncode == 2 and "is a folder; name a file inside it" in result.stderr
    assert "Traceback" not in folder.stderr + result.stderr

    (tmp_path / "ro").mkdir()
    (tmp_path / "small").mkdir()
    cli = f"{sys.executable} -m omni.cli"
    shell = (f"mount -o bind,ro {tmp_path / 'ro'} {tmp_path / 'ro'} && "
             f"mount -t tmpfs -o size=64k none {tmp_path / 'small'} && "
             f"{{ head -c 1000000 /dev/zero > {tmp_path / 'small' / 'filler'} 2>/dev/null; true; }} && cd {Path.cwd()} && "
             f"{{ {cli} export --workdir {workdir} --out {tmp_path / 'ro' / 'model'}; echo rc=$?; "
             f"{cli} generate --model {out} --prompt 'play loud c e g' --target audio --out {tmp_path / 'ro' / 'x.wav'}; "
             f"echo rc=$?; "
             f"{cli} generate --model {out} --prompt 'play loud c e g' --target audio --out "
             f"{tmp_path / 'small' / 'x.wav'}; echo rc=$?; "
             f"{cli} export --workdir {workdir} --out {tmp_path / 'small' / 'model'}; echo rc=$?; "
             f"{cli} export --workdir {workdir} --format hf --out {tmp_path / 'small' / 'hf'}; echo rc=$?; "
             f"ls -a {tmp_path / 'small'}; }} 2>&1")
    result = run_in_namespace(shell)
    text = result.stdout
    assert text.count("rc=2") == 5, text
    assert f"omni: error: cannot write {tmp_path / 'ro' / 'model'}: the file system is read-only; choose another --out" \
        in text, text
    assert f"omni: error: cannot write {tmp_path / 'ro' / 'x.wav'}: the file system is read-only" in text
    assert f"omni: error: cannot write {tmp_path / 'small' / 'x.wav'}: the disk is full" in text
    for fmt in ("model", "hf"):  # a full disk during either export format
        assert f"omni: error: cannot write {tmp_path / 'small' / fmt}: the disk is full; free space there or " \
            "choose another --out" in text, text
    assert text.rstrip().splitlines()[-3:] == [".", "..", "filler"]  # no export folder, no temporary
    assert "Traceback" not in text and ".tmp-" not in text
