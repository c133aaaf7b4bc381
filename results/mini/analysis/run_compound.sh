#!/usr/bin/env bash
# results/mini/analysis/compound.py on the given runs (default: the three seeds of BF16 and BF16+TWEO),
# one after another on one thread; each run's whole output goes to
# results/mini/analysis/compound_4bit_<run>.txt (a file that exists is kept: rerun to finish what an
# interrupted call left).
#     bash results/mini/analysis/run_compound.sh [RUNS_DIR, default out/mini21] [RUN ...]
set -u
cd "$(dirname "$0")/../../.."
runs=${1:-out/mini21}
shift $(( $# > 0 ))
[ $# -gt 0 ] || set -- mini_bf16 mini_bf16_seed2 mini_bf16_seed3 mini_bf16_tweo mini_bf16_tweo_seed2 mini_bf16_tweo_seed3
out=results/mini/analysis
for run in "$@"; do
    file=$out/compound_4bit_$run.txt
    [ -e "$file" ] && { echo "kept $file"; continue; }
    cmd="python results/mini/analysis/compound.py --out_dir=$runs/$run --bits=4 --eval_iters=16 --json"
    echo "$cmd" > "$file.tmp"
    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/$cmd >> "$file.tmp" 2>&1 && mv "$file.tmp" "$file" && echo "wrote $file"
done
