"""
The one summary of a train.py run, read from its run.json and metrics.jsonl: what Table 2
(bench/table2.py), Table 10 (bench/table10.py) and the figures (bench/plots.py) are made of.

    from bench.runs import summarize
    s = summarize("out/gpt2_xl_fp8")   # dict; RunError if out_dir is not a train.py run

Runs are compared by what they are (their run.json), never by their directory names:
`group_key` is model size + data + schedule, `row_key` the method (invasive variant, TWEO).
A resumed run logs some iterations twice; the later line wins.
"""
import json
import math
import os
import statistics
import sys


SIZE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "dropout")
SCHEDULE_KEYS = ("total_batch_tokens", "max_iters", "learning_rate", "min_lr", "warmup_iters", "lr_decay_iters",
                 "weight_decay", "beta1", "beta2", "grad_clip")
# config keys that say where a run was kept, how it was watched or how its work was split, not what
# it trained: runs that differ only in these and their seed are repeats of one experiment
BOOKKEEPING_KEYS = {"out_dir", "init_from", "seed", "wandb_log", "wandb_project", "wandb_run_name", "wandb_mode",
                    "compile", "cpu_gemm", "zero_stage", "activation_checkpointing", "micro_batch_size", "eval_interval",
                    "log_interval", "act_stats_interval", "ckpt_interval", "ckpt_keep",
                    "inject_nan_iter"}  # the last: a test hook that run.json files written before 2026-12-07 carry
# configs/sizes/<key>.py -> the paper's name for that model
SIZE_NAMES = {"gpt2_124m": "GPT2", "gpt2_medium": "GPT2-medium", "gpt2_large": "GPT2-large", "gpt2_xl": "GPT2-xl",
              "gpt2_3b": "GPT2 3B", "gpt2_7b": "GPT2 7B"}
PAPER_TWEO = {"tweo_lambda": 0.01, "tweo_tau": 3.0, "tweo_p": 4.0, "tweo_schedule": "constant"}


class RunError(Exception):
    pass


def read_run(out_dir):
    """(run.json as a dict, metrics.jsonl as a list of dicts)."""
    run_json, metrics = os.path.join(out_dir, "run.json"), os.path.join(out_dir, "metrics.jsonl")
    for path in (run_json, metrics):
        if not os.path.isfile(path):
            raise RunError(f"{path} not found: {out_dir} is not a train.py run")
    with open(run_json) as f:
        run = json.load(f)
    return run, read_jsonl(metrics, object_hook=non_finite)


def read_jsonl(path, object_hook=None):
    """The objects of a JSON-lines file. A last line cut short (no newline, not JSON: what a
    process killed while writing leaves) is left out, with one note on stderr; a bad line
    anywhere else is a RunError naming path:line."""
    with open(path) as f:
        lines = f.read().split("\n")
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line, object_hook=object_hook))
        except ValueError as e:
            if n < len(lines):
                raise RunError(f"{path}:{n} is not a JSON line ({e})") from None
            print(f"note: {path}: the last line is cut short (a run killed while writing it); read without it",
                  file=sys.stderr)
    return rows


def non_finite(row):
    """train.py writes a non-finite number as "nan", "inf" or "-inf" (metrics.jsonl is strict JSON): back to floats."""
    return {k: float(v) if v in ("nan", "inf", "-inf") else [float(x) if x in ("nan", "inf", "-inf") else x for x in v]
            if isinstance(v, list) else v for k, v in row.items()}


def train_flags(out_dir, max_iters):
    """None if out_dir holds a run that is over: trained to max_iters, or stopped by a collapse
    (training is deterministic, so a rerun would collapse at the same iteration); else the
    train.py flags that continue it: from its last checkpoint if it has begun, from scratch if
    not. What demo.py and mini.py rerun."""
    if not os.path.exists(os.path.join(out_dir, "run.json")):
        return []
    try:
        run, rows = read_run(out_dir)
    except RunError:
        return ["--init_from=resume"]
    done = max((r.get("iter", 0) for r in rows), default=0)
    if os.path.exists(os.path.join(out_dir, "model_last.pt")) and done >= max_iters:
        return None
    if any(r.get("event") == "collapse" for r in rows) and run["config"].get("stop_on_collapse", True):
        return None
    return ["--init_from=resume"]


def latest_by_iter(rows):
    """rows sorted by iter, a later line replacing an earlier one of the same iter (resume)."""
    return sorted({r["iter"]: r for r in rows}.values(), key=lambda r: r["iter"])


def timed_intervals(rows):
    """(iter, seconds per iteration, iterations in the interval) of every training log line.
    Each line's iter_time_s averages the iterations since the previous line of the same
    process (a resume starts a new interval), evaluations and checkpoints included."""
    out, prev = [], 0
    for r in rows:
        if r.get("event") == "resume":
            prev = r["iter"]
        elif "iter_time_s" in r:
            out.append((r["iter"], r["iter_time_s"], r["iter"] - prev))
            prev = r["iter"]
    return list({it: (it, dt, n) for it, dt, n in out}.values())


def count_params(model_args):
    """Parameter count of the model itself (built on the meta device: no memory, no init)."""
    import dataclasses

    import torch

    from model import GPT, GPTConfig
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    with torch.device("meta"):
        return GPT(GPTConfig(**{k: v for k, v in model_args.items() if k in known})).get_num_params(non_embedding=False)


def format_params(n):
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}K"


def size_key(model_args):
    """The configs/sizes/ name of this architecture (e.g. 'gpt2_xl'), or None."""
    import importlib
    for key in SIZE_NAMES:
        size = importlib.import_module(f"configs.sizes.{key}")
        if all(getattr(size, k) == model_args[k] for k in ("n_layer", "n_head", "n_embd")) and \
                model_args["block_size"] == 1024:
            return key
    return None


def variant(config):
    """The invasive architecture change of a run, '' for none (attention bias and clipped
    softmax; runs made before those options existed have neither)."""
    parts = []
    if config.get("attn_bias", False):
        parts.append("attn bias")
    if config.get("clipped_softmax_gamma", 0.0):
        parts.append(f"clipped softmax (γ={config['clipped_softmax_gamma']:g})")
    return " + ".join(parts)


def tweo_label(config):
    """'' without TWEO, '+TWEO' with the paper's setting, else '+TWEO (the settings that differ)'."""
    if config["tweo_lambda"] <= 0:
        return ""
    differ = [f"{k.removeprefix('tweo_')}={config[k]:g}" if not isinstance(config[k], str) else f"{config[k]}"
              for k, v in PAPER_TWEO.items() if config[k] != v]
    return "+TWEO" + (f" ({', '.join(differ)})" if differ else "")


def summarize(out_dir):
    """Everything the tables and figures report about one run. PPL: the last evaluation of
    a run that did not collapse; of a collapsed run, the best evaluation before the collapse
    (its best checkpoint, as the paper reports). Times: measured seconds per iteration,
    extrapolated to max_iters."""
    run, rows = read_run(out_dir)
    config, model_args = run["config"], run["model_args"]
    collapse_iter = next((r["iter"] for r in rows if r.get("event") == "collapse"), None)
    before = [r for r in rows if collapse_iter is None or r["iter"] < collapse_iter]
    evals = latest_by_iter([r for r in before if "val_loss" in r])
    train = latest_by_iter([r for r in rows if "iter_time_s" in r])
    reported = min(evals, key=lambda r: r["val_loss"]) if collapse_iter is not None and evals else \
        (evals[-1] if evals else None)
    intervals = timed_intervals(rows)
    iters_timed = sum(n for _, _, n in intervals)
    s_per_iter = sum(dt * n for _, dt, n in intervals) / iters_timed if iters_timed else None
    params = count_params(model_args)
    last_iter = max((r["iter"] for r in rows), default=0)
    max_iters = config["max_iters"]
    return {
        "out_dir": out_dir, "precision": config["precision"], "variant": variant(config), "tweo": tweo_label(config),
        "mode": config["precision"].upper() + (f" {tweo_label(config)}" if config["tweo_lambda"] > 0 else ""),
        "params": params, "params_str": format_params(params), "size": size_key(model_args),
        "world_size": run.get("world_size", 1), "max_iters": max_iters, "last_iter": last_iter,
        "finished": collapse_iter is None and last_iter >= max_iters,
        "collapse_iter": collapse_iter,
        "ppl": math.exp(min(reported["val_loss"], 700)) if reported else None,
        "ppl_iter": reported["iter"] if reported else None,
        "peak": max((r["act_peak"] for r in train), default=None),
        # the supplementary's "Final": the largest |block output| at the last logged iteration
        "final_act": max(train[-1]["act_max_per_layer"]) if train and "act_max_per_layer" in train[-1] else None,
        "s_per_iter": s_per_iter, "iters_timed": iters_timed,
        "iter_per_hour": 3600 / s_per_iter if s_per_iter else None,
        "tokens_per_sec": config["total_batch_tokens"] / s_per_iter if s_per_iter else None,
        "mfu": statistics.median(r["mfu"] for r in train if "mfu" in r) if any("mfu" in r for r in train) else None,
        # GPU-hours for max_iters, as the paper's Table 10 (XL: 100k iterations at 661 iter/H on 8 GPUs = 1210 H)
        "total_hours": s_per_iter * max_iters / 3600 * run.get("world_size", 1) if s_per_iter else None,
        "vram_gb": max((r["mem_peak_gb"] for r in train), default=None),
        "group": group_key(run), "row": (variant(config), tweo_label(config)),
        "config": config, "model_args": model_args, "rows": rows,
    }


def group_key(run):
    """Runs that one table row may hold: the same model size, data and schedule."""
    config, model_args = run["config"], run["model_args"]
    return (tuple(model_args[k] for k in SIZE_KEYS), os.path.normpath(config["data_dir"]),
            tuple(config[k] for k in SCHEDULE_KEYS))


def experiment_key(summary):
    """What a run trained: its config without the bookkeeping keys and the seed."""
    config = summary["config"]
    return tuple(sorted((k, os.path.normpath(v) if k == "data_dir" else v)
                        for k, v in config.items() if k not in BOOKKEEPING_KEYS))


def check_repeats(summaries, cell):
    """summaries must be seeds of one experiment (named `cell` in the message): ValueError for two
    runs with the same seed, or for runs that differ in anything but the seed and bookkeeping."""
    by_seed = {}
    for s in summaries:
        seed = s["config"]["seed"]
        if seed in by_seed:
            raise ValueError(f"{by_seed[seed]['out_dir']} and {s['out_dir']} are both the {cell} "
                             f"with seed {seed}: pass one of them")
        by_seed[seed] = s
        first = summaries[0]
        if experiment_key(s) != experiment_key(first):
            a, b = dict(experiment_key(first)), dict(experiment_key(s))
            key = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
            raise ValueError(f"{first['out_dir']} and {s['out_dir']} are both the {cell} but differ in {key} "
                             f"({a.get(key)} and {b.get(key)}), not only in their seed")


def experiments(summaries):
    """The runs grouped into repeats of one experiment (differing only in their seed), each group
    sorted by seed, in the order each experiment was first given."""
    groups = {}
    for s in summaries:
        groups.setdefault(experiment_key(s), []).append(s)
    return [sorted(g, key=lambda s: s["config"]["seed"]) for g in groups.values()]


def mean_sd(values):
    """(mean, sample standard deviation) of the values that are not None; sd is None below two values."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def fmt_mean_sd(values, spec, missing="-"):
    """One value as fmt does; several as 'mean ± sd'."""
    mean, sd = mean_sd(values)
    return fmt(mean, spec, missing) + ("" if sd is None else f" ± {format(sd, spec.lstrip('+'))}")


def model_name(summary):
    """The paper's name for the size ('GPT2-xl'), or the shape of a model the paper has not."""
    if summary["size"]:
        return SIZE_NAMES[summary["size"]]
    a = summary["model_args"]
    return f"GPT {a['n_layer']}L×{a['n_embd']}"


def row_name(summary):
    return " ".join(p for p in (model_name(summary), summary["variant"] and summary["variant"] + " *", summary["tweo"]) if p)


def order_key(summary):
    """Size, then the baseline, its +TWEO, then each invasive variant and its +TWEO."""
    return (summary["params"], summary["group"], summary["variant"] != "", summary["variant"], summary["tweo"])


def peak_spec(values):
    """How activation sizes print: whole numbers from 100 up, one decimal below."""
    return ".0f" if any(v is not None and abs(v) >= 100 for v in values) else ".1f"


def fmt(v, spec, missing="-"):
    return missing if v is None else format(v, spec)


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def parse_args(argv, defaults, usage):
    """RUN_DIR... and --key=value options (bare --flag for a bool): (summaries, options).
    Bad input is one line on stderr and exit 2, before any work."""
    from configurator import configure_or_exit, fail
    dirs = [a for a in argv if not a.startswith("--")]
    if not dirs:
        fail(f"no run directories given; usage: {usage}")
    options = configure_or_exit(defaults, [a for a in argv if a.startswith("--")])
    summaries = []
    for d in dirs:
        try:
            summaries.append(summarize(d))
        except RunError as e:
            fail(str(e))
        except (KeyError, ValueError) as e:
            fail(f"{d}: run.json or metrics.jsonl is not what train.py writes ({type(e).__name__}: {e})")
    return summaries, options
