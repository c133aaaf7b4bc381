"""
Generate text from a trained model.

    python sample.py --out_dir=out/gpt2_xl_fp8_tweo --start="The meaning of life" --num_samples=3 --max_new_tokens=100
    python sample.py --out_dir=out/tiny --start=FILE:prompt.txt --ckpt=best --temperature=0.7 --top_k=50 --seed=1
    python sample.py --hf=DIR --start="Hello"    # a local Hugging Face GPT-2 directory instead of a run

--ckpt: 'last' or 'best' (the consolidated model_last.pt / model_best.pt train.py writes),
or a DeepSpeed checkpoint tag or folder (read directly from the ZeRO-3 shards).
A model trained in FP8 samples in BF16: FP8 GEMMs need the token count to be a multiple
of 8, which a one-token decoding step is not. --print_json prints one JSON object per sample.
"""
import json
import sys

from configurator import configure_or_exit, fail, first_violation, usable_device

out_dir = "out"
hf = ""  # a Hugging Face GPT-2 directory (config.json + weights), in place of out_dir
ckpt = "last"
start = "\n"  # or "FILE:prompt.txt"
num_samples = 3
max_new_tokens = 200
temperature = 0.8
top_k = 200
seed = 1337
device = "auto"  # 'cuda' when there is a GPU, else 'cpu'; or 'cpu', 'cuda', 'cuda:N'
print_json = False
config = configure_or_exit({k: v for k, v in globals().items() if k in (
    "out_dir", "hf", "ckpt", "start", "num_samples", "max_new_tokens", "temperature", "top_k", "seed", "device", "print_json")},
    sys.argv[1:])
globals().update(config)


problem = first_violation(config, [  # (key, test(value), what the value must be), the first broken rule stops
    ("ckpt", lambda v: v != "", "'last', 'best', or a DeepSpeed checkpoint tag or folder"),
    ("num_samples", lambda v: v >= 1, ">= 1"),
    ("max_new_tokens", lambda v: v >= 1, ">= 1"),
    ("temperature", lambda v: 0 < v < float("inf"), "> 0 and finite"),
    ("top_k", lambda v: v >= 1, ">= 1"),
    ("seed", lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    ("device", lambda v: v == "auto" or usable_device(v), "'auto', 'cpu', or 'cuda[:N]' with that GPU present"),
])
if problem:
    fail(problem)

import torch  # noqa: E402

from model import CheckpointError, load_hf, load_trained  # noqa: E402
import numpy as np  # noqa: E402

from prepare_openwebtext import EOT, gpt2_tokenizer, load_vocab_map  # noqa: E402

if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
if start.startswith("FILE:"):
    try:
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
    except OSError as e:
        fail(f"cannot read the prompt file {start[5:]}: {e.strerror}")
try:
    enc = gpt2_tokenizer()
    model, info = load_hf(hf, device=device) if hf else load_trained(out_dir, ckpt, device=device)
except (CheckpointError, RuntimeError) as e:  # RuntimeError: no tokenizer
    fail(str(e))
id_map = load_vocab_map((info.get("config") or {}).get("data_dir", ""))  # data made with --compact_vocab
n_vocab = enc.n_vocab if id_map is None else len(id_map)
if model.config.vocab_size < n_vocab:
    fail(f"the model's vocabulary ({model.config.vocab_size}) is smaller than "
         f"{'GPT-2' if id_map is None else 'its compact data vocabulary'}'s ({n_vocab})")
if info["trained_in_fp8"]:
    print("note: trained in FP8, sampling in BF16", file=sys.stderr)

torch.manual_seed(seed)
generator = torch.Generator(device=device).manual_seed(seed)
ids = enc.encode(start, allowed_special={"<|endoftext|>"}) or [EOT]
if id_map is not None:  # the model's ids are positions in the compact vocabulary
    if not np.isin(ids, id_map).all():
        fail("the prompt holds tokens that never occur in the model's training data (compact vocabulary)")
    ids = np.searchsorted(id_map, ids).tolist()
decode = enc.decode if id_map is None else (lambda t: enc.decode(id_map[t].tolist()))
x = torch.tensor(ids, dtype=torch.long, device=device)[None, :]
with torch.no_grad(), torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
    for k in range(num_samples):
        y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k,
                           vocab_limit=info.get("hf_vocab_size", n_vocab), generator=generator)
        new = y[0, len(ids):].tolist()
        if print_json:
            print(json.dumps({"sample": k, "prompt": start, "tokens": new, "text": decode(new)}))
        else:
            print(decode(ids + new))
            print("---------------")
