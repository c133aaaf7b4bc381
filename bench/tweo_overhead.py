"""
TWEO's own cost: training-step time and peak memory with lambda = 0.01 against lambda = 0,
on a 12-layer GPT, in one process. The two models (same initial weights) are timed in
alternation, A B A B ..., so that drift in the machine's speed hits both; the ratio of each
round, B / A, is summarised by its median and spread. The paper reports +1-2% time and the
same VRAM (supplementary Table 10).

    python bench/tweo_overhead.py                       # CPU: 12 layers x 384, 4 x 256 tokens
    python bench/tweo_overhead.py configs/gpt2_124m_bf16.py --micro_batch_size=8   # a GPU: GPT-2 124M
    python bench/tweo_overhead.py --precision=fp8 --rounds=11 --steps=5

The last two lines are `time ratio: R (target <= T)` and `memory ratio: R (target <= 1.01)`,
T = 1.02 on CPU and 1.01 on a GPU. Measurement helpers: bench/throughput.py.
"""
import statistics
import sys

import torch

from bench.throughput import describe, make_step, model_config, peak_bytes, seconds_per_step
from configurator import fail, progress_bar

MEMORY_TARGET = 1.01


def main(argv):
    defaults = dict(n_layer=12, n_head=6, n_embd=384, block_size=256, vocab_size=50304, micro_batch_size=4,
                    activation_checkpointing=False, precision="bf16", fp8_backend="auto", rounds=9, steps=3, warmup=2,
                    device="cuda" if torch.cuda.is_available() else "cpu")
    cfg = model_config(defaults, argv)
    if cfg["precision"] not in ("bf16", "fp8"):
        fail(f"--precision must be bf16 or fp8, got {cfg['precision']!r}")
    if cfg["rounds"] < 1 or cfg["steps"] < 1:
        fail("--rounds and --steps must be at least 1")
    if cfg["cpu_gemm"] not in ("auto", "native", "fp32"):
        fail(f"--cpu_gemm must be auto, native or fp32, got {cfg['cpu_gemm']!r}")
    device = torch.device(cfg["device"])
    time_target = 1.01 if device.type == "cuda" else 1.02
    a_mode, b_mode = cfg["precision"], cfg["precision"] + "_tweo"
    print(f"model: {describe(cfg, device)}, {cfg['precision']}; A: lambda = 0, B: lambda = 0.01; "
          f"{cfg['rounds']} rounds of {cfg['steps']} steps each, A B A B ...")
    step_a, backend, model_a, optimizer_a = make_step(cfg, a_mode, device, cfg["cpu_gemm"])
    step_b, _, model_b, optimizer_b = make_step(cfg, b_mode, device, cfg["cpu_gemm"])
    print(f"GEMM path: {backend.cpu_gemm} ({backend.cpu_gemm_why})")
    for _ in range(cfg["warmup"]):
        step_a()
        step_b()
    times = {"A": [], "B": []}
    for _ in progress_bar(range(cfg["rounds"]), desc="rounds", leave=False):
        times["A"].append(seconds_per_step(step_a, cfg["steps"], device))
        times["B"].append(seconds_per_step(step_b, cfg["steps"], device))
    ratios = sorted(tb / ta for ta, tb in zip(times["A"], times["B"]))
    memory = {"A": peak_bytes(step_a, model_a, optimizer_a, device), "B": peak_bytes(step_b, model_b, optimizer_b, device)}
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    print(f"step time: A {statistics.median(times['A']):.4f} s, B {statistics.median(times['B']):.4f} s (medians)")
    print(f"per-round time ratios B/A: median {median:.4f}, interquartile {q1:.4f}..{q3:.4f}, "
          f"range {ratios[0]:.4f}..{ratios[-1]:.4f}")
    print(f"peak memory: A {memory['A'] / 2**30:.4f} GB, B {memory['B'] / 2**30:.4f} GB "
          f"(parameters, optimizer state and the highest point of a step)")
    print(f"time ratio: {median:.4f} (target <= {time_target})")
    print(f"memory ratio: {memory['B'] / memory['A']:.4f} (target <= {MEMORY_TARGET})")
    return {"time_ratio": median, "time_ratio_iqr": (q1, q3), "time_ratios": ratios, "time_target": time_target,
            "memory_ratio": memory["B"] / memory["A"], "memory_target": MEMORY_TARGET}


if __name__ == "__main__":
    main(sys.argv[1:])
