"""results/mini/analysis/dose.py (the dose-response figure of results/mini.md §6), on hand-written
runs with known answers: the pairing by width and seed, the gaps, the flushed fractions, the PNG,
and one line with exit status 2 for what cannot be paired."""
import importlib.util
import math
import os

import pytest

from conftest import REPO, eval_row, refused, train_row, write_run

spec = importlib.util.spec_from_file_location("dose", os.path.join(REPO, "results", "mini", "analysis", "dose.py"))
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)


def quant(grad_flushed, input_flushed):
    roles = {"input": {"rel_error": 0.03, "flushed": input_flushed, "saturated": 0.0},
             "weight": {"rel_error": 0.03, "flushed": 0.9, "saturated": 0.0},  # weights are not reported
             "grad_output": {"rel_error": 0.05, "flushed": grad_flushed, "saturated": 0.0}}
    return {"iter": 10, "fp8_quant_error": {"h.0.fc": roles, "h.1.fc": dict(roles, grad_output=dict(roles["grad_output"], flushed=0.0))}}


def run(tmp_path, precision, d, seed, ppls, peak=10.0, flushed=(0.0, 0.0), **config):
    rows = [train_row(10, 1.0, act_peak=peak), train_row(20, 1.0, act_peak=peak / 2),
            eval_row(10, ppls[0]), eval_row(20, ppls[1])]
    if precision == "fp8":
        rows.append(quant(*flushed))
    name = f"{precision}_d{d}_s{seed}"
    return write_run(tmp_path / name, rows, model_args=dict(n_embd=d), precision=precision, seed=seed, **config)


def test_gaps_peaks_and_flushed_fractions_by_width_and_seed(tmp_path, capsys):
    dirs = [run(tmp_path, "bf16", 64, 1, (40, 20), peak=100), run(tmp_path, "fp8", 64, 1, (44, 19), flushed=(0.02, 0.001)),
            run(tmp_path, "bf16", 64, 2, (40, 20), peak=300), run(tmp_path, "fp8", 64, 2, (40, 21), flushed=(0.04, 0.003)),
            run(tmp_path, "bf16", 128, 1, (50, 25), peak=2000), run(tmp_path, "fp8", 128, 1, (60, 26), flushed=(0.5, 0.1))]
    png = tmp_path / "fig" / "dose.png"
    rows = module.main([*dirs, f"--png={png}"])
    assert [(r["d"], r["seed"]) for r in rows] == [(64, 1), (64, 2), (128, 1)]
    assert [r["peak"] for r in rows] == [100, 300, 2000]  # the BF16 run's, the largest over training
    assert [round(r["gap"], 6) for r in rows] == [-5.0, 5.0, 4.0]  # at the last evaluation
    assert [(round(r["worst"], 6), r["worst_iter"]) for r in rows] == [(10.0, 10), (5.0, 20), (20.0, 10)]
    assert [r["gradients"] for r in rows] == [0.02, 0.04, 0.5] and [r["forward inputs"] for r in rows] == [0.001, 0.003, 0.1]
    assert module.by_width(rows, "peak") == ([64, 128], [200, 2000])
    out = capsys.readouterr().out
    assert "| 128 | 1 | 2000 | 25.00 | 26.00 | +4.0% | +20.0% (10) | 50.0% | 10.00% |" in out
    assert png.stat().st_size > 10_000
    assert "exists" in refused(capsys, module.main, *dirs, f"--png={png}")  # never replaced without --overwrite
    module.main([*dirs, f"--png={png}", "--overwrite"])


@pytest.mark.parametrize("case, expect", [
    ("alone", "no run of the other precision"),
    ("twice", "are both bf16 at d_model 64, seed 1"),
    ("tweo", "plain BF16 and FP8 runs"),
    ("unfinished", "unfinished (iteration 20 of 40)"),
    ("schedules", "trained 20 and 10 steps"),
])
def test_what_cannot_be_paired_is_one_line_and_exit_2(tmp_path, capsys, case, expect):
    dirs = [run(tmp_path, "bf16", 64, 1, (40, 20))]
    if case == "twice":
        dirs.append(write_run(tmp_path / "again", [eval_row(20, 21), train_row(20, 1.0)], model_args=dict(n_embd=64), seed=1))
    if case == "tweo":
        dirs.append(run(tmp_path, "fp8", 64, 1, (40, 20), tweo_lambda=0.01))
    if case == "unfinished":
        dirs.append(run(tmp_path, "fp8", 64, 1, (40, 20), max_iters=40))
    if case == "schedules":
        dirs.append(run(tmp_path, "fp8", 64, 1, (40, 20), max_iters=10))
    assert expect in refused(capsys, module.main, *dirs, f"--png={tmp_path / 'x.png'}")
    assert not os.path.exists(tmp_path / "x.png")


def test_flushed_fraction_skips_replaced_lines_and_what_follows_a_collapse():
    grads = ("grad_output",)
    assert math.isnan(module.largest_flushed({"collapse_iter": None, "rows": [{"iter": 1, "loss": 2.0}]}, grads))  # not 0
    before_resume, after_resume, late = quant(0.9, 0.0), quant(0.2, 0.0), dict(quant(0.7, 0.0), iter=30)
    rows = [before_resume, after_resume, late]  # a resumed run logs iteration 10 again: the later line stands
    assert module.largest_flushed({"collapse_iter": None, "rows": rows}, grads) == 0.7
    assert module.largest_flushed({"collapse_iter": 30, "rows": rows}, grads) == 0.2  # a diverged run's casts are not FP8's
