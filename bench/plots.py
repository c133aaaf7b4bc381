"""
The paper's figures as PNGs, from train.py runs' metrics.jsonl and checkpoints (no wandb).

    python bench/plots.py out/gpt2_medium_bf16 out/gpt2_medium_fp8 out/gpt2_medium_fp8_tweo [--out=DIR]
                          [--hist_iters=4] [--overwrite] [--device=cpu|cuda]

Writes to --out (default out/figures), and lists in figures.json each PNG with the number of
curves in each panel:
  fig5_act_stats.png   Figure 5: per layer, top-1/2/3 and median |block output|, the largest
                       each reached over training (act_stats records before any collapse);
                       one panel per run
  fig2_act_max_bf16.png, fig3_act_max_fp8.png
                       Figures 2 and 3: max |block output| over training, BF16 runs and FP8
                       runs, each with and without TWEO
  fig4_act_hist.png    Figure 4: the distribution of block output values of the last
                       checkpoint, on hist_iters val batches (the val windows of train.py)
  loss_ppl.png         training loss and val PPL of every run, collapses marked
  fp8_quant_rel_error.png, fp8_quant_flushed.png, fp8_quant_saturated.png
                       where FP8 runs measured their casts (train.py's fp8_quant_error, every
                       act_stats_interval): per GEMM (rows) and measured step (columns), for
                       each role and run side by side, the relative error ||Q(x) - x|| / ||x||,
                       the fraction of nonzero elements flushed to zero, the fraction saturated
An existing figure is only replaced with --overwrite.
"""
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as colors
import matplotlib.pyplot as plt
import matplotlib.ticker as ticker
import torch

from bench.runs import latest_by_iter, parse_args
from configurator import fail, writable_dir

USAGE = "python bench/plots.py RUN_DIR [RUN_DIR ...] [--out=DIR] [--hist_iters=N] [--overwrite]"
QUANT_ERROR = (("rel_error", "relative error ||Q(x) - x|| / ||x||"), ("flushed", "fraction of nonzero elements flushed to 0"),
               ("saturated", "fraction of elements saturated"))
FILES = ("fig5_act_stats.png", "fig2_act_max_bf16.png", "fig3_act_max_fp8.png", "fig4_act_hist.png", "loss_ppl.png",
         *(f"fp8_quant_{metric}.png" for metric, _ in QUANT_ERROR))
STATS = (("top1", "Top 1"), ("top2", "Top 2"), ("top3", "Top 3"), ("median", "Median"))
MAGNITUDE = "|block output| (dimensionless)"


def labels(summaries):
    """Legend names from what the runs are: size, precision, TWEO, variant; where two runs
    would share a name, the shortest tail of their directories that tells them apart."""
    names = [" ".join(p for p in (s["params_str"], s["mode"], s["variant"]) if p) for s in summaries]
    parts = [os.path.normpath(os.path.abspath(s["out_dir"])).split(os.sep) for s in summaries]
    out = []
    for name, path in zip(names, parts):
        namesakes = [p for n, p in zip(names, parts) if n == name]
        if len(namesakes) == 1:
            out.append(name)
            continue
        k = next((k for k in range(1, len(path) + 1) if len({"/".join(p[-k:]) for p in namesakes}) == len(namesakes)),
                 len(path))
        out.append(f"{name} ({'/'.join(path[-k:])})")
    return out


def panels(n, width=5.0, height=4.0):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def log_y(ax):
    """Log y-axis with plain numbers, and ticks close enough to read values off: 1-1.5-2-3-5-7
    steps within two decades, finer within one (the default would label only one or two
    powers of ten, in 10^x form; 1-2-5 leaves curves that end between 10 and 20 unlabelled)."""
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    if high / low < 100:
        subs = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if high / low >= 10 else (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0) \
            if high / low >= 3 else tuple(m / 2 for m in range(2, 20))  # under a factor 3: steps of 0.5 x 10^k
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=subs))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))


def curve(ax, x, y, **kw):
    (line,) = ax.plot(x, y, **kw)
    line.set_gid("curve")  # counted in figures.json; collapse marks are not curves
    return line


def mark_collapse(ax, s, label, color):
    """A dotted vertical line, in the run's colour, at the iteration where it collapsed."""
    if s["collapse_iter"] is not None:
        ax.axvline(s["collapse_iter"], color=color, linestyle=":", linewidth=1.5, gid="collapse",
                   label=f"{label}: collapse at iter {s['collapse_iter']}")


def fig_act_stats(summaries, names, rows_by_run):
    fig, axes = panels(len(summaries))
    for ax, s, name in zip(axes, summaries, names):
        records = [r["act_stats"] for r in latest_by_iter([r for r in rows_by_run[s["out_dir"]] if "act_stats" in r])
                   if s["collapse_iter"] is None or r["iter"] < s["collapse_iter"]]
        records = [r for r in records if all(math.isfinite(layer["top1"]) for layer in r)]
        ax.set_title(f"{name}\n({len(records)} act_stats records)")
        if not records:
            ax.text(0.5, 0.5, "no act_stats record" + (f"\nbefore the collapse at iter {s['collapse_iter']}"
                                                       if s["collapse_iter"] is not None else ""),
                    ha="center", va="center", transform=ax.transAxes)
            ax.axis("off")
            continue
        layers = range(len(records[0]))
        for key, text in STATS:
            curve(ax, list(layers), [max(rec[i][key] for rec in records) for i in layers], marker="o", label=text)
        ax.set_xticks(list(layers))
        log_y(ax)
        ax.set_xlabel("layer")
        ax.set_ylabel(MAGNITUDE)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("Activation magnitudes per layer, largest over training (Fig. 5)")
    return fig


def act_max_series(rows):
    train = latest_by_iter([r for r in rows if "act_max_per_layer" in r])
    return [r["iter"] for r in train], [max(r["act_max_per_layer"]) for r in train]


def fig_act_max(summaries, names, rows_by_run, precision, title):
    fig, (ax,) = panels(1, 7.0, 4.5)
    for s, name in zip(summaries, names):
        if s["precision"] == precision:
            x, y = act_max_series(rows_by_run[s["out_dir"]])
            color = curve(ax, x, y, label=name).get_color()
            mark_collapse(ax, s, name, color)
    log_y(ax)
    ax.set_xlabel("iteration")
    ax.set_ylabel("max " + MAGNITUDE + "\nover layers, per log interval")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig


@torch.no_grad()
def block_output_histogram(out_dir, hist_iters, device, bins=201):
    """(bin edges, counts) of every block output value of the last checkpoint on hist_iters
    val batches: one pass for the range (eval.py's statistics), one to count."""
    from bench.eval import evaluate, load
    ev = load(out_dir, ckpt="last", device=device, eval_iters=hist_iters)
    model, backend, info, val_data, offsets = ev.model, ev.backend, ev.info, ev.val_data, ev.offsets
    block_size, micro = ev.block_size, ev.micro_batch_size
    stats = evaluate(model, val_data, offsets, block_size, micro, backend)
    limit = max(layer["block"]["top1"] for layer in stats["layers"])
    counts = torch.zeros(bins, dtype=torch.float64)

    def count(module, inputs, output):
        counts.add_(torch.histc(output.float().cpu(), bins=bins, min=-limit, max=limit).double())

    hooks = [block.register_forward_hook(count) for block in model.transformer.h]
    try:
        evaluate(model, val_data, offsets, block_size, micro, backend, stats=False)
    finally:
        for h in hooks:
            h.remove()
    edges = torch.linspace(-limit, limit, bins + 1)
    return edges.tolist(), counts.tolist(), info.get("iter")


def fig_act_hist(summaries, names, hist_iters, device):
    fig, axes = panels(len(summaries))
    for ax, s, name in zip(axes, summaries, names):
        edges, counts, it = block_output_histogram(s["out_dir"], hist_iters, device)
        centers = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
        curve(ax, centers, [c if c > 0 else float("nan") for c in counts], drawstyle="steps-mid",
              color="tab:orange" if s["tweo"] else "tab:blue", label=f"{name}, iter {it}")
        log_y(ax)
        ax.set_xlabel("block output value (dimensionless)")
        ax.set_ylabel("count (values per bin)")
        ax.set_title(f"{name}\nmax |value| {edges[-1]:.3g}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"Distribution of block output values, all layers, last checkpoint, {hist_iters} val "
                 f"batch{'es' if hist_iters > 1 else ''} (Fig. 4); each x-axis spans ± the run's max |value|")
    return fig


def fig_loss_ppl(summaries, names, rows_by_run):
    fig, (loss_ax, ppl_ax) = panels(2, 6.5, 4.5)
    for s, name in zip(summaries, names):
        rows = rows_by_run[s["out_dir"]]
        train = latest_by_iter([r for r in rows if "loss" in r and "event" not in r])
        evals = latest_by_iter([r for r in rows if "val_loss" in r])
        color = curve(loss_ax, [r["iter"] for r in train], [r["loss"] for r in train], label=name).get_color()
        curve(ppl_ax, [r["iter"] for r in evals], [math.exp(min(r["val_loss"], 700)) for r in evals], marker="o",
              color=color, label=name)
        for ax in (loss_ax, ppl_ax):
            mark_collapse(ax, s, name, color)
    loss_ax.set_ylabel("training loss (nats/token)")
    loss_ax.set_title("Training loss")
    log_y(ppl_ax)
    ppl_ax.set_ylabel("validation perplexity")
    ppl_ax.set_title("Validation PPL (log scale)")
    for ax in (loss_ax, ppl_ax):
        ax.set_xlabel("iteration")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Training loss and validation PPL; a dotted line marks a collapse")
    return fig


def quant_error_records(s, rows):
    """(iterations, {gemm: {role: stats}} per iteration) of a run's fp8_quant_error lines before any collapse."""
    records = [r for r in latest_by_iter([r for r in rows if "fp8_quant_error" in r])
               if s["collapse_iter"] is None or r["iter"] < s["collapse_iter"]]
    return [r["iter"] for r in records], [r["fp8_quant_error"] for r in records]


def fig_quant_error(summaries, names, rows_by_run, metric, text):
    """One heatmap per (role, run), the runs of a role side by side: GEMMs down, measured steps
    across, one logarithmic colour scale for the whole figure (white: exactly 0)."""
    runs = [(name, *quant_error_records(s, rows_by_run[s["out_dir"]])) for s, name in zip(summaries, names)]
    runs = [r for r in runs if r[1]]
    gemms = list(runs[0][2][0])
    roles = ("input", "weight", "grad_output")
    grids = {(role, name): [[rec.get(g, {}).get(role, {}).get(metric, math.nan) for rec in recs] for g in gemms]
             for role in roles for name, _, recs in runs}
    positive = [v for grid in grids.values() for row in grid for v in row if v > 0]
    norm = colors.LogNorm(min(positive), max(positive)) if positive else colors.LogNorm(1e-6, 1.0)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    n = len(roles) * len(runs)
    fig, axes = plt.subplots(1, n, figsize=(2.2 + 2.6 * n, 2.8 + 0.17 * len(gemms)), squeeze=False, layout="constrained")
    for i, ((role, name), grid) in enumerate(grids.items()):
        ax, its = axes[0][i], next(its for n_, its, _ in runs if n_ == name)
        masked = [[v if v > 0 else math.nan for v in row] for row in grid]
        image = ax.imshow(masked, aspect="auto", norm=norm, cmap=cmap, interpolation="nearest")
        image.set_gid("heatmap")
        ax.set_title(f"{role}\n{name}", fontsize="medium")
        ax.set_xticks(range(len(its)), [str(it) for it in its], rotation=90, fontsize="small")
        ax.set_xlabel("iteration")
        if i == 0:
            ax.set_yticks(range(len(gemms)), [g.removeprefix("transformer.") for g in gemms], fontsize="small")
        else:
            ax.set_yticks([])
    fig.colorbar(image, ax=axes[0].tolist(), label=text, fraction=0.03, pad=0.01)
    fig.suptitle(f"FP8 casts, per GEMM and role: {text} (white: 0)")
    return fig


def describe(fig):
    """What figures.json records of a figure: per visible panel, its title and its curves."""
    return [{"title": ax.get_title(), "curves": sum(line.get_gid() == "curve" for line in ax.get_lines()),
             "collapse_marks": sum(line.get_gid() == "collapse" for line in ax.get_lines()),
             "heatmaps": sum(image.get_gid() == "heatmap" for image in ax.get_images()),
             "ylog": ax.get_yscale() == "log"} for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


def main(argv):
    defaults = dict(out="out/figures", hist_iters=4, overwrite=False, device="cuda" if torch.cuda.is_available() else "cpu")
    summaries, opts = parse_args(argv, defaults, USAGE)
    existing = [f for f in FILES + ("figures.json",) if os.path.exists(os.path.join(opts["out"], f))]
    if existing and not opts["overwrite"]:
        fail(f"{opts['out']} already holds {', '.join(existing)}; pass --overwrite to replace them, or choose another --out")
    if not writable_dir(opts["out"]):
        fail(f"--out={opts['out']} is not a directory this process can write or create")
    if opts["hist_iters"] < 1:
        fail("--hist_iters must be at least 1")
    no_model = [s["out_dir"] for s in summaries if not os.path.exists(os.path.join(s["out_dir"], "model_last.pt"))
                and not os.path.exists(os.path.join(s["out_dir"], "ckpt", "latest"))]
    if no_model:
        fail(f"{', '.join(no_model)} has no checkpoint (model_last.pt or ckpt/latest) for Figure 4")
    names = labels(summaries)
    rows_by_run = {s["out_dir"]: s["rows"] for s in summaries}
    figures = {"fig5_act_stats.png": fig_act_stats(summaries, names, rows_by_run)}
    for precision, file, fig_no in (("bf16", "fig2_act_max_bf16.png", 2), ("fp8", "fig3_act_max_fp8.png", 3)):
        if any(s["precision"] == precision for s in summaries):
            figures[file] = fig_act_max(summaries, names, rows_by_run, precision,
                                        f"Activation magnitudes in {precision.upper()} training (Fig. {fig_no})")
    figures["fig4_act_hist.png"] = fig_act_hist(summaries, names, opts["hist_iters"], opts["device"])
    figures["loss_ppl.png"] = fig_loss_ppl(summaries, names, rows_by_run)
    if any("fp8_quant_error" in r for rows in rows_by_run.values() for r in rows):
        for metric, text in QUANT_ERROR:
            figures[f"fp8_quant_{metric}.png"] = fig_quant_error(summaries, names, rows_by_run, metric, text)
    os.makedirs(opts["out"], exist_ok=True)
    manifest = {}
    for file, fig in figures.items():
        if not fig.get_layout_engine():  # the heatmaps' constrained layout places their shared colorbar
            fig.tight_layout()
        path = os.path.join(opts["out"], file)
        fig.savefig(path, dpi=110)
        manifest[file] = {"path": path, "size_px": [int(round(v * 110)) for v in fig.get_size_inches()],
                          "panels": describe(fig)}
        plt.close(fig)
        print(path)
    with open(os.path.join(opts["out"], "figures.json"), "w") as f:
        json.dump({"runs": [s["out_dir"] for s in summaries], "figures": manifest}, f, indent=2)
    return manifest


if __name__ == "__main__":
    main(sys.argv[1:])
