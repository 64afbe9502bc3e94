#!/usr/bin/env bash
# MiniLM's recovery training on a CUDA GPU: the learning curve far past what two CPU
# cores reach in a build, and, where the machine's CPU has AMX, distillation's CPU step
# speed at fp32 and bf16. Run on the GPU machine from the repository root, with
# .gpu (bench/device_bundle.py) and .whl (pydantic's wheels for its Python) beside it;
# results go to $OUT (default bench/results).
source "$(dirname "$0")/gpu_env.sh"
grep -m1 "model name" /proc/cpuinfo; nproc
grep -o -w 'amx_bf16\|amx_int8\|avx512_bf16\|avx512_vnni\|avx512f' /proc/cpuinfo | sort | uniq -c
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
timeout "${RECOVERY_SECONDS:-420}" python3 -m bench.recovery_explore --data-bundle .gpu/data.pkl.gz \
    --calibration 2048 --device cuda --measure-every "${MEASURE_EVERY:-1500}" \
    --measure-train "${MEASURE_TRAIN:-500}" \
    --arm "steps=${LONG_STEPS:-12000},precision=fp32" --arm steps=1500,precision=fp32 \
    --output-dir "$OUT" --name recovery_gpu 2>&1 | tee "$OUT/recovery_gpu.log"
if grep -q -w amx_bf16 /proc/cpuinfo; then
    timeout "${SPEED_SECONDS:-120}" taskset -c 0 python3 -m bench.distill_speed --steps 5 --rounds 2 \
        --output-dir "$OUT" --name distill_speed_amx 2>&1 | tail -20
fi
