"""bench/mini.py: the miniature Table 2 in one command: real train.py runs, skipped when
finished, and the table made from them; bad input stops before any work."""
import os
import subprocess
import sys

from conftest import REPO, metrics


def mini(*args):
    return subprocess.run([sys.executable, "bench/mini.py", *args], cwd=REPO, capture_output=True, text=True, timeout=900)


def test_the_invasive_rows_train_in_both_precisions_then_are_skipped(stdlib_data, tmp_path):
    args = ["--only=invasive", "--max_iters=2", "--parallel=2", f"--runs_dir={tmp_path}", f"--data_dir={stdlib_data}"]
    r = mini(*args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    names = ["mini_fp8_attn_bias", "mini_bf16_attn_bias", "mini_fp8_clipped_softmax", "mini_bf16_clipped_softmax"]
    for name in names:
        rows = metrics(tmp_path / name)
        assert max(row["iter"] for row in rows if "loss" in row) == 2 and any("val_loss" in row for row in rows)
        assert os.path.exists(tmp_path / "mini_logs" / f"{name}.log")
    table = r.stdout[r.stdout.index("== Table 2"):]
    assert "| GPT 8L×128 attn bias * |" in table and "| GPT 8L×128 clipped softmax (γ=-0.025) * |" in table
    assert "| - |" not in table.split("\n\n")[0]  # both precisions of both rows filled: no empty PPL cell
    again = mini(*args)
    assert again.returncode == 0 and again.stdout.count("skipping") == 4 and "train.py" not in again.stdout.split("== Table 2")[0]


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    for args, message in [(["--only=modes,everything"], "--only"), (["--parallel=0"], "--parallel"),
                          ([f"--data_dir={tmp_path}/none"], "prepare_openwebtext.py --stdlib"), (["--paralel=2"], "paralel")]:
        r = mini(*args, f"--runs_dir={tmp_path}/runs")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
        assert not os.path.exists(tmp_path / "runs")
