"""
Pretrain GPT-2 under DeepSpeed ZeRO-3 in BF16, FP8 or FP8+TWEO.

    torchrun --nproc_per_node=8 train.py configs/gpt2_xl_fp8_tweo.py
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py configs/gpt2_7b_fp8_tweo.py
    deepspeed --num_gpus=8 train.py configs/gpt2_xl_fp8.py
    python train.py configs/tiny.py --precision=fp8      # one process; on CPU DeepSpeed runs with gloo

Config: the globals below, then a config file, then --key=value overrides (configurator.py).
Writes to out_dir: metrics.jsonl (one JSON object per line), run.json (the run's config),
ckpt/ (DeepSpeed checkpoints: `latest` and `best` point at complete tags),
model_last.pt and model_best.pt (consolidated bf16 weights + model args + FP8 state).
"""
import json
import math
import os
import random
import resource
import shutil
import socket
import sys
import time
import warnings

import numpy as np
import torch

from configurator import configure_or_exit

# -----------------------------------------------------------------------------
# run
out_dir = "out"
data_dir = "data/openwebtext"
init_from = "scratch"  # 'scratch' or 'resume' (from out_dir/ckpt/latest)
seed = 1337
# model
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
vocab_size = 50304  # GPT-2's 50257 padded to a multiple of 16 for FP8 GEMMs
dropout = 0.0
bias = True
# batch and schedule (Table 5 of the supplementary; the size configs override these)
total_batch_tokens = 524288  # tokens per optimizer step, over all GPUs and micro-steps
micro_batch_size = 16  # sequences per GPU per micro-step
max_iters = 100000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 2000
lr_decay_iters = 100000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# precision
precision = "bf16"  # 'bf16' or 'fp8'
fp8_backend = "auto"  # 'auto' (FP8 GPU: TE if usable, else 'torch'; elsewhere emulated), 'te', 'torch', 'emulated'
fp8_recipe = "delayed"  # 'delayed' (TE DelayedScaling) or 'current' (Float8CurrentScaling)
fp8_amax_history_len = 16
fp8_amax_compute_algo = "max"
# TWEO
tweo_lambda = 0.0  # 0.01 in the paper; 0 disables the term entirely
tweo_tau = 3.0
tweo_p = 4.0
tweo_schedule = "constant"  # 'constant', or 'cosine' to anneal lambda to 0 at lr_decay_iters
# DeepSpeed
zero_stage = 3
activation_checkpointing = False
# evaluation, logging and checkpoints
eval_interval = 1000
eval_iters = 200  # val windows = eval_iters * micro_batch_size, shared out over the GPUs
log_interval = 10
act_stats_interval = 1000
ckpt_interval = 2000
ckpt_keep = 2  # newest iteration checkpoints kept besides `best`; 0 keeps every one
# wandb
wandb_log = False
wandb_project = "tweo"
wandb_run_name = "gpt2"
wandb_mode = "online"  # 'online' or 'offline'
# collapse
collapse_factor = 3.0  # a loss above collapse_factor x the best loss so far is a collapse
stop_on_collapse = True  # stop cleanly; False skips that update and continues
inject_nan_iter = -1  # testing the collapse path: make the loss NaN at this iteration
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
# the deepspeed launcher adds --local_rank=N; torchrun and DeepSpeed both set LOCAL_RANK anyway
argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
config = configure_or_exit({k: globals()[k] for k in config_keys}, argv)
globals().update(config)

# dense peak TFLOP/s per GPU for MFU: (bf16, fp8)
GPU_PEAK_TFLOPS = {"H100": (989, 1979), "H800": (989, 1979), "H200": (989, 1979), "H20": (148, 296),
                   "A100": (312, None), "A800": (312, None), "L40S": (362, 733), "B200": (2250, 4500)}

rank = int(os.environ.get("RANK", 0))
local_rank = int(os.environ.get("LOCAL_RANK", 0))
world_size = int(os.environ.get("WORLD_SIZE", 1))
master = rank == 0
use_cuda = torch.cuda.is_available()


def die(msg):
    """One line, nonzero exit, nothing written (every rank finds the same problem)."""
    if master:
        print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# ---- check everything before any work or any write -------------------------
import data as D  # noqa: E402
from precision import FP8_BACKENDS, fp8_shape_error, make_backend, te_available  # noqa: E402

ckpt_dir = os.path.join(out_dir, "ckpt")
tokens_per_micro_step = micro_batch_size * block_size * world_size
if total_batch_tokens % tokens_per_micro_step:
    die(f"total_batch_tokens={total_batch_tokens} is not a multiple of micro_batch_size x block_size x GPUs "
        f"= {micro_batch_size} x {block_size} x {world_size} = {tokens_per_micro_step}")
grad_accum = total_batch_tokens // tokens_per_micro_step
if init_from not in ("scratch", "resume"):
    die(f"init_from must be 'scratch' or 'resume', got {init_from!r}")
if tweo_schedule not in ("constant", "cosine"):
    die(f"tweo_schedule must be 'constant' or 'cosine', got {tweo_schedule!r}")
if wandb_mode not in ("online", "offline"):
    die(f"wandb_mode must be 'online' or 'offline', got {wandb_mode!r}")
if precision not in ("bf16", "fp8") or fp8_backend not in FP8_BACKENDS:
    die(f"precision must be 'bf16' or 'fp8' and fp8_backend one of {', '.join(FP8_BACKENDS)} (got {precision!r}, {fp8_backend!r})")
if precision == "fp8" and fp8_backend == "te" and not te_available()[0]:
    die(f"fp8_backend='te' needs Transformer Engine on an FP8 GPU: {te_available()[1]}. "
        f"Use --fp8_backend=torch (FP8 GEMMs through PyTorch) or --fp8_backend=emulated (any device).")
fp8_shape_problem = fp8_shape_error(n_embd, vocab_size, micro_batch_size * block_size, fp8_backend)
if precision == "fp8" and fp8_shape_problem:
    die(fp8_shape_problem)
try:
    train_data = D.open_split(data_dir, "train", block_size, vocab_size)
    val_data = D.open_split(data_dir, "val", block_size, vocab_size)
except D.DataError as e:
    die(str(e))
model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=vocab_size,
                  dropout=dropout, bias=bias, tweo_tau=tweo_tau, tweo_p=tweo_p,
                  activation_checkpointing=activation_checkpointing)
run_json = os.path.join(out_dir, "run.json")
if init_from == "scratch" and (os.path.exists(run_json) or os.path.exists(ckpt_dir)):
    die(f"{out_dir} already holds a run; continue it with --init_from=resume, or choose another out_dir")
if init_from == "resume":
    latest = os.path.join(ckpt_dir, "latest")
    if not os.path.exists(latest):
        die(f"nothing to resume: {latest} does not exist")
    if not os.path.exists(run_json):
        die(f"{run_json} is missing: cannot check that the checkpoint fits this model")
    with open(run_json) as f:
        previous = json.load(f)
    changed = {k: (previous["model_args"].get(k), v) for k, v in model_args.items()
               if previous["model_args"].get(k) != v and k != "activation_checkpointing"}
    if changed:
        die(f"{out_dir} holds a run of another model ({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in changed.items())})")

# ---- distributed setup -------------------------------------------------------
if not use_cuda:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed on CPU, with gloo
if "MASTER_ADDR" not in os.environ:  # plain `python train.py`: a world of one
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")

warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")  # DeepSpeed's deprecated collectives
import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from model import GPT, GPTConfig, record_activations, summarize_moments  # noqa: E402

deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
if use_cuda:
    torch.cuda.set_device(device)
torch.manual_seed(seed)  # identical initial weights on every rank and for any world size
np.random.seed(seed)
random.seed(seed)

backend = make_backend(precision, fp8_backend, fp8_recipe, fp8_amax_history_len, fp8_amax_compute_algo, device.type)
if master and precision == "fp8" and backend.note:
    print(f"note: {backend.note}")
if master and precision == "fp8" and backend.name == "emulated" and use_cuda:
    print("warning: FP8 is emulated on a GPU (%s); numerics as TE, speed not" % te_available()[1])

ds_config = {
    "train_batch_size": micro_batch_size * grad_accum * world_size,
    "train_micro_batch_size_per_gpu": micro_batch_size,
    "gradient_accumulation_steps": grad_accum,
    "gradient_clipping": grad_clip,
    "bf16": {"enabled": True},
    "zero_optimization": {"stage": zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
    "steps_per_print": 1 << 30,
    "wall_clock_breakdown": False,
}
with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero_stage == 3):
    model = GPT(GPTConfig(**model_args), backend)


def param_groups(model):
    """Weight decay on matrices and embeddings only (2+ dims; under ZeRO-3 a partitioned
    parameter keeps its real shape in ds_shape)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


if use_cuda:
    from deepspeed.ops.adam import FusedAdam
    optimizer = FusedAdam(param_groups(model), lr=learning_rate, betas=(beta1, beta2), adam_w_mode=True)
else:
    optimizer = torch.optim.AdamW(param_groups(model), lr=learning_rate, betas=(beta1, beta2))
engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
raw_model = engine.module
from precision import keep_fp8_state_fp32, load_te_fp8_state, te_fp8_state  # noqa: E402

keep_fp8_state_fp32(raw_model)  # DeepSpeed casts float buffers to bf16; scales and amaxes stay fp32


def all_reduce(t, op=dist.ReduceOp.SUM):
    if world_size > 1:
        dist.all_reduce(t, op=op)
    return t


def autocast():
    return backend.autocast(raw_model)


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def get_tweo_lambda(it):
    if tweo_schedule == "constant" or tweo_lambda == 0:
        return tweo_lambda
    return 0.5 * (1.0 + math.cos(math.pi * min(it, lr_decay_iters) / lr_decay_iters)) * tweo_lambda


# ---- checkpoints ---------------------------------------------------------------
def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def read_pointer(name):
    with open(os.path.join(ckpt_dir, name)) as f:
        return f.read().strip()


def consolidated_state():
    """bf16 weights gathered on rank 0 (collective), with the FP8 state: the emulated and
    torch backends' scales and amax histories are buffers and come with the weights;
    Transformer Engine's are saved as plain tensors (fp8_te_state), never as its pickled _extra_state."""
    sd = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else raw_model.state_dict()
    if not master:
        return None
    sd = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}
    return {"model": sd, "fp8_te_state": te_fp8_state(raw_model), "model_args": model_args, "config": config}


def save_checkpoint(tag, pointer, state):
    """DeepSpeed checkpoint under ckpt/tag, then the pointer file `latest` or `best` is
    moved to it atomically once every rank has finished, so a crash mid-save leaves the
    pointer at the previous complete checkpoint. Also writes the consolidated model file."""
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=state, save_latest=False)
    torch.save({"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if use_cuda else None,
                "numpy": np.random.get_state(), "python": random.getstate()},
               os.path.join(ckpt_dir, tag, f"rng_rank{rank}.pt"))
    model_file = consolidated_state()
    dist.barrier()
    if master:
        name = os.path.join(out_dir, f"model_{'best' if pointer == 'best' else 'last'}.pt")
        model_file.update(iter=state["iter"], val_loss=state.get("val_loss"))
        torch.save(model_file, name + ".tmp")
        os.replace(name + ".tmp", name)
        old = read_pointer(pointer) if os.path.exists(os.path.join(ckpt_dir, pointer)) else None
        write_atomic(os.path.join(ckpt_dir, pointer), tag)
        # rotation: a superseded best goes; iteration checkpoints beyond the newest ckpt_keep
        # go unless a pointer names them (ckpt_keep=0 keeps them all)
        keep = {read_pointer(p) for p in ("latest", "best") if os.path.exists(os.path.join(ckpt_dir, p))}
        iters = sorted(t for t in os.listdir(ckpt_dir) if t.startswith("iter_") and os.path.isdir(os.path.join(ckpt_dir, t)))
        stale = ([old] if old and old.startswith("best_") else []) + (iters[:-ckpt_keep] if ckpt_keep > 0 else [])
        for t in stale:
            if t not in keep:
                shutil.rmtree(os.path.join(ckpt_dir, t), ignore_errors=True)
    dist.barrier()


# ---- logging -------------------------------------------------------------------
metrics_path = os.path.join(out_dir, "metrics.jsonl")
wandb_run = None


def log_metrics(row):
    global wandb_run
    if not master:
        return
    with open(metrics_path, "a") as f:
        f.write(json.dumps(row) + "\n")
    if wandb_run is not None:
        try:
            flat = {k: v for k, v in row.items() if not isinstance(v, (dict, list))}
            flat.update({f"act_max/layer{i}": v for i, v in enumerate(row.get("act_max_per_layer", []))})
            wandb_run.log(flat, step=row["iter"])
        except Exception as e:  # wandb never stops training
            print(f"warning: wandb.log failed ({type(e).__name__}: {e}); wandb logging off")
            wandb_run = None


def wandb_summary(**kw):
    if wandb_run is not None:
        try:
            wandb_run.summary.update(kw)
        except Exception:
            pass


def peak_memory_gb():
    if use_cuda:
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def peak_flops():
    if not use_cuda:
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, fp8) in GPU_PEAK_TFLOPS.items():
        if key in name:
            peak = fp8 if precision == "fp8" and backend.name in ("te", "torch") and fp8 else bf16
            return peak * 1e12
    return None


# ---- start or resume ---------------------------------------------------------------
iter_num, best_val_loss, best_train_loss, act_peak, wandb_id = 0, float("inf"), float("inf"), 0.0, None
if init_from == "resume":
    tag = read_pointer("latest")
    _, client = engine.load_checkpoint(ckpt_dir, tag=tag)  # copies into the fp32 FP8 buffers as they are
    if backend.name == "te":  # TE's scaling state, saved as plain tensors in the client state
        load_te_fp8_state(raw_model, client.get("fp8_te_state", {}), backend.recipe)
    iter_num, best_val_loss, best_train_loss = client["iter"], client["best_val_loss"], client["best_train_loss"]
    act_peak, wandb_id = client["act_peak"], client.get("wandb_id")
    rng = torch.load(os.path.join(ckpt_dir, tag, f"rng_rank{rank}.pt"), weights_only=False)
    torch.set_rng_state(rng["torch"])
    if use_cuda and rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if master:
        print(f"resuming from {ckpt_dir}/{tag} at iter {iter_num}")
        log_metrics({"iter": iter_num, "event": "resume", "tag": tag})
elif master:
    os.makedirs(out_dir, exist_ok=True)
    write_atomic(run_json, json.dumps({"config": config, "model_args": model_args, "world_size": world_size}, indent=2))

n_params = raw_model.get_num_params(non_embedding=False)
if master:
    print(f"{n_params / 1e6:.2f}M parameters | {precision} ({backend.name}) | TWEO lambda {tweo_lambda} "
          f"(tau {tweo_tau}, p {tweo_p}) | ZeRO-{zero_stage} | {world_size} rank(s) x {micro_batch_size} seq x "
          f"{grad_accum} micro-steps = {total_batch_tokens:,} tokens/step | device {device}")
    if wandb_log:
        try:
            import wandb
            wandb_run = wandb.init(project=wandb_project, name=wandb_run_name, config=config, mode=wandb_mode,
                                   id=wandb_id, resume="allow" if wandb_id else None, dir=out_dir)
            wandb_id = wandb_run.id
        except Exception as e:
            print(f"warning: wandb.init failed ({type(e).__name__}: {e}); logging to metrics.jsonl only")
            wandb_run = None

val_windows = D.val_offsets(seed, eval_iters * micro_batch_size, len(val_data), block_size)
flops_per_token = raw_model.flops_per_token()
peak = peak_flops()


def run_eval():
    engine.eval()
    loss = D.evaluate(engine, val_data, val_windows, block_size, micro_batch_size, device, autocast,
                      rank, world_size, all_reduce)
    engine.train()
    return loss


def act_stats():
    """Figure 5 of the paper: per-layer top-1/2/3 and median |block output| on a val batch."""
    engine.eval()
    x, y = D.get_batch(val_data, D.rank_slice(val_windows, 0, rank, world_size, micro_batch_size), block_size, device)
    with record_activations(raw_model) as rec, torch.no_grad(), autocast():
        engine(x, y)  # with targets: all positions through the LM head, a shape FP8 GEMMs accept
    engine.train()
    stats = [summarize_moments(parts) for parts in rec["block"]]
    return [{k: s[k] for k in ("top1", "top2", "top3", "median")} for s in stats]


def client_state(**extra):
    return dict(iter=iter_num, best_val_loss=best_val_loss, best_train_loss=best_train_loss, act_peak=act_peak,
                wandb_id=wandb_id, model_args=model_args, config=config, fp8_te_state=te_fp8_state(raw_model), **extra)


# ---- the training loop ---------------------------------------------------------------
engine.train()
n_windows = micro_batch_size * grad_accum * world_size
interval_act_max = torch.zeros(n_layer, device=device)
t_last, iters_since, start_iter, t_start = time.time(), 0, iter_num, time.time()
collapsed = False
while iter_num < max_iters:
    lr = get_lr(iter_num)
    lam = get_tweo_lambda(iter_num)
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    offsets = D.train_offsets(seed, iter_num, n_windows, len(train_data), block_size)
    sums = torch.zeros(2, device=device)  # task loss, TWEO term, summed over micro-steps
    for micro_step in range(grad_accum):
        x, y = D.get_batch(train_data, D.rank_slice(offsets, micro_step, rank, world_size, micro_batch_size),
                           block_size, device)
        with autocast():
            out = engine(x, y, with_tweo=lam > 0)
        task_loss = out.loss * float("nan") if iter_num == inject_nan_iter else out.loss
        loss = task_loss + lam * out.tweo_loss if lam > 0 else task_loss
        sums += torch.stack([task_loss.detach().float(), out.tweo_loss.detach().float()])
        interval_act_max = torch.fmax(interval_act_max, out.act_max)  # a NaN does not hide the finite peak
        if micro_step == grad_accum - 1:
            # the one host sync per iteration: the global loss decides on a collapse before
            # the last backward; poisoning that backward makes DeepSpeed skip the update
            loss_global = all_reduce(sums.clone()) / (grad_accum * world_size)
            train_loss, tweo_value = loss_global.tolist()
            collapsed = not math.isfinite(train_loss) or train_loss > collapse_factor * best_train_loss
            if collapsed:
                loss = loss * float("nan")
        engine.backward(loss)
        engine.step()
    iter_num += 1
    iters_since += 1

    if collapsed:
        reason = "non-finite loss" if not math.isfinite(train_loss) else f"loss > {collapse_factor} x best {best_train_loss:.4f}"
        if master:
            print(f"collapse at iter {iter_num}: loss {train_loss:.4f} ({reason}); the update was skipped"
                  + ("; stopping (stop_on_collapse)" if stop_on_collapse else "; continuing"))
        log_metrics({"iter": iter_num, "event": "collapse", "loss": train_loss if math.isfinite(train_loss) else str(train_loss),
                     "reason": reason, "skipped_steps": engine.skipped_steps})
        wandb_summary(collapsed=True, collapse_iter=iter_num)
        if stop_on_collapse:
            break
        continue
    best_train_loss = min(best_train_loss, train_loss)

    if iter_num % log_interval == 0 or iter_num == max_iters:
        layer_max = all_reduce(interval_act_max.clone(), dist.ReduceOp.MAX).tolist()
        interval_act_max.zero_()
        act_peak = max(act_peak, max(layer_max))
        fp8 = backend.telemetry(raw_model)  # collective on the emulated backend
        now = time.time()
        dt = (now - t_last) / iters_since
        t_last, iters_since = now, 0
        grad_norm = engine.get_global_grad_norm()
        row = {"iter": iter_num, "tokens": iter_num * total_batch_tokens, "loss": train_loss, "tweo_loss": tweo_value,
               "tweo_lambda": lam, "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
               "act_peak": act_peak, "act_max_per_layer": layer_max, "iter_time_s": dt,
               "iter_per_hour": 3600 / dt, "tokens_per_sec": total_batch_tokens / dt, "mem_peak_gb": peak_memory_gb(),
               "skipped_steps": engine.skipped_steps}
        if peak:
            row["mfu"] = flops_per_token * row["tokens_per_sec"] / (peak * world_size)
        row.update(fp8)
        log_metrics(row)
        if master:
            eta = (max_iters - iter_num) * (now - t_start) / max(1, iter_num - start_iter)
            sat = fp8.get("fp8_saturated_total", fp8.get("fp8_saturating"))
            print(f"iter {iter_num}/{max_iters} | loss {train_loss:.4f} | tweo {tweo_value:.4g} (λ {lam:g}) | lr {lr:.2e} | "
                  f"gnorm {row['grad_norm'] or 0:.3f} | act max {max(layer_max):.2f} peak {act_peak:.2f}"
                  + (f" | fp8 sat {sat}" if sat is not None else "")
                  + f" | {dt * 1000:.0f} ms/it {row['iter_per_hour']:.0f} it/h {row['tokens_per_sec']:.0f} tok/s"
                  + (f" | mfu {100 * row['mfu']:.1f}%" if "mfu" in row else "")
                  + f" | {row['mem_peak_gb']:.2f} GB | ETA {eta / 3600:.0f}h{eta % 3600 / 60:02.0f}m", flush=True)

    if act_stats_interval > 0 and iter_num % act_stats_interval == 0:
        log_metrics({"iter": iter_num, "act_stats": act_stats()})

    if iter_num % eval_interval == 0 or iter_num == max_iters:
        val_loss = run_eval()
        log_metrics({"iter": iter_num, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700))})
        if master:
            print(f"iter {iter_num}: val loss {val_loss:.4f}, val ppl {math.exp(min(val_loss, 700)):.2f}")
        if val_loss < best_val_loss:
            best_val_loss = val_loss
            save_checkpoint(f"best_iter_{iter_num:07d}", "best", client_state(val_loss=val_loss))
            wandb_summary(best_val_loss=val_loss, best_val_ppl=math.exp(val_loss), best_iter=iter_num)

    if iter_num % ckpt_interval == 0 or iter_num == max_iters:
        save_checkpoint(f"iter_{iter_num:07d}", "latest", client_state())

if master:
    wandb_summary(act_peak=act_peak, final_iter=iter_num)
    print(f"done at iter {iter_num}: best val loss {best_val_loss:.4f}, activation peak {act_peak:.2f}")
    if wandb_run is not None:
        try:
            wandb_run.finish()
        except Exception:
            pass
dist.barrier()
dist.destroy_process_group()
if not use_cuda:
    # DeepSpeed's CPU shared-memory comm extension sometimes aborts in its C++ static
    # destructors at interpreter exit (about 1 run in 5 on 2 gloo ranks, after all work is
    # done); everything is written and closed by now, so leave without that teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
