"""train.py: real DeepSpeed ZeRO-3 runs of configs/tiny.py on CPU (gloo), 1 and 2 ranks."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import prepare_openwebtext as P
from conftest import MODES, REPO, RUN, losses, metrics, train, train_cmd

TRAIN_KEYS = {"iter", "loss", "tweo_loss", "lr", "tweo_lambda", "grad_norm", "act_peak", "act_max_per_layer",
              "iter_per_hour", "tokens_per_sec", "mem_peak_gb"}


@pytest.mark.parametrize("mode", MODES)
def test_two_rank_zero3_run_learns_and_logs(runs, mode):
    rows = metrics(runs[mode])
    train_rows = [r for r in rows if "loss" in r]
    assert [r["iter"] for r in train_rows] == list(range(1, 25))
    for r in train_rows:
        assert TRAIN_KEYS <= r.keys(), TRAIN_KEYS - r.keys()
        assert len(r["act_max_per_layer"]) == 2 and r["act_peak"] >= max(r["act_max_per_layer"])
        assert (r["tweo_loss"] > 0) == (mode == "fp8_tweo")
    first, last = train_rows[0]["loss"], sum(r["loss"] for r in train_rows[-4:]) / 4
    assert last < first - 1.0, (first, last)  # from ~10.8 at init
    evals = [r for r in rows if "val_loss" in r]
    assert [r["iter"] for r in evals] == [8, 16, 24]
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in evals)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    stats = [r for r in rows if "act_stats" in r]
    assert [r["iter"] for r in stats] == [12, 24] and set(stats[0]["act_stats"][0]) == {"top1", "top2", "top3", "median"}
    if mode == "fp8":
        (wandb_run,) = [d for d in os.listdir(os.path.join(runs[mode], "wandb")) if d.startswith("offline-run-")]
        assert any(f.endswith(".wandb") for f in os.listdir(os.path.join(runs[mode], "wandb", wandb_run)))
    if mode != "bf16":
        assert "fp8_amax" in train_rows[-1] and "lm_head" in train_rows[-1]["fp8_amax"]
        assert train_rows[-1]["fp8_amax"]["lm_head"]["input"] > 0
    ckpt = os.path.join(runs[mode], "ckpt")
    with open(os.path.join(ckpt, "latest")) as f:
        assert f.read() == "iter_0000024"
    with open(os.path.join(ckpt, "best")) as f:
        assert f.read() == "best_iter_0000024"
    tags = {d for d in os.listdir(ckpt) if os.path.isdir(os.path.join(ckpt, d))}
    assert tags == {"iter_0000016", "iter_0000024", "best_iter_0000024"}  # ckpt_keep=2, one best
    model_file = torch.load(os.path.join(runs[mode], "model_last.pt"), weights_only=True)
    assert model_file["iter"] == 24 and model_file["model_args"]["n_layer"] == 2
    assert model_file["model"]["transformer.wte.weight"].dtype == torch.bfloat16
    if mode != "bf16":  # the FP8 scaling state travels with the weights, in fp32
        assert model_file["model"]["lm_head.fp8_amax_history"].dtype == torch.float32


def test_one_and_two_ranks_give_the_same_loss_curve(runs, demo_data, tmp_path):
    # the same global batch: 1 rank x 2 micro-steps against 2 ranks x 1
    train(1, f"--data_dir={demo_data}", f"--out_dir={tmp_path}/one", *MODES["bf16"], *RUN)
    one, two = losses(metrics(f"{tmp_path}/one")), losses(metrics(runs["bf16"]))
    assert one.keys() == two.keys()
    worst = max(abs(one[i] - two[i]) / two[i] for i in one)
    print(f"1 vs 2 ranks: largest relative loss difference over {len(one)} steps {worst:.2e}")
    assert worst < 2e-2  # bf16 weights, reductions in another order


def test_kill_9_then_resume_matches_an_uninterrupted_run(runs, demo_data, tmp_path):
    out_dir = f"{tmp_path}/killed"
    args = [f"--data_dir={demo_data}", f"--out_dir={out_dir}", *MODES["fp8_tweo"], *RUN]
    proc = subprocess.Popen(train_cmd(2, *args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if os.path.exists(f"{out_dir}/metrics.jsonl") and any(r.get("iter", 0) >= 12 for r in metrics(out_dir)):
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = max(r["iter"] for r in metrics(out_dir))
    assert 12 <= done < 24, "the run was not killed mid-training"

    train(2, *args, "--init_from=resume")
    resumed = [row for row in metrics(out_dir) if row.get("event") == "resume"]
    assert len(resumed) == 1 and resumed[0]["iter"] in (8, 16)
    start = resumed[0]["iter"]
    rows = metrics(out_dir)
    after = {row["iter"]: row["loss"] for row in rows[rows.index(resumed[0]):] if "loss" in row and "event" not in row}
    reference = losses(metrics(runs["fp8_tweo"]))
    assert sorted(after) == list(range(start + 1, 25))
    diffs = [abs(after[i] - reference[i]) for i in after]
    print(f"resumed at iter {start} (killed after {done}): max |loss - uninterrupted| over {len(after)} steps = {max(diffs):.1e}")
    assert max(diffs) == 0.0, diffs


def test_injected_nan_is_a_recorded_collapse_and_best_stays_intact(demo_data, tmp_path):
    out_dir = f"{tmp_path}/nan"
    r = train(1, f"--data_dir={demo_data}", f"--out_dir={out_dir}", *MODES["fp8"], *RUN, "--inject_nan_iter=10")
    assert "collapse at iter 11" in r.stdout
    rows = metrics(out_dir)
    events = [row for row in rows if row.get("event") == "collapse"]
    assert len(events) == 1 and events[0]["iter"] == 11 and events[0]["reason"] == "non-finite loss"
    assert max(row["iter"] for row in rows) == 11  # stop_on_collapse: a clean stop
    with open(f"{out_dir}/ckpt/best") as f:
        assert f.read() == "best_iter_0000008"
    best = torch.load(f"{out_dir}/model_best.pt", weights_only=True)
    assert best["iter"] == 8 and all(torch.isfinite(v.float()).all() for v in best["model"].values())


def test_collapse_skips_the_update_and_continues(demo_data, tmp_path):
    out_dir = f"{tmp_path}/skip"
    train(1, f"--data_dir={demo_data}", f"--out_dir={out_dir}", *MODES["bf16"], *RUN, "--inject_nan_iter=10",
          "--stop_on_collapse=False")
    rows = metrics(out_dir)
    events = [row for row in rows if row.get("event") == "collapse"]
    assert len(events) == 1 and events[0]["skipped_steps"] == 1
    train_rows = [row for row in rows if "loss" in row and "event" not in row]
    assert train_rows[-1]["iter"] == 24 and math.isfinite(train_rows[-1]["loss"])
    assert all(math.isfinite(row["loss"]) for row in train_rows)


def bad_input_cases(demo_data, tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "train.bin").write_bytes(b"\0" * 4001)
    (odd / "val.bin").write_bytes(b"\0" * 4000)
    return {
        "missing data": ([f"--data_dir={tmp_path}/nothing"], "prepare_openwebtext.py"),
        "odd-sized bin": ([f"--data_dir={odd}"], "odd number of bytes"),
        "vocab too small": ([f"--data_dir={demo_data}", "--vocab_size=1000"], "needs a vocabulary of"),
        "batch does not divide": ([f"--data_dir={demo_data}", "--total_batch_tokens=1000"], "not a multiple of"),
        "te without CUDA": ([f"--data_dir={demo_data}", "--precision=fp8", "--fp8_backend=te"], "Transformer Engine"),
    }


def test_bad_input_one_line_nonzero_exit_nothing_written(demo_data, tmp_path):
    for name, (args, message) in bad_input_cases(demo_data, tmp_path).items():
        out_dir = tmp_path / name.replace(" ", "_")
        r = train(1, f"--out_dir={out_dir}", *args, check=False)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (name, r.stderr)
        assert not out_dir.exists(), name


def test_an_out_dir_holding_a_run_is_never_overwritten(runs, demo_data):
    before = {f: os.path.getmtime(os.path.join(dp, f)) for dp, _, fs in os.walk(runs["bf16"]) for f in fs}
    r = train(1, f"--out_dir={runs['bf16']}", f"--data_dir={demo_data}", check=False)
    assert r.returncode == 2 and "already holds a run" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = train(1, f"--out_dir={runs['bf16']}", f"--data_dir={demo_data}", "--n_layer=3", "--init_from=resume", check=False)
    assert r.returncode == 2 and "another model" in r.stderr
    after = {f: os.path.getmtime(os.path.join(dp, f)) for dp, _, fs in os.walk(runs["bf16"]) for f in fs}
    assert before == after


def test_the_deepspeed_launcher_runs_it(demo_data, tmp_path):
    # the launcher adds --local_rank=N, which train.py must accept
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    r = subprocess.run([launcher, "--num_gpus=1", "train.py", "configs/tiny.py", f"--data_dir={demo_data}",
                        f"--out_dir={tmp_path}/ds", "--max_iters=2", "--eval_interval=2", "--ckpt_interval=2"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert [row["iter"] for row in metrics(f"{tmp_path}/ds") if "val_loss" in row] == [2]


@pytest.mark.parametrize("mode", ["bf16", "bf16_tweo", "fp8", "fp8_tweo"])
def test_mini_configs_load_and_train(stdlib_data, tmp_path, mode):
    out_dir = str(tmp_path / mode)
    r = subprocess.run([sys.executable, "train.py", f"configs/mini_{mode}.py", f"--data_dir={stdlib_data}",
                        f"--out_dir={out_dir}", "--max_iters=3", "--eval_interval=3", "--eval_iters=1",
                        "--log_interval=1", "--ckpt_interval=3", "--act_stats_interval=3"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metrics(out_dir)
    train_rows = [row for row in rows if "loss" in row]
    assert [row["iter"] for row in train_rows] == [1, 2, 3]
    assert abs(train_rows[0]["loss"] - math.log(18779)) < 0.6  # about uniform over the compact vocabulary, not 50304
    assert len(train_rows[0]["act_max_per_layer"]) == 8
    assert (train_rows[-1]["tweo_loss"] > 0) == mode.endswith("tweo")
    assert ("fp8_amax" in train_rows[-1]) == mode.startswith("fp8")
    assert [row["iter"] for row in rows if "val_loss" in row] == [3]
    model_file = torch.load(os.path.join(out_dir, "model_last.pt"), weights_only=True)
    assert model_file["model_args"]["vocab_size"] == 18784 and model_file["config"]["learning_rate"] == 0.006
    if mode == "bf16":  # sample.py decodes the compact vocabulary through the data's vocab_map.npy
        r = subprocess.run([sys.executable, "sample.py", f"--out_dir={out_dir}", "--start=def main(", "--num_samples=1",
                            "--max_new_tokens=8", "--print_json=True"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        sample = json.loads(r.stdout.strip().splitlines()[-1])
        id_map = P.load_vocab_map(stdlib_data)
        assert len(sample["tokens"]) == 8 and max(sample["tokens"]) < len(id_map)
        assert sample["text"] == P.gpt2_tokenizer().decode(id_map[sample["tokens"]].tolist())
