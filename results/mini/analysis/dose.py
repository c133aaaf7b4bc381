"""
The dose-response figure of results/mini.md §6: as the miniature widens, does naive FP8 begin to fail
where the BF16 baseline's outliers grow? For BF16 and FP8 runs of one recipe at several widths, paired
by (d_model, seed), one panel each, every seed a point and the seeds' mean a line:

  - the BF16 baseline's activation peak (the largest |block output| during training);
  - the FP8 − BF16 val PPL gap at the end of training, and the largest gap at any evaluation;
  - the largest fraction of a tensor's nonzero elements that FP8's per-tensor scale flushed to zero
    (train.py's fp8_quant_error telemetry, over GEMMs and measured steps), for gradients and for
    forward inputs.

Prints the per-run numbers as a markdown table.

    python results/mini/analysis/dose.py out/mini21/mini_{bf16,fp8}{,_seed2,_seed3} \
        out/mini21/mini_{bf16,fp8}_d{256,384}{,_seed2,_seed3} [--png=results/mini/figures/dose.png] [--overwrite]

(directories that do not exist are an error: list the ones you have)
"""
import math
import os
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.plots import log_y, quant_error_records
from bench.runs import format_params, latest_by_iter, markdown, parse_args
from configurator import fail, writable_dir

USAGE = "python results/mini/analysis/dose.py RUN_DIR [RUN_DIR ...] [--png=FILE] [--overwrite]"
ROLES = {"gradients": ("grad_output",), "forward inputs": ("input",)}


def largest_flushed(s, roles):
    """The largest fraction of a tensor's nonzero elements flushed to zero, over every GEMM and
    measured step of run `s` before any collapse, among the casts of `roles`."""
    _, records = quant_error_records(s, s["rows"])
    return max((q[role]["flushed"] for record in records for q in record.values()
                for role in roles if role in q), default=math.nan)


def pairs(summaries):
    """{(d_model, seed): {"bf16": summary, "fp8": summary}}; refuses what cannot be paired."""
    out = {}
    for s in summaries:
        if s["config"]["tweo_lambda"] > 0 or s["variant"]:
            fail(f"{s['out_dir']}: a dose-response compares plain BF16 and FP8 runs, not "
                 f"{' '.join(p for p in (s['mode'], s['variant']) if p)}")
        if not s["finished"] and s["collapse_iter"] is None:
            fail(f"{s['out_dir']} is unfinished (iteration {s['last_iter']} of {s['max_iters']})")
        key = (s["model_args"]["n_embd"], s["config"]["seed"])
        if s["precision"] in out.setdefault(key, {}):
            fail(f"{s['out_dir']} and {out[key][s['precision']]['out_dir']} are both {s['precision']} at d_model {key[0]}, seed {key[1]}")
        out[key][s["precision"]] = s
    alone = [p[next(iter(p))]["out_dir"] for p in out.values() if len(p) != 2]
    if alone:
        fail(f"{', '.join(alone)}: no run of the other precision at the same d_model and seed")
    for p in out.values():  # a gap between schedules of different lengths would not be a cost of FP8
        if p["bf16"]["max_iters"] != p["fp8"]["max_iters"]:
            fail(f"{p['bf16']['out_dir']} and {p['fp8']['out_dir']} trained {p['bf16']['max_iters']} and "
                 f"{p['fp8']['max_iters']} steps; pair runs of one schedule")
    return out


def gaps(bf16, fp8):
    """The FP8 - BF16 val PPL gap (%) at the end of training, and the largest at any shared evaluation."""
    evals = [{r["iter"]: r["val_loss"] for r in latest_by_iter([r for r in s["rows"] if "val_loss" in r])}
             for s in (bf16, fp8)]
    shared = sorted(set(evals[0]) & set(evals[1]))
    per_eval = [100 * (math.exp(evals[1][i] - evals[0][i]) - 1) for i in shared]
    return 100 * (fp8["ppl"] / bf16["ppl"] - 1), max(per_eval), shared[per_eval.index(max(per_eval))]


def measure(paired):
    rows = []
    for (d, seed), p in sorted(paired.items()):
        end, worst, worst_iter = gaps(p["bf16"], p["fp8"])
        rows.append(dict(d=d, seed=seed, params=p["bf16"]["params"], layers=p["bf16"]["model_args"]["n_layer"],
                         steps=p["bf16"]["max_iters"], peak=p["bf16"]["peak"], ppl_bf16=p["bf16"]["ppl"],
                         ppl_fp8=p["fp8"]["ppl"], gap=end, worst=worst, worst_iter=worst_iter,
                         **{role: largest_flushed(p["fp8"], names) for role, names in ROLES.items()}))
    return rows


def by_width(rows, key):
    widths = sorted({r["d"] for r in rows})
    return widths, [statistics.mean(r[key] for r in rows if r["d"] == d) for d in widths]


def scatter(ax, rows, key, color, label, marker="o", filled=True):
    ax.plot([r["d"] for r in rows], [r[key] for r in rows], marker, color=color, alpha=0.7,
            markerfacecolor=color if filled else "none")
    ax.plot(*by_width(rows, key), "-", color=color, label=label)


def figure(rows):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    widths = sorted({r["d"] for r in rows})
    params = {r["d"]: r["params"] for r in rows}
    seeds = {d: sum(r["d"] == d for r in rows) for d in widths}
    ax = axes[0]
    scatter(ax, rows, "peak", "tab:blue", "BF16 baseline (points: seeds; line: mean)")
    log_y(ax)
    ax.set_ylabel("largest |block output| in training")
    ax.set_title("Outliers grow with width")
    ax = axes[1]
    ax.axhline(0, color="gray", lw=0.8)
    scatter(ax, rows, "gap", "tab:red", "at the end of training")
    scatter(ax, rows, "worst", "tab:orange", "largest at any evaluation", marker="s", filled=False)
    ax.set_ylabel("FP8 − BF16 val PPL, paired by seed (%)")
    ax.set_title("Naive FP8's cost against BF16")
    ax = axes[2]
    scatter(ax, [dict(r, v=100 * r["gradients"]) for r in rows], "v", "tab:purple", "gradients (GEMM output grads)")
    scatter(ax, [dict(r, v=100 * r["forward inputs"]) for r in rows], "v", "tab:green", "forward inputs", marker="s",
            filled=False)
    ax.set_ylabel("largest share of nonzeros flushed to 0 (%)")
    ax.set_title("What one per-tensor FP8 scale loses")
    for ax in axes:
        ax.set_xticks(widths, [f"{d}\n{format_params(params[d])}, {seeds[d]} seed{'s' if seeds[d] > 1 else ''}"
                               for d in widths])
        ax.set_xlim(widths[0] - 48, widths[-1] + 48)
        ax.set_xlabel("d_model")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"The miniature at {len(widths)} widths: BF16 against naive FP8, paired by seed "
                 f"({'/'.join(sorted({str(r['layers']) for r in rows}))} layers, "
                 f"{'/'.join(sorted({str(r['steps']) for r in rows}))} steps)",
                 fontsize=11)
    fig.tight_layout()
    return fig


def main(argv):
    summaries, opts = parse_args(argv, dict(png="results/mini/figures/dose.png", overwrite=False), USAGE)
    if os.path.exists(opts["png"]) and not opts["overwrite"]:
        fail(f"{opts['png']} exists; pass --overwrite to replace it, or choose another --png")
    if not writable_dir(os.path.dirname(opts["png"]) or "."):
        fail(f"--png={opts['png']}: its directory is not one this process can write or create")
    rows = measure(pairs(summaries))
    print(markdown(["d_model", "seed", "BF16 peak", "PPL BF16", "PPL FP8", "FP8 − BF16", "largest gap (iter)",
                    "flushed: gradients", "flushed: forward inputs"],
                   [[r["d"], r["seed"], f"{r['peak']:.0f}", f"{r['ppl_bf16']:.2f}", f"{r['ppl_fp8']:.2f}", f"{r['gap']:+.1f}%",
                     f"{r['worst']:+.1f}% ({r['worst_iter']})", f"{100 * r['gradients']:.1f}%",
                     f"{100 * r['forward inputs']:.2f}%"] for r in rows]))
    os.makedirs(os.path.dirname(opts["png"]) or ".", exist_ok=True)
    figure(rows).savefig(opts["png"], dpi=110)
    print(opts["png"])
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
