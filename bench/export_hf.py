"""
Export a trained model as a Hugging Face GPT-2 (transformers.GPT2LMHeadModel) directory, to use
it outside this repository: lm-evaluation-harness, a model hub, serving, other quantizers.

    python bench/export_hf.py --out_dir=out/gpt2_xl_fp8_tweo --to=export/gpt2_xl_fp8_tweo [--ckpt=best|last|TAG] [--overwrite]
    python bench/export_hf.py --hf=DIR --to=DIR2      # re-export a Hugging Face GPT-2 directory (round trip)

Writes config.json, model.safetensors (bf16, the weights as the model holds them) and
generation_config.json, which GPT2LMHeadModel.from_pretrained(DIR) loads with every weight in
place. The names and layouts are model.hf_gpt2_names, the table --hf=DIR imports with, read
backwards: Conv1D weights transposed, the LayerNorms of QKV / fc / LM head back to ln_1 / ln_2 /
ln_f, the LM head tied to wte, and the padded vocabulary (50304) cut to the real one (GPT-2's
50257; the data's own for other runs), so that the logits over it are the model's.

A run on GPT-2's vocabulary also gets GPT-2's tokenizer (vocab.json, merges.txt,
tokenizer_config.json), built from the local tiktoken ranks (.cache/gpt2.tiktoken, nothing is
downloaded). A run on a compact vocabulary (prepare_openwebtext.py --compact_vocab) gets none:
its ids are positions in the data's vocab_map.npy, which no GPT-2 tokenizer produces.
FP8 runs export their bf16 weights; the FP8 scaling state has no place in a GPT-2 checkpoint.
attn_bias and clipped softmax have no GPT-2 equivalent: such runs are refused. --ckpt is
sample.py's: 'last', 'best', or a DeepSpeed checkpoint tag or folder (read from the ZeRO-3
shards). An existing --to directory is never written into without --overwrite.
"""
import json
import os
import sys

from configurator import configure_or_exit, fail, writable_dir, write_atomically
from model import CheckpointError, hf_gpt2_names, load_hf, load_trained
from prepare_openwebtext import EOT, GPT2_VOCAB_SIZE, gpt2_tokenizer

DEFAULTS = dict(out_dir="out", hf="", ckpt="last", to="", overwrite=False)
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")


def read_run_json(out_dir):
    """(model_args, config) from a train.py run's run.json; one line and exit 2 if it is none."""
    run_json = os.path.join(out_dir, "run.json")
    try:
        with open(run_json) as f:
            run = json.load(f)
        return run["model_args"], run["config"]
    except OSError as e:
        fail(f"{run_json}: {e.strerror}: --out_dir must be a train.py run")
    except (ValueError, KeyError, TypeError) as e:
        fail(f"{run_json} is not a run.json written by train.py ({type(e).__name__}: {e})")


def run_vocabulary(config, vocab_size):
    """(real vocabulary size, EOT id, compact) of a run: from its data's meta.json, which
    says whether the ids are GPT-2's or a --compact_vocab map's. Without that file a model of
    at least GPT-2's vocabulary is taken to be on GPT-2's (said in one line); a smaller one
    cannot be told apart from a compact one, and exits."""
    meta_path = os.path.join(config["data_dir"], "meta.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        return meta["vocab_size"], meta["eot_token"], "vocab_map" in meta
    except (OSError, ValueError, KeyError) as e:
        if vocab_size < GPT2_VOCAB_SIZE:
            fail(f"{meta_path} is unreadable ({type(e).__name__}) and vocab_size={vocab_size} is smaller than GPT-2's: "
                 f"cannot tell which vocabulary the run was trained on")
        print(f"note: {meta_path} is unreadable ({type(e).__name__}): taking the run's vocabulary to be GPT-2's")
        return GPT2_VOCAB_SIZE, EOT, False


def invasive_option(model_args):
    """The run's architecture options that GPT-2 has no equivalent for, as text ('' for none)."""
    parts = ["attn_bias"] if model_args.get("attn_bias") else []
    clip = (model_args.get("clipped_softmax_gamma", 0.0), model_args.get("clipped_softmax_zeta", 1.0))
    if clip != (0.0, 1.0):
        parts.append(f"clipped softmax (gamma={clip[0]:g}, zeta={clip[1]:g})")
    return " and ".join(parts)


def gpt2_tensors(model, n_vocab):
    """The model's weights in GPT2LMHeadModel's names and layouts, the vocabulary cut to n_vocab."""
    state = model.state_dict()
    tensors = {}
    for ours, theirs, transposed in hf_gpt2_names(model.config.n_layer):
        if ours not in state:  # a bias=False run: GPT-2 always has biases, zero here
            weight = state[ours.removesuffix("bias") + "weight"]
            state[ours] = weight.new_zeros(weight.size(0))
        tensors["transformer." + theirs] = (state[ours].t() if transposed else state[ours]).contiguous()
    tensors["transformer.wte.weight"] = tensors["transformer.wte.weight"][:n_vocab].clone()
    return tensors


def gpt2_config(cfg, n_vocab, eot):
    """config.json of a GPT2LMHeadModel with the model's shape (GPT-2's own keys and values)."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": n_vocab,
            "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout, "initializer_range": 0.02,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True, "bos_token_id": eot, "eos_token_id": eot, "dtype": "bfloat16",
            "torch_dtype": "bfloat16", "use_cache": True}


def bytes_to_unicode():
    """GPT-2's printable stand-in for every byte, the alphabet of vocab.json and merges.txt:
    printable Latin-1 bytes stand for themselves, the others for 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def gpt2_tokenizer_files(n_positions):
    """{file name: text} of GPT-2's tokenizer as transformers reads it (GPT2TokenizerFast),
    from tiktoken's ranks. tiktoken merges, within a pre-tokenized piece, the adjacent pair
    whose concatenation has the lowest rank; a BPE merges list applies the listed pair that
    comes first. So every split of a token into two tokens is a merge, in the order of the
    token's rank (then of the parts' ranks, as transformers' own tiktoken converter orders
    them): the same merges in the same order. The one possible difference: when two
    overlapping pairs make the same token (x+y == y+z), tiktoken merges the left one and BPE
    the one listed first. No text we tried reaches it: the demo corpus (tests/test_export_hf.py),
    the standard library's 5.7M tokens, and 60k texts built around the 282 tokens that allow it."""
    ranks = gpt2_tokenizer()._mergeable_ranks
    byte_char = bytes_to_unicode()
    name = lambda token: "".join(byte_char[b] for b in token)  # noqa: E731
    vocab = {name(token): rank for token, rank in ranks.items()} | {"<|endoftext|>": EOT}
    merges = sorted(((rank, ranks[token[:i]], ranks[token[i:]]), f"{name(token[:i])} {name(token[i:])}")
                    for token, rank in ranks.items() for i in range(1, len(token))
                    if token[:i] in ranks and token[i:] in ranks)
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": n_positions, "add_prefix_space": False,
              "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    return {"vocab.json": json.dumps(vocab, ensure_ascii=False), "tokenizer_config.json": json.dumps(config, indent=2),
            "merges.txt": "\n".join(["#version: 0.2", *(m for _, m in merges)])}


def export(model, n_vocab, eot, to, tokenizer):
    """Write the GPT-2 directory `to` (created if needed; the tokenizer files only with tokenizer)."""
    from safetensors.torch import save_file
    os.makedirs(to, exist_ok=True)
    texts = {"config.json": json.dumps(gpt2_config(model.config, n_vocab, eot), indent=2),
             "generation_config.json": json.dumps({"bos_token_id": eot, "eos_token_id": eot}, indent=2)}
    texts.update(gpt2_tokenizer_files(model.config.block_size) if tokenizer else {})
    for stale in set(TOKENIZER_FILES) - set(texts):  # an earlier export's tokenizer would not fit
        if os.path.exists(os.path.join(to, stale)):
            os.remove(os.path.join(to, stale))
    weights = os.path.join(to, "model.safetensors")
    save_file(gpt2_tensors(model, n_vocab), weights + ".tmp", {"format": "pt"})  # transformers wants the "pt" tag
    os.replace(weights + ".tmp", weights)
    for name, text in texts.items():
        write_atomically(os.path.join(to, name), (text + "\n").encode())


def main(argv):
    cfg = configure_or_exit(DEFAULTS, argv)
    out_dir, hf, to = cfg["out_dir"], cfg["hf"], cfg["to"]
    if not to:
        fail("--to=DIR is needed: the directory to write the Hugging Face model to")
    if hf and out_dir != DEFAULTS["out_dir"]:
        fail("give --out_dir=RUN or --hf=DIR, not both")
    if os.path.exists(to) and not cfg["overwrite"]:
        fail(f"{to} exists: give --overwrite to write the export into it")
    if os.path.exists(to) and not os.path.isdir(to):
        fail(f"{to} is a file, not a directory")
    if not writable_dir(to):
        fail(f"--to={to} is not a directory this process can write or create")
    if not hf:
        model_args, config = read_run_json(out_dir)
        if invasive_option(model_args):
            fail(f"{out_dir} uses {invasive_option(model_args)}, which GPT-2 has no equivalent for: it cannot be exported")
        n_vocab, eot, compact = run_vocabulary(config, model_args["vocab_size"])
    try:
        model, info = load_hf(hf) if hf else load_trained(out_dir, cfg["ckpt"])
    except CheckpointError as e:
        fail(e)
    if hf:
        n_vocab = info["hf_vocab_size"]
        eot, compact = EOT if n_vocab >= GPT2_VOCAB_SIZE else None, n_vocab < GPT2_VOCAB_SIZE
    if info["trained_in_fp8"]:
        print("note: trained in FP8: its bf16 weights are exported; the FP8 scaling state is not part of a GPT-2 checkpoint")
    if compact:
        print(f"note: no tokenizer written: the model's {n_vocab} token ids are a compact vocabulary's "
              f"(its data's vocab_map.npy), not GPT-2's")
    export(model, n_vocab, eot, to, tokenizer=not compact)
    print(f"{to}: GPT2LMHeadModel of {hf or out_dir} ({'' if hf else cfg['ckpt'] + ', '}{n_vocab} tokens, "
          f"{model.config.block_size} positions){' and its GPT-2 tokenizer' if not compact else ''}")
    return to


if __name__ == "__main__":
    main(sys.argv[1:])
