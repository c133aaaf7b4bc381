"""
Where a model's extreme activations sit, as Sun et al. ("Massive Activations in Large Language
Models") locate them: the layer, the token position, the token and the channel of the block
outputs' largest values, and whether they are massive activations of the paper's kind (a few
tokens, in a few fixed channels) or channel-wide (a few channels, on many ordinary tokens).

    python bench/outliers.py --out_dir=RUN [--ckpt=last] [--windows=64] [--top=10] [--json]
    python bench/outliers.py --hf=DIR --data_dir=data/openwebtext [--block_size=N] ...

Massive: |value| >= 100 and >= 1000 x the median |value| of that layer's block output (Sun et
al.'s criterion), over --windows val windows, in BF16. Per layer: the largest |value|, the
massive elements, the channels they sit in, the share of token positions holding one, the
share of those at position 0, and the tokens holding most; and the channel of the layer's largest value: its median |value|
and the share of positions where it exceeds 10 x the layer's median (large on a few tokens, or
on nearly every token). Then the --top largest values of
the whole model, and one verdict from the layers that have massive activations:
  few tokens, fixed channels  at most 4 channels, on at most 2% of the token positions
  channel-wide                at most 4 channels, on more than 2% of the positions
  spread                      more than 4 channels
  none                        no massive activation in any layer
"""
import collections
import json
import sys

import torch

import data as D
from bench.eval import LOAD_DEFAULTS, load
from configurator import configure_or_exit, fail
from prepare_openwebtext import gpt2_tokenizer, load_vocab_map

MASSIVE_ABS, MASSIVE_RATIO = 100.0, 1000.0  # Sun et al.: >= 100 in magnitude, ~1000x the median
FEW_CHANNELS, FEW_TOKENS = 4, 0.02


@torch.no_grad()
def block_outputs(ev, windows):
    """(tokens [windows, T], [layer] -> block outputs [windows, T, C] in fp32), in BF16."""
    offsets = D.val_offsets(windows, len(ev.val_data), ev.block_size)
    device = next(ev.model.parameters()).device
    tokens, _ = D.get_batch(ev.val_data, offsets, ev.block_size, device)
    outputs = [[] for _ in ev.model.transformer.h]
    hooks = [block.register_forward_hook(lambda m, i, out, l=l: outputs[l].append(out.float()))
             for l, block in enumerate(ev.model.transformer.h)]
    try:
        for b in range(0, windows, ev.micro_batch_size):
            with ev.backend.autocast(ev.model):
                ev.model(tokens[b:b + ev.micro_batch_size])
    finally:
        for h in hooks:
            h.remove()
    return tokens, [torch.cat(parts) for parts in outputs]


def locate(tokens, outputs, decode, top=10):
    """Per layer, where its massive activations sit; the `top` largest values of the model; a verdict."""
    layers, everything = [], []
    n_positions = tokens.numel()
    for l, out in enumerate(outputs):
        mags = out.abs()
        median = mags.median().item()
        massive = mags >= max(MASSIVE_ABS, MASSIVE_RATIO * median)
        w, t, c = massive.nonzero(as_tuple=True)
        positions = {(a, b) for a, b in zip(w.tolist(), t.tolist())}
        token_counts = collections.Counter(decode(int(tokens[a, b])) for a, b in positions)
        # the channel of the layer's largest value: large on a few tokens, or on every token?
        top_channel = int(mags.flatten().argmax()) % out.shape[2]
        channel = mags[..., top_channel]
        layers.append({"layer": l, "max": mags.max().item(), "median": median, "massive": len(w),
                       "top_channel": top_channel, "top_channel_median": channel.median().item(),
                       "top_channel_share_10x": (channel >= 10 * median).float().mean().item(),
                       "channels": collections.Counter(c.tolist()).most_common(),
                       "positions": len(positions), "position_share": len(positions) / n_positions,
                       "at_position_0": sum(b == 0 for _, b in positions) / len(positions) if positions else None,
                       "tokens": token_counts.most_common(5)})
        values, flat = mags.flatten().topk(min(top, mags.numel()))
        for v, i in zip(values.tolist(), flat.tolist()):
            a, rest = divmod(i, out.shape[1] * out.shape[2])
            b, ch = divmod(rest, out.shape[2])
            everything.append({"value": out[a, b, ch].item(), "abs": v, "layer": l, "window": a, "position": b,
                               "channel": ch, "token": decode(int(tokens[a, b]))})
    largest = sorted(everything, key=lambda r: -r["abs"])[:top]
    with_massive = [r for r in layers if r["massive"]]
    channels = {ch for r in with_massive for ch, _ in r["channels"]}
    share = max((r["position_share"] for r in with_massive), default=0.0)
    verdict = "none" if not with_massive else "spread" if len(channels) > FEW_CHANNELS else \
        "few tokens, fixed channels" if share <= FEW_TOKENS else "channel-wide"
    return {"layers": layers, "largest": largest, "verdict": verdict, "massive_channels": sorted(channels),
            "largest_position_share": share}


def token_decoder(ev):
    """token id -> its text (repr), through the compact vocabulary's map where the data has one."""
    enc, id_map = gpt2_tokenizer(), load_vocab_map(ev.data_dir)
    return lambda i: repr(enc.decode([int(id_map[i]) if id_map is not None else i]))


def main(argv):
    cfg = configure_or_exit(dict({k: v for k, v in LOAD_DEFAULTS.items() if k not in ("precision", "eval_iters")},
                                 windows=64, top=10, json=False), argv)
    for key in ("windows", "top"):
        if cfg[key] < 1:
            fail(f"--{key} must be >= 1")
    ev = load(**{k: cfg[k] for k in LOAD_DEFAULTS if k in cfg}, precision="bf16")
    tokens, outputs = block_outputs(ev, cfg["windows"])
    result = dict(locate(tokens, outputs, token_decoder(ev), cfg["top"]), run=ev.name, windows=cfg["windows"],
                  block_size=ev.block_size)
    print(f"{ev.name}: block outputs on {cfg['windows']} val windows of {ev.block_size} tokens, BF16. Massive: |value| >= "
          f"{MASSIVE_ABS:g} and >= {MASSIVE_RATIO:g} x the layer's median |value|")
    print("| layer | max abs | median abs | channel of the max: its median abs, positions > 10x the layer median | "
          "massive | channels (elements) | positions holding one | at position 0 | tokens holding most |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in result["layers"]:
        chans = ", ".join(f"{ch} ({n})" for ch, n in r["channels"][:3]) + (" ..." if len(r["channels"]) > 3 else "")
        print(f"| {r['layer']} | {r['max']:.4g} | {r['median']:.3g} | {r['top_channel']}: {r['top_channel_median']:.3g}, "
              f"{100 * r['top_channel_share_10x']:.1f}% | {r['massive']} | {chans or '-'} | "
              f"{r['positions']} ({100 * r['position_share']:.2f}%) | "
              + (f"{100 * r['at_position_0']:.0f}%" if r["at_position_0"] is not None else "-") + " | "
              + (", ".join(f"{t} ({n})" for t, n in r["tokens"][:3]) or "-") + " |")
    print(f"\nThe {len(result['largest'])} largest |block outputs|:\n| value | layer | window | position | channel | token |\n"
          "|---|---|---|---|---|---|")
    for r in result["largest"]:
        print(f"| {r['value']:.4g} | {r['layer']} | {r['window']} | {r['position']} | {r['channel']} | {r['token']} |")
    print(f"\nVerdict: {result['verdict']} (massive activations in channels {result['massive_channels'] or '-'}, on at most "
          f"{100 * result['largest_position_share']:.2f}% of the token positions of a layer)")
    if cfg["json"]:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
