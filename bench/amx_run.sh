#!/usr/bin/env bash
# The CPU-engine checks on the GPU machine's host CPU (it has AMX; the build machines do
# only on some days), from the repository root, with .amx/ from bench/amx_bundle.py.
# Two device calls, one transfer each, the second while the machine is still warm:
#
#   bench/amx_run.sh env     carry .amx/env: unpack, the CPU, the engine tests, the MLPs
#                            in process (bench/engines.py)
#   bench/amx_run.sh bench   carry .amx/models: the targets through the server
#                            (bench/served_speedups.py), MiniLM in process, and `auto`
#                            against onnxruntime on every model (bench/auto_engine.py)
#
# Benchmarks run on two cores (taskset; AMX_CPUS), as the 2-core build machines have, one
# engine thread. Everything lands in $OUT/amx-<phase>.tgz (default bench/results/amx),
# repacked after each step so that a step cut by its time limit loses only itself.
set -uo pipefail
PHASE=${1:?usage: bench/amx_run.sh env|bench}
OUT=${OUT:-bench/results/amx}
RESULTS=/tmp/amx/results
CPUS=${AMX_CPUS:-0,1}
mkdir -p "$RESULTS" "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=service:.:/tmp/amx/site
COMMIT=$(cat .amx/commit 2>/dev/null || echo unknown)

step() {  # step NAME SECONDS COMMAND...: its output in NAME.log, its exit status in summary
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout "$limit" "$@" >"$RESULTS/$name.log" 2>&1
    local status=$?
    echo "$name: exit $status in $((SECONDS - started)) s (limit $limit)" | tee -a "$RESULTS/summary.txt"
    tail -n 4 "$RESULTS/$name.log"
    tar -czf "$OUT/amx-$PHASE.tgz" -C "$RESULTS" .
}

case $PHASE in
env)
    python3 -m bench.amx_bundle restore .amx || exit 1
    {
        grep -m1 "model name" /proc/cpuinfo
        echo "cores: $(nproc)"
        grep -o -w 'amx_bf16\|amx_int8\|amx_tile\|avx512_bf16\|avx512_vnni\|avx512f\|avx_vnni' /proc/cpuinfo | sort | uniq -c
        python3 -m sparseserve hardware
        python3 -c "import openvino, onnxruntime, numpy, grpc, aiohttp; print('openvino', openvino.__version__, 'onnxruntime', onnxruntime.__version__, 'numpy', numpy.__version__, 'grpcio', grpc.__version__, 'aiohttp', aiohttp.__version__); print('OpenVINO CPU capabilities', openvino.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES'))"
    } >"$RESULTS/hardware.txt" 2>&1
    cat "$RESULTS/hardware.txt"
    step pytest 180 python3 -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
        tests/unit/test_openvino_backend.py tests/unit/test_engine_timing.py \
        tests/unit/test_sparsify_precision.py tests/integration/test_cpu_engines.py
    step engines_mlp 100 taskset -c "$CPUS" python3 -m bench.engines --repository /nonexistent \
        --rounds 3 --runs 10 --output-dir "$RESULTS" --name engines_mlp_amx \
        --note "git $COMMIT; the GPU machine's host CPU, pinned to cores $CPUS"
    ;;
bench)
    [ -d /tmp/amx/site/openvino ] || { echo "no /tmp/amx/site: run 'env' on this machine first"; exit 3; }
    python3 -m bench.amx_bundle restore .amx || exit 1
    NOTE="git $COMMIT; the GPU machine's host CPU, pinned to cores $CPUS; minilm.dense with its weights rounded to fp16 (bench/amx_bundle.py), the reference of every MiniLM figure here"
    step served 240 taskset -c "$CPUS" python3 -m bench.served_speedups --minilm /tmp/amx/minilm \
        --rounds 4 --batched-seconds 2 --output-dir "$RESULTS" --name served_speedups_amx --note "$NOTE"
    step engines_minilm 110 taskset -c "$CPUS" python3 -m bench.engines --repository /tmp/amx/minilm \
        --minilm-batch 1 --mlp --rounds 3 --runs 10 --output-dir "$RESULTS" --name engines_amx \
        --note "$NOTE"
    step auto 120 taskset -c "$CPUS" python3 -m bench.auto_engine --repository /tmp/amx/demo \
        --repository /tmp/amx/minilm --rounds 3 --requests 40 --output-dir "$RESULTS" \
        --name auto_engine_amx --note "$NOTE"
    ;;
*)
    echo "usage: bench/amx_run.sh env|bench" >&2
    exit 2
    ;;
esac
