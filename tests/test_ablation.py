"""bench/ablation.py: supplementary Tables 2 and 3 from hand-written runs with known answers."""
import pytest

from bench.ablation import main as ablation
from conftest import eval_row, train_row, write_run


def run(tmp_path, name, ppl, peak, final, **config):
    rows = [train_row(10, 1.0, act_peak=peak), eval_row(20, ppl), dict(train_row(20, 1.0, act_peak=peak),
                                                                         act_max_per_layer=[final / 3, final])]
    return write_run(tmp_path / name, rows, **config)


def test_rows_by_tau_and_p_with_the_baseline_and_the_papers_setting_marked(tmp_path, capsys):
    dirs = [run(tmp_path, "p5", 19.0, 10.0, 9.0, tweo_lambda=0.01, tweo_p=5.0),
            run(tmp_path, "base", 20.0, 823.0, 563.0),
            run(tmp_path, "tau5", 18.9, 28.0, 27.0, tweo_lambda=0.01, tweo_tau=5.0),
            run(tmp_path, "paper", 18.7, 16.0, 15.0, tweo_lambda=0.01),
            run(tmp_path, "tau1", 18.6, 6.0, 5.0, tweo_lambda=0.01, tweo_tau=1.0),
            run(tmp_path, "tau1_p2", 30.0, 1.0, 1.0, tweo_lambda=0.01, tweo_tau=1.0, tweo_p=2.0)]  # in neither table
    result = ablation(dirs + ["--json"])
    out = capsys.readouterr().out
    tau = [(r["τ"], r["ppl"], r["peak"], r["final"]) for r in result["tweo_tau"]]
    assert tau == [(None, pytest.approx(20.0), 823.0, 563.0), (1.0, pytest.approx(18.6), 6.0, 5.0),
                   (3.0, pytest.approx(18.7), 16.0, 15.0), (5.0, pytest.approx(18.9), 28.0, 27.0)]
    p = [(r["p"], r["run"].rsplit("/", 1)[-1]) for r in result["tweo_p"]]
    assert p == [(None, "base"), (4.0, "paper"), (5.0, "p5")]
    assert "| GPT 2L×64 (BF16) † | – | 20.00 | 823 | 563 |" in out
    assert "| GPT 2L×64 (BF16, λ=0.01) # | 3 | 18.70 | 16.0 | 15.0 |" in out
    assert "| GPT 2L×64 (BF16, λ=0.01) | 1 | 18.60 | 6.0 | 5.0 |" in out


def test_an_unfinished_run_is_marked(tmp_path, capsys):
    ablation([write_run(tmp_path / "u", [eval_row(10, 25.0), train_row(10, 1.0, act_peak=4.0)], max_iters=20)])
    assert "| GPT 2L×64 (BF16) † | – | 25.00 (unfinished: iter 10 of 20) | 4.0 | 4.0 |" in capsys.readouterr().out


def test_a_collapsed_run_shows_its_best_evaluation_before_the_collapse_or_none(tmp_path, capsys):
    collapse = {"iter": 15, "event": "collapse", "loss": 30.0}
    early = write_run(tmp_path / "e", [train_row(10, 1.0, act_peak=5.0), collapse], tweo_lambda=0.01, tweo_tau=1.0)
    late = write_run(tmp_path / "l", [eval_row(10, 40.0), eval_row(12, 45.0), train_row(12, 1.0, act_peak=9.0), collapse],
                     tweo_lambda=0.01, tweo_tau=5.0)
    result = ablation([early, late, "--json"])
    out = capsys.readouterr().out
    assert "| 1 | - (collapsed at iter 15) | 5.0 | 5.0 |" in out
    assert "| 5 | 40.00 (collapsed at iter 15; best before, iter 10) | 9.0 | 9.0 |" in out
    assert [r["collapse_iter"] for r in result["tweo_tau"]] == [15, 15]
