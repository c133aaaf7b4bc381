#!/usr/bin/env bash
# Table 3 (and the residual stream quantized) at 8 and 6 bits for the twelve miniature runs: four modes
# x three seeds, one bench/ptq.py call per mode and bit width, two calls at a time on one thread each.
# Each call's whole output goes to results/mini/analysis/ptq_<bits>bit_mini_<mode>.txt; a file that
# exists is kept and its call skipped (rerun to finish what an interrupted run left).
#     bash results/mini/analysis/run_ptq.sh [RUNS_DIR, default out/mini21]
set -u
cd "$(dirname "$0")/../../.."
runs=${1:-out/mini21}
out=results/mini/analysis
one() {
    local bits=$1 mode=$2 file=$out/ptq_${1}bit_mini_${2}.txt
    [ -e "$file" ] && { echo "kept $file"; return; }
    local cmd="python bench/ptq.py --out_dir=$runs/mini_$mode --out_dir=$runs/mini_${mode}_seed2 --out_dir=$runs/mini_${mode}_seed3 --bits=$bits --residual --eval_iters=16 --json"
    echo "$cmd" > "$file.tmp"
    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/$cmd >> "$file.tmp" 2>&1 && mv "$file.tmp" "$file" && echo "wrote $file"
}
for bits in 8 6; do
    for mode in bf16 bf16_tweo fp8 fp8_tweo; do
        while [ "$(jobs -r | wc -l)" -ge 2 ]; do sleep 5; done
        one "$bits" "$mode" &
    done
done
wait
