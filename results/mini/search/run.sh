#!/bin/bash
# usage: run.sh NAME CONFIG SEED [train.py flags...]: one single-threaded train.py run into out/search/NAME_sSEED
cd "$(dirname "$0")/../../.."  # the repository root
name=$1; config=$2; seed=$3; shift 3
d=out/search/${name}_s${seed}
[ -f $d/model_last.pt ] && { echo "$d done"; exit 0; }
extra=""; [ -f $d/run.json ] && extra="--init_from=resume"
OMP_NUM_THREADS=1 nice -n 2 .venv/bin/python train.py configs/$config.py --data_dir=data/stdlib --out_dir=$d --seed=$seed --wandb_run_name=${name}_s${seed} "$@" $extra >> out/search/${name}_s${seed}.log 2>&1
echo "$d exit $? $(date +%T)"
