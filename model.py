"""
GPT-2 with the TWEO penalty, in one file.

Read top to bottom:
  1. GPTConfig
  2. TWEOPenalty: L_TWEO for one block, mean((|A| / (tau + eps))^p), with a hand-written
     backward so that it keeps no activation memory of its own
  3. the GPT-2 blocks; every Linear (and the LayerNorm in front of it) comes from a
     precision backend (precision.py), so the same model runs in bf16, emulated FP8 or TE FP8
  4. GPT: forward returns logits, task loss, TWEO term and each block's max |output|
  5. activation statistics used by train.py (act_stats) and bench/eval.py

Paper: "TWEO: Transformers Without Extreme Outliers", Sec. 3.3 (the loss) and 4.3 (FP8).
Importing this file never imports transformer_engine or deepspeed.
"""
import contextlib
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


class TWEOPenalty(torch.autograd.Function):
    """mean((|A| / (tau + eps))^p) over every element of A, in fp32 (fp64 for fp64 input).

    Autograd on the naive formula would keep |A|/(tau+eps) and its powers alive for
    backward: several copies of every block's output. This keeps only A itself, which the
    next block's LayerNorm saves anyway, and writes the gradient
        p * |A|^(p-1) * sign(A) / ((tau + eps)^p * numel)
    by hand. The forward uses a norm kernel, so it makes no full-size temporary either."""

    @staticmethod
    def forward(ctx, a, tau, p, eps):
        dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
        norm = torch.linalg.vector_norm(a, ord=p, dtype=dtype)
        ctx.save_for_backward(a)
        ctx.tau, ctx.p, ctx.eps, ctx.dtype = tau, p, eps, dtype
        return (norm / (tau + eps)) ** p / a.numel()

    @staticmethod
    def backward(ctx, grad_value):
        (a,) = ctx.saved_tensors
        p = ctx.p
        coef = grad_value.to(ctx.dtype) * p / ((ctx.tau + ctx.eps) ** p * a.numel())
        grad = a.to(ctx.dtype).abs() if a.dtype != ctx.dtype else a.abs()
        grad.pow_(p - 1).copysign_(a).mul_(coef)
        if p <= 1:
            grad.masked_fill_(a == 0, 0.0)  # the subgradient of |a|^p at 0
        return grad.to(a.dtype), None, None, None


def tweo_penalty(a, tau=3.0, p=4.0, eps=1e-6):
    return TWEOPenalty.apply(a, tau, p, eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, backend):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        proj_std = 0.02 / math.sqrt(2 * config.n_layer)  # GPT-2: residual projections scaled
        self.c_attn = backend.LayerNormLinear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # ln_1 + QKV
        self.c_proj = backend.Linear(config.n_embd, config.n_embd, bias=config.bias, init_std=proj_std)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
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
                tweo = tweo + tweo_penalty(x, cfg.tweo_tau, cfg.tweo_p, cfg.tweo_eps)
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


def load_trained(out_dir, ckpt="last", backend=None, device="cpu"):
    """A trained GPT from out_dir: the consolidated model_{ckpt}.pt that train.py writes,
    or, when ckpt is a DeepSpeed checkpoint tag or folder, the ZeRO-3 shards themselves
    (gathered on CPU with DeepSpeed's zero_to_fp32). Returns (model, run info) with the
    model in bf16 (FP8 scaling state in fp32), in eval mode. Raises CheckpointError, also
    when a Transformer Engine model would be evaluated without the checkpoint's FP8 state
    (TE's scales would all be 1.0: it only updates them when training)."""
    from precision import keep_fp8_state_fp32, load_te_fp8_state

    path = os.path.join(out_dir, f"model_{ckpt}.pt")
    if os.path.isfile(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        state, args, te_state = saved["model"], saved["model_args"], saved.get("fp8_te_state", {})
        info = {k: saved.get(k) for k in ("config", "iter", "val_loss")}
    else:
        state, args, info, te_state = _load_zero_checkpoint(out_dir, ckpt)
    model = GPT(GPTConfig(**args), backend)
    model.to(device=device, dtype=torch.bfloat16)  # as under DeepSpeed bf16 ...
    keep_fp8_state_fp32(model)  # ... with the FP8 scaling state in fp32, loaded below without rounding
    expected = model.state_dict()
    for k, v in state.items():
        if k in expected and expected[k].shape != v.shape:
            raise CheckpointError(f"{k} has shape {tuple(v.shape)} in the checkpoint but {tuple(expected[k].shape)} "
                                  f"in the model: a checkpoint of another size or vocabulary")
    # FP8 scaling state only exists in FP8 models; anything else must match exactly
    state = {k: v for k, v in state.items() if (".fp8_" not in k or k in expected) and not k.endswith("_extra_state")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if ".fp8_" not in k and not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    info["trained_in_fp8"] = any(".fp8_" in k for k in state) or bool(te_state) or \
        (info.get("config") or {}).get("precision") == "fp8"
    if getattr(model.backend, "name", None) == "te":
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
    with open(run_json) as f:
        run = json.load(f)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    root, tag = os.path.split(os.path.abspath(tag_dir))
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed reports progress on stdout
        state = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    # train.py's client state (TE's FP8 scaling state among it) sits in rank 0's model-states file
    client = {}
    for name in ("zero_pp_rank_0_mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt"):  # ZeRO-3, ZeRO-0..2
        if os.path.isfile(os.path.join(tag_dir, name)):
            try:
                client = torch.load(os.path.join(tag_dir, name), map_location="cpu", weights_only=True)
            except Exception:  # objects beyond plain tensors and containers: no TE state then
                client = {}
            break
    return (dict(state), run["model_args"], {"config": run["config"], "iter": None, "val_loss": None},
            client.get("fp8_te_state") or {})
