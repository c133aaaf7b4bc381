"""bench/plots.py: every figure written, at its size, with the curves it should have, plotting
the values of the runs' metrics.jsonl (and, for Figure 4, of their block outputs)."""
import json
import math
import os
import subprocess
import sys

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from bench.eval import load
from bench.plots import fig_act_hist, fig_act_max, fig_act_stats, fig_loss_ppl, fig_quant_error, labels, main as plots
from bench.runs import read_run, summarize
from conftest import REPO, metrics, refused


def test_figures_of_three_modes_and_a_collapsed_run(runs, collapsed_run, tmp_path):
    out = tmp_path / "fig"
    dirs = [runs["bf16"], runs["fp8"], runs["fp8_tweo"], collapsed_run]
    manifest = plots([*dirs, f"--out={out}", "--hist_iters=1"])
    assert json.loads((out / "figures.json").read_text()) == {"runs": dirs, "figures": manifest}
    curves = {name: [p["curves"] for p in fig["panels"]] for name, fig in manifest.items()}
    marks = {name: [p["collapse_marks"] for p in fig["panels"]] for name, fig in manifest.items()}
    assert curves == {
        # top-1, top-2, top-3, median in one panel per run; the collapsed run stopped at iter 11,
        # before its first act_stats record (every 12 iterations)
        "fig5_act_stats.png": [4, 4, 4, 0],
        "fig2_act_max_bf16.png": [1],         # the BF16 run
        "fig3_act_max_fp8.png": [3],          # FP8, FP8+TWEO, the collapsed FP8 run
        "fig4_act_hist.png": [1, 1, 1, 1],    # one histogram per run
        "loss_ppl.png": [4, 4],               # loss and val PPL of every run
        # heatmaps, not curves: input, weight and grad_output of the two FP8 runs that measured their casts
        **{f"fp8_quant_{m}.png": [0] * 6 for m in ("rel_error", "flushed", "saturated")}}
    for m in ("rel_error", "flushed", "saturated"):
        assert [(p["title"], p["heatmaps"]) for p in manifest[f"fp8_quant_{m}.png"]["panels"]] == \
            [(f"{role}\n{name}", 1) for role in ("input", "weight", "grad_output")
             for name in labels([summarize(d) for d in dirs])[1:3]]
    assert marks["fig3_act_max_fp8.png"] == [1] and marks["loss_ppl.png"] == [1, 1] and marks["fig2_act_max_bf16.png"] == [0]
    assert all(p["ylog"] for name in ("fig5_act_stats.png", "fig2_act_max_bf16.png", "fig3_act_max_fp8.png", "fig4_act_hist.png")
               for p in manifest[name]["panels"] if p["curves"])
    assert [p["title"].splitlines()[-1] for p in manifest["fig5_act_stats.png"]["panels"]] == \
        [f"({len([r for r in metrics(d) if 'act_stats' in r])} act_stats records)" for d in dirs]
    for name, fig in manifest.items():
        height, width = matplotlib.image.imread(fig["path"]).shape[:2]
        assert [width, height] == fig["size_px"] and width >= 700 and height >= 400, name


def test_existing_figures_are_kept_without_overwrite(runs, tmp_path):
    out = tmp_path / "fig"
    out.mkdir()
    (out / "loss_ppl.png").write_bytes(b"keep")
    r = subprocess.run([sys.executable, "bench/plots.py", runs["bf16"], f"--out={out}"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "--overwrite" in r.stderr and (out / "loss_ppl.png").read_bytes() == b"keep"
    assert sorted(os.listdir(out)) == ["loss_ppl.png"]


def test_a_folder_that_cannot_be_created_is_refused_before_any_figure(runs, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    err = refused(capsys, plots, runs["bf16"], f"--out={tmp_path / 'afile' / 'figs'}")
    assert err == f"error: --out={tmp_path / 'afile' / 'figs'} is not a directory this process can write or create\n"


def plotted(ax, gid="curve"):
    """{label: (x, y)} of an axes' lines of one kind, as matplotlib holds them."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()
            if line.get_gid() == gid}


def test_the_figures_plot_the_values_of_metrics_jsonl(runs, collapsed_run, tmp_path):
    """Each curve of Figures 2, 3, 5 and the loss / PPL figure, built in-process, against the rows of
    each run's metrics.jsonl read here line by line; Figure 4 against a histogram of the block
    outputs computed here (numpy) on the val windows it names."""
    dirs = [runs["bf16"], runs["fp8"], runs["fp8_tweo"], collapsed_run]
    summaries = [summarize(d) for d in dirs]
    names = labels(summaries)
    rows = {d: [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))] for d in dirs}
    by_label = dict(zip(names, dirs))
    assert len(set(names)) == 4

    def act_max(d):
        train = [r for r in rows[d] if "act_max_per_layer" in r]
        return [r["iter"] for r in train], [max(r["act_max_per_layer"]) for r in train]
    for precision, want in (("bf16", [runs["bf16"]]), ("fp8", [runs["fp8"], runs["fp8_tweo"], collapsed_run])):
        fig = fig_act_max(summaries, names, {d: read_run(d)[1] for d in dirs}, precision, "t")
        curves = plotted(fig.axes[0])
        assert [by_label[name] for name in curves] == want
        for name, xy in curves.items():
            assert xy == act_max(by_label[name]) and len(xy[0]) == (24 if by_label[name] != collapsed_run else 10)
        assert plotted(fig.axes[0], "collapse") == ({} if precision == "bf16" else
                                                    {f"{names[3]}: collapse at iter 11": ([11, 11], [0, 1])})
        assert [r["iter"] for r in rows[collapsed_run] if r.get("event") == "collapse"] == [11]
        plt.close(fig)
    # the max over the layers, not the last layer's (the largest in these runs): the layers in reverse order
    flipped = [dict(r, act_max_per_layer=r["act_max_per_layer"][::-1]) if "act_max_per_layer" in r else r
               for r in rows[runs["bf16"]]]
    fig = fig_act_max(summaries[:1], names[:1], {runs["bf16"]: flipped}, "bf16", "t")
    assert plotted(fig.axes[0]) == {names[0]: act_max(runs["bf16"])}
    plt.close(fig)
    # Figure 5: per layer, the largest top-1/2/3 and median over the run's act_stats records
    fig = fig_act_stats(summaries, names, {d: read_run(d)[1] for d in dirs})
    for ax, d in zip(fig.axes, dirs):
        records = [r["act_stats"] for r in rows[d] if "act_stats" in r]
        if d == collapsed_run:  # it collapsed at iter 11, before its first record (iter 12)
            assert records == [] and plotted(ax) == {}
            continue
        want = {text: ([0, 1], [max(rec[layer][key] for rec in records) for layer in (0, 1)])
                for key, text in (("top1", "Top 1"), ("top2", "Top 2"), ("top3", "Top 3"), ("median", "Median"))}
        assert plotted(ax) == want and len(records) == 2 and want["Top 1"][1] != want["Median"][1]
        if d == runs["bf16"]:
            largest = want
    plt.close(fig)
    # the largest over training, not the last record's: the same two records, their iterations swapped
    # (these runs' values grow, so the last record would pass above)
    records = [r for r in rows[runs["bf16"]] if "act_stats" in r]
    swapped = [dict(r, iter=other["iter"]) for r, other in zip(records, records[::-1])]
    fig = fig_act_stats(summaries[:1], names[:1], {runs["bf16"]: swapped})
    last = max(swapped, key=lambda r: r["iter"])["act_stats"]
    assert plotted(fig.axes[0]) == largest and largest["Top 1"][1] != [layer["top1"] for layer in last]
    plt.close(fig)
    # the training loss of every logged iteration and exp(val_loss) of every evaluation
    fig = fig_loss_ppl(summaries, names, {d: read_run(d)[1] for d in dirs})
    loss_ax, ppl_ax = fig.axes[:2]
    for name, d in by_label.items():
        train = [r for r in rows[d] if "loss" in r and "event" not in r]
        evals = [r for r in rows[d] if "val_loss" in r]
        assert plotted(loss_ax)[name] == ([r["iter"] for r in train], [r["loss"] for r in train])
        x, y = plotted(ppl_ax)[name]
        assert x == [r["iter"] for r in evals] == ([8, 16, 24] if d != collapsed_run else [8])
        assert y == pytest.approx([math.exp(r["val_loss"]) for r in evals], rel=1e-12)
    plt.close(fig)
    # Figure 4: one val batch (hist_iters=1) of the BF16 run: 201 bins over +-max |block output|
    fig = fig_act_hist(summaries[:1], names[:1], 1, "cpu")
    ev = load(runs["bf16"], eval_iters=1, device="cpu")
    outputs = []
    hooks = [b.register_forward_hook(lambda m, a, out: outputs.append(out.float().numpy().ravel()))
             for b in ev.model.transformer.h]
    xy = np.stack([np.asarray(ev.val_data[o:o + ev.block_size + 1], dtype=np.int64) for o in ev.offsets])
    with torch.no_grad(), ev.backend.autocast(ev.model):
        ev.model(torch.from_numpy(xy[:, :-1]), torch.from_numpy(xy[:, 1:]))
    for h in hooks:
        h.remove()
    values = np.concatenate(outputs)
    limit = float(np.abs(values).max())
    counts, edges = np.histogram(values, bins=201, range=(-limit, limit))
    (name, (x, y)), = plotted(fig.axes[0]).items()
    assert len(ev.offsets) == 8 and values.size == 8 * 64 * 64 * 2 and name == f"{names[0]}, iter 24"
    assert fig.axes[0].get_title().endswith(f"max |value| {limit:.3g}")
    assert x == pytest.approx(list((edges[:-1] + edges[1:]) / 2), rel=1e-5, abs=1e-6 * limit)
    got = np.nan_to_num(np.asarray(y, dtype=np.float64), nan=0.0)
    assert got.sum() == values.size and np.isnan(y).sum() == (counts == 0).sum()
    assert np.abs(got - counts).sum() <= 2e-4 * values.size  # a value on a bin edge may fall either side
    assert np.abs(got - np.histogram(values, bins=201, range=(-limit / 2, limit / 2))[0]).sum() > 0.1 * values.size
    plt.close(fig)


def test_quant_error_heatmaps_hold_the_logged_values_gemm_by_step(runs):
    dirs = [runs["bf16"], runs["fp8"], runs["fp8_tweo"]]  # the BF16 run has no FP8 cast: no panel
    summaries = [summarize(d) for d in dirs]
    fig = fig_quant_error(summaries, labels(summaries), {d: read_run(d)[1] for d in dirs}, "rel_error", "relative error")
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert len(panels) == 6
    for ax, (role, d) in zip(panels, [(role, d) for role in ("input", "weight", "grad_output") for d in dirs[1:]]):
        records = [r for r in metrics(d) if "fp8_quant_error" in r]
        gemms = list(records[0]["fp8_quant_error"])
        expected = [[r["fp8_quant_error"][g][role]["rel_error"] for r in records] for g in gemms]
        assert np.allclose(np.asarray(ax.get_images()[0].get_array()), expected)
        assert [t.get_text() for t in ax.get_xticklabels()] == [str(r["iter"]) for r in records] == ["12", "24"]
    assert [t.get_text() for t in panels[0].get_yticklabels()][-1] == "lm_head" and len(panels[0].get_yticks()) == 9
    plt.close(fig)
