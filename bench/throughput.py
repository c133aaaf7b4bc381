"""
Side-by-side cost of the four modes on one model, in one process: iterations per hour and
peak memory of BF16, BF16+TWEO, FP8 and FP8+TWEO training steps (forward, backward, AdamW),
as ratios against BF16, and of a plain fp32 step (no autocast, fp32 weights) as the reference
for what the hardware does at full speed. This is Table 10's comparison in plain torch: one
process, one device, torch's AdamW, no DeepSpeed engine, no ZeRO partitioning, no gradient
accumulation; for whole-run numbers use bench/table10.py on train.py runs.

    python bench/throughput.py [--json=PATH]                      # a small model (6 x 384, block 256), CPU
    python bench/throughput.py --cpu_gemm=both                    # CPU: each mode on both GEMM paths
    python bench/throughput.py configs/gpt2_xl_fp8.py --micro_batch_size=4 --iters=20   # on a GPU

--cpu_gemm ('auto', 'native', 'fp32' or 'both') is train.py's key: where a CPU computes the GEMMs
with bf16 semantics (torch's bf16 kernels, or fp32 GEMMs on the bf16 / FP8 values); each row
says which path it took. 'vs bf16' compares with the BF16 row of the same path.

With a train.py config file the model and micro-batch are the run's: train.py's defaults
(block_size 1024, ...) and the file on top, as train.py reads them; --key=value overrides
any of them (e.g. --block_size=256).

Peak memory counts parameters, buffers and optimizer state plus the highest point a step
adds to them. --json=PATH also writes the results there (never over an existing file).

On CPU, FP8 is emulated: its numbers show the emulation's cost, not FP8's speed-up
(that needs Transformer Engine on an FP8 GPU). TWEO's overhead is meaningful anywhere.
"""
import ast
import contextlib
import json
import os
import sys
import time
import warnings

import torch

from configurator import configure_or_exit, declared_keys, fail, progress_bar, writable_file
from model import GPTConfig, build_model
from precision import make_backend

MODES = {"fp32": ("fp32", 0.0), "bf16": ("bf16", 0.0), "bf16_tweo": ("bf16", 0.01), "fp8": ("fp8", 0.0),
         "fp8_tweo": ("fp8", 0.01)}
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "micro_batch_size", "activation_checkpointing")
TRAIN_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")


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


def make_step(cfg, mode, device, cpu_gemm="auto"):
    """A fresh model in `mode` (same seed, so the same initial weights for every mode) and
    one training step of it: forward, backward, AdamW. Returns (step, backend, model, optimizer).
    'fp32' is the BF16 backend's model in fp32 without autocast: no GEMM has bf16 semantics."""
    precision, tweo_lambda = MODES[mode]
    backend = make_backend("bf16" if precision == "fp32" else precision, cfg["fp8_backend"], "delayed", 16, "max",
                           device.type, cpu_gemm, cfg["compile"])
    torch.manual_seed(0)
    args = {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "activation_checkpointing")}
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    model = build_model(GPTConfig(**args), backend, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as train.py
    x = torch.randint(0, min(50257, cfg["vocab_size"]), (cfg["micro_batch_size"], cfg["block_size"]), device=device)
    autocast = (lambda m: contextlib.nullcontext()) if precision == "fp32" else backend.autocast

    def micro_batch():
        with autocast(model):
            out = model(x, x, with_tweo=tweo_lambda > 0)
        (out.loss + tweo_lambda * out.tweo_loss if tweo_lambda > 0 else out.loss).backward()

    def step():
        micro_batch()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step.micro_batch = micro_batch  # forward and backward alone (host_cost)

    return step, backend, model, optimizer


def seconds_per_step(step, n, device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return (time.perf_counter() - t) / n


def host_cost(fn, device):
    """(ops, host syncs) of fn(), e.g. one micro-batch. Ops: what the host dispatches, the outermost ATen ops and
    compiled regions (torch.profiler). Syncs: the times the host waits for the device, on a GPU
    every call torch's sync debug mode flags; on a CPU, where nothing waits, the calls that would:
    values read back (aten::_local_scalar_dense: .item(), bool()) and tensors made from Python
    data (aten::lift_fresh, a host-to-device copy on a GPU)."""
    cuda = device.type == "cuda"
    with warnings.catch_warnings(record=True) as flagged, \
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)

    def counted(e):
        return e.name.startswith("aten::") or e.name.startswith("Torch-Compiled Region")

    def outermost(e):
        parent = e.cpu_parent
        while parent is not None:
            if counted(parent):
                return False
            parent = parent.cpu_parent
        return True
    events = prof.events()
    ops = sum(1 for e in events if counted(e) and outermost(e))
    if cuda:
        syncs = sum(1 for w in flagged if "synchroniz" in str(w.message))
    else:
        syncs = sum(1 for e in events if e.name in ("aten::_local_scalar_dense", "aten::lift_fresh"))
    return ops, syncs


def peak_bytes(step, model, optimizer, device):
    """Peak memory of training: what lives between steps (parameters, buffers, optimizer
    state) plus the highest point one step adds to it (activations, gradients, temporaries).
    Counted the same way on CPU and GPU, and unaffected by other models alive in the process."""
    tensors = list(model.parameters()) + list(model.buffers()) + \
        [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    resident = sum(t.numel() * t.element_size() for t in tensors)
    if device.type != "cuda":
        return resident + cpu_peak_bytes(step)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return resident + torch.cuda.max_memory_allocated() - base


def measure(cfg, mode, device, cpu_gemm="auto"):
    step, backend, model, optimizer = make_step(cfg, mode, device, cpu_gemm)
    for _ in range(cfg["warmup"]):
        step()
    dt = seconds_per_step(step, cfg["iters"], device)
    peak = peak_bytes(step, model, optimizer, device)
    ops, syncs = host_cost(step.micro_batch, device)
    optimizer.zero_grad(set_to_none=True)
    path = "-" if mode == "fp32" else backend.cpu_gemm  # fp32 has no bf16 GEMM to place
    return {"mode": mode, "gemm_path": path, "backend": "fp32" if mode == "fp32" else backend.name, "compile": backend.compile,
            "s_per_iter": dt,
            "iter_per_hour": 3600 / dt, "peak_gb": peak / 2**30, "ops_per_micro_batch": ops,
            "host_syncs_per_micro_batch": syncs}


def rows_to_measure(modes, cpu_gemm, device):
    """(mode, cpu_gemm) pairs in print order: fp32 once, every other mode on each path asked for
    (both paths with 'both' on a CPU)."""
    paths = ("native", "fp32") if cpu_gemm == "both" and device.type == "cpu" else \
        ("auto",) if cpu_gemm == "both" else (cpu_gemm,)
    return [(m, "auto") for m in modes if m == "fp32"] + \
        [(m, p) for p in paths for m in modes if m != "fp32"]


def with_ratios(results):
    """Adds each row's step time against the fp32 row and its iter/hour and peak memory
    against the BF16 row of the same GEMM path (None where that row was not measured)."""
    fp32 = next((r for r in results if r["mode"] == "fp32"), None)
    bf16 = {r["gemm_path"]: r for r in results if r["mode"] == "bf16"}
    for r in results:
        base = bf16.get(r["gemm_path"])
        r["step_time_vs_fp32"] = r["s_per_iter"] / fp32["s_per_iter"] if fp32 else None
        r["iter_per_hour_vs_bf16"] = r["iter_per_hour"] / base["iter_per_hour"] if base else None
        r["peak_gb_vs_bf16"] = r["peak_gb"] / base["peak_gb"] if base else None
    return results


def ratio(x):
    return f"{x:.2f}x" if x is not None else "-"


def train_defaults():
    """train.py's config keys and their defaults, read from its source."""
    return {key: ast.literal_eval(default) for _, key, default, _ in declared_keys(TRAIN_PY)}


def model_config(defaults, argv):
    """The script's options and the model to time: the small model in `defaults`, or, given a
    train.py config file, the run's own (train.py's defaults with the file on top; the file's
    other keys are accepted and unused); --key=value overrides either. A bad key is one line
    on stderr and exit 2."""
    train = train_defaults()
    if any(not a.startswith("--") for a in argv):
        defaults = {**defaults, **{k: train[k] for k in MODEL_KEYS}}
    return configure_or_exit({**train, **defaults}, argv)


def describe(cfg, device):
    return f"{cfg['n_layer']} layers x {cfg['n_embd']}, {cfg['micro_batch_size']} x {cfg['block_size']} tokens, {device}"


def main(argv):
    defaults = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=50304, micro_batch_size=4,
                    activation_checkpointing=False, iters=5, warmup=2, fp8_backend="auto", cpu_gemm="auto",
                    modes="fp32,bf16,bf16_tweo,fp8,fp8_tweo", device="cuda" if torch.cuda.is_available() else "cpu",
                    json="")
    cfg = model_config(defaults, argv)
    device = torch.device(cfg["device"])
    modes = cfg["modes"].split(",")
    if not set(modes) <= MODES.keys():
        fail(f"--modes takes a comma-separated subset of {', '.join(MODES)}")
    if cfg["cpu_gemm"] not in ("auto", "native", "fp32", "both"):
        fail(f"--cpu_gemm takes auto, native, fp32 or both, got {cfg['cpu_gemm']!r}")
    if cfg["json"] and os.path.exists(cfg["json"]):
        fail(f"{cfg['json']} already exists; results are never overwritten: choose another --json path")
    if cfg["json"] and not writable_file(cfg["json"]):
        fail(f"--json={cfg['json']} is not a file this process can write (its folder cannot be written or created)")
    print(f"model: {describe(cfg, device)}")
    if device.type == "cpu":
        print(f"CPU: native bf16 GEMMs {torch.ops.mkldnn._is_mkldnn_bf16_supported()} "
              f"(torch.ops.mkldnn._is_mkldnn_bf16_supported()), AMX {torch.cpu._is_amx_tile_supported()}, "
              f"{torch.get_num_threads()} threads")
    if device.type == "cpu" and any(MODES[m][0] == "fp8" for m in modes):
        print("note: FP8 is emulated on CPU (float8 casts around bf16 or fp32 GEMMs, same numerics as Transformer "
              "Engine): its time and memory are the emulation's cost, not FP8's speed-up, which needs an FP8 GPU")
    rows = rows_to_measure(modes, cfg["cpu_gemm"], device)
    results = with_ratios([measure(cfg, m, device, path) for m, path in progress_bar(rows, desc="modes", leave=False)])
    print(f"{'mode':<10} {'gemm':<7} {'backend':<9} {'compile':<8} {'s/iter':>8} {'iter/h':>9} {'time vs fp32':>13} "
          f"{'iter/h vs bf16':>15} {'peak GB':>8} {'vs bf16':>8} {'ops/mb':>7} {'syncs/mb':>8}")
    for r in results:
        print(f"{r['mode']:<10} {r['gemm_path']:<7} {r['backend']:<9} {'on' if r['compile'] else 'off':<8} {r['s_per_iter']:>8.3f} {r['iter_per_hour']:>9.0f} "
              f"{ratio(r['step_time_vs_fp32']):>13} {ratio(r['iter_per_hour_vs_bf16']):>15} {r['peak_gb']:>8.3f} "
              f"{ratio(r['peak_gb_vs_bf16']):>8} {r['ops_per_micro_batch']:>7} {r['host_syncs_per_micro_batch']:>8}")
    if cfg["json"]:
        model = {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "micro_batch_size",
                                     "activation_checkpointing", "iters", "warmup")}
        report = {"device": str(device), "fp8_emulated": any(r["backend"] == "emulated" for r in results),
                  "native_bf16_gemms": torch.ops.mkldnn._is_mkldnn_bf16_supported() if device.type == "cpu" else None,
                  "amx": torch.cpu._is_amx_tile_supported() if device.type == "cpu" else None,
                  "model": model, "results": results}
        os.makedirs(os.path.dirname(os.path.abspath(cfg["json"])), exist_ok=True)
        with open(cfg["json"] + ".tmp", "w") as f:
            json.dump(report, f, indent=2)
        os.replace(cfg["json"] + ".tmp", cfg["json"])
        print(f"wrote {cfg['json']}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
