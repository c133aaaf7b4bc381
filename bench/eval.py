"""
Validation loss, perplexity and outlier statistics of a trained model, in BF16 or FP8.

    python bench/eval.py --out_dir=out/gpt2_xl_fp8_tweo [--precision=bf16|fp8] [--eval_iters=N] [--ckpt=best|last] [--json]
                         [--data_dir=DIR (default: the run's)] [--device=cpu|cuda]
    python bench/eval.py --hf=DIR --data_dir=data/openwebtext [--block_size=N] [--eval_iters=N]

The val windows are the ones train.py evaluates on (same block size and count), so
the numbers compare with the val_loss in metrics.jsonl. Per layer, for block outputs and
FFN outputs (before the residual add): top-1/2/3, median, max, mean |value|, kurtosis
(raw mu4/sigma^4, 3 for a Gaussian) and inf-norm. --precision defaults to the precision
the run was trained in; fp8 uses the checkpoint's own FP8 scaling state.

--hf=DIR evaluates a Hugging Face GPT-2 directory (config.json + model.safetensors or
pytorch_model.bin, e.g. a local copy of `gpt2`): it has no run, so --data_dir is needed and
the windows are train.py's first 200 val windows (--eval_iters=N: N x 8) of --block_size
tokens (default: the model's n_positions, 1024 for GPT-2).

For post-training quantization work, evaluate(model, transform=...) evaluates a model
with a transform (model -> model) applied first.
"""
import contextlib
import json
import math
import os
import sys
from types import SimpleNamespace

import torch

import data as D
from configurator import configure_or_exit, fail, first_violation, one_of, usable_device
from model import CheckpointError, load_hf, load_trained, record_activations, summarize_moments
from prepare_openwebtext import GPT2_VOCAB_SIZE, load_vocab_map
from precision import make_backend


def evaluate(model, val_data, offsets, block_size, micro_batch_size, backend, transform=None, stats=True,
             progress="evaluating"):
    """Val loss over the windows at `offsets` and, with stats, per-layer outlier statistics
    of block and FFN outputs. transform: model -> the model to evaluate instead (e.g. a
    quantizer); one that returns a changed copy (as bench/ptq.py's do) leaves `model` as it
    was, since evaluation itself changes nothing in a model, FP8 scaling state included."""
    if transform is not None:
        model = transform(model)
    device = next(model.parameters()).device
    with record_activations(model, ffn=True) if stats else contextlib.nullcontext() as rec:
        loss = D.evaluate(model, val_data, offsets, block_size, micro_batch_size, device, lambda: backend.autocast(model),
                          progress=progress)
    result = {"val_loss": loss, "val_ppl": math.exp(min(loss, 700))}
    if stats:
        result["layers"] = [{"block": summarize_moments(b), "ffn": summarize_moments(f)}
                            for b, f in zip(rec["block"], rec["ffn"])]
    return result


# --hf=DIR: a Hugging Face GPT-2 has no run.json, so the val windows come from these
# (200 windows of the model's n_positions tokens, fewer than train.py's 3200; the seed picks
# bench/ptq.py's calibration windows among the training windows, as a run's own seed does)
HF_RUN = dict(seed=1337, micro_batch_size=8, eval_windows=200, precision="bf16", fp8_backend="emulated",
              fp8_recipe="delayed", fp8_amax_history_len=16, fp8_amax_compute_algo="max")
RUN_KEYS = ("precision", "fp8_backend", "fp8_recipe", "fp8_amax_history_len", "fp8_amax_compute_algo",
            "micro_batch_size", "data_dir", "seed")
LOAD_DEFAULTS = dict(out_dir="out", hf="", ckpt="last", precision="", eval_iters=0, data_dir="", block_size=0,
                     device="cuda" if torch.cuda.is_available() else "cpu")
LOAD_RULES = [  # (key, test(value), what the value must be), the first broken rule stops
    ("precision", *one_of("", "bf16", "fp8")),
    ("eval_iters", lambda v: v >= 0, ">= 0 (0: the run's own eval_iters)"),
    ("block_size", lambda v: v >= 0, ">= 0 (0: the model's n_positions)"),
    ("ckpt", lambda v: v != "", "'last', 'best', or a DeepSpeed checkpoint tag or folder"),
    ("device", usable_device, "'cpu', or 'cuda[:N]' with that GPU present"),
]


def read_run(out_dir):
    """The keys of a run's run.json config that evaluation needs; exits on a missing or foreign file."""
    run_json = os.path.join(out_dir, "run.json")
    try:
        with open(run_json) as f:
            run = json.load(f)["config"]
        # train.py's val set: eval_windows windows (runs from before that key: eval_iters x micro_batch_size)
        return {**{k: run[k] for k in RUN_KEYS},
                "eval_windows": run.get("eval_windows") or run["eval_iters"] * run["micro_batch_size"]}
    except OSError as e:
        fail(f"{run_json}: {e.strerror}: --out_dir must be a train.py run (or use --hf=DIR)")
    except (ValueError, KeyError, TypeError) as e:
        fail(f"{run_json} is not a run.json written by train.py ({type(e).__name__}: {e})")


def load_model(out_dir="out", hf="", ckpt="last", precision="", block_size=0, device="cpu"):
    """A model to evaluate, in the backend of its precision (default: the one it was trained
    in; FP8 with the checkpoint's own scaling state): a train.py run's checkpoint, or with hf
    a Hugging Face GPT-2 directory (block_size defaults to the model's n_positions). Returns
    a namespace with model, info, backend, precision, run (run.json's keys, or HF_RUN) and
    name. Bad input: one line on stderr and exit status 2."""
    checked = dict(precision=precision, block_size=block_size, ckpt=ckpt, device=device)
    problem = first_violation(checked, [rule for rule in LOAD_RULES if rule[0] in checked])
    if problem:
        fail(problem)
    if hf:
        if out_dir != LOAD_DEFAULTS["out_dir"]:
            fail("give --out_dir=RUN or --hf=DIR, not both")
        if precision not in ("", "bf16"):
            fail("--hf models are evaluated in bf16 (they carry no FP8 scaling state)")
        run = HF_RUN
    else:
        if block_size:
            fail("--block_size is for --hf models; a run is evaluated at the block size it was trained with")
        run = read_run(out_dir)
    precision = precision or run["precision"]
    device_type = torch.device(device).type
    fp8_backend = run["fp8_backend"] if device_type == "cuda" else "emulated"
    try:
        backend = make_backend(precision, fp8_backend, run["fp8_recipe"], run["fp8_amax_history_len"],
                               run["fp8_amax_compute_algo"], device_type)
        if hf:
            model, info = load_hf(hf, backend=backend, device=device, block_size=block_size or None)
        else:
            model, info = load_trained(out_dir, ckpt, backend=backend, device=device)
    except (CheckpointError, ValueError, RuntimeError) as e:
        fail(e)
    return SimpleNamespace(model=model, info=info, backend=backend, precision=precision, run=run, name=hf or out_dir)


def load(out_dir="out", hf="", ckpt="last", precision="", eval_iters=0, data_dir="", block_size=0, device="cpu"):
    """load_model() and the val windows to evaluate it on, for every bench script that
    evaluates on val data: a run's own (its data_dir and train.py's val windows), or for hf
    those of HF_RUN on data_dir (needed). Bad input: one line on stderr and exit status 2."""
    checked = dict(eval_iters=eval_iters)
    problem = first_violation(checked, [rule for rule in LOAD_RULES if rule[0] in checked])
    if problem:
        fail(problem)
    if hf and not data_dir:
        fail("--hf needs --data_dir (a directory prepared by prepare_openwebtext.py)")
    ev = load_model(out_dir, hf, ckpt, precision, block_size, device)
    model, info, run = ev.model, ev.info, dict(ev.run, data_dir=data_dir) if hf else ev.run
    block_size, micro = model.config.block_size, run["micro_batch_size"]
    n_windows = eval_iters * micro if eval_iters else run["eval_windows"]
    data_dir = data_dir or run["data_dir"]
    try:
        val_data = D.open_split(data_dir, "val", block_size, info.get("hf_vocab_size", model.config.vocab_size))
    except D.DataError as e:
        fail(e)
    offsets = D.val_offsets(n_windows, len(val_data), block_size)
    # the ids the model can meet in text: a compact-vocabulary corpus's own, else GPT-2's (the padding never)
    vocab_map = None if hf else load_vocab_map(data_dir)
    vocab_size = info.get("hf_vocab_size", GPT2_VOCAB_SIZE if vocab_map is None else len(vocab_map))
    return SimpleNamespace(**dict(vars(ev), run=run, val_data=val_data, offsets=offsets, block_size=block_size,
                                  micro_batch_size=micro, data_dir=data_dir, vocab_size=vocab_size))


def main(argv):
    cfg = configure_or_exit(dict(LOAD_DEFAULTS, json=False), argv)
    ev = load(**{k: cfg[k] for k in LOAD_DEFAULTS})
    model, info, precision, offsets = ev.model, ev.info, ev.precision, ev.offsets
    result = evaluate(model, ev.val_data, offsets, ev.block_size, ev.micro_batch_size, ev.backend)
    result.update(out_dir=ev.name, ckpt=cfg["ckpt"], iter=info.get("iter"), precision=precision,
                  windows=len(offsets))

    print(f"{ev.name} ({cfg['ckpt']}, iter {info.get('iter')}), {precision}: "
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
