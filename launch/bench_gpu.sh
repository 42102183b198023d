#!/usr/bin/env bash
# The GPU benchmark matrix of the "ahead of MaxText on one H100" target, in one or two calls on a GPU host:
#
#   cp ../shared/bench/plain_jax_step.py .bench/          # .bench/ is git-ignored; it travels with the tree
#   bash launch/bench_gpu.sh core  OUT_DIR                # ~8 min: cuDNN checks, plain-JAX b8/b16, omni 1B, text-only
#   bash launch/bench_gpu.sh sweep OUT_DIR                # ~8 min: remat policies, batch 8/32, XLA attention
#
# Needs only jax, flax, optax, orbax, einops, numpy, pytest (no install: omni runs from this checkout).
# Every omni run appends one JSON line to OUT_DIR/bench.jsonl, the plain-JAX runs theirs to OUT_DIR/plain.jsonl,
# and everything printed goes to OUT_DIR/log.txt. A run that fails (out of memory, say) is logged and the
# matrix goes on. Compare omni with plain-JAX only within one call: same machine, same minutes.
set -uo pipefail
group="${1:?usage: launch/bench_gpu.sh core|sweep OUT_DIR}"
out="${2:?usage: launch/bench_gpu.sh core|sweep OUT_DIR}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
plain="${PLAIN_JAX_STEP:-.bench/plain_jax_step.py}"

log() { echo "== $*" | tee -a "$out/log.txt"; }
run() {  # run CMD...: logged, time-limited, never stops the matrix
    log "$*"
    timeout 600 "$@" 2>&1 | tee -a "$out/log.txt"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || log "exit $rc: $*"
}
omni_bench() { run python3 -m omni.cli bench --config configs/bench/omni_1b.py --out "$out/bench.jsonl" "$@"; }
plain_step() {
    if [ -f "$plain" ]; then
        log "python3 $plain $*"
        timeout 600 python3 "$plain" "$@" 2>&1 | tee -a "$out/log.txt" | grep '^{' >> "$out/plain.jsonl"
    else
        log "no $plain: copy ../shared/bench/plain_jax_step.py there to run the plain-JAX reference"
    fi
}

log "$(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
    2>&1 | tee -a "$out/log.txt"
case "$group" in
core)
    # the tests pin JAX to CPU unless told otherwise: the cuDNN equality test must see the GPU
    run env JAX_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider tests/test_model.py -k "cudnn or packed or kernel"
    plain_step --batch 8 --remat dots
    plain_step --batch 16 --remat dots
    omni_bench --text-only
    omni_bench
    plain_step --batch 16 --remat dots  # again after: the machine's clocks drift over minutes
    ;;
sweep)
    for remat in dots_no_batch dots none full; do
        omni_bench --set model.remat="$remat"
    done
    omni_bench --set train.batch_size=8
    omni_bench --set train.batch_size=32 --set model.remat=full
    omni_bench --set model.max_segments=64
    omni_bench --set model.attention=xla --set train.batch_size=8
    ;;
*)
    echo "unknown group '$group': core or sweep" >&2
    exit 2
    ;;
esac
log "done: $out/bench.jsonl $out/plain.jsonl"
