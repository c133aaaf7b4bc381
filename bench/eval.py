"""
Validation loss, perplexity and outlier statistics of a trained model, in BF16 or FP8.

    python bench/eval.py --out_dir=out/gpt2_xl_fp8_tweo [--precision=bf16|fp8] [--eval_iters=N] [--ckpt=best|last] [--json]
                         [--data_dir=DIR (default: the run's)] [--device=cpu|cuda]

The val windows are the ones train.py evaluates on (same seed, block size and count), so
the numbers compare with the val_loss in metrics.jsonl. Per layer, for block outputs and
FFN outputs (before the residual add): top-1/2/3, median, max, mean |value|, kurtosis
(raw mu4/sigma^4, 3 for a Gaussian) and inf-norm. --precision defaults to the precision
the run was trained in; fp8 uses the checkpoint's own FP8 scaling state.

For post-training quantization work, evaluate(model, transform=...) evaluates a model
with a transform (model -> model) applied first.
open_run(out_dir, ...) loads a run's trained model with its val windows (bench/plots.py uses
it for Figure 4).
"""
import contextlib
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import data as D  # noqa: E402
from configurator import configure_or_exit, first_violation, one_of, usable_device  # noqa: E402
from model import CheckpointError, load_trained, record_activations, summarize_moments  # noqa: E402
from precision import make_backend  # noqa: E402


class RunError(Exception):
    pass


def evaluate(model, val_data, offsets, block_size, micro_batch_size, backend, transform=None, stats=True):
    """Val loss over the windows at `offsets` and, with stats, per-layer outlier statistics
    of block and FFN outputs. transform: applied to the model first (e.g. a quantizer)."""
    if transform is not None:
        model = transform(model)
    device = next(model.parameters()).device
    with record_activations(model, ffn=True) if stats else contextlib.nullcontext() as rec:
        loss = D.evaluate(model, val_data, offsets, block_size, micro_batch_size, device, lambda: backend.autocast(model))
    result = {"val_loss": loss, "val_ppl": math.exp(min(loss, 700))}
    if stats:
        result["layers"] = [{"block": summarize_moments(b), "ffn": summarize_moments(f)}
                            for b, f in zip(rec["block"], rec["ffn"])]
    return result


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def open_run(out_dir, ckpt="last", precision="", device="cpu", eval_iters=0, data_dir=""):
    """A train.py run's model and its val windows: (model, backend, precision, info, val_data,
    offsets, micro_batch_size). precision defaults to the run's own; FP8 is emulated off CUDA.
    Raises RunError, CheckpointError or data.DataError."""
    run_json = os.path.join(out_dir, "run.json")
    if not os.path.isfile(run_json):
        raise RunError(f"{run_json} not found: --out_dir must be a train.py run")
    with open(run_json) as f:
        run = json.load(f)["config"]
    precision = precision or run["precision"]
    if precision not in ("bf16", "fp8"):
        raise RunError(f"--precision must be bf16 or fp8, got {precision!r}")
    device_type = torch.device(device).type
    fp8_backend = run["fp8_backend"] if device_type == "cuda" else "emulated"
    backend = make_backend(precision, fp8_backend, run["fp8_recipe"], run["fp8_amax_history_len"],
                           run["fp8_amax_compute_algo"], device_type)
    model, info = load_trained(out_dir, ckpt, backend=backend, device=device)
    block_size, micro = model.config.block_size, run["micro_batch_size"]
    val_data = D.open_split(data_dir or run["data_dir"], "val", block_size, model.config.vocab_size)
    offsets = D.val_offsets(run["seed"], (eval_iters or run["eval_iters"]) * micro, len(val_data), block_size)
    return model, backend, precision, info, val_data, offsets, micro


def main(argv):
    defaults = dict(out_dir="out", precision="", eval_iters=0, ckpt="last", json=False, data_dir="",
                    device="cuda" if torch.cuda.is_available() else "cpu")
    cfg = configure_or_exit(defaults, argv)
    problem = first_violation(cfg, [  # (key, test(value), what the value must be), the first broken rule stops
        ("precision", *one_of("", "bf16", "fp8")),
        ("eval_iters", lambda v: v >= 0, ">= 0 (0: the run's own eval_iters)"),
        ("ckpt", lambda v: v != "", "'last', 'best', or a DeepSpeed checkpoint tag or folder"),
        ("device", usable_device, "'cpu', or 'cuda[:N]' with that GPU present"),
    ])
    if problem:
        fail(problem)
    run_json = os.path.join(cfg["out_dir"], "run.json")
    try:
        with open(run_json) as f:
            run = json.load(f)["config"]
        run_keys = ("precision", "fp8_backend", "fp8_recipe", "fp8_amax_history_len", "fp8_amax_compute_algo",
                    "micro_batch_size", "eval_iters", "data_dir", "seed")
        run = {k: run[k] for k in run_keys}
    except OSError as e:
        fail(f"{run_json}: {e.strerror}: --out_dir must be a train.py run")
    except (ValueError, KeyError, TypeError) as e:
        fail(f"{run_json} is not a run.json written by train.py ({type(e).__name__}: {e})")
    precision = cfg["precision"] or run["precision"]
    device_type = torch.device(cfg["device"]).type
    fp8_backend = run["fp8_backend"] if device_type == "cuda" else "emulated"
    try:
        backend = make_backend(precision, fp8_backend, run["fp8_recipe"], run["fp8_amax_history_len"],
                               run["fp8_amax_compute_algo"], device_type)
        model, info = load_trained(cfg["out_dir"], cfg["ckpt"], backend=backend, device=cfg["device"])
    except (CheckpointError, ValueError, RuntimeError) as e:
        fail(e)
    block_size, micro = model.config.block_size, run["micro_batch_size"]
    eval_iters = cfg["eval_iters"] or run["eval_iters"]
    try:
        val_data = D.open_split(cfg["data_dir"] or run["data_dir"], "val", block_size, model.config.vocab_size)
    except D.DataError as e:
        fail(e)
    offsets = D.val_offsets(run["seed"], eval_iters * micro, len(val_data), block_size)
    result = evaluate(model, val_data, offsets, block_size, micro, backend)
    result.update(out_dir=cfg["out_dir"], ckpt=cfg["ckpt"], iter=info.get("iter"), precision=precision,
                  windows=len(offsets))

    print(f"{cfg['out_dir']} ({cfg['ckpt']}, iter {info.get('iter')}), {precision}: "
          f"val loss {result['val_loss']:.4f}, val ppl {result['val_ppl']:.2f} over {len(offsets)} windows")
    cols = ("top1", "top2", "top3", "median", "mean_abs", "kurtosis")
    print(f"{'layer':>5} {'output':>6} " + " ".join(f"{c:>10}" for c in cols))
    for i, layer in enumerate(result["layers"]):
        for kind in ("block", "ffn"):
            print(f"{i:>5} {kind:>6} " + " ".join(f"{layer[kind][c]:>10.4g}" for c in cols))
    if cfg["json"]:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
