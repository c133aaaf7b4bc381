"""bench/plots.py: every figure written, at its size, with the curves it should have."""
import json
import os
import subprocess
import sys

import matplotlib.image

from bench.plots import main as plots
from conftest import REPO, metrics


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
        "loss_ppl.png": [4, 4]}               # loss and val PPL of every run
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
