"""
Precision backends: the one place that knows how a GEMM is computed.

model.py asks a backend for two layer types and one context manager:

    backend.LayerNormLinear(in, out, bias, init_std)   LayerNorm fused into the GEMM's input
    backend.Linear(in, out, bias, init_std)
    with backend.autocast(): ...                        wraps one micro-batch forward

and train.py additionally calls backend.checkpoint(fn, x) for activation checkpointing
and backend.telemetry(model) for the FP8 amax / saturation signals.

Three backends, chosen by make_backend():
  bf16      torch layers under torch.autocast(bfloat16); CPU and CUDA
  emulated  the numerics of Transformer Engine's per-tensor FP8 (E4M3 forward, E5M2
            gradients, delayed or current scaling) on any device, CPU included
  te        NVIDIA Transformer Engine, imported lazily (GPU with compute capability >= 8.9)

All three use Transformer Engine's parameter names (layer_norm_weight, layer_norm_bias,
weight, bias), so a checkpoint trained with one loads into the others.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn  # forward: activations and weights, max 448
E5M2 = torch.float8_e5m2    # backward: output gradients, max 57344
ROLES = ("input", "weight", "grad_output")
ROLE_DTYPES = (E4M3, E4M3, E5M2)


# ----------------------------------------------------------------------------------------
# bf16: plain torch layers. They initialise themselves in __init__ (not in a later
# model.apply) because under DeepSpeed's zero.Init a module's parameters are partitioned
# as soon as its own __init__ returns.

class Linear(nn.Linear):
    def __init__(self, in_features, out_features, bias=True, init_std=0.02):
        super().__init__(in_features, out_features, bias=bias)
        nn.init.normal_(self.weight, mean=0.0, std=init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class LayerNormLinear(nn.Module):
    """LayerNorm then Linear in one module, as te.LayerNormLinear (same parameter names).
    The LayerNorm always has a bias, as in TE; `bias` toggles the Linear's bias."""

    def __init__(self, in_features, out_features, bias=True, init_std=0.02, eps=1e-5):
        super().__init__()
        self.in_features, self.out_features, self.eps = in_features, out_features, eps
        self.layer_norm_weight = nn.Parameter(torch.ones(in_features))
        self.layer_norm_bias = nn.Parameter(torch.zeros(in_features))
        self.weight = nn.Parameter(torch.empty(out_features, in_features).normal_(0.0, init_std))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def layer_norm(self, x):
        return F.layer_norm(x, (self.in_features,), self.layer_norm_weight, self.layer_norm_bias, self.eps)

    def forward(self, x):
        return F.linear(self.layer_norm(x), self.weight, self.bias)


class BF16Backend:
    name = "bf16"
    Linear = Linear
    LayerNormLinear = LayerNormLinear

    def __init__(self, device_type="cpu"):
        self.device_type = device_type

    def autocast(self, model=None):
        return torch.autocast(device_type=self.device_type, dtype=torch.bfloat16)

    def checkpoint(self, fn, *args):
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)

    def telemetry(self, model):
        return {}


# ----------------------------------------------------------------------------------------
# Emulated FP8: Transformer Engine's per-tensor scaling, computed with torch's float8 dtypes.
#
# Each GEMM keeps one scale per role (input, weight, grad_output). The value x is cast as
# saturate(x * scale) -> float8, and the GEMM runs on the dequantized values with fp32
# accumulation, as the FP8 tensor cores do.
#
# Delayed scaling (TE's DelayedScaling): the scale used at step t is fp8_max / amax, where
# amax is taken over the last `amax_history_len` amaxes recorded *before* t. The amax of
# step t is pushed only after it has been used, so a new outlier larger than anything in
# the history saturates at step t. That zero tolerance is what the TWEO experiment tests.
# Current scaling (TE's Float8CurrentScaling): the scale comes from the tensor itself.

def fp8_max(dtype):
    return torch.finfo(dtype).max


def amax_of(x):
    return torch.linalg.vector_norm(x.detach(), float("inf")).float()  # max |x| in one pass, no temporary


def quantize(x, scale, dtype, amax=None):
    """Cast x*scale to `dtype`, saturating. Returns (fp8 tensor, number of saturated elements).
    The saturation count (and the clamp) is only computed when amax*scale can exceed the
    format's maximum, which keeps the common case to two passes over x."""
    limit = fp8_max(dtype)
    amax = amax_of(x) if amax is None else amax
    y = x.to(torch.float32, copy=True).mul_(scale)
    if bool(amax * scale > limit):
        saturated = torch.count_nonzero(y.abs() > limit)
        y.clamp_(-limit, limit)
    else:
        saturated = torch.zeros((), dtype=torch.long, device=x.device)
    return y.to(dtype), saturated


def dequantize(q, scale):
    return q.to(torch.float32).div_(scale)


class _FP8LinearFunction(torch.autograd.Function):
    """y = x @ w.T + b with x, w in E4M3 and dy in E5M2, fp32 accumulation. Saves the FP8
    copies of x and w for backward (one byte per element), as Transformer Engine does."""

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    @torch.autocast("cuda", enabled=False)
    def forward(ctx, x, weight, bias, layer, training_step):
        ax, aw = amax_of(x), amax_of(weight)
        sx, sw = layer.scale_for(0, ax), layer.scale_for(1, aw)
        xq, sat_x = quantize(x, sx, E4M3, ax)
        wq, sat_w = quantize(weight, sw, E4M3, aw)
        if training_step:  # evaluation leaves the scaling state as it is
            layer.record(0, ax, sat_x)
            layer.record(1, aw, sat_w)
        out = F.linear(dequantize(xq, sx), dequantize(wq, sw), None if bias is None else bias.float())
        ctx.save_for_backward(xq, wq, sx, sw)
        ctx.layer, ctx.has_bias = layer, bias is not None
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xq, wq, sx, sw = ctx.saved_tensors
        layer = ctx.layer
        ag = amax_of(grad_out)
        sg = layer.scale_for(2, ag)
        gq, sat_g = quantize(grad_out, sg, E5M2, ag)
        layer.record(2, ag, sat_g)
        g = dequantize(gq, sg).reshape(-1, grad_out.shape[-1])
        grad_x = (g @ dequantize(wq, sw)).reshape(*grad_out.shape[:-1], wq.shape[-1])
        grad_w = g.t() @ dequantize(xq, sx).reshape(-1, xq.shape[-1])
        # the bias gradient comes from the high-precision gradient, as in TE's fused cast+dbias
        grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0, dtype=torch.float32) if ctx.has_bias else None
        return grad_x.to(ctx.x_dtype), grad_w.to(ctx.w_dtype), grad_b, None, None


class _FP8State:
    """Per-GEMM scaling state, all of it in buffers so that it is checkpointed and moves
    with the module: scale[3], amax_history[H, 3] (row 0 newest), the amax seen since the
    last update (amax_pending[3]) and saturation counters since the last telemetry read."""

    def _init_fp8_state(self, recipe, history_len, compute_algo):
        self.recipe, self.compute_algo = recipe, compute_algo
        self.register_buffer("fp8_scale", torch.ones(3))
        self.register_buffer("fp8_amax_history", torch.zeros(history_len, 3))
        self.register_buffer("fp8_amax_pending", torch.zeros(3))
        self.register_buffer("fp8_saturated", torch.zeros(3, dtype=torch.long))

    def scale_for(self, role, amax):
        if self.recipe == "current":
            scale = fp8_max(ROLE_DTYPES[role]) / amax
            return torch.where((amax > 0) & torch.isfinite(amax), scale, torch.ones_like(scale))
        return self.fp8_scale[role].clone()

    def record(self, role, amax, saturated):
        # a running max, so a second call (activation-checkpoint recompute) changes nothing
        self.fp8_amax_pending[role] = torch.maximum(self.fp8_amax_pending[role], amax)
        self.fp8_saturated[role] += saturated

    @torch.no_grad()
    def update_scales(self, reduced_pending):
        """Push the amax of the step just finished and compute the scales for the next one."""
        self.fp8_amax_history.copy_(torch.roll(self.fp8_amax_history, 1, 0))
        self.fp8_amax_history[0] = reduced_pending
        amax = self.fp8_amax_history.amax(0) if self.compute_algo == "max" else self.fp8_amax_history[0]
        maxes = torch.tensor([fp8_max(d) for d in ROLE_DTYPES], device=amax.device)
        new = maxes / amax
        keep = ~((amax > 0) & torch.isfinite(amax))  # TE keeps the previous scale then
        new = torch.where(keep, self.fp8_scale, new)
        new = torch.where(torch.isinf(new), torch.full_like(new, torch.finfo(torch.float32).max), new)
        self.fp8_scale.copy_(new)
        self.fp8_amax_pending.zero_()


class FP8Linear(_FP8State, Linear):
    def __init__(self, in_features, out_features, bias=True, init_std=0.02, *, recipe, history_len, compute_algo):
        super().__init__(in_features, out_features, bias=bias, init_std=init_std)
        self._init_fp8_state(recipe, history_len, compute_algo)

    def forward(self, x):
        return _FP8LinearFunction.apply(x, self.weight, self.bias, self, self.training and torch.is_grad_enabled())


class FP8LayerNormLinear(_FP8State, LayerNormLinear):
    """LayerNorm in high precision, its output quantized as the GEMM input (TE's LayerNormLinear)."""

    def __init__(self, in_features, out_features, bias=True, init_std=0.02, *, recipe, history_len, compute_algo):
        super().__init__(in_features, out_features, bias=bias, init_std=init_std)
        self._init_fp8_state(recipe, history_len, compute_algo)

    def forward(self, x):
        return _FP8LinearFunction.apply(self.layer_norm(x), self.weight, self.bias, self,
                                        self.training and torch.is_grad_enabled())


def fp8_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _FP8State)]


def keep_fp8_state_fp32(model):
    """DeepSpeed (and zero.Init) cast floating buffers to bf16; scales and amax histories
    must stay fp32, as in Transformer Engine."""
    for _, m in fp8_layers(model):
        for name in ("fp8_scale", "fp8_amax_history", "fp8_amax_pending"):
            setattr(m, name, getattr(m, name).float())


class EmulatedFP8Backend:
    name = "emulated"

    def __init__(self, recipe="delayed", amax_history_len=16, amax_compute_algo="max", device_type="cpu"):
        self.recipe, self.device_type = recipe, device_type
        kw = dict(recipe=recipe, history_len=amax_history_len, compute_algo=amax_compute_algo)
        self.Linear = lambda i, o, bias=True, init_std=0.02: FP8Linear(i, o, bias, init_std, **kw)
        self.LayerNormLinear = lambda i, o, bias=True, init_std=0.02: FP8LayerNormLinear(i, o, bias, init_std, **kw)
        self.model = None

    @contextlib.contextmanager
    def autocast(self, model=None):
        """Entering applies the amax recorded since the last entry (the previous micro-batch's
        forward and backward), max-reduced across data-parallel ranks in one collective;
        the FP8 GEMMs then run with activations in bf16 around them."""
        if self.recipe == "delayed" and model is not None:
            update_fp8_scales(model)
        with torch.autocast(device_type=self.device_type, dtype=torch.bfloat16):
            yield

    def checkpoint(self, fn, *args):
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)

    def telemetry(self, model):
        return fp8_telemetry(model)


@torch.no_grad()
def update_fp8_scales(model):
    layers = [m for _, m in fp8_layers(model)]
    if not layers:
        return
    pending = torch.stack([m.fp8_amax_pending for m in layers])
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(pending, op=torch.distributed.ReduceOp.MAX)
    if not bool(pending.any()):
        return  # no training step since the last update (evaluation, or the first step)
    for m, p in zip(layers, pending):
        m.update_scales(p)


@torch.no_grad()
def fp8_telemetry(model):
    """Per GEMM: the newest amax of each role and the elements saturated since the last
    call (summed over ranks). Resets the saturation counters."""
    layers = fp8_layers(model)
    if not layers:
        return {}
    sat = torch.stack([m.fp8_saturated for _, m in layers])
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(sat)
    amax = torch.stack([m.fp8_amax_history[0] for _, m in layers]).tolist()
    sat_list = sat.tolist()
    for _, m in layers:
        m.fp8_saturated.zero_()
    return {
        "fp8_amax": {n: dict(zip(ROLES, a)) for (n, _), a in zip(layers, amax)},
        "fp8_saturated": {n: dict(zip(ROLES, s)) for (n, _), s in zip(layers, sat_list)},
        "fp8_saturated_total": int(sum(map(sum, sat_list))),
    }


# ----------------------------------------------------------------------------------------
# Transformer Engine. Every Linear and LayerNorm, the final LN and the LM head included,
# runs under FP8. Imported only when chosen, so CPU machines never need it.

class TransformerEngineBackend:
    name = "te"

    def __init__(self, recipe="delayed", amax_history_len=16, amax_compute_algo="max", amax_reduction_group=None):
        import transformer_engine.pytorch as te
        from transformer_engine.common.recipe import DelayedScaling, Float8CurrentScaling, Format

        self.te = te
        if recipe == "delayed":
            self.recipe = DelayedScaling(fp8_format=Format.HYBRID, amax_history_len=amax_history_len,
                                         amax_compute_algo=amax_compute_algo, margin=0)
        else:
            self.recipe = Float8CurrentScaling(fp8_format=Format.HYBRID)
        self.amax_reduction_group = amax_reduction_group
        # TE's default init differs from GPT-2's: pass ours explicitly
        init = lambda std: (lambda w: nn.init.normal_(w, mean=0.0, std=std))
        self.Linear = lambda i, o, bias=True, init_std=0.02: te.Linear(
            i, o, bias=bias, init_method=init(init_std), params_dtype=torch.get_default_dtype())
        self.LayerNormLinear = lambda i, o, bias=True, init_std=0.02: te.LayerNormLinear(
            i, o, bias=bias, eps=1e-5, init_method=init(init_std), params_dtype=torch.get_default_dtype())

    def autocast(self, model=None):
        group = self.amax_reduction_group
        if group is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            group = torch.distributed.group.WORLD  # amax max-reduced over the data-parallel group
        if hasattr(self.te, "autocast"):  # TE >= 2.8
            return self.te.autocast(enabled=True, recipe=self.recipe, amax_reduction_group=group)
        return self.te.fp8_autocast(enabled=True, fp8_recipe=self.recipe, fp8_group=group)

    def checkpoint(self, fn, *args):
        # TE's checkpoint keeps the amax bookkeeping right across the recompute
        return self.te.checkpoint(fn, *args)

    @torch.no_grad()
    def telemetry(self, model):
        """Newest amax and scale per GEMM from TE's delayed-scaling state. After TE's update
        the newest amax sits in the last row of amax_history. TE does not count saturated
        elements; `fp8_saturating` counts GEMMs whose newest input amax exceeds everything
        else in the history, i.e. those that saturated at the last step."""
        amax, saturating = {}, 0
        for name, m in model.named_modules():
            meta = getattr(m, "fp8_meta", None)
            if not meta or "scaling_fwd" not in meta or not hasattr(meta["scaling_fwd"], "amax_history"):
                continue
            fwd, bwd = meta["scaling_fwd"].amax_history, meta["scaling_bwd"].amax_history
            amax[name] = {"input": fwd[-1, 0].item(), "weight": fwd[-1, 1].item(), "grad_output": bwd[-1, 0].item()}
            if fwd.shape[0] > 2 and fwd[-1, 0] > fwd[1:-1, 0].max():
                saturating += 1
        return {"fp8_amax": amax, "fp8_saturating": saturating} if amax else {}


def te_available():
    """(ok, reason): TE importable and a CUDA GPU with compute capability >= 8.9 present."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if torch.cuda.get_device_capability() < (8, 9):
        return False, f"GPU compute capability {torch.cuda.get_device_capability()} < (8, 9)"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything else
        return False, f"transformer_engine not importable ({type(e).__name__}: {e})"
    return True, ""


def make_backend(precision="bf16", fp8_backend="auto", fp8_recipe="delayed",
                 fp8_amax_history_len=16, fp8_amax_compute_algo="max", device_type="cpu"):
    if precision == "bf16":
        return BF16Backend(device_type)
    if precision != "fp8":
        raise ValueError(f"precision must be 'bf16' or 'fp8', got {precision!r}")
    if fp8_recipe not in ("delayed", "current"):
        raise ValueError(f"fp8_recipe must be 'delayed' or 'current', got {fp8_recipe!r}")
    if fp8_amax_compute_algo not in ("max", "most_recent"):
        raise ValueError(f"fp8_amax_compute_algo must be 'max' or 'most_recent', got {fp8_amax_compute_algo!r}")
    if fp8_backend == "auto":
        fp8_backend = "te" if te_available()[0] else "emulated"
    if fp8_backend == "te":
        ok, why = te_available()
        if not ok:
            raise RuntimeError(f"fp8_backend='te' needs Transformer Engine on a GPU with compute capability "
                               f">= 8.9: {why}. Use fp8_backend='emulated' (same numerics, any device).")
        return TransformerEngineBackend(fp8_recipe, fp8_amax_history_len, fp8_amax_compute_algo)
    if fp8_backend == "emulated":
        return EmulatedFP8Backend(fp8_recipe, fp8_amax_history_len, fp8_amax_compute_algo, device_type)
    raise ValueError(f"fp8_backend must be 'auto', 'te' or 'emulated', got {fp8_backend!r}")
