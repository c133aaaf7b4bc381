"""
Reading the token memmaps written by prepare_openwebtext.py, for train.py and bench/eval.py.

Windows (block_size + 1 tokens) are drawn so that the data depend on the run's seed and
iteration alone, never on the number of GPUs or on a restart:
  - train: iteration `it` uses the global batch of windows drawn from rng([seed, it]);
    rank r at micro-step m takes its slice of it (so 1x2 and 2x1 GPUs see the same tokens,
    and a resumed run sees exactly the batches an uninterrupted one would);
  - val: one fixed list of windows from a stream of its own, shared by train.py and
    bench/eval.py so that their losses are comparable.
"""
import json
import os

import numpy as np
import torch

# The val windows' seed words. They belong to the data, not to the run: runs with different seeds
# are scored on the same text, so a seed-to-seed spread is the training's, not the val sample's.
# 1337 (the default run seed) keeps the windows every seed-1337 run before this change was scored on.
# A training iteration seeds with [seed, it], which numpy's SeedSequence treats as [seed, it, 0]:
# a nonzero last word keeps every iteration (up to 2^32) off the val stream. ([seed, 0x7E0] alone
# was the stream of training iteration 2016.)
VAL_STREAM = (1337, 0x7E0, 1)


class DataError(Exception):
    pass


def open_split(data_dir, split, block_size, vocab_size=None):
    """Memmap of data_dir/{split}.bin, checked against meta.json (when present), the
    block size and the model's vocabulary. Raises DataError with one readable line."""
    path = os.path.join(data_dir, f"{split}.bin")
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path) and os.path.exists(meta_path + ".tmp"):  # prepare_openwebtext.py was stopped
        raise DataError(f"{data_dir} holds an unfinished preparation (meta.json.tmp without meta.json): rerun "
                        f"prepare_openwebtext.py with the same arguments to finish it")
    if not os.path.exists(path):
        raise DataError(f"{path} not found: prepare the data first with `python prepare_openwebtext.py` "
                        f"(or --demo for the small demo corpus, --input FILES for your own)")
    size = os.path.getsize(path)
    if size % 2:
        raise DataError(f"{path} has an odd number of bytes ({size}): not a uint16 token file, or truncated")
    meta = None
    if os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"{meta_path} is unreadable ({e})") from None
        expected = meta.get(split, {}).get("tokens")
        if expected is not None and expected * 2 != size:
            raise DataError(f"{path} holds {size // 2} tokens but meta.json says {expected}: the file is corrupt or incomplete")
    n = size // 2
    if n < block_size + 2:
        raise DataError(f"{path} holds {n} tokens, fewer than the {block_size + 2} that the windows of "
                        f"block_size+1 = {block_size + 1} need (the last token is never a target)")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    if vocab_size is not None:
        data_vocab = meta.get("vocab_size") if meta else None
        if data_vocab is None or split == "val":
            data_vocab = max(data_vocab or 0, int(data.max()) + 1)
        if data_vocab > vocab_size:
            raise DataError(f"the data in {data_dir} needs a vocabulary of {data_vocab} but vocab_size is {vocab_size}")
    return data


def train_offsets(seed, it, n_windows, data_len, block_size):
    rng = np.random.default_rng([seed, it])
    return rng.integers(0, data_len - block_size - 1, size=n_windows)


def val_offsets(n_windows, data_len, block_size):
    rng = np.random.default_rng(VAL_STREAM)
    return rng.integers(0, data_len - block_size - 1, size=n_windows)


def rank_slice(offsets, micro_step, rank, world_size, micro_batch_size):
    start = (micro_step * world_size + rank) * micro_batch_size
    return offsets[start:start + micro_batch_size]


def get_batch(data, offsets, block_size, device):
    xy = torch.from_numpy(np.stack([data[o:o + block_size + 1].astype(np.int64) for o in offsets]))
    x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


@torch.no_grad()
def evaluate(model, data, offsets, block_size, micro_batch_size, device, autocast,
             rank=0, world_size=1, all_reduce=None, progress=""):
    """Mean per-window loss over the fixed val windows. Rank r takes windows r, r+W, …;
    every rank runs the same number of forward passes (ZeRO-3 gathers weights collectively),
    padding with weight-0 windows. `autocast` is a callable returning the backend's context.
    progress: the label of a progress bar on a terminal (configurator.progress_bar); '': none."""
    mine = offsets[rank::world_size]
    n_batches = -(-len(offsets) // (world_size * micro_batch_size))
    total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of window losses, count
    batches = range(n_batches)
    if progress:
        from configurator import progress_bar
        batches = progress_bar(batches, desc=progress, unit="batch", leave=False)
    for b in batches:
        chunk = mine[b * micro_batch_size:(b + 1) * micro_batch_size]
        weight = torch.ones(micro_batch_size, dtype=torch.float64, device=device)
        weight[len(chunk):] = 0
        chunk = np.concatenate([chunk, np.full(micro_batch_size - len(chunk), offsets[0], dtype=offsets.dtype)])
        x, y = get_batch(data, chunk, block_size, device)
        with autocast():
            logits = model(x, y).logits
        # over the last (contiguous) dim: CPU's log-softmax over a strided class dim is 2x slower
        per_window = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none").view(y.shape).mean(dim=1).double()
        total[0] += (per_window * weight).sum()
        total[1] += weight.sum()
    if all_reduce is not None:
        all_reduce(total)
    return (total[0] / total[1]).item()
