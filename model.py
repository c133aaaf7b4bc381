"""
GPT-2 with the TWEO penalty, in one file.

Read top to bottom:
  1. GPTConfig
  2. TWEOPenalty: L_TWEO for one block, mean((|A| / (tau + eps))^p), with a hand-written
     backward so that it keeps no activation memory of its own
  3. the GPT-2 blocks (attention with the paper's invasive baselines as options, off by
     default); every Linear (and the LayerNorm in front of it) comes from a
     precision backend (precision.py), so the same model runs in bf16, emulated FP8 or TE FP8
  4. GPT: forward returns logits, task loss, TWEO term and each block's max |output|
  5. activation statistics used by train.py (act_stats) and bench/eval.py

Paper: "TWEO: Transformers Without Extreme Outliers", Sec. 3.3 (the loss) and 4.3 (FP8).
Importing this file never imports transformer_engine or deepspeed.
"""
import contextlib
import functools
import io
import math
import os
import sys
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from precision import BF16Backend


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up for FP8 GEMM shapes (multiple of 16)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True        # biases in the Linears (LayerNorms always have one, as in TE)
    tweo_tau: float = 3.0
    tweo_p: float = 4.0
    tweo_eps: float = 1e-6
    activation_checkpointing: bool = False
    # the invasive baselines of the paper's Table 2, off by default (CausalSelfAttention)
    attn_bias: bool = False              # a learnable key k' and value v' per head that every query sees
    clipped_softmax_gamma: float = 0.0   # clip((zeta - gamma) softmax + gamma, 0, 1); gamma = -alpha / block_size
    clipped_softmax_zeta: float = 1.0


def _tweo_sum(a, p: float):
    """sum(|a|^p) in fp32 as one reduction over a (compiled: no temporary)."""
    return a.float().abs().pow(p).sum()


def _tweo_grad(a, coef, p: float, dtype=torch.float32):
    """coef * p-th power's derivative |a|^(p-1) sign(a), computed in dtype, returned in a's.
    Eager: one full-size temporary at a time; compiled: one pass over a."""
    grad = a.to(dtype).abs().pow_(p - 1).copysign_(a).mul_(coef)
    if p <= 1:
        grad.masked_fill_(a == 0, 0.0)  # the subgradient of |a|^p at 0
    return grad.to(a.dtype)


@functools.cache
def _tweo_kernels():
    return (torch.compile(_tweo_sum, fullgraph=True, dynamic=True),
            torch.compile(_tweo_grad, fullgraph=True, dynamic=True))


class TWEOPenalty(torch.autograd.Function):
    """mean((|A| / (tau + eps))^p) over every element of A, in fp32 (fp64 for fp64 input).

    Autograd on the naive formula would keep |A|/(tau+eps) and its powers alive for
    backward: several copies of every block's output. This keeps only A itself, which the
    next block's LayerNorm saves anyway, and writes the gradient
        p * |A|^(p-1) * sign(A) / ((tau + eps)^p * numel)
    by hand. Eager, the forward is a norm kernel (no full-size temporary); with `compiled`
    (the backend's compile, bf16 and fp32 input) forward and backward are each one fused
    pass over A, equal to the eager ones up to fp32 rounding."""

    @staticmethod
    def forward(ctx, a, tau, p, eps, compiled=False):
        dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
        compiled = compiled and dtype == torch.float32
        if compiled:
            total = _tweo_kernels()[0](a.detach(), p) / (tau + eps) ** p
        else:
            total = (torch.linalg.vector_norm(a, ord=p, dtype=dtype) / (tau + eps)) ** p
        ctx.save_for_backward(a)
        ctx.tau, ctx.p, ctx.eps, ctx.dtype, ctx.compiled = tau, p, eps, dtype, compiled
        return total / a.numel()

    @staticmethod
    def backward(ctx, grad_value):
        (a,) = ctx.saved_tensors
        p = ctx.p
        coef = grad_value.to(ctx.dtype) * p / ((ctx.tau + ctx.eps) ** p * a.numel())
        grad = (_tweo_kernels()[1] if ctx.compiled else _tweo_grad)(a.detach(), coef, p, ctx.dtype)
        return grad, None, None, None, None


def tweo_penalty(a, tau=3.0, p=4.0, eps=1e-6, compiled=False):
    return TWEOPenalty.apply(a, tau, p, eps, compiled)


def clipped_softmax_attention(q, k, v, mask, gamma, zeta, dropout_p=0.0, matmul=torch.matmul):
    """Attention with the clipped softmax of Bondarenko et al. 2023 (Eq. 4.1),
    clip((zeta - gamma) * softmax(q k^T / sqrt(d)) + gamma, 0, 1), which reaches exact zeros
    (a head doing nothing) at finite logits. mask (T, S): True where a query sees a key; a
    hidden key has softmax 0, stretched to gamma <= 0 and clipped back to 0. `matmul` is the
    backend's (bf16 products in fp32 on CPUs without native bf16 GEMMs)."""
    att = matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    att = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1, dtype=torch.promote_types(att.dtype, torch.float32))
    att = ((zeta - gamma) * att + gamma).clamp_(0.0, 1.0)
    return matmul(F.dropout(att, dropout_p).to(v.dtype), v)


class CausalSelfAttention(nn.Module):
    """Causal self-attention, through the fused SDPA kernel unless an invasive option is on:
    - attn_bias: k' and v' per head, prepended to every sequence's keys and values, so a head
      can attend to "nothing" instead of to a sink token (the paper's [1]; Sun et al. 2024).
      Initialised N(0, 0.02) and weight-decayed like every other matrix, as in Sun et al.'s
      nanoGPT code. SDPA takes them with an explicit mask.
    - clipped softmax (clipped_softmax_gamma < 0 or zeta > 1): no fused kernel computes it,
      so it runs clipped_softmax_attention."""

    def __init__(self, config, backend):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        gamma, zeta = config.clipped_softmax_gamma, config.clipped_softmax_zeta
        assert gamma <= 0 and zeta >= 1, "clipped softmax needs gamma <= 0 and zeta >= 1 (else masked keys leak)"
        proj_std = 0.02 / math.sqrt(2 * config.n_layer)  # GPT-2: residual projections scaled
        self.c_attn = backend.LayerNormLinear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # ln_1 + QKV
        self.c_proj = backend.Linear(config.n_embd, config.n_embd, bias=config.bias, init_std=proj_std)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.clip = (gamma, zeta) if (gamma, zeta) != (0.0, 1.0) else None
        self.attn_bias, self.matmul = config.attn_bias, backend.matmul
        if config.attn_bias:  # created with their init here, for zero.Init (see GPT)
            head_shape = (config.n_head, 1, config.n_embd // config.n_head)
            self.k_bias = nn.Parameter(torch.empty(head_shape).normal_(0.0, 0.02))
            self.v_bias = nn.Parameter(torch.empty(head_shape).normal_(0.0, 0.02))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        dropout_p = self.dropout if self.training else 0.0
        mask = None
        if self.attn_bias:
            k = torch.cat([self.k_bias.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)
            v = torch.cat([self.v_bias.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
        if self.attn_bias or self.clip:  # causal, aligned at the end: every query also sees k' (key 0)
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=k.size(2) - T)
        if self.clip is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout_p)
        else:
            y = clipped_softmax_attention(q, k, v, mask, *self.clip, dropout_p, self.matmul)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config, backend):
        super().__init__()
        proj_std = 0.02 / math.sqrt(2 * config.n_layer)
        self.c_fc = backend.LayerNormLinear(config.n_embd, 4 * config.n_embd, bias=config.bias)  # ln_2 + fc
        self.c_proj = backend.Linear(4 * config.n_embd, config.n_embd, bias=config.bias, init_std=proj_std)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LN block. Its output, after the MLP residual add, is the A^(l) that TWEO penalises."""

    def __init__(self, config, backend):
        super().__init__()
        self.attn = CausalSelfAttention(config, backend)
        self.mlp = MLP(config, backend)

    def forward(self, x):
        x = x + self.attn(x)
        x = x + self.mlp(x)
        return x


class GPTOutput(NamedTuple):
    logits: torch.Tensor
    loss: Optional[torch.Tensor]   # task loss (cross-entropy), None without targets
    tweo_loss: torch.Tensor        # L_TWEO, zero (and not computed) unless with_tweo
    act_max: torch.Tensor          # [n_layer] max |block output|, detached, for telemetry


class GPT(nn.Module):
    def __init__(self, config, backend=None):
        super().__init__()
        self.config = config
        self.backend = backend or BF16Backend()
        C, V = config.n_embd, config.vocab_size
        self.transformer = nn.ModuleDict(dict(
            # initialised through _weight so that the init happens inside the module's own
            # __init__ (DeepSpeed zero.Init partitions parameters right after it)
            wte=nn.Embedding(V, C, _weight=torch.empty(V, C).normal_(0.0, 0.02)),
            wpe=nn.Embedding(config.block_size, C, _weight=torch.empty(config.block_size, C).normal_(0.0, 0.02)),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, self.backend) for _ in range(config.n_layer)]),
        ))
        # final LayerNorm + LM head in one layer, so both run under FP8 as in the paper
        self.lm_head = self.backend.LayerNormLinear(C, V, bias=False)
        # tied by assignment, which also holds under ZeRO-3
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx, targets=None, with_tweo=False):
        cfg = self.config
        B, T = idx.size()
        assert T <= cfg.block_size, f"sequence of length {T} > block_size {cfg.block_size}"
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))

        tweo = torch.zeros((), device=idx.device)
        act_max = []
        for block in self.transformer.h:
            if cfg.activation_checkpointing and self.training:
                x = self.backend.checkpoint(block, x)
            else:
                x = block(x)
            if with_tweo:
                tweo = tweo + tweo_penalty(x, cfg.tweo_tau, cfg.tweo_p, cfg.tweo_eps, self.backend.compile)
            act_max.append(torch.linalg.vector_norm(x.detach(), float("inf")))  # max |A|, no temporary
        if with_tweo:
            tweo = tweo / cfg.n_layer

        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])  # generation only needs the last position
            loss = None
        return GPTOutput(logits, loss, tweo, torch.stack(act_max).float())

    def get_num_params(self, non_embedding=True):
        """Parameter count; the tied wte/lm_head counted once. non_embedding drops wpe (nanoGPT).
        Under ZeRO-3 a parameter holds only its shard; ds_numel is its full size."""
        numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731
        n = sum(numel(p) for p in self.parameters())
        if non_embedding:
            n -= numel(self.transformer.wpe.weight)
        return n

    def flops_per_token(self):
        """Training FLOPs per token: 6N + 12 L H Q T (PaLM appendix B, as nanoGPT)."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        return 6 * self.get_num_params() + 12 * L * H * Q * T

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, vocab_limit=None, generator=None):
        """Sample max_new_tokens tokens after idx (B, T). vocab_limit keeps the padded
        vocabulary entries (>= the tokenizer's size) from ever being sampled."""
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits = self(idx_cond).logits[:, -1, :].float()
            if vocab_limit is not None:
                logits = logits[:, :vocab_limit]
            logits = logits / max(temperature, 1e-8)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


def build_model(config, backend=None, device="cpu", dtype=torch.bfloat16):
    """GPT(config, backend) as every script but train.py needs it: on `device` in `dtype` (bf16:
    the weights DeepSpeed's bf16 gives train.py), its FP8 scaling state kept in fp32 as
    train.py keeps it (a bf16 scale would round the emulation's and torch._scaled_mm refuses it)."""
    from precision import keep_fp8_state_fp32
    model = GPT(config, backend).to(device=device, dtype=dtype)
    keep_fp8_state_fp32(model)
    return model


# ----------------------------------------------------------------------------------------
# Activation statistics: the paper's Figure 5 (top-1/2/3 and median of |block output|)
# and the outlier table of bench/eval.py. Partial statistics of several batches merge
# exactly, except the median (the median of the per-batch medians).

def _median(v):
    """Median of a 1-D tensor, averaging the two middle values for even sizes (numpy's)."""
    n = v.numel()
    lo = torch.kthvalue(v, (n + 1) // 2).values
    hi = torch.kthvalue(v, n // 2 + 1).values
    return (lo + hi) / 2


@torch.no_grad()
def activation_moments(t):
    """Mergeable statistics of one activation tensor (in float64)."""
    x = t.detach().double().flatten()
    a = x.abs()
    return {"n": x.numel(), "sums": [x.sum().item(), x.pow(2).sum().item(), x.pow(3).sum().item(), x.pow(4).sum().item()],
            "sum_abs": a.sum().item(), "top3": torch.topk(a, min(3, a.numel())).values.tolist(), "median": _median(a).item()}


def summarize_moments(parts):
    """Outlier statistics from one or more activation_moments(). Kurtosis is the raw
    mu4 / sigma^4 of the values (3 for a Gaussian); the others are of |values|."""
    n = sum(p["n"] for p in parts)
    s1, s2, s3, s4 = (sum(p["sums"][i] for p in parts) / n for i in range(4))
    var = s2 - s1 ** 2
    mu4 = s4 - 4 * s1 * s3 + 6 * s1 ** 2 * s2 - 3 * s1 ** 4
    top = sorted((v for p in parts for v in p["top3"]), reverse=True)[:3] + [0.0, 0.0]
    medians = sorted(p["median"] for p in parts)
    median = (medians[(len(medians) - 1) // 2] + medians[len(medians) // 2]) / 2
    return {"top1": top[0], "top2": top[1], "top3": top[2], "median": median, "max": top[0],
            "mean_abs": sum(p["sum_abs"] for p in parts) / n, "kurtosis": mu4 / var ** 2 if var > 0 else float("nan"),
            "inf_norm": top[0]}


def outlier_stats(t):
    return summarize_moments([activation_moments(t)])


@contextlib.contextmanager
def record_activations(model, ffn=False):
    """Collect activation_moments of every block output (and, with ffn=True, every MLP
    output before its residual add) while the context is open. Yields a dict
    {"block": [[moments per forward] per layer], "ffn": [...]}; summarize_moments() each."""
    blocks = model.transformer.h
    records = {"block": [[] for _ in blocks], "ffn": [[] for _ in blocks] if ffn else []}
    hooks = []
    for i, block in enumerate(blocks):
        hooks.append(block.register_forward_hook(lambda m, inp, out, i=i: records["block"][i].append(activation_moments(out))))
        if ffn:
            hooks.append(block.mlp.register_forward_hook(lambda m, inp, out, i=i: records["ffn"][i].append(activation_moments(out))))
    try:
        yield records
    finally:
        for h in hooks:
            h.remove()


# ----------------------------------------------------------------------------------------
# Loading a trained model (sample.py, bench/eval.py)

class CheckpointError(Exception):
    pass


def _first_sentence(e):
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0].split('. ')[0]}"


def load_trained(out_dir, ckpt="last", backend=None, device="cpu"):
    """A trained GPT from out_dir: the consolidated model_{ckpt}.pt that train.py writes,
    or, when ckpt is a DeepSpeed checkpoint tag or folder, the ZeRO-3 shards themselves
    (gathered on CPU with DeepSpeed's zero_to_fp32). Returns (model, run info) with the
    model in bf16 (FP8 scaling state in fp32), in eval mode. Raises CheckpointError, also
    when a Transformer Engine delayed-scaling model would be evaluated without the
    checkpoint's FP8 state (TE's scales would all be 1.0: it only updates them when training)."""
    from precision import load_te_fp8_state

    path = os.path.join(out_dir, f"model_{ckpt}.pt")
    if os.path.isfile(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated zip, a pickle of other objects, not a torch file at all
            raise CheckpointError(f"{path} cannot be read as a PyTorch file, truncated or another format "
                                  f"({_first_sentence(e)})") from None
        if not (isinstance(saved, dict) and isinstance(saved.get("model"), dict) and isinstance(saved.get("model_args"), dict)):
            raise CheckpointError(f"{path} is not a model file written by train.py (no 'model' and 'model_args')")
        state, args, te_state = saved["model"], saved["model_args"], saved.get("fp8_te_state", {})
        info = {k: saved.get(k) for k in ("config", "iter", "val_loss")}
    else:
        state, args, info, te_state = _load_zero_checkpoint(out_dir, ckpt)
        path = os.path.join(out_dir, "ckpt", ckpt)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: the model state holds something other than tensors")
    try:  # the FP8 scaling state in fp32, loaded below without rounding
        model = build_model(GPTConfig(**args), backend, device)
    except Exception as e:  # unknown keys, or values no GPT has
        raise CheckpointError(f"{path}: model arguments {args} do not describe a GPT ({type(e).__name__}: {e})") from None
    expected = model.state_dict()
    for k, v in state.items():
        if k in expected and expected[k].shape != v.shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)} in the checkpoint but {tuple(expected[k].shape)} "
                                  f"in the model: a checkpoint of another size or vocabulary")
    # FP8 scaling state only exists in FP8 models; anything else must match exactly
    state = {k: v for k, v in state.items() if (".fp8_" not in k or k in expected) and not k.endswith("_extra_state")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if ".fp8_" not in k and not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    info["trained_in_fp8"] = any(".fp8_" in k for k in state) or bool(te_state) or \
        (info.get("config") or {}).get("precision") == "fp8"
    # current scaling keeps no state: each cast takes its scale from the tensor itself
    if getattr(model.backend, "name", None) == "te" and model.backend.recipe_name == "delayed":
        if not te_state:
            raise CheckpointError(f"{out_dir} ({ckpt}) holds no Transformer Engine FP8 scaling state (a run trained "
                                  f"with another FP8 backend, or an older checkpoint): TE would evaluate with every "
                                  f"scale at 1.0. Evaluate with the emulated or torch backend, or in bf16")
        load_te_fp8_state(model, te_state, model.backend.recipe)
    return model.eval(), info


def _load_zero_checkpoint(out_dir, ckpt):
    ckpt_root = os.path.join(out_dir, "ckpt")
    tag_dir = ckpt if os.path.isdir(ckpt) else os.path.join(ckpt_root, ckpt)
    if not os.path.isdir(tag_dir) and os.path.isfile(os.path.join(ckpt_root, ckpt if ckpt != "last" else "latest")):
        with open(os.path.join(ckpt_root, ckpt if ckpt != "last" else "latest")) as f:
            tag_dir = os.path.join(ckpt_root, f.read().strip())
    if not os.path.isdir(tag_dir):
        raise CheckpointError(f"no model_{ckpt}.pt and no DeepSpeed checkpoint '{ckpt}' in {out_dir}")
    run_json = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(tag_dir))), "run.json")
    if not os.path.isfile(run_json):
        raise CheckpointError(f"{run_json} not found: cannot tell the model's size")
    import json
    try:
        with open(run_json) as f:
            run = json.load(f)
        args, config = run["model_args"], run["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{run_json} is not a run.json written by train.py ({type(e).__name__})") from None
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    root, tag = os.path.split(os.path.abspath(tag_dir))
    progress = io.StringIO()  # DeepSpeed's progress (stdout and stderr): shown on stderr, unless it fails
    try:
        with contextlib.redirect_stdout(progress), contextlib.redirect_stderr(progress):
            state = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    except Exception as e:  # truncated shards, missing files, another kind of checkpoint
        raise CheckpointError(f"{tag_dir} is not a readable DeepSpeed checkpoint ({_first_sentence(e)})") from None
    sys.stderr.write(progress.getvalue())
    # train.py's client state (TE's FP8 scaling state among it) sits in rank 0's model-states file
    client = {}
    for name in ("zero_pp_rank_0_mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt"):  # ZeRO-3, ZeRO-0..2
        if os.path.isfile(os.path.join(tag_dir, name)):
            try:
                client = torch.load(os.path.join(tag_dir, name), map_location="cpu", weights_only=True)
            except Exception:  # objects beyond plain tensors and containers: no TE state then
                client = {}
            break
    return dict(state), args, {"config": config, "iter": None, "val_loss": None}, client.get("fp8_te_state") or {}


# ----------------------------------------------------------------------------------------
# Loading a Hugging Face GPT-2 checkpoint from a local directory (config.json and
# model.safetensors or pytorch_model.bin), as nanoGPT's from_pretrained but without the
# network: bench/eval.py, ptq.py, stethoscope.py, hellaswag.py and sample.py --hf=DIR, train.py
# init_from=DIR; and back to such a directory: bench/export_hf.py.

def hf_gpt2_names(n_layer):
    """(our name, GPT2LMHeadModel's name without its 'transformer.' prefix, stored transposed)
    of every tensor a GPT-2 checkpoint holds: the one table that hf_gpt2_state reads from
    Hugging Face and bench/export_hf.py writes back. HF's Conv1D stores weights as [in, out],
    ours are [out, in]; ln_1, ln_2 and ln_f are the LayerNorms of QKV, fc and the LM head;
    the LM head is tied to wte."""
    names = [("transformer.wte.weight", "wte.weight", False), ("transformer.wpe.weight", "wpe.weight", False),
             ("lm_head.layer_norm_weight", "ln_f.weight", False), ("lm_head.layer_norm_bias", "ln_f.bias", False)]
    for i in range(n_layer):
        h, ours = f"h.{i}.", f"transformer.h.{i}."
        for ln, layer in (("ln_1", "attn.c_attn"), ("ln_2", "mlp.c_fc")):
            names += [(f"{ours}{layer}.layer_norm_weight", f"{h}{ln}.weight", False),
                      (f"{ours}{layer}.layer_norm_bias", f"{h}{ln}.bias", False)]
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            names += [(f"{ours}{layer}.weight", f"{h}{layer}.weight", True), (f"{ours}{layer}.bias", f"{h}{layer}.bias", False)]
    return names


def hf_gpt2_state(hf_dir, vocab_size=None, block_size=None):
    """(state dict in our names, model args, the checkpoint's own vocabulary size), named
    and transposed by hf_gpt2_names. The vocabulary is padded with zero rows to vocab_size
    (default: the next multiple of 64, 50304 for GPT-2) and wpe is cropped to block_size
    (default: n_positions). Raises CheckpointError."""
    import json
    try:
        with open(os.path.join(hf_dir, "config.json")) as f:
            c = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{hf_dir} is not a Hugging Face model directory: config.json unreadable ({e})") from None
    n_embd = c.get("n_embd")
    unsupported = {"model_type": (c.get("model_type"), "gpt2"),
                   "activation_function": (c.get("activation_function"), ("gelu_new", "gelu_pytorch_tanh")),
                   "n_inner": (c.get("n_inner"), (None, 4 * (n_embd or 0))),
                   "layer_norm_epsilon": (c.get("layer_norm_epsilon", 1e-5), 1e-5),
                   "scale_attn_weights": (c.get("scale_attn_weights", True), True),
                   "scale_attn_by_inverse_layer_idx": (c.get("scale_attn_by_inverse_layer_idx", False), False)}
    for key, (got, want) in unsupported.items():
        if got not in (want if isinstance(want, tuple) else (want,)):
            raise CheckpointError(f"{hf_dir}: {key}={got!r} is not a GPT-2 this model can hold (needs {want!r})")
    st, bin_ = os.path.join(hf_dir, "model.safetensors"), os.path.join(hf_dir, "pytorch_model.bin")
    if not os.path.isfile(st) and not os.path.isfile(bin_):
        raise CheckpointError(f"{hf_dir} holds neither model.safetensors nor pytorch_model.bin")
    try:  # a copy interrupted mid-transfer leaves a truncated file
        if os.path.isfile(st):
            from safetensors.torch import load_file
            hf = load_file(st)
        else:
            hf = torch.load(bin_, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{st if os.path.isfile(st) else bin_} cannot be read: truncated or damaged "
                              f"({_first_sentence(e)})") from None
    if not isinstance(hf, dict) or not all(isinstance(v, torch.Tensor) for v in hf.values()):
        raise CheckpointError(f"{bin_} holds something other than a state dict of tensors")
    if not all(isinstance(c.get(k), int) for k in ("vocab_size", "n_positions", "n_layer", "n_head")):
        raise CheckpointError(f"{hf_dir}/config.json lacks one of vocab_size, n_positions, n_layer, n_head")
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
    n_vocab, n_positions = c["vocab_size"], c["n_positions"]
    vocab_size = vocab_size or -(-n_vocab // 64) * 64
    block_size = block_size or n_positions
    if vocab_size < n_vocab or block_size > n_positions:
        raise CheckpointError(f"{hf_dir} has {n_vocab} tokens and {n_positions} positions: vocab_size {vocab_size} "
                              f"must be >= {n_vocab} and block_size {block_size} <= {n_positions}")
    if "lm_head.weight" in hf and not torch.equal(hf["lm_head.weight"], hf["wte.weight"]):
        raise CheckpointError(f"{hf_dir}: the LM head is not tied to wte, which GPT-2 (and this model) ties")
    try:
        state = {ours: hf[theirs].t() if transposed else hf[theirs] for ours, theirs, transposed in hf_gpt2_names(c["n_layer"])}
    except KeyError as e:
        raise CheckpointError(f"{hf_dir}: the checkpoint has no {e.args[0]}: not a GPT-2 checkpoint") from None
    wte = state["transformer.wte.weight"]
    state["transformer.wte.weight"] = torch.cat([wte, wte.new_zeros(vocab_size - n_vocab, wte.size(1))])
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:block_size]
    state["lm_head.weight"] = state["transformer.wte.weight"]
    args = dict(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=n_embd, block_size=block_size,
                vocab_size=vocab_size, dropout=0.0, bias=True)
    return {k: v.float().contiguous() for k, v in state.items()}, args, n_vocab


def load_hf(hf_dir, backend=None, device="cpu", dtype=torch.bfloat16, block_size=None):
    """A GPT holding a Hugging Face GPT-2 checkpoint, in eval mode, as load_trained returns
    one. The padded vocabulary entries get logit -inf, so that the loss, the perplexity and
    sampling are those of the original model. Raises CheckpointError."""
    state, args, n_vocab = hf_gpt2_state(hf_dir, block_size=block_size)
    model = build_model(GPTConfig(**args), backend, device, dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)  # rounds to dtype as .to(dtype) would
    missing = [k for k in missing if ".fp8_" not in k and not k.endswith("_extra_state")]  # an FP8 backend's own state
    if missing or unexpected:
        raise CheckpointError(f"{hf_dir} does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}")

    def mask_padded_vocab(module, inputs, logits):
        return logits.index_fill(-1, torch.arange(n_vocab, logits.size(-1), device=logits.device), -float("inf"))
    model.lm_head.register_forward_hook(mask_padded_vocab)
    info = {"config": None, "iter": None, "val_loss": None, "trained_in_fp8": False, "hf_vocab_size": n_vocab}
    return model.eval(), info
