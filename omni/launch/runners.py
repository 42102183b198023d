"""`omni launch`: start an omni command as a multi-process JAX job, here or on a cluster.

    omni launch local --processes 2 --devices-per-process 4 -- train --config configs/demo.py --workdir runs/mp
    omni launch slurm --nodes 4 --gpus-per-node 8 [--dry-run] -- train --config configs/X.py --workdir /shared/run
    omni launch gke --image IMAGE --tpu-type v5p-128 --topology 4x4x4 [--slices 2] [--dry-run] -- train ...
    omni launch tpu --tpu-name NAME --zone Z --accelerator v5p-128 [--slices 2] [--dry-run] -- train ...

Everything after `--` is the omni command every process runs. Each process joins the job through
omni.train.distributed (explicit OMNI_COORDINATOR / OMNI_NUM_PROCESSES / OMNI_PROCESS_ID for `local`,
OMNI_DISTRIBUTED=auto and JAX's cluster detection on TPU VMs, GKE and SLURM).

- local: really runs N processes on this machine, each with D simulated CPU devices (XLA's host platform
  device count) and gloo collectives; output lines are prefixed [pI]. When one process exits with an error the
  others are stopped at once and its exit code is returned: a dead process never leaves the rest hanging.
  SIGINT/SIGTERM given to the launcher are passed on to every process (omni saves and exits on SIGTERM).
- slurm: an sbatch script, one task per node driving all its GPUs, `srun --kill-on-bad-exit=1`.
- gke: a JobSet manifest for TPU slices (one Job per slice, one pod per TPU VM host), and the equivalent XPK
  command line.
- tpu: the gcloud command lines: create the TPU VM (a queued resource with --slices > 1), copy this checkout
  and install it on every worker, run on all workers (their output streams back), delete.

`--dry-run` prints what would be executed or applied and changes nothing; without it slurm writes the script
and calls sbatch, gke writes the manifest and calls kubectl apply, tpu runs the gcloud commands in order.

Nothing given to a renderer is executed by the file it renders (issue 20): every value is quoted once for each
layer that reads it (the local bash script, the remote shell that gcloud's --command reaches, sbatch's #SBATCH
parser, Kubernetes' $(VAR) expansion, the bash -c of XPK's pod), so each arrives byte for byte. Values that are
written into one line (#SBATCH directives, names, zones, images, --setup, --install) are refused with a
ConfigError when they hold a control character (a newline would start a new line of the script). --setup and
--install are shell code by design; they run where the job runs, as that one line.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import unicodedata

import yaml

from omni import storage
from omni.config import ConfigError
from omni.train.distributed import ENV_AUTO, ENV_COORDINATOR, ENV_ID, ENV_NUM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ quoting, checks

_CHAR_NAMES = {"\n": "a newline", "\r": "a carriage return", "\0": "a NUL byte", "\t": "a tab"}


def _is_line_breaking(c: str) -> bool:
    """C0/C1 control characters and DEL, and U+2028/U+2029 (line and paragraph separators: YAML and some
    editors break lines there)."""
    return unicodedata.category(c) in ("Cc", "Zl", "Zp")


def _single_line(option: str, value: str) -> str:
    """`value` unchanged, or a ConfigError naming `option` when it holds a control character: the value is written
    into one line of the rendered file (a #SBATCH directive, a name, a shell line), and a newline there would
    start a line of its own."""
    for i, c in enumerate(value):
        if _is_line_breaking(c):
            kind = "control character" if unicodedata.category(c) == "Cc" else "line separator"
            what = _CHAR_NAMES.get(c, f"the {kind} U+{ord(c):04X}")
            raise ConfigError(f"{option} {value!r} holds {what} (at position {i}); it is written into a single line "
                              f"of the rendered file, so it must be one line of printable text")
    return value


def _check_command(omni_args: list[str]) -> None:
    for i, arg in enumerate(omni_args):
        if "\0" in arg:
            raise ConfigError(f"argument {i + 1} of the omni command ({arg!r}) holds a NUL byte, which no command "
                              f"line can carry")


def _sbatch_quote(value: str) -> str:
    """`value` as one #SBATCH argument. sbatch splits directive lines at whitespace, strips double quotes, takes a
    backslash as an escape and an unescaped # as the start of a comment (in every version; newer ones also strip
    single quotes): so a value that is not plain is double-quoted with \\ \" \' # escaped."""
    if value and re.fullmatch(r"[\w@%+=:,./-]+", value, re.ASCII):
        return value
    return '"' + "".join("\\" + c if c in "\\\"'#" else c for c in value) + '"'


def _bash_word(arg: str) -> str:
    """`arg` quoted for bash as one word written on one line: shlex.quote, or, where the value holds a control
    character (a newline), bash's $'...' with every byte outside printable ASCII as a \\xHH escape."""
    if not any(_is_line_breaking(c) for c in arg):
        return shlex.quote(arg)
    out = []
    for byte in arg.encode("utf-8", "surrogateescape"):
        c = chr(byte)
        out.append("\\" + c if c in "\\'" else c if 0x20 <= byte < 0x7F else f"\\x{byte:02x}")
    return "$'" + "".join(out) + "'"


def _k8s_literal(value: str) -> str:
    """Kubernetes expands $(VAR) in a container's command, args and env values and turns $$ into $: every $ is
    doubled so the value reaches the process as written."""
    return value.replace("$", "$$")


_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", re.ASCII)


# ----------------------------------------------------------------------------------------------------- local

def local(processes: int, devices_per_process: int, omni_args: list[str], port: int | None = None,
          grace_s: float = 10.0, out=sys.stdout) -> int:
    """Runs `omni <omni_args>` as `processes` local processes of one JAX job; returns the job's exit code."""
    if processes < 1 or devices_per_process < 1:
        raise ConfigError("--processes and --devices-per-process must be positive")
    if not omni_args:
        raise ConfigError("nothing to run: put the omni command after --, e.g. -- train --config ... --workdir ...")
    port = port or _free_port()
    procs = []
    for i in range(processes):
        env = dict(os.environ, JAX_PLATFORMS="cpu", **{ENV_COORDINATOR: f"127.0.0.1:{port}",
                                                       ENV_NUM: str(processes), ENV_ID: str(i)})
        env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                    if not f.startswith("--xla_force_host_platform_device_count"))
        env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices_per_process}"
        procs.append(subprocess.Popen([sys.executable, "-m", "omni.cli", *omni_args], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1))
    out.write(f"omni launch: {processes} processes x {devices_per_process} CPU devices, coordinator "
              f"127.0.0.1:{port}, pids {' '.join(str(p.pid) for p in procs)}\n")
    lock = threading.Lock()

    def relay(i, proc):
        for line in proc.stdout:
            with lock:
                out.write(f"[p{i}] {line}")
                out.flush()

    threads = [threading.Thread(target=relay, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in threads:
        t.start()

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = _wait_all(procs, grace_s, out)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for t in threads:
            t.join(timeout=5)
    return code


def _wait_all(procs, grace_s: float, out) -> int:
    """0 when every process ends with 0; else the first failure's code, after stopping the others."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            i, code = failed[0]
            running = [p for p in procs if p.poll() is None]
            if running:
                out.write(f"omni launch: process {i} exited with code {code}; stopping the other "
                          f"{len(running)} process(es)\n")
            for p in running:
                p.terminate()
            deadline = time.monotonic() + grace_s
            for p in running:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            return code
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.1)


# ----------------------------------------------------------------------------------------------------- slurm

def slurm_script(omni_args: list[str], nodes: int, gpus_per_node: int, *, job_name: str = "omni",
                 partition: str = "", time_limit: str = "24:00:00", cpus_per_task: int = 0, setup: str = "") -> str:
    """An sbatch script: one task per node, each process drives its node's GPUs; JAX reads SLURM_* to join."""
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError("--nodes and --gpus-per-node must be positive")
    _check_command(omni_args)
    for option, value in (("--job-name", job_name), ("--partition", partition), ("--time", time_limit),
                          ("--setup", setup)):
        _single_line(option, value)
    q = _sbatch_quote
    directives = [f"--job-name={q(job_name)}", f"--nodes={nodes}", "--ntasks-per-node=1",
                  f"--gpus-per-node={gpus_per_node}", f"--time={q(time_limit)}", "--output=%x-%j.out"]
    if partition:
        directives.append(f"--partition={q(partition)}")
    if cpus_per_task:
        directives.append(f"--cpus-per-task={cpus_per_task}")
    lines = ["#!/bin/bash"] + [f"#SBATCH {d}" for d in directives] + [
        f"# {nodes} processes x {gpus_per_node} GPUs = {nodes * gpus_per_node} devices; rendered by omni launch slurm",
        "set -euo pipefail"]
    if setup:  # shell code by design: one line, run on the first node before srun
        lines.append(setup)
    lines += [f"export {ENV_AUTO}=auto  # omni joins via jax.distributed.initialize() (SLURM detection)",
              "# --kill-on-bad-exit: a process that dies ends the job instead of leaving the others waiting",
              "srun --kill-on-bad-exit=1 --ntasks-per-node=1 omni " + shlex.join(omni_args), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- TPU

@dataclasses.dataclass(frozen=True)
class TpuSlice:
    accelerator: str   # e.g. v5p-128
    chips: int
    hosts: int
    chips_per_host: int


MEGASCALE_PORT = 8081  # the DCN port multislice jobs agree on

# TensorCores per chip in the accelerator-type suffix (v4 and v5p count cores, 2 per chip; v5e/v6e count chips).
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5litepod": 1, "v6e": 1}


def tpu_slice(accelerator: str) -> TpuSlice:
    """v5p-128 -> 64 chips on 16 hosts of 4; v5litepod-16 / v6e-16 -> 16 chips on 4 hosts of 4."""
    family, _, size = accelerator.rpartition("-")
    if family not in _CORES_PER_CHIP or not (size.isascii() and size.isdigit()):
        raise ConfigError(f"unknown TPU accelerator type {accelerator!r}; expected one of "
                          f"{', '.join(f + '-N' for f in _CORES_PER_CHIP)} (e.g. v5p-128)")
    chips = int(size) // _CORES_PER_CHIP[family]
    per_host = min(4, chips)
    if chips < 1 or chips % per_host:
        raise ConfigError(f"{accelerator}: {chips} chips do not fill hosts of {per_host}")
    return TpuSlice(accelerator, chips, chips // per_host, per_host)


def gke_jobset(omni_args: list[str], image: str, tpu_type: str, topology: str, *, slices: int = 1,
               name: str = "omni", accelerator_label: str = "", max_restarts: int = 0) -> dict:
    """A JobSet (jobset.x-k8s.io/v1alpha2) running one pod per TPU VM host of `slices` slices."""
    _check_command(omni_args)
    for option, value in (("--image", image), ("--tpu-type", tpu_type), ("--topology", topology),
                          ("--name", name), ("accelerator_label", accelerator_label)):
        _single_line(option, value)
    if not _DNS_LABEL.fullmatch(name):
        raise ConfigError(f"--name {name!r} is not a Kubernetes name: lowercase letters, digits and '-', starting "
                          f"with a letter and ending with a letter or digit, at most 63 characters")
    tpu = tpu_slice(tpu_type)
    if not re.fullmatch(r"[0-9]+(x[0-9]+)*", topology, re.ASCII | re.IGNORECASE):
        raise ConfigError(f"--topology {topology!r} is not a chip topology like 4x4x4 or 2x4")
    dims = [int(x) for x in topology.lower().split("x")]
    if math.prod(dims) != tpu.chips:
        raise ConfigError(f"--topology {topology!r} does not hold the {tpu.chips} chips of {tpu_type}")
    family = tpu_type.rpartition("-")[0]
    label = accelerator_label or {"v4": "tpu-v4-podslice", "v5p": "tpu-v5p-slice",
                                  "v5litepod": "tpu-v5-lite-podslice", "v6e": "tpu-v6e-slice"}[family]
    env = [{"name": ENV_AUTO, "value": "auto"}]
    if slices > 1:  # multislice: the slices meet over DCN through the first pod of slice 0
        env += [{"name": "MEGASCALE_NUM_SLICES", "value": str(slices)},
                {"name": "MEGASCALE_SLICE_ID",
                 "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['jobset.sigs.k8s.io/job-index']"}}},
                {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": f"{name}-slice-0-0.{name}:{MEGASCALE_PORT}"},
                {"name": "MEGASCALE_PORT", "value": str(MEGASCALE_PORT)}]
    container = {
        # an argv list, no shell; $ doubled because Kubernetes expands $(VAR) in command and args
        "name": "omni", "image": image, "command": ["omni", *(_k8s_literal(a) for a in omni_args)], "env": env,
        "ports": [{"containerPort": 8471}, {"containerPort": 8080}],  # TPU runtime / JAX coordinator
        "securityContext": {"privileged": True},
        "resources": {"limits": {"google.com/tpu": tpu.chips_per_host}},
    }
    pod = {"restartPolicy": "Never", "hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet",
           "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": label,
                            "cloud.google.com/gke-tpu-topology": topology},
           "containers": [container]}
    job = {"parallelism": tpu.hosts, "completions": tpu.hosts, "backoffLimit": 0, "completionMode": "Indexed",
           "template": {"spec": pod}}
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
        "metadata": {"name": name, "annotations": {
            "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
        "spec": {"failurePolicy": {"maxRestarts": max_restarts},
                 "replicatedJobs": [{"name": "slice", "replicas": slices, "template": {"spec": job}}]},
    }


def xpk_command(omni_args: list[str], image: str, tpu_type: str, *, slices: int, cluster: str, name: str) -> str:
    """The `xpk workload create` line (one line, for the shell it is pasted into). XPK writes --command into a
    YAML block of its pod (`bash -c`), where Kubernetes expands $(VAR): so each omni argument is quoted for that
    bash on one line ($'...' for a newline) with every $ doubled, and the whole line is quoted again for the
    local shell."""
    _check_command(omni_args)
    for option, value in (("--image", image), ("--tpu-type", tpu_type), ("--cluster", cluster), ("--name", name)):
        _single_line(option, value)
    command = f"{ENV_AUTO}=auto omni " + " ".join(_bash_word(a) for a in omni_args)
    return shlex.join(["xpk", "workload", "create", "--cluster", cluster, "--workload", name,
                       "--tpu-type", tpu_type, "--num-slices", str(slices), "--docker-image", image,
                       "--command", _k8s_literal(command)])


def tpu_script(omni_args: list[str], tpu_name: str, zone: str, accelerator: str, *, slices: int = 1,
               project: str = "", runtime_version: str = "v2-alpha-tpuv5", install: str = "",
               keep: bool = False) -> str:
    """A bash script of gcloud commands: create, copy this checkout to every worker and install it, run on
    every worker of every slice at once (their output streams back), delete (also after a failure)."""
    _check_command(omni_args)
    for option, value in (("--tpu-name", tpu_name), ("--zone", zone), ("--accelerator", accelerator),
                          ("--project", project), ("--runtime-version", runtime_version), ("--install", install)):
        _single_line(option, value)
    tpu = tpu_slice(accelerator)
    common = ["--zone", zone] + (["--project", project] if project else [])
    install = install or "cd omni && pip install -q -e ."
    # the command the remote shell runs: the omni arguments are quoted for that shell here, and the whole string
    # is quoted again for this script's shell where it becomes gcloud's --command argument
    run = f"{ENV_AUTO}=auto omni " + shlex.join(omni_args)
    nodes = [tpu_name] if slices == 1 else [f"{tpu_name}-{i}" for i in range(slices)]
    q = shlex.join
    if slices == 1:
        create = q(["gcloud", "compute", "tpus", "tpu-vm", "create", tpu_name, *common,
                    "--accelerator-type", accelerator, "--version", runtime_version])
        delete = q(["gcloud", "compute", "tpus", "tpu-vm", "delete", tpu_name, *common, "--quiet"])
    else:  # a multislice queued resource; its nodes are <name>-0, <name>-1, ...
        create = q(["gcloud", "compute", "tpus", "queued-resources", "create", tpu_name, *common,
                    "--accelerator-type", accelerator, "--runtime-version", runtime_version,
                    "--node-count", str(slices), "--node-prefix", tpu_name])
        delete = q(["gcloud", "compute", "tpus", "queued-resources", "delete", tpu_name, *common, "--force", "--quiet"])
    lines = ["#!/bin/bash",
             f"# {slices} x {accelerator}: {slices * tpu.hosts} processes (one per TPU VM host) x "
             f"{tpu.chips_per_host} chips; rendered by omni launch tpu",
             "set -euo pipefail", create]
    if not keep:
        lines.append(f"trap {shlex.quote(delete)} EXIT  # delete the TPU even when the run fails")
    for node in nodes:
        lines.append(q(["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", ".", f"{node}:omni",
                        "--worker=all", *common]))
        lines.append(q(["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, "--worker=all", *common,
                        "--command", install]))
    if slices > 1:  # the slices meet over DCN at worker 0 of the first slice
        lines.append("coordinator=$(" + q(["gcloud", "compute", "tpus", "tpu-vm", "describe", nodes[0], *common,
                                           "--format=value(networkEndpoints[0].ipAddress)"]) + ")")
        # it is spliced into the remote command unquoted: an IP address and nothing else
        lines.append('[[ $coordinator =~ ^[0-9A-Fa-f.:]+$ ]] || { echo "omni launch: gcloud gave no IP address '
                     'for the coordinator: $coordinator" >&2; exit 1; }')
    lines.append("pids=()")
    for i, node in enumerate(nodes):
        ssh = q(["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, "--worker=all", *common, "--command"])
        if slices > 1:  # "$coordinator" is filled in here, on the machine running this script; the rest is quoted
            command = (shlex.quote("cd omni && MEGASCALE_COORDINATOR_ADDRESS=") + '"$coordinator"'
                       + shlex.quote(f":{MEGASCALE_PORT} MEGASCALE_PORT={MEGASCALE_PORT} MEGASCALE_NUM_SLICES={slices} "
                                     f"MEGASCALE_SLICE_ID={i} {run}"))
        else:
            command = shlex.quote(f"cd omni && {run}")
        lines.append(f"{ssh} {command} &")
        lines.append('pids+=("$!")')
    lines += ["status=0", 'for pid in "${pids[@]}"; do wait "$pid" || status=$?; done', 'exit "$status"', ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- render, submit

def render(target: str, omni_args: list[str], *, slices: int = 1, **o) -> tuple[str, str, list[str]]:
    """(the file's text, its default name, the command that submits it) for target slurm, gke or tpu; `o` holds
    that target's options, named as `omni launch <target> --help` lists them."""
    if target == "slurm":
        text = slurm_script(omni_args, o["nodes"], o["gpus_per_node"], job_name=o["job_name"],
                            partition=o["partition"], time_limit=o["time"], setup=o["setup"])
        return text, "omni.sbatch", ["sbatch"]
    if target == "gke":
        manifest = gke_jobset(omni_args, o["image"], o["tpu_type"], o["topology"], slices=slices, name=o["name"])
        text = yaml.safe_dump(manifest, sort_keys=False)
        text += "# or with XPK: " + xpk_command(omni_args, o["image"], o["tpu_type"], slices=slices,
                                                   cluster=o["cluster"], name=o["name"]) + "\n"
        return text, "jobset.yaml", ["kubectl", "apply", "-f"]
    if target == "tpu":
        text = tpu_script(omni_args, o["tpu_name"], o["zone"], o["accelerator"], slices=slices, project=o["project"],
                          runtime_version=o["runtime_version"], install=o["install"], keep=o["keep"])
        return text, "omni-tpu.sh", ["bash"]
    raise ConfigError(f"unknown launch target {target!r}; choose local, slurm, gke or tpu")


# The line that marks a launch file as omni's: one without it is the user's, and omni never replaces it.
LAUNCH_MARK = "# written by `omni launch`; it replaces this file when launched again with the same --out"


def _marked(text: str) -> str:
    """`text` with LAUNCH_MARK as its first comment (after a #! line, which must stay first)."""
    if text.startswith("#!"):
        first, _, rest = text.partition("\n")
        return f"{first}\n{LAUNCH_MARK}\n{rest}"
    return f"{LAUNCH_MARK}\n{text}"


def _check_ours(out) -> None:
    """ConfigError when `out` exists and is not a launch file omni wrote (a folder, or a file without the mark)."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; name the launch file, e.g. --out {out / 'omni.sbatch'}")
    if out.exists():
        with open(os.fspath(out), "rb") as f:
            head = f.read(4096)
        if LAUNCH_MARK.encode() not in head:
            raise ConfigError(f"--out {out} exists and omni launch did not write it; choose another --out or move "
                              "that file away (omni never replaces a file it did not make)")


def submit(text: str, out, runner: list[str], dry_run: bool = False, log=sys.stderr) -> int:
    """Writes `text` to `out` and runs `runner out`; with dry_run prints the text and what would run instead.
    A file already at `out` is replaced only when omni launch wrote it (LAUNCH_MARK)."""
    out = storage.path(out)
    if storage.is_remote(out):
        raise ConfigError(f"--out {out}: the launch file is run here by {runner[0]}, so it must be a local path")
    text = _marked(text)
    if dry_run:
        print(text, end="")
        print(f"# dry run: would write {out} and run: {' '.join(runner)} {out}", file=log)
        return 0
    _check_ours(out)
    if shutil.which(runner[0]) is None:
        raise ConfigError(f"{runner[0]} is not installed here; use --dry-run to print the file and run it where "
                          f"{runner[0]} is")
    storage.write_text(out, text)
    print(f"omni launch: wrote {out}; running {' '.join(runner)} {out}", file=log)
    return subprocess.call([*runner, str(out)])
