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
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings

from configurator import configure_or_exit, first_violation, one_of, writable_dir
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
collapse_factor = 3.0  # a loss above collapse_factor x the best loss so far is a collapse
stop_on_collapse = True  # stop cleanly; False skips that update and continues
inject_nan_iter = -1  # testing the collapse path: make the loss NaN at this iteration
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
    ("inject_nan_iter", lambda v: v >= -1, ">= -1 (-1: off)"),
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

# ---- the data and out_dir, still before any write ---------------------------------
import numpy as np  # noqa: E402
import torch  # noqa: E402

import data as D  # noqa: E402
from model import GPTConfig  # noqa: E402
from precision import fp8_quant_error, fp8_shape_error, make_backend  # noqa: E402

use_cuda = torch.cuda.is_available()
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
    try:
        with open(run_json) as f:
            previous = {**vars(GPTConfig()), **json.load(f)["model_args"]}  # an option newer than the run: its default
    except (OSError, ValueError, KeyError, TypeError) as e:
        die(f"{run_json} is missing or unreadable ({type(e).__name__}): cannot check that the checkpoint fits this model")
    changed = {k: (previous.get(k), v) for k, v in model_args.items()
               if previous.get(k) != v and k != "activation_checkpointing"}
    if changed:
        die(f"{out_dir} holds a run of another model ({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in changed.items())})")
    if os.path.exists(os.path.join(ckpt_dir, "latest")):  # else stopped before its first checkpoint: start over
        with open(os.path.join(ckpt_dir, "latest")) as f:
            resume_tag = f.read().strip()
        # DeepSpeed writes one optimizer shard per data-parallel rank
        saved_world = len([f for f in os.listdir(os.path.join(ckpt_dir, resume_tag)) if f.endswith("optim_states.pt")]) \
            if os.path.isdir(os.path.join(ckpt_dir, resume_tag)) else 0
        if saved_world == 0:
            die(f"{ckpt_dir}/latest names {resume_tag!r}, which holds no DeepSpeed checkpoint")
        if saved_world != world_size:
            convert_from = saved_world

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

from model import GPT, record_activations, summarize_moments  # noqa: E402

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
stop_request = None


def request_stop(signum, frame):
    global stop_request
    stop_request = stop_request or signal.Signals(signum).name


for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, request_stop)

if convert_from:
    # saved on another number of ranks: DeepSpeed's universal checkpoint reshards it. Made
    # once, by rank 0, and kept inside the tag (so it goes when the tag is rotated out)
    universal = os.path.join(ckpt_dir, resume_tag, "universal")
    convert = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
               f"--input_folder={os.path.join(ckpt_dir, resume_tag)}", f"--output_folder={universal}"]
    failed = torch.zeros(1, device=device)
    if master and not os.path.isdir(universal):
        print(f"{ckpt_dir}/{resume_tag} was saved on {convert_from} rank(s) and this run has {world_size}: "
              f"converting it to a universal checkpoint: {' '.join(convert[1:])}", flush=True)
        shutil.rmtree(universal + ".tmp", ignore_errors=True)
        r = subprocess.run(convert[:-1] + [f"--output_folder={universal}.tmp"], capture_output=True, text=True)
        if r.returncode == 0:
            os.replace(universal + ".tmp", universal)
        else:
            failed[0] = 1
            print((r.stdout + r.stderr)[-3000:], file=sys.stderr)
    if all_reduce(failed, dist.ReduceOp.MAX).item():
        die(f"converting {ckpt_dir}/{resume_tag} to a universal checkpoint failed (above); "
            f"after fixing the cause run `{' '.join(convert)}` and resume again", status=1)

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
from precision import keep_fp8_state_fp32, load_te_fp8_state, te_fp8_state  # noqa: E402

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


# ---- checkpoints ---------------------------------------------------------------
write_errors = []  # this rank's failed checkpoint writes since the save began


def try_write(write, *args):
    """A checkpoint write whose failure (a full disk, a lost mount) is recorded for
    save_checkpoint to act on, not raised: DeepSpeed's save runs collectives after its
    writes, which every rank must still reach when the disk fails on some of them."""
    try:
        write(*args)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        write_errors.append(f"{args[-1]}: {e.strerror if isinstance(e, OSError) else str(e).splitlines()[0]}")


def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def torch_save_atomic(obj, path):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def read_pointer(name):
    with open(os.path.join(ckpt_dir, name)) as f:
        return f.read().strip()


def pointed_tags():
    return {read_pointer(p) for p in ("latest", "best") if os.path.exists(os.path.join(ckpt_dir, p))}


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
    """DeepSpeed checkpoint under ckpt/tag; then, once every rank has written everything,
    the pointer file `latest` or `best` is moved to it atomically and the consolidated
    model file replaced, so a crash mid-save leaves both at the previous complete
    checkpoint. A failed write on any rank stops the run with one line, after removing
    the partial tag: pointers and model files stay as they were."""
    write_errors.clear()
    path = os.path.join(ckpt_dir, tag)
    if master and os.path.isdir(path):  # (DeepSpeed's save begins with a barrier: the other ranks wait for this)
        if tag in pointed_tags():  # a best saved after the checkpoint this run resumed from: kept until replaced
            shutil.rmtree(path + ".old", ignore_errors=True)
            os.replace(path, path + ".old")
            for p in ("latest", "best"):
                if os.path.exists(os.path.join(ckpt_dir, p)) and read_pointer(p) == tag:
                    write_atomic(os.path.join(ckpt_dir, p), tag + ".old")
        else:
            shutil.rmtree(path)  # left by an interrupted save
    try_write(lambda path: engine.save_checkpoint(ckpt_dir, tag=tag, client_state=state, save_latest=False), path)
    try_write(torch.save, {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if use_cuda else None,
                           "numpy": np.random.get_state(), "python": random.getstate()},
              os.path.join(path, f"rng_rank{rank}.pt"))
    model_file = consolidated_state()
    stop_if_a_write_failed(tag, pointer)
    if master:  # commit: the pointer, then the model file
        old = read_pointer(pointer) if os.path.exists(os.path.join(ckpt_dir, pointer)) else None
        try_write(write_atomic, os.path.join(ckpt_dir, pointer), tag)
        model_file.update(iter=state["iter"], val_loss=state.get("val_loss"))
        try_write(torch_save_atomic, model_file, os.path.join(out_dir, f"model_{'best' if pointer == 'best' else 'last'}.pt"))
    stop_if_a_write_failed(tag, pointer)
    if master:
        # rotation: a superseded best goes; iteration checkpoints beyond the newest ckpt_keep
        # go unless a pointer names them (ckpt_keep=0 keeps them all)
        keep = pointed_tags()
        iters = sorted(t for t in os.listdir(ckpt_dir) if t.startswith("iter_") and os.path.isdir(os.path.join(ckpt_dir, t)))
        stale = ([old] if old and old.startswith("best_") else []) + (iters[:-ckpt_keep] if ckpt_keep > 0 else [])
        for t in stale:
            if t not in keep:
                shutil.rmtree(os.path.join(ckpt_dir, t), ignore_errors=True)
    dist.barrier()


def stop_if_a_write_failed(tag, pointer):
    """Collective: if any rank's write failed, remove what the save left (the tag, unless a
    pointer already names it, and temporary files) and stop every rank; the first rank
    that failed says why, in one line."""
    first_failed = int(all_reduce(torch.tensor([rank if write_errors else world_size], device=device), dist.ReduceOp.MIN).item())
    if first_failed == world_size:
        return
    free_mib = shutil.disk_usage(out_dir).free / 2**20
    if master:
        if tag not in pointed_tags():
            shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)
        for f in (os.path.join(ckpt_dir, pointer), os.path.join(out_dir, f"model_{'best' if pointer == 'best' else 'last'}.pt")):
            if os.path.exists(f + ".tmp"):
                os.remove(f + ".tmp")
    dist.barrier()
    if rank == first_failed:
        print(f"error: saving checkpoint {tag} failed ({write_errors[0]}; {free_mib:.0f} MiB free): the run stops; "
              f"{ckpt_dir}/latest and best still name complete checkpoints", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


_deepspeed_save = engine.checkpoint_engine.save
engine.checkpoint_engine.save = lambda state_dict, path: try_write(_deepspeed_save, state_dict, path)


# ---- logging -------------------------------------------------------------------
metrics_path = os.path.join(out_dir, "metrics.jsonl")
wandb_run = None


def drop_cut_short_line(path):
    """A run killed while writing metrics.jsonl leaves its last line cut short, and appending
    after it would fuse that fragment with the next line into one unreadable line. The
    fragment goes (the resume redoes its iteration, and logs it again)."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        start = max(0, size - (1 << 20))  # a line is far shorter than 1 MiB
        f.seek(start)
        tail = f.read()
        if not tail or tail.endswith(b"\n") or (b"\n" not in tail and start > 0):
            return
        keep = start + tail.rfind(b"\n") + 1
        f.truncate(keep)
    print(f"note: {path} ended in a line cut short (the run was killed while writing it): "
          f"dropped its {size - keep} bytes")


if master and init_from == "resume" and os.path.exists(metrics_path):
    drop_cut_short_line(metrics_path)


def json_safe(v):
    """metrics.jsonl is strict JSON: a non-finite float is written as the string "nan",
    "inf" or "-inf", which float() reads back."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def log_metrics(row):
    global wandb_run, stop_request
    if not master:
        return
    try:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(json_safe(row), allow_nan=False) + "\n")
    except OSError as e:  # a full disk: stop like on a signal, with a checkpoint if one still fits
        stop_request = stop_request or f"a failed write to {metrics_path} ({e.strerror})"
    if wandb_run is not None:
        try:
            flat = {k: v for k, v in row.items() if not isinstance(v, (dict, list))}
            flat.update({f"act_max/layer{i}": v for i, v in enumerate(row.get("act_max_per_layer", []))})
            flat.update({f"fp8_quant_error/{gemm}/{role}/{k}": v for gemm, roles in row.get("fp8_quant_error", {}).items()
                         for role, stats in roles.items() for k, v in stats.items()})
            wandb_run.log(flat)  # plotted against `iter` (define_metric after wandb.init), never step=iter
        except Exception as e:  # wandb never stops training
            print(f"warning: wandb.log failed ({type(e).__name__}: {e}); wandb logging off", flush=True)
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
    if convert_from:
        built_groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
        _, client = engine.load_checkpoint(os.path.join(ckpt_dir, resume_tag), tag="universal")
        # Two faults of DeepSpeed's ZeRO-3 universal load (deepspeed/runtime/zero/stage3.py,
        # load_hp_checkpoint_state_from_checkpoint_dir_stage3), undone here:
        # 1. it hands one `step` tensor to every param group's state, and AdamW increments each
        #    group's step in place: the count went up by 2 per iteration (10 -> 22 in 6 steps, and
        #    saved so), with the bias corrections of those later steps. Each group gets its own copy;
        # 2. it gives every param group the first group's hyperparameters (["param_groups"][0]): the
        #    no-decay group (biases, LayerNorm) decayed. Each takes back the settings this run built
        #    it with (the run's own config; lr is set every iteration).
        # Measured (configs/tiny.py in bf16, saved on 2 ranks at iter 10, resumed on 1 to 16): its
        # losses were 1.9e-3 off the uninterrupted run, now 5.8e-5, as a 1-rank run from scratch (4e-5).
        for state in engine.optimizer.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        for group, built in zip(engine.optimizer.param_groups, built_groups):
            group.update(built)
        # a universal checkpoint restores parameters and optimizer state; the module's buffers
        # (the emulated and torch backends' FP8 scaling state) come from the model states themselves
        model_states = sorted(f for f in os.listdir(os.path.join(ckpt_dir, resume_tag)) if f.endswith("model_states.pt"))
        saved = torch.load(os.path.join(ckpt_dir, resume_tag, model_states[0]), map_location=device, weights_only=False)["module"]
        persistent = raw_model.state_dict().keys()  # saturation flags are per micro-batch, never saved
        for n, b in raw_model.named_buffers():
            if n in persistent:
                b.copy_(saved[n])
    else:
        _, client = engine.load_checkpoint(ckpt_dir, tag=resume_tag)  # copies into the fp32 FP8 buffers as they are
    if backend.name == "te":  # TE's scaling state, saved as plain tensors in the client state
        load_te_fp8_state(raw_model, client.get("fp8_te_state", {}), backend.recipe)
    iter_num, best_val_loss, best_train_loss = client["iter"], client["best_val_loss"], client["best_train_loss"]
    act_peak, wandb_id = client["act_peak"], client.get("wandb_id")
    # every rank starts from the same seed, so a rank the checkpoint did not have takes rank 0's state
    rng_file = os.path.join(ckpt_dir, resume_tag, f"rng_rank{rank}.pt")
    rng = torch.load(rng_file if os.path.exists(rng_file) else os.path.join(ckpt_dir, resume_tag, "rng_rank0.pt"), weights_only=False)
    torch.set_rng_state(rng["torch"])
    if use_cuda and rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if master:
        print(f"resuming from {ckpt_dir}/{resume_tag} at iter {iter_num}"
              + (f" (saved on {convert_from} ranks, loaded through its universal checkpoint)" if convert_from else ""))
    log_metrics({"iter": iter_num, "event": "resume", "tag": resume_tag, "saved_world_size": convert_from or world_size,
                 "world_size": world_size, "fp8_state_sum": fp8_state_sum(), "gemm_path": cpu_gemm_path})
elif init_from == "resume":
    if master:
        print(f"{out_dir} was stopped before its first checkpoint: starting again from iter 0")
    log_metrics({"iter": 0, "event": "resume", "tag": None, "world_size": world_size, "gemm_path": cpu_gemm_path})
elif master:
    os.makedirs(out_dir, exist_ok=True)
    write_atomic(run_json, json.dumps({"config": config, "model_args": model_args, "world_size": world_size,
                                       "gemm_path": cpu_gemm_path}, indent=2))

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
            # Every metric is plotted against `iter`, and wandb's own step just counts log calls:
            # a resumed run redoes the iterations after its checkpoint, and wandb drops a row
            # logged at a step at or below the last one it has, so step=iter would lose them
            wandb_run.define_metric("iter")
            wandb_run.define_metric("*", step_metric="iter")
        except Exception as e:
            print(f"warning: wandb.init failed ({type(e).__name__}: {e}); logging to metrics.jsonl only", flush=True)
            wandb_run = None

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
    # the step before each act_stats line has its FP8 casts' losses measured (fp8_quant_error)
    measured = act_stats_interval > 0 and (iter_num + 1) % act_stats_interval == 0
    sums = torch.zeros(3, device=device)  # task loss, TWEO term (summed over micro-steps), ranks asked to stop
    for micro_step in range(grad_accum):
        x, y = D.get_batch(train_data, D.rank_slice(offsets, micro_step, rank, world_size, micro_batch_size),
                           block_size, device)
        with autocast(micro_step == 0 if grad_accum > 1 else None, measured):  # FP8 weights cast once
            out = engine(x, y, with_tweo=lam > 0)
        task_loss = out.loss * float("nan") if iter_num == inject_nan_iter else out.loss
        loss = task_loss + lam * out.tweo_loss if lam > 0 else task_loss
        sums[:2] += torch.stack([task_loss.detach().float(), out.tweo_loss.detach().float()])
        interval_act_max = torch.fmax(interval_act_max, out.act_max)  # a NaN does not hide the finite peak
        if micro_step == grad_accum - 1:
            # the one host sync per iteration: the global loss decides on a collapse before
            # the last backward (poisoning that backward makes DeepSpeed skip the update), and
            # the ranks agree on a stop, since a signal reaches them at different times
            sums[2] = stop_request is not None
            loss_sum, tweo_sum, stop_votes = all_reduce(sums.clone()).tolist()
            train_loss, tweo_value = loss_sum / (grad_accum * world_size), tweo_sum / (grad_accum * world_size)
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
        log_metrics({"iter": iter_num, "event": "collapse", "loss": train_loss,
                     "reason": reason, "skipped_steps": engine.skipped_steps})
        wandb_summary(collapsed=True, collapse_iter=iter_num)
        if stop_on_collapse:
            break
    else:  # a collapsed iteration has no training log line; its evaluation, checkpoint and stop still come
        best_train_loss = min(best_train_loss, train_loss)

    if not collapsed and (iter_num % log_interval == 0 or iter_num == max_iters):
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
            sat = fp8.get("fp8_saturated_tensors")
            print(f"iter {iter_num}/{max_iters} | loss {train_loss:.4f} | tweo {tweo_value:.4g} (λ {lam:g}) | lr {lr:.2e} | "
                  f"gnorm {row['grad_norm'] or 0:.3f} | act max {max(layer_max):.2f} peak {act_peak:.2f}"
                  + (f" | fp8 clipped tensors {sat}" if sat is not None else "")
                  + f" | {dt * 1000:.0f} ms/it {row['iter_per_hour']:.0f} it/h {row['tokens_per_sec']:.0f} tok/s"
                  + (f" | mfu {100 * row['mfu']:.1f}%" if "mfu" in row else "")
                  + f" | {row['mem_peak_gb']:.2f} GB | ETA {eta / 3600:.0f}h{eta % 3600 / 60:02.0f}m", flush=True)

    if act_stats_interval > 0 and iter_num % act_stats_interval == 0:
        quant_error = fp8_quant_error(raw_model)  # collective; before act_stats' forward
        log_metrics({"iter": iter_num, "act_stats": act_stats(), **quant_error})

    if iter_num % eval_interval == 0 or iter_num == max_iters:
        val_loss = run_eval()
        log_metrics({"iter": iter_num, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700))})
        if master:
            print(f"iter {iter_num}: val loss {val_loss:.4f}, val ppl {math.exp(min(val_loss, 700)):.2f}")
        if val_loss < best_val_loss:
            best_val_loss = val_loss
            save_checkpoint(f"best_iter_{iter_num:07d}", "best", client_state(val_loss=val_loss))
            wandb_summary(best_val_loss=val_loss, best_val_ppl=math.exp(val_loss), best_iter=iter_num)

    if iter_num % ckpt_interval == 0 or iter_num == max_iters or stop_votes:
        save_checkpoint(f"iter_{iter_num:07d}", "latest", client_state())
    if stop_votes:
        if master:
            print(f"stopped at iter {iter_num} on {stop_request or 'a signal to another rank'}; "
                  f"checkpoint {ckpt_dir}/iter_{iter_num:07d}; continue with --init_from=resume", flush=True)
        log_metrics({"iter": iter_num, "event": "stop", "signal": stop_request})
        break

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
if run_lock is not None:
    run_lock.release()
if not use_cuda:
    # DeepSpeed's CPU shared-memory comm extension sometimes aborts in its C++ static
    # destructors at interpreter exit (about 1 run in 5 on 2 gloo ranks, after all work is
    # done); everything is written and closed by now, so leave without that teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
