"""
Precision backends: the one place that knows how a GEMM is computed.

model.py and train.py see a backend only through the Backend protocol below: two layer types
(Linear, LayerNormLinear), autocast() around each micro-batch forward, matmul, checkpoint and
telemetry. Where an FP8 product happens, from model.py:

    backend.Linear(...)  = FP8Linear           (a functools.partial with the backend's settings)
    FP8Linear.forward    -> _FP8LinearFunction (the casts; forward and both backward GEMMs)
                         -> EmulatedGemm.mm / ScaledMMGemm.mm -> torch.addmm / torch._scaled_mm

The file reads in that order: the interface; bf16; quantization (the FP8 cast); the FP8 GEMM;
the scaling state; the backends; Transformer Engine; choosing a backend.

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
import functools
from typing import Callable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn  # forward: activations and weights, max 448
E5M2 = torch.float8_e5m2    # backward: output gradients, max 57344
ROLES = ("input", "weight", "grad_output")
ROLE_DTYPES = (E4M3, E4M3, E5M2)
ROLE_MAXES = tuple(torch.finfo(d).max for d in ROLE_DTYPES)


class Backend(Protocol):
    """What model.py and train.py use of a precision backend (make_backend builds one)."""
    name: str  # 'bf16', 'emulated', 'torch' or 'te'
    compile: bool  # whether the fused pieces (the FP8 casts, model.py's TWEO term) run through torch.compile
    cpu_gemm: str  # where GEMMs with bf16 semantics run: 'native' or 'fp32' (choose_cpu_gemm)
    cpu_gemm_why: str  # and why, for the run's first log lines
    # the two layer types model.py builds, called as Linear(in_features, out_features, bias, init_std)
    Linear: Callable[..., nn.Module]
    LayerNormLinear: Callable[..., nn.Module]  # a LayerNorm fused into the GEMM's input, as te.LayerNormLinear

    def autocast(self, model=None, first_micro_batch=None, measure_quant_error=False):
        """The context of one micro-batch forward (backward runs outside it). Given the model, an FP8
        backend first applies the amaxes recorded since the last entry; first_micro_batch True or
        False casts FP8 weights once per iteration; measure_quant_error records what the casts lose."""

    def matmul(self, a, b):
        """a @ b on this backend's GEMM path (attention's explicit product, for clipped softmax)."""

    def checkpoint(self, fn, *args):
        """fn(*args) with its activations recomputed in backward (activation checkpointing)."""

    def telemetry(self, model) -> dict:
        """The FP8 amax and saturation signals since the last call ({} without FP8)."""


# ----------------------------------------------------------------------------------------
# Where a bf16 GEMM runs on a CPU. A bf16 GEMM with fp32 accumulation is an fp32 GEMM on
# bf16-rounded operands whose output is rounded once to bf16 (up to accumulation order),
# and every bf16, E4M3 and E5M2 value is exact in fp32. So on a CPU whose bf16 GEMMs fall
# back to slow kernels, 'fp32' computes them that way: the run's numerics stay bf16 or FP8.

CPU_GEMMS = ("auto", "native", "fp32")


def choose_cpu_gemm(cpu_gemm="auto", device_type="cpu", native_bf16=None, amx=None):
    """(path, why): 'native' (torch's bf16 kernels) or 'fp32' (fp32 GEMMs on the bf16/FP8
    values, one rounding to bf16) for GEMMs with bf16 semantics. 'auto' takes torch's kernels
    where they are the faster path: oneDNN's native bf16 GEMMs on AMX tiles. Without AMX they
    run on AVX512-BF16, 1.6-1.9x slower than fp32 GEMMs, or are emulated, ~40x slower
    (docs/cpu.md). `native_bf16` and `amx` override what torch says of this CPU, for tests.
    Only CPUs have a choice: a GPU always runs its own bf16 / FP8 GEMMs."""
    if cpu_gemm not in CPU_GEMMS:
        raise ValueError(f"cpu_gemm must be one of {', '.join(CPU_GEMMS)}, got {cpu_gemm!r}")
    if device_type != "cpu":
        return "native", f"GEMMs run on the {device_type} device (cpu_gemm applies to CPUs only)"
    if cpu_gemm != "auto":
        return cpu_gemm, f"cpu_gemm={cpu_gemm}"
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported() if native_bf16 is None else native_bf16
    amx = torch.cpu._is_amx_tile_supported() if amx is None else amx
    if native_bf16 and amx:
        return "native", "this CPU has native bf16 GEMMs on AMX"
    if native_bf16:
        return "fp32", ("this CPU's native bf16 GEMMs (AVX512-BF16, no AMX) are slower than its fp32 ones: "
                        "bf16 GEMMs as fp32 GEMMs on bf16 values")
    return "fp32", "this CPU has no native bf16 GEMMs (oneDNN says so): bf16 GEMMs as fp32 GEMMs on bf16 values"


def gemm_dtype(x):
    """The dtype a GEMM on x runs in, and the one an FP8 layer returns: the autocast dtype inside
    autocast, else x's own (TE's rule; CUDA autocast runs layer_norm in fp32, which must not leak
    into the residual stream)."""
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


# ----------------------------------------------------------------------------------------
# Quantization: Transformer Engine's per-tensor FP8 scaling, computed with torch's float8 dtypes.
#
# Each GEMM keeps one scale per role (input, weight, grad_output). The value x is cast as
# saturate(x * scale) -> float8.
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
    operand), so one NaN cannot freeze a scale."""
    x = x.detach().float()
    return torch.where(x != x, 0.0, x.abs()).amax()  # x != x: isnan, as a compare inductor's CPU code vectorizes


def current_scale(amax, limit):
    """Float8CurrentScaling's scale for a tensor of this amax: a true fp32 division, as TE's
    __fdiv_rn (a Python number / tensor multiplies by the reciprocal, one ulp off); an
    overflow becomes fp32's maximum (TE's value_for_inf); a zero or non-finite amax gives 1."""
    scale = (torch.full_like(amax, limit) / amax).clamp(max=torch.finfo(torch.float32).max)
    return torch.where((amax > 0) & torch.isfinite(amax), scale, torch.ones_like(scale))


def cast_to_fp8(x, scales, role: int, fp8_dtype: torch.dtype, current_scaling: bool, wide_dtype=None):
    """The one FP8 cast of both FP8 backends: amax, scale (scales[role], or the tensor's own
    under current scaling), saturation count and the saturating cast, with no host sync.
    Returns (fp8 tensor, amax, number of saturated elements, scale); with wide_dtype the FP8
    values come in that dtype (exact: the emulated GEMM's operands, without a second pass).
    cast_function(True) is this function compiled (one fused pass); both give the same bits,
    NaNs included, but for a NaN widened to bf16 (0x7fc0 eager, 0xffff compiled: any NaN is
    one to a GEMM)."""
    limit = torch.finfo(fp8_dtype).max
    x = x.detach().float()  # once: amax_of's own conversion is then a no-op
    amax = amax_of(x)
    scale = current_scale(amax, limit) if current_scaling else scales[role]
    y = x * scale
    saturated = (y.abs() > limit).sum()
    y = y.clamp(-limit, limit)
    nan = y != y
    # The emulation's operands need the FP8 values, not FP8 bytes. Compiled for a CPU, a float8
    # conversion is a scalar loop (the whole cast 2.6x slower than with round_to_fp8_grid); eager,
    # it is a vector kernel, where the arithmetic would take ten passes. Both give the same values.
    on_grid = wide_dtype is not None and torch.compiler.is_compiling()
    if on_grid:
        y = round_to_fp8_grid(y, fp8_dtype)
    # one NaN for every NaN: eager keeps the input's sign bit, inductor's clamp may not
    y = torch.where(nan, torch.full_like(y, float("nan")), y)
    y = y if on_grid else y.to(fp8_dtype)
    return (y if wide_dtype is None else y.to(wide_dtype)), amax, saturated, scale


FP8_GRID = {E4M3: (3, -6), E5M2: (2, -14)}  # mantissa bits, exponent of the smallest normal value


def round_to_fp8_grid(y, fp8_dtype):
    """fp32 y, within the format's range, rounded to the nearest value of fp8_dtype, ties to even,
    in fp32: y.to(fp8_dtype).float() in integer and float arithmetic. Normal values round on
    their fp32 bits to the format's mantissa width (a carry into the exponent is the next
    binade, as it should be); below the smallest normal value the format's step is fixed,
    2^(emin - mantissa bits), and torch.round rounds half to even. NaN inputs give garbage."""
    mantissa, emin = FP8_GRID[fp8_dtype]
    dropped = 23 - mantissa
    bits = y.view(torch.int32)
    half_minus_one_plus_odd = (1 << (dropped - 1)) - 1 + ((bits >> dropped) & 1)
    normal = ((bits + half_minus_one_plus_odd) & ~((1 << dropped) - 1)).view(torch.float32)
    subnormal = torch.round(y * 2.0 ** (mantissa - emin)) * 2.0 ** (emin - mantissa)
    return torch.where(y.abs() < 2.0 ** emin, subnormal, normal)


@functools.cache
def cast_function(compiled):
    """cast_to_fp8, or its torch.compile'd form (made once, dynamic shapes: a graph per role,
    input dtype, recipe and operand dtype, whatever the GEMM sizes; up to 64 of them, where
    torch's default of 8 would end a run that evaluates in fp32 besides training in bf16)."""
    if not compiled:
        return cast_to_fp8
    compiled_cast = torch.compile(cast_to_fp8, fullgraph=True, dynamic=True)

    def cast(*args):
        with torch._dynamo.config.patch(recompile_limit=64):
            return compiled_cast(*args)
    return cast


def quantize(x, scale, dtype):
    """Cast x*scale to `dtype`, saturating. Returns (fp8 tensor, number of saturated elements)."""
    q, _, saturated, _ = cast_to_fp8(x, scale.reshape(1), 0, dtype, False)
    return q, saturated


def dequantize(q, scale):
    return q.to(torch.float32).div_(scale)


# ----------------------------------------------------------------------------------------
# The FP8 GEMM: y = x @ w.T + b from E4M3 x and w, and in backward the two GEMMs of the E5M2
# gradient. The product is a strategy the backend picks (EmulatedGemm or ScaledMMGemm, each with
# an fp32 variant for CPUs without native bf16 GEMMs); _FP8LinearFunction casts and calls it.
#
# The emulation: every E4M3 and E5M2 value is exact in bf16, so the GEMM runs in bf16 on the
# raw FP8 values (oneDNN accumulates bf16 products in fp32) and the two dequantization factors
# 1/scale are applied once, to the fp32 accumulator, before the one rounding to the output
# dtype: the same arithmetic as an FP8 tensor-core GEMM with fp32 accumulation. fp32 outputs
# (no autocast) run the GEMM in fp32 instead.

class EmulatedGemm:
    """a @ b on FP8 operands with per-tensor dequantization factors (1/scale): bf16 GEMM on
    the exact FP8 values, fp32 accumulation, factors and bias applied before one rounding.
    widen() gives an operand the GEMM's dtype once, where it is used twice (CPU float8
    conversions are slow). `bf16_gemm_dtype` is the dtype a GEMM with bf16 output runs in."""
    bf16_gemm_dtype = torch.bfloat16

    @classmethod
    def operand_dtype(cls, out_dtype):
        """The dtype the GEMM takes its FP8 operands in (None: float8 itself)."""
        return cls.bf16_gemm_dtype if out_dtype == torch.bfloat16 else torch.float32

    @classmethod
    def widen(cls, q, out_dtype):
        return q.to(cls.operand_dtype(out_dtype))

    @staticmethod
    def operands(a, b):
        return a, b  # any layout

    @classmethod
    def mm(cls, a, b, a_inv, b_inv, out_dtype, bias=None, fast_accum=False):
        """fast_accum (Hopper's reduced-precision accumulation, asked for by the forward GEMM
        as in TE) is not emulated: every emulated GEMM accumulates in fp32."""
        a, b = cls.widen(a, out_dtype), cls.widen(b, out_dtype)
        # the bias in the output's precision (bf16 under autocast), added before the one rounding
        bias = None if bias is None else bias.to(out_dtype).to(a.dtype)
        if a.dtype == torch.float32:  # the factors multiply the fp32 accumulator on the device: no host sync
            out = (a @ b).mul_(a_inv * b_inv)
            return (out if bias is None else out.add_(bias)).to(out_dtype)
        # a bf16 GEMM must apply the factors before its rounding to bf16, and only addmm's alpha
        # (a Python number: one host sync) does that; CPUs have no bf16 GEMM with fp32 output
        alpha = (a_inv * b_inv).item()
        if bias is None:
            return torch.addmm(torch.zeros((), dtype=a.dtype, device=a.device), a, b, beta=0, alpha=alpha).to(out_dtype)
        return torch.addmm(bias, a, b, alpha=alpha).to(out_dtype)


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
    def operand_dtype(out_dtype):
        return None  # the GEMM takes float8

    @staticmethod
    def operands(a, b):
        return _row_major(a), _col_major(b)

    @staticmethod
    def mm(a, b, a_inv, b_inv, out_dtype, bias=None, fast_accum=False):
        error = scaled_mm_error(a, b, a_inv, b_inv)
        if error:
            raise ValueError(f"FP8 GEMM {tuple(a.shape)} @ {tuple(b.shape)}: {error}")
        out = torch._scaled_mm(a, b, scale_a=a_inv, scale_b=b_inv, out_dtype=torch.bfloat16,
                               bias=None if bias is None else bias.to(torch.bfloat16), use_fast_accum=fast_accum)
        return out.to(out_dtype)


class ScaledMMGemmInFP32(ScaledMMGemm):
    """torch._scaled_mm's product without its CPU kernel, which on some CPUs is a reference
    loop (measured on a Xeon with AMX, torch 2.13: 72 s for 512x64 @ 64x50304, where the same
    product in bf16 takes 0.03 s): an fp32 GEMM on the float8 operands' exact values, factors
    and bias applied before one rounding to bf16, as the kernel does (up to accumulation
    order). The operands are checked, laid out and saved as for the kernel."""

    @staticmethod
    def mm(a, b, a_inv, b_inv, out_dtype, bias=None, fast_accum=False):
        error = scaled_mm_error(a, b, a_inv, b_inv)
        if error:
            raise ValueError(f"FP8 GEMM {tuple(a.shape)} @ {tuple(b.shape)}: {error}")
        return EmulatedGemmInFP32.mm(a, b, a_inv, b_inv, torch.bfloat16, bias).to(out_dtype)


class _FP8LinearFunction(torch.autograd.Function):
    """y = x @ w.T + b with x, w in E4M3 and dy in E5M2, fp32 accumulation. Saves the
    quantized x and w for backward as the GEMM takes them: float8 (one byte per element,
    as Transformer Engine) for torch._scaled_mm, FP8-valued bf16 for the emulation.
    The GEMM (EmulatedGemm or ScaledMMGemm) and the cast (cast_to_fp8, compiled or not)
    come from the layer."""

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    @torch.autocast("cuda", enabled=False)
    def forward(ctx, x, weight, bias, layer, training_step, out_dtype):
        cast, current, gemm = layer.fp8_cast, layer.recipe == "current", layer.fp8_gemm
        # plain tensors, so that a compiled cast sees one kind of input: no Parameter (whose shape it
        # would fix), no autograd, no view into the stacked scaling state
        scales, wide = layer.fp8_scale.clone(), gemm.operand_dtype(out_dtype)
        x2d = x.detach().reshape(-1, x.shape[-1])
        xq, ax, sat_x, sx = cast(x2d, scales, 0, E4M3, current, wide)
        if training_step:  # evaluation leaves the scaling state as it is
            layer.record(0, ax, sat_x)
            if layer.fp8_micro_batches.measure_quant_error:
                layer.record_quant_error(0, x2d, xq, sx, sat_x)
        wq, sw = _fp8_weight(layer, weight, scales, current, wide, training_step)
        x_inv, w_inv = sx.reciprocal(), sw.reciprocal()
        out = gemm.mm(*gemm.operands(xq, wq.t()), x_inv, w_inv, out_dtype, bias, fast_accum=True)
        ctx.save_for_backward(xq, wq, x_inv, w_inv)
        ctx.layer, ctx.has_bias = layer, bias is not None
        ctx.x_dtype, ctx.w_dtype, ctx.out_dtype = x.dtype, weight.dtype, out_dtype
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        xq, wq, x_inv, w_inv = ctx.saved_tensors
        layer, gemm = ctx.layer, ctx.layer.fp8_gemm
        g = grad_out.reshape(-1, grad_out.shape[-1])
        gq, ag, sat_g, sg = layer.fp8_cast(g.detach(), layer.fp8_scale.clone(), 2, E5M2, layer.recipe == "current",
                                           gemm.operand_dtype(ctx.out_dtype))
        layer.record(2, ag, sat_g)
        if layer.fp8_micro_batches.measure_quant_error:
            layer.record_quant_error(2, g, gq, sg, sat_g)
        g_inv = sg.reciprocal()
        grad_x = grad_w = grad_b = None
        # both GEMMs produce the activation dtype, as the forward one (TE under autocast);
        # they accumulate in full precision (TE's dgrad and wgrad)
        if ctx.needs_input_grad[0]:  # dgrad: E5M2 gradient x E4M3 weight
            grad_x = gemm.mm(*gemm.operands(gq, wq), g_inv, w_inv, ctx.out_dtype).to(ctx.x_dtype)
            grad_x = grad_x.reshape(*grad_out.shape[:-1], wq.shape[-1])
        if ctx.needs_input_grad[1]:  # wgrad: E5M2 gradient x E4M3 input
            grad_w = gemm.mm(*gemm.operands(gq.t(), xq), g_inv, x_inv, ctx.out_dtype).to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            # from the high-precision gradient, as in TE's fused cast+dbias
            grad_b = g.sum(0, dtype=torch.float32)
        return grad_x, grad_w, grad_b, None, None, None


def _fp8_weight(layer, weight, scales, current, wide, training_step):
    """The layer's FP8 weight and its scale: cast now, or, in a later micro-batch of the
    iteration, the one the first micro-batch cast (MicroBatches)."""
    micro_batches, cached = layer.fp8_micro_batches, layer.fp8_weight_cache
    key = (micro_batches.iteration, wide)
    if training_step and micro_batches.first is False and cached is not None and cached[0] == key:
        return cached[1], cached[2]
    wq, aw, sat_w, sw = layer.fp8_cast(weight.detach(), scales, 1, E4M3, current, wide)
    if training_step:
        layer.record(1, aw, sat_w)
        if micro_batches.measure_quant_error:
            layer.record_quant_error(1, weight, wq, sw, sat_w)
        layer.fp8_weight_cache = (key, wq, sw) if micro_batches.first else None
    return wq, sw


# ----------------------------------------------------------------------------------------
# FP8 scaling state: per GEMM and role, a scale, an amax history and telemetry counters, kept
# in buffers of the layer (checkpointed with it) and stacked per model (FP8ScalingState), so that
# the amax reduction is one collective and the delayed-scaling update a few ops.

class MicroBatches:
    """Where training stands in an iteration, shared by a backend's FP8 layers: TE's
    is_first_microbatch. `first` None: every forward casts its weight and keeps nothing (one
    micro-batch per iteration, evaluation); True: the first micro-batch of an iteration casts
    and keeps its FP8 weight; False: a later micro-batch reuses it, since the optimizer has not
    stepped (the weight amax is then not recorded again and its history does not roll, as in TE)."""

    def __init__(self):
        self.first, self.iteration = None, 0
        self.measure_quant_error = False  # the training step that runs now records quantization errors

    def enter(self, first, measure_quant_error=False):
        self.first, self.measure_quant_error = first, measure_quant_error and torch.is_grad_enabled()
        self.iteration += bool(first)


FP8_STATE_BUFFERS = ("fp8_scale", "fp8_amax_history", "fp8_amax_pending", "fp8_saturated", "fp8_saturated_flags",
                     "fp8_saturated_tensors")


# What a measured step's FP8 casts lost, summed per GEMM and role over its micro-batches and ranks:
# ||Q(x) - x||^2 and ||x||^2 (Q(x): the FP8 value times 1/scale, what the GEMM computes with), the
# nonzero elements that became zero (flushed below E4M3's / E5M2's smallest subnormal), the nonzero
# elements, the saturated elements (clipped to the format's maximum) and all elements.
QUANT_ERROR_SUMS = ("error_sq", "x_sq", "flushed", "nonzero", "saturated", "elements")


class _FP8State:
    """Per-GEMM scaling state, all of it in buffers so that it is checkpointed and moves
    with the module: scale[3], amax_history[H, 3] (row 0 newest), the amax seen since the
    last update (amax_pending[3]) and saturation counters since the last telemetry read.
    Inside a model the buffers are views of one stacked tensor per quantity (FP8ScalingState).
    The FP8 layers' first base: it builds the bf16 layer after it in their MRO, then the state."""

    def __init__(self, in_features, out_features, bias=True, init_std=0.02, *, recipe, history_len, compute_algo,
                 gemm=EmulatedGemm, cast=cast_to_fp8, micro_batches=None):
        super().__init__(in_features, out_features, bias=bias, init_std=init_std)  # the bf16 layer's (MRO)
        self.recipe, self.compute_algo, self.fp8_gemm, self.fp8_cast = recipe, compute_algo, gemm, cast
        self.fp8_micro_batches = micro_batches or MicroBatches()
        self.fp8_weight_cache = None  # ((iteration, operand dtype), FP8 weight, its scale): not state, not saved
        self.fp8_quant_error = None  # [role, QUANT_ERROR_SUMS] of a measured step: telemetry, not state
        self.register_buffer("fp8_scale", torch.ones(3))
        self.register_buffer("fp8_amax_history", torch.zeros(history_len, 3))
        self.register_buffer("fp8_amax_pending", torch.zeros(3))
        self.register_buffer("fp8_saturated", torch.zeros(3, dtype=torch.long))
        # TE's comparable count (telemetry only, not checkpointed): whether a role clipped in the
        # running micro-batch, and how many (micro-batch, role) casts clipped on any rank
        self.register_buffer("fp8_saturated_flags", torch.zeros(3, dtype=torch.long), persistent=False)
        self.register_buffer("fp8_saturated_tensors", torch.zeros(3, dtype=torch.long), persistent=False)

    def record(self, role, amax, saturated):
        # a running max, so a second call (activation-checkpoint recompute) changes nothing
        self.fp8_amax_pending[role] = torch.maximum(self.fp8_amax_pending[role], amax)
        self.fp8_saturated[role] += saturated
        self.fp8_saturated_flags[role] |= saturated > 0

    def record_quant_error(self, role, x, q, scale, saturated):
        """On a measured step only: what the cast of x to q (FP8 values, scale applied) lost, as
        sums over the step's casts (QUANT_ERROR_SUMS). A plain attribute, not a buffer: never
        checkpointed, never cast to bf16 by DeepSpeed, read and cleared by fp8_quant_error."""
        if self.fp8_quant_error is None:
            self.fp8_quant_error = torch.zeros(3, len(QUANT_ERROR_SUMS), dtype=torch.float64, device=x.device)
        x, q = x.detach().float(), q.float()
        finite = torch.isfinite(x)  # a NaN or inf is the collapse detector's business
        x, q = torch.where(finite, x, 0.0), torch.where(finite, q, 0.0)
        nonzero = x != 0
        error = q / scale - x
        self.fp8_quant_error[role] += torch.stack([
            error.square().sum(dtype=torch.float64), x.square().sum(dtype=torch.float64),
            (nonzero & (q == 0)).sum().double(), nonzero.sum().double(), saturated.double(),
            torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)])


def fp8_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _FP8State)]


def keep_fp8_state_fp32(model):
    """DeepSpeed (and zero.Init) cast floating buffers to bf16; scales and amax histories
    must stay fp32, as in Transformer Engine."""
    for _, m in fp8_layers(model):
        for name in ("fp8_scale", "fp8_amax_history", "fp8_amax_pending"):
            setattr(m, name, getattr(m, name).float())


def _distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


class FP8ScalingState:
    """A model's FP8 scaling state as one tensor per quantity, the GEMMs stacked on dim 0:
    fp8_scale [L, 3], fp8_amax_history [L, H, 3], fp8_amax_pending [L, 3] and the counters.
    Each layer's fp8_* buffers become views of its row, so a layer reads and records its own
    row and checkpoints keep per-layer keys, while the amax reduction is one collective and the
    scale update a fixed number of ops whatever L (TE's reduce_and_update_fp8_tensors).
    A buffer replaced since (module.to(), a dtype cast) makes the state rebuild from the
    buffers' current values."""

    def __init__(self, named_layers):
        self.names, layers = [n for n, _ in named_layers], [m for _, m in named_layers]
        self.layers = layers
        self.recipe, self.compute_algo = layers[0].recipe, layers[0].compute_algo
        if any((m.recipe, m.compute_algo) != (self.recipe, self.compute_algo) for m in layers):
            raise ValueError("the FP8 layers of one model must share one recipe and amax_compute_algo")
        self.stacked = {n: torch.stack([getattr(m, n) for m in layers]) for n in FP8_STATE_BUFFERS}
        for i, m in enumerate(layers):
            for n, t in self.stacked.items():
                m._buffers[n] = t[i]
        self.storages = {n: t.untyped_storage().data_ptr() for n, t in self.stacked.items()}
        # made once: a tensor built from Python numbers at every update would be a host-to-device copy
        self.maxes = torch.tensor(ROLE_MAXES, device=self.stacked["fp8_scale"].device)

    def intact(self):
        return all(m._buffers[n].untyped_storage().data_ptr() == ptr for m in self.layers
                   for n, ptr in self.storages.items())

    @classmethod
    def of(cls, model):
        """The model's state, built at the first call (None for a model without FP8 layers)."""
        state = model.__dict__.get("_fp8_scaling_state")
        if state is None or not state.intact():
            layers = fp8_layers(model)
            state = cls(layers) if layers else None
            model.__dict__["_fp8_scaling_state"] = state
        return state

    def update(self):
        """Close the micro-batch just run: max-reduce the amaxes and saturation flags over the
        data-parallel ranks in one collective, count the casts that clipped on any rank, and
        (delayed scaling) push the amaxes and compute the next scales."""
        s = self.stacked
        pending = torch.cat([s["fp8_amax_pending"], s["fp8_saturated_flags"].float()], dim=1)
        if _distributed():
            torch.distributed.all_reduce(pending, op=torch.distributed.ReduceOp.MAX)
        s["fp8_saturated_tensors"] += pending[:, 3:].long()
        s["fp8_saturated_flags"].zero_()
        if self.recipe == "delayed":  # current scaling keeps no history: its pending amax is telemetry
            delayed_scaling_update(s["fp8_amax_history"], s["fp8_scale"], pending[:, :3], self.compute_algo, self.maxes)
        s["fp8_amax_pending"].zero_()


def delayed_scaling_update(history, scale, newest, compute_algo, maxes):
    """TE's fused update after the amax reduction (delayed_scaling.cu, kernel_bulk), for all
    GEMMs at once (history [L, H, 3], row 0 newest here; scale and newest [L, 3]): push the
    newest amax and compute the scale for the next step. A role whose newest amax is 0 (no
    data this step) keeps its history and its scale; a non-finite or zero window amax keeps
    the scale; a scale that overflows fp32 becomes fp32's maximum. In place, no host sync."""
    fresh = newest != 0
    rolled = torch.roll(history, 1, 1)
    rolled[:, 0] = newest
    history.copy_(torch.where(fresh.unsqueeze(1), rolled, history))
    amax = history.amax(1) if compute_algo == "max" else history[:, 0]
    amax = torch.where(fresh, amax, torch.zeros_like(amax))
    new = maxes / amax
    keep = ~((amax > 0) & torch.isfinite(amax))  # TE keeps the previous scale then
    new = torch.where(keep, scale, new)
    new = torch.where(torch.isinf(new), torch.full_like(new, torch.finfo(torch.float32).max), new)
    scale.copy_(new)


@torch.no_grad()
def update_fp8_scales(model):
    """FP8ScalingState.update() of the model's state (nothing for a model without FP8 layers)."""
    state = FP8ScalingState.of(model)
    if state is not None:
        state.update()


@torch.no_grad()
def fp8_telemetry(model):
    """Per GEMM: the amax of each role in the micro-batch just run (max over ranks) and the
    elements saturated since the last call (summed over ranks); `fp8_saturated_tensors`, as
    TE's SaturationCounter: the (GEMM, role, micro-batch) casts since the last call that clipped
    on any rank, i.e. whose amax (max over ranks) times its scale exceeded the format's maximum.
    Resets the saturation counters. Reads the device once."""
    state = FP8ScalingState.of(model)
    if state is None:
        return {}
    s = state.stacked
    sat = s["fp8_saturated"].clone()
    pending = torch.cat([s["fp8_amax_pending"], s["fp8_saturated_flags"].float()], dim=1)
    if _distributed():
        torch.distributed.all_reduce(sat)
        torch.distributed.all_reduce(pending, op=torch.distributed.ReduceOp.MAX)
    tensors = s["fp8_saturated_tensors"].sum() + pending[:, 3:].sum().long()
    for n in ("fp8_saturated", "fp8_saturated_flags", "fp8_saturated_tensors"):
        s[n].zero_()  # the flags are counted now: the next update must not count them again
    # one device-to-host transfer; float64 holds the counts and the fp32 amaxes exactly
    rows = torch.cat([sat.double(), pending[:, :3].double(), tensors.double().expand(1, 3)]).tolist()
    n = len(state.layers)
    sat_rows, amax_rows, clipped = rows[:n], rows[n:2 * n], rows[-1][0]
    names = state.names
    return {
        "fp8_amax": {name: dict(zip(ROLES, a)) for name, a in zip(names, amax_rows)},
        "fp8_saturated": {name: dict(zip(ROLES, map(int, r))) for name, r in zip(names, sat_rows)},
        "fp8_saturated_total": int(sum(map(sum, sat_rows))),
        "fp8_saturated_tensors": int(clipped),
    }


@torch.no_grad()
def fp8_quant_error(model):
    """Per GEMM and role, over the casts of the steps measured since the last call (MicroBatches.
    measure_quant_error): the relative error ||Q(x) - x|| / ||x||, and the fractions of nonzero
    elements flushed to zero and of elements saturated. Summed over ranks (a collective when
    distributed); {} when nothing was measured. Clears the sums."""
    layers = fp8_layers(model)
    measured = [m.fp8_quant_error is not None for _, m in layers]
    if not layers or (not any(measured) and not _distributed()):
        return {}
    device = next(m.fp8_scale.device for _, m in layers)
    sums = torch.stack([m.fp8_quant_error if m.fp8_quant_error is not None else
                        torch.zeros(3, len(QUANT_ERROR_SUMS), dtype=torch.float64, device=device) for _, m in layers])
    if _distributed():  # every rank calls, measured or not (a rank may have no FP8 GEMM in that step)
        torch.distributed.all_reduce(sums)
    for _, m in layers:
        m.fp8_quant_error = None
    error_sq, x_sq, flushed, nonzero, saturated, elements = sums.unbind(-1)
    ratios = torch.stack([(error_sq / x_sq).sqrt(), flushed / nonzero, saturated / elements], dim=-1)
    if not bool(elements.sum() > 0):
        return {}
    rows = torch.where(elements.unsqueeze(-1) > 0, ratios, float("nan")).tolist()  # nan: a role never cast
    return {"fp8_quant_error": {name: {role: dict(zip(("rel_error", "flushed", "saturated"), r))
                                       for role, r in zip(ROLES, row)} for (name, _), row in zip(layers, rows)}}


# ----------------------------------------------------------------------------------------
# The backends: the FP8 layers (the bf16 ones with a scaling state and the FP8 GEMM), and the
# objects make_backend returns, which hand model.py its layer classes.

class FP8Linear(_FP8State, Linear):
    def forward(self, x):
        return _FP8LinearFunction.apply(x, self.weight, self.bias, self, self.training and torch.is_grad_enabled(),
                                        gemm_dtype(x))


class FP8LayerNormLinear(_FP8State, LayerNormLinear):
    """LayerNorm in high precision, its output quantized as the GEMM input (TE's LayerNormLinear)."""

    def forward(self, x):
        return _FP8LinearFunction.apply(self.layer_norm(x), self.weight, self.bias, self,
                                        self.training and torch.is_grad_enabled(), gemm_dtype(x))


class BF16Backend:
    name = "bf16"

    def __init__(self, device_type="cpu", cpu_gemm="auto", compile=False):
        self.device_type, self.compile = device_type, compile  # compile: the TWEO term's kernels (model.py)
        self.cpu_gemm, self.cpu_gemm_why = choose_cpu_gemm(cpu_gemm, device_type)
        self.Linear = functools.partial(Linear, cpu_gemm=self.cpu_gemm)
        self.LayerNormLinear = functools.partial(LayerNormLinear, cpu_gemm=self.cpu_gemm)

    def matmul(self, a, b):
        return matmul(a, b, self.cpu_gemm)

    def autocast(self, model=None, first_micro_batch=None, measure_quant_error=False):
        return torch.autocast(device_type=self.device_type, dtype=torch.bfloat16)

    def checkpoint(self, fn, *args):
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)

    def telemetry(self, model):
        return {}


class EmulatedFP8Backend:
    """Per-tensor FP8 layers with TE's scaling semantics. The GEMM (`fp8_gemm`) is the only
    thing the 'emulated' and 'torch' backends do differently."""
    name = "emulated"

    def __init__(self, recipe="delayed", amax_history_len=16, amax_compute_algo="max", device_type="cpu",
                 cpu_gemm="auto", compile=False):
        self.recipe, self.device_type, self.compile = recipe, device_type, compile
        self.cpu_gemm, self.cpu_gemm_why = choose_cpu_gemm(cpu_gemm, device_type)
        gemm = self.fp8_gemm(cpu_gemm)
        if gemm is ScaledMMGemmInFP32 and cpu_gemm == "auto":  # the run's first lines say where its FP8 GEMMs run
            self.cpu_gemm_why += "; FP8 GEMMs as fp32 GEMMs on their float8 values (--cpu_gemm=native calls torch._scaled_mm)"
        self.micro_batches = MicroBatches()
        kw = dict(recipe=recipe, history_len=amax_history_len, compute_algo=amax_compute_algo, gemm=gemm,
                  cast=cast_function(compile), micro_batches=self.micro_batches)
        self.Linear = functools.partial(FP8Linear, **kw)
        self.LayerNormLinear = functools.partial(FP8LayerNormLinear, **kw)

    def fp8_gemm(self, cpu_gemm):
        return EmulatedGemmInFP32 if self.cpu_gemm == "fp32" else EmulatedGemm

    @contextlib.contextmanager
    def autocast(self, model=None, first_micro_batch=None, measure_quant_error=False):
        """Entering applies the amax recorded since the last entry (the previous micro-batch's
        forward and backward), max-reduced across data-parallel ranks in one collective;
        the FP8 GEMMs then run with activations in bf16 around them. first_micro_batch: True
        or False where an iteration has several micro-batches, so that weights are cast once
        per iteration (MicroBatches); None casts them in every forward. measure_quant_error:
        this micro-batch's casts, forward and backward, add to fp8_quant_error's sums."""
        self.micro_batches.enter(first_micro_batch if torch.is_grad_enabled() else None, measure_quant_error)
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
    """Put te_fp8_state() back into TE modules that may never have run a forward, as TE's own
    set_extra_state does (TE 2.4-2.18, module/base.py): first the fp8_meta entries a forward
    would have set (num_gemms, which set_meta_tensor reads to size the state: 3 scales per GEMM
    forward, 2 backward; the recipe; fp8_checkpoint, without which get_extra_state saves
    nothing), then init_fp8_meta_tensors(recipe), then the tensors copied in place. A later
    first forward with the same delayed recipe keeps these tensors (set_meta_tensor returns
    early once fp8_meta_tensors_initialized). Returns the number of modules set."""
    n = 0
    for name, m in model.named_modules():
        if not hasattr(m, "init_fp8_meta_tensors") or f"{name}.scaling_fwd.scale" not in state:
            continue
        m.fp8_meta["num_gemms"] = state[f"{name}.scaling_fwd.scale"].numel() // 3  # 1 for Linear, LayerNormLinear
        m.fp8_meta["recipe"] = recipe
        m.fp8_meta["fp8_checkpoint"] = True
        m.init_fp8_meta_tensors(recipe)
        for key in ("scaling_fwd", "scaling_bwd"):
            m.fp8_meta[key].scale.copy_(state[f"{name}.{key}.scale"])
            m.fp8_meta[key].amax_history.copy_(state[f"{name}.{key}.amax_history"])
        n += 1
    return n


@contextlib.contextmanager
def _nested(outer, inner):
    with outer, inner:
        yield


@contextlib.contextmanager
def te_state_unchanged(model):
    """Leaves a TE model's delayed-scaling state as it was on entry. Under no_grad TE's forward
    still max-writes each cast's amax into row 0 of the amax history (its cast kernels'
    atomicMax), and only skips the update at autocast exit: the next training update would take
    the evaluation's amaxes. Restored in place (TE's quantizers hold views of these tensors);
    a module first initialised inside starts again from TE's initial state (scale 1, empty
    history)."""
    before = {id(m): {k: (m.fp8_meta[k].scale.clone(), m.fp8_meta[k].amax_history.clone())
                      for k in ("scaling_fwd", "scaling_bwd")} for _, m in te_fp8_modules(model)}
    try:
        yield
    finally:
        with torch.no_grad():
            for _, m in te_fp8_modules(model):
                for k in ("scaling_fwd", "scaling_bwd"):
                    meta = m.fp8_meta[k]
                    if id(m) in before:
                        meta.scale.copy_(before[id(m)][k][0])
                        meta.amax_history.copy_(before[id(m)][k][1])
                    else:
                        meta.scale.fill_(1.0)
                        meta.amax_history.zero_()


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

    def __init__(self, recipe="delayed", amax_history_len=16, amax_compute_algo="max", amax_reduction_group=None,
                 compile=False):
        import transformer_engine.pytorch as te
        from transformer_engine.common.recipe import DelayedScaling, Float8CurrentScaling, Format

        self.te, self.recipe_name, self.compile = te, recipe, compile  # compile: TWEO's kernels; TE fuses its own casts
        if recipe == "delayed":
            self.recipe = DelayedScaling(fp8_format=Format.HYBRID, amax_history_len=amax_history_len,
                                         amax_compute_algo=amax_compute_algo, margin=0)
        else:
            self.recipe = Float8CurrentScaling(fp8_format=Format.HYBRID)
        self.amax_reduction_group = amax_reduction_group
        self.saturation, self.micro_batches = SaturationCounter(), MicroBatches()
        # TE's default init differs from GPT-2's: pass ours explicitly
        init = lambda std: (lambda w: nn.init.normal_(w, mean=0.0, std=std))
        Linear, LayerNormLinear = (_te_layer(te.Linear, self.micro_batches),
                                   _te_layer(te.LayerNormLinear, self.micro_batches))
        self.Linear = lambda i, o, bias=True, init_std=0.02: Linear(
            i, o, bias=bias, init_method=init(init_std), params_dtype=torch.get_default_dtype())
        self.LayerNormLinear = lambda i, o, bias=True, init_std=0.02: LayerNormLinear(
            i, o, bias=bias, eps=1e-5, init_method=init(init_std), params_dtype=torch.get_default_dtype())

    def autocast(self, model=None, first_micro_batch=None, measure_quant_error=False):
        """TE's autocast; first_micro_batch goes to every TE layer's forward as TE's
        is_first_microbatch (weights cast once per iteration). measure_quant_error is ignored:
        TE's casts happen inside its kernels, where nothing sees the tensors before and after."""
        self.micro_batches.enter(first_micro_batch if torch.is_grad_enabled() else None)
        if model is not None and torch.is_grad_enabled():  # a training micro-batch
            self.saturation.step(model)
        group = self.amax_reduction_group
        if group is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            group = torch.distributed.group.WORLD  # amax max-reduced over the data-parallel group
        if hasattr(self.te, "autocast"):  # TE >= 2.9
            te_autocast = self.te.autocast(enabled=True, recipe=self.recipe, amax_reduction_group=group)
        else:
            te_autocast = self.te.fp8_autocast(enabled=True, fp8_recipe=self.recipe, fp8_group=group)
        if model is None or torch.is_grad_enabled():
            return te_autocast
        return _nested(te_state_unchanged(model), te_autocast)  # an evaluation: as our other backends, no trace

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


def _te_layer(te_module_class, micro_batches):
    """A TE module class whose _extra_state is empty on save and ignored on load (the FP8
    state is restored from te_fp8_state's plain tensors instead), so that neither DeepSpeed's
    strict load nor TE >= 2.18's pickle check ever sees TE's pickled recipe; and whose forward
    passes TE's is_first_microbatch from the backend's MicroBatches."""
    def forward(self, inp, is_first_microbatch=None, **kw):
        first = micro_batches.first if is_first_microbatch is None else is_first_microbatch
        return te_module_class.forward(self, inp, is_first_microbatch=first, **kw)

    return type(te_module_class.__name__, (te_module_class,), {
        "get_extra_state": lambda self: torch.empty(0, dtype=torch.uint8),
        "set_extra_state": lambda self, state: None,
        "forward": forward,
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


# ----------------------------------------------------------------------------------------
# Choosing a backend.

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
                 fp8_amax_history_len=16, fp8_amax_compute_algo="max", device_type="cpu", cpu_gemm="auto",
                 compile=False):
    """The backend for a precision. FP8 backends carry a `note` (one line, empty when there is
    nothing to say) on why fp8_backend='auto' chose what it chose. Every backend says where
    its bf16 GEMMs run (`cpu_gemm`: 'native' or 'fp32') and why (`cpu_gemm_why`).
    compile: the fused pieces through torch.compile, the emulated and torch backends' FP8 casts
    and the TWEO term (model.py), which reads backend.compile."""
    if precision == "bf16":
        return BF16Backend(device_type, cpu_gemm, compile)
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
        backend = TransformerEngineBackend(fp8_recipe, fp8_amax_history_len, fp8_amax_compute_algo, compile=compile)
    else:
        cls = TorchFP8Backend if fp8_backend == "torch" else EmulatedFP8Backend
        backend = cls(fp8_recipe, fp8_amax_history_len, fp8_amax_compute_algo, device_type, cpu_gemm, compile)
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
