"""Shared test helpers: the repository on sys.path, and real training runs of configs/tiny.py
(on the demo corpus) that several test files check."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODES = {"bf16": ["--precision=bf16"], "fp8": ["--precision=fp8", "--fp8_backend=emulated"],
         "fp8_tweo": ["--precision=fp8", "--fp8_backend=emulated", "--tweo_lambda=0.01"]}
RUN = ["--max_iters=24", "--log_interval=1", "--eval_interval=8", "--ckpt_interval=8", "--act_stats_interval=12",
       "--warmup_iters=4", "--lr_decay_iters=24"]
TRAIN_KEYS = {"iter", "loss", "tweo_loss", "lr", "tweo_lambda", "grad_norm", "act_peak", "act_max_per_layer",
              "iter_per_hour", "tokens_per_sec", "mem_peak_gb"}


def train_cmd(nproc, *args):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return (launcher if nproc > 1 else [sys.executable]) + ["train.py", "configs/tiny.py", *args]


def train(nproc, *args, check=True):
    r = subprocess.run(train_cmd(nproc, *args), cwd=REPO, capture_output=True, text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"train.py failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(rows):
    """iter -> training loss; a resumed run's later lines win."""
    return {r["iter"]: r["loss"] for r in rows if "loss" in r and "event" not in r}


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "demo"
    subprocess.run([sys.executable, "prepare_openwebtext.py", "--demo", f"--out_dir={d}"], cwd=REPO, check=True,
                   capture_output=True)
    return str(d)


@pytest.fixture(scope="session")
def runs(demo_data, tmp_path_factory):
    """2-rank ZeRO-3 runs of the three modes, shared by several tests (fp8 also logs to an offline wandb)."""
    out = {}
    for mode, flags in MODES.items():
        out_dir = str(tmp_path_factory.mktemp(mode) / "run")
        telemetry = ["--wandb_log=True", "--wandb_mode=offline"] if mode == "fp8" else []
        train(2, f"--data_dir={demo_data}", f"--out_dir={out_dir}", *flags, *RUN, *telemetry)
        out[mode] = out_dir
    return out




@pytest.fixture(scope="session")
def stdlib_data(tmp_path_factory):
    """The standard library corpus with its compact vocabulary, as configs/sizes/mini.py expects it."""
    d = tmp_path_factory.mktemp("data") / "stdlib"
    subprocess.run([sys.executable, "prepare_openwebtext.py", "--stdlib", "--compact_vocab", f"--out_dir={d}",
                    "--num_proc=1"], cwd=REPO, check=True, capture_output=True)
    return str(d)
