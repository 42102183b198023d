#!/usr/bin/env bash
# Runs any omni command with N simulated CPU devices, to try meshes on a laptop before a pod:
#   launch/cpu_devices.sh 8 train --config configs/demo.py --workdir runs/demo8 --set mesh.fsdp=2 --set mesh.tensor=2
# Several processes, pods, GKE and SLURM: `omni launch local|tpu|gke|slurm` (docs/launch/).
set -euo pipefail
devices="${1:?usage: launch/cpu_devices.sh NUM_DEVICES omni-args...}"
shift
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}"
exec omni "$@"
