"""`omni launch`: the environment a process joins a job from, the rendered cluster files (checked as a scheduler
would read them), and real local multi-process jobs: one that trains, one whose process dies."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from omni import config as config_lib
from omni.config import ConfigError
from omni.launch import runners as launch
from omni.train import distributed
from tests.conftest import tiny_config

TRAIN = ["train", "--config", "configs/demo.py", "--workdir", "/shared/runs/x"]


def test_environment_decides_how_a_process_joins():
    assert distributed.settings({}) is None
    assert distributed.settings({"OMNI_DISTRIBUTED": "auto"}) == {"heartbeat_timeout_seconds": 100}
    explicit = {"OMNI_COORDINATOR": "10.0.0.1:1234", "OMNI_NUM_PROCESSES": "4", "OMNI_PROCESS_ID": "3",
                "OMNI_HEARTBEAT_S": "20"}
    assert distributed.settings(explicit) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                              "process_id": 3, "heartbeat_timeout_seconds": 20}
    with pytest.raises(distributed.DistributedError, match="OMNI_PROCESS_ID not set"):
        distributed.settings({"OMNI_COORDINATOR": "h:1", "OMNI_NUM_PROCESSES": "2"})
    with pytest.raises(distributed.DistributedError, match="must be in 0..1"):
        distributed.settings(dict(explicit, OMNI_NUM_PROCESSES="2"))
    with pytest.raises(distributed.DistributedError, match="not host:port"):
        distributed.settings(dict(explicit, OMNI_COORDINATOR="10.0.0.1"))
    with pytest.raises(distributed.DistributedError, match="only value is 'auto'"):
        distributed.settings({"OMNI_DISTRIBUTED": "yes"})


def _bash_n(script: str, tmp_path: Path) -> None:
    path = tmp_path / "script.sh"
    path.write_text(script)
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_slurm_script(tmp_path):
    script = launch.slurm_script(TRAIN, nodes=4, gpus_per_node=8, partition="a100", setup="source ~/venv/bin/activate")
    _bash_n(script, tmp_path)
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", script, re.M))
    assert directives["nodes"] == "4" and directives["ntasks-per-node"] == "1" and directives["gpus-per-node"] == "8"
    assert directives["partition"] == "a100"
    body = [l for l in script.splitlines() if l and not l.startswith("#")]
    assert body[-1] == ("srun --kill-on-bad-exit=1 --ntasks-per-node=1 omni train --config configs/demo.py "
                        "--workdir /shared/runs/x")
    assert "export OMNI_DISTRIBUTED=auto" in body[-2] and body.index("source ~/venv/bin/activate") < len(body) - 2
    with pytest.raises(ConfigError):
        launch.slurm_script(TRAIN, nodes=0, gpus_per_node=8)


@pytest.mark.parametrize("slices", [1, 2])
def test_gke_jobset(slices):
    manifest = yaml.safe_load(yaml.safe_dump(launch.gke_jobset(TRAIN, "gcr.io/p/omni:1", "v5p-128", "4x4x4",
                                                                slices=slices, name="run1")))
    assert manifest["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and manifest["kind"] == "JobSet"
    assert manifest["metadata"]["name"] == "run1"
    (replicated,) = manifest["spec"]["replicatedJobs"]
    assert replicated["replicas"] == slices
    job = replicated["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 16  # v5p-128: 64 chips on 16 hosts of 4
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "4x4x4"
    (container,) = pod["containers"]
    assert container["image"] == "gcr.io/p/omni:1" and container["command"] == ["omni", *TRAIN]
    assert container["resources"]["limits"]["google.com/tpu"] == 4
    env = {e["name"]: e for e in container["env"]}
    assert env["OMNI_DISTRIBUTED"]["value"] == "auto"
    assert ("MEGASCALE_SLICE_ID" in env) == (slices > 1)
    if slices > 1:
        assert env["MEGASCALE_NUM_SLICES"]["value"] == "2"
        assert env["MEGASCALE_COORDINATOR_ADDRESS"]["value"].startswith("run1-slice-0-0.run1:")
    with pytest.raises(ConfigError, match="does not hold the 64 chips"):
        launch.gke_jobset(TRAIN, "img", "v5p-128", "4x4x2")
    with pytest.raises(ConfigError, match="unknown TPU accelerator"):
        launch.gke_jobset(TRAIN, "img", "h100-8", "2x2")


@pytest.mark.parametrize("slices", [1, 2])
def test_tpu_script(slices, tmp_path):
    script = launch.tpu_script(TRAIN, "t1", "us-east5-a", "v5p-16", slices=slices, project="proj")
    _bash_n(script, tmp_path)
    lines = script.splitlines()
    creates = [l for l in lines if " create " in l]
    assert len(creates) == 1 and ("queued-resources" in creates[0]) == (slices > 1)
    assert any(l.startswith("trap ") and "delete" in l for l in lines)  # deleted even when the run fails
    runs = [l for l in lines if "omni train" in l]
    assert len(runs) == slices and all(l.endswith("&") and "--worker=all" in l for l in runs)  # all at once
    for i, line in enumerate(runs):
        assert "OMNI_DISTRIBUTED=auto" in line and ("MEGASCALE_SLICE_ID=%d" % i in line) == (slices > 1)
    assert "--keep" not in script and "delete" not in launch.tpu_script(TRAIN, "t1", "z", "v5p-16", keep=True)
    assert launch.tpu_slice("v5litepod-16") == launch.TpuSlice("v5litepod-16", 16, 4, 4)
    assert launch.tpu_slice("v4-8") == launch.TpuSlice("v4-8", 4, 1, 4)


def test_dry_run_prints_and_writes_nothing(tmp_path):
    result = subprocess.run([sys.executable, "-m", "omni.cli", "launch", "slurm", "--nodes", "2", "--gpus-per-node",
                             "4", "--dry-run", "--config", "configs/demo.py", "--workdir", "runs/x"],
                            capture_output=True, text=True, cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(Path.cwd())))
    assert result.returncode == 0, result.stderr
    assert "srun --kill-on-bad-exit=1" in result.stdout and "would write omni.sbatch" in result.stderr
    assert list(tmp_path.iterdir()) == []
    bad = subprocess.run([sys.executable, "-m", "omni.cli", "launch", "gke", "--image", "i", "--tpu-type", "v5p-8",
                          "--topology", "9x9", "--dry-run", "--", "train"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--topology '9x9' does not hold the 4 chips of v5p-8" in bad.stderr


# ------------------------------------------------------------------ rendered files run nothing they are given
# Each target is launched for real (no --dry-run) through the CLI, with fake gcloud / sbatch / srun / kubectl /
# xpk / omni / pip first on PATH. The fakes record their argv as JSON and do what the real tool's far side would
# do with it: gcloud ssh runs --command through `bash -c` (the remote shell), sbatch reads the #SBATCH lines as
# sbatch does and runs the script, srun starts its command, the pod's command is expanded as Kubernetes does.
# Every value must arrive byte for byte, and no `$(touch ...)` or backtick in them may create a file.

INJECT = ["$(touch INJ_X)", "`touch INJ_Y`", "it's", 'say "hi"', "a b  c", "x; touch INJ_X", "x && touch INJ_Y",
          "$HOME", "${PATH}", "$$", "$(OMNI_DISTRIBUTED)", "back\\slash", "#hash", "* ?", "~", "!bang",
          "üñí €", "", "-dash"]
MULTILINE = ["new\nline; touch INJ_X", "cr\rlf\r\n", "tab\there", "nel\x85line\u2028sep", "$(touch INJ_X\n)"]
COMMAND = (["train", "--config", "configs/$(touch INJ_X).py", "--workdir", "/runs/`touch INJ_Y`/it's \"w\" ; x"]
           + [a for v in INJECT + MULTILINE for a in ("--set", f"k={v}")] + ["$(touch INJ_Y)"])
# for options written on one line (#SBATCH directives, names, zones, images): everything but control characters
LINE = "n $(touch INJ_X) `touch INJ_Y` it's \"q\" ;x #h \\b $HOME ${PATH} $$ ü"

_FAKE = r'''#!{python}
import json, os, subprocess, sys
prog, args = os.path.basename(sys.argv[0]), sys.argv[1:]
record = {{"prog": prog, "argv": args, "cwd": os.getcwd(),
          "env": {{k: v for k, v in os.environ.items() if k.startswith(("OMNI_", "MEGASCALE_", "SETUP_"))}}}}
if prog in ("sbatch", "kubectl"):
    record["file"] = open(args[-1], encoding="utf-8").read()
with open(os.environ["FAKE_LOG"], "a", encoding="utf-8") as log:
    log.write(json.dumps(record) + "\n")
code = 0
if prog == "gcloud" and "describe" in args:
    print(os.environ.get("FAKE_COORDINATOR", "10.0.0.2"))
elif prog == "gcloud" and "ssh" in args:  # the remote side: sshd runs the command string with the user's shell
    code = subprocess.run(["bash", "-c", args[args.index("--command") + 1]], cwd=os.environ["FAKE_REMOTE"]).returncode
elif prog == "sbatch":  # the batch script, on the first node of the allocation
    code = subprocess.run(["bash", args[-1]]).returncode
elif prog == "srun":
    code = subprocess.run(args[next(i for i, a in enumerate(args) if not a.startswith("-")):]).returncode
sys.exit(code)
'''


@pytest.fixture
def fakes(tmp_path):
    """(run, records): run(*cli_args) runs `omni launch ...` in tmp_path/job with a clean environment whose PATH
    starts with the fakes; records(prog) lists what each fake was called with."""
    bin_dir, job, remote = tmp_path / "bin", tmp_path / "job", tmp_path / "remote"
    for d in (bin_dir, job, remote / "omni"):
        d.mkdir(parents=True)
    for prog in ("gcloud", "sbatch", "srun", "kubectl", "xpk", "omni", "pip"):
        (bin_dir / prog).write_text(_FAKE.format(python=sys.executable))
        (bin_dir / prog).chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path / "home"), "FAKE_LOG": str(log),
           "FAKE_REMOTE": str(remote), "PYTHONPATH": str(Path.cwd()), "PYTHONUTF8": "1", "LC_ALL": "C.UTF-8"}

    def run(*args, check=True, **extra_env):
        result = subprocess.run([sys.executable, "-m", "omni.cli", "launch", *args], cwd=job, text=True,
                                capture_output=True, env=dict(env, **extra_env), timeout=120)
        assert not check or result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return result

    def records(prog=None):
        rows = [json.loads(l) for l in log.read_text(encoding="utf-8").splitlines()] if log.exists() else []
        return [r for r in rows if prog in (None, r["prog"])]

    run.env, run.bin, run.job = env, bin_dir, job
    yield run, records
    assert list(tmp_path.rglob("INJ_*")) == [] and list(Path.cwd().glob("INJ_*")) == []  # nothing ran


def _sbatch_arguments(script: str, single_quotes: bool) -> list[str]:
    """The options sbatch reads from a script's #SBATCH lines (src/sbatch/opt.c _get_argument): split at
    whitespace outside quotes, quotes removed, a backslash escapes the next character, an unquoted # starts a
    comment. Slurm before 18.08 knows only double quotes (single_quotes=False) and ends the line at any #."""
    out = []
    for line in script.splitlines()[1:]:
        if not line.startswith("#"):
            break  # sbatch stops at the first command
        if not line.startswith("#SBATCH"):
            continue
        rest, i = line[len("#SBATCH"):], 0
        while True:
            while i < len(rest) and rest[i].isspace():
                i += 1
            arg, quote, escape = [], "", False
            while i < len(rest) and (quote or not rest[i].isspace()):
                c = rest[i]
                i += 1
                if escape:
                    escape = False
                elif c == "\\":
                    escape = True
                    continue
                elif quote and c == quote:
                    quote = ""
                    continue
                elif not quote and (c == '"' or (single_quotes and c == "'")):
                    quote = c
                    continue
                elif c == "#" and (not quote or not single_quotes):
                    i = len(rest)
                    break
                arg.append(c)
            assert not quote, f"unmatched quote in {line!r}"
            if not arg:
                break
            out.append("".join(arg))
    return out


def test_slurm_runs_nothing_it_is_given(fakes):
    run, records = fakes
    run("slurm", "--nodes", "2", "--gpus-per-node", "8", "--job-name", LINE, "--partition", LINE + "p",
        "--time", LINE + "t", "--setup", "export SETUP_VALUE='a b'", "--", *COMMAND)
    (sbatch,) = records("sbatch")
    assert sbatch["argv"] == ["omni.sbatch"]
    for single_quotes in (True, False):  # as today's and older sbatch read the directives
        options = _sbatch_arguments(sbatch["file"], single_quotes)
        assert f"--job-name={LINE}" in options and f"--partition={LINE}p" in options and f"--time={LINE}t" in options
        assert "--nodes=2" in options and "--gpus-per-node=8" in options
    (srun,) = records("srun")
    assert srun["argv"] == ["--kill-on-bad-exit=1", "--ntasks-per-node=1", "omni", *COMMAND]
    (omni,) = records("omni")
    assert omni["argv"] == COMMAND
    assert omni["env"] == {"OMNI_DISTRIBUTED": "auto", "SETUP_VALUE": "a b"}  # --setup ran, as shell code


def _k8s_expand(value: str, env: dict) -> str:
    """Kubernetes' $(VAR) expansion of a container's command, args and env values: $$ -> $, $(NAME) -> its value
    when NAME is defined (else left as written), any other $ kept."""
    out, i = [], 0
    while i < len(value):
        if value[i] == "$" and i + 1 < len(value):
            if value[i + 1] == "$":
                out.append("$")
            elif value[i + 1] == "(" and ")" in value[i + 2:]:
                end = value.index(")", i + 2)
                out.append(env.get(value[i + 2:end], value[i:end + 1]))
                i = end + 1
                continue
            else:
                out.append(value[i:i + 2])
            i += 2
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


@pytest.mark.parametrize("slices", [1, 2])
def test_gke_runs_nothing_it_is_given(fakes, tmp_path, slices):
    run, records = fakes
    run("gke", "--image", LINE, "--tpu-type", "v5p-8", "--topology", "2x2x1", "--slices", str(slices),
        "--name", "run-1", "--cluster", LINE + "c", "--", *COMMAND)
    (kubectl,) = records("kubectl")
    assert kubectl["argv"] == ["apply", "-f", "jobset.yaml"]
    manifest = yaml.safe_load(kubectl["file"])
    (container,) = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == LINE and "args" not in container
    env = {}  # the pod's environment, each value expanded as Kubernetes does
    for e in container["env"]:
        env[e["name"]] = _k8s_expand(e["value"], env) if "value" in e else "0"
    pod = subprocess.run([_k8s_expand(a, env) for a in container["command"]], cwd=tmp_path / "job",
                         env=dict(run.env, **env))  # exec, no shell: as the kubelet starts it
    assert pod.returncode == 0
    (omni,) = records("omni")
    assert omni["argv"] == COMMAND and omni["env"]["OMNI_DISTRIBUTED"] == "auto"

    # the XPK line: one comment line, run here with a fake xpk; xpk puts --command into a YAML block of its pod,
    # Kubernetes expands it and bash -c runs it
    xpk_lines = [l for l in kubectl["file"].splitlines() if "xpk" in l]
    assert len(xpk_lines) == 1 and xpk_lines[0].startswith("# or with XPK: xpk workload create ")
    subprocess.run(["bash", "-c", xpk_lines[0].removeprefix("# or with XPK: ")], cwd=tmp_path / "job",
                   env=run.env, check=True)
    (xpk,) = records("xpk")
    argv = xpk["argv"]
    assert argv[argv.index("--docker-image") + 1] == LINE and argv[argv.index("--cluster") + 1] == LINE + "c"
    assert argv[argv.index("--num-slices") + 1] == str(slices) and argv[argv.index("--workload") + 1] == "run-1"
    command = argv[argv.index("--command") + 1]
    assert command.isprintable()  # one line: it survives xpk's YAML template
    xpk_pod = yaml.safe_load(f"command:\n- bash\n- -c\n- |\n  echo start;\n  ({command}) & PID=$!;\n  wait $PID\n")
    subprocess.run([_k8s_expand(a, {"HOSTNAME": "pod-0"}) for a in xpk_pod["command"]], cwd=tmp_path / "job",
                   env={k: v for k, v in run.env.items() if not k.startswith("OMNI_")}, check=True)
    omni = records("omni")[-1]
    assert omni["argv"] == COMMAND and omni["env"] == {"OMNI_DISTRIBUTED": "auto"}


@pytest.mark.parametrize("slices", [1, 2])
def test_tpu_runs_nothing_it_is_given(fakes, slices):
    run, records = fakes
    run("tpu", "--tpu-name", LINE, "--zone", LINE + "z", "--project", LINE + "p", "--accelerator", "v5p-16",
        "--runtime-version", LINE + "v", "--slices", str(slices), "--", *COMMAND)
    nodes = [LINE] if slices == 1 else [f"{LINE}-{i}" for i in range(slices)]
    gcloud = records("gcloud")
    for call in gcloud:  # every option reaches gcloud as one argument, as given
        assert call["argv"][call["argv"].index("--zone") + 1] == LINE + "z"
        assert call["argv"][call["argv"].index("--project") + 1] == LINE + "p"
    assert "create" in gcloud[0]["argv"] and LINE in gcloud[0]["argv"] and LINE + "v" in gcloud[0]["argv"]
    assert "delete" in gcloud[-1]["argv"] and LINE in gcloud[-1]["argv"]
    for node in nodes:
        assert any("scp" in c["argv"] and f"{node}:omni" in c["argv"] for c in gcloud)
    runs = [c for c in gcloud if "ssh" in c["argv"] and "omni train" in c["argv"][-1]]
    assert sorted(c["argv"][c["argv"].index("ssh") + 1] for c in runs) == sorted(nodes)
    assert len(records("pip")) == slices  # the install command, run remotely
    omni = records("omni")
    assert len(omni) == slices and all(o["argv"] == COMMAND for o in omni)
    for o in omni:
        assert o["env"]["OMNI_DISTRIBUTED"] == "auto"
    if slices > 1:
        assert sorted(o["env"]["MEGASCALE_SLICE_ID"] for o in omni) == ["0", "1"]
        assert all(o["env"]["MEGASCALE_COORDINATOR_ADDRESS"] == "10.0.0.2:8081" for o in omni)


def test_tpu_coordinator_address_is_checked(fakes):
    """The coordinator's address is the one value this script fills in itself (from gcloud describe); anything
    but an IP address stops it before it reaches a remote shell. The TPU is still deleted."""
    run, records = fakes
    result = run("tpu", "--tpu-name", "t", "--zone", "z", "--accelerator", "v5p-16", "--slices", "2", "--", "train",
                 check=False, FAKE_COORDINATOR="1.2.3.4 $(touch INJ_X) `touch INJ_Y`; touch INJ_X")
    assert result.returncode == 1 and "gave no IP address for the coordinator" in result.stderr
    assert records("omni") == [] and "delete" in records("gcloud")[-1]["argv"]


_REQUIRED = {"slurm": ["--nodes", "1", "--gpus-per-node", "1"],
             "gke": ["--image", "i", "--tpu-type", "v5p-8", "--topology", "2x2x1"],
             "tpu": ["--tpu-name", "t", "--zone", "z", "--accelerator", "v5p-8"]}
_ONE_LINE = [("slurm", "--job-name"), ("slurm", "--partition"), ("slurm", "--time"), ("slurm", "--setup"),
             ("gke", "--image"), ("gke", "--name"), ("gke", "--cluster"), ("gke", "--topology"),
             ("gke", "--tpu-type"), ("tpu", "--tpu-name"), ("tpu", "--zone"), ("tpu", "--project"),
             ("tpu", "--runtime-version"), ("tpu", "--install"), ("tpu", "--accelerator")]


@pytest.mark.parametrize("target, option, char, what", [
    *((target, option, "\n", "a newline") for target, option in _ONE_LINE),
    ("slurm", "--job-name", "\r", "a carriage return"), ("slurm", "--partition", "\t", "a tab"),
    ("slurm", "--job-name", "\x1b", "the control character U+001B"),
    ("gke", "--image", "\x85", "the control character U+0085"),  # NEL: a line break to YAML
    ("tpu", "--zone", "\x7f", "the control character U+007F"),
    ("tpu", "--tpu-name", "\u2028", "the line separator U+2028")])
def test_control_characters_in_one_line_options_are_refused(fakes, target, option, char, what):
    run, records = fakes
    value = {"--topology": "2x2x1", "--accelerator": "v5p-8", "--tpu-type": "v5p-8", "--name": "omni"}.get(
        option, "ok") + char + "x"
    result = run(target, *_REQUIRED[target], option, value, "--", "train", check=False)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"omni: error: {option} {value!r} holds {what}") and "single line" in line, line
    assert records() == [] and list(run.job.iterdir()) == []  # nothing written, nothing run


def test_values_are_checked_by_every_renderer():
    """The renderers refuse what no file can carry, also when called from Python."""
    with pytest.raises(ConfigError, match=r"--job-name 'a\\nb' holds a newline \(at position 1\)"):
        launch.slurm_script(TRAIN, 1, 1, job_name="a\nb")
    with pytest.raises(ConfigError, match="argument 2 of the omni command .* NUL byte"):
        launch.tpu_script(["train", "a\0b"], "t", "z", "v5p-8")
    with pytest.raises(ConfigError, match="--name 'Run_1' is not a Kubernetes name"):
        launch.gke_jobset(TRAIN, "img", "v5p-8", "2x2x1", name="Run_1")
    with pytest.raises(ConfigError, match="--topology '2x2x1xfoo' is not a chip topology"):
        launch.gke_jobset(TRAIN, "img", "v5p-8", "2x2x1xfoo")
    with pytest.raises(ConfigError, match="unknown TPU accelerator"):
        launch.tpu_slice("v5p-²")
    with pytest.raises(ConfigError, match="--cluster"):
        launch.xpk_command(TRAIN, "img", "v5p-8", slices=1, cluster="c\nd", name="n")
    # the multi-slice remote command keeps "$coordinator" for this script's shell, all else single-quoted
    script = launch.tpu_script(["train", "--workdir", "$(x)"], "t", "z", "v5p-16", slices=2)
    assert ("--command 'cd omni && MEGASCALE_COORDINATOR_ADDRESS='\"$coordinator\"':8081 MEGASCALE_PORT=8081 "
            "MEGASCALE_NUM_SLICES=2 MEGASCALE_SLICE_ID=0 OMNI_DISTRIBUTED=auto omni train --workdir "
            "'\"'\"'$(x)'\"'\"'' &") in script


def _config(tmp_path, **train) -> Path:
    cfg = tiny_config()
    cfg.train.log_every = 2
    for key, value in train.items():
        setattr(cfg.train, key, value)
    path = tmp_path / "config.json"
    config_lib.save_config(cfg, path)
    return path


def _launch(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "omni.cli", "launch", "local", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_local_processes_train_one_job(tmp_path):
    """...and get through every end-of-run phase: the last save, the final eval and the demo scoring (each a set of
    collectives every process must run alike; this once hung at the end of the run)."""
    config = _config(tmp_path, steps=10, checkpoint_every=5)
    out, _ = _launch("--processes", "2", "--devices-per-process", "4", "--", "train", "--config", str(config),
                     "--workdir", str(tmp_path / "run"), "--no-progress",
                     "--set", "demo.scored_examples=3").communicate(timeout=300)
    assert "on 8 cpu devices" in out and out.count("omni: step 10 held-out loss") == 1, out[-3000:]  # logs once
    assert all(line.startswith(("[p0]", "[p1]", "omni launch:")) for line in out.splitlines() if line), out[-2000:]
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [2, 4, 6, 8, 10]  # written once, by process 0
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["10", "5"]
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(result["demo_tasks"]) == {"caption", "describe", "synth"}, out[-3000:]
    first = next(r for r in rows if r["step"] == 0 and "eval/loss/text" in r)
    assert result["eval"]["loss/text"] < first["eval/loss/text"] - 1.0


@pytest.mark.slow
def test_a_dead_process_stops_the_job_at_once(tmp_path):
    config = _config(tmp_path, steps=100000, checkpoint_every=0, eval_every=0)
    proc = _launch("--processes", "2", "--devices-per-process", "2", "--", "train", "--config", str(config),
                   "--workdir", str(tmp_path / "run"), "--no-progress")
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "held-out loss" in line:  # both processes are in the training loop
            break
    pids = [int(p) for p in re.search(r"pids ([\d ]+)", "".join(lines)).group(1).split()]
    time.sleep(2)
    killed_at = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert time.monotonic() - killed_at < 30  # not the coordination service's heartbeat timeout
    assert "process 1 exited with code -9; stopping the other 1 process(es)" in rest, rest[-2000:]
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)


def _losses(workdir: Path) -> dict:
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _train_one_process(config: Path, workdir: Path) -> str:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-m", "omni.cli", "train", "--config", str(config), "--workdir",
                             str(workdir), "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
def test_two_processes_match_one_and_resume_on_one(tmp_path):
    """data.shards=2: a 2-process x 4-device run (hybrid mesh, the data axis across the 2 processes as DCN
    granules) has the loss curve of a 1 x 8 run; stopped by SIGTERM and resumed by one process, it still
    follows that curve (data order included)."""
    cfg = tiny_config()
    cfg.data.shards = 2
    cfg.train.steps, cfg.train.log_every, cfg.train.checkpoint_every = 12, 1, 0
    config = tmp_path / "config.json"
    config_lib.save_config(cfg, config)
    _train_one_process(config, tmp_path / "one")
    reference = _losses(tmp_path / "one")

    out, _ = _launch("--processes", "2", "--devices-per-process", "4", "--", "train", "--config", str(config),
                     "--workdir", str(tmp_path / "two"), "--no-progress", "--set", "mesh.dcn_data=2",
                     "--set", "mesh.dcn_fsdp=1").communicate(timeout=300)  # a hybrid mesh: data over 2 "slices"
    two = _losses(tmp_path / "two")
    assert sorted(two) == sorted(reference) == list(range(1, 13)), out[-2000:]
    for step in reference:
        assert two[step] == pytest.approx(reference[step], rel=1e-4), step

    proc = _launch("--processes", "2", "--devices-per-process", "4", "--", "train", "--config", str(config),
                   "--workdir", str(tmp_path / "moved"), "--no-progress")
    metrics = tmp_path / "moved" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and '"step": 3' in metrics.read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # the launcher passes it on: both processes save the same step and exit
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "SIGTERM received: saved step" in out, out[-3000:]
    saved = int(re.search(r"saved step (\d+)", out).group(1))
    assert 3 <= saved < 12
    resumed = _train_one_process(config, tmp_path / "moved")
    assert f"resumed from {tmp_path / 'moved' / 'checkpoints' / str(saved)}" in resumed
    moved = _losses(tmp_path / "moved")
    assert sorted(moved) == list(range(1, 13))
    for step in reference:
        assert moved[step] == pytest.approx(reference[step], rel=1e-4), step


def test_a_launch_file_the_user_wrote_is_never_replaced(fakes):
    """`launch slurm` overwrote a user's own omni.sbatch in the current folder."""
    run, records = fakes
    mine = run.job / "omni.sbatch"
    mine.write_text("#!/bin/bash\n#SBATCH --nodes=64\nmy own job\n")
    result = run("slurm", "--nodes", "2", "--gpus-per-node", "8", "--", "train", check=False)
    assert result.returncode == 2 and result.stderr.strip() == (
        "omni: error: --out omni.sbatch exists and omni launch did not write it; choose another --out or move that "
        "file away (omni never replaces a file it did not make)"), result.stderr
    assert mine.read_text() == "#!/bin/bash\n#SBATCH --nodes=64\nmy own job\n" and records("sbatch") == []
    (run.job / "folder").mkdir()
    result = run("slurm", "--nodes", "2", "--gpus-per-node", "8", "--out", "folder", "--", "train", check=False)
    assert result.returncode == 2 and "is a folder; name the launch file" in result.stderr
    mine.unlink()
    for nodes in ("2", "3"):  # its own file omni replaces when launched again
        run("slurm", "--nodes", nodes, "--gpus-per-node", "8", "--", "train")
    assert "--nodes=3" in mine.read_text() and len(records("sbatch")) == 2
    assert mine.read_text().splitlines()[:2] == ["#!/bin/bash", launch.LAUNCH_MARK]
