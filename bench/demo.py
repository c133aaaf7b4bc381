"""
The CPU demo behind `make demo`: train configs/tiny.py on the demo corpus in BF16, FP8
(emulated) and FP8+TWEO with the real DeepSpeed ZeRO-3 loop; print Tables 2 and 10
(bench/table2.py, bench/table10.py) and a sample; draw the paper's figures (bench/plots.py)
into out/demo_figures. A finished run is skipped on rerun; an interrupted one resumes.

    python bench/demo.py [--max_iters=150]
"""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.plots import main as plots  # noqa: E402
from bench.runs import summarize, train_flags  # noqa: E402
from bench.table2 import main as table2  # noqa: E402
from bench.table10 import main as table10  # noqa: E402

MODES = {"bf16": ["--precision=bf16"],
         "fp8": ["--precision=fp8", "--fp8_backend=emulated"],
         "fp8_tweo": ["--precision=fp8", "--fp8_backend=emulated", "--tweo_lambda=0.01"]}
FIGURES = os.path.join("out", "demo_figures")


def main(argv):
    max_iters = next((int(a.split("=", 1)[1]) for a in argv if a.startswith("--max_iters=")), 150)
    every = max(1, max_iters // 5)
    schedule = [f"--max_iters={max_iters}", f"--lr_decay_iters={max_iters}", f"--eval_interval={every}",
                f"--ckpt_interval={every}", f"--act_stats_interval={every}", f"--log_interval={max(1, max_iters // 30)}"]
    dirs = []
    for mode, flags in MODES.items():
        out_dir = os.path.join("out", f"demo_{mode}")
        dirs.append(out_dir)
        resume = train_flags(out_dir, max_iters)
        if resume is None:
            print(f"== {mode}: already trained ({out_dir}), skipping")
            continue
        print(f"== {mode}: training configs/tiny.py for {max_iters} iterations -> {out_dir}" + (" (resuming)" if resume else ""),
              flush=True)
        cmd = [sys.executable, "train.py", "configs/tiny.py", f"--out_dir={out_dir}", *flags, *schedule, *resume]
        if subprocess.run(cmd, cwd=REPO).returncode != 0:
            sys.exit(f"error: training {mode} failed")
    print("\n== Table 2, in miniature (tiny model, CPU, emulated FP8): python bench/table2.py " + " ".join(dirs))
    table2(dirs)
    peaks = {mode: summarize(d)["peak"] for mode, d in zip(MODES, dirs)}
    print(f"\nTWEO's activation peak {peaks['fp8_tweo']:.2f} against {peaks['fp8']:.2f} without it (FP8) "
          f"and {peaks['bf16']:.2f} in BF16.")
    print("\n== Table 10, in miniature (CPU: FP8 is emulated, so slower than BF16): python bench/table10.py " + " ".join(dirs))
    table10(dirs)
    print("\n== A sample from the FP8+TWEO model")
    subprocess.run([sys.executable, "sample.py", f"--out_dir={dirs[-1]}", "--start=The for statement",
                    "--num_samples=1", "--max_new_tokens=60", "--seed=1"], cwd=REPO, check=True)
    print(f"\n== Figures 2-5 and the loss curves: python bench/plots.py {' '.join(dirs)} --out={FIGURES} --overwrite")
    plots([*dirs, f"--out={FIGURES}", "--overwrite"])  # drawn again from the runs, which are kept


if __name__ == "__main__":
    main(sys.argv[1:])
