"""
Precision backends: the one place that knows how a GEMM is computed.

model.py asks a backend for two layer types and one context manager:

    backend.LayerNormLinear(in, out, bias, init_std)   LayerNorm fused into the GEMM's input
    backend.Linear(in, out, bias, init_std)
    with backend.autocast(): ...                        wraps one micro-batch forward

and train.py additionally calls backend.checkpoint(fn, x) for activation checkpointing
and backend.telemetry(model) for the FP8 amax / saturation signals.

Four backends, chosen by make_backend():
  bf16      torch layers under torch.autocast(bfloat16); CPU and CUDA
  emulated  the numerics of Transformer Engine's per-tensor FP8 (E4M3 forward, E5M2
            gradients, delayed or current scaling) on any device, CPU included
  torch     the emulated backend's layers and scaling state with real FP8 GEMMs
            (torch._scaled_mm; any FP8 GPU, and CPU for the tests)
  te        NVIDIA Transformer Engine, imported lazily (GPU with compute capability >= 8.9)

All four use Transformer Engine's parameter names (layer_norm_weight, layer_norm_bias,
weight, bias), so a checkpoint trained with one loads into the others.

On CPUs without native bf16 GEMMs (AVX2 only: no AVX-512, no AMX) torch's bf16 matrix
products are 4-40x slower than fp32 ones. There the bf16 and emulated FP8 backends compute
every GEMM with bf16 semantics as an fp32 GEMM on the bf16 (or FP8) operand values, rounded
once to bf16: the same arithmetic up to accumulation order (see choose_cpu_gemm).
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
# Where a bf16 GEMM runs on a CPU. A bf16 GEMM with fp32 accumulation is an fp32 GEMM on
# bf16-rounded operands whose output is rounded once to bf16 (up to accumulation order),
# and every bf16, E4M3 and E5M2 value is exact in fp32. So on a CPU whose bf16 GEMMs fall
# back to slow kernels, 'fp32' computes them that way: the run's numerics stay bf16 or FP8.

CPU_GEMMS = ("auto", "native", "fp32")


def choose_cpu_gemm(cpu_gemm="auto", device_type="cpu", native_bf16=None):
    """(path, why): 'native' (torch's bf16 kernels) or 'fp32' (fp32 GEMMs on the bf16/FP8
    values, one rounding to bf16) for GEMMs with bf16 semantics. 'auto' asks oneDNN whether
    this CPU has native bf16 GEMMs (`native_bf16` overrides the answer, for tests). Only
    CPUs have a choice: a GPU always runs its own bf16 / FP8 GEMMs."""
    if cpu_gemm not in CPU_GEMMS:
        raise ValueError(f"cpu_gemm must be one of {', '.join(CPU_GEMMS)}, got {cpu_gemm!r}")
    if device_type != "cpu":
        return "native", f"GEMMs run on the {device_type} device (cpu_gemm applies to CPUs only)"
    if cpu_gemm != "auto":
        return cpu_gemm, f"cpu_gemm={cpu_gemm}"
    if native_bf16 is None:
        native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if native_bf16:
        return "native", "this CPU has native bf16 GEMMs"
    return "fp32", "this CPU has no native bf16 GEMMs (oneDNN says so): bf16 GEMMs as fp32 GEMMs on bf16 values"


def gemm_dtype(x):
    """The dtype a GEMM on x runs in: the autocast dtype inside autocast, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _BF16LinearInFP32(torch.autograd.Function):
    """y = x @ w.T + b on bf16 x, w, b as bf16 autocast computes it (fp32 accumulation, one
    rounding to bf16 per output), with fp32 GEMMs: forward, dgrad and wgrad each take their
    bf16 operands' exact values in fp32 and round their output once to bf16. Saves x and w
    in bf16, as the native path does."""

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(torch.bfloat16)

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1]).float()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight.float()).to(torch.bfloat16).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = (g.t() @ x.reshape(-1, x.shape[-1]).float()).to(torch.bfloat16)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(torch.bfloat16)
        return grad_x, grad_w, grad_b


def linear(x, weight, bias, cpu_gemm="native"):
    """F.linear, with bf16 GEMMs on a CPU computed in fp32 when cpu_gemm is 'fp32'. The
    operands are first rounded to bf16 as autocast rounds them; the casts are autograd ops,
    so fp32 master weights get fp32 gradients, as under autocast."""
    if cpu_gemm != "fp32" or x.device.type != "cpu" or gemm_dtype(x) != torch.bfloat16:
        return F.linear(x, weight, bias)
    bf16 = lambda t: None if t is None else t.to(torch.bfloat16)  # noqa: E731
    return _BF16LinearInFP32.apply(bf16(x), bf16(weight), bf16(bias))


def matmul(a, b, cpu_gemm="native"):
    """a @ b (batched), with a bf16 product on a CPU computed as an fp32 product of the bf16
    values rounded once to bf16 when cpu_gemm is 'fp32' (attention's explicit path)."""
    if cpu_gemm != "fp32" or a.device.type != "cpu" or gemm_dtype(a) != torch.bfloat16:
        return a @ b
    with torch.autocast("cpu", enabled=False):
        return (a.to(torch.bfloat16).float() @ b.to(torch.bfloat16).float()).to(torch.bfloat16)


# ----------------------------------------------------------------------------------------
# bf16: plain torch layers. They initialise themselves in __init__ (not in a later
# model.apply) because under DeepSpeed's zero.Init a module's parameters are partitioned
# as soon as its own __init__ returns.

class Linear(nn.Linear):
    def __init__(self, in_features, out_features, bias=True, init_std=0.02, cpu_gemm="native"):
        super().__init__(in_features, out_features, bias=bias)
        nn.init.normal_(self.weight, mean=0.0, std=init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.cpu_gemm = cpu_gemm

    def forward(self, x):
        return linear(x, self.weight, self.bias, self.cpu_gemm)


class LayerNormLinear(nn.Module):
    """LayerNorm then Linear in one module, as te.LayerNormLinear (same parameter names).
    The LayerNorm always has a bias, as in TE; `bias` toggles the Linear's bias."""

    def __init__(self, in_features, out_features, bias=True, init_std=0.02, eps=1e-5, cpu_gemm="native"):
        super().__init__()
        self.in_features, self.out_features, self.eps, self.cpu_gemm = in_features, out_features, eps, cpu_gemm
        self.layer_norm_weight = nn.Parameter(torch.ones(in_features))
        self.layer_norm_bias = nn.Parameter(torch.zeros(in_features))
        self.weight = nn.Parameter(torch.empty(out_features, in_features).normal_(0.0, init_std))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def layer_norm(self, x):
        return F.layer_norm(x, (self.in_features,), self.layer_norm_weight, self.layer_norm_bias, self.eps)

    def forward(self, x):
        return linear(self.layer_norm(x), self.weight, self.bias, self.cpu_gemm)


class BF16Backend:
    name = "bf16"

    def __init__(self, device_type="cpu", cpu_gemm="auto"):
        self.device_type = device_type
        self.cpu_gemm, self.cpu_gemm_why = choose_cpu_gemm(cpu_gemm, device_type)
        kw = dict(cpu_gemm=self.cpu_gemm)
        self.Linear = lambda i, o, bias=True, init_std=0.02: Linear(i, o, bias, init_std, **kw)
        self.LayerNormLinear = lambda i, o, bias=True, init_std=0.02: LayerNormLinear(i, o, bias, init_std, **kw)

    def matmul(self, a, b):
        return matmul(a, b, self.cpu_gemm)

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
# saturate(x * scale) -> float8. Every E4M3 and E5M2 value is exact in bf16, so the GEMM
# runs in bf16 on the raw FP8 values (oneDNN accumulates bf16 products in fp32) and the two
# dequantization factors 1/scale are applied once, to the fp32 accumulator, before the one
# rounding to the output dtype: the same arithmetic as an FP8 tensor-core GEMM with fp32
# accumulation. fp32 outputs (no autocast) run the GEMM in fp32 instead.
#
# Delayed scaling (TE's DelayedScaling): the scale used at step t is fp8_max / amax, where
# amax is taken over the last `amax_history_len` amaxes recorded *before* t. The amax of
# step t is pushed only after it has been used, so a new outlier larger than anything in
# the history saturates at step t. That zero tolerance is what the TWEO experiment tests.
# Current scaling (TE's Float8CurrentScaling): the scale comes from the tensor itself.

def fp8_max(dtype):
    return torch.finfo(dtype).max


def amax_of(x):
    """max |x| in fp32, skipping NaN elements as TE's amax kernel does (fmaxf ignores a NaN
    operand), so one NaN cannot freeze a scale. One vectorised pass (aminmax) in the common case."""
    x = x.detach()
    if x.is_cuda:  # extra passes are cheap on a GPU, a host sync is not
        return torch.nan_to_num(x.abs(), nan=0.0, posinf=float("inf")).amax().float()
    lo, hi = torch.aminmax(x)
    amax = torch.maximum(hi, -lo).float()
    if torch.isnan(amax):
        amax = torch.where(torch.isnan(x), 0.0, x.abs()).amax().float()
    return amax


def quantize(x, scale, dtype, amax=None):
    """Cast x*scale to `dtype`, saturating. Returns (fp8 tensor, number of saturated elements).
    On CPU the saturation count and the clamp are only computed when amax*scale can exceed
    the format's maximum, which keeps the common case to two passes over x."""
    limit = fp8_max(dtype)
    amax = amax_of(x) if amax is None else amax
    y = x.to(torch.float32, copy=True).mul_(scale)
    if y.is_cuda or bool(amax * scale > limit):  # on a GPU always: no host sync
        saturated = torch.count_nonzero(y.abs() > limit)
        y.clamp_(-limit, limit)
    else:
        saturated = torch.zeros((), dtype=torch.long, device=x.device)
    return y.to(dtype), saturated


def dequantize(q, scale):
    return q.to(torch.float32).div_(scale)


class EmulatedGemm:
    """a @ b on FP8 operands with per-tensor dequantization factors (1/scale): bf16 GEMM on
    the exact FP8 values, fp32 accumulation, factors and bias applied before one rounding.
    widen() gives an operand the GEMM's dtype once, where it is used twice (CPU float8
    conversions are slow). `bf16_gemm_dtype` is the dtype a GEMM with bf16 output runs in."""
    bf16_gemm_dtype = torch.bfloat16

    @classmethod
    def widen(cls, q, out_dtype):
        return q.to(cls.bf16_gemm_dtype if out_dtype == torch.bfloat16 else torch.float32)

    @staticmethod
    def operands(a, b):
        return a, b  # any layout

    @classmethod
    def mm(cls, a, b, a_inv, b_inv, out_dtype, bias=None):
        a, b = cls.widen(a, out_dtype), cls.widen(b, out_dtype)
        alpha = (a_inv * b_inv).item()
        if bias is None:
            return torch.addmm(torch.zeros((), dtype=a.dtype, device=a.device), a, b, beta=0, alpha=alpha).to(out_dtype)
        # the bias in the output's precision (bf16 under autocast), added before the one rounding
        return torch.addmm(bias.to(out_dtype).to(a.dtype), a, b, alpha=alpha).to(out_dtype)


class EmulatedGemmInFP32(EmulatedGemm):
    """The emulated GEMM for CPUs without native bf16 GEMMs (cpu_gemm='fp32'): the same exact
    FP8 values and fp32 accumulation, in an fp32 GEMM; one rounding to the output dtype."""
    bf16_gemm_dtype = torch.float32


def _row_major(t):
    return t if t.stride(-1) == 1 and t.stride(0) > 1 else t.contiguous()


def _col_major(t):
    return t if t.stride(0) == 1 and t.stride(1) > 1 else t.t().contiguous().t()


def scaled_mm_error(a, b, a_inv, b_inv):
    """Why the CUDA kernel behind torch._scaled_mm (tensor-wise scaling) would refuse these
    operands, or None. The rules of PyTorch's CUDA path (ScaledBlas.cpp, and the meta
    function torch._meta_registrations._check_scaled_mm_sizes): a [M, K] row-major, b [K, N]
    column-major, K and N multiples of 16, both float8 but not both E5M2, and fp32
    single-element scales. The CPU kernel checks none of this, so we do, on every device."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        return f"operands of shapes {tuple(a.shape)} and {tuple(b.shape)} are not a 2-D matrix product"
    if a.dtype not in (E4M3, E5M2) or b.dtype not in (E4M3, E5M2):
        return f"operands must be float8, got {a.dtype} and {b.dtype}"
    if a.dtype == E5M2 and b.dtype == E5M2:
        return "E5M2 x E5M2 is not supported by cuBLASLt"
    if not (a.stride(1) == 1 and a.stride(0) > a.stride(1)):
        return f"first operand must be row-major, got strides {a.stride()}"
    if not (b.stride(0) == 1 and b.stride(1) > 1):
        return f"second operand must be column-major, got strides {b.stride()}"
    if a.shape[1] % 16 or b.shape[1] % 16:
        return f"K and N must be multiples of 16, got {tuple(a.shape)} @ {tuple(b.shape)}"
    for s in (a_inv, b_inv):
        if s.numel() != 1 or s.dtype != torch.float32:
            return f"scales must be single-element fp32 tensors, got {s.dtype} of {s.numel()} elements"
    return None


class ScaledMMGemm:
    """The same product through torch._scaled_mm: real FP8 GEMMs (cuBLASLt on a GPU), bf16
    output, the bias fused; operands laid out as the CUDA kernel requires."""

    @staticmethod
    def widen(q, out_dtype):
        return q  # the GEMM takes float8

    @staticmethod
    def operands(a, b):
        return _row_major(a), _col_major(b)

    @staticmethod
    def mm(a, b, a_inv, b_inv, out_dtype, bias=None):
        error = scaled_mm_error(a, b, a_inv, b_inv)
        if error:
            raise ValueError(f"FP8 GEMM {tuple(a.shape)} @ {tuple(b.shape)}: {error}")
        out = torch._scaled_mm(a, b, scale_a=a_inv, scale_b=b_inv, out_dtype=torch.bfloat16,
                               bias=None if bias is None else bias.to(torch.bfloat16))
        return out.to(out_dtype)


class ScaledMMGemmInFP32(ScaledMMGemm):
    """torch._scaled_mm's product without its CPU kernel, which on some CPUs is a reference
    loop (measured on a Xeon with AMX, torch 2.13: 72 s for 512x64 @ 64x50304, where the same
    product in bf16 takes 0.03 s): an fp32 GEMM on the float8 operands' exact values, factors
    and bias applied before one rounding to bf16, as the kernel does (up to accumulation
    order). The operands are checked, laid out and saved as for the kernel."""

    @staticmethod
    def mm(a, b, a_inv, b_inv, out_dtype, bias=None):
        error = scaled_mm_error(a, b, a_inv, b_inv)
        if error:
            raise ValueError(f"FP8 GEMM {tuple(a.shape)} @ {tuple(b.shape)}: {error}")
        return EmulatedGemmInFP32.mm(a, b, a_inv, b_inv, torch.bfloat16, bias).to(out_dtype)


class _FP8LinearFunction(torch.autograd.Function):
    """y = x @ w.T + b with x, w in E4M3 and dy in E5M2, fp32 accumulation. Saves the
    quantized x and w for backward as the GEMM takes them: float8 (one byte per element,
    as Transformer Engine) for torch._scaled_mm, FP8-valued bf16 for the emulation.
    The GEMM comes from the layer (EmulatedGemm or ScaledMMGemm)."""

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    @torch.autocast("cuda", enabled=False)
    def forward(ctx, x, weight, bias, layer, training_step, out_dtype):
        ax, aw = amax_of(x), amax_of(weight)
        sx, sw = layer.scale_for(0, ax), layer.scale_for(1, aw)
        xq, sat_x = quantize(x.reshape(-1, x.shape[-1]), sx, E4M3, ax)
        wq, sat_w = quantize(weight, sw, E4M3, aw)
        if training_step:  # evaluation leaves the scaling state as it is
            layer.record(0, ax, sat_x)
            layer.record(1, aw, sat_w)
        gemm = layer.fp8_gemm
        xq, wq = gemm.widen(xq, out_dtype), gemm.widen(wq, out_dtype)  # each serves two GEMMs
        out = gemm.mm(*gemm.operands(xq, wq.t()), sx.reciprocal(), sw.reciprocal(), out_dtype, bias)
        ctx.save_for_backward(xq, wq, sx, sw)
        ctx.layer, ctx.has_bias = layer, bias is not None
        ctx.x_dtype, ctx.w_dtype, ctx.out_dtype = x.dtype, weight.dtype, out_dtype
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        xq, wq, sx, sw = ctx.saved_tensors
        layer, gemm = ctx.layer, ctx.layer.fp8_gemm
        g = grad_out.reshape(-1, grad_out.shape[-1])
        ag = amax_of(g)
        sg = layer.scale_for(2, ag)
        gq, sat_g = quantize(g, sg, E5M2, ag)
        layer.record(2, ag, sat_g)
        gq = gemm.widen(gq, ctx.out_dtype)  # the gradient serves dgrad and wgrad
        g_inv, x_inv, w_inv = sg.reciprocal(), sx.reciprocal(), sw.reciprocal()
        grad_x = grad_w = grad_b = None
        # both GEMMs produce the activation dtype, as the forward one (TE under autocast)
        if ctx.needs_input_grad[0]:  # dgrad: E5M2 gradient x E4M3 weight
            grad_x = gemm.mm(*gemm.operands(gq, wq), g_inv, w_inv, ctx.out_dtype).to(ctx.x_dtype)
            grad_x = grad_x.reshape(*grad_out.shape[:-1], wq.shape[-1])
        if ctx.needs_input_grad[1]:  # wgrad: E5M2 gradient x E4M3 input
            grad_w = gemm.mm(*gemm.operands(gq.t(), xq), g_inv, x_inv, ctx.out_dtype).to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            # from the high-precision gradient, as in TE's fused cast+dbias
            grad_b = g.sum(0, dtype=torch.float32)
        return grad_x, grad_w, grad_b, None, None, None


def output_dtype(x):
    """The dtype an FP8 layer returns: the autocast dtype inside autocast (TE's rule; CUDA
    autocast runs layer_norm in fp32, which must not leak into the residual stream)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _FP8State:
    """Per-GEMM scaling state, all of it in buffers so that it is checkpointed and moves
    with the module: scale[3], amax_history[H, 3] (row 0 newest), the amax seen since the
    last update (amax_pending[3]) and saturation counters since the last telemetry read."""

    def _init_fp8_state(self, recipe, history_len, compute_algo, gemm):
        self.recipe, self.compute_algo, self.fp8_gemm = recipe, compute_algo, gemm
        self.register_buffer("fp8_scale", torch.ones(3))
        self.register_buffer("fp8_amax_history", torch.zeros(history_len, 3))
        self.register_buffer("fp8_amax_pending", torch.zeros(3))
        self.register_buffer("fp8_saturated", torch.zeros(3, dtype=torch.long))
        # TE's comparable count (telemetry only, not checkpointed): whether a role clipped in the
        # running micro-batch, and how many (micro-batch, role) casts clipped on any rank
        self.register_buffer("fp8_saturated_flags", torch.zeros(3, dtype=torch.long), persistent=False)
        self.register_buffer("fp8_saturated_tensors", torch.zeros(3, dtype=torch.long), persistent=False)

    def scale_for(self, role, amax):
        if self.recipe == "current":
            # a true fp32 division, as TE's __fdiv_rn (a Python number / tensor multiplies by the
            # reciprocal, one ulp off); an overflow becomes fp32's maximum, TE's value_for_inf
            scale = (amax.new_full((), fp8_max(ROLE_DTYPES[role])) / amax).clamp(max=torch.finfo(torch.float32).max)
            return torch.where((amax > 0) & torch.isfinite(amax), scale, torch.ones_like(scale))
        return self.fp8_scale[role].clone()

    def record(self, role, amax, saturated):
        # a running max, so a second call (activation-checkpoint recompute) changes nothing
        self.fp8_amax_pending[role] = torch.maximum(self.fp8_amax_pending[role], amax)
        self.fp8_saturated[role] += saturated
        self.fp8_saturated_flags[role] |= saturated > 0

    @torch.no_grad()
    def update_scales(self, reduced_pending):
        """Push the amax of the step just finished and compute the scales for the next one,
        as TE's fused update after the amax reduction (delayed_scaling.cu, kernel_bulk): a
        role whose newest amax is 0 (no data this step) keeps its history and its scale;
        a non-finite or zero window amax keeps the scale; a scale that overflows fp32
        becomes fp32's maximum."""
        fresh = reduced_pending != 0
        rolled = torch.roll(self.fp8_amax_history, 1, 0)
        rolled[0] = reduced_pending
        self.fp8_amax_history.copy_(torch.where(fresh, rolled, self.fp8_amax_history))
        amax = self.fp8_amax_history.amax(0) if self.compute_algo == "max" else self.fp8_amax_history[0]
        amax = torch.where(fresh, amax, torch.zeros_like(amax))
        maxes = torch.tensor([fp8_max(d) for d in ROLE_DTYPES], device=amax.device)
        new = maxes / amax
        keep = ~((amax > 0) & torch.isfinite(amax))  # TE keeps the previous scale then
        new = torch.where(keep, self.fp8_scale, new)
        new = torch.where(torch.isinf(new), torch.full_like(new, torch.finfo(torch.float32).max), new)
        self.fp8_scale.copy_(new)
        self.fp8_amax_pending.zero_()


class FP8Linear(_FP8State, Linear):
    def __init__(self, in_features, out_features, bias=True, init_std=0.02, *, recipe, history_len, compute_algo,
                 gemm=EmulatedGemm):
        super().__init__(in_features, out_features, bias=bias, init_std=init_std)
        self._init_fp8_state(recipe, history_len, compute_algo, gemm)

    def forward(self, x):
        return _FP8LinearFunction.apply(x, self.weight, self.bias, self, self.training and torch.is_grad_enabled(),
                                        output_dtype(x))


class FP8LayerNormLinear(_FP8State, LayerNormLinear):
    """LayerNorm in high precision, its output quantized as the GEMM input (TE's LayerNormLinear)."""

    def __init__(self, in_features, out_features, bias=True, init_std=0.02, *, recipe, history_len, compute_algo,
                 gemm=EmulatedGemm):
        super().__init__(in_features, out_features, bias=bias, init_std=init_std)
        self._init_fp8_state(recipe, history_len, compute_algo, gemm)

    def forward(self, x):
        return _FP8LinearFunction.apply(self.layer_norm(x), self.weight, self.bias, self,
                                        self.training and torch.is_grad_enabled(), output_dtype(x))


def fp8_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _FP8State)]


def keep_fp8_state_fp32(model):
    """DeepSpeed (and zero.Init) cast floating buffers to bf16; scales and amax histories
    must stay fp32, as in Transformer Engine."""
    for _, m in fp8_layers(model):
        for name in ("fp8_scale", "fp8_amax_history", "fp8_amax_pending"):
            setattr(m, name, getattr(m, name).float())


class EmulatedFP8Backend:
    """Per-tensor FP8 layers with TE's scaling semantics. The GEMM (`fp8_gemm`) is the only
    thing the 'emulated' and 'torch' backends do differently."""
    name = "emulated"

    def __init__(self, recipe="delayed", amax_history_len=16, amax_compute_algo="max", device_type="cpu",
                 cpu_gemm="auto"):
        self.recipe, self.device_type = recipe, device_type
        self.cpu_gemm, self.cpu_gemm_why = choose_cpu_gemm(cpu_gemm, device_type)
        gemm = self.fp8_gemm(cpu_gemm)
        if gemm is ScaledMMGemmInFP32 and cpu_gemm == "auto":  # the run's first lines say where its FP8 GEMMs run
            self.cpu_gemm_why += "; FP8 GEMMs as fp32 GEMMs on their float8 values (--cpu_gemm=native calls torch._scaled_mm)"
        kw = dict(recipe=recipe, history_len=amax_history_len, compute_algo=amax_compute_algo, gemm=gemm)
        self.Linear = lambda i, o, bias=True, init_std=0.02: FP8Linear(i, o, bias, init_std, **kw)
        self.LayerNormLinear = lambda i, o, bias=True, init_std=0.02: FP8LayerNormLinear(i, o, bias, init_std, **kw)

    def fp8_gemm(self, cpu_gemm):
        return EmulatedGemmInFP32 if self.cpu_gemm == "fp32" else EmulatedGemm

    @contextlib.contextmanager
    def autocast(self, model=None):
        """Entering applies the amax recorded since the last entry (the previous micro-batch's
        forward and backward), max-reduced across data-parallel ranks in one collective;
        the FP8 GEMMs then run with activations in bf16 around them."""
        if model is not None:
            update_fp8_scales(model)
        with torch.autocast(device_type=self.device_type, dtype=torch.bfloat16):
            yield

    def matmul(self, a, b):
        return matmul(a, b, self.cpu_gemm)

    def checkpoint(self, fn, *args):
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)

    def telemetry(self, model):
        return fp8_telemetry(model)


class TorchFP8Backend(EmulatedFP8Backend):
    """The emulated backend's layers and scaling state, with real FP8 GEMMs (torch._scaled_mm):
    fprop E4M3 x E4M3, dgrad and wgrad E5M2 x E4M3, bf16 output. On a CPU, where no kernel
    is faster than an fp32 GEMM on the same values and some are far slower, only
    cpu_gemm='native' calls torch._scaled_mm; otherwise its product is computed in fp32
    (ScaledMMGemmInFP32), on the same float8 operands."""
    name = "torch"

    def fp8_gemm(self, cpu_gemm):
        return ScaledMMGemm if self.device_type != "cpu" or cpu_gemm == "native" else ScaledMMGemmInFP32


def _distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


@torch.no_grad()
def update_fp8_scales(model):
    """Close the micro-batch just run: max-reduce its amaxes and saturation flags over the
    data-parallel ranks in one collective, count the casts that clipped on any rank, and
    (delayed scaling) push the amaxes and compute the next scales. Current scaling keeps no
    history: its pending amax is only telemetry."""
    layers = [m for _, m in fp8_layers(model)]
    if not layers:
        return
    pending = torch.stack([torch.cat([m.fp8_amax_pending, m.fp8_saturated_flags.float()]) for m in layers])
    if _distributed():
        torch.distributed.all_reduce(pending, op=torch.distributed.ReduceOp.MAX)
    for m, p in zip(layers, pending):
        m.fp8_saturated_tensors += p[3:].long()
        m.fp8_saturated_flags.zero_()
        if m.recipe == "delayed":
            m.update_scales(p[:3])
        else:
            m.fp8_amax_pending.zero_()


@torch.no_grad()
def fp8_telemetry(model):
    """Per GEMM: the amax of each role in the micro-batch just run (max over ranks) and the
    elements saturated since the last call (summed over ranks); `fp8_saturated_tensors`, as
    TE's SaturationCounter: the (GEMM, role, micro-batch) casts since the last call that clipped
    on any rank, i.e. whose amax (max over ranks) times its scale exceeded the format's maximum.
    Resets the saturation counters."""
    layers = fp8_layers(model)
    if not layers:
        return {}
    sat = torch.stack([m.fp8_saturated for _, m in layers])
    pending = torch.stack([torch.cat([m.fp8_amax_pending, m.fp8_saturated_flags.float()]) for _, m in layers])
    if _distributed():
        torch.distributed.all_reduce(sat)
        torch.distributed.all_reduce(pending, op=torch.distributed.ReduceOp.MAX)
    tensors = torch.stack([m.fp8_saturated_tensors for _, m in layers]).sum() + pending[:, 3:].sum().long()
    sat_list, amax = sat.tolist(), pending[:, :3].tolist()
    for _, m in layers:
        m.fp8_saturated.zero_()
        m.fp8_saturated_flags.zero_()  # counted now (the next update must not count them again)
        m.fp8_saturated_tensors.zero_()
    return {
        "fp8_amax": {n: dict(zip(ROLES, a)) for (n, _), a in zip(layers, amax)},
        "fp8_saturated": {n: dict(zip(ROLES, s)) for (n, _), s in zip(layers, sat_list)},
        "fp8_saturated_total": int(sum(map(sum, sat_list))),
        "fp8_saturated_tensors": int(tensors),
    }


# ----------------------------------------------------------------------------------------
# Transformer Engine. Every Linear and LayerNorm, the final LN and the LM head included,
# runs under FP8. Imported only when chosen, so CPU machines never need it.
#
# TE keeps a module's delayed-scaling state in fp8_meta["scaling_fwd"] (input, weight,
# output) and fp8_meta["scaling_bwd"] (grad_output, grad_input), each with .scale[n] and
# .amax_history[H, n]. Its fused update (delayed_scaling.cu) rolls the history so that the
# newest amax ends in the LAST row, forward at autocast exit, backward at the end of
# backward. Its own checkpoint format pickles the recipe into _extra_state, which TE >= 2.18
# refuses to load unless NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1 (and DeepSpeed loads module
# states strictly, _extra_state included): our TE layers save an empty _extra_state and the
# scales and histories travel as plain tensors (te_fp8_state / load_te_fp8_state).

TE_ROLE_SLOTS = (("scaling_fwd", 0), ("scaling_fwd", 1), ("scaling_bwd", 0))  # ROLES in TE's meta
ROLE_MAXES = tuple(fp8_max(d) for d in ROLE_DTYPES)


def te_fp8_modules(model):
    """(name, module) of every module holding TE delayed-scaling state."""
    out = []
    for name, m in model.named_modules():
        meta = getattr(m, "fp8_meta", None)
        if isinstance(meta, dict) and all(hasattr(meta.get(k), "amax_history") for k in ("scaling_fwd", "scaling_bwd")):
            out.append((name, m))
    return out


@torch.no_grad()
def te_fp8_state(model):
    """The TE scaling state of a model as plain CPU tensors, {'NAME.scaling_fwd.scale': ...}."""
    state = {}
    for name, m in te_fp8_modules(model):
        for key in ("scaling_fwd", "scaling_bwd"):
            state[f"{name}.{key}.scale"] = m.fp8_meta[key].scale.detach().float().cpu().clone()
            state[f"{name}.{key}.amax_history"] = m.fp8_meta[key].amax_history.detach().float().cpu().clone()
    return state


@torch.no_grad()
def load_te_fp8_state(model, state, recipe):
    """Put te_fp8_state() back into TE modules, initialising their FP8 metadata for `recipe`
    first as TE's own set_extra_state does (a later first forward keeps tensors that are
    already initialised for a delayed-scaling recipe). Returns the number of modules set."""
    n = 0
    for name, m in model.named_modules():
        if not hasattr(m, "init_fp8_meta_tensors") or f"{name}.scaling_fwd.scale" not in state:
            continue
        m.fp8_meta["recipe"] = recipe
        m.init_fp8_meta_tensors(recipe)
        for key in ("scaling_fwd", "scaling_bwd"):
            m.fp8_meta[key].scale.copy_(state[f"{name}.{key}.scale"])
            m.fp8_meta[key].amax_history.copy_(state[f"{name}.{key}.amax_history"])
        n += 1
    return n


class SaturationCounter:
    """TE counts no saturated elements; this counts (GEMM, role, micro-batch) triples whose
    newest amax times the scale that micro-batch used exceeds the format's maximum, i.e.
    the tensors that were clipped. step() runs before every training micro-batch: it scores
    the previous micro-batch against the scales snapshotted before it, then snapshots the
    current scales. read() scores the last micro-batch and returns the count since the last read."""

    def __init__(self):
        self.scales, self.count = None, 0

    @staticmethod
    def _state(model):
        metas = [m.fp8_meta for _, m in te_fp8_modules(model)]
        scale = torch.stack([torch.stack([meta[k].scale[i] for k, i in TE_ROLE_SLOTS]) for meta in metas])
        amax = torch.stack([torch.stack([meta[k].amax_history[-1, i] for k, i in TE_ROLE_SLOTS]) for meta in metas])
        return scale.float(), amax.float()

    @torch.no_grad()
    def _score(self, model):
        if self.scales is not None:
            _, amax = self._state(model)
            maxes = torch.tensor(ROLE_MAXES, device=amax.device)
            self.count += int((amax * self.scales > maxes).sum())
            self.scales = None

    @torch.no_grad()
    def step(self, model):
        if not te_fp8_modules(model):
            return  # before the first FP8 forward TE has not allocated its state
        self._score(model)
        self.scales = self._state(model)[0].clone()

    def read(self, model):
        if te_fp8_modules(model):
            self._score(model)
        count, self.count = self.count, 0
        return count


class TransformerEngineBackend:
    name = "te"
    cpu_gemm, cpu_gemm_why = "native", "Transformer Engine runs on the GPU"

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
        self.saturation = SaturationCounter()
        # TE's default init differs from GPT-2's: pass ours explicitly
        init = lambda std: (lambda w: nn.init.normal_(w, mean=0.0, std=std))
        Linear, LayerNormLinear = _without_pickled_extra_state(te.Linear), _without_pickled_extra_state(te.LayerNormLinear)
        self.Linear = lambda i, o, bias=True, init_std=0.02: Linear(
            i, o, bias=bias, init_method=init(init_std), params_dtype=torch.get_default_dtype())
        self.LayerNormLinear = lambda i, o, bias=True, init_std=0.02: LayerNormLinear(
            i, o, bias=bias, eps=1e-5, init_method=init(init_std), params_dtype=torch.get_default_dtype())

    def autocast(self, model=None):
        if model is not None and torch.is_grad_enabled():  # a training micro-batch
            self.saturation.step(model)
        group = self.amax_reduction_group
        if group is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            group = torch.distributed.group.WORLD  # amax max-reduced over the data-parallel group
        if hasattr(self.te, "autocast"):  # TE >= 2.9
            return self.te.autocast(enabled=True, recipe=self.recipe, amax_reduction_group=group)
        return self.te.fp8_autocast(enabled=True, fp8_recipe=self.recipe, fp8_group=group)

    def matmul(self, a, b):
        return a @ b

    def checkpoint(self, fn, *args):
        # TE's checkpoint keeps the amax bookkeeping right across the recompute
        return self.te.checkpoint(fn, *args)

    @torch.no_grad()
    def telemetry(self, model):
        """Newest amax per GEMM and role (TE's last history row, the micro-batch just run),
        and `fp8_saturated_tensors`: the SaturationCounter's count since the last call (the
        emulated backend's key of the same name counts the same thing)."""
        modules = te_fp8_modules(model)
        if not modules:
            return {}
        amax = {name: {role: m.fp8_meta[k].amax_history[-1, i].item() for role, (k, i) in zip(ROLES, TE_ROLE_SLOTS)}
                for name, m in modules}
        return {"fp8_amax": amax, "fp8_saturated_tensors": self.saturation.read(model)}


def _without_pickled_extra_state(te_module_class):
    """A TE module class whose _extra_state is empty on save and ignored on load (the FP8
    state is restored from te_fp8_state's plain tensors instead), so that neither DeepSpeed's
    strict load nor TE >= 2.18's pickle check ever sees TE's pickled recipe."""
    return type(te_module_class.__name__, (te_module_class,), {
        "get_extra_state": lambda self: torch.empty(0, dtype=torch.uint8),
        "set_extra_state": lambda self, state: None,
    })


def te_available():
    """(ok, reason): Transformer Engine importable and able to run FP8 here by its own check
    (te.is_fp8_available from TE 2.9, transformer_engine.pytorch.fp8.check_fp8_support
    before): compute capability >= 8.9, and on Ada (8.9) also CUDA and cuBLASLt >= 12.1(.3)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        import transformer_engine.pytorch as te
        if hasattr(te, "is_fp8_available"):
            return te.is_fp8_available(return_reason=True)
        from transformer_engine.pytorch.fp8 import check_fp8_support
        return check_fp8_support()
    except Exception as e:  # ImportError, or a broken install raising anything else
        return False, f"transformer_engine not usable ({type(e).__name__}: {e})"


FP8_BACKENDS = ("auto", "te", "torch", "emulated")


def choose_fp8_backend(fp8_backend="auto", capability=None, te_check=te_available):
    """(backend, note) for fp8_backend='auto': on a CUDA GPU with FP8 tensor cores (compute
    capability >= 8.9) Transformer Engine if its own check passes, else torch._scaled_mm,
    with a note saying why TE was not used; anywhere else the emulation. Other names are
    returned as they are. `capability` is the GPU's (None: no CUDA GPU)."""
    if fp8_backend != "auto":
        return fp8_backend, ""
    if capability is None or tuple(capability) < (8, 9):
        return "emulated", ""
    ok, why = te_check()
    if ok:
        return "te", ""
    return "torch", f"FP8 GEMMs through torch._scaled_mm, not Transformer Engine: {why}"


def make_backend(precision="bf16", fp8_backend="auto", fp8_recipe="delayed",
                 fp8_amax_history_len=16, fp8_amax_compute_algo="max", device_type="cpu", cpu_gemm="auto"):
    """The backend for a precision. FP8 backends carry a `note` (one line, empty when there is
    nothing to say) on why fp8_backend='auto' chose what it chose. Every backend says where
    its bf16 GEMMs run (`cpu_gemm`: 'native' or 'fp32') and why (`cpu_gemm_why`)."""
    if precision == "bf16":
        return BF16Backend(device_type, cpu_gemm)
    if precision != "fp8":
        raise ValueError(f"precision must be 'bf16' or 'fp8', got {precision!r}")
    if fp8_recipe not in ("delayed", "current"):
        raise ValueError(f"fp8_recipe must be 'delayed' or 'current', got {fp8_recipe!r}")
    if fp8_amax_compute_algo not in ("max", "most_recent"):
        raise ValueError(f"fp8_amax_compute_algo must be 'max' or 'most_recent', got {fp8_amax_compute_algo!r}")
    if fp8_backend not in FP8_BACKENDS:
        raise ValueError(f"fp8_backend must be one of {', '.join(FP8_BACKENDS)}, got {fp8_backend!r}")
    capability = torch.cuda.get_device_capability() if device_type == "cuda" and torch.cuda.is_available() else None
    fp8_backend, note = choose_fp8_backend(fp8_backend, capability)
    if fp8_backend == "te":
        ok, why = te_available()
        if not ok:
            raise RuntimeError(f"fp8_backend='te' needs Transformer Engine on an FP8 GPU: {why}. "
                               f"Use fp8_backend='torch' (FP8 GEMMs through PyTorch) or 'emulated' (any device).")
        backend = TransformerEngineBackend(fp8_recipe, fp8_amax_history_len, fp8_amax_compute_algo)
    else:
        cls = TorchFP8Backend if fp8_backend == "torch" else EmulatedFP8Backend
        backend = cls(fp8_recipe, fp8_amax_history_len, fp8_amax_compute_algo, device_type, cpu_gemm)
    backend.note = note
    return backend


def fp8_shape_error(n_embd, vocab_size, micro_batch_tokens, fp8_backend):
    """Why a GPT of this width / vocabulary / micro-batch cannot run its FP8 GEMMs, or None.
    Every GEMM dimension (n_embd, 3 n_embd, 4 n_embd, vocab_size) must be a multiple of 16
    (TE and torch._scaled_mm); tokens per micro-batch must be a multiple of 8 for TE (its
    FP8 GEMM input height) and of 16 for torch._scaled_mm (the wgrad GEMM's inner dimension),
    which 'auto' and 'emulated' also ask, so that a run that works on CPU works on a GPU."""
    if n_embd % 16 or vocab_size % 16:
        return f"FP8 GEMMs need n_embd and vocab_size to be multiples of 16 (got {n_embd}, {vocab_size})"
    multiple = 8 if fp8_backend == "te" else 16
    if micro_batch_tokens % multiple:
        return (f"FP8 GEMMs ({fp8_backend}) need micro_batch_size x block_size to be a multiple of {multiple} "
                f"(got {micro_batch_tokens})")
    return None
