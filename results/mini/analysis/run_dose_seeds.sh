# Dose runs of chosen names and seeds (results/mini.md §6), with the exact train.py commands bench/mini.py
# would run, one thread each, one after the other; a rerun skips what is finished and resumes what is not:
#   bash results/mini/analysis/run_dose_seeds.sh mini_bf16_d384_seed2 mini_fp8_d384_seed2 [RUNS_DIR=out/mini21]
cd "$(dirname "$0")/../../.."
runs_dir=${RUNS_DIR:-out/mini21}
for n in "$@"; do
  cmd=$(.venv/bin/python -c "
import sys, shlex
from bench.mini import command, DEFAULTS
c = command(sys.argv[1], dict(DEFAULTS, runs_dir=sys.argv[2]))
print('' if c is None else shlex.join(c[1:]))" "$n" "$runs_dir")
  if [ -z "$cmd" ]; then echo "== $n: over, skipping"; continue; fi
  echo "== $n: $cmd"; start=$(date +%s)
  OMP_NUM_THREADS=1 .venv/bin/python $cmd
  echo "== $n: exit $? after $(( ($(date +%s) - start) / 60 )) min"
done
