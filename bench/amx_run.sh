#!/usr/bin/env bash
# The CPU-engine checks on the GPU machine's host CPU (it has AMX; the build machines do
# only on some days), from the repository root, with .amx/ from bench/amx_bundle.py.
# Two device calls, one transfer each, the second while the machine is still warm:
#
#   bench/amx_run.sh env [STEP...]    carry .amx/env: unpack, the CPU, the engine tests
#                                     (pytest), the MLPs in process (engines_mlp), their
#                                     kernels (kernels_mlp)
#   bench/amx_run.sh bench [STEP...]  carry .amx/models: the issue's targets through the
#                                     server, the load generator beside it (served) and on
#                                     other cores (served_apart), the int8 file through
#                                     each way of calling OpenVINO (paths), MiniLM's kernels
#                                     (kernels_minilm) and in process (engines_minilm),
#                                     `auto` against onnxruntime on every model (auto)
#
# Steps named: only those. Benchmarks run on two CPUs of two physical cores (taskset;
# AMX_CPUS), as the 2-core build machines have, one engine thread. Everything lands in
# $OUT/amx-<phase>.tgz (default bench/results/amx), repacked after each step so that a
# step cut by its time limit loses only itself.
set -uo pipefail
PHASE=${1:?usage: bench/amx_run.sh env|bench [STEP ...]}
shift
STEPS=" $* "  # the steps to run; none named: all of the phase's
OUT=${OUT:-bench/results/amx}
RESULTS=/tmp/amx/results
mkdir -p "$RESULTS" "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=service:.:/tmp/amx/site
COMMIT=$(cat .amx/commit 2>/dev/null || echo unknown)
# Two cores on two different physical cores for what is measured (SMT siblings would share
# one core's units), and two more for a load generator kept off them.
# AMX_CPUS / AMX_CLIENT_CPUS set them by hand.
read -r CPUS CLIENT_CPUS < <(python3 - <<'PY'
import os
from pathlib import Path
allowed = sorted(os.sched_getaffinity(0))
cores = {}
for cpu in allowed:
    topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
    try:
        key = ((topology / "physical_package_id").read_text(), (topology / "core_id").read_text())
    except OSError:
        key = ("", str(cpu))
    cores.setdefault(key, cpu)
first = list(cores.values())
print(",".join(map(str, first[:2])), ",".join(map(str, first[2:4] or first[:2])))
PY
)
CPUS=${AMX_CPUS:-$CPUS}
CLIENT_CPUS=${AMX_CLIENT_CPUS:-$CLIENT_CPUS}
FAILED=0

wanted() { [ "$STEPS" = "  " ] || [[ $STEPS == *" $1 "* ]]; }

step() {  # step NAME SECONDS COMMAND...: its output in NAME.log, its exit status in summary
    local name=$1 limit=$2
    shift 2
    wanted "$name" || return 0
    local started=$SECONDS
    timeout "$limit" "$@" >"$RESULTS/$name.log" 2>&1
    local status=$?
    [ "$status" -eq 0 ] || FAILED=1
    echo "$name: exit $status in $((SECONDS - started)) s (limit $limit)" | tee -a "$RESULTS/summary.txt"
    tail -n 4 "$RESULTS/$name.log"
    tar -czf "$OUT/amx-$PHASE.tgz" -C "$RESULTS" .
}

case $PHASE in
env)
    python3 -m bench.amx_bundle restore .amx || exit 1
    {
        grep -m1 "model name" /proc/cpuinfo
        echo "cores: $(nproc); measured on CPUs $CPUS, load generator on $CLIENT_CPUS"
        grep -o -w 'amx_bf16\|amx_int8\|amx_tile\|avx512_bf16\|avx512_vnni\|avx512f\|avx_vnni' /proc/cpuinfo | sort | uniq -c
        lscpu -e 2>/dev/null || true
        python3 -m sparseserve hardware
        python3 -c "import openvino, onnxruntime, numpy, grpc, aiohttp; print('openvino', openvino.__version__, 'onnxruntime', onnxruntime.__version__, 'numpy', numpy.__version__, 'grpcio', grpc.__version__, 'aiohttp', aiohttp.__version__); print('OpenVINO CPU capabilities', openvino.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES'))"
    } >"$RESULTS/hardware.txt" 2>&1
    cat "$RESULTS/hardware.txt"
    step pytest 240 python3 -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
        tests/unit/test_openvino_backend.py tests/unit/test_engine_timing.py \
        tests/unit/test_sparsify_precision.py tests/unit/test_bench_engines.py \
        tests/integration/test_cpu_engines.py tests/integration/test_openvino_requests.py \
        tests/integration/test_dispatch.py tests/integration/test_limits.py \
        tests/integration/test_bench_engines.py  # test_export_triton.py builds the demo: NNCF
    step engines_mlp 100 taskset -c "$CPUS" python3 -m bench.engines --repository /nonexistent \
        --rounds 3 --runs 10 --output-dir "$RESULTS" --name engines_mlp_amx \
        --note "git $COMMIT; the GPU machine's host CPU, pinned to CPUs $CPUS"
    step kernels_mlp 60 taskset -c "$CPUS" python3 -m bench.openvino_kernels \
        --output-dir "$RESULTS" --name openvino_kernels_mlp_amx --note "git $COMMIT; CPUs $CPUS"
    ;;
bench)
    [ -d /tmp/amx/site/openvino ] || { echo "no /tmp/amx/site: run 'env' on this machine first"; exit 3; }
    python3 -m bench.amx_bundle restore .amx || exit 1
    NOTE="git $COMMIT; the GPU machine's host CPU; minilm.dense with its weights rounded to fp16 (bench/amx_bundle.py), the reference of every MiniLM figure here"
    step served 240 taskset -c "$CPUS" python3 -m bench.served_speedups --minilm /tmp/amx/minilm \
        --rounds 4 --batched-seconds 2 --output-dir "$RESULTS" --name served_speedups_amx \
        --note "$NOTE; server and load generator on CPUs $CPUS"
    step served_apart 240 taskset -c "$CLIENT_CPUS" python3 -m bench.served_speedups \
        --minilm /tmp/amx/minilm --server-cpus "$CPUS" --rounds 4 --batched-seconds 2 \
        --output-dir "$RESULTS" --name served_speedups_apart_amx \
        --note "$NOTE; server on CPUs $CPUS, load generator on $CLIENT_CPUS"
    step paths 90 taskset -c "$CPUS" python3 -m bench.openvino_paths \
        --onnx /tmp/amx/minilm/minilm.int8-static/1/model.onnx \
        --beside /tmp/amx/minilm/minilm.dense/1/model.onnx --output-dir "$RESULTS" \
        --name openvino_paths_minilm_amx --note "$NOTE; CPUs $CPUS"
    step kernels_minilm 60 taskset -c "$CPUS" python3 -m bench.openvino_kernels --batch 1 \
        --onnx /tmp/amx/minilm/minilm.int8-static/1/model.onnx --output-dir "$RESULTS" \
        --name openvino_kernels_minilm_amx --note "$NOTE; CPUs $CPUS"
    step engines_minilm 110 taskset -c "$CPUS" python3 -m bench.engines --repository /tmp/amx/minilm \
        --minilm-batch 1 --mlp --rounds 3 --runs 10 --output-dir "$RESULTS" --name engines_amx \
        --note "$NOTE; CPUs $CPUS"
    step auto 120 taskset -c "$CPUS" python3 -m bench.auto_engine --repository /tmp/amx/demo \
        --repository /tmp/amx/minilm --rounds 3 --requests 40 --output-dir "$RESULTS" \
        --name auto_engine_amx --note "$NOTE; server and load generator on CPUs $CPUS"
    ;;
*)
    echo "usage: bench/amx_run.sh env|bench [STEP ...]" >&2
    exit 2
    ;;
esac
exit "$FAILED"  # non-zero when a step failed (each one's status: summary.txt)
