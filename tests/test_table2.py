"""bench/table2.py: Table 2 in the paper's layout, rows made from what the runs are."""
import json
import math
import shutil
import subprocess
import sys

import pytest

from bench.table2 import main as table2
from conftest import REPO, eval_row, metrics, train_row, write_run


def last_ppl(out_dir):
    return math.exp([r for r in metrics(out_dir) if "val_loss" in r][-1]["val_loss"])


def peak(out_dir):
    return max(r["act_peak"] for r in metrics(out_dir) if "act_peak" in r)


def test_real_runs_fill_the_right_cells_whatever_their_directories_are_called(runs, tmp_path, capsys):
    # the directory names lie: rows come from run.json
    named = {}
    for mode, lie in (("bf16", "fp8_tweo"), ("fp8", "bf16"), ("fp8_tweo", "fp8")):
        named[mode] = str(tmp_path / lie)
        shutil.copytree(runs[mode], named[mode], ignore=shutil.ignore_patterns("ckpt", "*.pt", "wandb"))
    rows = table2([named["fp8_tweo"], named["bf16"], named["fp8"], "--json"])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == rows
    base, tweo = rows
    assert base["model"] == "GPT 2L×64" and tweo["model"] == "GPT 2L×64 +TWEO" and base["params"] == "3.32M"
    assert base["ppl_fp8"] == pytest.approx(last_ppl(runs["fp8"])) and base["ppl_bf16"] == pytest.approx(last_ppl(runs["bf16"]))
    assert base["peak"] == max(peak(runs["fp8"]), peak(runs["bf16"])) and base["runs"] == [named["fp8"], named["bf16"]]
    assert tweo["ppl_fp8"] == pytest.approx(last_ppl(runs["fp8_tweo"])) and tweo["ppl_bf16"] is None
    assert tweo["runs"] == [named["fp8_tweo"]] and not base["collapsed"] and base["collapse_iter"] is None
    assert "| Model | Params | PPL (FP8) ↓ | PPL (BF16) ↓ | Peak |" in out
    assert f"| GPT 2L×64 +TWEO | 3.32M | {tweo['ppl_fp8']:.2f} | - |" in out


def test_a_collapsed_run_is_marked_with_its_best_ppl_before_the_collapse(runs, collapsed_run, capsys):
    (row,) = table2([runs["bf16"], collapsed_run, "--json"])
    out = capsys.readouterr().out
    evals = {r["iter"]: r["val_loss"] for r in metrics(collapsed_run) if "val_loss" in r}
    assert list(evals) == [8]  # evaluated once, then the loss went NaN at iteration 10
    assert row["collapsed"] and row["collapse_iter"] == 11 and row["ppl_fp8"] == pytest.approx(math.exp(evals[8]))
    assert row["ppl_bf16"] == pytest.approx(last_ppl(runs["bf16"]))
    assert f"| {row['ppl_fp8']:.2f} # |" in out
    assert f"#: {collapsed_run}: training collapsed at iter 11; we report the best checkpoint before collapsing (iter 8)." in out


def test_known_values_and_the_papers_numbers(tmp_path, capsys):
    big = dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024)  # GPT-2 medium
    fp8 = write_run(tmp_path / "a", [eval_row(10, 40.0), eval_row(20, 30.0), train_row(20, 1.0, act_peak=900.0),
                                     {"iter": 25, "event": "collapse"}, eval_row(30, 1e6)],
                    precision="fp8", max_iters=40, model_args=big)
    bf16 = write_run(tmp_path / "b", [eval_row(20, 22.0), eval_row(40, 16.5), train_row(40, 1.0, act_peak=300.0)],
                     max_iters=40, model_args=big)
    bf16_tweo = write_run(tmp_path / "c", [eval_row(40, 15.25), train_row(40, 1.0, act_peak=12.0)], max_iters=40,
                          tweo_lambda=0.01, model_args=big)
    other_schedule = write_run(tmp_path / "d", [eval_row(30, 17.0), train_row(30, 1.0)], max_iters=30, model_args=big)
    rows = table2([bf16_tweo, fp8, bf16, other_schedule, "--paper", "--json"])
    out = capsys.readouterr().out
    assert [(r["model"], r["ppl_fp8"], r["ppl_bf16"], r["peak"], r["collapse_iter"]) for r in rows] == [
        ("GPT2-medium (max_iters=30)", None, pytest.approx(17.0), 1.0, None),  # another schedule: its own row
        ("GPT2-medium (max_iters=40)", pytest.approx(30.0), pytest.approx(16.5), 900.0, 25),
        ("GPT2-medium +TWEO", None, pytest.approx(15.25), 12.0, None)]
    assert rows[1]["params"] == "355M" and rows[1]["paper"] == {"ppl_fp8": 127.34, "ppl_bf16": 16.77, "peak": 24563}
    assert "| GPT2-medium (max_iters=40) | 355M | 30.00 # | 16.50 | 900 | 127.34 | 16.77 # | 24563 |" in out
    assert "| GPT2-medium +TWEO | 355M | - | 15.25 | 12.0 | 15.64 | 15.18 | 19 |" in out


def test_two_runs_for_one_cell_and_bad_input_stop_before_any_output(runs, tmp_path):
    twin = tmp_path / "twin"
    shutil.copytree(runs["bf16"], twin, ignore=shutil.ignore_patterns("ckpt", "*.pt"))
    for args, message in (([runs["bf16"], str(twin)], "are both the BF16 run of row"),
                          ([str(tmp_path / "nothing")], "is not a train.py run"),
                          ([runs["bf16"], "--papper=True"], "did you mean 'paper'"), ([], "no run directories")):
        r = subprocess.run([sys.executable, "bench/table2.py", *args], cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 2 and r.stdout == "" and message in r.stderr and len(r.stderr.splitlines()) == 1


def test_a_run_killed_while_writing_its_metrics_gives_the_table_of_its_complete_lines(runs, tmp_path, capsys):
    killed = tmp_path / "killed"
    shutil.copytree(runs["fp8"], killed, ignore=shutil.ignore_patterns("ckpt", "*.pt"))
    with open(killed / "metrics.jsonl") as f:
        lines = f.readlines()
    (killed / "metrics.jsonl").write_text("".join(lines[:-1]))
    table2([runs["bf16"], str(killed)])  # without the last line
    whole = capsys.readouterr()
    (killed / "metrics.jsonl").write_text("".join(lines[:-1]) + lines[-1][:len(lines[-1]) // 2])
    table2([runs["bf16"], str(killed)])
    cut = capsys.readouterr()
    assert cut.out == whole.out and whole.err == ""
    assert cut.err == f"note: {killed}/metrics.jsonl: the last line is cut short (a run killed while writing it); read without it\n"


def test_seeds_of_a_cell_give_mean_and_sd_and_paired_gaps_to_the_baseline_of_the_same_seed(tmp_path, capsys):
    def run(name, ppl, peak, **config):
        return write_run(tmp_path / name, [eval_row(20, ppl), train_row(20, 1.0, act_peak=peak)], **config)
    dirs = [run("b1", 20.0, 800.0), run("b2", 21.0, 900.0, seed=2), run("b3", 22.0, 1000.0, seed=3),
            run("f1", 22.0, 700.0, precision="fp8"), run("f2", 25.2, 750.0, precision="fp8", seed=2),
            run("t1", 20.0, 10.0, precision="fp8", tweo_lambda=0.01),
            run("t3", 22.0, 12.0, precision="fp8", tweo_lambda=0.01, seed=3)]
    base, tweo = table2(dirs + ["--json"])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == [base, tweo]
    assert base["seeds_bf16"] == [2, 3, 1337] and base["seeds_fp8"] == [2, 1337]
    assert (base["ppl_bf16"], base["ppl_bf16_sd"]) == (pytest.approx(21.0), pytest.approx(1.0))
    assert (base["ppl_fp8"], base["ppl_fp8_sd"]) == (pytest.approx(23.6), pytest.approx(1.6 * 2 ** 0.5))
    assert base["peak"] == 1000.0 and "gap_pct_bf16" not in base
    # paired by seed: fp8 seed 2 against bf16 seed 2 (+20%), seed 1337 against 1337 (+10%)
    assert base["gap_pct_fp8"] == [[2, pytest.approx(20.0)], [1337, pytest.approx(10.0)]]
    assert tweo["gap_pct_fp8"] == [[3, pytest.approx(0.0)], [1337, pytest.approx(0.0)]]
    assert "| GPT 2L×64 | 3.32M | 23.60 ± 2.26 | 21.00 ± 1.00 | 1000 |" in out
    assert "| GPT 2L×64 +TWEO | 3.32M | 21.00 ± 1.41 | - | 12.0 |" in out
    assert "| GPT 2L×64 | FP8 | 2 | +15.0 ± 7.1% | +20.0% (2), +10.0% (1337) | 725 ± 35 |" in out
    assert "| GPT 2L×64 +TWEO | FP8 | 2 | +0.0 ± 0.0% | +0.0% (3), +0.0% (1337) | 11.0 ± 1.4 |" in out


def test_runs_of_one_cell_must_differ_only_in_their_seed(tmp_path):
    a = write_run(tmp_path / "a", [eval_row(20, 20.0)], precision="fp8")
    b = write_run(tmp_path / "b", [eval_row(20, 20.0)], precision="fp8", seed=2, fp8_amax_history_len=1)
    c = write_run(tmp_path / "c", [eval_row(20, 20.0)], precision="fp8", seed=3, fp8_amax_history_len=16,
                  wandb_run_name="elsewhere", compile=False, micro_batch_size=4)  # bookkeeping only: a repeat
    r = subprocess.run([sys.executable, "bench/table2.py", a, b], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1
    assert "differ in fp8_amax_history_len (16 and 1), not only in their seed" in r.stderr
    r = subprocess.run([sys.executable, "bench/table2.py", c, write_run(tmp_path / "d", [eval_row(20, 20.0)],
                        precision="fp8", fp8_amax_history_len=16)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
