#!/usr/bin/env bash
# bench/ptq.py on the miniature runs: one call per mode and bit width (the seeds of a mode are one call's
# rows), two calls at a time on one thread each. At 8 and 6 bits every column quantizes the residual stream
# (--residual); at 4 bits Table 3 leaves it in BF16 and Table 4 (SmoothQuant alpha 0.5 and AbsMax) has it
# both ways. Each call's whole output, its command on the first line, goes to
# results/mini/analysis/ptq_<bits>bit_mini_<mode><SET>.txt; a file that exists is kept and its call skipped
# (rerun to finish what an interrupted run left).
#     bash results/mini/analysis/run_ptq.sh [RUNS_DIR [SET [BITS]]]
# RUNS_DIR: default out/mini21. SET: which runs of each mode, by the suffix bench/mini.py gives them: "" (the
# default) is d128's seeds 1337, 2 and 3 (mini_<mode>, mini_<mode>_seed2, _seed3); any other, e.g.
# _d256_lr2e-3, is every mini_<mode><SET>_seed* in RUNS_DIR not still training. BITS: default "8 6".
#     bash results/mini/analysis/run_ptq.sh out/mini21 _d256_lr2e-3 "8 6 4"
set -u
cd "$(dirname "$0")/../../.."
runs=${1:-out/mini21} set=${2:-} bits_list=${3:-8 6}
out=results/mini/analysis
one() {
    local bits=$1 mode=$2 file=$out/ptq_${1}bit_mini_${2}${set}.txt dirs=() d
    [ -e "$file" ] && { echo "kept $file"; return; }
    if [ -z "$set" ]; then
        dirs=("$runs/mini_$mode" "$runs/mini_${mode}_seed2" "$runs/mini_${mode}_seed3")
    else
        for d in "$runs/mini_$mode${set}"_seed*; do
            if [ -e "$d/run.lock" ]; then echo "left out $d: still training (run.lock)" >&2
            elif [ -d "$d" ]; then dirs+=("$d"); fi
        done
    fi
    [ ${#dirs[@]} -gt 0 ] || { echo "no runs mini_$mode$set in $runs" >&2; return 1; }
    local cmd="python bench/ptq.py"
    for d in "${dirs[@]}"; do cmd+=" --out_dir=$d"; done
    cmd+=" --bits=$bits"
    if [ "$bits" = 4 ]; then cmd+=" --smoothquant_alpha=0.5"; else cmd+=" --residual"; fi
    cmd+=" --eval_iters=16 --json"
    echo "$cmd" > "$file.tmp"
    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/$cmd >> "$file.tmp" 2>&1 && mv "$file.tmp" "$file" && echo "wrote $file"
}
for bits in $bits_list; do
    for mode in bf16 bf16_tweo fp8 fp8_tweo; do
        while [ "$(jobs -r | wc -l)" -ge 2 ]; do sleep 5; done
        one "$bits" "$mode" &
    done
done
wait
