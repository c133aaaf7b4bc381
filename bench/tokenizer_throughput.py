"""
GPT-2 tokenization throughput of prepare_openwebtext.py with 1 and with N processes, on
the same input, side by side.

    python bench/tokenizer_throughput.py                    # the demo corpus, repeated to ~2M tokens
    python bench/tokenizer_throughput.py --input owt/ --num_proc 8 --limit 200000
"""
import argparse
import sys
import time

import datasets

import prepare_openwebtext as P
from configurator import fail, on_terminal


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", help="local corpus (default: the demo corpus)")
    p.add_argument("--text_field", default="text")
    p.add_argument("--num_proc", type=int, default=2, help="compared with 1 process")
    p.add_argument("--repeat", type=int, default=64, help="copies of the demo corpus")
    p.add_argument("--limit", type=int, default=0, help="use only the first N documents")
    args = p.parse_args(argv)
    for key, least in (("num_proc", 1), ("repeat", 1), ("limit", 0)):
        if getattr(args, key) < least:
            fail(f"--{key} must be at least {least}, not {getattr(args, key)}")
    datasets.disable_caching()  # every run tokenizes for real
    if not on_terminal():
        datasets.disable_progress_bars()
    if args.input:
        holding = P.check_records(P.local_files(args.input), args.text_field)
        if not holding:
            fail(f"no text to tokenize in {' '.join(args.input)}")
        ds = P.load_local(holding, args.text_field)
    else:
        ds = datasets.concatenate_datasets([P.load_demo()] * args.repeat)
    if args.limit:
        ds = ds.select(range(min(args.limit, len(ds))))
    if len(ds) == 0:
        fail(f"no text to tokenize in {' '.join(args.input)}")
    P.gpt2_tokenizer()  # load the ranks outside the timed region
    results = {}
    for n in sorted({1, args.num_proc}):
        t = time.perf_counter()
        tokenized = P.tokenize(ds, n)
        dt = time.perf_counter() - t
        results[n] = (sum(tokenized["len"]), dt)
    print(f"\n{len(ds):,} documents")
    print(f"{'processes':>9} {'tokens':>12} {'seconds':>8} {'tokens/s':>12} {'speed-up':>8}")
    base = results[1][0] / results[1][1]
    for n, (tokens, dt) in results.items():
        print(f"{n:>9} {tokens:>12,} {dt:>8.2f} {tokens / dt:>12,.0f} {tokens / dt / base:>8.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
