"""Issue 28, the data side: builds beside other writers, full and read-only disks, files that lie about what they are.

What a user relies on: one line `omni: error: ...` and exit code 2, never a traceback; a user's file never deleted
or replaced; nothing of omni's left behind."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from omni import cli
from omni.data import claim as claim_lib
from omni.data import dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _manifest(folder, n=12, text="caption"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.jsonl"
    path.write_text("".join(json.dumps({"segments": [{"text": f"{text} {i}"}], "targets": ["text"],
                                        "split": "eval" if i % 4 == 0 else "train"}) + "\n" for i in range(n)))
    return path


def _main(capsys, *args):
    """omni.cli.main in this process: (exit code, stdout, stderr lines)."""
    code = cli.main(["data", "build", *args])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def _one_line(code, err):
    assert code == 2 and len(err) == 1 and err[0].startswith("omni: error: "), (code, err)
    return err[0]


def _leftovers(folder):
    """omni's own names in a folder: claims, build and swap folders."""
    return sorted(n for n in os.listdir(folder) if ".omni-" in n and ".omni-built-" not in n)


# ------------------------------------------------------------------------------------------- 1: one writer per --out


def test_a_file_put_in_out_during_the_build_is_kept_and_the_swap_refused(tmp_path, capsys, monkeypatch):
    manifest = _manifest(tmp_path / "corpus")
    out = tmp_path / "ds"
    write = dataset._write

    def user_writes_meanwhile(*args, **kwargs):
        write(*args, **kwargs)
        out.mkdir()
        (out / "notes.txt").write_bytes(b"my notes\x00\n")

    monkeypatch.setattr(dataset, "_write", user_writes_meanwhile)
    code, _, err = _main(capsys, "--manifest", str(manifest), "--out", str(out))
    line = _one_line(code, err)
    aside = next(p for p in tmp_path.iterdir() if p.name.startswith("ds.omni-built-"))
    assert line == (f"omni: error: --out {out} changed while the dataset was built: notes.txt appeared in it, which "
                    f"this build did not write, so --out was left as it is; the new dataset is at {aside} instead "
                    "(move it where you want it, or move those files out of --out and build again)")
    assert sorted(os.listdir(out)) == ["notes.txt"] and (out / "notes.txt").read_bytes() == b"my notes\x00\n"
    assert dataset.open_dataset(aside).meta["counts"] == {"train": 9, "eval": 3}  # the build is not lost
    assert _leftovers(tmp_path) == []


def test_a_file_put_in_a_dataset_being_rebuilt_keeps_the_old_dataset_and_the_file(tmp_path, capsys, monkeypatch):
    manifest = _manifest(tmp_path / "corpus")
    out = tmp_path / "ds"
    assert _main(capsys, "--manifest", str(manifest), "--out", str(out))[0] == 0
    first = (out / dataset.DATASET_FILE).read_bytes()
    write = dataset._write

    def user_writes_meanwhile(*args, **kwargs):
        (out / "notes.txt").write_text("mine")
        write(*args, **kwargs)

    monkeypatch.setattr(dataset, "_write", user_writes_meanwhile)
    line = _one_line(*_main(capsys, "--manifest", str(manifest), "--out", str(out), "--overwrite")[::2])
    assert f"--out {out} changed while the dataset was built: notes.txt appeared in it" in line
    assert (out / "notes.txt").read_text() == "mine" and (out / dataset.DATASET_FILE).read_bytes() == first
    assert _leftovers(tmp_path) == []


def test_a_file_put_inside_a_subfolder_of_a_dataset_being_rebuilt_is_kept(tmp_path, capsys, monkeypatch):
    """Only top-level names were compared: OUT/tfds/notes.txt was deleted with the old dataset (--overwrite)."""
    manifest = _manifest(tmp_path / "corpus")
    out = tmp_path / "ds"
    assert _main(capsys, "--manifest", str(manifest), "--out", str(out))[0] == 0
    sub = next(p for p in out.iterdir() if p.is_dir())
    write = dataset._write

    def user_writes_meanwhile(*args, **kwargs):
        (sub / "notes.txt").write_text("mine")
        write(*args, **kwargs)

    monkeypatch.setattr(dataset, "_write", user_writes_meanwhile)
    line = _one_line(*_main(capsys, "--manifest", str(manifest), "--out", str(out), "--overwrite")[::2])
    assert f"--out {out} changed while the dataset was built: {sub.name}/notes.txt appeared in it" in line, line
    assert (sub / "notes.txt").read_text() == "mine" and dataset.open_dataset(out).meta["counts"]["train"] == 9
    assert _leftovers(tmp_path) == []


def test_a_second_build_of_the_same_out_stops_at_once_naming_the_first(tmp_path, capsys, monkeypatch):
    manifest = _manifest(tmp_path / "corpus")
    out = tmp_path / "ds"
    write, second = dataset._write, {}

    def another_build_meanwhile(*args, **kwargs):  # the second build starts while the first one writes
        second["code"] = cli.main(["data", "build", "--manifest", str(manifest), "--out", str(out), "--overwrite"])
        second["err"] = capsys.readouterr().err
        write(*args, **kwargs)

    monkeypatch.setattr(dataset, "_write", another_build_meanwhile)
    code, stdout, err = _main(capsys, "--manifest", str(manifest), "--out", str(out))
    assert code == 0 and f"omni: built {out}" in stdout
    mark = tmp_path / ".ds.omni-claim"
    line = _one_line(second["code"], second["err"].splitlines())
    assert line.startswith(f"omni: error: --out {out} is being built by omni data build (pid {os.getpid()} on host "
                           f"{socket.gethostname()}, since ")
    assert line.endswith(f"), which holds its claim {mark}; wait for that build to finish (or stop it), or choose "
                         "another --out")
    assert dataset.open_dataset(out).meta["counts"] == {"train": 9, "eval": 3}
    assert _leftovers(tmp_path) == []  # the claim is gone with its build


def _holder(out):
    """A real process holding the claim on `out` (started, claim taken, waiting to be killed)."""
    code = textwrap.dedent(f"""
        import sys, time
        from omni.data import claim
        held = claim.claim({str(out)!r})
        print("held", flush=True)
        time.sleep(60)
    """)
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_build_holding_out_in_another_process_refuses_and_a_killed_one_is_taken_over(tmp_path, capsys):
    manifest = _manifest(tmp_path / "corpus")
    out = tmp_path / "ds"
    holder = _holder(out)
    try:
        line = _one_line(*_main(capsys, "--manifest", str(manifest), "--out", str(out))[::2])
        assert f"is being built by omni data build (pid {holder.pid} on host {socket.gethostname()}" in line
        assert not out.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".ds.omni-claim").exists()  # a SIGKILL leaves the marker; its flock went with the process
    code, _, err = _main(capsys, "--manifest", str(manifest), "--out", str(out))
    assert code == 0, err
    assert len(err) == 1 and err[0].startswith(
        f"omni: took over the claim {tmp_path / '.ds.omni-claim'} on --out {out}: its holder omni data build (pid "
        f"{holder.pid} on host {socket.gethostname()}, since ") and err[0].endswith("is no longer running"), err
    assert dataset.open_dataset(out).meta["counts"]["train"] == 9 and _leftovers(tmp_path) == []


def test_without_flock_a_dead_holder_on_this_host_is_taken_over_and_a_live_one_named(tmp_path, monkeypatch):
    import errno

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(claim_lib.fcntl, "flock", no_flock)
    out, mark = tmp_path / "ds", tmp_path / ".ds.omni-claim"
    logged = []
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    mark.write_text(json.dumps({"holder": "omni data build", "host": socket.gethostname(),
                                "pid": int(dead.stdout), "since": "earlier"}))
    held = claim_lib.claim(out, log=logged.append)
    assert "is no longer running" in logged[0] and json.loads(mark.read_text())["pid"] == os.getpid()
    held.release()
    assert not mark.exists()
    mark.write_text(json.dumps({"holder": "omni data build", "host": socket.gethostname(), "pid": os.getppid(),
                                "since": "earlier"}))
    with pytest.raises(dataset.DatasetError, match=f"cannot tell whether that build still runs: if none does, "
                                                   f"delete {mark}"):
        claim_lib.claim(out, log=logged.append)
    assert json.loads(mark.read_text())["pid"] == os.getppid()  # the live holder's marker is untouched


def test_a_claim_on_a_bucket_refuses_a_second_build_and_takes_over_a_dead_holder(bucket, monkeypatch):
    import time

    monkeypatch.setattr(claim_lib, "HEARTBEAT_S", 0.2)
    out = f"{bucket}/ds"
    logged = []
    first = claim_lib.claim(out, log=logged.append)
    with pytest.raises(dataset.DatasetError, match=rf"--out {out} is being built by omni data build \(pid "
                                                   rf"{os.getpid()} on host .*, which holds its claim "
                                                   rf"{bucket}/.ds.omni-claim \(renewed 0 s ago"):
        claim_lib.claim(out, log=logged.append)
    first.release()
    second = claim_lib.claim(out, log=logged.append)  # released: free again
    # its holder "dies": a marker naming a process of this host that is gone is taken over at once
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    blob = claim_lib._blob(claim_lib.marker(out))
    blob.upload_from_string(json.dumps({"holder": "omni data build", "host": socket.gethostname(),
                                        "pid": int(dead.stdout), "since": "earlier"}))
    third = claim_lib.claim(out, log=logged.append)
    assert logged[-1].startswith(f"omni: took over the claim {bucket}/.ds.omni-claim on --out {out}: its holder "
                                 f"omni data build (pid {int(dead.stdout)} ") and "no longer running" in logged[-1]
    # the build whose claim was overwritten learns it before it publishes anything
    deadline = time.time() + 10
    with pytest.raises(dataset.DatasetError, match="was taken over by another build"):
        while time.time() < deadline:
            second.check_held()
            time.sleep(0.1)
    third.check_held()
    second.release()
    third.release()


def test_a_bucket_out_written_by_someone_else_during_the_build_is_left_alone(bucket, tmp_path, capsys, monkeypatch):
    from omni import storage

    manifest = _manifest(tmp_path / "corpus")
    out = f"{bucket}/ds"
    write = dataset._write

    def user_writes_meanwhile(*args, **kwargs):
        write(*args, **kwargs)
        storage.write_text(f"{out}/notes.txt", "mine")

    monkeypatch.setattr(dataset, "_write", user_writes_meanwhile)
    line = _one_line(*_main(capsys, "--manifest", str(manifest), "--out", out)[::2])
    assert f"--out {out} changed while the dataset was built: notes.txt appeared in it" in line
    aside = line.split("the new dataset is at ")[1].split(" instead")[0]
    assert storage.listdir(out) == ["notes.txt"] and storage.path(f"{out}/notes.txt").read_text() == "mine"
    assert dataset.open_dataset(aside).meta["counts"] == {"train": 9, "eval": 3}
    assert not storage.path(f"{bucket}/.ds.omni-claim").exists()
    monkeypatch.setattr(dataset, "_write", write)
    code, stdout, err = _main(capsys, "--manifest", str(manifest), "--out", f"{bucket}/ds2")
    assert code == 0 and err == [] and dataset.open_dataset(f"{bucket}/ds2").meta["counts"]["eval"] == 3


# ------------------------------------------------------------------------------------ 5: full and read-only disks


def _build_line(manifest, out):
    return f"cd {ROOT} && JAX_PLATFORMS=cpu {sys.executable} -m omni.cli data build --manifest {manifest} --out {out}"


def test_a_full_disk_during_a_build_is_one_line_and_leaves_nothing_behind(tmp_path):
    from conftest import run_in_namespace

    manifest = _manifest(tmp_path / "corpus", n=400, text="x" * 2000)  # ~800 kB of text: more than the disk
    small = tmp_path / "small"
    small.mkdir()
    (small / "keep.txt").write_text("mine")
    result = run_in_namespace(f"mount -t tmpfs -o size=256k none {small} && echo mine > {small}/keep.txt && "
                              f"{_build_line(manifest, small / 'ds')}; echo rc=$?; ls -a {small}")
    assert "rc=2" in result.stdout, result.stderr[-3000:]
    assert result.stderr.strip() == (f"omni: error: cannot write {small / 'ds'}: the disk is full; free space there "
                                     "or choose another --out")
    assert result.stdout.split("rc=2")[1].split() == [".", "..", "keep.txt"]  # no dataset, claim or build folder


def test_a_read_only_out_is_refused_before_any_work(tmp_path):
    from conftest import run_in_namespace

    manifest = _manifest(tmp_path / "corpus")
    (tmp_path / "ro").mkdir()
    result = run_in_namespace(f"mount -o bind,ro {tmp_path / 'ro'} {tmp_path / 'ro'} && "
                              f"{_build_line(manifest, tmp_path / 'ro' / 'ds')}; echo rc=$?")
    assert "rc=2" in result.stdout, result.stderr[-3000:]
    assert result.stderr.strip() == (f"omni: error: cannot write {tmp_path / 'ro' / 'ds'}: the file system is "
                                     "read-only; choose another --out on a writable disk")
    assert os.listdir(tmp_path / "ro") == []


# ------------------------------------------------------------------------ 7: files that are not what they claim


def test_a_tokenizer_that_is_a_device_a_pipe_or_too_large_is_refused_before_it_is_read(tmp_path, capsys):
    manifest = _manifest(tmp_path / "corpus")
    out = str(tmp_path / "ds")
    os.symlink("/dev/zero", tmp_path / "zero.json")
    os.mkfifo(tmp_path / "pipe.model")
    (tmp_path / "hub").mkdir()
    os.symlink("/dev/zero", tmp_path / "hub" / "tokenizer.json")
    with open(tmp_path / "big.json", "wb") as f:
        f.truncate(55_000_000)  # sparse: 55 MB that take no disk and are never read
    for spec, words in (("/dev/zero", "text tokenizer '/dev/zero' is a character device, not a file"),
                        (tmp_path / "zero.json", f"text tokenizer '{tmp_path / 'zero.json'}' is a character device"),
                        (tmp_path / "pipe.model", f"text tokenizer '{tmp_path / 'pipe.model'}' is a named pipe"),
                        (tmp_path / "hub", f"tokenizer.json {tmp_path / 'hub' / 'tokenizer.json'} is a character "
                                           "device, not a file; give a tokenizer.json or SentencePiece .model file")):
        line = _one_line(*_main(capsys, "--manifest", str(manifest), "--out", out, "--tokenizer", str(spec))[::2])
        assert line.startswith(f"omni: error: {words}"), line
    line = _one_line(*_main(capsys, "--manifest", str(manifest), "--out", out, "--tokenizer",
                            str(tmp_path / "big.json"))[::2])
    assert line == (f"omni: error: tokenizer.json {tmp_path / 'big.json'} is 52.5 MiB, more than the limit of 48 MiB "
                    "for a tokenizer file (omni.data.text_tokenizer.MAX_TOKENIZER_BYTES; the largest tokenizers in "
                    "use are about 33 MB); use a smaller tokenizer")
    assert not os.path.exists(out) and _leftovers(tmp_path) == []


def test_a_tokenizer_with_too_many_tokens_or_ids_past_the_limit_is_refused(tmp_path, monkeypatch):
    from omni.data import text_tokenizer
    from omni.errors import TokenizerError

    def word_level(path, vocab):
        path.write_text(json.dumps({"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
                                    "normalizer": None, "pre_tokenizer": None, "post_processor": None,
                                    "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}}))
        return path

    monkeypatch.setattr(text_tokenizer, "MAX_TOKENIZER_TOKENS", 300)  # the real limit is 2**20: 20 MB of JSON
    many = word_level(tmp_path / "many.json", {f"t{i}": i for i in range(301)})
    with pytest.raises(TokenizerError) as e:
        text_tokenizer.load_tokenizer(str(many))
    assert str(e.value) == (f"tokenizer.json {many} has 301 tokens, more than the limit of 300 tokens "
                            "(omni.data.text_tokenizer.MAX_TOKENIZER_TOKENS; the largest vocabularies in use have "
                            "about 262,000); use a tokenizer with a smaller vocabulary")
    far = word_level(tmp_path / "far.json", {"t0": 0, "t1": 5_000_000})  # two tokens, an embedding of 5M rows
    with pytest.raises(TokenizerError, match="has a token with id 5,000,000, more than the limit of 300 tokens"):
        text_tokenizer.load_tokenizer(str(far))
    assert text_tokenizer.load_tokenizer(str(word_level(tmp_path / "ok.json", {"t0": 0, "t1": 1}))).vocab_size == 2


def _wav_header(rate, channels, data_bytes):
    import struct

    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * channels * 2, channels * 2, 16) +
            b"data" + struct.pack("<I", data_bytes))


def test_a_two_hour_wav_and_a_1_hz_wav_are_refused_naming_the_file_and_the_limit(tmp_path, capsys):
    import resource

    from omni.data.audio import write_wav

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    samples = 2 * 3600 * 48_000 * 2 * 2  # two hours of 48 kHz stereo 16-bit: 1.4 GB, sparse (never read)
    with open(corpus / "talk.wav", "wb") as f:
        f.write(_wav_header(48_000, 2, samples))
        f.truncate(44 + samples)
    write_wav(corpus / "one_hz.wav", np.zeros(20), 1)
    for name in ("talk.wav", "one_hz.wav"):
        (corpus / "m.jsonl").write_text(json.dumps({"segments": [{"audio": name}, {"text": "hi"}],
                                                    "targets": ["text"]}) + "\n")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        line = _one_line(*_main(capsys, "--manifest", str(corpus / "m.jsonl"), "--out", str(tmp_path / "ds"),
                                "--codec", "tone")[::2])
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # kB: the samples stay unread
        prefix = f"omni: error: {corpus / 'm.jsonl'}:1: segment 0: audio file {corpus / name} "
        if name == "talk.wav":
            assert line == (f"{prefix}lasts 2:00:00 (7,200 s), longer than the limit of 600 s per file "
                            f"(omni.data.audio.MAX_AUDIO_SECONDS); cut it into clips first, e.g. `ffmpeg -i "
                            f"{corpus / name} -f segment -segment_time 300 -c copy clip%03d.wav`")
        else:
            assert line == (f"{prefix}has a sample rate of 1 Hz, which cannot be speech or music (omni reads 4,000 "
                            "to 192,000 Hz, omni.data.audio.MIN_SAMPLE_RATE and MAX_SAMPLE_RATE); its header is "
                            "probably wrong: re-export it from the source, e.g. `ffmpeg -i <input> -ac 1 -ar 16000 "
                            "<output>.wav`")
    assert _leftovers(tmp_path) == [] and not (tmp_path / "ds").exists()


def test_imagetok_decode_of_a_png_or_pickle_says_it_is_not_a_npy_of_codes(tmp_path, capsys):
    from PIL import Image

    from omni.data.image_tokenizer import PatchRVQTokenizer

    rng = np.random.default_rng(0)
    PatchRVQTokenizer.fit([rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(8)], patch_size=4,
                          codebooks=1, codebook_size=4, iters=2).save(tmp_path / "tok")
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "codes.npz", a=np.zeros((2, 2, 1), np.int64))
    (tmp_path / "empty.npy").write_bytes(b"")
    expected = {"img.png": "is not a .npy file of integer codes (it looks like a PNG image)",
                "objects.npy": "holds Python objects, not integer codes (omni never unpickles a file)",
                "codes.npz": "is an .npz archive, not one .npy array; save the one array with numpy.save",
                "empty.npy": "is not a .npy file of integer codes (it is empty)"}
    for name, words in expected.items():
        code = cli.main(["imagetok", "decode", "--tokenizer", str(tmp_path / "tok"), "--codes", str(tmp_path / name),
                         "--out", str(tmp_path / "y.png")])
        line = _one_line(code, [x for x in capsys.readouterr().err.splitlines() if x.strip()])
        assert line == (f"omni: error: image codes {tmp_path / name} {words}; give a .npy integer array [rows, cols, "
                        "codebooks] (`omni imagetok encode` writes one)")
        assert "pickle" not in line.replace("unpickles", "") and "allow_pickle" not in line
    assert not (tmp_path / "y.png").exists()


def test_the_checked_readers_read_good_files_from_a_bucket(bucket, tmp_path):
    """The header, size and kind checks take the same road for a gs:// file (seek, bounded read)."""
    import io as io_lib

    from omni import storage
    from omni.data import manifest, text_tokenizer
    from omni.data.audio import read_wav, write_wav

    write_wav(f"{bucket}/a.wav", 0.5 * np.sin(np.arange(8000) / 5), 16000)
    wave, rate = read_wav(f"{bucket}/a.wav")
    assert rate == 16000 and wave.shape == (8000,)
    write_wav(f"{bucket}/one.wav", np.zeros(8), 1)
    with pytest.raises(ValueError, match="has a sample rate of 1 Hz"):
        read_wav(f"{bucket}/one.wav")
    buffer = io_lib.BytesIO()
    np.save(buffer, np.ones((3, 2), np.int32))
    storage.write_bytes(f"{bucket}/c.npy", buffer.getvalue())
    assert manifest.load_codes(f"{bucket}/c.npy").shape == (3, 2)
    storage.write_bytes(f"{bucket}/img.png", b"\x89PNG\r\n\x1a\n....")
    with pytest.raises(ValueError, match="it looks like a PNG image"):
        manifest.load_image_codes(f"{bucket}/img.png")
    tok = text_tokenizer.train_bpe(["a small corpus of words"] * 20, 260, f"{bucket}/tok")
    assert text_tokenizer.load_tokenizer(f"{bucket}/tok").vocab_size == tok.vocab_size


def test_a_wav_beside_an_external_codec_named_by_the_line_is_one_line_naming_it(tmp_path, capsys):
    """Found by the manifest fuzz: a line naming an external codec ("codec": {...}) with a WAV segment reached the
    resampler with no sample rate (TypeError); omni cannot run that codec, so the line says what to give."""
    import numpy as np
    import scipy.io.wavfile

    folder = tmp_path / "corpus"
    folder.mkdir()
    scipy.io.wavfile.write(folder / "a.wav", 8000, (np.sin(np.arange(800) / 5) * 3000).astype(np.int16))
    external = {"name": "encodec-24khz", "frame_rate": 75.0, "codebook_sizes": [1024, 1024]}
    lines = [{"segments": [{"text": "good"}], "targets": ["text"], "split": "train"},
             {"segments": [{"text": "good too"}], "targets": ["text"], "split": "eval"},
             {"segments": [{"text": "say"}, {"audio": "a.wav"}], "targets": ["audio"], "codec": external}]
    (folder / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, _, err = _main(capsys, "--manifest", str(folder / "m.jsonl"), "--out", str(tmp_path / "ds"))
    line = _one_line(code, err)
    assert f"{folder / 'm.jsonl'}:3" in line and "the codec 'encodec-24khz' is external" in line, line
    code, out, _ = _main(capsys, "--manifest", str(folder / "m.jsonl"), "--out", str(tmp_path / "ds"), "--skip-bad")
    assert code == 0 and dataset.open_dataset(tmp_path / "ds").meta["skipped"][0]["line"] == 3
