#!/bin/sh
# results/mini_search/run.sh NAME MODE [mini_search.py flags...]: one search run in the background, at nice 19,
# one thread, logging to results/mini_search/NAME_MODE.{jsonl,log}
name=$1; mode=$2; shift 2
cd "$(dirname "$0")/../.." || exit 2
nohup nice -n 19 .venv/bin/python results/mini_search/mini_search.py --mode="$mode" --out="results/mini_search/${name}_${mode}.jsonl" "$@" \
    > "results/mini_search/${name}_${mode}.log" 2>&1 &
echo $! > "/tmp/i15x_${name}_${mode}.pid"
