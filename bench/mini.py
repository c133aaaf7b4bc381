"""
Table 2 of the TWEO paper in miniature, on CPU: the 4M-parameter configs/mini_*.py trained
through train.py (DeepSpeed ZeRO-3, emulated FP8) in its four modes, the two invasive baselines of
Table 2 (attention bias, clipped softmax) in FP8 and BF16, and the supplementary's τ and p
ablations (in BF16, as the paper's GPT-2 ablation). Prints Table 2 (bench/table2.py) and
supplementary Tables 2 and 3 (bench/ablation.py), and draws the figures (bench/plots.py) of the
four modes into out/mini_figures. A finished run is skipped on rerun, an interrupted one resumes
from its last checkpoint. Results and their commands: results/mini.md.

    python prepare_openwebtext.py --stdlib --compact_vocab
    python bench/mini.py [--only=modes,invasive,ablations,probes,dose,lr] [--seeds=1337,2,3] [--parallel=2] [--train=False]
                         [--figures=True] [--runs_dir=out] [--data_dir=data/stdlib] [--max_iters=600] [--eval_windows=480]

--only picks the groups to train (default: the first three, the paper's tables; `probes` adds
a 1-step amax history, `dose` the mini at d_model 256 and 384 in the four modes, `lr` d_model 256
at lr 1.5e-3 and 2e-3 in the four modes); the tables hold every run already in runs_dir. --seeds trains each run
with each seed: seed 1337 in out/<run>, another in out/<run>_seed<N>; the tables give a cell of
several seeds as mean ± sd, and Table 2 the paired per-seed gaps to BF16.
--parallel=N trains N runs at once, each with its share of the cores and its output in
<runs_dir>/mini_logs/<run>.log (small models use two single-threaded runs better than one
two-threaded one). --train=False only prints the tables of the runs that exist. --max_iters
shortens or lengthens every run (and its learning-rate schedule); --eval_windows sets how many val
windows of 256 tokens each evaluation reads (480, the mini config's: fewer only for a quick check,
since the PPL of fewer windows varies more).
"""
import os
import subprocess
import sys
import time

from bench.ablation import main as ablation
from bench.plots import main as plots
from bench.runs import train_flags
from bench.table2 import main as table2
from configurator import configure_or_exit, fail

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the seed's clipped-softmax setting for BERT (gamma = -0.025, zeta = 1): alpha = 6.4 at block_size 256
CLIPPED_SOFTMAX = ["--clipped_softmax_gamma=-0.025"]
# run name -> (group, config, flags); the run's out_dir is out/<name>
RUNS = {
    "mini_bf16": ("modes", "mini_bf16", []),
    "mini_fp8": ("modes", "mini_fp8", []),
    "mini_bf16_tweo": ("modes", "mini_bf16_tweo", []),
    "mini_fp8_tweo": ("modes", "mini_fp8_tweo", []),
    "mini_fp8_attn_bias": ("invasive", "mini_fp8", ["--attn_bias=True"]),
    "mini_bf16_attn_bias": ("invasive", "mini_bf16", ["--attn_bias=True"]),
    "mini_fp8_clipped_softmax": ("invasive", "mini_fp8", CLIPPED_SOFTMAX),
    "mini_bf16_clipped_softmax": ("invasive", "mini_bf16", CLIPPED_SOFTMAX),
    **{f"mini_bf16_tweo_tau{tau:g}": ("ablations", "mini_bf16_tweo", [f"--tweo_tau={tau}"]) for tau in (1.0, 5.0)},
    **{f"mini_bf16_tweo_p{p:g}": ("ablations", "mini_bf16_tweo", [f"--tweo_p={p}"]) for p in (2.0, 3.0, 5.0)},
    # with tau1, p2 and the paper's setting: the four corners of supplementary Table 4 (τ ∈ {1, 3} × p ∈ {2, 4})
    "mini_bf16_tweo_tau1_p2": ("ablations", "mini_bf16_tweo", ["--tweo_tau=1.0", "--tweo_p=2.0"]),
    # not part of the paper's tables, and not run unless asked for (--only=probes): does a 1-step amax
    # history (a sensitivity probe only) fail?
    "mini_fp8_amax_history1": ("probes", "mini_fp8", ["--fp8_amax_history_len=1"]),
    # --only=dose: toward the paper's sizes, where naive FP8 fails, wider models (heads of 64, as the
    # mini's) in the four modes; the FP8 - BF16 gap against the peak, and TWEO where the outliers are larger
    **{f"mini_{mode}_d{d}": ("dose", f"mini_{mode}", [f"--n_embd={d}", f"--n_head={d // 64}"])
       for d in (256, 384) for mode in ("bf16", "fp8", "bf16_tweo", "fp8_tweo")},
    # --only=lr: d256 at lower peak lrs (min lr a tenth), the same in every mode, since at the mini's 3e-3
    # its seeds spread 8-11% and BF16+TWEO can diverge in warmup (results/mini.md §6)
    **{f"mini_{mode}_d256_lr{lr}": ("lr", f"mini_{mode}", ["--n_embd=256", "--n_head=4", f"--learning_rate={lr}",
                                                          f"--min_lr={min_lr}"])
       for lr, min_lr in (("1.5e-3", "1.5e-4"), ("2e-3", "2e-4")) for mode in ("bf16", "fp8", "bf16_tweo", "fp8_tweo")},
}
GROUPS = ("modes", "invasive", "ablations", "probes", "dose", "lr")
DEFAULTS = {"only": "modes,invasive,ablations", "parallel": 1, "train": True, "figures": True, "runs_dir": "out",
            "data_dir": os.path.join("data", "stdlib"), "max_iters": 600,  # 600: configs/sizes/mini.py
            "seeds": "1337", "eval_windows": 480}  # 480: configs/sizes/mini.py
FIRST_SEED = 1337  # train.py's default: its runs keep the plain name (out/mini_bf16), others get _seed<N>


def seeded(name, seed):
    """The run `name` trained with `seed`: (its directory name, the train.py flags it adds)."""
    return (name, []) if seed == FIRST_SEED else (f"{name}_seed{seed}", [f"--seed={seed}"])


def split_seed(run):
    """mini_bf16_seed2 -> ('mini_bf16', 2), mini_bf16 -> ('mini_bf16', 1337): the RUNS entry and seed of a run."""
    head, _, tail = run.rpartition("_seed")
    return (head, int(tail)) if head in RUNS and tail.isdigit() else (run, FIRST_SEED)


def repo_path(path):
    """path as train.py (run from the repository) should see it: relative inside the repository, so
    that run.json records the same data_dir as a plain `python train.py configs/mini_bf16.py`."""
    path = os.path.abspath(path)
    return os.path.relpath(path, REPO) if path.startswith(REPO + os.sep) else path


def command(name, opts):
    """The train.py command that trains or resumes run `name` (a RUNS name, or one with a
    _seed<N> suffix); None if it is finished."""
    base, seed = split_seed(name)
    _, config, flags = RUNS[base]
    flags = flags + seeded(base, seed)[1]
    out_dir = os.path.join(opts["runs_dir"], name)
    resume = train_flags(out_dir, opts["max_iters"])
    if resume is None:
        return None
    return [sys.executable, "train.py", f"configs/{config}.py", f"--out_dir={repo_path(out_dir)}",
            f"--data_dir={repo_path(opts['data_dir'])}", f"--max_iters={opts['max_iters']}",
            f"--lr_decay_iters={opts['max_iters']}", f"--eval_windows={opts['eval_windows']}", f"--wandb_run_name={name}",
            *flags, *resume]


def train(names, opts):
    """Train every unfinished run, opts['parallel'] at a time; the names of those that failed."""
    parallel, logs = opts["parallel"], os.path.join(opts["runs_dir"], "mini_logs")
    todo = [(n, command(n, opts)) for n in names]
    for n, cmd in todo:
        if cmd is None:
            print(f"== {n}: over ({os.path.join(opts['runs_dir'], n)} finished, or stopped by a collapse), skipping")
    todo = [(n, cmd) for n, cmd in todo if cmd is not None]
    env = dict(os.environ)
    if parallel > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
        os.makedirs(logs, exist_ok=True)
    running, failed = [], []
    while todo or running:
        while todo and len(running) < parallel:
            n, cmd = todo.pop(0)
            log = open(os.path.join(logs, f"{n}.log"), "a") if parallel > 1 else None
            print(f"== {n}: {' '.join(cmd[1:])}" + (f"  (output: {logs}/{n}.log)" if log else ""), flush=True)
            running.append((n, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log), log, time.time()))
        time.sleep(1)
        for job in [j for j in running if j[1].poll() is not None]:
            n, proc, log, start = job
            running.remove(job)
            if log:
                log.close()
            print(f"== {n}: {'finished' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'} "
                  f"after {(time.time() - start) / 60:.1f} min", flush=True)
            if proc.returncode != 0:
                failed.append(n)
    return failed


def main(argv):
    opts = configure_or_exit(DEFAULTS, argv)
    groups = [g for g in opts["only"].split(",") if g]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        fail(f"--only takes a comma-separated subset of {','.join(GROUPS)}, not '{opts['only']}'")
    for key in ("parallel", "max_iters", "eval_windows"):
        if opts[key] < 1:
            fail(f"--{key} must be at least 1, not {opts[key]}")
    seeds = [int(v) for v in opts["seeds"].split(",") if v.strip().isdigit()]
    if not seeds or len(seeds) != len(opts["seeds"].split(",")) or len(set(seeds)) != len(seeds):
        fail(f"--seeds takes distinct non-negative integers separated by commas (e.g. 1337,2,3), not '{opts['seeds']}'")
    if opts["train"] and not os.path.exists(os.path.join(opts["data_dir"], "meta.json")):
        fail(f"{opts['data_dir']}/meta.json not found; prepare the corpus first: "
             f"python prepare_openwebtext.py --stdlib --compact_vocab")
    names = [seeded(n, seed)[0] for seed in seeds for n, (g, _, _) in RUNS.items() if g in groups]
    failed = train(names, opts) if opts["train"] else []
    runs_dir = opts["runs_dir"]  # the tables hold every run there is, whichever groups and seeds this call trained
    present = {n: os.path.join(runs_dir, n) for n in sorted(os.listdir(runs_dir) if os.path.isdir(runs_dir) else [])
               if split_seed(n)[0] in RUNS and os.path.exists(os.path.join(runs_dir, n, "metrics.jsonl"))}
    group = {n: RUNS[split_seed(n)[0]][0] for n in present}
    table_runs = [d for n, d in present.items() if group[n] in ("modes", "invasive")]
    if table_runs:
        print("\n== Table 2, in miniature: python bench/table2.py " + " ".join(table_runs))
        table2(table_runs)
    ablation_runs = [d for n, d in present.items() if split_seed(n)[0] in ("mini_bf16", "mini_bf16_tweo") or group[n] == "ablations"]
    if "ablations" in group.values():
        print("\n== Supplementary Tables 2 and 3, in miniature: python bench/ablation.py " + " ".join(ablation_runs))
        ablation(ablation_runs)
    dose_runs = [d for n, d in present.items() if group[n] == "dose"]
    if dose_runs:
        print("\n== Wider models (dose-response): python bench/table2.py " + " ".join(dose_runs))
        table2(dose_runs)
    if "mini_fp8_amax_history1" in present and "mini_bf16" in present:
        probe = [present["mini_bf16"], present["mini_fp8_amax_history1"]]
        print("\n== Probe: naive FP8 with amax_history_len=1 (FP8 column) against BF16: python bench/table2.py " + " ".join(probe))
        table2(probe)
    modes = [os.path.join(runs_dir, n) for n, (g, _, _) in RUNS.items() if g == "modes"]
    figures = os.path.join(runs_dir, "mini_figures")
    if opts["figures"] and all(os.path.exists(os.path.join(d, "model_last.pt")) for d in modes):
        print(f"\n== Figures 2-5 and the loss curves: python bench/plots.py {' '.join(modes)} --out={figures} --overwrite")
        plots([*modes, f"--out={figures}", "--overwrite"])  # drawn again from the runs, which are kept
    if failed:
        fail(f"training failed for {', '.join(failed)}", status=1)


if __name__ == "__main__":
    main(sys.argv[1:])
