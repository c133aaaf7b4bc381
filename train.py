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
SIGTERM or SIGINT: every rank finishes its iteration, a checkpoint is saved, exit 0.
--init_from=resume continues from ckpt/latest, on any number of GPUs (DeepSpeed's universal checkpoint).
"""
import atexit
import json
import math
import os
import random
import resource
import signal
import socket
import sys
import time
import warnings

from configurator import configure_or_exit, first_violation, one_of, writable_dir, write_atomically
from run_lock import LockHeld, RunLock

# -----------------------------------------------------------------------------
# run
out_dir = "out"
data_dir = "data/openwebtext"
init_from = "scratch"  # 'scratch', 'resume' (from out_dir/ckpt/latest) or a Hugging Face GPT-2 directory
seed = 1337
# model
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
vocab_size = 50304  # GPT-2's 50257 padded to a multiple of 16 for FP8 GEMMs
dropout = 0.0
bias = True
attn_bias = False  # invasive baseline of Table 2: a learnable key k' and value v' per head, to attend to "nothing"
clipped_softmax_gamma = 0.0  # invasive baseline: clipped softmax; gamma = -alpha / block_size, 0 is plain softmax
clipped_softmax_zeta = 1.0
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
cpu_gemm = "auto"  # CPU only: 'fp32' computes bf16/FP8 GEMMs as fp32 GEMMs on their values, 'native' in bf16, 'auto' asks the CPU
compile = True  # torch.compile the fused pieces (FP8 casts, the TWEO term); not the model: ZeRO-3's hooks refuse it
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
eval_windows = 3200  # the fixed val windows, whatever micro_batch_size, the number of GPUs and the seed
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
collapse_factor = 3.0  # a loss above collapse_factor x the best loss so far is a spike: its update is skipped
collapse_patience = 3  # spikes in a row that are a collapse (one hard batch can spike; a non-finite loss collapses at once)
stop_on_collapse = True  # stop cleanly; False skips that update and continues
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
# the deepspeed launcher adds --local_rank=N; torchrun and DeepSpeed both set LOCAL_RANK anyway
argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
config = configure_or_exit({k: globals()[k] for k in config_keys}, argv)
globals().update(config)

rank = int(os.environ.get("RANK", 0))
local_rank = int(os.environ.get("LOCAL_RANK", 0))
world_size = int(os.environ.get("WORLD_SIZE", 1))
master = rank == 0


run_lock = None  # rank 0's hold on out_dir (run_lock.py), from the checks of out_dir to the end of the run


def die(msg, status=2):
    """One line on stderr and a nonzero exit (every rank finds the same problem): status 2
    for bad input, found before anything is written; 1 for a failure during the run."""
    if master:
        print(f"error: {msg}", file=sys.stderr, flush=True)
    if run_lock is not None:
        run_lock.release()
    if "torch.distributed" in sys.modules and sys.modules["torch.distributed"].is_initialized():
        sys.stdout.flush()
        os._exit(status)  # without DeepSpeed's CPU comm teardown, which can abort (see the end)
    sys.exit(status)


# ---- every value checked before any work or any write ----------------------------
# One row per rule, (key, test(value), what the value must be), read top to bottom; the
# first broken rule stops the run. A new key adds its row here. Checked before torch and
# DeepSpeed are even imported.
tokens_per_micro_step = micro_batch_size * block_size * world_size


def te_usable(fp8_backend):
    if precision != "fp8" or fp8_backend != "te":
        return True
    from precision import te_available
    return te_available()[0]


def te_missing():
    from precision import te_available
    return (f"'auto', 'torch' or 'emulated' here: 'te' needs Transformer Engine on an FP8 GPU "
            f"({te_available()[1]}); 'torch' runs FP8 GEMMs through PyTorch, 'emulated' on any device")


CHECKS = [
    ("out_dir", writable_dir, "a directory this user can write, or create"),
    ("init_from", lambda v: v in ("scratch", "resume") or os.path.isdir(v),
     "'scratch', 'resume' or a Hugging Face GPT-2 directory"),
    ("seed", lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    ("n_layer", lambda v: v >= 1, ">= 1"),
    ("n_head", lambda v: v >= 1, ">= 1"),
    ("n_embd", lambda v: v >= 1 and v % n_head == 0, f"a positive multiple of n_head={n_head}"),
    ("block_size", lambda v: v >= 1, ">= 1"),
    ("vocab_size", lambda v: v >= 1, ">= 1 (and hold the data's tokens, checked with the data)"),
    ("dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("micro_batch_size", lambda v: v >= 1, ">= 1"),
    ("total_batch_tokens", lambda v: v >= 1 and v % tokens_per_micro_step == 0,
     f"a positive multiple of micro_batch_size x block_size x GPUs = {micro_batch_size} x {block_size} x "
     f"{world_size} = {tokens_per_micro_step}"),
    ("max_iters", lambda v: v >= 1, ">= 1"),
    ("learning_rate", lambda v: 0 <= v < math.inf, ">= 0 and finite"),
    ("min_lr", lambda v: 0 <= v <= learning_rate, f"in [0, learning_rate={learning_rate:g}]"),
    ("warmup_iters", lambda v: v >= 0, ">= 0"),
    ("lr_decay_iters", lambda v: v >= 1, ">= 1"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("grad_clip", lambda v: v >= 0, ">= 0 (0: no clipping)"),
    ("precision", *one_of("bf16", "fp8")),
    ("fp8_backend", *one_of("auto", "te", "torch", "emulated")),  # precision.FP8_BACKENDS
    ("fp8_backend", te_usable, te_missing),
    ("fp8_recipe", *one_of("delayed", "current")),
    ("fp8_amax_history_len", lambda v: v >= 1, ">= 1"),
    ("fp8_amax_compute_algo", *one_of("max", "most_recent")),
    ("cpu_gemm", *one_of("auto", "native", "fp32")),  # precision.CPU_GEMMS
    ("tweo_lambda", lambda v: v >= 0, ">= 0 (0: off)"),
    ("tweo_tau", lambda v: v > 0, "> 0"),
    ("tweo_p", lambda v: v > 0, "> 0"),
    ("tweo_schedule", *one_of("constant", "cosine")),
    ("zero_stage", *one_of(0, 1, 2, 3)),
    ("eval_interval", lambda v: v >= 1, ">= 1"),
    ("eval_windows", lambda v: v >= 1, ">= 1"),
    ("log_interval", lambda v: v >= 1, ">= 1"),
    ("act_stats_interval", lambda v: v >= 0, ">= 0 (0: off)"),
    ("ckpt_interval", lambda v: v >= 1, ">= 1"),
    ("ckpt_keep", lambda v: v >= 0, ">= 0 (0 keeps every checkpoint)"),
    ("wandb_project", lambda v: v != "", "a name"),
    ("wandb_mode", *one_of("online", "offline")),
    ("collapse_factor", lambda v: v > 1, "> 1"),
    ("collapse_patience", lambda v: v >= 1, ">= 1"),
    ("clipped_softmax_gamma", lambda v: v <= 0, "<= 0 (0: off; -alpha / block_size, Bondarenko et al.)"),
    ("clipped_softmax_zeta", lambda v: v >= 1, ">= 1"),
]
problem = first_violation(config, CHECKS)
if problem:
    die(problem)
grad_accum = total_batch_tokens // tokens_per_micro_step

# dense peak TFLOP/s per GPU for MFU: (bf16, fp8), the first name found in torch.cuda.get_device_name()
# (so the PCIe and NVL cards before their SXM namesakes). An FP8 run's MFU divides by the FP8 peak
# though attention stays in bf16: tokens/s, not MFU, compares the modes.
GPU_PEAK_TFLOPS = (("H100 PCIe", 756, 1513), ("H100 NVL", 835, 1671), ("H100", 989, 1979), ("H800 PCIe", 756, 1513),
                   ("H800", 989, 1979), ("H200 NVL", 835, 1671), ("H200", 989, 1979), ("H20", 148, 296),
                   ("A100", 312, None), ("A800", 312, None), ("L40S", 362, 733), ("B200", 2250, 4500))

# ---- torch and DeepSpeed, loaded only now: a bad value above stops at once ----------
import numpy as np  # noqa: E402
import torch  # noqa: E402

use_cuda = torch.cuda.is_available()
if not use_cuda:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed on CPU, with gloo
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")  # DeepSpeed's deprecated collectives
import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

import data as D  # noqa: E402
from checkpoint import Checkpoints, convert_to_universal, model_change, resume_point  # noqa: E402
from model import GPT, GPTConfig, record_activations, summarize_moments  # noqa: E402
from precision import fp8_quant_error, fp8_shape_error, keep_fp8_state_fp32, make_backend  # noqa: E402
from runlog import RunLog  # noqa: E402

# ---- the data and out_dir, still before any write ---------------------------------
ckpt_dir = os.path.join(out_dir, "ckpt")
hf_state = None
if init_from not in ("scratch", "resume"):  # a Hugging Face GPT-2 directory: its architecture and weights
    from model import CheckpointError, hf_gpt2_state
    try:
        hf_state, hf_args, _ = hf_gpt2_state(init_from, vocab_size, block_size)
    except CheckpointError as e:
        die(str(e))
    n_layer, n_head, n_embd, bias = (hf_args[k] for k in ("n_layer", "n_head", "n_embd", "bias"))
    config.update(n_layer=n_layer, n_head=n_head, n_embd=n_embd, bias=bias)
fp8_shape_problem = precision == "fp8" and fp8_shape_error(n_embd, vocab_size, micro_batch_size * block_size, fp8_backend)
if fp8_shape_problem:
    die(fp8_shape_problem)
try:
    train_data = D.open_split(data_dir, "train", block_size, vocab_size)
    val_data = D.open_split(data_dir, "val", block_size, vocab_size)
except D.DataError as e:
    die(str(e))
model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=vocab_size,
                  dropout=dropout, bias=bias, tweo_tau=tweo_tau, tweo_p=tweo_p,
                  activation_checkpointing=activation_checkpointing, attn_bias=attn_bias,
                  clipped_softmax_gamma=clipped_softmax_gamma, clipped_softmax_zeta=clipped_softmax_zeta)
if master:  # one run per out_dir: a second train.py, fresh or resuming, stops here naming the first
    try:
        run_lock = RunLock(out_dir).acquire()
    except LockHeld as e:
        die(str(e))
    atexit.register(run_lock.release)
    if run_lock.took_over:
        print(f"note: {out_dir} was locked by a run that is gone, now ours: {run_lock.took_over}")
run_json = os.path.join(out_dir, "run.json")
if init_from != "resume" and (os.path.exists(run_json) or os.path.exists(ckpt_dir)):
    die(f"{out_dir} already holds a run; continue it with --init_from=resume, or choose another out_dir")
resume_tag, convert_from = None, None  # the checkpoint to resume from; its world size when it differs from ours
if init_from == "resume":
    problem = model_change(out_dir, model_args)
    resume_tag, saved_world = resume_point(ckpt_dir)  # (None, None) if stopped before its first checkpoint
    if problem or saved_world == 0:
        die(problem or f"{ckpt_dir}/latest names {resume_tag!r}, which holds no DeepSpeed checkpoint")
    convert_from = saved_world if saved_world not in (None, world_size) else None

# ---- distributed setup -------------------------------------------------------
if "MASTER_ADDR" not in os.environ:  # plain `python train.py`: a world of one
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")

deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
if use_cuda:
    torch.cuda.set_device(device)
torch.manual_seed(seed)  # identical initial weights on every rank and for any world size
np.random.seed(seed)
random.seed(seed)


def all_reduce(t, op=dist.ReduceOp.SUM):
    if world_size > 1:
        dist.all_reduce(t, op=op)
    return t


# Preemption (SIGTERM) and Ctrl-C (SIGINT) only raise a flag; the ranks agree on it once per
# iteration, finish that iteration, save a checkpoint and exit 0. A second signal changes nothing.
stop_requests = []  # the signals' names
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: stop_requests.append(signal.Signals(signum).name))
if convert_from:  # saved on another number of ranks: DeepSpeed's universal checkpoint reshards it
    problem = convert_to_universal(ckpt_dir, resume_tag, convert_from, world_size, master, device, all_reduce)
    if problem:
        die(problem, status=1)

backend = make_backend(precision, fp8_backend, fp8_recipe, fp8_amax_history_len, fp8_amax_compute_algo, device.type,
                       cpu_gemm, compile)
cpu_gemm_path = {"path": backend.cpu_gemm, "why": backend.cpu_gemm_why}  # in run.json and the resume event
if master:  # a property of the device: the numerics stay bf16 or FP8 either way
    print(f"GEMM path: {backend.cpu_gemm} ({backend.cpu_gemm_why})")
if master and precision == "fp8" and backend.note:
    print(f"note: {backend.note}")
if master and precision == "fp8" and backend.name == "emulated":  # on every device, GPU or not
    why = ("fp8_backend=emulated" if fp8_backend == "emulated" else "no CUDA GPU" if not use_cuda else
           "compute capability %d.%d, below 8.9: no FP8 tensor cores" % torch.cuda.get_device_capability(device))
    print(f"note: FP8 GEMMs are emulated ({why}): Transformer Engine's numerics, not its speed")

ds_config = {
    "train_batch_size": micro_batch_size * grad_accum * world_size,
    "train_micro_batch_size_per_gpu": micro_batch_size,
    "gradient_accumulation_steps": grad_accum,
    "gradient_clipping": grad_clip,
    "bf16": {"enabled": True},
    "zero_optimization": {"stage": zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
    "steps_per_print": 1 << 30,
    "wall_clock_breakdown": False,
    "checkpoint": {"load_universal": bool(convert_from)},
}
with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero_stage == 3):
    model = GPT(GPTConfig(**model_args), backend)
if hf_state is not None:  # every rank reads the file; rank 0's copy is the one ZeRO-3 keeps
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0, enabled=zero_stage == 3):
        model.load_state_dict(hf_state, strict=False)  # strict but for an FP8 backend's scaling state


def param_groups(model):
    """Weight decay on matrices and embeddings only (2+ dims; under ZeRO-3 a partitioned
    parameter keeps its real shape in ds_shape)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# torch's fused AdamW, one kernel for all parameters, on every device (a CPU test steps what a GPU
# steps). Not DeepSpeed's FusedAdam: it JIT-compiles a CUDA op at the first run unless DeepSpeed was
# built with it, and torch's wheels ship no nvcc. ZeRO-3 lists torch.optim.AdamW as a supported
# optimizer (deepspeed/runtime/zero/utils.py, ZERO_SUPPORTED_OPTIMIZERS), fused or not.
optimizer = torch.optim.AdamW(param_groups(model), lr=learning_rate, betas=(beta1, beta2), fused=True)
engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
raw_model = engine.module
keep_fp8_state_fp32(raw_model)  # DeepSpeed casts float buffers to bf16; scales and amaxes stay fp32


def autocast(first_micro_batch=None, measure_quant_error=False):
    return backend.autocast(raw_model, first_micro_batch, measure_quant_error)


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


ckpts = Checkpoints(engine, out_dir, ckpt_keep, dict(model_args=model_args, config=config), rank, world_size,
                    device, all_reduce)
log = RunLog(out_dir, master, resuming=init_from == "resume")


def peak_memory_gb():
    if use_cuda:
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def peak_flops():
    if not use_cuda:
        return None
    name = torch.cuda.get_device_name(device)
    for key, bf16, fp8 in GPU_PEAK_TFLOPS:
        if key in name:
            peak = fp8 if precision == "fp8" and backend.name in ("te", "torch") and fp8 else bf16
            return peak * 1e12
    return None


# ---- start or resume ---------------------------------------------------------------
def fp8_state_sum():
    """A fingerprint of the FP8 scaling state (scales and amax histories), logged on resume."""
    return sum(b.double().sum().item() for n, b in raw_model.named_buffers() if ".fp8_" in n and "saturated" not in n)


iter_num, best_val_loss, best_train_loss, act_peak, wandb_id = 0, float("inf"), float("inf"), 0.0, None
if resume_tag:
    client = ckpts.resume(resume_tag, convert_from, backend)
    iter_num, best_val_loss, best_train_loss = client["iter"], client["best_val_loss"], client["best_train_loss"]
    act_peak, wandb_id = client["act_peak"], client.get("wandb_id")
    if master:
        print(f"resuming from {ckpt_dir}/{resume_tag} at iter {iter_num}"
              + (f" (saved on {convert_from} ranks, loaded through its universal checkpoint)" if convert_from else ""))
    log({"iter": iter_num, "event": "resume", "tag": resume_tag, "saved_world_size": convert_from or world_size,
                 "world_size": world_size, "fp8_state_sum": fp8_state_sum(), "gemm_path": cpu_gemm_path})
elif init_from == "resume":
    if master:
        print(f"{out_dir} was stopped before its first checkpoint: starting again from iter 0")
    log({"iter": 0, "event": "resume", "tag": None, "world_size": world_size, "gemm_path": cpu_gemm_path})
elif master:
    os.makedirs(out_dir, exist_ok=True)
    write_atomically(run_json, json.dumps({"config": config, "model_args": model_args, "world_size": world_size,
                                          "gemm_path": cpu_gemm_path}, indent=2))

n_params = raw_model.get_num_params(non_embedding=False)
if master:
    print(f"{n_params / 1e6:.2f}M parameters | {precision} ({backend.name}) | TWEO lambda {tweo_lambda} "
          f"(tau {tweo_tau}, p {tweo_p}) | ZeRO-{zero_stage} | {world_size} rank(s) x {micro_batch_size} seq x "
          f"{grad_accum} micro-steps = {total_batch_tokens:,} tokens/step | device {device}")
if wandb_log:
    wandb_id = log.start_wandb(wandb_project, wandb_run_name, config, wandb_mode, wandb_id)

val_windows = D.val_offsets(eval_windows, len(val_data), block_size)
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
                wandb_id=wandb_id, **extra)


# ---- the training loop ---------------------------------------------------------------
engine.train()
n_windows = micro_batch_size * grad_accum * world_size
interval_act_max = torch.zeros(n_layer, device=device)
t_last, iters_since, start_iter, t_start = time.time(), 0, iter_num, time.time()
spikes_in_row = 0
while iter_num < max_iters:
    lr = get_lr(iter_num)
    lam = get_tweo_lambda(iter_num)
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    offsets = D.train_offsets(seed, iter_num, n_windows, len(train_data), block_size)
    # the step before each act_stats line has its FP8 casts' losses measured (fp8_quant_error)
    measured = act_stats_interval > 0 and (iter_num + 1) % act_stats_interval == 0
    sums = torch.zeros(3, device=device)  # task loss, TWEO term (summed over micro-steps), ranks asked to stop
    for micro_step in range(grad_accum):
        x, y = D.get_batch(train_data, D.rank_slice(offsets, micro_step, rank, world_size, micro_batch_size),
                           block_size, device)
        with autocast(micro_step == 0 if grad_accum > 1 else None, measured):  # FP8 weights cast once
            out = engine(x, y, with_tweo=lam > 0)
        loss = out.loss + lam * out.tweo_loss if lam > 0 else out.loss
        sums[:2] += torch.stack([out.loss.detach().float(), out.tweo_loss.detach().float()])
        interval_act_max = torch.fmax(interval_act_max, out.act_max)  # a NaN does not hide the finite peak
        if micro_step == grad_accum - 1:
            # the one host sync per iteration: the global loss decides on a collapse before
            # the last backward (poisoning that backward makes DeepSpeed skip the update), and
            # the ranks agree on a stop, since a signal reaches them at different times
            sums[2] = bool(stop_requests or log.write_failed)  # a full disk stops like a signal
            loss_sum, tweo_sum, stop_votes = all_reduce(sums.clone()).tolist()
            train_loss, tweo_value = loss_sum / (grad_accum * world_size), tweo_sum / (grad_accum * world_size)
            spiked = not math.isfinite(train_loss) or train_loss > collapse_factor * best_train_loss
            if spiked:
                loss = loss * float("nan")
        engine.backward(loss)
        engine.step()
    iter_num += 1
    iters_since += 1

    if spiked:
        spikes_in_row += 1
        collapsed = not math.isfinite(train_loss) or spikes_in_row >= collapse_patience
        event = "collapse" if collapsed else "loss_spike"
        reason = "non-finite loss" if not math.isfinite(train_loss) else f"loss > {collapse_factor} x best {best_train_loss:.4f}"
        if master:
            print(f"{event.replace('_', ' ')} at iter {iter_num}: loss {train_loss:.4f} ({reason}); the update was skipped"
                  + (f" ({spikes_in_row} of {collapse_patience} in a row make a collapse)" if not collapsed
                     else "; stopping (stop_on_collapse)" if stop_on_collapse else "; continuing"))
        log({"iter": iter_num, "event": event, "loss": train_loss, "reason": reason, "skipped_steps": engine.skipped_steps})
        if collapsed:
            log.summary(collapsed=True, collapse_iter=iter_num)
            if stop_on_collapse:
                break
    else:  # a skipped iteration has no training log line; its evaluation, checkpoint and stop still come
        spikes_in_row = 0
        best_train_loss = min(best_train_loss, train_loss)

    if not spiked and (iter_num % log_interval == 0 or iter_num == max_iters):
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
        log(row)
        if master:
            eta = (max_iters - iter_num) * (now - t_start) / max(1, iter_num - start_iter)
            sat = fp8.get("fp8_saturated_tensors")
            print(f"iter {iter_num}/{max_iters} | loss {train_loss:.4f} | tweo {tweo_value:.4g} (λ {lam:g}) | lr {lr:.2e} | "
                  f"gnorm {row['grad_norm'] or 0:.3f} | act max {max(layer_max):.2f} peak {act_peak:.2f}"
                  + (f" | fp8 clipped tensors {sat}" if sat is not None else "")
                  + f" | {dt * 1000:.0f} ms/it {row['iter_per_hour']:.0f} it/h {row['tokens_per_sec']:.0f} tok/s"
                  + (f" | mfu {100 * row['mfu']:.1f}%" if "mfu" in row else "")
                  + f" | {row['mem_peak_gb']:.2f} GB | ETA {eta / 3600:.0f}h{eta % 3600 / 60:02.0f}m", flush=True)

    if act_stats_interval > 0 and iter_num % act_stats_interval == 0:
        quant_error = fp8_quant_error(raw_model)  # collective; before act_stats' forward
        log({"iter": iter_num, "act_stats": act_stats(), **quant_error})

    if iter_num % eval_interval == 0 or iter_num == max_iters:
        val_loss = run_eval()
        log({"iter": iter_num, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700))})
        if master:
            print(f"iter {iter_num}: val loss {val_loss:.4f}, val ppl {math.exp(min(val_loss, 700)):.2f}")
        if val_loss < best_val_loss:
            best_val_loss = val_loss
            ckpts.save(f"best_iter_{iter_num:07d}", "best", client_state(val_loss=val_loss))
            log.summary(best_val_loss=val_loss, best_val_ppl=math.exp(val_loss), best_iter=iter_num)

    if iter_num % ckpt_interval == 0 or iter_num == max_iters or stop_votes:
        ckpts.save(f"iter_{iter_num:07d}", "latest", client_state())
    if stop_votes:
        stop_request = stop_requests[0] if stop_requests else log.write_failed
        if master:
            print(f"stopped at iter {iter_num} on {stop_request or 'a signal to another rank'}; "
                  f"checkpoint {ckpt_dir}/iter_{iter_num:07d}; continue with --init_from=resume", flush=True)
        log({"iter": iter_num, "event": "stop", "signal": stop_request})
        break

log.summary(act_peak=act_peak, final_iter=iter_num)
log.finish()
if master:
    print(f"done at iter {iter_num}: best val loss {best_val_loss:.4f}, activation peak {act_peak:.2f}")
dist.barrier()
dist.destroy_process_group()
if run_lock is not None:
    run_lock.release()
if not use_cuda:
    # DeepSpeed's CPU shared-memory comm extension sometimes aborts in its C++ static
    # destructors at interpreter exit (about 1 run in 5 on 2 gloo ranks, after all work is
    # done); everything is written and closed by now, so leave without that teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
