"""The `omni` command line.

    omni train --config configs/demo.py --workdir runs/demo [--set train.steps=200 --set model.d=256 ...]
    omni eval --workdir runs/demo [--step N]               # per-modality eval loss/accuracy + demo task scores
    omni eval --workdir runs/my --generate [--max-examples N]   # + generated answers scored: exact, CER, ...
    omni export --workdir runs/demo [--step N] --out exported/demo [--dtype bfloat16]
    omni export --format hf --workdir runs/demo --out exported/demo-hf [--max-shard-size 5GB]   # a HF Llama folder
    omni generate --model exported/demo --prompt "<image:cat.png>" --target text|audio [--audio a.wav]
    omni generate --model exported/draw --prompt "draw a red circle" --target image --out img.png [--image-size 32x32]
    omni generate --model exported/demo --prompts prompts.jsonl --out preds.jsonl [--wav-dir wavs/]   # batched
    omni ablate --config configs/ablate_fusion.py --workdir runs/ablate [--seeds 3]   # early vs late vs cross
    omni bench --config configs/bench/omni_1b.py [--text-only]   # step time, tokens/s, TFLOP/s, MFU: one JSON line
    omni launch local --processes 2 --devices-per-process 4 -- train --config configs/demo.py --workdir runs/mp
    omni launch slurm|gke|tpu ... --dry-run -- train --config configs/X.py --workdir W   # cluster launch files
    omni config [--config configs/demo.py] [--set ...]     # print the resolved config (or the schema with --schema)
    omni data build --manifest my_data.jsonl --out data/my_data [--codec ...] [--tokenizer ...] [--skip-bad]
    omni data build --tfds coco_captions --out data/coco       # a TFDS catalog dataset through its adapter
    omni data split --dataset data/my_data                     # the split rule applied and the eval example ids
    omni data show --config configs/demo.py --out batch.png    # one packed batch: modality and loss mask
    omni data bench --config configs/demo.py --workers 0 2     # pipeline throughput beside the train step
    omni tokenizer train --manifest my_data.jsonl --vocab-size 8192 --out tok/
    omni codec fit --manifest my_data.jsonl --out codec/
    omni codec encode --codec codec/ --wav in.wav --out codes.npy
    omni codec decode --codec codec/ --codes codes.npy --out out.wav
    omni imagetok fit --manifest my_data.jsonl --out imagetok/          # residual k-means image tokenizer
    omni imagetok encode --tokenizer imagetok/ --image x.png --out codes.npy
    omni imagetok decode --tokenizer imagetok/ --codes codes.npy --out y.png   # what the model sees
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from omni.errors import ConfigError, GenerateError, OmniError


SET_HELP = "override a config field, e.g. --set train.steps=200 (repeatable)"
NO_PROGRESS = "no progress bar: a line of counts and rates every 10 s instead (also when stderr is not a terminal)"


def _progress(args):
    """The progress reporter a verb passes down (omni.progress): a bar, or periodic lines with --no-progress."""
    from omni.progress import reporter

    return reporter(bar=not args.no_progress)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omni", description="Train early-fusion omni models with JAX/Flax.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    train = verbs.add_parser("train", help="train (or resume) a model in a workdir")
    train.add_argument("--config", required=True, help="a configs/*.py file or a saved config.json")
    train.add_argument("--workdir", required=True, help="where config, metrics, TensorBoard files and checkpoints go")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set train.steps=200 (repeatable)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")

    ev = verbs.add_parser("eval", help="held-out loss/accuracy per modality and demo task scores of a checkpoint")
    ev.add_argument("--workdir", required=True, help="a training workdir (local or gs://); its checkpoints are read under a read lease")
    ev.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override the checkpoint's config, e.g. --set mesh.fsdp=1 on fewer devices")
    ev.add_argument("--demo-examples", type=int, help="held-out examples per demo task (default: the config's)")
    ev.add_argument("--generate", action="store_true", help="generate the answers of the eval split and score "
                    "them against the truth (exact, CER, WER, BLEU/chrF; audio: code accuracy, mel distance)")
    ev.add_argument("--max-examples", type=int, help="with --generate: only the first N examples (default: all)")
    ev.add_argument("--prompts", help="with --generate: score the manifest lines of this JSONL file instead of "
                                      "the eval split")
    ev.add_argument("--max-new-tokens", type=int, help="with --generate: at most this many tokens per answer "
                                                        "(default: up to the trained context)")
    ev.add_argument("--batch-size", type=int, default=64, help="with --generate: prompts per batch (default 64)")
    ev.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)

    exp = verbs.add_parser("export", help="a checkpoint's params as safetensors + config + tokenizer + codec")
    exp.add_argument("--workdir", required=True, help="the training workdir whose checkpoint is exported")
    exp.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    exp.add_argument("--out", required=True, help="a new folder")
    exp.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float32 or float16")
    exp.add_argument("--format", default="omni", choices=("omni", "hf"),
                     help="omni (default): omni's own tensors, config, tokenizer and codec; hf: a Hugging Face "
                          "Llama folder (early fusion only) that transformers loads with no custom code")
    exp.add_argument("--max-shard-size", default="5GB", help="--format hf: the largest weight file, e.g. 5GB "
                                                               "(default) or 500MB; bigger models are sharded")
    exp.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)

    gen = verbs.add_parser("generate", help="text, audio or an image from a model after an interleaved prompt, or "
                                            "after every prompt of a file, in batches")
    gen.add_argument("--model", required=True, help="a folder written by `omni export`, or a training workdir")
    gen.add_argument("--step", type=int, help="with a workdir: its checkpoint step (default: the latest)")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text with inline <image:PATH>, <audio:PATH.wav> or <codes:PATH.npy> tags")
    prompt.add_argument("--prompts", help="a JSONL file: manifest lines (the first target segment is generated) "
                                          "or {\"prompt\": ..., \"id\": ..., \"target\": ...} lines; results go to --out")
    gen.add_argument("--batch-size", type=int, default=64, help="with --prompts: prompts per batch (default 64)")
    gen.add_argument("--wav-dir", help="with --prompts: write each audio answer as <id>.wav here")
    gen.add_argument("--image-dir", help="with --prompts: write each image answer as <id>.png here")
    gen.add_argument("--audio", action="append", default=[], help="a WAV file appended to the prompt (repeatable)")
    gen.add_argument("--target", choices=("text", "audio", "image"), default="text", help="what to generate")
    gen.add_argument("--image-size", help="--target image: HEIGHTxWIDTH pixels (e.g. 32x32), fitted to the model's "
                                          "cell budget (data.max_image_patches) as training fits images; default: "
                                          "the size its training images mostly had (recorded by data build), else "
                                          "the largest square grid of that budget. A manifest line's answer keeps "
                                          "its own image's grid")
    gen.add_argument("--max-new-tokens", type=int, default=200,
                     help="at most this many tokens (capped to what the model's trained context leaves); an image "
                          "answer is always its whole grid")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0: all)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    gen.add_argument("--out", help="--prompt: where audio or an image goes (default generated.wav / generated.png; "
                                   "codes as .npy when the codec or image tokenizer cannot decode); --prompts: the "
                                   "results, one JSON line per prompt")

    abl = verbs.add_parser("ablate", help="train every fusion variant x seed of the config's ablate plan alike, "
                                          "then write ablation.csv/.md/.png (re-run to resume)")
    abl.add_argument("--config", required=True, help="e.g. configs/ablate_fusion.py")
    abl.add_argument("--workdir", required=True, help="one folder per run under <workdir>/runs, reports at the top")
    abl.add_argument("--seeds", type=int, help="runs per variant (default: the config's ablate.seeds)")
    abl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field of every run, e.g. --set ablate.match=params")
    abl.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                     help="scaling sweep: train every variant at each value, e.g. --sweep model.d=64,96,128,192 "
                          "(repeat for keys that move together; sets ablate.sweep)")
    abl.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")

    bench = verbs.add_parser("bench", help="time the real train step beside a matmul measured in the same run")
    bench.add_argument("--config", required=True, help="e.g. configs/bench/omni_1b.py (configs/bench/omni_cpu.py on CPU)")
    bench.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    bench.add_argument("--text-only", action="store_true", help="the same size on text documents only")
    bench.add_argument("--steps", type=int, default=5, help="timed steps (after compile and warm-up)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    bench.add_argument("--vocab", type=int, default=32768, help="vocabulary size (sets the unembedding cost)")
    bench.add_argument("--codebooks", type=int, default=8, help="audio codebooks of the synthetic batch")
    bench.add_argument("--codebook-size", type=int, default=1024, help="codes per audio codebook")
    bench.add_argument("--matmul-size", type=int, help="side of the peak-measuring matmul (default 8192 on "
                                                        "accelerators, 1024 on CPU)")
    bench.add_argument("--out", default="bench.jsonl", help="append the JSON line here")
    bench.add_argument("--reference", action="store_true", help="then the plain-JAX step of the same size in the "
                       "same process: prints omni's line, the reference's and a line of omni / reference ratios")
    bench.add_argument("--compile-only", action="store_true", help="lower and compile without running: compiled "
                       "FLOPs, bytes, memory and kernels per step only (checks the 1B size on a CPU host)")
    bench.add_argument("--profile", metavar="DIR", help="trace the timed steps with jax.profiler into DIR (local or "
                       "gs://): tensorboard --logdir DIR, Profile tab")

    comp = verbs.add_parser("compile", help="compile a config's programs for hardware that is not here (H100, "
                                            "H200, B200, TPU slices): memory, fit, work, collectives, estimate")
    comp.add_argument("--config", required=True, help="e.g. configs/bench/omni_1b.py")
    comp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    comp.add_argument("--target", required=True, help="h100, h200, b200, a GpuTargetConfigProto text file, or a "
                      "TPU slice: v4-8, v5p-8 ... v5p-4096, v5e-4 ... v5e-256, v6e-4 ... v6e-256")
    comp.add_argument("--devices", type=int, default=1, help="GPUs on the host (GPU targets)")
    comp.add_argument("--slices", type=int, default=1, help="TPU slices (multislice; mesh.dcn_* span them)")
    comp.add_argument("--reference", action="store_true", help="also the plain-JAX step of the same size, with "
                      "omni / reference ratios")
    comp.add_argument("--programs", default="train,eval,generate", help="which to compile, comma-separated")
    comp.add_argument("--vocab", type=int, default=32768, help="vocabulary size (sets the unembedding cost)")
    comp.add_argument("--generate-batch", type=int, default=8, help="rows of the compiled generate call")
    comp.add_argument("--memory-fraction", type=float, help="GPU: the share of device memory JAX's allocator "
                      "takes (default XLA_PYTHON_CLIENT_MEM_FRACTION or 0.75)")
    comp.add_argument("--no-suggest", action="store_true", help="when the train step does not fit, do not "
                      "compile other settings to find one that does")
    comp.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    comp.add_argument("--out", help="also append the JSON object to this file")

    _launch_parser(verbs)

    show = verbs.add_parser("config", help="print the resolved config, or the whole schema")
    show.add_argument("--config", help="a configs/*.py file or a saved config.json (default: the schema defaults)")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    show.add_argument("--schema", action="store_true", help="list every key with its type, default and doc")

    data_verb = verbs.add_parser("data", help="build, inspect and benchmark datasets").add_subparsers(
        dest="action", required=True)
    build = data_verb.add_parser("build", help="a JSONL manifest (or a TFDS catalog dataset) -> an omni dataset")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="JSONL manifest, one example per line (README: manifest format)")
    source.add_argument("--tfds", metavar="NAME", help="a prepared TFDS catalog dataset with an adapter: "
                                                        "coco_captions, librispeech")
    build.add_argument("--out", required=True, help="folder for the built dataset")
    build.add_argument("--codec", help="audio codec for WAV audio: 'tone' or a folder from `omni codec fit` "
                                       "(precomputed codes name their own codec)")
    build.add_argument("--image-tokenizer", help="image tokenizer for images entering as codes (\"as\": \"codes\" or "
                                                 "\"both\", or learned images): a folder from `omni imagetok fit` "
                                                 "(precomputed image_codes name their own tokenizer)")
    build.add_argument("--tokenizer", help="text tokenizer stored with the dataset: 'bytes', tokenizer.json, "
                                           "a folder from `omni tokenizer train`, or a SentencePiece .model")
    build.add_argument("--skip-bad", action="store_true",
                       help="skip bad lines (each is reported with its reason) instead of stopping at the first")
    build.add_argument("--eval-fraction", type=float, default=None,
                       help="share of lines without a \"split\" field that go to eval (stable hash of the id). "
                            "Not given: 0.05 when no line names a split, else 0 (those lines go to train)")
    build.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    build.add_argument("--tfds-data-dir", help="TFDS data_dir holding the prepared catalog dataset")
    build.add_argument("--tfds-train-split", default="", help="catalog split(s) for omni's train split (default: "
                                                               "train for coco_captions, train_clean100+train_clean360"
                                                               "+train_other500 for librispeech)")
    build.add_argument("--tfds-eval-split", default="", help="catalog split for omni's eval split (default: "
                                                              "val for coco_captions, dev_clean for librispeech)")
    build.add_argument("--limit", type=int, help="at most this many catalog examples per split")
    build.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="adapter option, e.g. task=tts for librispeech or captions=all for coco_captions")
    build.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)

    split = data_verb.add_parser("split", help="the split rule a built dataset applied and its eval example ids")
    split.add_argument("--dataset", required=True, help="a folder written by `omni data build`")

    for name, text in (("show", "draw one packed batch (modality and loss mask per position)"),
                       ("bench", "time the input pipeline beside the train step")):
        sub = data_verb.add_parser(name, help=text)
        sub.add_argument("--config", required=True, help="a configs/*.py file or a saved config.json")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
        if name == "show":
            sub.add_argument("--out", default="batch.png", help="where to write the picture")
            sub.add_argument("--split", default="train", choices=("train", "eval"), help="which split's batch")
        else:
            sub.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="worker counts to time")
            sub.add_argument("--batches", type=int, default=20, help="batches timed per worker count")
            sub.add_argument("--steps", type=int, default=5, help="train steps timed (0: skip the model)")
            sub.add_argument("--out", help="append the JSON lines to this file")

    tok = verbs.add_parser("tokenizer", help="text tokenizers").add_subparsers(dest="action", required=True)
    tok_train = tok.add_parser("train", help="train a byte-level BPE tokenizer on a manifest's text")
    tok_train.add_argument("--manifest", required=True, help="JSONL manifest whose text segments train it")
    tok_train.add_argument("--vocab-size", type=int, required=True, help="tokens in the trained vocabulary")
    tok_train.add_argument("--out", required=True, help="folder for tokenizer.json")

    codec = verbs.add_parser("codec", help="the built-in audio codec").add_subparsers(dest="action", required=True)
    fit = codec.add_parser("fit", help="fit the mel residual-VQ codec on a manifest's WAV audio")
    fit.add_argument("--manifest", required=True, help="JSONL manifest whose WAV audio it fits on")
    fit.add_argument("--out", required=True, help="folder for the fitted codec")
    fit.add_argument("--codebooks", type=int, default=None, help="residual codebooks (default: the codec's)")
    fit.add_argument("--codebook-size", type=int, default=None, help="codes per codebook (default: the codec's)")
    fit.add_argument("--seed", type=int, default=0, help="k-means initialisation seed")
    fit.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    enc = codec.add_parser("encode", help="WAV -> codes .npy [frames, codebooks]")
    enc.add_argument("--codec", required=True, help="'tone' or a folder from `omni codec fit`")
    enc.add_argument("--wav", required=True, help="the WAV file to encode")
    enc.add_argument("--out", required=True, help="the .npy file of codes to write")
    dec = codec.add_parser("decode", help="codes .npy -> WAV, to listen to what the model sees")
    dec.add_argument("--codec", required=True, help="'tone' or a folder from `omni codec fit`")
    dec.add_argument("--codes", required=True, help="a .npy of codes [frames, codebooks]")
    dec.add_argument("--out", required=True, help="the WAV file to write")

    imagetok = verbs.add_parser("imagetok", help="the built-in image tokenizer (image codes)").add_subparsers(
        dest="action", required=True)
    fit = imagetok.add_parser("fit", help="fit the patch residual-VQ image tokenizer on a manifest's images")
    fit.add_argument("--manifest", required=True, help="JSONL manifest whose images it fits on")
    fit.add_argument("--out", required=True, help="folder for the fitted image tokenizer")
    fit.add_argument("--patch-size", type=int, default=8, help="side of the pixel square one code cell covers")
    fit.add_argument("--codebooks", type=int, default=4, help="residual codebooks: codes per cell")
    fit.add_argument("--codebook-size", type=int, default=256, help="codes per codebook")
    fit.add_argument("--max-cells", type=int, default=256, help="images are fitted to at most this many cells "
                                                                "first, as training fits them (data.max_image_patches)")
    fit.add_argument("--iters", type=int, default=20, help="Lloyd steps per codebook, at most")
    fit.add_argument("--seed", type=int, default=0, help="k-means initialisation seed")
    fit.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    enc = imagetok.add_parser("encode", help="image -> codes .npy [rows, cols, codebooks]")
    enc.add_argument("--tokenizer", required=True, help="a folder from `omni imagetok fit`")
    enc.add_argument("--image", required=True, help="the image file to encode (PNG, JPEG, ...)")
    enc.add_argument("--out", required=True, help="the .npy file of codes to write")
    enc.add_argument("--max-cells", type=int, default=256, help="fit the image to at most this many cells first "
                                                                "(as data.max_image_patches does in training)")
    dec = imagetok.add_parser("decode", help="codes .npy -> PNG, to see what the model sees")
    dec.add_argument("--tokenizer", required=True, help="a folder from `omni imagetok fit`")
    dec.add_argument("--codes", required=True, help="a .npy of codes [rows, cols, codebooks]")
    dec.add_argument("--out", required=True, help="the PNG file to write")
    return parser


def _resolve(args):
    """The config of --config with the --set overrides applied, checked."""
    from omni import config as config_lib

    cfg = config_lib.load_config(args.config) if args.config else config_lib.Config()
    return config_lib.apply_overrides(cfg, args.set)


def _sweep(items: list[str]) -> dict:
    """['model.d=64,96', 'model.layers=2,4'] -> {'model.d': [64, 96], 'model.layers': [2, 4]} (ablate.sweep)."""
    from omni import config as config_lib

    sweep = {}
    for item in items:
        key, eq, values = item.partition("=")
        if not eq or not key or not values:
            raise config_lib.ConfigError(f"--sweep {item!r} is not KEY=V1,V2,... (e.g. --sweep model.d=64,96,128)")
        sweep[key.strip()] = [config_lib.parse_value(v.strip()) for v in values.split(",")]
    return sweep


def _compile(args) -> None:
    from omni import storage
    from omni.tools import compile as compile_tool
    from omni.tools import targets

    targets.prepare_environment()

    programs = tuple(p.strip() for p in args.programs.split(",") if p.strip())
    unknown = sorted(set(programs) - {"train", "eval", "generate"})
    if unknown or not programs:
        raise ConfigError(f"--programs {args.programs!r}: choose from train, eval, generate")
    _check_out(args.out, "compile.jsonl")
    options = compile_tool.Options(target=args.target, devices=args.devices, slices=args.slices,
                                   reference=args.reference, programs=programs, vocab_size=args.vocab,
                                   generate_batch=args.generate_batch, memory_fraction=args.memory_fraction,
                                   suggest=not args.no_suggest)
    report = compile_tool.main(_resolve(args), options, as_json=args.json)
    if args.out:
        storage.append_text(args.out, json.dumps(report) + "\n")


def _launch_parser(verbs) -> None:
    launch = verbs.add_parser("launch", help="run an omni command as a multi-process JAX job (local, slurm, gke, "
                                             "tpu)").add_subparsers(dest="target", required=True)
    targets = {
        "local": "N processes on this machine, D simulated CPU devices each (gloo collectives)",
        "slurm": "an sbatch script (srun, one process per node); submits it unless --dry-run",
        "gke": "a JobSet manifest for TPU slices (+ the XPK command); applies it unless --dry-run",
        "tpu": "gcloud commands: create TPU VM(s), install, run on all workers, delete; runs them unless --dry-run",
    }
    for name, text in targets.items():
        sub = launch.add_parser(name, help=text, description=text + ". The omni command to run follows --; "
                                "or give --config and --workdir for `train`.")
        sub.add_argument("--config", help="shorthand: run `train --config CONFIG --workdir WORKDIR`")
        sub.add_argument("--workdir", help="with --config: the run's workdir (shared storage on clusters)")
        if name == "local":
            sub.add_argument("--processes", type=int, required=True, help="local processes forming one jax.distributed job")
            sub.add_argument("--devices-per-process", type=int, default=1, help="CPU devices each process has")
            sub.add_argument("--port", type=int, help="coordinator port on 127.0.0.1 (default: a free one)")
        else:
            sub.add_argument("--dry-run", action="store_true", help="print what would be run or applied, do nothing")
            sub.add_argument("--out", help="where the rendered file is written")
        if name == "slurm":
            sub.add_argument("--nodes", type=int, required=True, help="SLURM nodes, one omni process per node")
            sub.add_argument("--gpus-per-node", type=int, required=True, help="GPUs on each node")
            sub.add_argument("--partition", default="", help="SLURM partition (default: the cluster's)")
            sub.add_argument("--time", default="24:00:00", help="SLURM time limit")
            sub.add_argument("--job-name", default="omni", help="SLURM job name")
            sub.add_argument("--setup", default="", help="a shell line run before srun (e.g. activating a venv)")
        if name in ("gke", "tpu"):
            sub.add_argument("--slices", type=int, default=1, help="TPU slices (multislice over DCN)")
        if name == "gke":
            sub.add_argument("--image", required=True, help="container image with omni installed")
            sub.add_argument("--tpu-type", required=True, help="e.g. v5p-128")
            sub.add_argument("--topology", required=True, help="the slice's chip topology, e.g. 4x4x4 for v5p-128")
            sub.add_argument("--name", default="omni", help="JobSet / workload name")
            sub.add_argument("--cluster", default="CLUSTER", help="GKE cluster name for the XPK command line")
        if name == "tpu":
            sub.add_argument("--tpu-name", required=True, help="the TPU VM to create (or reuse)")
            sub.add_argument("--zone", required=True, help="GCP zone of the TPU, e.g. us-east5-a")
            sub.add_argument("--accelerator", required=True, help="e.g. v5p-128, v5litepod-16, v6e-16")
            sub.add_argument("--project", default="", help="GCP project (default: gcloud's)")
            sub.add_argument("--runtime-version", default="v2-alpha-tpuv5", help="TPU VM software version")
            sub.add_argument("--install", default="", help="install command run in ~/omni on every worker")
            sub.add_argument("--keep", action="store_true", help="do not delete the TPU at the end")
        sub.add_argument("command", nargs=argparse.REMAINDER, help="-- then the omni command, e.g. -- train ...")


def _launch(args) -> int:
    from omni.launch import runners

    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if args.config:
        if command or not args.workdir:
            raise ConfigError("give either --config with --workdir (runs train) or a command after --, not both")
        command = ["train", "--config", args.config, "--workdir", args.workdir]
    if not command:
        raise ConfigError("nothing to run: add -- train --config ... --workdir ... (or --config and --workdir)")
    if args.target == "local":
        return runners.local(args.processes, args.devices_per_process, command, port=args.port)
    options = {k: v for k, v in vars(args).items() if k not in ("verb", "target", "command", "config", "workdir",
                                                                 "out", "dry_run")}
    text, default_out, runner = runners.render(args.target, command, **options)
    return runners.submit(text, args.out or default_out, runner, dry_run=args.dry_run)


def _options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--option {pair!r} is not KEY=VALUE")
        out[key] = value
    return out


def _data_build(args) -> None:
    from omni.data import dataset
    from omni.data.codec import load_codec
    from omni.data.text_tokenizer import load_tokenizer

    codec = load_codec(args.codec) if args.codec else None
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    image_tokenizer = None
    if args.image_tokenizer:
        from omni.data.image_tokenizer import load_image_tokenizer

        image_tokenizer = load_image_tokenizer(args.image_tokenizer)
    report = dataset.BuildReport()
    if args.manifest:
        examples, codec = dataset.manifest_examples(args.manifest, codec, args.eval_fraction, report, args.skip_bad,
                                                    progress=_progress(args), image_tokenizer=image_tokenizer)
        source = args.manifest
    else:
        from omni.data import adapters

        if args.eval_fraction is not None:
            raise ConfigError("--eval-fraction applies to manifests; a catalog dataset's eval split is "
                              "--tfds-eval-split")
        examples = adapters.catalog_examples(args.tfds, args.tfds_train_split, args.tfds_eval_split,
                                             args.tfds_data_dir, args.limit, **_options(args.option))
        splits = adapters.catalog_splits(args.tfds, args.tfds_train_split, args.tfds_eval_split)
        report.split_rule = f"the catalog's splits: train = {splits['train']}, eval = {splits['eval']}"
        examples = dataset.raw_examples(examples, codec, report, args.skip_bad, source=f"tfds:{args.tfds}",
                                        progress=_progress(args), image_tokenizer=image_tokenizer)
        source = f"tfds:{args.tfds}"
    dataset.build(examples, args.out, codec, tokenizer, report, overwrite=args.overwrite, source=source)
    print(f"omni: built {args.out}: {report.summary()}")
    print(f"omni: split rule: {report.split_rule}; the eval ids are in {args.out}/{dataset.DATASET_FILE} "
          f"(`omni data split --dataset {args.out}` lists them)")
    if not report.counts.get("eval"):
        print(f"omni: warning: {args.out} has no eval examples, so training has no held-out loss to report; "
              f"{dataset.NO_EVAL_HINT}", file=sys.stderr)


def _data_split(args) -> None:
    from omni.data import dataset

    print(dataset.open_dataset(args.dataset).split_listing())


def _check_out(location, example: str = "out", folder: bool = False, what: str = "--out") -> None:
    """Before the work: `location` (a file, or with `folder` a folder omni writes into) can take the output."""
    from omni import storage

    if location is None:
        return
    if folder:
        storage.check_writable(location, what)
    else:
        storage.check_output_file(location, what, example)


def _data_show(args) -> None:
    from omni.data import pipeline
    from omni.tools import data_show

    _check_out(args.out, "batch.png")
    cfg = _resolve(args)
    if args.split == "train":
        batch = next(iter(pipeline.train_dataset(cfg)))
    else:
        batch = pipeline.eval_batches(cfg)[0]
    print(data_show.summarize(batch, pipeline.vocab_for(cfg), pipeline.tokenizer_for(cfg)))
    path = data_show.draw(batch, args.out, title=f"{cfg.name}: one {args.split} batch, data.dataset={cfg.data.dataset}")
    print(f"omni: wrote {path}")


def _manifest_lines(path):
    from omni.data import manifest

    for number, line in manifest.read_lines(path):
        if isinstance(line, manifest.ManifestError):
            raise line
        manifest.check_line(line, path, number)
        yield number, line


def _tokenizer_train(args) -> None:
    from omni.data.text_tokenizer import train_bpe

    _check_out(args.out, folder=True)
    texts = [s["text"] for _, line in _manifest_lines(args.manifest) for s in line["segments"] if "text" in s]
    tok = train_bpe(texts, args.vocab_size, args.out)
    print(f"omni: trained a {tok.vocab_size}-token BPE tokenizer on {len(texts)} texts -> {args.out}/tokenizer.json")


def _codec(args) -> None:
    from omni import storage
    from omni.data import audio
    from omni.data import codec as codec_lib

    _check_out(args.out, "codes.npy" if args.action == "encode" else "decoded.wav", folder=args.action == "fit")
    if args.action == "fit":
        base = storage.path(args.manifest).parent
        paths = [base / s["audio"] for _, line in _manifest_lines(args.manifest) for s in line["segments"]
                 if "audio" in s]
        if not paths:
            raise ConfigError(f"{args.manifest} has no WAV audio segments to fit a codec on")
        hparams = {k: v for k, v in (("codebooks", args.codebooks), ("codebook_size", args.codebook_size))
                   if v is not None}
        fitted = codec_lib.fit_codec_on_files(paths, args.out, seed=args.seed, progress=_progress(args), **hparams)
        errors = fitted.fit_info["relative_error"]
        print(f"omni: fitted {fitted.name} on {len(paths)} clips: {fitted.frame_rate:g} frames/s, codebooks "
              f"{list(fitted.codebook_sizes)} -> {args.out}; reconstruction error (normalised log-mel, relative "
              f"to the mean frame) {' -> '.join(f'{e:.3f}' for e in errors)} over the codebooks")
        return
    codec = codec_lib.load_codec(args.codec)
    if args.action == "encode":
        codes = codec.encode(audio.load_audio(args.wav, codec.sample_rate))
        _save_npy(args.out, codes)
        print(f"omni: {args.wav} -> {args.out}: codes {list(codes.shape)} at {codec.frame_rate:g} frames/s")
    else:
        from omni.data.manifest import load_codes

        try:
            codes = load_codes(args.codes)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        wave = codec.decode(codes)
        audio.write_wav(args.out, wave, codec.sample_rate)
        print(f"omni: {args.codes} -> {args.out}: {len(wave) / codec.sample_rate:.2f} s at {codec.sample_rate} Hz")


def _imagetok(args) -> None:
    from omni import storage
    from omni.data import image_tokenizer as image_tokenizer_lib
    from omni.tools.image_generate import write_png

    _check_out(args.out, "codes.npy" if args.action == "encode" else "decoded.png", folder=args.action == "fit")
    if args.action == "fit":
        base = storage.path(args.manifest).parent
        paths = [base / s["image"] for _, line in _manifest_lines(args.manifest) for s in line["segments"]
                 if "image" in s]
        if not paths:
            raise ConfigError(f"{args.manifest} has no image segments to fit an image tokenizer on")
        tok = image_tokenizer_lib.fit_on_files(
            paths, args.out, patch_size=args.patch_size, codebooks=args.codebooks, codebook_size=args.codebook_size,
            max_cells=args.max_cells, iters=args.iters, seed=args.seed, progress=_progress(args))
        info = tok.fit_info
        held = (f"; held-out {info['holdout_images']} images: {info['holdout_psnr_db'][-1]:.2f} dB"
                if info["holdout_psnr_db"] else " (fewer than "
                f"{image_tokenizer_lib.MIN_HOLDOUT_IMAGES} images: none held out)")
        print(f"omni: fitted {tok.name} on {info['images']} images ({info['patches']} cells of {tok.patch_size} x "
              f"{tok.patch_size}) in {info['seconds']:.1f} s: codebooks {list(tok.codebook_sizes)} -> {args.out}; "
              f"reconstruction PSNR on the fitted images {' -> '.join(f'{v:.2f}' for v in info['psnr_db'])} dB "
              f"over the codebooks{held}")
        return
    tok = image_tokenizer_lib.load_image_tokenizer(args.tokenizer)
    if args.action == "encode":
        from omni.data.images import decode_image

        try:
            pixels = decode_image(storage.path(args.image).read_bytes(), name=args.image)
        except OSError as e:
            raise ConfigError(f"cannot read --image {args.image}: {e.strerror or e}") from None
        except ValueError as e:
            raise ConfigError(str(e)) from None
        codes = image_tokenizer_lib.encode_fitted(tok, pixels, args.max_cells)
        _save_npy(args.out, codes)
        rows, cols, _ = codes.shape
        back = tok.decode(codes)
        print(f"omni: {args.image} ({pixels.shape[1]} x {pixels.shape[0]} pixels) -> {args.out}: codes "
              f"{list(codes.shape)} ({rows * cols} cells of {tok.patch_size} x {tok.patch_size} at "
              f"{back.shape[1]} x {back.shape[0]} pixels); round-trip PSNR "
              f"{image_tokenizer_lib.psnr(image_tokenizer_lib.fitted(tok, pixels, args.max_cells), back):.2f} dB")
    else:
        from omni.data.manifest import load_image_codes
        from omni.tokens import check_image_codes

        try:
            codes = load_image_codes(args.codes)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        try:
            check_image_codes(codes, tok.codebook_sizes)
        except ValueError as e:
            raise ConfigError(f"--codes {args.codes}: {e}; were they made by this tokenizer?") from None
        pixels = tok.decode(codes)
        write_png(args.out, pixels)
        print(f"omni: {args.codes} -> {args.out}: {pixels.shape[1]} x {pixels.shape[0]} pixels")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except OmniError as e:  # bad input: one line naming the file, line or key, and exit code 2 (omni.errors)
        print(f"omni: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a disk condition met while writing (full, read-only, a folder where a file goes): one line
        from omni import storage

        line = storage.os_error_line(e)
        if line is None:
            raise
        print(f"omni: error: cannot write {e.filename or 'an output'}: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's code for SIGINT; checkpoints already saved stay
        print("omni: interrupted", file=sys.stderr)
        return 130


def _run(args) -> int:
    if args.verb == "launch":
        return _launch(args)
    if args.verb != "config":
        from omni.train import distributed

        distributed.initialize()  # joins a multi-process job when the environment describes one
    if args.verb in ("train", "eval", "ablate", "data"):
        import omni.demo  # noqa: F401  (registers data.dataset=demo / demo-speech / demo-draw: built on first use)
    if args.verb == "data":
        {"build": _data_build, "show": _data_show, "bench": _data_bench, "split": _data_split}[args.action](args)
    elif args.verb == "tokenizer":
        _tokenizer_train(args)
    elif args.verb == "codec":
        _codec(args)
    elif args.verb == "imagetok":
        _imagetok(args)
    elif args.verb == "eval":
        from omni.tools import evaluate

        if not args.generate and (args.prompts or args.max_examples is not None or args.max_new_tokens is not None):
            raise ConfigError("--prompts, --max-examples and --max-new-tokens go with --generate")
        for name in ("max_examples", "max_new_tokens", "batch_size"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
        evaluate.evaluate_checkpoint(args.workdir, args.step, args.set, args.demo_examples, generate=args.generate,
                                     max_examples=args.max_examples, prompts=args.prompts,
                                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                     progress=_progress(args))
    elif args.verb == "export" and args.format == "hf":
        from omni.tools import hf

        out = hf.export_hf(args.workdir, args.out, args.step, args.dtype, args.max_shard_size,
                           progress=_progress(args))
        info = json.loads((out / "config.json").read_text())["omni"]
        print(f"omni: exported step {info['step']} of {args.workdir} as {info['dtype']} to {out} (a Hugging Face "
              f"Llama folder; images go through {hf.hf_llama.PATCH_FILE}, see its README.md)")
    elif args.verb == "export":
        from omni.tools import export

        out = export.export(args.workdir, args.out, args.step, args.dtype, progress=_progress(args))
        info = json.loads((out / export.CONFIG_FILE).read_text())["export"]
        print(f"omni: exported step {info['step']} of {args.workdir} as {info['dtype']} to {out} "
              f"({(out / export.WEIGHTS_FILE).stat().length / 2**20:.1f} MiB)")
    elif args.verb == "generate":
        _generate(args)
    elif args.verb == "ablate":
        from omni.tools import ablate

        cfg = _resolve(args)
        if args.sweep:
            cfg.ablate.sweep = _sweep(args.sweep)
        ablate.run_ablation(cfg, args.workdir, seeds=args.seeds, progress=not args.no_progress)
    elif args.verb == "bench":
        from omni.tools import bench

        _check_out(args.out, "bench.jsonl")
        bench.run(_resolve(args), text_only=args.text_only, warmup=args.warmup, steps=args.steps,
                      vocab_size=args.vocab, codebooks=args.codebooks, codebook_size=args.codebook_size,
                      matmul_size=args.matmul_size, out=args.out, reference=args.reference,
                      compile_only=args.compile_only, profile=args.profile)
    elif args.verb == "compile":
        _compile(args)
    elif args.verb == "config":
        from omni import config as config_lib

        print(config_lib.describe() if args.schema else json.dumps(config_lib.to_dict(_resolve(args)), indent=2))
    else:
        from omni.demo import scorer
        from omni.train import loop

        cfg = _resolve(args)
        loop.train(cfg, args.workdir, progress=not args.no_progress, end_of_run=scorer.end_of_run_for(cfg))
    return 0


def _generate(args) -> None:
    from omni import storage
    from omni.data import audio
    from omni.tools import generate, image_generate
    from omni.train import artifact

    if args.max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens must be at least 1; got {args.max_new_tokens}")
    image_size = _image_size(args.image_size) if args.image_size is not None else None
    # the export's compile_cache setting (a workdir has no export config: the default), before anything compiles
    _enable_compile_cache_of_export(storage.path(args.model) / artifact.CONFIG_FILE)
    if args.prompts is not None:
        if not args.out or args.audio:
            raise GenerateError("--prompts needs --out (the results file) and takes no --audio (name audio in the "
                                "prompts' lines)")
        _check_out(args.out, "results.jsonl")
        _check_out(args.wav_dir, folder=True, what="--wav-dir")
        _check_out(args.image_dir, folder=True, what="--image-dir")
        generate.generate_file(args.model, args.prompts, args.out, step=args.step, target=args.target,
                               max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                               seed=args.seed, batch_size=args.batch_size, wav_dir=args.wav_dir,
                               image_dir=args.image_dir, image_size=image_size)
        return
    if args.wav_dir or args.image_dir:
        raise GenerateError("--wav-dir and --image-dir go with --prompts; with --prompt, --out names the file")
    if image_size is not None and args.target != "image":
        raise GenerateError(f"--image-size goes with --target image (this asks for --target {args.target})")
    args.out = args.out or ("generated.png" if args.target == "image" else "generated.wav")
    if args.target != "text":  # (a text answer is printed)
        _check_out(args.out, "generated.png" if args.target == "image" else "generated.wav")
    model = artifact.load(args.model, args.step)
    context = model.config.data.seq_len
    task = generate.prompt_task(args.prompt, args.audio, args.target, model, image_size)
    answers, _, result = generate.answer_tasks(model, [task], max_new_tokens=args.max_new_tokens,
                                               temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                                               batch_size=1, log=lambda line: print(line, file=sys.stderr,
                                                                                    flush=True))
    answer = answers[0]
    prompt_len, max_new, output = len(answer.request.prompt["tokens"]), answer.request.max_new_tokens, answer.output
    grid = answer.request.image_grid
    ending = ("a stop token" if answer.stopped is not None else f"--max-new-tokens={max_new}"
              if max_new == args.max_new_tokens else f"the {context}-token context was full")
    if args.target == "text":
        print(output)
    elif args.target == "image" and output["image"] is not None:
        image_generate.write_png(args.out, output["image"])
        height, width = output["image"].shape[:2]
        print(f"omni: an image of {grid.rows} x {grid.cols} cells -> {args.out} ({height} x {width} pixels)")
    elif args.target == "image":
        out = _save_npy(storage.path(args.out).with_suffix(".npy"), output["codes"])
        print(f"omni: {grid.rows} x {grid.cols} cells of {model.image_tokenizer.name} codes -> {out} (this image "
              f"tokenizer cannot decode to pixels here)")
    elif output["wave"] is not None:
        audio.write_wav(args.out, output["wave"], output["sample_rate"])
        print(f"omni: {len(output['codes'])} audio frames -> {args.out} "
              f"({len(output['wave']) / output['sample_rate']:.2f} s at {output['sample_rate']} Hz)")
    else:
        out = _save_npy(storage.path(args.out).with_suffix(".npy"), output["codes"])
        print(f"omni: {len(output['codes'])} frames of {model.codec.name if model.codec else 'audio'} codes -> "
              f"{out} (this codec cannot decode to a waveform here)")
    print(f"omni: {result.decode_tokens + 1} tokens until {ending}; prompt {prompt_len} tokens, prefill "
          f"{result.prefill_s * 1e3:.1f} ms, decode {result.decode_tokens_per_s:,.0f} tokens/s, compile "
          f"{result.compile_s:.1f} s", file=sys.stderr)
    from omni.train import compile_cache

    print(f"omni: {compile_cache.summary()}", file=sys.stderr)


def _save_npy(path, array):
    """A .npy file at `path` (a local path or a URL; ".npy" added when missing, as numpy.save does), written
    whole; returns the path."""
    import io

    import numpy as np

    from omni import storage

    path = storage.path(path if str(path).endswith(".npy") else f"{path}.npy")
    data = io.BytesIO()
    np.save(data, array)
    storage.write_bytes(path, data.getvalue())
    return path


def _image_size(text: str) -> tuple[int, int]:
    """--image-size HEIGHTxWIDTH -> (height, width) pixels."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or min(int(match.group(1)), int(match.group(2))) < 1:
        raise GenerateError(f"--image-size {text!r} is not HEIGHTxWIDTH in pixels, e.g. 32x32")
    return int(match.group(1)), int(match.group(2))


def _enable_compile_cache_of_export(config_file) -> None:
    """The export's compile_cache setting, applied before load_export compiles anything (load_export itself
    names a missing or broken config file)."""
    from omni.train import compile_cache

    try:
        setting = json.loads(config_file.read_text()).get("compile_cache", "auto")
    except (OSError, ValueError, AttributeError):  # (a StorageError is an OSError: the load that follows names it)
        setting = "auto"
    compile_cache.enable(setting if isinstance(setting, str) else "auto",
                         log=lambda line: print(line, file=sys.stderr))


def _data_bench(args) -> None:
    from omni.tools import data_bench

    _check_out(args.out, "data_bench.jsonl")
    data_bench.run(_resolve(args), args.workers, args.batches, args.steps, out=args.out)


if __name__ == "__main__":
    sys.exit(main())
