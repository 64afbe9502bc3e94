#!/usr/bin/env bash
# Where MiniLM's structured cut loses its fidelity: the same recovery training (GPU) from
# cuts of each size, FFN and heads apart. Same setup as bench/gpu_recovery.sh.
source "$(dirname "$0")/gpu_env.sh"
for cut in ${CUTS:-0.5:0.25 0.5:0 0:0.25 0.25:0}; do
    ffn=${cut%:*} heads=${cut#*:}
    timeout "${CUT_SECONDS:-180}" python3 -m bench.recovery_explore --data-bundle .gpu/data.pkl.gz \
        --calibration 2048 --device cuda --ffn-fraction "$ffn" --head-fraction "$heads" \
        --arm "steps=${STEPS:-2500},precision=fp32" --output-dir "$OUT" \
        --name "recovery_gpu_cut_${ffn}_${heads}" 2>&1 | grep -v "^distill step" | tail -12
done
