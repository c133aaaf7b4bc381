"""
A check for a fresh install on one GPU: trains the 124M config for 50 steps in BF16, FP8 with
torch._scaled_mm and (if installed and usable) FP8 with Transformer Engine, through train.py,
and checks that

  - the FP8 losses agree with BF16's: the mean of the last 5 logged losses within --loss_rtol
    (5%; at this point of training FP8 and BF16 differ by far less);
  - save and resume work: a copy of each run resumed from its middle checkpoint reproduces the
    last loss within --resume_rtol (1e-2; GPU kernels are not bit-deterministic);

then prints Table 10's columns for one GPU (iter/hour, tokens/s, MFU, peak memory) with ratios
against BF16, timed as the median iteration after the first tenth of the run (warm-up, compilation;
an evaluation or checkpoint lands in a few iterations, which the median ignores), and, from
bench/throughput.py on the same model, the ATen ops and host syncs of one micro-batch of each
mode (the FP8 casts compiled, as train.py runs them). Exit status 0 when every check passes,
1 when one fails, 2 for bad input (also: no GPU here, unless --cpu).

    python bench/gpu_check.py                                   # demo corpus, out/gpu_check
    python bench/gpu_check.py --data_dir=data/openwebtext --total_batch_tokens=131072
    python bench/gpu_check.py --cpu --config=configs/tiny.py --max_iters=6   # the check itself, on CPU

Other --key=value arguments go to train.py as they are.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys

from bench.runs import read_run, summarize
from configurator import configure_or_exit, fail, writable_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OPTIONS = dict(config="configs/gpt2_124m_bf16.py", max_iters=50, data_dir="", out_dir="out/gpu_check",
               loss_rtol=0.05, resume_rtol=1e-2, cpu=False)
MODES = {"bf16": ["--precision=bf16"], "torch": ["--precision=fp8", "--fp8_backend=torch"],
         "te": ["--precision=fp8", "--fp8_backend=te"]}


def parse(argv):
    """(this script's options, the arguments passed on to train.py)."""
    own = [a for a in argv if a.startswith("--") and a[2:].partition("=")[0] in OPTIONS]
    return configure_or_exit(OPTIONS, own), [a for a in argv if a not in own]


def train(out_dir, args):
    """train.py in one process: one GPU (Table 10's per-GPU numbers)."""
    r = subprocess.run([sys.executable, "train.py", *args, f"--out_dir={out_dir}"], cwd=REPO, capture_output=True,
                       text=True)
    if r.returncode:
        sys.stderr.write(r.stdout[-2000:] + r.stderr[-2000:])
    return r.returncode


def losses(out_dir):
    _, rows = read_run(out_dir)
    return {r["iter"]: r["loss"] for r in rows if "loss" in r and "event" not in r}


def steady_state(out_dir, skip):
    """Median seconds per iteration and median MFU over the iterations after `skip` (at
    log_interval=1 each logged interval is one iteration)."""
    _, rows = read_run(out_dir)
    rows = [r for r in rows if "iter_time_s" in r and "event" not in r and r["iter"] > skip]
    s_per_iter = statistics.median(r["iter_time_s"] for r in rows)
    mfu = statistics.median(r["mfu"] for r in rows) if all("mfu" in r for r in rows) else None
    return s_per_iter, mfu


def host_cost(args, mode, out_json):
    """(ops, host syncs) per micro-batch of `mode` on the run's model, from bench/throughput.py."""
    backend = {"bf16": [], "torch": ["--fp8_backend=torch"], "te": ["--fp8_backend=te"]}[mode]
    cmd = [sys.executable, "bench/throughput.py", *args, f"--modes={'bf16' if mode == 'bf16' else 'fp8'}",
           "--iters=2", "--warmup=2", f"--json={out_json}", *backend]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode:
        sys.stderr.write(r.stdout[-2000:] + r.stderr[-2000:])
        return None, None
    with open(out_json) as f:
        row = json.load(f)["results"][0]
    return row["ops_per_micro_batch"], row["host_syncs_per_micro_batch"]


def check(results, loss_rtol, resume_rtol):
    """The checks that fail, one line each, from each mode's final_loss and resume_diff: a resumed
    run more than resume_rtol from its own run's last loss, an FP8 loss more than loss_rtol from BF16's."""
    base, failures = results.get("bf16"), []
    for mode, r in results.items():
        if r["resume_diff"] > resume_rtol:
            failures.append(f"{mode}: resumed loss differs by {r['resume_diff']:.1e} > {resume_rtol}")
        if base and abs(r["final_loss"] / base["final_loss"] - 1) > loss_rtol:
            failures.append(f"{mode}: loss {r['final_loss']:.4f} vs bf16 {base['final_loss']:.4f} "
                            f"(> {loss_rtol:.0%} apart)")
    return failures


def verdict(failures):
    """Prints a FAILED line per failed check, then the summary line; returns the exit status (0, or 1)."""
    for f in failures:
        print(f"FAILED {f}")
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


def main(argv):
    opts, passthrough = parse(argv)
    n, half = opts["max_iters"], opts["max_iters"] // 2
    if half < 1:
        fail("--max_iters must be at least 2")
    if os.path.exists(opts["out_dir"]):
        fail(f"{opts['out_dir']} exists; choose another --out_dir")
    if not writable_dir(opts["out_dir"]):
        fail(f"--out_dir={opts['out_dir']} is not a directory this process can write or create")
    import torch
    if not torch.cuda.is_available() and not opts["cpu"]:
        fail("no CUDA GPU here (torch.cuda.is_available() is False): this checks a GPU install; "
             "--cpu runs the check on the CPU anyway, as a test of the check itself")
    from precision import te_available
    modes = ["bf16", "torch"] + (["te"] if te_available()[0] else [])
    if not te_available()[0]:
        print(f"Transformer Engine not checked: {te_available()[1]}")
    data_dir = opts["data_dir"]
    if not data_dir:
        data_dir = os.path.join(opts["out_dir"], "data")
        subprocess.run([sys.executable, "prepare_openwebtext.py", "--demo", f"--out_dir={data_dir}"], cwd=REPO,
                       check=True, capture_output=True)
    schedule = [opts["config"], f"--data_dir={data_dir}", f"--max_iters={n}", f"--lr_decay_iters={n}",
                f"--warmup_iters={max(1, n // 5)}", "--log_interval=1", f"--eval_interval={n}", f"--ckpt_interval={half}",
                "--ckpt_keep=0", "--act_stats_interval=0", "--eval_windows=32", *passthrough]
    results, failures = {}, []
    for mode in modes:
        run_dir, resumed = os.path.join(opts["out_dir"], mode), os.path.join(opts["out_dir"], mode + "_resumed")
        if train(run_dir, schedule + MODES[mode]):
            failures.append(f"{mode}: train.py failed")
            continue
        # resume a copy from its middle checkpoint and run it to the end again
        shutil.copytree(run_dir, resumed)
        with open(os.path.join(resumed, "ckpt", "latest"), "w") as f:
            f.write(f"iter_{half:07d}")
        if train(resumed, schedule + MODES[mode] + ["--init_from=resume"]):
            failures.append(f"{mode}: resume failed")
            continue
        full, again = losses(run_dir), losses(resumed)
        summary = summarize(run_dir)
        s_per_iter, mfu = steady_state(run_dir, max(1, n // 10))
        ops, syncs = host_cost([opts["config"], *passthrough], mode, os.path.join(opts["out_dir"], mode + "_cost.json"))
        results[mode] = dict(summary, iter_per_hour=3600 / s_per_iter, mfu=mfu, ops=ops, syncs=syncs,
                             tokens_per_sec=summary["config"]["total_batch_tokens"] / s_per_iter,
                             final_loss=statistics.mean(full[i] for i in sorted(full)[-5:]),
                             resume_diff=abs(again[n] / full[n] - 1))
    base = results.get("bf16")
    print(f"\n{'mode':<6} {'iter/h':>9} {'vs bf16':>8} {'tokens/s':>10} {'MFU':>6} {'mem GB':>7} {'vs bf16':>8} "
          f"{'loss':>7} {'resume':>8} {'ops/mb':>7} {'syncs/mb':>8}")
    for mode, r in results.items():
        ratio = lambda k: f"{r[k] / base[k]:.2f}x" if base and base.get(k) and r.get(k) else "-"  # noqa: E731
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{mode:<6} {r['iter_per_hour']:>9.0f} {ratio('iter_per_hour'):>8} {r['tokens_per_sec']:>10.0f} {mfu:>6} "
              f"{r['vram_gb']:>7.2f} {ratio('vram_gb'):>8} {r['final_loss']:>7.4f} {r['resume_diff']:>8.1e} "
              f"{r['ops'] if r['ops'] is not None else '-':>7} {r['syncs'] if r['syncs'] is not None else '-':>8}")
    print("iter/h and tokens/s: median iteration after the first tenth of the run; MFU of an FP8 row divides by the "
          "GPU's FP8 peak though attention runs in bf16, so tokens/s, not MFU, compares the modes")
    return verdict(failures + check(results, opts["loss_rtol"], opts["resume_rtol"]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
