"""bench/compare_runs.py: the Table 2 / Table 10 summary of train.py runs."""
import json
import math
import shutil

import pytest

from bench.compare_runs import main as compare
from conftest import metrics


def test_table_from_real_runs(runs, capsys):
    rows = compare([runs["bf16"], runs["fp8"], runs["fp8_tweo"]])
    out = capsys.readouterr().out
    assert [r["mode"] for r in rows] == ["bf16", "fp8", "fp8+TWEO"] and "best PPL" in out
    for r, mode in zip(rows, ["bf16", "fp8", "fp8_tweo"]):
        m = metrics(runs[mode])
        assert r["best_val_ppl"] == pytest.approx(math.exp(min(x["val_loss"] for x in m if "val_loss" in x)))
        assert r["act_peak"] == max(x["act_peak"] for x in m if "act_peak" in x)
        assert r["collapsed_at"] is None and r["iters"] == 24


def test_best_ppl_is_taken_before_a_collapse(runs, tmp_path, capsys):
    run = tmp_path / "collapsed"
    shutil.copytree(runs["bf16"], run, ignore=shutil.ignore_patterns("ckpt", "*.pt"))
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"iter": 25, "event": "collapse", "loss": "nan"}) + "\n")
        f.write(json.dumps({"iter": 26, "val_loss": 0.1, "val_ppl": math.exp(0.1)}) + "\n")  # after it: ignored
    (r,) = compare([str(run)])
    assert r["collapsed_at"] == 25 and r["best_val_ppl"] > math.exp(1)


def test_a_malformed_metrics_line_is_named_in_one_line(runs, tmp_path, capsys):
    run = tmp_path / "broken"
    shutil.copytree(runs["bf16"], run, ignore=shutil.ignore_patterns("ckpt", "*.pt", "wandb"))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"iter": 25, "loss": 3.0\n')  # a line cut short, as by a full disk
    with pytest.raises(SystemExit) as e:
        compare([str(run)])
    n = len(metrics(runs["bf16"])) + 1
    assert e.value.code == 2 and capsys.readouterr().err.splitlines() == [
        f"error: {run}/metrics.jsonl: line {n} is not JSON (Expecting ',' delimiter)"]
