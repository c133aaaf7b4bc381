"""bench/mini.py: the miniature Table 2 in one command: real train.py runs, skipped when
finished, and the table made from them; bad input stops before any work."""
import json
import os
import subprocess
import sys

from conftest import REPO, metrics


def mini(*args):
    return subprocess.run([sys.executable, "bench/mini.py", *args], cwd=REPO, capture_output=True, text=True, timeout=900)


def test_the_invasive_rows_train_in_both_precisions_then_are_skipped(stdlib_data, tmp_path):
    args = ["--only=invasive", "--max_iters=2", "--eval_windows=8", "--parallel=2", f"--runs_dir={tmp_path}",
            f"--data_dir={stdlib_data}"]
    r = mini(*args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    names = ["mini_fp8_attn_bias", "mini_bf16_attn_bias", "mini_fp8_clipped_softmax", "mini_bf16_clipped_softmax"]
    for name in names:
        rows = metrics(tmp_path / name)
        assert max(row["iter"] for row in rows if "loss" in row) == 2 and any("val_loss" in row for row in rows)
        with open(tmp_path / name / "run.json") as f:
            assert json.load(f)["config"]["eval_windows"] == 8
        assert os.path.exists(tmp_path / "mini_logs" / f"{name}.log")
    table = r.stdout[r.stdout.index("== Table 2"):]
    assert "| GPT 8L×128 attn bias * |" in table and "| GPT 8L×128 clipped softmax (γ=-0.025) * |" in table
    assert "| - |" not in table.split("\n\n")[0]  # both precisions of both rows filled: no empty PPL cell
    again = mini(*args)
    assert again.returncode == 0 and again.stdout.count("skipping") == 4 and "train.py" not in again.stdout.split("== Table 2")[0]


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    for args, message in [(["--only=modes,everything"], "--only"), (["--parallel=0"], "--parallel"), (["--eval_windows=0"], "--eval_windows"),
                          ([f"--data_dir={tmp_path}/none"], "prepare_openwebtext.py --stdlib"), (["--paralel=2"], "paralel")]:
        r = mini(*args, f"--runs_dir={tmp_path}/runs")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
        assert not os.path.exists(tmp_path / "runs")


def test_each_seed_is_a_run_of_its_own_and_the_tables_give_mean_sd_and_paired_gaps(tmp_path):
    from bench.mini import DEFAULTS, command, split_seed
    from conftest import eval_row, train_row, write_run
    opts = dict(DEFAULTS, runs_dir=str(tmp_path / "runs"))
    plain, other = command("mini_bf16", opts), command("mini_bf16_seed2", opts)
    assert not any(a.startswith("--seed=") for a in plain) and f"--out_dir={tmp_path}/runs/mini_bf16" in plain
    assert "--seed=2" in other and f"--out_dir={tmp_path}/runs/mini_bf16_seed2" in other
    assert "--clipped_softmax_gamma=-0.025" in command("mini_fp8_clipped_softmax_seed3", opts)
    wide_tweo = command("mini_bf16_tweo_d256_seed2", opts)
    assert "configs/mini_bf16_tweo.py" in wide_tweo and {"--n_embd=256", "--n_head=4", "--seed=2"} <= set(wide_tweo)
    lower_lr = command("mini_fp8_tweo_d256_lr2e-3_seed3", opts)
    assert "configs/mini_fp8_tweo.py" in lower_lr and f"--out_dir={tmp_path}/runs/mini_fp8_tweo_d256_lr2e-3_seed3" in lower_lr
    assert {"--n_embd=256", "--n_head=4", "--learning_rate=2e-3", "--min_lr=2e-4", "--seed=3"} <= set(lower_lr)
    assert split_seed("mini_bf16_tweo_tau1_seed3") == ("mini_bf16_tweo_tau1", 3) and split_seed("other_seed2") == ("other_seed2", 1337)
    for name, seed, precision, ppl in (("mini_bf16", 1337, "bf16", 30.0), ("mini_bf16_seed2", 2, "bf16", 32.0),
                                       ("mini_fp8", 1337, "fp8", 33.0), ("mini_fp8_seed2", 2, "fp8", 32.0)):
        write_run(tmp_path / "runs" / name, [eval_row(20, ppl), train_row(20, 1.0)], seed=seed, precision=precision)
    r = mini("--train=False", "--figures=False", f"--runs_dir={tmp_path}/runs")
    assert r.returncode == 0, r.stderr
    assert "| GPT 2L×64 | 3.32M | 32.50 ± 0.71 | 31.00 ± 1.41 | 1.0 |" in r.stdout
    assert "| GPT 2L×64 | FP8 | 2 | +5.0 ± 7.1% | +0.0% (2), +10.0% (1337) | 1.0 ± 0.0 |" in r.stdout
    for bad in ("1337,x", "2,2", ""):
        r = mini(f"--seeds={bad}", f"--runs_dir={tmp_path}/runs")
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--seeds" in r.stderr, r.stderr
