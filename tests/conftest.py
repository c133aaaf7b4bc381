"""Shared test helpers: real training runs of configs/tiny.py
(on the demo corpus) that several test files check."""
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODES = {"bf16": ["--precision=bf16"], "fp8": ["--precision=fp8", "--fp8_backend=emulated"],
         "fp8_tweo": ["--precision=fp8", "--fp8_backend=emulated", "--tweo_lambda=0.01"]}
RUN = ["--max_iters=24", "--log_interval=1", "--eval_interval=8", "--ckpt_interval=8", "--act_stats_interval=12",
       "--warmup_iters=4", "--lr_decay_iters=24"]
# short runs (a few iterations) that test the run's machinery rather than its numerics skip torch.compile,
# ~4 s per process in FP8 or with TWEO: the compiled pieces equal the eager ones (test_model.py,
# test_precision.py), and the runs the numerics tests compare keep the default, compile=True. Over 24
# FP8 iterations compiling pays for itself (measured on the Xeon limited to AVX2: 18.6 s compiled,
# 23.8 s eager), so longer runs keep it
EAGER = ["--compile=False"]
TRAIN_KEYS = {"iter", "loss", "tweo_loss", "lr", "tweo_lambda", "grad_norm", "act_peak", "act_max_per_layer",
              "iter_per_hour", "tokens_per_sec", "mem_peak_gb"}


def train_cmd(nproc, *args):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return (launcher if nproc > 1 else [sys.executable]) + ["train.py", "configs/tiny.py", *args]


def train(nproc, *args, check=True, env=None):
    r = subprocess.run(train_cmd(nproc, *args), cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"train.py failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def _injecting(**variables):
    path = os.pathsep.join(p for p in (os.path.join(REPO, "tests", "fixtures", "inject_nan"), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, **variables)


def nan_at(iteration, micro_steps=2):
    """The environment of a train.py run whose task loss is NaN in the first micro-step of
    `iteration` (configs/tiny.py on 1 rank: 2 micro-steps an iteration): tests/fixtures/inject_nan/sitecustomize.py."""
    return _injecting(INJECT_NAN_FORWARD=str(iteration * micro_steps + 1))


def spike_at(iteration, iterations, micro_steps=2):
    """The environment of a train.py run whose task loss is 100 times larger in every micro-step of
    `iterations` iterations from `iteration` (counted from 0, as nan_at's)."""
    return _injecting(INJECT_SPIKE_FORWARDS=f"{iteration * micro_steps + 1}-{(iteration + iterations) * micro_steps}")


def refused(capsys, main, *args):
    """The one stderr line of a script's main(args) that must stop on bad input (exit status 2)."""
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out, err = capsys.readouterr()
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), (out, err)
    return err


def strict_json(line):
    """json.loads that refuses the bare NaN / Infinity / -Infinity which Python writes and strict JSON readers reject."""
    def refuse(name):
        raise ValueError(f"not JSON: bare {name}")
    return json.loads(line, parse_constant=refuse)


def metrics(out_dir):
    """The rows of a run's metrics.jsonl, which must be strict JSON."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [strict_json(line) for line in f]


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
def demo_compact_data(tmp_path_factory):
    """The demo corpus on its compact vocabulary (5,171 ids, vocab_size 5184): configs/tiny.py with an
    LM head 10x smaller, for runs that must also be affordable on slow bf16 kernels."""
    d = tmp_path_factory.mktemp("data") / "demo_compact"
    subprocess.run([sys.executable, "prepare_openwebtext.py", "--demo", "--compact_vocab", f"--out_dir={d}"], cwd=REPO,
                   check=True, capture_output=True)
    return str(d)


@pytest.fixture(scope="session")
def collapsed_run(demo_data, tmp_path_factory):
    """A 1-rank FP8 run of the `runs` schedule whose loss is made NaN at iteration 10: it
    collapses at iter 11, after one evaluation (iter 8)."""
    out_dir = str(tmp_path_factory.mktemp("collapsed") / "run")
    train(1, f"--data_dir={demo_data}", f"--out_dir={out_dir}", *MODES["fp8"], *RUN, env=nan_at(10))
    return out_dir


def write_run(out_dir, rows, world_size=1, model_args=None, **config):
    """A hand-written run (run.json + metrics.jsonl), for tests with known answers: the model
    of configs/tiny.py unless model_args says otherwise; config overrides run.json's config."""
    model_args = dict(dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=50304, dropout=0.0, bias=True,
                           tweo_tau=3.0, tweo_p=4.0, activation_checkpointing=False), **(model_args or {}))
    cfg = dict(model_args, out_dir=str(out_dir), data_dir="data/demo", precision="bf16", fp8_backend="emulated",
               fp8_recipe="delayed", fp8_amax_history_len=16, fp8_amax_compute_algo="max", eval_windows=32,
               tweo_lambda=0.0, tweo_tau=3.0, tweo_p=4.0, tweo_schedule="constant", total_batch_tokens=1024,
               micro_batch_size=8, max_iters=20, learning_rate=3e-3, min_lr=3e-4, warmup_iters=5, lr_decay_iters=20,
               weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0, seed=1337)
    cfg.update(config)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "run.json"), "w") as f:
        json.dump({"config": cfg, "model_args": model_args, "world_size": world_size}, f)
    with open(os.path.join(out_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(out_dir)


def train_row(it, iter_time_s, act_peak=1.0, mem_peak_gb=1.0):
    return {"iter": it, "loss": 5.0, "act_peak": act_peak, "act_max_per_layer": [act_peak / 2, act_peak],
            "iter_time_s": iter_time_s, "iter_per_hour": 3600 / iter_time_s, "mem_peak_gb": mem_peak_gb}


def eval_row(it, ppl):
    return {"iter": it, "val_loss": math.log(ppl), "val_ppl": ppl}


@pytest.fixture(scope="session")
def hf_gpt2(tmp_path_factory):
    """A small randomly initialised GPT2LMHeadModel saved by transformers itself (safetensors),
    with GPT-2's vocabulary so that it reads the demo corpus: (directory, the model)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4)).eval()
    d = tmp_path_factory.mktemp("hf") / "gpt2_tiny"
    hf.save_pretrained(d)
    return str(d), hf




@pytest.fixture(scope="session")
def stdlib_data(tmp_path_factory):
    """The standard library corpus with its compact vocabulary, as configs/sizes/mini.py expects it."""
    d = tmp_path_factory.mktemp("data") / "stdlib"
    subprocess.run([sys.executable, "prepare_openwebtext.py", "--stdlib", "--compact_vocab", f"--out_dir={d}",
                    "--num_proc=1"], cwd=REPO, check=True, capture_output=True)
    return str(d)


def compact_run(tmp_path, data_dir):
    """A random GPT on the demo's compact vocabulary (5,171 ids in 5184), without biases, in train.py's files:
    (out_dir, the corpus's meta.json)."""
    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=meta["vocab_map"]["model_vocab_size"],
                bias=False, dropout=0.0)
    import torch
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args))
    with torch.no_grad():  # far from init's ones and zeros, which would hide a swapped LayerNorm
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + name.endswith("layer_norm_weight"))
    out_dir = write_run(tmp_path / "compact", [], model_args=args, data_dir=data_dir)
    torch.save({"model": model.state_dict(), "model_args": args, "config": {}}, os.path.join(out_dir, "model_last.pt"))
    return out_dir, meta
