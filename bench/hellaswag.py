"""
HellaSwag validation accuracy of a trained model, scored as karpathy/llm.c (dev/data/hellaswag.py)
and build-nanogpt score it: the number GPT-2 reproductions report next to their val loss.

    python bench/hellaswag.py --out_dir=out/gpt2_xl_fp8_tweo [--ckpt=best|last|TAG] [--precision=bf16|fp8]
    python bench/hellaswag.py --hf=DIR [--data=FILE] [--limit=N] [--jsonl=FILE] [--batch_size=N] [--device=cuda]

An example is a context and 4 endings, one of them right (its label). Each ending, with a space
in front, follows the context's tokens, and the model's loss is taken over the ending's tokens
only. acc_norm: the ending of lowest mean loss per token is the prediction (llm.c's number);
acc: the one of lowest summed loss. Both are printed with their standard error sqrt(p(1-p)/n);
--jsonl=FILE writes every example's losses and predictions, one JSON object a line.

Data: data/hellaswag/hellaswag_val.jsonl, the 10,042 validation examples of the HellaSwag
authors' repository (rowanz/hellaswag), downloaded once when missing and checked against their
git blob id. --data=FILE scores a local file of the same format as given, and says whether it is
the official one.

The model runs as bench/eval.py runs it: in the precision it was trained in (or --precision),
FP8 with the checkpoint's own scaling state, --batch_size examples (4 rows each, right-padded)
a forward. The softmax is over the real vocabulary (GPT-2's 50257), so a run and its export
(bench/export_hf.py) score the same. A context and ending longer than block_size + 1 tokens
lose the start of the context (counted; GPT-2's 1024 positions hold every HellaSwag example).
Runs on a compact vocabulary are refused: they have no ids for most of HellaSwag's text.
"""
import hashlib
import json
import math
import os
import sys
import urllib.request

import torch
import torch.nn.functional as F

from bench.eval import LOAD_DEFAULTS, load_model
from bench.export_hf import read_run_json, run_vocabulary
from configurator import configure_or_exit, fail, first_violation, progress_bar, writable_file, write_atomically
from prepare_openwebtext import GPT2_VOCAB_SIZE, gpt2_tokenizer

OFFICIAL_PATH = os.path.join("data", "hellaswag", "hellaswag_val.jsonl")
OFFICIAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
OFFICIAL_BLOB = "0f5ee25d72216f12317d5d8a7b92deafa423d81e"  # `git hash-object` of that file
DEFAULTS = dict({k: LOAD_DEFAULTS[k] for k in ("out_dir", "hf", "ckpt", "precision", "device")},
                data="", limit=0, jsonl="", batch_size=8)


def git_blob_id(content):
    """What `git hash-object` prints for a file with these bytes."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def official_file():
    """The official validation file, downloaded to OFFICIAL_PATH (once) if it is not there."""
    if os.path.exists(OFFICIAL_PATH):
        return OFFICIAL_PATH
    try:
        with urllib.request.urlopen(OFFICIAL_URL, timeout=60) as r:
            content = r.read()
    except OSError as e:  # no network among them
        fail(f"{OFFICIAL_PATH} not found and not downloadable ({getattr(e, 'reason', e)}): "
             f"download {OFFICIAL_URL} there, or give --data=FILE")
    if git_blob_id(content) != OFFICIAL_BLOB:
        fail(f"{OFFICIAL_URL} sent a file whose git blob id is {git_blob_id(content)}, not {OFFICIAL_BLOB}: not saved")
    write_atomically(OFFICIAL_PATH, content)
    print(f"downloaded {OFFICIAL_URL} to {OFFICIAL_PATH}")
    return OFFICIAL_PATH


def read_examples(path):
    """(examples, the file's git blob id): the lines of a HellaSwag jsonl file, each with a
    ctx, 4 endings and a label. A line that is not one exits, naming it."""
    try:
        with open(path, "rb") as f:
            content = f.read()
    except OSError as e:
        fail(f"{path}: {e.strerror}: give a HellaSwag jsonl file (the official one: {OFFICIAL_URL})")
    examples = []
    for n, line in enumerate(content.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
            ok = isinstance(ex["ctx"], str) and len(ex["endings"]) == 4 and all(isinstance(e, str) for e in ex["endings"]) \
                and ex["label"] in (0, 1, 2, 3)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            fail(f"{path}:{n} is not a HellaSwag example (a JSON object with a ctx, 4 endings and a label 0-3)")
        examples.append(ex)
    return examples, git_blob_id(content)


def example_rows(example, enc, block_size):
    """(tokens, number of ending tokens at their end) of each of the example's 4 endings,
    and whether the context had to be cut to fit block_size + 1 tokens."""
    ctx = enc.encode_ordinary(example["ctx"])
    rows, cut = [], False
    for ending in example["endings"]:
        end = enc.encode_ordinary(" " + ending)  # a word after the context starts with its space in GPT-2's BPE
        tokens = (ctx + end)[-(block_size + 1):]
        cut |= len(tokens) < len(ctx) + len(end)
        rows.append((tokens, min(len(end), len(tokens) - 1)))
    return rows, cut


@torch.no_grad()
def ending_losses(model, autocast, rows, n_vocab):
    """(summed loss, number of tokens) over each row's ending, the rows right-padded into one
    batch: position t predicts token t+1, and padding after a row cannot reach it (causal)."""
    device = next(model.parameters()).device
    T = -(-(max(len(tokens) for tokens, _ in rows) - 1) // 8) * 8  # Transformer Engine's FP8 GEMMs take 8k tokens
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)  # -1: not an ending token, no loss
    for i, (tokens, n_end) in enumerate(rows):
        x[i, :len(tokens) - 1] = torch.tensor(tokens[:-1])
        y[i, len(tokens) - 1 - n_end:len(tokens) - 1] = torch.tensor(tokens[-n_end:])
    x, y = x.to(device), y.to(device)
    with autocast():
        logits = model(x, y).logits
    loss = F.cross_entropy(logits[..., :n_vocab].float().reshape(-1, n_vocab), y.reshape(-1), ignore_index=-1,
                           reduction="none").view(y.shape)
    return loss.double().sum(1).tolist(), (y >= 0).sum(1).tolist()


def score(model, autocast, examples, enc, n_vocab, batch_size=8):
    """Per example: the endings' summed and mean losses, both predictions and the label."""
    results = []
    with progress_bar(total=len(examples), desc="hellaswag", unit="example") as bar:
        for start in range(0, len(examples), batch_size):
            batch = examples[start:start + batch_size]
            rows_cut = [example_rows(ex, enc, model.config.block_size) for ex in batch]
            sums, counts = ending_losses(model, autocast, [row for rows, _ in rows_cut for row in rows], n_vocab)
            for i, (ex, (_, cut)) in enumerate(zip(batch, rows_cut)):
                s, n = sums[4 * i:4 * i + 4], counts[4 * i:4 * i + 4]
                mean = [a / b for a, b in zip(s, n)]
                results.append({"ind": ex.get("ind"), "label": ex["label"], "pred": s.index(min(s)),
                                "pred_norm": mean.index(min(mean)), "sum_loss": s, "mean_loss": mean, "n_tokens": n,
                                "context_cut": cut})
            bar.update(len(batch))
    return results


def accuracy(results, key):
    """(fraction of examples whose `key` prediction is the label, its standard error)."""
    p = sum(r[key] == r["label"] for r in results) / len(results)
    return p, math.sqrt(p * (1 - p) / len(results))


def main(argv):
    cfg = configure_or_exit(DEFAULTS, argv)
    problem = first_violation(cfg, [("limit", lambda v: v >= 0, ">= 0 (0: every example)"),
                                    ("batch_size", lambda v: v >= 1, ">= 1 (examples per forward)"),
                                    ("jsonl", lambda v: not v or writable_file(v),
                                     "a file in a directory this process can write"),
                                    ("jsonl", lambda v: not v or not os.path.exists(v),
                                     "a file that does not exist yet (results are never overwritten)")])
    if problem:
        fail(problem)
    path = cfg["data"] or official_file()
    examples, blob = read_examples(path)
    if not examples:
        fail(f"{path} holds no examples")
    examples = examples[:cfg["limit"] or None]
    print(f"{path} is the official HellaSwag validation file (git blob {blob})" if blob == OFFICIAL_BLOB else
          f"{path} is not the official HellaSwag validation file (git blob {blob}, not {OFFICIAL_BLOB}): scored as given")
    if not cfg["hf"]:
        model_args, config = read_run_json(cfg["out_dir"])
        n_vocab, _, compact = run_vocabulary(config, model_args["vocab_size"])
        if compact:
            fail(f"{cfg['out_dir']} was trained on a compact vocabulary of {n_vocab} ids ({config['data_dir']}): "
                 f"it has no ids for most of HellaSwag's GPT-2 tokens")
    ev = load_model(cfg["out_dir"], cfg["hf"], cfg["ckpt"], cfg["precision"], device=cfg["device"])
    if cfg["hf"]:
        n_vocab = ev.info["hf_vocab_size"]
        if n_vocab < GPT2_VOCAB_SIZE:
            fail(f"{cfg['hf']} has {n_vocab} tokens, fewer than GPT-2's {GPT2_VOCAB_SIZE}: not a model of GPT-2's ids")
    results = score(ev.model, lambda: ev.backend.autocast(ev.model), examples, gpt2_tokenizer(), n_vocab,
                    cfg["batch_size"])
    if cfg["jsonl"]:
        os.makedirs(os.path.dirname(cfg["jsonl"]) or ".", exist_ok=True)
        with open(cfg["jsonl"], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    (acc_norm, acc_norm_se), (acc, acc_se) = accuracy(results, "pred_norm"), accuracy(results, "pred")
    n_cut = sum(r["context_cut"] for r in results)
    print(f"{ev.name} ({'' if cfg['hf'] else cfg['ckpt'] + ', '}{ev.precision}): HellaSwag acc_norm "
          f"{acc_norm:.4f} ± {acc_norm_se:.4f}, acc {acc:.4f} ± {acc_se:.4f} over {len(results)} examples of {path}"
          + (f" ({n_cut} with their context cut to the block size {ev.model.config.block_size})" if n_cut else ""))
    return {"acc_norm": acc_norm, "acc_norm_se": acc_norm_se, "acc": acc, "acc_se": acc_se, "examples": len(results),
            "context_cut": n_cut, "official": blob == OFFICIAL_BLOB, "results": results}


if __name__ == "__main__":
    main(sys.argv[1:])
