"""
The Contradiction Stethoscope (paper Sec. 3.1, supplementary A): do extreme outliers come
from the trained weights or from the data?

    python bench/stethoscope.py --out_dir=RUN [--ckpt=best] [--windows=64] [--seed=0] [--png=PATH] [--json]
    python bench/stethoscope.py --hf=DIR --data_dir=data/openwebtext [--block_size=N] ...

Per layer, over one batch of --windows windows, the block outputs' Avg Max (the mean over
the samples of each sample's largest value), Avg Min (the same of each sample's smallest)
and Mean-Abs (the mean |value|), under four conditions:
  (a) the trained model on real val windows;
  (b) the trained blocks with wte and wpe freshly initialised (N(0, 0.02), the model's own
      init; the LM head keeps its trained weight), on the same windows;
  (c) the same architecture freshly initialised, on the same windows;
  (d) the trained model on tokens drawn uniformly from the tokenizer's vocabulary (50257
      for GPT-2, a compact-vocabulary run's own ids; the padded entries never), as the
      paper's torch.randint.
And supplementary Table 1: each sample's max |block output| (over every layer, position and
channel) on the real and on the random windows; the Max, Min and Avg Max of those.
Runs in BF16, as bench/eval.py. Writes one PNG with the four panels (--png, default
RUN/stethoscope.png, ./stethoscope.png for --hf; never overwritten).
"""
import copy
import json
import os
import sys

import torch
import torch.nn as nn

import data as D
from bench.eval import LOAD_DEFAULTS, load
from configurator import configure_or_exit, fail, progress_bar, writable_file
from model import build_model

CONDITIONS = {"a": "(a) trained model, real text", "b": "(b) trained blocks, fresh wte + wpe, real text",
              "c": "(c) freshly initialised model, real text", "d": "(d) trained model, uniform random tokens"}
STATS = ("avg_max", "avg_min", "mean_abs")


@torch.no_grad()
def per_sample_stats(model, tokens, micro_batch_size, backend):
    """[n_layer, n_samples, 3]: each sample's max, min and mean |value| of each block output."""
    layers = [[] for _ in model.transformer.h]
    hooks = [block.register_forward_hook(lambda m, i, out, l=l: layers[l].append(torch.stack(
        [out.float().amax(dim=(1, 2)), out.float().amin(dim=(1, 2)), out.float().abs().mean(dim=(1, 2))], dim=1)))
        for l, block in enumerate(model.transformer.h)]
    try:
        for b in range(0, len(tokens), micro_batch_size):
            with backend.autocast(model):
                model(tokens[b:b + micro_batch_size])
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([torch.cat(parts) for parts in layers])


def summarize(stats):
    """The stethoscope's per-layer numbers from per_sample_stats (averages over the samples)."""
    mean = stats.double().mean(dim=1)
    return {name: mean[:, i].tolist() for i, name in enumerate(STATS)}


def peak_statistics(stats):
    """Supplementary Table 1: per-sample max |activation| over all layers; its Max, Min, Avg Max."""
    peaks = torch.maximum(stats[..., 0].abs(), stats[..., 1].abs()).amax(dim=0).double()
    return {"max": peaks.max().item(), "min": peaks.min().item(), "avg_max": peaks.mean().item()}


def fresh_embeddings(model, generator):
    """A copy of model with new wte and wpe drawn as the model initialises them. New
    Parameters: the LM head, tied to wte, keeps the trained weight."""
    model = copy.deepcopy(model)
    for emb in (model.transformer.wte, model.transformer.wpe):
        w = torch.empty(emb.weight.shape).normal_(0.0, 0.02, generator=generator)
        emb.weight = nn.Parameter(w.to(emb.weight), requires_grad=False)
    return model


def fresh_model(model, seed):
    torch.manual_seed(seed)
    p = next(model.parameters())
    return build_model(model.config, model.backend, p.device, p.dtype).eval()


def conditions(ev, windows=64, seed=0):
    """{condition: (model, tokens)} for (a)-(d), on `windows` val windows."""
    model, device = ev.model, next(ev.model.parameters()).device
    offsets = D.val_offsets(windows, len(ev.val_data), ev.block_size)
    real, _ = D.get_batch(ev.val_data, offsets, ev.block_size, device)
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.randint(0, ev.vocab_size, real.shape, generator=generator).to(device)
    return {"a": (model, real), "b": (fresh_embeddings(model, generator), real), "c": (fresh_model(model, seed), real),
            "d": (model, uniform)}


def stethoscope(ev, windows=64, seed=0):
    stats = {k: per_sample_stats(m, tokens, ev.micro_batch_size, ev.backend)
             for k, (m, tokens) in progress_bar(conditions(ev, windows, seed).items(), desc="conditions", leave=False)}
    return {"model": ev.name, "windows": windows, "block_size": ev.block_size,
            "conditions": {k: summarize(s) for k, s in stats.items()},
            "table1": {"real": peak_statistics(stats["a"]), "random": peak_statistics(stats["d"])}}


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    conds = result["conditions"]
    values = [abs(v) for c in conds.values() for s in STATS for v in c[s] if v != 0]
    log = max(values) / min(values) > 20  # values spanning more than ~a decade
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharey=True)
    for ax, (key, title) in zip(axes.flat, CONDITIONS.items()):
        layers = range(len(conds[key]["avg_max"]))
        ax.plot(layers, conds[key]["avg_max"], "o-", color="tab:red", label="Avg Max")
        ax.plot(layers, [-v for v in conds[key]["avg_min"]], "s--", color="tab:blue", label="-Avg Min (negated)")
        ax.plot(layers, conds[key]["mean_abs"], "^:", color="tab:gray", label="Mean-Abs")
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("layer (block index)")
        ax.set_xticks(list(layers) if len(layers) <= 16 else list(layers)[::max(1, len(layers) // 12)])
        if log:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("block output value" + (" (log scale)" if log else ""))
    axes[0, 0].legend(loc="best")
    t1 = result["table1"]
    fig.suptitle(f"Contradiction Stethoscope: {result['model']} ({result['windows']} windows of {result['block_size']} "
                 f"tokens)\nper-sample max |activation|: real text avg {t1['real']['avg_max']:.3g}, "
                 f"random tokens avg {t1['random']['avg_max']:.3g}", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    cfg = configure_or_exit(dict({k: v for k, v in LOAD_DEFAULTS.items() if k not in ("precision", "eval_iters")},
                                 windows=64, seed=0, png="", json=False), argv)
    png = cfg["png"] or os.path.join(cfg["out_dir"] if not cfg["hf"] else ".", "stethoscope.png")
    if cfg["windows"] < 1:
        fail("--windows must be >= 1")
    if os.path.exists(png):
        fail(f"{png} exists; choose another --png (nothing is overwritten)")
    if not writable_file(png):
        fail(f"--png={png} is not a file this process can write (its folder cannot be written or created)")
    ev = load(**{k: cfg[k] for k in LOAD_DEFAULTS if k in cfg}, precision="bf16")
    result = stethoscope(ev, cfg["windows"], cfg["seed"])
    plot(result, png)
    result["png"] = png

    print(f"Contradiction Stethoscope: {ev.name}, block outputs over {cfg['windows']} windows of {ev.block_size} tokens")
    for key, title in CONDITIONS.items():
        print(f"  {title}")
    print(f"{'':>5} " + " | ".join(f"{'(' + k + ')':^29}" for k in CONDITIONS))
    print(f"{'layer':>5} " + " | ".join(f"{'Avg Max':>9} {'Avg Min':>9} {'Mean-Abs':>9}" for k in CONDITIONS))
    for layer in range(len(result["conditions"]["a"]["avg_max"])):
        print(f"{layer:>5} " + " | ".join(
            " ".join(f"{result['conditions'][k][s][layer]:>9.4g}" for s in STATS) for k in CONDITIONS))
    print(f"\nSupplementary Table 1: per-sample max |block output| over {cfg['windows']} windows")
    print(f"{'input':<14} {'Max':>10} {'Min':>10} {'Avg Max':>10}")
    for name, key in (("Real text", "real"), ("Random tokens", "random")):
        t = result["table1"][key]
        print(f"{name:<14} {t['max']:>10.4g} {t['min']:>10.4g} {t['avg_max']:>10.4g}")
    print(f"figure: {png}")
    if cfg["json"]:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
