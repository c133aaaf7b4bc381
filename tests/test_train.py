"""train.py: real DeepSpeed ZeRO-3 runs of configs/tiny.py on CPU (gloo), 1 and 2 ranks."""
import contextlib
import json
import math
import os
import re
import shutil
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
    }


def test_bad_input_one_line_nonzero_exit_nothing_written(demo_data, tmp_path):
    for name, (args, message) in bad_input_cases(demo_data, tmp_path).items():
        out_dir = tmp_path / name.replace(" ", "_")
        r = train(1, f"--out_dir={out_dir}", *args, check=False)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (name, r.stderr)
        assert not out_dir.exists(), name


# One case per rule of train.py's CHECKS table: (override, what the one line says). {tmp} is a
# folder of the test, holding a file named `file`.
RULE_CASES = [
    ("--out_dir={tmp}/file", "out_dir='{tmp}/file' must be a directory this user can write, or create"),
    ("--out_dir={tmp}/file/run", "out_dir='{tmp}/file/run' must be a directory"),
    ("--init_from=Resume", "init_from='Resume' must be 'scratch', 'resume' or a Hugging Face GPT-2 directory"),
    ("--seed=-1", "seed=-1 must be in [0, 2**32)"),
    ("--n_layer=0", "n_layer=0 must be >= 1"),
    ("--n_head=0", "n_head=0 must be >= 1"),
    ("--n_embd=65", "n_embd=65 must be a positive multiple of n_head=2"),
    ("--block_size=0", "block_size=0 must be >= 1"),
    ("--vocab_size=0", "vocab_size=0 must be >= 1"),
    ("--dropout=1.0", "dropout=1.0 must be in [0, 1)"),
    ("--micro_batch_size=0", "micro_batch_size=0 must be >= 1"),
    ("--total_batch_tokens=1000", "total_batch_tokens=1000 must be a positive multiple of micro_batch_size x block_size x GPUs = 8 x 64 x 1 = 512"),
    ("--total_batch_tokens=0", "total_batch_tokens=0 must be a positive multiple"),
    ("--max_iters=0", "max_iters=0 must be >= 1"),
    ("--learning_rate=-0.001", "learning_rate=-0.001 must be >= 0"),
    ("--min_lr=0.01", "min_lr=0.01 must be in [0, learning_rate=0.003]"),
    ("--warmup_iters=-1", "warmup_iters=-1 must be >= 0"),
    ("--lr_decay_iters=0", "lr_decay_iters=0 must be >= 1"),
    ("--weight_decay=-0.1", "weight_decay=-0.1 must be >= 0"),
    ("--beta1=1.0", "beta1=1.0 must be in [0, 1)"),
    ("--beta2=-0.5", "beta2=-0.5 must be in [0, 1)"),
    ("--grad_clip=-1.0", "grad_clip=-1.0 must be >= 0"),
    ("--precision=BF16", "precision='BF16' must be one of 'bf16', 'fp8'"),
    ("--fp8_backend=TE", "fp8_backend='TE' must be one of 'auto', 'te', 'torch', 'emulated'"),
    ("--precision=fp8 --fp8_backend=te", "fp8_backend='te' must be 'auto', 'torch' or 'emulated' here: 'te' needs Transformer Engine"),
    ("--fp8_recipe=Delayed", "fp8_recipe='Delayed' must be one of 'delayed', 'current'"),
    ("--fp8_amax_history_len=0", "fp8_amax_history_len=0 must be >= 1"),
    ("--fp8_amax_compute_algo=mean", "fp8_amax_compute_algo='mean' must be one of 'max', 'most_recent'"),
    ("--tweo_lambda=-0.01", "tweo_lambda=-0.01 must be >= 0"),
    ("--tweo_tau=0", "tweo_tau=0.0 must be > 0"),
    ("--tweo_p=-4", "tweo_p=-4.0 must be > 0"),
    ("--tweo_schedule=linear", "tweo_schedule='linear' must be one of 'constant', 'cosine'"),
    ("--zero_stage=4", "zero_stage=4 must be one of 0, 1, 2, 3"),
    ("--eval_interval=0", "eval_interval=0 must be >= 1"),
    ("--eval_iters=0", "eval_iters=0 must be >= 1"),
    ("--log_interval=0", "log_interval=0 must be >= 1"),
    ("--act_stats_interval=-1", "act_stats_interval=-1 must be >= 0"),
    ("--ckpt_interval=0", "ckpt_interval=0 must be >= 1"),
    ("--ckpt_keep=-1", "ckpt_keep=-1 must be >= 0"),
    ("--wandb_project=", "wandb_project='' must be a name"),
    ("--wandb_mode=disabled", "wandb_mode='disabled' must be one of 'online', 'offline'"),
    ("--collapse_factor=1.0", "collapse_factor=1.0 must be > 1"),
    ("--inject_nan_iter=-2", "inject_nan_iter=-2 must be >= -1"),
    ("--clipped_softmax_gamma=0.02", "clipped_softmax_gamma=0.02 must be <= 0"),
    ("--clipped_softmax_zeta=0.5", "clipped_softmax_zeta=0.5 must be >= 1"),
]
# keys without a range: booleans, free names, and data_dir (checked with the data itself)
UNRANGED = {"data_dir", "bias", "attn_bias", "activation_checkpointing", "wandb_log", "wandb_run_name", "stop_on_collapse"}


def train_source_keys():
    """(every config key of train.py, the keys its CHECKS table has rules for), from its source."""
    with open(os.path.join(REPO, "train.py")) as f:
        src = f.read()
    defaults = src[src.index("# run\n"):src.index("config_keys = ")]
    table = src[src.index("CHECKS = ["):src.index("problem = first_violation(config, CHECKS)")]
    return set(re.findall(r"^(\w+) = ", defaults, re.M)), set(re.findall(r'^    \("(\w+)",', table, re.M))


def test_every_key_has_a_rule_and_every_rule_a_case():
    keys, ruled = train_source_keys()
    assert keys - ruled == UNRANGED, "a config key without a rule in train.py's CHECKS (or a stale UNRANGED)"
    assert {case.split("=")[0].removeprefix("--") for case, _ in RULE_CASES} >= ruled


@pytest.mark.parametrize("case, message", RULE_CASES, ids=[c for c, _ in RULE_CASES])
def test_a_value_out_of_range_stops_before_any_work(demo_data, tmp_path, case, message):
    (tmp_path / "file").write_text("not a folder")
    args = [f"--data_dir={demo_data}", f"--out_dir={tmp_path}/run"] + case.format(tmp=tmp_path).split()
    r = subprocess.run([sys.executable, "train.py", "configs/tiny.py", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message.format(tmp=tmp_path)}"), r.stderr
    assert r.stdout == ""  # DeepSpeed never started
    assert not (tmp_path / "run").exists() and (tmp_path / "file").read_text() == "not a folder"


def test_an_out_dir_holding_a_run_is_never_overwritten(runs, demo_data):
    before = {f: os.path.getmtime(os.path.join(dp, f)) for dp, _, fs in os.walk(runs["bf16"]) for f in fs}
    r = train(1, f"--out_dir={runs['bf16']}", f"--data_dir={demo_data}", check=False)
    assert r.returncode == 2 and "already holds a run" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = train(1, f"--out_dir={runs['bf16']}", f"--data_dir={demo_data}", "--n_layer=3", "--init_from=resume", check=False)
    assert r.returncode == 2 and "another model" in r.stderr
    after = {f: os.path.getmtime(os.path.join(dp, f)) for dp, _, fs in os.walk(runs["bf16"]) for f in fs}
    assert before == after


def test_a_run_from_before_a_model_option_existed_resumes(runs, demo_data, tmp_path):
    """run.json of an older run lacks the newer model options (attn_bias, clipped softmax):
    their defaults stand in, so it resumes; asking for the option on resume is another model."""
    old = tmp_path / "old"
    shutil.copytree(runs["bf16"], old)
    with open(old / "run.json") as f:
        run = json.load(f)
    run["model_args"] = {k: v for k, v in run["model_args"].items() if k not in ("attn_bias", "clipped_softmax_gamma", "clipped_softmax_zeta")}
    (old / "run.json").write_text(json.dumps(run))
    r = train(2, f"--out_dir={old}", f"--data_dir={demo_data}", "--init_from=resume", *RUN, check=False)
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stderr[-2000:]
    r = train(1, f"--out_dir={old}", f"--data_dir={demo_data}", "--init_from=resume", "--attn_bias=True", check=False)
    assert r.returncode == 2 and "another model (attn_bias: False -> True)" in r.stderr


def test_the_deepspeed_launcher_runs_it(demo_data, tmp_path):
    # the launcher adds --local_rank=N, which train.py must accept
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    r = subprocess.run([launcher, "--num_gpus=1", "train.py", "configs/tiny.py", f"--data_dir={demo_data}",
                        f"--out_dir={tmp_path}/ds", "--max_iters=2", "--eval_interval=2", "--ckpt_interval=2"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert [row["iter"] for row in metrics(f"{tmp_path}/ds") if "val_loss" in row] == [2]


def wait_for_iter(out_dir, it, proc, limit=300):
    deadline = time.time() + limit
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(f"{out_dir}/metrics.jsonl") and any(r.get("iter", 0) >= it for r in metrics(out_dir)):
            return
        time.sleep(0.1)
    raise AssertionError(f"{out_dir} never reached iteration {it}")


def worker_pids(launcher_pid):
    """{rank: pid} of torchrun's workers."""
    with open(f"/proc/{launcher_pid}/task/{launcher_pid}/children") as f:
        pids = [int(p) for p in f.read().split()]
    ranks = {}
    for pid in pids:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        ranks[int(env[b"RANK"])] = pid
    return ranks


def test_sigterm_stops_every_rank_with_a_checkpoint_and_resume_is_exact(runs, demo_data, tmp_path):
    out_dir = f"{tmp_path}/preempted"
    args = [f"--data_dir={demo_data}", f"--out_dir={out_dir}", *MODES["fp8_tweo"], *RUN]
    proc = subprocess.Popen(train_cmd(2, *args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_iter(out_dir, 3, proc)
    # the signal reaches one rank only (the ranks must agree), and a second one follows during the stop
    rank1 = worker_pids(proc.pid)[1]
    os.kill(rank1, signal.SIGTERM)
    time.sleep(0.5)
    os.kill(rank1, signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    (stop,) = [r for r in metrics(out_dir) if r.get("event") == "stop"]
    k = stop["iter"]
    assert 3 <= k < 8, "stopped before the first periodic checkpoint"
    assert f"stopped at iter {k}" in out
    with open(f"{out_dir}/ckpt/latest") as f:
        assert f.read() == f"iter_{k:07d}"
    assert max(r["iter"] for r in metrics(out_dir)) == k

    train(2, *args, "--init_from=resume")
    rows = metrics(out_dir)
    (resumed,) = [r for r in rows if r.get("event") == "resume"]
    assert resumed["iter"] == k
    after = {r["iter"]: r["loss"] for r in rows[rows.index(resumed):] if "loss" in r and "event" not in r}
    reference = losses(metrics(runs["fp8_tweo"]))
    assert sorted(after) == list(range(k + 1, 25))
    diffs = [abs(after[i] - reference[i]) for i in after]
    print(f"SIGTERM at iter {k}: max |loss - uninterrupted| over {len(after)} steps after resume = {max(diffs):.1e}")
    assert max(diffs) == 0.0, diffs


def fp8_state_sum(tag_dir):
    """The same fingerprint of the FP8 scaling state as train.py logs on resume, from a checkpoint's files."""
    model_states = sorted(f for f in os.listdir(tag_dir) if f.endswith("model_states.pt"))[0]
    module = torch.load(os.path.join(tag_dir, model_states), weights_only=False)["module"]
    return sum(v.double().sum().item() for k, v in module.items() if ".fp8_" in k and "saturated" not in k)


def test_resume_on_another_number_of_ranks(runs, demo_data, tmp_path):
    reference = losses(metrics(runs["fp8_tweo"]))  # 2 ranks, uninterrupted
    two, one = f"{tmp_path}/two", f"{tmp_path}/one"
    # 2 -> 1: the shared 2-rank run as it was after its iteration-16 checkpoint
    os.makedirs(f"{two}/ckpt")
    shutil.copy(f"{runs['fp8_tweo']}/run.json", two)
    shutil.copytree(f"{runs['fp8_tweo']}/ckpt/iter_0000016", f"{two}/ckpt/iter_0000016")
    with open(f"{two}/ckpt/latest", "w") as f:
        f.write("iter_0000016")
    # 1 -> 2: a 1-rank run to iteration 8
    train(1, f"--data_dir={demo_data}", f"--out_dir={one}", *MODES["fp8_tweo"], *RUN, "--max_iters=8")
    for out_dir, ranks, start in [(two, 1, 16), (one, 2, 8)]:
        tag = f"{out_dir}/ckpt/iter_{start:07d}"
        saved_fp8_state = fp8_state_sum(tag)
        r = train(ranks, f"--data_dir={demo_data}", f"--out_dir={out_dir}", *MODES["fp8_tweo"], *RUN, "--init_from=resume")
        assert f"converting it to a universal checkpoint: -m deepspeed.checkpoint.ds_to_universal --input_folder={tag}" in r.stdout
        rows = metrics(out_dir)
        (resumed,) = [row for row in rows if row.get("event") == "resume"]
        assert (resumed["iter"], resumed["saved_world_size"], resumed["world_size"]) == (start, 3 - ranks, ranks)
        assert resumed["fp8_state_sum"] == pytest.approx(saved_fp8_state, rel=1e-12)  # the FP8 scaling state came along
        after = {row["iter"]: row["loss"] for row in rows[rows.index(resumed):] if "loss" in row and "event" not in row}
        assert sorted(after) == list(range(start + 1, 25))
        worst = max(abs(after[i] - reference[i]) / reference[i] for i in after)
        print(f"{3 - ranks} -> {ranks} ranks at iter {start}: largest relative loss difference against "
              f"the uninterrupted 2-rank run over {len(after)} steps {worst:.2e}")
        assert worst < 2e-2  # the tolerance of the 1-vs-2-rank test


def test_a_run_stopped_before_its_first_checkpoint_restarts_in_place(runs, demo_data, tmp_path):
    out_dir = tmp_path / "early"
    out_dir.mkdir()
    shutil.copy(f"{runs['bf16']}/run.json", out_dir)  # what a run killed before its first checkpoint leaves
    (out_dir / "metrics.jsonl").write_text('{"iter": 1, "loss": 10.9}\n')
    args = [f"--data_dir={demo_data}", f"--out_dir={out_dir}", *MODES["bf16"], *RUN]
    r = train(1, *args, check=False)
    assert r.returncode == 2 and "already holds a run; continue it with --init_from=resume" in r.stderr
    train(1, *args, "--init_from=resume", "--max_iters=2", "--eval_interval=2", "--ckpt_interval=2")
    rows = metrics(out_dir)
    assert rows[0] == {"iter": 1, "loss": 10.9} and rows[1]["event"] == "resume" and rows[1]["iter"] == 0
    with open(out_dir / "ckpt" / "latest") as f:
        assert f.read() == "iter_0000002"


@contextlib.contextmanager
def tmpfs(path, size, readonly=False):
    """A small RAM filesystem at path; the test skips where mounting is impossible (not root, no mount)."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if readonly else ""), "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(r.stderr or r.stdout).strip()}): this test needs root and mount")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)])


def test_out_dir_on_a_read_only_filesystem_is_refused_before_any_work(demo_data, tmp_path):
    with tmpfs(tmp_path / "ro", "1m", readonly=True) as ro:
        r = train(1, f"--data_dir={demo_data}", f"--out_dir={ro}/run", check=False)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [
            f"error: out_dir='{ro}/run' must be a directory this user can write, or create"]


def test_a_full_disk_during_a_checkpoint_loses_nothing(demo_data, tmp_path):
    # a tiny-model checkpoint is ~40 MB and a model file ~6.5 MB: iteration 8's best and latest
    # (~93 MB) fit, iteration 16's best does not
    with tmpfs(tmp_path / "disk", "120m") as disk:
        out_dir = f"{disk}/run"
        args = [f"--data_dir={demo_data}", f"--out_dir={out_dir}", *MODES["bf16"], *RUN]
        r = train(1, *args, "--max_iters=16", check=False)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, r.stdout[-2000:] + r.stderr[-3000:]
        assert re.match(r"error: saving checkpoint (best_)?iter_0000016 failed .* MiB free", lines[0]), lines
        ckpt = f"{out_dir}/ckpt"
        assert open(f"{ckpt}/latest").read() == "iter_0000008" and open(f"{ckpt}/best").read() == "best_iter_0000008"
        assert sorted(d for d in os.listdir(ckpt) if os.path.isdir(f"{ckpt}/{d}")) == ["best_iter_0000008", "iter_0000008"]
        assert not [f for _, _, fs in os.walk(out_dir) for f in fs if f.endswith(".tmp")]
        for name in ("last", "best"):
            assert torch.load(f"{out_dir}/model_{name}.pt", weights_only=True)["iter"] == 8
        shutil.copytree(out_dir, f"{tmp_path}/copy")  # resumable, on a disk with room
    train(1, *args[:1], f"--out_dir={tmp_path}/copy", *args[2:], "--max_iters=9", "--init_from=resume")
    assert [r["iter"] for r in metrics(f"{tmp_path}/copy") if r.get("event") == "resume"] == [8]


def test_init_from_a_hugging_face_directory_starts_from_its_weights(hf_gpt2, demo_data, tmp_path):
    from model import hf_gpt2_state
    out_dir = tmp_path / "from_hf"
    r = train(1, f"--data_dir={demo_data}", f"--out_dir={out_dir}", "--init_from=/nonexistent", check=False)
    assert r.returncode == 2 and "a Hugging Face GPT-2 directory" in r.stderr and not out_dir.exists()
    # learning rate 0: the checkpoint after one step holds the Hugging Face weights, in our layout and bf16
    train(1, f"--data_dir={demo_data}", f"--out_dir={out_dir}", f"--init_from={hf_gpt2[0]}", "--max_iters=1",
          "--learning_rate=0.0", "--min_lr=0.0", "--warmup_iters=0", "--lr_decay_iters=1", "--eval_interval=1",
          "--ckpt_interval=1", "--log_interval=1")
    saved = torch.load(out_dir / "model_last.pt", weights_only=True)
    assert {k: saved["model_args"][k] for k in ("n_layer", "n_head", "n_embd", "vocab_size")} == \
        dict(n_layer=2, n_head=4, n_embd=32, vocab_size=50304)  # configs/tiny.py's 2 x 64 (2 heads) gave way
    state, _, _ = hf_gpt2_state(hf_gpt2[0], 50304, 64)
    for k, v in state.items():
        assert torch.equal(saved["model"][k], v.bfloat16()), k


def test_torch_fp8_backend_two_rank_zero3_matches_the_emulation(runs, demo_data, tmp_path):
    """--fp8_backend=torch (real FP8 GEMMs through torch._scaled_mm) under 2-rank ZeRO-3 trains
    along the emulated backend's loss curve: same scaling state, same FP8 operands."""
    out_dir = str(tmp_path / "torch_fp8")
    train(2, f"--data_dir={demo_data}", f"--out_dir={out_dir}", "--precision=fp8", "--fp8_backend=torch", *RUN)
    rows = metrics(out_dir)
    real, emulated = losses(rows), losses(metrics(runs["fp8"]))
    assert real.keys() == emulated.keys() == set(range(1, 25))
    worst = max(abs(real[i] / emulated[i] - 1) for i in real)
    print(f"torch vs emulated FP8, 24 steps: worst relative loss difference {worst:.2e}")
    assert worst < 1e-2
    last = [r for r in rows if "loss" in r][-1]
    assert last["fp8_amax"]["lm_head"]["grad_output"] > 0
    model_file = torch.load(os.path.join(out_dir, "model_last.pt"), weights_only=True)
    assert model_file["config"]["fp8_backend"] == "torch" and "lm_head.fp8_scale" in model_file["model"]


def test_fp8_shape_rules_are_checked_before_any_work(demo_data, tmp_path):
    for args, message in [(["--n_embd=72"], "multiples of 16"), (["--vocab_size=50264"], "multiples of 16")]:
        out_dir = tmp_path / "run"
        r = train(1, f"--out_dir={out_dir}", f"--data_dir={demo_data}", "--precision=fp8", *args, check=False)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr
        assert not out_dir.exists()


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
