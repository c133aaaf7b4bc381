"""
Side-by-side cost of the four modes on one model, in one process: iterations per hour and
peak memory of BF16, BF16+TWEO, FP8 and FP8+TWEO training steps (forward, backward, AdamW),
as ratios against BF16. This is Table 10's comparison without the DeepSpeed engine around
it; for whole-run numbers use bench/compare_runs.py on train.py runs.

    python bench/throughput.py                                    # tiny model, CPU
    python bench/throughput.py configs/gpt2_xl_fp8.py --micro_batch_size=4 --iters=20   # on a GPU

On CPU, FP8 is emulated: its numbers show the emulation's cost, not FP8's speed-up
(that needs Transformer Engine on an FP8 GPU). TWEO's overhead is meaningful anywhere.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from configurator import configure_or_exit  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from precision import make_backend  # noqa: E402

MODES = {"bf16": ("bf16", 0.0), "bf16_tweo": ("bf16", 0.01), "fp8": ("fp8", 0.0), "fp8_tweo": ("fp8", 0.01)}


def cpu_peak_bytes(fn):
    """Peak of live CPU tensor memory while fn runs, from the profiler's allocation events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def measure(cfg, mode, device):
    precision, tweo_lambda = MODES[mode]
    backend = make_backend(precision, cfg["fp8_backend"], "delayed", 16, "max", device.type)
    torch.manual_seed(0)
    args = {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "activation_checkpointing")}
    model = GPT(GPTConfig(**args), backend).to(device=device, dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 50257, (cfg["micro_batch_size"], cfg["block_size"]), device=device)

    def step():
        with backend.autocast(model):
            out = model(x, x, with_tweo=tweo_lambda > 0)
        (out.loss + tweo_lambda * out.tweo_loss if tweo_lambda > 0 else out.loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(cfg["warmup"]):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(cfg["iters"]):
        step()
    sync()
    dt = (time.perf_counter() - t) / cfg["iters"]
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else cpu_peak_bytes(step)
    return {"mode": mode, "backend": backend.name, "s_per_iter": dt, "iter_per_hour": 3600 / dt, "peak_gb": peak / 2**30}


def main(argv):
    defaults = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=50304, micro_batch_size=4,
                    activation_checkpointing=False, iters=5, warmup=2, fp8_backend="auto",
                    modes="bf16,bf16_tweo,fp8,fp8_tweo", device="cuda" if torch.cuda.is_available() else "cpu")
    # a train.py config file may be given for its model size; its other keys are ignored here
    known = {**defaults, **{k: v for k, v in _train_keys().items() if k not in defaults}}
    cfg = configure_or_exit(known, argv)
    device = torch.device(cfg["device"])
    modes = cfg["modes"].split(",")
    if not set(modes) <= MODES.keys():
        sys.exit(f"error: --modes takes a comma-separated subset of {', '.join(MODES)}")
    print(f"model: {cfg['n_layer']} layers x {cfg['n_embd']}, {cfg['micro_batch_size']} x {cfg['block_size']} tokens, {device}")
    results = [measure(cfg, m, device) for m in modes]
    base = results[0]
    print(f"{'mode':<10} {'backend':<9} {'s/iter':>8} {'iter/h':>9} {'vs ' + base['mode']:>10} {'peak GB':>8} {'vs ' + base['mode']:>10}")
    for r in results:
        print(f"{r['mode']:<10} {r['backend']:<9} {r['s_per_iter']:>8.3f} {r['iter_per_hour']:>9.0f} "
              f"{100 * (r['iter_per_hour'] / base['iter_per_hour'] - 1):>+9.1f}% {r['peak_gb']:>8.3f} "
              f"{100 * (r['peak_gb'] / base['peak_gb'] - 1):>+9.1f}%")
    return results


def _train_keys():
    """Keys a train.py config may set, with placeholder values of the right type."""
    return dict(out_dir="", data_dir="", wandb_run_name="", total_batch_tokens=0, learning_rate=0.0, min_lr=0.0,
                precision="", tweo_lambda=0.0, max_iters=0, warmup_iters=0, lr_decay_iters=0, eval_interval=0,
                eval_iters=0, log_interval=0, act_stats_interval=0, ckpt_interval=0, dropout=0.0)


if __name__ == "__main__":
    main(sys.argv[1:])
