# §5 of issue 21, the longer probe: the d128 miniature trained 4x longer (2400 steps, the schedule stretched),
# BF16 then FP8, seed 1337, one thread each; a rerun skips what is finished and resumes what is not:
#   bash results/mini/analysis/run_long.sh            (runs in out/mini21_long/mini_{bf16,fp8}_x4)
#   bash results/mini/analysis/run_long.sh fp8        (only the modes named)
cd "$(dirname "$0")/../../.."
for mode in ${@:-bf16 fp8}; do
  case $mode in bf16|fp8|fp8_tweo|bf16_tweo) ;; *) echo "run_long.sh: unknown mode '$mode' (bf16, fp8, bf16_tweo, fp8_tweo)" >&2; exit 2;; esac
  out=out/mini21_long/mini_${mode}_x4
  resume=$(.venv/bin/python -c "from bench.runs import train_flags; import sys, shlex; f = train_flags(sys.argv[1], 2400); print('over' if f is None else shlex.join(f))" "$out")
  if [ "$resume" = over ]; then echo "== mini_${mode}_x4: over, skipping"; continue; fi
  cmd="train.py configs/mini_${mode}.py --out_dir=$out --data_dir=data/stdlib --max_iters=2400 --lr_decay_iters=2400
    --eval_windows=480 --wandb_run_name=mini_${mode}_x4 $resume"
  echo "== mini_${mode}_x4: "$cmd
  start=$(date +%s)
  OMP_NUM_THREADS=1 .venv/bin/python $cmd
  echo "== mini_${mode}_x4: exit $? after $(( ($(date +%s) - start) / 60 )) min"
done
