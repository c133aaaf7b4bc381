"""results/mini_search/mini_search.py (the finished setting search, kept to reproduce
results/mini_search.md): a few real steps on the demo corpus, its log lines and its table."""
import importlib.util
import json
import os
import subprocess
import sys

from conftest import REPO, refused

SCRIPT = os.path.join("results", "mini_search", "mini_search.py")
spec = importlib.util.spec_from_file_location("mini_search", os.path.join(REPO, SCRIPT))
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
mini_search = module.main


def test_a_short_fp8_run_logs_evals_saturation_and_a_summary(demo_data, tmp_path):
    out = tmp_path / "r_fp8.jsonl"
    cmd = [sys.executable, SCRIPT, "--mode=fp8", f"--data_dir={demo_data}", f"--out={out}", "--n_layer=2",
           "--n_embd=32", "--block_size=32", "--vocab_size=50304", "--iters=6", "--warmup=2", "--eval_interval=3",
           "--eval_windows=8"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["precision"] == "fp8" and lines[0]["config"]["amax_history"] == 16
    evals = [row for row in lines if "val_loss" in row]
    assert [row["iter"] for row in evals] == [3, 6] and evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert set(evals[0]["fp8_saturated"]) == {"input", "weight", "grad_output"}
    assert sum(evals[0]["fp8_saturated"].values()) > 0  # the first steps' amaxes grow past their history
    assert abs(evals[-1]["act_peak"] - max(max(row["act_max_per_layer"]) for row in evals)) <= 0.05  # rounding
    assert 0 <= evals[-1]["peak_at"]["layer"] < 2 and evals[-1]["peak_at"]["value"] > 0
    assert lines[-1]["summary"] and lines[-1]["iters_done"] == 6 and lines[-1]["collapse_iter"] is None
    table = subprocess.run([sys.executable, SCRIPT, "--table", str(out)], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    assert len(table) == 3 and table[2].startswith("| r | fp8 | 2x32x2 | 32x4 |") and "6/6 |" in table[2]
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stderr  # never overwritten


def test_an_output_that_exists_or_cannot_be_written_is_refused_before_training(demo_data, tmp_path, capsys):
    (tmp_path / "afile").write_text("keep")
    err = refused(capsys, mini_search, "--mode=bf16", f"--data_dir={demo_data}", f"--out={tmp_path / 'afile'}")
    assert err == f"error: {tmp_path / 'afile'} exists; nothing is overwritten\n" and (tmp_path / "afile").read_text() == "keep"
    err = refused(capsys, mini_search, "--mode=bf16", f"--data_dir={demo_data}", f"--out={tmp_path / 'afile' / 'm.jsonl'}")
    assert err.endswith("is not a file this process can write (its folder cannot be written or created)\n")
