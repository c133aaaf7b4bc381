"""
Tables 2 and 10 of the TWEO paper from train.py runs, read from their metrics.jsonl.

    python bench/compare_runs.py out/gpt2_xl_bf16 out/gpt2_xl_fp8 out/gpt2_xl_fp8_tweo [--json]

Per run: best val PPL (over the evaluations before any collapse: the paper's "best
checkpoint before collapsing"), the last val PPL, whether and when it collapsed, the
activation peak over the whole run (the paper's "Peak"), median iter/hour with its change
against the first run given, and peak memory.
"""
import json
import math
import os
import statistics
import sys


def summarize(out_dir):
    with open(os.path.join(out_dir, "run.json")) as f:
        config = json.load(f)["config"]
    rows = []
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            rows.append(json.loads(line))
    collapse = next((r["iter"] for r in rows if r.get("event") == "collapse"), None)
    evals = [r for r in rows if "val_loss" in r and (collapse is None or r["iter"] <= collapse)]
    train = [r for r in rows if "iter_per_hour" in r]
    mode = config["precision"] + ("+TWEO" if config["tweo_lambda"] > 0 else "")
    return {
        "run": os.path.basename(os.path.normpath(out_dir)), "mode": mode, "iters": max((r["iter"] for r in rows), default=0),
        "best_val_ppl": math.exp(min(r["val_loss"] for r in evals)) if evals else None,
        "last_val_ppl": math.exp(evals[-1]["val_loss"]) if evals else None,
        "collapsed_at": collapse, "act_peak": max((r["act_peak"] for r in train), default=None),
        "iter_per_hour": statistics.median(r["iter_per_hour"] for r in train[1:] or train) if train else None,
        "mem_peak_gb": max((r["mem_peak_gb"] for r in train), default=None),
        "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in train[1:] or train) if train else None,
        "mfu": statistics.median(r["mfu"] for r in train[1:] or train) if train and "mfu" in train[-1] else None,
    }


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main(argv):
    dirs = [a for a in argv if not a.startswith("--")]
    if not dirs:
        sys.exit("usage: python bench/compare_runs.py RUN_DIR [RUN_DIR …] [--json]")
    missing = [d for d in dirs if not os.path.isfile(os.path.join(d, "metrics.jsonl"))]
    if missing:
        sys.exit(f"error: no metrics.jsonl in {', '.join(missing)}")
    runs = [summarize(d) for d in dirs]
    base = runs[0]["iter_per_hour"]
    print(f"{'run':<24} {'mode':<10} {'iters':>6} {'best PPL':>9} {'last PPL':>9} {'collapse':>8} {'peak |act|':>10} "
          f"{'iter/h':>9} {'vs first':>8} {'mem GB':>7}")
    for r in runs:
        rel = f"{100 * (r['iter_per_hour'] / base - 1):+.0f}%" if base and r["iter_per_hour"] else "-"
        print(f"{r['run']:<24} {r['mode']:<10} {r['iters']:>6} {fmt(r['best_val_ppl'], '9.2f')} {fmt(r['last_val_ppl'], '9.2f')} "
              f"{fmt(r['collapsed_at'], '>8')} {fmt(r['act_peak'], '10.2f')} {fmt(r['iter_per_hour'], '9.0f')} {rel:>8} "
              f"{fmt(r['mem_peak_gb'], '7.2f')}")
    if "--json" in argv:
        print(json.dumps(runs))
    return runs


if __name__ == "__main__":
    main(sys.argv[1:])
