"""
Post-training quantization: the paper's Table 3 (AbsMax W8A8 at every granularity, Eq. 4)
and Table 4 / supplementary Table 6 (SmoothQuant, and the residual stream quantized).

    python bench/ptq.py --out_dir=out/gpt2_124m_bf16 --out_dir=out/gpt2_124m_fp8_tweo [--ckpt=best] [--bits=8]
                        [--calib_windows=32] [--residual] [--smoothquant_alpha=0.5] [--json]
    python bench/ptq.py --out_dir=RUN --bits=4 --per_site
    python bench/ptq.py --hf=DIR --data_dir=data/openwebtext [--block_size=N] ...

Every GEMM (QKV, attention out, fc, fc proj, LM head) sees its weight and its input through
fake_quant(); with --residual so does every block's input and output (the residual stream).
The embedding lookup is no GEMM and stays as trained; the LM head, tied to wte, gets a
quantized copy of it. Weights: per-tensor (T) or per output channel (C). Activations:
per-tensor (T), with a static scale calibrated once on --calib_windows training windows and
then frozen, or per-token (K), dynamic. The PPL is bench/eval.py's, on the same val windows,
in BF16 (so the BF16 column equals `bench/eval.py --precision=bf16`). Several --out_dir /
--hf make several rows; runs that differ only in their seed share one (mean ± sample sd), and a
last table gives each setting's change against each model's own BF16 PPL, paired by seed.
--smoothquant_alpha > 0 adds Table 4: W(C)A(T) / W(C)A(K) with SmoothQuant and with AbsMax,
each with and without the residual stream quantized.
--json prints one JSON object per model (keys: the settings, values: val PPL) at the end.
--per_site asks why per-tensor activation scales fail: for every activation site (each GEMM's input,
and the residual stream) its calibrated max|X|, how far that stands above its median channel, and the
val PPL with that site alone quantized per tensor at --bits (static scale), in place of Table 3.
"""
import copy
import json
import math
import os
import sys

import torch
import torch.nn as nn

import data as D
from bench.eval import LOAD_DEFAULTS, evaluate, load
from bench.runs import experiment_key, fmt_mean_sd
from configurator import configure_or_exit, fail
from precision import LayerNormLinear

EPS = 1e-8  # Eq. 4's epsilon: keeps the scale of an all-zero tensor (or row) finite


def fake_quant(x, bits, granularity, amax=None):
    """Eq. 4, returning the dequantized tensor: s = max|X| + eps, X_q = round(X / s * Q_b),
    X_q / Q_b * s, with Q_b = 2^(b-1) - 1, symmetric, no zero point. granularity: 'tensor'
    (one s), 'channel' (one s per row of an [out, in] weight) or 'token' (one s per vector
    along the last dimension). amax: a calibrated max|X| to use instead of the tensor's own
    ('tensor' only); values beyond it clip to +-Q_b.
    torch's fake-quant ops with scale s/Q_b and zero point 0 compute exactly this, in fp32:
    round() is round half to even (as torch.round and the hardware's float-to-int cast),
    and x/s*Q_b is computed as x times the fp32 reciprocal of s/Q_b, which differs from
    the exact quotient by at most an ulp (a value that close to a half-integer can go one
    step either way). The result is cast back to x's dtype."""
    q = 2 ** (bits - 1) - 1
    x32 = x.float()
    if granularity == "tensor":
        amax = x32.detach().abs().amax() if amax is None else torch.as_tensor(amax, dtype=torch.float32, device=x.device)
        s = amax + EPS
        out = torch.fake_quantize_per_tensor_affine(x32, s / q, torch.zeros((), dtype=torch.int32, device=x.device), -q, q)
    elif granularity in ("channel", "token"):
        rows = x32.reshape(-1, x32.shape[-1])
        s = rows.detach().abs().amax(dim=1) + EPS  # a constant scale: gradients pass straight through
        out = torch.fake_quantize_per_channel_affine(rows, s / q, torch.zeros_like(s, dtype=torch.int32), 0, -q, q)
        out = out.view_as(x32)
    else:
        raise ValueError(f"granularity must be 'tensor', 'channel' or 'token', got {granularity!r}")
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------
# Where quantization applies: the input of every GEMM (for a LayerNormLinear, the
# LayerNorm's output) and, for the residual stream, block 0's input and every block's output.

def gemms(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, LayerNormLinear))]


def on_activations(model, fn, residual=False):
    """Route every GEMM input (and with residual every block input/output) x through
    fn(site name, x). Returns the callables that undo it."""
    undo = []
    for name, m in gemms(model):
        if isinstance(m, LayerNormLinear):  # its forward calls self.layer_norm: wrap that, per instance
            m.layer_norm = lambda x, name=name, norm=m.layer_norm: fn(name, norm(x))
            undo.append(lambda m=m: m.__dict__.pop("layer_norm"))
        else:
            undo.append(m.register_forward_pre_hook(lambda mod, args, name=name: (fn(name, args[0]),)).remove)
    if residual:
        blocks = model.transformer.h
        undo.append(blocks[0].register_forward_pre_hook(lambda mod, args: (fn("h.0.input", args[0]),)).remove)
        for i, block in enumerate(blocks):
            undo.append(block.register_forward_hook(lambda mod, args, out, i=i: fn(f"h.{i}.output", out)).remove)
    return undo


@torch.no_grad()
def calibrate(model, ev, offsets):
    """Per-channel max|X| at every activation site (residual stream included) over the
    calibration windows: the static per-tensor scale is its max, SmoothQuant uses it whole."""
    amax = {}

    def observe(name, x):
        a = x.detach().abs().float().reshape(-1, x.shape[-1]).amax(dim=0)
        amax[name] = torch.maximum(amax[name], a) if name in amax else a
        return x
    undo = on_activations(model, observe, residual=True)
    try:
        evaluate(model, ev.train_data, offsets, ev.block_size, ev.micro_batch_size, ev.backend, stats=False,
                 progress="calibrating")
    finally:
        for u in undo:
            u()
    return amax


@torch.no_grad()
def quantized(model, bits, weights=None, acts=None, residual=False, amax=None, sites=None):
    """A copy of model with weights fake-quantized per 'tensor' or 'channel' and GEMM inputs
    (and with residual the residual stream) per 'tensor' (static, from amax) or 'token'; with
    sites, only the activations of those sites (on_activations' names)."""
    model = copy.deepcopy(model)
    if weights:
        for _, m in gemms(model):
            # a new Parameter: the tied LM head gets its own quantized copy, wte stays as trained
            m.weight = nn.Parameter(fake_quant(m.weight, bits, weights), requires_grad=False)
    if acts:
        on_activations(model, lambda name, x: x if sites is not None and name not in sites else
                       fake_quant(x, bits, acts, amax[name].max() if acts == "tensor" else None), residual)
    return model


@torch.no_grad()
def smoothed(model, amax, alpha):
    """SmoothQuant: X' = X / s and W' = W * s per input channel j, s_j = max|X_j|^alpha /
    max|W_j|^(1 - alpha), with 1/s folded into what produces X: the LayerNorm of QKV, of fc
    and of the LM head (whose weight becomes a copy, so that wte stays), and the V rows of
    QKV for attention out. The MLP's down projection follows a GELU, which nothing linear
    can absorb a scale into: it stays unsmoothed, as in SmoothQuant."""
    model = copy.deepcopy(model)

    def factors(name, weight):
        w = weight.float().abs().amax(dim=0).clamp(min=1e-5)
        return amax[name].clamp(min=1e-5).pow(alpha) / w.pow(1 - alpha)

    def scale_columns(layer, s):
        layer.weight = nn.Parameter((layer.weight.float() * s).to(layer.weight.dtype), requires_grad=False)

    def fold_into_layer_norm(name, layer):
        s = factors(name, layer.weight)
        for p in (layer.layer_norm_weight, layer.layer_norm_bias):
            p.copy_(p.float() / s)
        scale_columns(layer, s)

    C = model.config.n_embd
    for i, block in enumerate(model.transformer.h):
        fold_into_layer_norm(f"transformer.h.{i}.attn.c_attn", block.attn.c_attn)
        fold_into_layer_norm(f"transformer.h.{i}.mlp.c_fc", block.mlp.c_fc)
        qkv, out = block.attn.c_attn, block.attn.c_proj
        s = factors(f"transformer.h.{i}.attn.c_proj", out.weight)  # attention is linear in V, channel by channel
        qkv.weight[2 * C:].copy_(qkv.weight[2 * C:].float() / s[:, None])
        if qkv.bias is not None:
            qkv.bias[2 * C:].copy_(qkv.bias[2 * C:].float() / s)
        scale_columns(out, s)
    fold_into_layer_norm("lm_head", model.lm_head)
    return model


def settings(bits):
    """Table 3's columns: name -> (weight granularity, activation granularity)."""
    w, a = f"W{bits}", f"A{bits}"
    return {"BF16": (None, None), f"{a}(T)": (None, "tensor"), f"{a}(K)": (None, "token"),
            f"{w}(T)": ("tensor", None), f"{w}(C)": ("channel", None),
            f"{w}(T){a}(T)": ("tensor", "tensor"), f"{w}(T){a}(K)": ("tensor", "token"),
            f"{w}(C){a}(T)": ("channel", "tensor"), f"{w}(C){a}(K)": ("channel", "token")}


def calibration_offsets(ev, windows):
    """The training windows the static scales are calibrated on, picked by the run's seed."""
    return D.train_offsets(ev.run["seed"], 0, windows, len(ev.train_data), ev.block_size)


def val_ppl(ev, transform=None, label="BF16", model=None):
    """The val PPL of ev's model (or `model`) on ev's val windows, after transform (bench/eval.py)."""
    return evaluate(ev.model if model is None else model, ev.val_data, ev.offsets, ev.block_size, ev.micro_batch_size,
                    ev.backend, transform=transform, stats=False, progress=label)["val_ppl"]


def ptq_table(ev, bits=8, calib_windows=32, residual=False, smoothquant_alpha=0.0, log=None):
    """{setting: val PPL} for one loaded model (bench/eval.load)."""
    model = ev.model
    offsets = calibration_offsets(ev, calib_windows)
    amax = calibrate(model, ev, offsets)

    def ppl(m, weights=None, acts=None, res=residual, scales=amax):
        transform = None if weights is acts is None else (
            lambda m: quantized(m, bits, weights, acts, res, scales))
        return val_ppl(ev, transform, f"W({weights or '-'}) A({acts or '-'}){' +Res' if res else ''}", m)

    table = {}
    for name, (w, a) in settings(bits).items():
        table[name] = ppl(model, w, a)
        if log:
            log(f"  {name:>12}: {table[name]:.4f}")
    if smoothquant_alpha > 0:
        smooth = smoothed(model, amax, smoothquant_alpha)
        smooth_amax = calibrate(smooth, ev, offsets)  # the static scales of the smoothed model
        for a, col in (("tensor", f"W{bits}(C)A{bits}(T)"), ("token", f"W{bits}(C)A{bits}(K)")):
            for res in (False, True):
                suffix = "+Res" if res else ""
                table[f"{col} AbsMax{suffix}"] = table[col] if res == residual else ppl(model, "channel", a, res)
                table[f"{col} SmoothQuant{suffix}"] = ppl(smooth, "channel", a, res, smooth_amax)
    return table


def site_table(ev, bits=4, calib_windows=32, log=None):
    """(BF16 val PPL, {site: row}): for every activation site, its calibrated max|X| (`amax`), the
    median over its channels of their max|X| (`median_channel`), and the val PPL with that site
    alone quantized per tensor with its static scale (`ppl`, and `change` against BF16)."""
    amax = calibrate(ev.model, ev, calibration_offsets(ev, calib_windows))
    bf16, rows = val_ppl(ev), {}
    for site, channels in amax.items():
        p = val_ppl(ev, lambda m, site=site: quantized(m, bits, None, "tensor", True, amax, {site}), site)
        rows[site] = dict(amax=channels.max().item(), median_channel=channels.median().item(), ppl=p, change=p / bf16 - 1)
        if log:
            r = rows[site]
            log(f"{site:<32} {r['amax']:>9.2f} {r['median_channel']:>9.3f} {r['amax'] / max(r['median_channel'], 1e-12):>8.1f} "
                f"{p:>9.3f} {100 * r['change']:>+8.1f}%")
    return bf16, rows


def seed_groups(rows):
    """[(label, [table per seed])]: the rows of runs that differ only in their seed (bench/runs.py
    experiment_key) together, in the order given; a --hf model is a group of its own."""
    groups = {}
    for name, table, config in rows:
        key = ("hf", name) if config is None else experiment_key({"config": config})
        groups.setdefault(key, []).append((name, table))
    return [(members[0][0] + (f" (+{len(members) - 1} seeds)" if len(members) > 1 else ""), [t for _, t in members])
            for members in groups.values()]


def print_tables(rows, bits, residual, alpha):
    """Tables 3 and 4 (a cell of several seeds: mean ± sd), then every setting's change against
    each model's own BF16 PPL, paired by seed."""
    w, a = f"W{bits}", f"A{bits}"
    cols = list(settings(bits))
    groups = seed_groups(rows)
    width = 17 if any(len(tables) > 1 for _, tables in groups) else 11
    label = max([40] + [len(name) for name, _ in groups])  # a run's whole path: the seeds' suffixes tell runs apart

    def cell(tables, key, spec=".2f", suffix=""):
        values = [t[key] for t in tables]
        text = fmt_mean_sd(values, spec) + suffix if all(math.isfinite(v) and v < 1e6 for v in values) else \
            fmt_mean_sd(values, ".3g")
        return f"{text:>{width}}"
    print(f"\nTable 3: val PPL under {bits}-bit AbsMax PTQ (residual stream {'quantized' if residual else 'in BF16'})")
    print(f"{'model':<{label}} {'BF16 PPL':>{width}} | {'Act. only ' + a:^{2 * width + 1}} | {'Weight only ' + w:^{2 * width + 1}} | "
          f"{'Full ' + w + a:^{4 * width + 3}}")
    print(f"{'':<{label}} {'':>{width}} | {'per-tensor':>{width}} {'per-token':>{width}} | {'per-tensor':>{width}} "
          f"{'per-channel':>{width}} | " + " ".join(f"{c:>{width}}" for c in cols[5:]))
    for name, tables in groups:
        print(f"{name:<{label}} {cell(tables, 'BF16')} | {cell(tables, cols[1])} {cell(tables, cols[2])} | "
              f"{cell(tables, cols[3])} {cell(tables, cols[4])} | " + " ".join(cell(tables, c) for c in cols[5:]))
    extra = []
    if alpha > 0:
        ct, ck = f"{w}(C){a}(T)", f"{w}(C){a}(K)"
        print(f"\nTable 4: {ct} / {ck}, SmoothQuant (alpha {alpha}) and AbsMax, residual stream quantized or not")
        print(f"{'model':<{label}} {'BF16 PPL':>{width}}  {'method':<12} {'Res.?':<5} {ct:>{width}} {ck:>{width}}")
        for name, tables in groups:
            for method in ("AbsMax", "SmoothQuant"):
                for res in (False, True):
                    key = f" {method}{'+Res' if res else ''}"
                    extra += [ct + key, ck + key]
                    print(f"{name:<{label}} {cell(tables, 'BF16')}  {method:<12} {'Yes' if res else 'No':<5} "
                          f"{cell(tables, ct + key)} {cell(tables, ck + key)}")
    print(f"\nThe change each setting makes to the model's own BF16 PPL (PPL / PPL_BF16 - 1, paired by seed; "
          f"residual stream {'quantized' if residual else 'in BF16'} unless +Res)")
    keys = cols[1:] + list(dict.fromkeys(extra))
    for name, tables in groups:
        changes = [{k: 100 * (t[k] / t["BF16"] - 1) for k in keys} for t in tables]
        print(f"{name:<{label}} " + ", ".join(f"{k.strip()} {fmt_mean_sd([c[k] for c in changes], '+.1f')}%"
                                                for k in keys))


def run_config(out_dir):
    with open(os.path.join(out_dir, "run.json")) as f:
        return json.load(f)["config"]


def main(argv):
    # --out_dir and --hf may repeat: each names one model (one row)
    models = [a for a in argv if a.startswith(("--out_dir=", "--hf="))]
    rest = [a for a in argv if a not in models]
    cfg = configure_or_exit(dict({k: v for k, v in LOAD_DEFAULTS.items() if k not in ("out_dir", "hf", "precision")},
                                 bits=8, calib_windows=32, residual=False, smoothquant_alpha=0.0, json=False,
                                 per_site=False), rest)
    if not models:
        fail("give the models to quantize: --out_dir=RUN (train.py runs) and/or --hf=DIR (Hugging Face GPT-2)")
    if not 2 <= cfg["bits"] <= 16 or cfg["calib_windows"] < 1 or not 0 <= cfg["smoothquant_alpha"] <= 1:
        fail("--bits must be in 2..16, --calib_windows >= 1 and --smoothquant_alpha in [0, 1] (0: no SmoothQuant)")
    load_args = {k: cfg[k] for k in LOAD_DEFAULTS if k in cfg}
    rows = []
    for m in models:
        key, _, value = m[2:].partition("=")
        ev = load(**load_args, precision="bf16", **{key: value})
        try:
            ev.train_data = D.open_split(ev.data_dir, "train", ev.block_size)
        except D.DataError as e:
            fail(f"calibration needs the training split: {e}")
        print(f"{ev.name}: {len(ev.offsets)} val windows of {ev.block_size} tokens, "
              f"{cfg['calib_windows']} calibration windows", flush=True)
        if cfg["per_site"]:
            print(f"{cfg['bits']}-bit per-tensor activations, one site at a time (residual stream sites included)\n"
                  f"{'site':<32} {'max|X|':>9} {'median ch':>9} {'ratio':>8} {'val PPL':>9} {'change':>9}", flush=True)
            bf16, sites = site_table(ev, cfg["bits"], cfg["calib_windows"], log=lambda s: print(s, flush=True))
            print(f"{'BF16':<32} {'':>9} {'':>9} {'':>8} {bf16:>9.3f}", flush=True)
            if cfg["json"]:
                print(json.dumps({"model": ev.name, "BF16": bf16, "sites": sites}))
            continue
        rows.append((ev.name, ptq_table(ev, cfg["bits"], cfg["calib_windows"], cfg["residual"],
                                        cfg["smoothquant_alpha"], log=lambda s: print(s, flush=True)),
                     None if key == "hf" else run_config(value)))
    if cfg["per_site"]:
        return rows
    print_tables(rows, cfg["bits"], cfg["residual"], cfg["smoothquant_alpha"])
    if cfg["json"]:
        for _, t, _ in rows:
            print(json.dumps({k: (v if math.isfinite(v) else None) for k, v in t.items()}))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
