"""bench/tweo_overhead.py: TWEO's step-time and memory ratios, with their targets, of steps of
known cost; and its B step computes the TWEO term."""
import copy
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import bench.tweo_overhead as tweo_overhead
from bench.throughput import make_step
from conftest import REPO


def test_prints_both_ratios_and_targets_last():
    r = subprocess.run([sys.executable, "bench/tweo_overhead.py", "--n_head=2", "--n_embd=32", "--block_size=32",
                        "--vocab_size=512", "--micro_batch_size=2", "--rounds=3", "--steps=1", "--warmup=1",
                        "--device=cpu"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("model: 12 layers x 32") and lines[1].startswith("GEMM path: ")
    time_line = re.fullmatch(r"time ratio: (\d+\.\d+) \(target <= 1\.02\)", lines[-2])
    memory_line = re.fullmatch(r"memory ratio: (\d+\.\d+) \(target <= 1\.01\)", lines[-1])
    assert time_line and memory_line, lines[-2:]
    # the printed time ratio is the median of the per-round ratios, inside their printed range
    spread = re.search(r"median (\d+\.\d+), interquartile (\d+\.\d+)\.\.(\d+\.\d+), range (\d+\.\d+)\.\.(\d+\.\d+)", r.stdout)
    median, q1, q3, low, high = map(float, spread.groups())
    assert float(time_line.group(1)) == median and low <= q1 <= median <= q3 <= high
    assert 0.5 < float(memory_line.group(1)) < 2


def test_bad_input_is_one_line_and_exit_2():
    for arg, key in (("--precision=fp16", "precision"), ("--cpu_gemm=both", "cpu_gemm")):
        r = subprocess.run([sys.executable, "bench/tweo_overhead.py", arg], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and key in r.stderr


def test_the_tweo_step_adds_exactly_the_penalty_gradient():
    """B's step (bf16_tweo) against A's (bf16), same initial weights and batch: B's gradients are
    A's plus lambda x the gradient of mean over blocks of mean((|A_l| / tau)^4), computed here by
    autograd on block outputs hooked out of a third copy. The position embeddings are made x1000
    first, so that the block outputs reach past tau and the penalty's gradient is not lost under
    bf16 rounding (at init it is ~1e-9 of the loss's: B's gradients would equal A's)."""
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=512, micro_batch_size=2,
               activation_checkpointing=False, fp8_backend="auto", compile=False)
    step_a, backend, model_a, _ = make_step(cfg, "bf16", torch.device("cpu"))
    step_b, _, model_b, _ = make_step(cfg, "bf16_tweo", torch.device("cpu"))
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))
    with torch.no_grad():
        for m in (model_a, model_b):
            m.transformer.wpe.weight.mul_(1000)
    reference = copy.deepcopy(model_a)
    batches = []
    hooks = [m.register_forward_pre_hook(lambda m, args: batches.append(args)) for m in (model_a, model_b)]
    step_a.micro_batch()
    step_b.micro_batch()
    for h in hooks:
        h.remove()
    (x, y), (x_b, y_b) = batches
    assert torch.equal(x, x_b) and torch.equal(y, y_b)
    outputs = []
    hooks = [block.register_forward_hook(lambda m, a, out: outputs.append(out)) for block in reference.transformer.h]
    with backend.autocast(reference):
        reference(x, y)
    penalty = sum((out.float().abs() / (3.0 + 1e-6)).pow(4).mean() for out in outputs) / len(outputs)
    (0.01 * penalty).backward()

    def grads(model):
        return torch.cat([(p.grad.float() if p.grad is not None else torch.zeros(p.shape)).flatten() for p in model.parameters()])
    added, want = grads(model_b) - grads(model_a), grads(reference)
    assert penalty.item() > 1 and want.norm() > grads(model_a).norm()
    assert (added - want).norm() < 0.01 * want.norm()  # bf16 rounding of B's and A's gradients
    assert (added - 2 * want).norm() > 0.5 * want.norm()  # twice lambda: not it


def test_it_times_and_weighs_the_tweo_step_against_the_plain_one(monkeypatch, capsys):
    """main with make_step replaced by steps of known cost: A sleeps 40 ms and holds 4 MiB at
    its highest point, B 60 ms and 6 MiB; with --precision=fp8, A and B are the FP8 steps."""
    made = []

    def known_step(cfg, mode, device, cpu_gemm):
        made.append(mode)
        seconds, mib = {"": (0.04, 4), "_tweo": (0.06, 6)}[mode.removeprefix(cfg["precision"])]
        model = torch.nn.Linear(8, 8)

        def step():
            time.sleep(seconds)
            held = torch.empty(mib * 2 ** 18)  # mib MiB of fp32
            del held
        return step, SimpleNamespace(cpu_gemm="native", cpu_gemm_why="test"), model, torch.optim.SGD(model.parameters())
    monkeypatch.setattr(tweo_overhead, "make_step", known_step)
    result = tweo_overhead.main(["--rounds=3", "--steps=2", "--warmup=1", "--device=cpu"])
    out = capsys.readouterr().out
    resident = 4 * (8 * 8 + 8)
    assert made == ["bf16", "bf16_tweo"] and result["time_ratio"] == pytest.approx(1.5, rel=0.1)
    assert result["memory_ratio"] == pytest.approx((resident + 6 * 2 ** 20) / (resident + 4 * 2 ** 20), rel=1e-3)
    a, b = map(float, re.search(r"step time: A (\S+) s, B (\S+) s", out).groups())
    assert 0.04 <= a < 0.06 and 0.06 <= b < 0.08 and f"time ratio: {result['time_ratio']:.4f} (target <= 1.02)" in out
    tweo_overhead.main(["--precision=fp8", "--rounds=1", "--steps=1", "--warmup=0", "--device=cpu"])
    assert made[2:] == ["fp8", "fp8_tweo"]
