"""
The CPU demo behind `make demo`: train configs/tiny.py on the demo corpus in BF16, FP8
(emulated) and FP8+TWEO with the real DeepSpeed ZeRO-3 loop; print Tables 2 and 10
(bench/table2.py, bench/table10.py) and a sample; draw the paper's figures (bench/plots.py).

    python bench/demo.py [--max_iters=150] [--out=out]   (--out relative to the repository)

Runs go to OUT/demo_ITERS/{bf16,fp8,fp8_tweo}, figures to OUT/demo_ITERS/figures: another
--max_iters trains a demo of its own beside the first. A finished run is skipped on rerun, an
interrupted one resumes; a run in that place trained with another schedule (max_iters,
lr_decay_iters) is never continued: one line on stderr, exit status 2, before any training.
"""
import json
import os
import subprocess
import sys

from bench.plots import main as plots
from bench.runs import summarize, train_flags
from bench.table2 import main as table2
from bench.table10 import main as table10
from configurator import configure_or_exit, fail, first_violation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MAX_ITERS = 150  # `make demo` uses this too, unless DEMO_ITERS is given
MODES = {"bf16": ["--precision=bf16"],
         "fp8": ["--precision=fp8", "--fp8_backend=emulated"],
         "fp8_tweo": ["--precision=fp8", "--fp8_backend=emulated", "--tweo_lambda=0.01"]}
RULES = [("max_iters", lambda v: v >= 5, ">= 5 (evaluations every max_iters // 5 iterations)")]


def schedule(max_iters):
    every = max_iters // 5
    return {"max_iters": max_iters, "lr_decay_iters": max_iters, "eval_interval": every, "ckpt_interval": every,
            "act_stats_interval": every, "log_interval": max(1, max_iters // 30)}


def schedule_conflict(out_dir, flags):
    """Why the run in out_dir (finished or not) cannot be continued under `flags`, or None:
    resuming with another max_iters or lr_decay_iters would change its learning rate schedule."""
    try:
        with open(os.path.join(out_dir, "run.json")) as f:
            config = json.load(f)["config"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{out_dir}/run.json is unreadable ({type(e).__name__}: {e}); move {out_dir} away"
    differ = [f"{k}={config.get(k)} (now {flags[k]})" for k in ("max_iters", "lr_decay_iters") if config.get(k) != flags[k]]
    if differ:
        return (f"{out_dir} holds a run trained with {', '.join(differ)}: continuing it would change its learning "
                f"rate schedule; move {out_dir} away to train it again")
    return None


def main(argv):
    cfg = configure_or_exit({"max_iters": MAX_ITERS, "out": "out"}, argv)
    os.chdir(REPO)  # configs/tiny.py's data_dir and the runs' paths are the repository's
    flags = schedule(cfg["max_iters"])
    root = os.path.join(cfg["out"], f"demo_{cfg['max_iters']}")
    dirs = [os.path.join(root, mode) for mode in MODES]
    problem = first_violation(cfg, RULES) or next(filter(None, (schedule_conflict(d, flags) for d in dirs)), None)
    if problem:
        fail(problem)
    for (mode, mode_flags), out_dir in zip(MODES.items(), dirs):
        resume = train_flags(out_dir, cfg["max_iters"])
        if resume is None:
            print(f"== {mode}: already trained ({out_dir}), skipping")
            continue
        print(f"== {mode}: training configs/tiny.py for {cfg['max_iters']} iterations -> {out_dir}"
              + (" (resuming)" if resume else ""), flush=True)
        cmd = [sys.executable, "train.py", "configs/tiny.py", f"--out_dir={out_dir}", *mode_flags,
               *(f"--{k}={v}" for k, v in flags.items()), *resume]
        if subprocess.run(cmd).returncode != 0:
            fail(f"training {mode} failed", status=1)
    print("\n== Table 2, in miniature (tiny model, CPU, emulated FP8): python bench/table2.py " + " ".join(dirs))
    table2(dirs)
    peaks = {mode: summarize(d)["peak"] for mode, d in zip(MODES, dirs)}
    print(f"\nTWEO's activation peak {peaks['fp8_tweo']:.2f} against {peaks['fp8']:.2f} without it (FP8) "
          f"and {peaks['bf16']:.2f} in BF16.")
    print("\n== Table 10, in miniature (CPU: FP8 is emulated, so slower than BF16): python bench/table10.py " + " ".join(dirs))
    table10(dirs)
    print("\n== A sample from the FP8+TWEO model")
    subprocess.run([sys.executable, "sample.py", f"--out_dir={dirs[-1]}", "--start=The for statement",
                    "--num_samples=1", "--max_new_tokens=60", "--seed=1"], check=True)
    figures = os.path.join(root, "figures")
    print(f"\n== Figures 2-5 and the loss curves: python bench/plots.py {' '.join(dirs)} --out={figures} --overwrite")
    plots([*dirs, f"--out={figures}", "--overwrite"])  # drawn again from the runs, which are kept


if __name__ == "__main__":
    main(sys.argv[1:])
