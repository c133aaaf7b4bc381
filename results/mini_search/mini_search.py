"""
The search for a CPU-sized Table 2 (issue 15), finished (results/mini_search.md; kept to reproduce it): train model.py's GPT with precision.py's
backends in one process, without DeepSpeed, and log what decides whether naive FP8 fails.

    nice -n 19 python results/mini_search/mini_search.py --mode=fp8 --data_dir=data/stdlib --n_layer=8 --n_embd=128 \\
        --n_head=2 --block_size=256 --batch=4 --lr=6e-3 --iters=2000 --out=results/mini_search/NAME_fp8.jsonl

The loop is train.py's without the engine: AdamW (0.9, 0.95), weight decay on matrices
and embeddings only, clip 1.0, linear warmup then cosine to 10% (train.py's get_lr), the
training windows and the fixed val windows of data.py, fp32 master weights under bf16
autocast. The FP8 backend is precision.py's EmulatedFP8Backend, untouched (delayed scaling,
HYBRID, every GEMM incl. the LM head). Writes one JSON line per evaluation: val loss,
train loss, the activation peak (max |block output| so far, and since the last line,
per layer), where the largest block output sits (token position, channel), FP8 elements
saturated per role (input / weight / grad_output) and wall time; a last line summarises.
A collapse (non-finite loss, or loss > 3x the best) is recorded; the run stops at a
non-finite loss.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

import data as D
from bench.runs import read_jsonl
from configurator import fail, writable_file
from model import GPTConfig, build_model
from precision import ROLES, make_backend
from prepare_openwebtext import gpt2_tokenizer, load_vocab_map

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # results/mini_search/ -> the repository

MODES = {"bf16": ("bf16", 0.0), "bf16_tweo": ("bf16", 0.01), "fp8": ("fp8", 0.0), "fp8_tweo": ("fp8", 0.01)}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("--data_dir", default="data/stdlib")
    p.add_argument("--out", required=True, help="JSON lines file (must not exist)")
    p.add_argument("--n_layer", type=int, default=8)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--n_head", type=int, default=2)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--vocab_size", type=int, default=None, help="default: the data's, padded to 16")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--lr", type=float, default=6e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--amax_history", type=int, default=16)
    p.add_argument("--tweo_lambda", type=float, default=None, help="default: the mode's (0 or 0.01)")
    p.add_argument("--tweo_tau", type=float, default=3.0)
    p.add_argument("--tweo_p", type=float, default=4.0)
    p.add_argument("--eval_interval", type=int, default=100)
    p.add_argument("--eval_windows", type=int, default=64)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if os.path.exists(args.out):
        fail(f"{args.out} exists; nothing is overwritten")
    if not writable_file(args.out):
        fail(f"--out={args.out} is not a file this process can write (its folder cannot be written or created)")
    return args


def lr_at(it, args):
    """train.py's get_lr: linear warmup, then cosine to 10% of the peak at the last step."""
    if it < args.warmup:
        return args.lr * (it + 1) / (args.warmup + 1)
    ratio = (it - args.warmup) / max(1, args.iters - args.warmup)
    return 0.1 * args.lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * 0.9 * args.lr


@torch.no_grad()
def where_is_the_peak(model, x, autocast):
    """(layer, batch row, token position, channel, value) of the largest |block output| on x."""
    best = [0.0, None]

    def hook(i):
        def f(m, inp, out):
            a = out.detach().float().abs()
            v = a.max().item()
            if v > best[0]:
                best[0] = v
                b, t, c = np.unravel_index(int(a.argmax()), a.shape)
                best[1] = [i, int(b), int(t), int(c)]
        return f

    hooks = [blk.register_forward_hook(hook(i)) for i, blk in enumerate(model.transformer.h)]
    try:
        with autocast():
            model(x, x)
    finally:
        for h in hooks:
            h.remove()
    layer, row, pos, channel = best[1]
    return {"layer": layer, "pos": pos, "channel": channel, "value": round(best[0], 2), "token": int(x[row, pos])}


def table(paths):
    """A markdown row per run (its first and last lines), for results/mini_search.md."""
    rows = ["| run | mode | layers x width x heads | block x batch | lr | wd | amax hist | iters done | val PPL (final) "
            "| best val PPL | peak | peak at (layer, pos, ch) | saturated in/w/grad (last interval) | collapse | wall |",
            "|" + "---|" * 15]
    for path in sorted(paths):
        lines = read_jsonl(path)
        c, last = lines[0]["config"], lines[-1]
        evals = [r for r in lines if "val_loss" in r]
        if not evals:
            continue
        e = evals[-1]
        done = last if last.get("summary") else {"iters_done": e["iter"], "final_val_ppl": e["val_ppl"],
                                                   "best_val_ppl": min(r["val_ppl"] for r in evals),
                                                   "act_peak": e["act_peak"], "collapse_iter": None, "wall_s": e["elapsed_s"]}
        collapse = next((r["iter"] for r in lines if r.get("event") == "collapse"), None)
        s = e["fp8_saturated"]
        where = e["peak_at"]
        at = f"{where['layer']}, {where['pos']}, {where['channel']}" + (f", {where['token']!r}" if "token" in where else "")
        state = "" if last.get("summary") else " (unfinished)"
        name = os.path.basename(path).rsplit("_", 1 + c["mode"].count("_"))[0]
        rows.append(f"| {name} | {c['mode']} | {c['n_layer']}x{c['n_embd']}x{c['n_head']} | {c['block_size']}x{c['batch']} "
                    f"| {c['lr']:g} | {c['weight_decay']:g} | {c['amax_history']} | {done['iters_done']}/{c['iters']}{state} "
                    f"| {done['final_val_ppl']:.2f} | {done['best_val_ppl']:.2f} | {done['act_peak']:.0f} | {at} "
                    f"| {s['input']}/{s['weight']}/{s['grad_output']} | {collapse or '-'} | {done['wall_s'] / 60:.1f} min |")
    return "\n".join(rows)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--table":
        print(table(argv[1:]))
        return
    args = parse(argv)
    torch.set_num_threads(args.threads)
    precision, lam = MODES[args.mode]
    lam = lam if args.tweo_lambda is None else args.tweo_lambda
    with open(os.path.join(args.data_dir, "meta.json")) as f:
        meta = json.load(f)
    vocab = args.vocab_size or -(-meta["vocab_size"] // 16) * 16
    train = D.open_split(args.data_dir, "train", args.block_size, vocab)
    val = D.open_split(args.data_dir, "val", args.block_size, vocab)
    device = torch.device("cpu")
    torch.manual_seed(args.seed)
    backend = make_backend(precision, "emulated", "delayed", args.amax_history, "max", "cpu")
    cfg = GPTConfig(block_size=args.block_size, vocab_size=vocab, n_layer=args.n_layer, n_head=args.n_head,
                    n_embd=args.n_embd, tweo_tau=args.tweo_tau, tweo_p=args.tweo_p)
    model = build_model(cfg, backend, dtype=torch.float32)  # fp32 master weights under autocast
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, args.beta2))

    def autocast():
        return backend.autocast(model)

    val_windows = D.val_offsets(args.eval_windows, len(val), args.block_size)
    enc, id_map = gpt2_tokenizer(), load_vocab_map(args.data_dir)
    probe_x, _ = D.get_batch(val, val_windows[:4], args.block_size, device)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    out = open(args.out, "w")

    def log(row):
        out.write(json.dumps(row) + "\n")
        out.flush()

    log({"config": vars(args), "vocab_size": vocab, "precision": precision, "tweo_lambda": lam,
         "n_params": model.get_num_params(non_embedding=False), "torch": torch.__version__})
    t0 = time.time()
    peak, best_loss, collapse_iter = 0.0, float("inf"), None
    interval_max = torch.zeros(args.n_layer)
    sat = dict.fromkeys(ROLES, 0)
    losses = []
    best_val, val_loss = float("inf"), float("nan")
    for it in range(args.iters):
        for g in opt.param_groups:
            g["lr"] = lr_at(it, args)
        x, y = D.get_batch(train, D.train_offsets(args.seed, it, args.batch, len(train), args.block_size),
                           args.block_size, device)
        with autocast():
            o = model(x, y, with_tweo=lam > 0)
        loss = o.loss + lam * o.tweo_loss if lam > 0 else o.loss
        task = o.loss.item()
        interval_max = torch.fmax(interval_max, o.act_max)
        if not math.isfinite(task) or task > 3 * best_loss:
            collapse_iter = collapse_iter or it + 1
            log({"iter": it + 1, "event": "collapse", "loss": task if math.isfinite(task) else str(task)})
            if not math.isfinite(task):
                break
        best_loss = min(best_loss, task)
        losses.append(task)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        tel = backend.telemetry(model)
        for layer_sat in tel.get("fp8_saturated", {}).values():
            for role, n in layer_sat.items():
                sat[role] += n
        if (it + 1) % args.eval_interval == 0 or it + 1 == args.iters:
            model.eval()
            val_loss = D.evaluate(model, val, val_windows, args.block_size, 8, device, autocast)
            where = where_is_the_peak(model, probe_x, autocast)
            where["token"] = enc.decode([int(id_map[where["token"]]) if id_map is not None else where["token"]])
            model.train()
            layer_max = interval_max.tolist()
            peak = max(peak, max(layer_max))
            best_val = min(best_val, val_loss)
            row = {"iter": it + 1, "val_loss": round(val_loss, 4), "val_ppl": round(math.exp(val_loss), 3),
                   "train_loss": round(float(np.mean(losses)), 4), "grad_norm": round(gnorm, 3),
                   "act_peak": round(peak, 2), "act_max_per_layer": [round(v, 1) for v in layer_max],
                   "peak_at": where, "fp8_saturated": dict(sat), "fp8_amax": _head_amax(tel),
                   "elapsed_s": round(time.time() - t0, 1)}
            log(row)
            print(json.dumps({k: row[k] for k in ("iter", "val_loss", "act_peak", "fp8_saturated", "elapsed_s")}), flush=True)
            interval_max.zero_()
            sat = dict.fromkeys(ROLES, 0)
            losses = []
    log({"summary": True, "mode": args.mode, "iters_done": it + 1, "final_val_loss": round(val_loss, 4),
         "final_val_ppl": round(math.exp(val_loss), 3), "best_val_ppl": round(math.exp(best_val), 3),
         "act_peak": round(peak, 2), "collapse_iter": collapse_iter, "wall_s": round(time.time() - t0, 1)})
    out.close()


def _head_amax(tel):
    """The newest amaxes of the LM head and the largest input amax of any GEMM (and which)."""
    amax = tel.get("fp8_amax")
    if not amax:
        return None
    name = max(amax, key=lambda n: amax[n]["input"])
    return {"lm_head": {k: round(v, 3) for k, v in amax["lm_head"].items()}, "max_input": [name, round(amax[name]["input"], 2)],
            "max_grad": max(round(a["grad_output"], 6) for a in amax.values())}


if __name__ == "__main__":
    main()
