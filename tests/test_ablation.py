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
    tau = [(r["τ"], r["ppl"]["mean"], r["peak"]["mean"], r["final"]["mean"]) for r in result["tweo_tau"]]
    assert tau == [(None, pytest.approx(20.0), 823.0, 563.0), (1.0, pytest.approx(18.6), 6.0, 5.0),
                   (3.0, pytest.approx(18.7), 16.0, 15.0), (5.0, pytest.approx(18.9), 28.0, 27.0)]
    assert all(r["ppl"]["sd"] is None and r["seeds"] == [1337] for r in result["tweo_tau"])
    p = [(r["p"], [d.rsplit("/", 1)[-1] for d in r["runs"]]) for r in result["tweo_p"]]
    assert p == [(None, ["base"]), (4.0, ["paper"]), (5.0, ["p5"])]
    assert "| GPT 2L×64 (BF16) † | – | 20.00 | 1 | 823 | 563 |" in out
    assert "| GPT 2L×64 (BF16, λ=0.01) # | 3 | 18.70 | 1 | 16.0 | 15.0 |" in out
    assert "| GPT 2L×64 (BF16, λ=0.01) | 1 | 18.60 | 1 | 6.0 | 5.0 |" in out
    assert "mean ± sample standard deviation" not in out


def test_seeds_of_one_setting_share_a_row_with_mean_and_sample_sd(tmp_path, capsys):
    dirs = [run(tmp_path, "base2", 22.0, 900.0, 700.0, seed=2), run(tmp_path, "base", 20.0, 800.0, 500.0),
            run(tmp_path, "base3", 21.0, 1000.0, 600.0, seed=3),
            run(tmp_path, "paper2", 19.0, 14.0, 12.0, seed=2, tweo_lambda=0.01),
            run(tmp_path, "paper", 18.0, 16.0, 10.0, tweo_lambda=0.01)]
    result = ablation(dirs + ["--json"])
    out = capsys.readouterr().out
    base, paper = result["tweo_tau"]
    assert base["seeds"] == [2, 3, 1337] and [d.rsplit("/", 1)[-1] for d in base["runs"]] == ["base2", "base3", "base"]
    assert base["ppl"] == {"mean": pytest.approx(21.0), "sd": pytest.approx(1.0)}  # sample sd of 20, 21, 22
    assert base["peak"] == {"mean": pytest.approx(900.0), "sd": pytest.approx(100.0)}
    assert paper["seeds"] == [2, 1337] and paper["final"] == {"mean": pytest.approx(11.0), "sd": pytest.approx(2 ** 0.5)}
    assert "| GPT 2L×64 (BF16) † | – | 21.00 ± 1.00 | 3 | 900 ± 100 | 600 ± 100 |" in out
    assert "| GPT 2L×64 (BF16, λ=0.01) # | 3 | 18.50 ± 0.71 | 2 | 15.0 ± 1.4 | 11.0 ± 1.4 |" in out
    assert "A row of several seeds (2, 3, 1337): mean ± sample standard deviation." in out


def test_runs_of_one_row_that_differ_in_more_than_their_seed_get_rows_of_their_own(tmp_path, capsys):
    dirs = [run(tmp_path, "a", 20.0, 800.0, 500.0), run(tmp_path, "b", 30.0, 800.0, 500.0, seed=2, weight_decay=0.0)]
    result = ablation(dirs + ["--json"])
    assert [r["runs"] for r in result["tweo_tau"]] == [[dirs[0]], [dirs[1]]]


def test_an_unfinished_run_is_marked(tmp_path, capsys):
    ablation([write_run(tmp_path / "u", [eval_row(10, 25.0), train_row(10, 1.0, act_peak=4.0)], max_iters=20)])
    assert "| GPT 2L×64 (BF16) † | – | 25.00 (unfinished: iter 10 of 20) | 1 | 4.0 | 4.0 |" in capsys.readouterr().out


def test_a_collapsed_run_shows_its_best_evaluation_before_the_collapse_or_none(tmp_path, capsys):
    collapse = {"iter": 15, "event": "collapse", "loss": 30.0}
    early = write_run(tmp_path / "e", [train_row(10, 1.0, act_peak=5.0), collapse], tweo_lambda=0.01, tweo_tau=1.0)
    late = write_run(tmp_path / "l", [eval_row(10, 40.0), eval_row(12, 45.0), train_row(12, 1.0, act_peak=9.0), collapse],
                     tweo_lambda=0.01, tweo_tau=5.0)
    result = ablation([early, late, "--json"])
    out = capsys.readouterr().out
    assert "| 1 | - (collapsed at iter 15) | 1 | 5.0 | 5.0 |" in out
    assert "| 5 | 40.00 (collapsed at iter 15; best before, iter 10) | 1 | 9.0 | 9.0 |" in out
    assert [r["collapse_iter"] for r in result["tweo_tau"]] == [[15], [15]]
    # a seed of the same setting that did not collapse: one row, the collapse counted
    other_seed = write_run(tmp_path / "l2", [eval_row(10, 30.0), train_row(20, 1.0, act_peak=7.0), eval_row(20, 20.0)],
                           tweo_lambda=0.01, tweo_tau=5.0, seed=2)
    ablation([late, other_seed])
    assert "| 5 | 30.00 ± 14.14 (1 of 2 collapsed, at iter 15; their best evaluations before) | 2 | 8.0 ± 1.4 | 8.0 ± 1.4 |" \
        in capsys.readouterr().out
