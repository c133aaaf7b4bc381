"""bench/eval.py: val loss/PPL comparable with train.py's, and exact outlier statistics."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, metrics, train


def run_eval(*args):
    r = subprocess.run([sys.executable, "bench/eval.py", *args, "--json"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["bf16", "fp8_tweo"])
def test_ppl_matches_the_val_loss_train_logged(runs, mode):
    logged = {r["iter"]: r["val_loss"] for r in metrics(runs[mode]) if "val_loss" in r}
    for ckpt, it in [("last", 24), ("best", 24)]:
        result = run_eval(f"--out_dir={runs[mode]}", f"--ckpt={ckpt}")
        assert result["iter"] == it and result["precision"] == ("fp8" if "fp8" in mode else "bf16")
        assert result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]), rel=1e-12)
        print(f"{mode} {ckpt}: eval {result['val_loss']:.6f}, train logged {logged[it]:.6f}")
        assert abs(result["val_loss"] - logged[it]) < 1e-3
        assert len(result["layers"]) == 2 and {"block", "ffn"} == set(result["layers"][0])


def test_outlier_statistics_match_a_direct_computation(runs, tmp_path):
    # a hand-made model: the trained tiny model with one planted outlier direction
    run = tmp_path / "hand"
    run.mkdir()
    shutil.copy(os.path.join(runs["bf16"], "run.json"), run / "run.json")
    saved = torch.load(os.path.join(runs["bf16"], "model_last.pt"), weights_only=True)
    saved["model"]["transformer.h.1.mlp.c_proj.bias"][7] = 40.0
    torch.save(saved, run / "model_last.pt")
    result = run_eval(f"--out_dir={run}", "--eval_iters=1")

    from model import load_trained
    import data as D
    cfg = json.load(open(run / "run.json"))["config"]
    model, _ = load_trained(str(run), "last")
    val = D.open_split(cfg["data_dir"], "val", cfg["block_size"])
    offsets = D.val_offsets(cfg["micro_batch_size"], len(val), cfg["block_size"])
    x, _ = D.get_batch(val, offsets, cfg["block_size"], torch.device("cpu"))
    outs = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, k=k: outs.__setitem__(k, o.detach().double().numpy()))
             for k, m in [("block1", model.transformer.h[1]), ("ffn1", model.transformer.h[1].mlp)]]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    for h in hooks:
        h.remove()
    for key, kind in [("block1", "block"), ("ffn1", "ffn")]:
        v = outs[key].ravel()
        a = np.sort(np.abs(v))[::-1]
        c = v - v.mean()
        direct = {"top1": a[0], "top2": a[1], "top3": a[2], "median": np.median(np.abs(v)), "max": a[0],
                  "mean_abs": np.abs(v).mean(), "kurtosis": (c ** 4).mean() / (c ** 2).mean() ** 2, "inf_norm": a[0]}
        got = result["layers"][1][kind]
        for k, want in direct.items():
            assert got[k] == pytest.approx(want, rel=1e-6), (kind, k)
    assert result["layers"][1]["ffn"]["top1"] >= 39  # the planted outlier is seen
    assert result["layers"][1]["ffn"]["kurtosis"] > 10 * result["layers"][0]["ffn"]["kurtosis"]


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("mode", ["bf16", "fp8"])
def test_a_transform_is_evaluated_and_the_original_is_untouched(runs, mode):
    import copy

    import data as D
    from bench.eval import evaluate
    from model import load_trained
    from precision import make_backend
    cfg = json.load(open(os.path.join(runs[mode], "run.json")))["config"]
    backend = make_backend(cfg["precision"], "emulated")
    model, _ = load_trained(runs[mode], "last", backend=backend)
    val = D.open_split(cfg["data_dir"], "val", cfg["block_size"])
    offsets = D.val_offsets(16, len(val), cfg["block_size"])
    before = state_of(model)  # weights and, in FP8, the scaling state (amax histories, scales)

    def zero_head(m):  # the tied LM head (and with it wte) at zero: every logit is exactly 0
        m = copy.deepcopy(m)
        with torch.no_grad():
            m.lm_head.weight.zero_()
        return m
    plain = evaluate(model, val, offsets, cfg["block_size"], 8, backend, stats=False)
    copied = evaluate(model, val, offsets, cfg["block_size"], 8, backend, transform=copy.deepcopy, stats=False)
    zeroed = evaluate(model, val, offsets, cfg["block_size"], 8, backend, transform=zero_head)
    # uniform over the padded vocabulary: the loss is ln V whatever the text
    assert zeroed["val_loss"] == pytest.approx(math.log(cfg["vocab_size"]), rel=1e-6) and "layers" in zeroed
    assert plain["val_loss"] < math.log(cfg["vocab_size"]) - 1  # a trained model is far from uniform
    assert copied["val_loss"] == plain["val_loss"]  # a copy evaluates bit for bit like the original
    after = model.state_dict()
    assert before.keys() == after.keys() and (mode == "bf16" or any(".fp8_" in k for k in after))
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


def test_best_and_last_are_different_checkpoints_when_the_last_evaluation_is_worse(demo_data, tmp_path):
    # a high constant learning rate: the val loss at iteration 5 is worse than at 4, so
    # ckpt/best (and model_best.pt) stay at 4 while model_last.pt moves on to 5
    out_dir = str(tmp_path / "run")
    train(1, f"--data_dir={demo_data}", f"--out_dir={out_dir}", "--max_iters=5", "--eval_interval=4",
          "--ckpt_interval=4", "--log_interval=1", "--warmup_iters=1", "--lr_decay_iters=5", "--learning_rate=0.05",
          "--min_lr=0.05", "--eval_windows=8", "--collapse_factor=100")
    logged = {r["iter"]: r["val_loss"] for r in metrics(out_dir) if "val_loss" in r}
    assert list(logged) == [4, 5] and logged[5] > logged[4] + 0.02, logged  # the premise of this test
    best, last = run_eval(f"--out_dir={out_dir}", "--ckpt=best"), run_eval(f"--out_dir={out_dir}", "--ckpt=last")
    assert (best["iter"], best["ckpt"], last["iter"], last["ckpt"]) == (4, "best", 5, "last")
    assert abs(best["val_loss"] - logged[4]) < 1e-3 and abs(last["val_loss"] - logged[5]) < 1e-3


PADDED_EVAL = """
import json, os, sys
import torch, torch.distributed as dist
import data as D
from model import GPT, GPTConfig
from precision import make_backend
data_dir, n_windows, micro, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
backend = make_backend("bf16")
model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=50304), backend).eval()
val = D.open_split(data_dir, "val", 64)
offsets = D.val_offsets(n_windows, len(val), 64)
autocast, cpu = lambda: backend.autocast(model), torch.device("cpu")
loss = D.evaluate(model, val, offsets, 64, micro, cpu, autocast, rank, world, dist.all_reduce)
each = [D.evaluate(model, val, offsets[i:i + 1], 64, 1, cpu, autocast) for i in range(n_windows)] if world == 1 else None
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:  # one file per rank: printed lines can interleave
    json.dump({"rank": rank, "loss": loss, "each": each}, f)
dist.destroy_process_group()
"""


def test_padded_windows_on_two_ranks_equal_one_rank(demo_data, tmp_path):
    # 10 windows in micro-batches of 4: one rank pads its third batch with 2 weight-0 windows,
    # two ranks (5 windows each) pad their second batch with 3 each
    n_windows = 10
    script = tmp_path / "padded_eval.py"
    script.write_text(PADDED_EVAL)
    out = {}
    for nproc in (1, 2):
        results = tmp_path / f"ranks{nproc}"
        results.mkdir()
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                            str(script), demo_data, str(n_windows), "4", str(results)], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        rows = [json.loads((results / f"rank{i}.json").read_text()) for i in range(nproc)]
        assert len({x["loss"] for x in rows}) == 1  # every rank has the all-reduced loss
        out[nproc] = rows[0]
    assert out[2]["loss"] == pytest.approx(out[1]["loss"], abs=1e-12, rel=0)
    # the reference: the mean of the 10 windows' losses, evaluated one window at a time
    each = out[1]["each"]
    assert out[1]["loss"] == pytest.approx(sum(each) / n_windows, abs=1e-5)
    # the padding (copies of window 0) counted with weight 1 would move the mean by far more than 1e-12
    for pads in (2, 6):
        assert abs((sum(each) + pads * each[0]) / (n_windows + pads) - out[1]["loss"]) > 1e-6


@pytest.mark.parametrize("case", ["precision", "truncated shard", "foreign run.json"])
def test_bad_input_is_one_line_naming_the_file(runs, tmp_path, case):
    run = tmp_path / "run"
    if case == "precision":
        args, message = [f"--out_dir={runs['bf16']}", "--precision=FP8"], "precision='FP8' must be one of '', 'bf16', 'fp8'"
    elif case == "truncated shard":  # straight from the ZeRO-3 shards, one of them cut short
        shutil.copytree(runs["bf16"], run, ignore=shutil.ignore_patterns("wandb"))
        shard = run / "ckpt" / "iter_0000024" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
        shard.write_bytes(shard.read_bytes()[:1000])
        args, message = [f"--out_dir={run}", "--ckpt=iter_0000024"], f"{run}/ckpt/iter_0000024 is not a readable DeepSpeed checkpoint"
    else:
        run.mkdir()
        (run / "run.json").write_text('{"config": {"precision": "bf16"}}')
        args, message = [f"--out_dir={run}"], f"{run}/run.json is not a run.json written by train.py (KeyError"
    r = subprocess.run([sys.executable, "bench/eval.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), r.stderr


def test_a_hugging_face_gpt2_is_evaluated_on_a_data_dir(hf_gpt2, demo_data):
    import data as D
    hf_dir, hf = hf_gpt2
    result = run_eval(f"--hf={hf_dir}", f"--data_dir={demo_data}", "--eval_iters=2")
    # the windows: train.py's defaults (seed 1337, 2 x 8 windows) of the model's 64 positions
    val = D.open_split(demo_data, "val", 64)
    x, y = D.get_batch(val, D.val_offsets(16, len(val), 64), 64, torch.device("cpu"))
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(hf(x).logits.transpose(1, 2), y)
    assert result["windows"] == 16 and result["out_dir"] == hf_dir
    assert result["val_loss"] == pytest.approx(want.item(), rel=2e-3)  # ours runs in bf16, transformers in fp32
    for args, message in [([f"--hf={hf_dir}"], "--hf needs --data_dir"),
                          ([f"--hf={hf_dir}", "--out_dir=x", f"--data_dir={demo_data}"], "not both")]:
        r = subprocess.run([sys.executable, "bench/eval.py", *args], cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
