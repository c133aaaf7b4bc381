"""
Why static per-tensor 4-bit activations break the miniature TWEO models when every GEMM input is
quantized together (A4(T) +278%) though no single input costs more than +3.6% (results/mini.md,
issue 21). For one run, with bench/ptq.py's calibration and fake quantization:

  - the val PPL with groups of GEMM inputs quantized: attention's (QKV, attention out), the MLP's
    (fc and fc proj, then each alone), the LM head's, and the GEMM inputs of blocks 0..k for every k;
  - with all of them quantized, the fraction of each site's values beyond its calibrated max|X|
    (clipped by the static scale: an upstream error that pushes values past the calibrated range),
    and of its nonzero values that round to zero;
  - all of them with the static scales widened (x1.5, x2): if clipping is the failure, headroom
    recovers the PPL; if rounding noise is, it makes things worse;
  - how far the residual stream (every block's output) moves, block by block, with the attention
    inputs, the MLP inputs or all of them quantized.

    python results/mini/analysis/compound.py --out_dir=out/mini21/mini_bf16_tweo [--bits=4] [--eval_iters=16] [--json]
"""
import json
import sys

import torch

import data as D
from bench.eval import LOAD_DEFAULTS, load
from bench.ptq import calibrate, calibration_offsets, fake_quant, on_activations, quantized, val_ppl as ppl
from configurator import configure_or_exit, fail


def site_fractions(ev, amax, bits, sites):
    """With every site in `sites` quantized per tensor (static scale), over the val windows, the
    fraction of each one's values beyond its calibrated max|X| (clipped) and of its nonzero values
    that round to zero (below half a step, max|X| / (2^bits - 2))."""
    counts = {s: torch.zeros(4, dtype=torch.float64) for s in sites}

    def fn(name, x):
        if name not in sites:
            return x
        a, y = amax[name].max(), x.detach().abs().float()
        nonzero = y > 0
        counts[name] += torch.stack([(y > a).sum(), torch.tensor(y.numel()), (nonzero & (y < a / (2 ** bits - 2))).sum(),
                                     nonzero.sum()]).double()
        return fake_quant(x, bits, "tensor", a)

    undo = on_activations(ev.model, fn)
    try:
        ppl(ev, label="counting clipped and zeroed values")
    finally:
        for u in undo:
            u()
    return {s: {"clipped": (c[0] / c[1]).item(), "zeroed": (c[2] / c[3]).item()} for s, c in counts.items()}


@torch.no_grad()
def residual_drift(ev, quantized_model, windows=8):
    """||h_q - h|| / ||h|| of every block's output h on the first val windows: how far the quantized
    model's residual stream has moved from the model's, block by block."""
    x, _ = D.get_batch(ev.val_data, ev.offsets[:windows], ev.block_size, next(ev.model.parameters()).device)
    outputs = []
    for m in (ev.model, quantized_model):
        seen = []
        hooks = [b.register_forward_hook(lambda mod, args, out: seen.append(out.float())) for b in m.transformer.h]
        try:
            with ev.backend.autocast(m):
                m(x)
        finally:
            for h in hooks:
                h.remove()
        outputs.append(seen)
    return [((q - h).norm() / h.norm()).item() for h, q in zip(*outputs)]


def main(argv):
    cfg = configure_or_exit(dict({k: v for k, v in LOAD_DEFAULTS.items() if k not in ("hf", "precision")},
                                 bits=4, calib_windows=32, json=False), argv)
    if not 2 <= cfg["bits"] <= 16 or cfg["calib_windows"] < 1:
        fail("--bits must be in 2..16 and --calib_windows >= 1")
    ev = load(**{k: cfg[k] for k in LOAD_DEFAULTS if k in cfg and k != "precision"}, precision="bf16")
    try:
        ev.train_data = D.open_split(ev.data_dir, "train", ev.block_size)
    except D.DataError as e:
        fail(f"calibration needs the training split: {e}")
    bits = cfg["bits"]
    amax = calibrate(ev.model, ev, calibration_offsets(ev, cfg["calib_windows"]))
    gemm_sites = [s for s in amax if not s.startswith("h.")]  # h.N.input / h.N.output: the residual stream
    n_layer = ev.model.config.n_layer
    in_block = lambda s, i: s.startswith(f"transformer.h.{i}.")  # noqa: E731
    groups = {"attention": [s for s in gemm_sites if ".attn." in s], "mlp": [s for s in gemm_sites if ".mlp." in s],
              "mlp fc (after ln_2)": [s for s in gemm_sites if s.endswith(".mlp.c_fc")],
              "mlp proj (after the GELU)": [s for s in gemm_sites if s.endswith(".mlp.c_proj")],
              "lm_head": [s for s in gemm_sites if not s.startswith("transformer.h.")],
              **{f"blocks 0..{k}": [s for s in gemm_sites if any(in_block(s, i) for i in range(k + 1))]
                 for k in range(n_layer)},
              "all": gemm_sites}
    print(f"{ev.name}: {len(ev.offsets)} val windows, {cfg['calib_windows']} calibration windows, "
          f"{bits}-bit static per-tensor activations", flush=True)
    bf16 = ppl(ev)
    print(f"{'group':<28} {'sites':>5} {'val PPL':>9} {'change':>9}\n{'BF16':<28} {'':>5} {bf16:>9.3f}", flush=True)
    result = {"model": ev.name, "BF16": bf16, "groups": {}, "headroom": {}}
    for name, sites in groups.items():
        p = ppl(ev, lambda m, sites=set(sites): quantized(m, bits, None, "tensor", False, amax, sites), name)
        result["groups"][name] = p
        print(f"{name:<28} {len(sites):>5} {p:>9.3f} {100 * (p / bf16 - 1):>+8.1f}%", flush=True)
    for factor in (1.5, 2.0):
        wide = {s: a * factor for s, a in amax.items()}
        p = ppl(ev, lambda m: quantized(m, bits, None, "tensor", False, wide, set(gemm_sites)), f"x{factor:g}")
        result["headroom"][f"{factor:g}"] = p
        print(f"{f'all, scales x{factor:g}':<28} {len(gemm_sites):>5} {p:>9.3f} {100 * (p / bf16 - 1):>+8.1f}%", flush=True)
    fractions = site_fractions(ev, amax, bits, set(gemm_sites))
    result["sites"] = fractions
    print("\nall quantized: per GEMM input, the fraction of its values beyond its calibrated max|X| (clipped)\n"
          f"and of its nonzero values that round to zero\n{'site':<32} {'clipped':>9} {'zeroed':>9}")
    for s in gemm_sites:
        print(f"{s:<32} {fractions[s]['clipped']:>9.2e} {fractions[s]['zeroed']:>9.3f}")
    result["drift"] = {}
    print(f"\n||h_q - h|| / ||h|| of each block's output (the residual stream), {min(8, len(ev.offsets))} val windows\n"
          f"{'quantized':<28} " + " ".join(f"{f'h.{i}':>7}" for i in range(n_layer)))
    for name in ("attention", "mlp fc (after ln_2)", "mlp proj (after the GELU)", "all"):
        drift = residual_drift(ev, quantized(ev.model, bits, None, "tensor", False, amax, set(groups[name])))
        result["drift"][name] = drift
        print(f"{name:<28} " + " ".join(f"{d:>7.3f}" for d in drift), flush=True)
    if cfg["json"]:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
