"""precision.py: the emulated FP8 numerics (E4M3/E5M2, delayed and current scaling),
the backend choice, and state that moves between backends."""
import contextlib
import math
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from model import GPT, GPTConfig
from precision import (E4M3, E5M2, ROLE_DTYPES, ROLES, TE_ROLE_SLOTS, EmulatedGemm, EmulatedGemmInFP32, FP8LayerNormLinear,
                       FP8Linear, FP8ScalingState, LayerNormLinear, Linear, MicroBatches, SaturationCounter, ScaledMMGemm,
                       ScaledMMGemmInFP32, TransformerEngineBackend, _te_layer, amax_of, cast_function, cast_to_fp8,
                       choose_cpu_gemm, choose_fp8_backend, dequantize, fp8_layers, fp8_quant_error, fp8_shape_error, fp8_telemetry,
                       keep_fp8_state_fp32, load_te_fp8_state, make_backend, matmul, quantize, round_to_fp8_grid, scaled_mm_error,
                       te_available, te_fp8_state, update_fp8_scales)


def delayed_linear(history_len=16, n=64):
    torch.manual_seed(0)
    return FP8Linear(n, n, bias=False, recipe="delayed", history_len=history_len, compute_algo="max")


def train_step(layer, x):
    """One micro-batch as train.py runs it: scales updated at autocast entry, then fwd + bwd."""
    update_fp8_scales(layer)
    layer(x).sum().backward()


def test_e4m3_quantization_error_is_at_the_format_level():
    torch.manual_seed(0)
    x = torch.randn(1 << 16)
    scale = 448.0 / x.abs().max()  # current scaling
    xq = dequantize(quantize(x, scale, E4M3)[0], scale)
    normal = (x * scale).abs() >= 2.0 ** -6  # E4M3's normal range; below it the grid is absolute
    rel = ((xq - x).abs() / x.abs())[normal]
    rms = rel.pow(2).mean().sqrt().item()
    print(f"E4M3 relative error on N(0,1): RMS {rms:.4f}, max {rel.max().item():.4f} (bound 2^-4 = 0.0625)")
    assert rel.max().item() <= 2.0 ** -4 + 1e-7
    assert 0.01 < rms < 0.04  # 3 mantissa bits: uniform rounding gives ~2^-4/sqrt(3)/2 ... 2^-4/sqrt(3)
    assert normal.float().mean() > 0.99


def test_casts_saturate_and_are_counted():
    q, n = quantize(torch.tensor([1.0, 500.0, -1e6, 448.0]), torch.tensor(1.0), E4M3)
    assert q.float().tolist() == [1.0, 448.0, -448.0, 448.0] and n.item() == 2


def test_a_new_outlier_saturates_and_the_scale_catches_up_within_the_history():
    H = 16
    layer = delayed_linear(H)
    x = torch.randn(32, 64)
    for _ in range(3):
        train_step(layer, x)
    update_fp8_scales(layer)
    amax_before = x.abs().max().item()
    assert layer.fp8_scale[0].item() == pytest.approx(448.0 / amax_before, rel=1e-6)
    layer.fp8_saturated.zero_()

    spike = x.clone()
    spike[0, 0] = 100 * amax_before  # a new outlier, 100x the historical amax
    train_step(layer, spike)
    assert layer.fp8_saturated[0].item() == 1  # zero tolerance: it saturates at its own step
    assert fp8_telemetry(layer)["fp8_saturated_total"] >= 1
    update_fp8_scales(layer)  # the next step's scale includes it
    assert layer.fp8_scale[0].item() == pytest.approx(448.0 / (100 * amax_before), rel=1e-6)
    train_step(layer, spike)
    assert layer.fp8_saturated[0].item() == 0

    # it leaves the history after H steps of normal data, and the scale returns
    for step in range(H):
        assert layer.fp8_scale[0].item() < 448.0 / amax_before / 10
        train_step(layer, x)
        update_fp8_scales(layer)
    assert layer.fp8_scale[0].item() == pytest.approx(448.0 / amax_before, rel=1e-6)


def test_the_scale_in_use_comes_from_steps_before_it():
    layer = delayed_linear(4)
    assert layer.fp8_scale.tolist() == [1.0, 1.0, 1.0]  # TE's initial scale
    x = torch.randn(8, 64)
    train_step(layer, x)
    assert layer.fp8_scale.tolist() == [1.0, 1.0, 1.0]  # updated only at the next autocast entry
    assert layer.fp8_amax_pending[0].item() == pytest.approx(x.abs().max().item())
    update_fp8_scales(layer)
    assert layer.fp8_amax_history[0, 0].item() == pytest.approx(x.abs().max().item())
    # the gradient is cast to E5M2 with its own scale (max 57344)
    assert layer.fp8_scale[2].item() == pytest.approx(57344.0 / layer.fp8_amax_history[0, 2].item(), rel=1e-6)
    # evaluation does not move the state
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.eval()
    with torch.no_grad():
        layer(100 * x)
    update_fp8_scales(layer)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


# ---- one FP8 GEMM, exactly: an explicit quantize-then-matmul reference ----

U32 = 2.0 ** -24  # fp32 unit roundoff


def cast_reference(t, scale, dtype):
    """TE's cast, written out: t * scale in fp32, clipped to the format's largest value, rounded to `dtype`."""
    limit = {E4M3: 448.0, E5M2: 57344.0}[dtype]
    return (t.float() * scale.float()).clamp(-limit, limit).to(dtype)


def reference_product(a, b, a_scale, b_scale):
    """a @ b of FP8 operands dequantized by their scales, in float64 (exact products and sums),
    with the bound on what fp32 accumulation and fp32 scale arithmetic can add: (K + 8) u |a| @ |b|."""
    inv = 1.0 / (a_scale.double() * b_scale.double())
    exact = a.double() @ b.double() * inv
    bound = (a.shape[1] + 8) * U32 * (a.double().abs() @ b.double().abs()) * inv
    return exact, bound


def assert_within(ours, exact, bound, bf16_out, name):
    """ours equals the exact result up to `bound` (fp32 arithmetic) plus, for a GEMM with bf16
    output, half a bf16 step (one rounding): a missing or wrong cast is orders of magnitude larger."""
    slack = bound + (exact.abs() * 2.0 ** -8 if bf16_out else 0)
    ours = ours.double()
    err = (ours - exact).abs()
    worst = (err / slack.clamp_min(1e-30)).max().item()
    assert worst <= 1.0, f"{name}: error {worst:.3g} x the rounding bound"


def fp8_linear_case(layer_cls, gemm, autocast, frozen=None):
    """One training step of an FP8 layer with scales set by the delayed-scaling state so that
    the input and the output gradient both clip a few elements (`frozen`: a parameter that does
    not train)."""
    torch.manual_seed(0)
    layer = layer_cls(64, 32, bias=True, recipe="delayed", history_len=4, compute_algo="max", gemm=gemm)
    with torch.no_grad():
        layer.bias.normal_()
        if hasattr(layer, "layer_norm_weight"):
            layer.layer_norm_weight.uniform_(0.5, 2.0)
            layer.layer_norm_bias.normal_(0.0, 0.1)
    if frozen:
        getattr(layer, frozen).requires_grad_(False)
    x = (torch.randn(2, 24, 64) * torch.logspace(-2, 1, 64)).requires_grad_()  # columns from 0.01 to 10
    g = torch.randn(2, 24, 32) * torch.logspace(-6, -2, 32)                    # gradient-sized
    gemm_input = layer.layer_norm(x).detach() if hasattr(layer, "layer_norm") else x.detach()
    # the state of an earlier step: amax history below this step's input and gradient amaxes
    layer.fp8_amax_pending.copy_(torch.tensor([0.9 * gemm_input.abs().max().item(), layer.weight.abs().max().item(),
                                               0.9 * g.abs().max().item()]))
    update_fp8_scales(layer)
    scales = layer.fp8_scale.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    y.backward(g.to(y.dtype))
    return layer, x, g.to(y.dtype), gemm_input, scales, y


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("gemm", [EmulatedGemm, EmulatedGemmInFP32, ScaledMMGemm],
                         ids=["emulated", "emulated_in_fp32", "torch_scaled_mm"])
@pytest.mark.parametrize("layer_cls", [FP8Linear, FP8LayerNormLinear], ids=["Linear", "LayerNormLinear"])
def test_fp8_linear_equals_quantize_then_matmul(layer_cls, gemm, autocast):
    """Output, dx and dw against an explicit reference: x and w cast to E4M3, the output gradient
    to E5M2, each with its scale from the delayed-scaling state, products of the FP8 values. And
    the negative control: each differs from the unquantized product by at least FP8's error."""
    layer, x, g, gemm_input, scales, y = fp8_linear_case(layer_cls, gemm, autocast)
    sx, sw, sg = scales
    xq = cast_reference(gemm_input.reshape(-1, 64), sx, E4M3)
    wq = cast_reference(layer.weight.detach(), sw, E4M3)
    gq = cast_reference(g.reshape(-1, 32), sg, E5M2)
    assert (xq.float().abs() == 448).sum() > 0 and (gq.float().abs() == 57344).sum() > 0  # both clip
    assert y.dtype == (torch.bfloat16 if autocast else torch.float32)

    bf16_out = autocast or gemm is ScaledMMGemm  # torch._scaled_mm returns bf16, its bias added in bf16
    bias = layer.bias.detach().to(torch.bfloat16 if bf16_out else torch.float32).double()
    out, out_bound = reference_product(xq, wq.t(), sx, sw)
    assert_within(y.detach().reshape(-1, 32), out + bias, out_bound + bias.abs() * U32, bf16_out, "output")
    dw, dw_bound = reference_product(gq.t(), xq, sg, sx)
    assert_within(layer.weight.grad, dw, dw_bound, bf16_out, "dw")
    g2 = g.double().reshape(-1, 32)  # dbias from the unquantized gradient, in fp32
    assert ((layer.bias.grad.double() - g2.sum(0)).abs() <= (g2.shape[0] + 2) * U32 * g2.abs().sum(0)).all()
    if layer_cls is FP8Linear:  # (through a LayerNorm, dx also carries the LayerNorm's backward)
        dx, dx_bound = reference_product(gq, wq, sg, sw)
        assert_within(x.grad.reshape(-1, 64), dx, dx_bound, bf16_out, "dx")
    # the amaxes this step recorded, exactly: the tensors' own, before any scaling
    assert layer.fp8_amax_pending.tolist() == [gemm_input.abs().max().item(), layer.weight.abs().max().item(),
                                               g.float().abs().max().item()]

    # negative control: against the same products without FP8, the error is FP8's, not bf16's
    w, xin = layer.weight.detach().double(), gemm_input.reshape(-1, 64).double()
    unquantized = {"output": (y.detach().reshape(-1, 32), xin @ w.t() + layer.bias.detach().double()),
                   "dw": (layer.weight.grad, g.reshape(-1, 32).double().t() @ xin)}
    if layer_cls is FP8Linear:
        unquantized["dx"] = (x.grad.reshape(-1, 64), g.reshape(-1, 32).double() @ w)
    for name, (ours, full) in unquantized.items():
        rel = ((ours.double() - full).norm() / full.norm()).item()
        assert 2.0 ** -7 < rel < 0.2, f"{name}: relative error {rel:.4f} against the unquantized product"


def test_frozen_parameters_still_get_the_other_gradients():
    """A frozen weight (or bias) gets no gradient and the others are the same as when it trains."""
    grads = {}
    for frozen in (None, "weight", "bias"):
        layer, x, *_ = fp8_linear_case(FP8Linear, EmulatedGemm, False, frozen=frozen)
        grads[frozen] = {"x": x.grad, "weight": layer.weight.grad, "bias": layer.bias.grad}
    for frozen in ("weight", "bias"):
        assert grads[frozen][frozen] is None
        for name in {"x", "weight", "bias"} - {frozen}:
            assert torch.equal(grads[frozen][name], grads[None][name]), (frozen, name)


def test_fp8_state_is_a_checkpoint_format():
    """Scales, amax histories (H x 3), pending amaxes and saturation counts are checkpointed in this
    layout (so checkpoints load across versions and backends); the saturated-tensor telemetry is not."""
    layer = delayed_linear(16)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items() if k.startswith("fp8_")}
    assert shapes == {"fp8_scale": (3,), "fp8_amax_history": (16, 3), "fp8_amax_pending": (3,), "fp8_saturated": (3,)}
    assert layer.fp8_saturated_flags.shape == layer.fp8_saturated_tensors.shape == (3,)


def tiny():
    return GPTConfig(block_size=32, vocab_size=512, n_layer=2, n_head=2, n_embd=64)


def logits_relative_error(backend, state, x, y):
    """The same weights under `backend` against fp32 (no autocast): ||logits - fp32 logits|| / ||fp32 logits||.
    An FP8 model first runs one training micro-batch (no update), so that its delayed scales
    come from this data, then evaluates."""
    reference = GPT(tiny(), make_backend("bf16"))
    reference.load_state_dict(state)
    with torch.no_grad():
        exact = reference.eval()(x, y).logits.double()
    model = GPT(tiny(), backend)
    model.load_state_dict(state, strict=False)  # the FP8 state starts as TE's: scales 1, empty history
    if backend.name != "bf16":
        with backend.autocast(model):
            model(x, y).loss.backward()
    with torch.no_grad(), backend.autocast(model):
        out = model.eval()(x, y)
    assert torch.isfinite(out.loss) and out.logits.dtype == torch.bfloat16
    return ((out.logits.double() - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("backend", ["emulated", "torch"])
@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_whole_model_fp8_logits_differ_from_fp32_by_fp8_error(recipe, backend):
    """Same weights, same tokens: FP8 logits must differ from fp32's by FP8's error, several times
    BF16's (a GEMM that skips the cast fails) and far below the logits themselves (a wrong or
    zero GEMM fails). The loss at init cannot tell: it is ~ln V whatever the GEMMs compute."""
    torch.manual_seed(0)
    state = GPT(tiny(), make_backend("bf16")).state_dict()
    data = torch.Generator().manual_seed(1)
    x = torch.randint(0, 512, (4, 32), generator=data)
    y = torch.roll(x, -1, 1)
    bf16 = logits_relative_error(make_backend("bf16"), state, x, y)
    fp8 = logits_relative_error(make_backend("fp8", backend, recipe), state, x, y)
    print(f"logits vs fp32 ({backend}, {recipe}): bf16 {bf16:.4f}, fp8 {fp8:.4f}")
    assert bf16 < 0.008                 # bf16: 8 significant bits
    assert 0.02 < fp8 < 0.12, fp8       # E4M3: 4 significant bits (measured 0.049)


def test_every_gemm_is_fp8_including_the_lm_head():
    model = GPT(tiny(), make_backend("fp8", "emulated"))
    names = [n for n, _ in fp8_layers(model)]
    assert len(names) == 4 * 2 + 1 and "lm_head" in names


def test_checkpoints_move_between_backends():
    torch.manual_seed(0)
    bf16 = GPT(tiny(), make_backend("bf16"))
    fp8 = GPT(tiny(), make_backend("fp8", "emulated"))
    sd = fp8.state_dict()
    assert {k for k in sd if "fp8_" in k} and isinstance(fp8.transformer.h[0].attn.c_attn, LayerNormLinear)
    missing, unexpected = bf16.load_state_dict(sd, strict=False)
    assert missing == [] and all(".fp8_" in k for k in unexpected)
    fp8.load_state_dict({**sd, **bf16.state_dict()})


def test_backend_choice():
    assert make_backend("bf16").name == "bf16"
    assert make_backend("fp8", "emulated").name == "emulated"
    assert make_backend("fp8", "torch").name == "torch"
    if not te_available()[0]:
        assert make_backend("fp8", "auto").name == "emulated"
        with pytest.raises(RuntimeError, match="Transformer Engine"):
            make_backend("fp8", "te")
    for bad in [dict(precision="fp16"), dict(precision="fp8", fp8_backend="x"), dict(precision="fp8", fp8_recipe="y"),
                dict(precision="fp8", fp8_amax_compute_algo="z")]:
        with pytest.raises(ValueError):
            make_backend(**bad)


# Each role's unique global maximum on one rank, so that MAX (7, 2, 11) differs from SUM (10, 2.5, 16)
# and MEAN (5, 1.25, 8); with the input scale at 200 (clipping above 2.24) rank 0 clips 2 input
# elements and rank 1 clips 3: summed 5, any rank 1 tensor.
LOCAL_AMAX = {0: (7.0, 0.5, 11.0), 1: (3.0, 2.0, 5.0)}
LOCAL_CLIPPED = {0: (7.0, 6.0), 1: (3.0, 2.9, 2.8)}


def _amax_worker(rank, port, results):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        layer = delayed_linear(4)
        a_x, a_w, a_g = LOCAL_AMAX[rank]
        x, g = torch.rand(8, 64), torch.rand(8, 64) - 0.5  # below every planted value
        x.view(-1)[:len(LOCAL_CLIPPED[rank])] = torch.tensor(LOCAL_CLIPPED[rank])
        g[3, 5] = -a_g
        with torch.no_grad():
            layer.weight.clamp_(-0.1, 0.1)[2, 7] = -a_w

        def micro_batch():
            layer.fp8_scale.copy_(torch.tensor([200.0, 1.0, 1.0]))
            layer(x).backward(g)

        micro_batch()
        results[rank, "telemetry"] = fp8_telemetry(layer)
        update_fp8_scales(layer)
        results[rank, "history"], results[rank, "scale"] = layer.fp8_amax_history.tolist(), layer.fp8_scale.tolist()
        micro_batch()
        update_fp8_scales(layer)  # counts the clipped input of this micro-batch ...
        micro_batch()             # ... and telemetry that of the one still pending
        results[rank, "telemetry2"] = fp8_telemetry(layer)
    finally:
        torch.distributed.destroy_process_group()


def test_amax_is_max_reduced_across_data_parallel_ranks():
    """Two gloo ranks: every role's amax in the history and in telemetry is exactly the max of the
    local ones, the saturated elements are summed, and a clipped tensor is counted once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_amax_worker, args=(port, results), nprocs=2)
    expected = [max(a) for a in zip(*LOCAL_AMAX.values())]
    assert expected == [7.0, 2.0, 11.0]
    for rank in (0, 1):
        assert results[rank, "history"][0] == expected and results[rank, "history"][1:] == [[0.0] * 3] * 3
        assert results[rank, "scale"] == (torch.tensor([448.0, 448.0, 57344.0]) / torch.tensor(expected)).tolist()
        tel = results[rank, "telemetry"]
        assert list(tel["fp8_amax"][""].values()) == expected
        assert tel["fp8_saturated"][""] == {"input": 5, "weight": 0, "grad_output": 0}
        assert tel["fp8_saturated_total"] == 5 and tel["fp8_saturated_tensors"] == 1
        tel2 = results[rank, "telemetry2"]
        assert tel2["fp8_saturated_total"] == 10 and tel2["fp8_saturated_tensors"] == 2


# ---- the fast emulation: same FP8 operands as before, same numerics as TE's kernels ----

def reference_quantize(x, scale, dtype):
    """The emulation's quantize() before it was fused (three passes): the oracle that the
    faster version must match bit for bit."""
    limit = torch.finfo(dtype).max
    amax = torch.linalg.vector_norm(x.detach(), float("inf")).float()
    y = x.to(torch.float32, copy=True).mul_(scale)
    saturated = torch.count_nonzero(y.abs() > limit) if bool(amax * scale > limit) else torch.tensor(0)
    if bool(amax * scale > limit):
        y.clamp_(-limit, limit)
    return y.to(dtype), saturated


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16])
def test_quantized_operands_are_bit_identical_to_the_reference(dtype, src):
    torch.manual_seed(0)
    x = torch.randn(257, 96) * torch.logspace(-6, 3, 96)  # subnormal to saturating magnitudes
    x[3, 5], x[7, 9] = 1e5, -3e4
    x = x.to(src)
    for scale in [torch.tensor(1.0), torch.tensor(0.37), torch.tensor(3.3e-3), fp8_max_over(x, dtype)]:
        q, n = quantize(x, scale, dtype)
        q_ref, n_ref = reference_quantize(x, scale, dtype)
        assert q.dtype == dtype and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
        assert n.item() == n_ref.item()


def fp8_max_over(x, dtype):
    return torch.finfo(dtype).max / x.float().abs().max()


def test_gemm_runs_on_the_fp8_values_with_one_rounding():
    """bf16 GEMM of the raw FP8 values, scales applied to the fp32 accumulator: equal to the
    float64 product of the dequantized operands, rounded once to bf16 (up to fp32 rounding
    of the accumulator, i.e. nearly always exactly)."""
    torch.manual_seed(0)
    a = (torch.randn(64, 128) * 30).to(E4M3)
    b = (torch.randn(128, 48) * 30).to(E4M3)
    sa, sb, bias = torch.tensor(0.013), torch.tensor(7.1), torch.randn(48).to(torch.bfloat16)
    out = EmulatedGemm.mm(a, b, sa, sb, torch.bfloat16, bias)
    exact = (a.double() * sa.double()) @ (b.double() * sb.double()) + bias.double()
    assert out.dtype == torch.bfloat16
    assert (out != exact.to(torch.bfloat16)).float().mean() < 1e-3
    assert ((out.double() - exact).abs() <= exact.abs() * 2.0 ** -8 + 1e-30).all()  # within bf16 rounding
    # the fp32 path (no autocast) keeps fp32
    out32 = EmulatedGemm.mm(a, b, sa, sb, torch.float32)
    assert out32.dtype == torch.float32 and torch.allclose(out32.double(), exact - bias.double(), rtol=1e-5, atol=1e-3)


def test_amax_skips_nan_like_te():
    x = torch.tensor([1.0, float("nan"), -3.0, 2.0])
    assert amax_of(x).item() == 3.0
    assert amax_of(torch.tensor([1.0, float("inf"), float("nan")])).item() == float("inf")
    assert amax_of(torch.tensor([0.5, float("nan"), -0.25])).item() == 0.5  # a NaN counts as nothing, not 1
    assert amax_of(torch.tensor([-4.0, 1.0, 3.0])).item() == 4.0 and amax_of(torch.tensor([-0.0])).item() == 0.0
    layer = delayed_linear(4)
    for _ in range(2):
        train_step(layer, torch.randn(8, 64))
    poisoned = torch.randn(8, 64)
    poisoned[0, 0] = float("nan")
    train_step(layer, poisoned)
    update_fp8_scales(layer)
    assert torch.isfinite(layer.fp8_amax_history).all()
    assert layer.fp8_scale[0].item() == pytest.approx(448.0 / layer.fp8_amax_history[:, 0].max().item())


# ---- the scaling update: known answers from Transformer Engine's definition ----
# transformer_engine/common/recipe/delayed_scaling.cu (kernel_bulk, after the amax reduction) and
# recipe/__init__.py: a role whose newest amax is 0 is neither rolled nor rescaled; otherwise the
# newest amax joins the history (TE keeps amax_history_len rows) and scale = (fp8_max / 2^margin) / a,
# a = max over the history ('max') or the newest amax ('most_recent'); a zero or non-finite a keeps
# the previous scale, and a scale that overflows fp32 becomes fp32's maximum. HYBRID: E4M3 (448)
# for input and weight, E5M2 (57344) for the output gradient. Our recipe has margin 0. Our history
# lists the newest amax first (TE's ring puts it last).

F32_MAX = torch.finfo(torch.float32).max
INF = float("inf")
# input amax pushed at each step -> (history newest first, scale 'max', scale 'most_recent'), H = 4
INPUT_STEPS = [
    (2.0, [2, 0, 0, 0], 224.0, 224.0),
    (8.0, [8, 2, 0, 0], 56.0, 56.0),
    (1.0, [1, 8, 2, 0], 56.0, 448.0),
    (0.0, [1, 8, 2, 0], 56.0, 448.0),            # no data: not rolled, scale kept
    (0.5, [0.5, 1, 8, 2], 56.0, 896.0),
    (0.5, [0.5, 0.5, 1, 8], 56.0, 896.0),
    (0.25, [0.25, 0.5, 0.5, 1], 448.0, 1792.0),  # the 8 has left the 4-step window
    (INF, [INF, 0.25, 0.5, 0.5], 448.0, 1792.0),  # non-finite: pushed, scale kept ...
    (1.0, [1, INF, 0.25, 0.5], 448.0, 448.0),
    (1.0, [1, 1, INF, 0.25], 448.0, 448.0),
    (1.0, [1, 1, 1, INF], 448.0, 448.0),
    (3.0, [3, 1, 1, 1], 448.0 / 3, 448.0 / 3),  # ... until it leaves the window; fp32 division
    (1e-38, [1e-38, 3, 1, 1], 448.0 / 3, F32_MAX),  # 448 / 1e-38 overflows fp32
]


@pytest.mark.parametrize("algo", ["max", "most_recent"])
def test_delayed_scaling_update_known_answers(algo):
    torch.manual_seed(0)
    layer = FP8Linear(16, 16, bias=False, recipe="delayed", history_len=4, compute_algo=algo)
    grad_amax = [2.0 ** -10, 1.0, 0.0, 4.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    grad_scale = {"max": [57344.0 * 1024, 57344.0, 57344.0] + [57344.0 / 4] * 4 + [57344.0 * 2] * 6,
                  "most_recent": [57344.0 * 1024, 57344.0, 57344.0, 57344.0 / 4] + [57344.0 * 2] * 9}[algo]
    for step, ((a, history, scale_max, scale_recent), g) in enumerate(zip(INPUT_STEPS, grad_amax)):
        layer.fp8_amax_pending.copy_(torch.tensor([a, 0.25, g]))
        update_fp8_scales(layer)
        scale = layer.fp8_scale.tolist()
        assert layer.fp8_amax_history[:, 0].tolist() == torch.tensor(history, dtype=torch.float32).tolist(), step
        assert scale[0] == torch.tensor(scale_max if algo == "max" else scale_recent, dtype=torch.float32).item(), step
        assert scale[1] == 1792.0 and scale[2] == grad_scale[step], step  # E4M3 weight, E5M2 gradient
        assert layer.fp8_amax_pending.tolist() == [0.0, 0.0, 0.0]


def test_current_scaling_known_answers():
    """Float8CurrentScaling (recipe/current_scaling.cu, compute_scale_from_amax): the scale comes
    from the tensor's own amax, fp8_max / amax; 1 for a zero or non-finite amax; fp32's maximum
    when the division overflows. No history or scale state moves."""
    layer = FP8Linear(16, 16, bias=False, recipe="current", history_len=4, compute_algo="max")
    for role, amax, expected in [(0, 2.0, 224.0), (1, 3.0, 448.0 / 3), (2, 2.0, 28672.0), (0, 0.0, 1.0),
                                 (2, INF, 1.0), (0, 1e-38, F32_MAX), (2, 1e-38, F32_MAX)]:
        _, _, _, scale = cast_to_fp8(torch.tensor([amax]), None, role, ROLE_DTYPES[role], current_scaling=True)
        assert scale.item() == torch.tensor(expected, dtype=torch.float32).item(), (role, amax)
    backend = make_backend("fp8", "emulated", "current")
    x = torch.randn(16, 16) * 3
    for _ in range(2):
        with backend.autocast(layer):
            layer(x).float().sum().backward()
    assert layer.fp8_scale.tolist() == [1.0] * 3 and not layer.fp8_amax_history.any()
    q, amax, _, _ = cast_to_fp8(x, None, 0, E4M3, current_scaling=True)
    assert amax == amax_of(x) and q.float().abs().max().item() == 448.0  # the amax lands on the format's max


def test_fp8_layers_return_the_autocast_dtype():
    """Under CUDA autocast layer_norm returns fp32; the FP8 layer must still return the
    autocast dtype. An fp32 input under CPU autocast reproduces that case."""
    layer = delayed_linear(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(16, 64)).dtype == torch.bfloat16
    assert layer(torch.randn(16, 64)).dtype == torch.float32


def test_telemetry_reports_the_micro_batch_just_run():
    layer = delayed_linear(4)
    for scale in (1.0, 10.0):
        x = torch.randn(8, 64) * scale
        train_step(layer, x)
        amax = fp8_telemetry(layer)["fp8_amax"][""]
        assert amax["input"] == pytest.approx(x.abs().max().item())
        assert amax["weight"] == pytest.approx(layer.weight.abs().max().item())


def lost_in_cast(x, scale, dtype):
    """The oracle of fp8_quant_error for one tensor, from torch's own float8 conversion:
    (||Q(x) - x||^2, ||x||^2, nonzero elements flushed to 0, nonzero elements, saturated, elements)."""
    x = x.detach().float()
    limit = torch.finfo(dtype).max
    q = (x * scale).clamp(-limit, limit).to(dtype).float()
    return [((q / scale - x) ** 2).sum().item(), (x ** 2).sum().item(), ((x != 0) & (q == 0)).sum().item(),
            (x != 0).sum().item(), ((x * scale).abs() > limit).sum().item(), x.numel()]


@pytest.mark.parametrize("gemm", [EmulatedGemm, ScaledMMGemmInFP32])
def test_quant_error_of_a_measured_step_is_what_each_cast_loses(gemm):
    torch.manual_seed(0)
    micro_batches = MicroBatches()
    layer = FP8Linear(64, 32, bias=False, recipe="delayed", history_len=4, compute_algo="max", gemm=gemm,
                      micro_batches=micro_batches)
    # an input with an outlier: the scale that fits it flushes the small values to zero
    x = torch.randn(16, 64)
    x = x.sign() * (0.5 + x.abs())  # nothing near zero but what is put there
    x[0, 0], x[1, :8] = 300.0, 1e-4
    for step, measured in enumerate((False, False, True)):
        micro_batches.enter(None, measured)
        update_fp8_scales(layer)
        scales = layer.fp8_scale.clone()
        y = layer(x * (1 + step))  # each step a new amax: the input saturates
        y.retain_grad()
        (y ** 2).sum().backward()
        if not measured:
            assert layer.fp8_quant_error is None and fp8_quant_error(layer) == {}  # nothing measured, nothing kept
    got = fp8_quant_error(layer)["fp8_quant_error"][""]
    assert layer.fp8_quant_error is None and fp8_quant_error(layer) == {}  # read once, then cleared
    for role, (tensor, dtype) in zip(("input", "weight", "grad_output"), ((x * 3, E4M3), (layer.weight, E4M3),
                                                                        (y.grad, E5M2))):
        error_sq, x_sq, flushed, nonzero, saturated, elements = lost_in_cast(tensor, scales[ROLES.index(role)], dtype)
        assert got[role]["rel_error"] == pytest.approx(math.sqrt(error_sq / x_sq), rel=1e-5)
        assert got[role]["flushed"] == pytest.approx(flushed / nonzero) and got[role]["saturated"] == saturated / elements
    assert got["input"]["saturated"] == 1 / (16 * 64)  # the outlier, 900 against a scale that fits 600
    assert got["input"]["flushed"] == pytest.approx(8 / (16 * 64))  # the 1e-4s, below E4M3's grid at that scale
    assert got["weight"]["saturated"] == 0 and got["weight"]["rel_error"] < 0.05


def test_evaluation_forwards_are_never_measured():
    micro_batches = MicroBatches()
    layer = FP8Linear(64, 32, recipe="delayed", history_len=4, compute_algo="max", micro_batches=micro_batches)
    with torch.no_grad():  # train.py's evaluations and act_stats forwards
        micro_batches.enter(None, True)
        layer(torch.randn(8, 64))
    micro_batches.enter(None, True)
    layer.eval()
    layer(torch.randn(8, 64))
    assert layer.fp8_quant_error is None and fp8_quant_error(layer) == {}


# ---- fp8_backend='torch': real FP8 GEMMs through torch._scaled_mm ----

def test_scaled_mm_rules_are_enforced_on_every_device():
    a, b = torch.zeros(32, 64).to(E4M3), torch.zeros(48, 64).to(E4M3).t()  # row-major @ column-major
    one = torch.tensor(1.0)
    assert scaled_mm_error(a, b, one, one) is None
    bad = [((a, b.contiguous(), one, one), "column-major"), ((a.t().contiguous().t(), b, one, one), "row-major"),
           ((a[:, :40], b[:40], one, one), "multiples of 16"), ((a, b[:, :40], one, one), "multiples of 16"),
           ((a.to(E5M2), b.to(E5M2), one, one), "E5M2 x E5M2"), ((a, b, one.double(), one), "fp32"),
           ((a, b, torch.ones(2), one), "single-element")]
    for args, why in bad:
        assert why in scaled_mm_error(*args)
        for gemm in (ScaledMMGemm, ScaledMMGemmInFP32):  # the fp32 path refuses what the kernel would
            with pytest.raises(ValueError, match=why):
                gemm.mm(*args, torch.bfloat16)
    # E5M2 x E4M3 (dgrad, wgrad) runs; the first operand may be E5M2
    assert ScaledMMGemm.mm(a.to(E5M2), b, one, one, torch.bfloat16).shape == (32, 48)


def test_scaled_mm_gemm_agrees_with_the_emulation():
    torch.manual_seed(0)
    a, b = (torch.randn(64, 128) * 20).to(E5M2), (torch.randn(48, 128) * 20).to(E4M3).t()
    sa, sb, bias = torch.tensor(0.021), torch.tensor(3.7), torch.randn(48).to(torch.bfloat16)
    emulated = EmulatedGemm.mm(a, b, sa, sb, torch.bfloat16, bias)
    real = ScaledMMGemm.mm(*ScaledMMGemm.operands(a, b), sa, sb, torch.bfloat16, bias)
    in_fp32 = ScaledMMGemmInFP32.mm(*ScaledMMGemm.operands(a, b), sa, sb, torch.float32, bias)
    assert real.dtype == torch.bfloat16 and in_fp32.dtype == torch.float32
    assert ((real.float() - emulated.float()).abs() <= emulated.float().abs() * 2.0 ** -8).all()
    # torch._scaled_mm's product computed in fp32: one bf16 rounding apart at most, and bf16 values
    assert torch.equal(in_fp32, in_fp32.bfloat16().float())
    assert ((real.float() - in_fp32).abs() <= in_fp32.abs() * 2.0 ** -8).all()


class RecordingGemm:
    """Wraps a backend's GEMM to keep every FP8 operand it is given (a test spy, the GEMM still runs)."""

    def __init__(self, gemm):
        self.gemm, self.operands_seen = gemm, []

    def operands(self, a, b):
        return self.gemm.operands(a, b)

    def operand_dtype(self, out_dtype):
        return self.gemm.operand_dtype(out_dtype)

    def mm(self, a, b, *rest, **kw):
        self.operands_seen.append((a.float(), b.float()))  # the exact values, FP8 or FP8-valued bf16
        return self.gemm.mm(a, b, *rest, **kw)


def tiny_run(backend_name, steps, spy=False):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny GEMMs: one thread is faster, and identical for both backends
    try:
        return _tiny_run(backend_name, steps, spy)
    finally:
        torch.set_num_threads(threads)


def _tiny_run(backend_name, steps, spy):
    torch.manual_seed(0)
    # the torch backend through torch._scaled_mm itself, which on a CPU only 'native' calls
    cpu_gemm = "native" if backend_name == "torch" else "auto"
    backend = make_backend("bf16") if backend_name == "bf16" else make_backend("fp8", backend_name, cpu_gemm=cpu_gemm)
    model = GPT(tiny(), backend)
    assert backend_name != "torch" or all(m.fp8_gemm is ScaledMMGemm for _, m in fp8_layers(model))
    spies = {}
    if spy:
        for name, m in fp8_layers(model):
            m.fp8_gemm = spies[name] = RecordingGemm(m.fp8_gemm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 64, (4, 32), generator=data)  # a small alphabet: the loss falls quickly
        with backend.autocast(model):
            out = model(x, torch.roll(x, -1, 1))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    return losses, spies


def test_torch_backend_matches_the_emulation():
    """Same model, seed and data: bit-identical FP8 operands (first step, every GEMM of
    forward and backward); loss trajectories after real optimizer steps within 1e-2 relative
    of each other over 20 steps (torch._scaled_mm's CPU kernel is slow on some CPUs: 1.3 s a
    step here on a Xeon with AMX), and the emulation's within 1e-2 of BF16's over 60."""
    _, emulated = tiny_run("emulated", 1, spy=True)
    _, real = tiny_run("torch", 1, spy=True)
    assert emulated.keys() == real.keys()
    for name in emulated:
        seen_e, seen_r = emulated[name].operands_seen, real[name].operands_seen
        assert len(seen_e) == len(seen_r) == 3  # fprop, dgrad, wgrad
        for (a_e, b_e), (a_r, b_r) in zip(seen_e, seen_r):
            assert torch.equal(a_e, a_r) and torch.equal(b_e, b_r), name
    loss_e, _ = tiny_run("emulated", 60)
    loss_r, _ = tiny_run("torch", 20)
    loss_b, _ = tiny_run("bf16", 60)
    print(f"emulated {loss_e[0]:.4f} -> {loss_e[19]:.4f} (20 steps) -> {loss_e[-1]:.4f} (60), torch {loss_r[0]:.4f} -> "
          f"{loss_r[-1]:.4f} (20), bf16 {loss_b[0]:.4f} -> {loss_b[-1]:.4f} (60)")
    assert max(loss_e[-10:]) < 4.4 < 6.0 < loss_e[0]  # from ln 512 to near ln 64, the entropy of the data
    assert loss_r[-1] < loss_r[0] - 1 and max(abs(r / e - 1) for e, r in zip(loss_e, loss_r)) < 1e-2
    assert max(abs(e / b - 1) for e, b in zip(loss_e, loss_b)) < 1e-2  # and tracks BF16 (measured 1.8e-3)


def test_auto_never_picks_the_emulation_on_an_fp8_gpu():
    te_ok, te_missing = (lambda: (True, "")), (lambda: (False, "transformer_engine not usable (ImportError)"))
    ada_old_cublas = lambda: (False, "CublasLt version 12.1.3.x or higher required for FP8 execution on Ada.")  # noqa: E731
    assert choose_fp8_backend("auto", (9, 0), te_ok) == ("te", "")
    for capability, check in [((9, 0), te_missing), ((8, 9), ada_old_cublas)]:
        backend, note = choose_fp8_backend("auto", capability, check)
        assert backend == "torch" and check()[1] in note and "\n" not in note
    assert choose_fp8_backend("auto", (8, 6), te_ok) == ("emulated", "")  # no FP8 tensor cores
    assert choose_fp8_backend("auto", None, te_ok) == ("emulated", "")    # no GPU
    assert choose_fp8_backend("torch", (9, 0), te_ok) == ("torch", "")


def test_fp8_shape_rules():
    assert fp8_shape_error(768, 50304, 16 * 1024, "te") is None
    assert "multiples of 16" in fp8_shape_error(72, 50304, 1024, "te")
    assert "multiples of 16" in fp8_shape_error(768, 50257, 1024, "torch")
    assert fp8_shape_error(768, 50304, 24, "te") is None and "multiple of 16" in fp8_shape_error(768, 50304, 24, "torch")
    assert "multiple of 8" in fp8_shape_error(768, 50304, 12, "te")


# ---- cpu_gemm: bf16 GEMMs as fp32 GEMMs on CPUs without native bf16, the same numerics ----

def test_the_gemm_path_is_chosen_once_from_the_cpu_and_can_be_forced():
    assert choose_cpu_gemm("auto", "cpu", native_bf16=True, amx=True) == ("native", "this CPU has native bf16 GEMMs on AMX")
    path, why = choose_cpu_gemm("auto", "cpu", native_bf16=True, amx=False)  # AVX512-BF16 alone: slower than fp32
    assert path == "fp32" and "(AVX512-BF16, no AMX) are slower" in why
    path, why = choose_cpu_gemm("auto", "cpu", native_bf16=False, amx=False)
    assert path == "fp32" and "no native bf16" in why
    here = torch.ops.mkldnn._is_mkldnn_bf16_supported() and torch.cpu._is_amx_tile_supported()
    assert choose_cpu_gemm("auto", "cpu")[0] == ("native" if here else "fp32")
    assert choose_cpu_gemm("native", "cpu", native_bf16=False) == ("native", "cpu_gemm=native")
    assert choose_cpu_gemm("fp32", "cpu", native_bf16=True) == ("fp32", "cpu_gemm=fp32")
    assert choose_cpu_gemm("fp32", "cuda")[0] == "native"  # a GPU runs its own kernels
    with pytest.raises(ValueError, match="cpu_gemm must be one of auto, native, fp32"):
        choose_cpu_gemm("bf16")
    for precision, fp8_backend in (("bf16", "auto"), ("fp8", "emulated"), ("fp8", "torch")):
        for path in ("native", "fp32"):
            backend = make_backend(precision, fp8_backend, cpu_gemm=path)
            assert (backend.cpu_gemm, backend.cpu_gemm_why) == (path, f"cpu_gemm={path}")
            layers = [backend.Linear(16, 16), backend.LayerNormLinear(16, 16)]
            if precision == "bf16":
                assert [m.cpu_gemm for m in layers] == [path, path]
            else:  # the GEMM follows the path: torch._scaled_mm itself only when 'native'
                expected = {("torch", "native"): ScaledMMGemm, ("torch", "fp32"): ScaledMMGemmInFP32,
                            ("emulated", "native"): EmulatedGemm, ("emulated", "fp32"): EmulatedGemmInFP32}
                assert [m.fp8_gemm for m in layers] == [expected[fp8_backend, path]] * 2
    # auto: bf16 GEMMs as the CPU allows; FP8 ones never through torch's CPU _scaled_mm kernel, and the run says so
    torch_auto = make_backend("fp8", "torch")
    assert torch_auto.Linear(16, 16).fp8_gemm is ScaledMMGemmInFP32 and torch_auto.cpu_gemm == choose_cpu_gemm()[0]
    assert torch_auto.cpu_gemm_why == choose_cpu_gemm()[1] + ("; FP8 GEMMs as fp32 GEMMs on their float8 values "
                                                              "(--cpu_gemm=native calls torch._scaled_mm)")
    assert make_backend("fp8", "torch", device_type="cuda").Linear(16, 16).fp8_gemm is ScaledMMGemm


def bf16_ulp(t):
    """The spacing of bf16 numbers at |t| (8 significant bits), elementwise, in float64."""
    mantissa, exponent = torch.frexp(t.double().abs())
    return torch.ldexp(torch.ones_like(mantissa), exponent - 8)


def assert_one_bf16_rounding_apart(native, fp32, a, b, name, bias=None):
    """native and fp32 are two roundings to bf16 of the product a @ b (+ bias) accumulated in fp32
    in two orders: at most one bf16 step apart, plus what fp32 accumulation can move the value
    before its rounding ((K + 8) u (|a| @ |b| + |bias|)). A missing operand rounding or a second
    output rounding is far outside this."""
    assert native.dtype == fp32.dtype == torch.bfloat16, name
    accumulation = (a.shape[-1] + 8) * U32 * (a.double().abs() @ b.double().abs()
                                              + (0 if bias is None else bias.double().abs()))
    gap = (native.double() - fp32.double()).abs().reshape(accumulation.shape)
    top = torch.maximum(native.double().abs(), fp32.double().abs()).reshape(accumulation.shape)
    worst = (gap / (bf16_ulp(top) + 2 * accumulation).clamp_min(1e-30)).max().item()
    assert worst <= 1.0, f"{name}: {worst:.3g} x one bf16 rounding apart"
    print(f"{name}: {(gap > 0).double().mean().item():.2%} of the elements differ (by one bf16 step)")


def recording(gemm):
    """The GEMM class, recording the exact values of the operands of every product it computes."""
    seen = []

    class Recording(gemm):
        @classmethod
        def mm(cls, a, b, *rest, **kw):
            seen.append((a.float(), b.float()))
            return super().mm(a, b, *rest, **kw)
    return Recording, seen


@pytest.mark.parametrize("layer_cls", [FP8Linear, FP8LayerNormLinear], ids=["Linear", "LayerNormLinear"])
def test_fp8_layers_quantize_identically_on_both_gemm_paths(layer_cls):
    """A training step of the same FP8 layer, input and output gradient with the emulated GEMM in
    bf16 (native) and in fp32: the FP8 operands (input, weight, gradient) are the same bits, and
    the output, dx and dw are one bf16 rounding of the same products apart."""
    runs = {}
    for path, gemm in (("native", EmulatedGemm), ("fp32", EmulatedGemmInFP32)):
        gemm, seen = recording(gemm)
        runs[path] = (*fp8_linear_case(layer_cls, gemm, autocast=True), seen)
    (ln, x, g, gemm_input, scales, y, seen), (lf, xf, _, _, _, yf, seen_f) = runs["native"], runs["fp32"]
    assert len(seen) == len(seen_f) == 3  # forward, dgrad, wgrad
    for operands, operands_f in zip(seen, seen_f):
        for q, qf in zip(operands, operands_f):
            assert torch.equal(q, qf)  # the same FP8 values in bf16 and in fp32
    assert torch.equal(ln.fp8_amax_pending, lf.fp8_amax_pending) and torch.equal(ln.fp8_saturated, lf.fp8_saturated)
    sx, sw, sg = scales
    xq = cast_reference(gemm_input.reshape(-1, 64), sx, E4M3).double() / sx.double()
    wq = cast_reference(ln.weight.detach(), sw, E4M3).double() / sw.double()
    gq = cast_reference(g.reshape(-1, 32), sg, E5M2).double() / sg.double()
    assert_one_bf16_rounding_apart(y.detach(), yf.detach(), xq, wq.t(), "output", ln.bias.detach().bfloat16())
    assert_one_bf16_rounding_apart(ln.weight.grad.bfloat16(), lf.weight.grad.bfloat16(), gq.t(), xq, "dw")
    if layer_cls is FP8Linear:
        assert_one_bf16_rounding_apart(x.grad.bfloat16(), xf.grad.bfloat16(), gq, wq, "dx")
    # the bias gradient comes from the unquantized gradient, the same on both paths
    assert torch.equal(ln.bias.grad, lf.bias.grad)


@pytest.mark.parametrize("weights", ["fp32_masters", "bf16"])
@pytest.mark.parametrize("layer_cls", [Linear, LayerNormLinear], ids=["Linear", "LayerNormLinear"])
def test_bf16_layers_compute_the_same_gemms_on_both_paths(layer_cls, weights):
    """The BF16 backend's layers under bf16 autocast, forward and backward, with fp32 master weights
    (autocast rounds them to bf16) or bf16 weights (as under DeepSpeed): the fp32 path's output and
    gradients have the native path's dtypes and are one bf16 rounding of the same products apart."""
    out = {}
    for path in ("native", "fp32"):
        torch.manual_seed(0)
        layer = layer_cls(64, 48, bias=True, cpu_gemm=path)
        if weights == "bf16":
            layer.to(torch.bfloat16)
        with torch.no_grad():
            layer.bias.normal_()
        x = torch.randn(2, 24, 64) * torch.logspace(-2, 1, 64)
        x = x.to(torch.bfloat16 if weights == "bf16" else torch.float32).requires_grad_()  # bf16 under DeepSpeed
        g = (torch.randn(2, 24, 48) * torch.logspace(-6, -2, 48)).bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            gemm_input = layer.layer_norm(x) if layer_cls is LayerNormLinear else x
            y = layer(x)
        y.backward(g)
        out[path] = (layer, x, y, gemm_input.detach().bfloat16().reshape(-1, 64), g.reshape(-1, 48))
    (ln, x, y, a, g), (lf, xf, yf, af, _) = out["native"], out["fp32"]
    assert torch.equal(a, af)  # the GEMM's input: the same bf16 values
    w = ln.weight.detach().bfloat16()
    assert ln.weight.grad.dtype == lf.weight.grad.dtype == (torch.float32 if weights == "fp32_masters" else torch.bfloat16)
    assert x.grad.dtype == xf.grad.dtype == x.dtype
    assert_one_bf16_rounding_apart(y.detach(), yf.detach(), a, w.t(), "output", ln.bias.detach().bfloat16())
    assert_one_bf16_rounding_apart(ln.weight.grad.bfloat16(), lf.weight.grad.bfloat16(), g.t(), a, "dw")
    assert_one_bf16_rounding_apart(ln.bias.grad.bfloat16(), lf.bias.grad.bfloat16(), torch.ones(1, g.shape[0]), g, "db")
    if layer_cls is Linear:
        assert_one_bf16_rounding_apart(x.grad.bfloat16(), xf.grad.bfloat16(), g, w, "dx")
    # negative control: the same GEMM in fp32 without the output rounding is further apart
    exact = (a.double() @ w.double().t()).reshape(y.shape)
    assert (yf.double() - exact).abs().max() > 0 and yf.dtype == torch.bfloat16


def test_attention_products_are_the_same_on_both_paths():
    """The explicit attention's batched products (clipped softmax): bf16 in, bf16 out on both paths."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 16, 8).bfloat16(), torch.randn(2, 3, 8, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        native, fp32 = matmul(q, k, "native"), matmul(q, k, "fp32")
    for i in range(2):
        for h in range(3):
            assert_one_bf16_rounding_apart(native[i, h], fp32[i, h], q[i, h], k[i, h], "q @ k")
    assert matmul(q.float(), k.float(), "fp32").dtype == torch.float32  # outside autocast, fp32 stays fp32


# ---- Transformer Engine's saturation telemetry, against TE's update semantics ----

def te_delayed_update(meta, maxes, algo="max"):
    """Test oracle: TE's fused amax-and-scale update after the amax reduction for one meta
    (transformer_engine/common/recipe/delayed_scaling.cu, kernel_bulk), re-implemented.
    The step's amax was written to row 0; a nonzero one is rolled to the LAST row (row 0
    zeroed for the next step) and the scale is fp8_max / amax of the window; a zero amax
    leaves history and scale alone; a non-finite or zero window amax keeps the scale."""
    h, scale = meta.amax_history, meta.scale
    for i in range(h.shape[1]):
        last = h[0, i].item()
        if last == 0.0:
            continue
        window = torch.cat([h[1:, i], torch.tensor([last])])  # the H newest amaxes
        h[:, i] = torch.cat([torch.zeros(1), h[2:, i], torch.tensor([last])])
        amax = window.max().item() if algo == "max" else last
        if math.isfinite(amax) and amax > 0:
            scale[i] = min(maxes[i] / amax, torch.finfo(torch.float32).max)


class TEMetaOracle(torch.nn.Module):
    """A module holding fp8_meta laid out as a TE Linear's (scaling_fwd: input, weight, output;
    scaling_bwd: grad_output, grad_input), updated only through te_delayed_update."""

    def __init__(self, history_len):
        super().__init__()
        meta = lambda n: SimpleNamespace(scale=torch.ones(n), amax_history=torch.zeros(history_len, n))  # noqa: E731
        self.fp8_meta = {"scaling_fwd": meta(3), "scaling_bwd": meta(2)}

    def micro_batch(self, fwd_amax, bwd_amax):
        """Quantize with the current scales (returning how many roles clipped), then update."""
        used = [self.fp8_meta["scaling_fwd"].scale[0].item(), self.fp8_meta["scaling_fwd"].scale[1].item(),
                self.fp8_meta["scaling_bwd"].scale[0].item()]
        clipped = sum(a * s > m for a, s, m in zip([fwd_amax[0], fwd_amax[1], bwd_amax[0]], used, (448.0, 448.0, 57344.0)))
        for key, amax, maxes in [("scaling_fwd", fwd_amax, (448.0,) * 3), ("scaling_bwd", bwd_amax, (57344.0,) * 2)]:
            self.fp8_meta[key].amax_history[0] = torch.tensor(amax)
            te_delayed_update(self.fp8_meta[key], maxes)
        return int(clipped)


def test_emulated_saturated_tensors_count_what_te_counts():
    """fp8_saturated_tensors on the emulated backend has TE's SaturationCounter's definition: the
    (GEMM, role, micro-batch) casts whose amax times the scale they used exceeds the format's
    maximum. A recompute (activation checkpointing) casts again: elements count twice, tensors once."""
    layer, backend = delayed_linear(4), make_backend("fp8", "emulated")
    gen = torch.Generator().manual_seed(0)
    maxes = torch.tensor([448.0, 448.0, 57344.0])
    truth = counted = elements = elements_counted = 0
    for step in range(40):
        x, g = torch.randn(16, 64, generator=gen), torch.randn(16, 64, generator=gen)
        if step % 7 == 3:
            x[0, 0] = 50 * x.abs().max()  # a new input outlier
        if step % 11 == 5:
            g *= 1e4                       # a gradient spike
        g = g.bfloat16().float()  # it reaches the layer in the autocast dtype
        with backend.autocast(layer):
            scales = layer.fp8_scale.clone()
            y = layer(x)
            if step % 5 == 0:
                y = layer(x)  # the same casts again
        y.float().backward(g)
        amax = torch.stack([x.abs().max(), layer.weight.abs().max(), g.abs().max()])
        truth += int((amax * scales > maxes).sum())
        casts = 2 if step % 5 == 0 else 1
        elements += int(((x * scales[0]).abs() > 448).sum()) * casts
        elements += int(((layer.weight.detach() * scales[1]).abs() > 448).sum()) * casts  # 448 / a * a can round up
        elements += int(((g * scales[2]).abs() > 57344).sum())
        if step % 4 == 3 or step == 39:
            tel = fp8_telemetry(layer)
            counted, elements_counted = counted + tel["fp8_saturated_tensors"], elements_counted + tel["fp8_saturated_total"]
            assert (counted, elements_counted) == (truth, elements), step
    print(f"{truth} clipped tensors, {elements} clipped elements in 40 micro-batches")
    assert truth >= 8 and elements > truth


def test_te_saturation_counter_matches_te_semantics():
    """Over many micro-batches with outliers, zero-gradient steps, telemetry reads every 4
    micro-batches, the counter finds exactly the clipped tensors."""
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.ModuleDict({f"gemm{i}": TEMetaOracle(16) for i in range(3)})
    counter, truth, counted, reads = SaturationCounter(), 0, 0, 0
    for step in range(600):
        counter.step(model)  # what TransformerEngineBackend.autocast does before a training micro-batch
        for m in model.values():
            a = torch.exp(torch.randn(5, generator=gen)).tolist()
            if torch.rand(1, generator=gen).item() < 0.05:
                a[0] *= 50  # a new input outlier
            if torch.rand(1, generator=gen).item() < 0.05:
                a[3] *= 1e4  # a gradient spike
            if torch.rand(1, generator=gen).item() < 0.05:
                a[3] = 0.0  # no gradient reached this GEMM: TE does not roll
            truth += m.micro_batch(a[:3], a[3:])
        if step % 4 == 3:
            counted += counter.read(model)
            reads += 1
            assert counted == truth, step
    print(f"{truth} clipped tensors in 600 micro-batches x 3 GEMMs, {reads} reads")
    assert truth > 20 and counted == truth
    state = te_fp8_state(model)
    assert set(state) == {f"gemm{i}.{k}.{t}" for i in range(3) for k in ("scaling_fwd", "scaling_bwd")
                          for t in ("scale", "amax_history")}
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in state.values())


# ---- Transformer Engine parity: runs where TE and an FP8 GPU are (skipped elsewhere) ----

TE_OK, TE_WHY = te_available()


def assert_within_one_fp8_step(ours, te, name):
    """The same NaNs, and every finite element within one E4M3 step (2^-3 relative) of TE's, with a
    floor of one bf16 step of the largest element for sums that cancel: the FP8 operands are the
    same, only accumulation (TE's fprop accumulates in reduced precision) and rounding differ."""
    ours, te = ours.detach().float(), te.detach().float()
    assert torch.equal(ours.isnan(), te.isnan()), f"{name}: NaNs in different places"
    finite = ~te.isnan()
    if not finite.any():
        return
    tol = 2.0 ** -3 * te.abs() + 2.0 ** -8 * te[finite].abs().max()
    worst = ((ours - te).abs() / tol)[finite].max().item()
    assert worst <= 1.0, f"{name}: {worst:.3g} FP8 steps from TE"


@pytest.mark.skipif(not TE_OK, reason=f"TE parity needs Transformer Engine on an FP8 GPU: {TE_WHY}")
@pytest.mark.parametrize("ours_name", ["emulated", "torch"])
@pytest.mark.parametrize("kind", ["Linear", "LayerNormLinear"])
def test_te_parity_over_20_steps_with_spikes_and_nans(kind, ours_name):
    """te.Linear / te.LayerNormLinear (through TransformerEngineBackend, as train.py builds them) and
    our FP8 layer, given the same weights and inputs from the same (empty) amax history, for 20
    steps with a moving weight, an input and a gradient spike, and a NaN in each: after every step
    the same scales and amax histories, outputs and both gradients within one FP8 step, and the
    same count of clipped tensors. TE updates the forward scales at autocast exit and the backward
    ones at the end of backward; ours at the next autocast entry, called here after backward. TE's
    history puts the newest amax last and keeps row 0 for the next one; ours lists it first."""
    H, device = 16, "cuda"
    te_backend = make_backend("fp8", "te", "delayed", H, "max", device_type=device)
    backend = make_backend("fp8", ours_name, "delayed", H, "max", device_type=device)
    torch.manual_seed(0)
    ours = getattr(backend, kind)(64, 96, bias=True).to(device)
    te_layer = getattr(te_backend, kind)(64, 96, bias=True).to(device)
    with torch.no_grad():
        ours.bias.normal_(0.0, 0.1)
        if kind == "LayerNormLinear":
            ours.layer_norm_weight.uniform_(0.5, 1.5)
            ours.layer_norm_bias.normal_(0.0, 0.1)
    ours.to(torch.bfloat16)  # as under DeepSpeed's bf16, whose buffers train.py keeps in fp32
    keep_fp8_state_fp32(ours)
    te_layer.to(torch.bfloat16)
    te_params = dict(te_layer.named_parameters())
    assert te_params.keys() == dict(ours.named_parameters()).keys()  # TE's names
    w0 = ours.weight.detach().clone()
    gen = torch.Generator(device=device).manual_seed(1)
    exact_input = kind == "Linear"  # TE's LayerNorm kernel and torch's round differently
    te_clipped = ours_clipped = 0
    for step in range(20):
        with torch.no_grad():
            ours.weight.copy_(w0 * (1 + 0.05 * step))  # a weight amax that grows past its history
            for name, p in ours.named_parameters():
                te_params[name].copy_(p)
        x = torch.randn(32, 64, device=device, generator=gen).bfloat16()
        g = (torch.randn(32, 96, device=device, generator=gen) * 1e-3).bfloat16()
        if step == 6:
            x[3, 5] = 100 * x.abs().max()  # clips at its own step, in both
        if step == 9:
            g[7, 2] = 1000 * g.abs().max()
        if step == 12:
            x[0, 0] = float("nan")  # skipped by the amax, as in TE's kernels
        if step == 15:
            g[1, 1] = float("nan")
        x_ours, x_te = x.clone().requires_grad_(), x.clone().requires_grad_()
        with backend.autocast(ours):
            y_ours = ours(x_ours)
        with te_backend.autocast(te_layer):
            y_te = te_layer(x_te)
        y_ours.backward(g)
        y_te.backward(g)
        update_fp8_scales(ours)  # closes our step; the next entry finds nothing pending

        te_scale = torch.stack([te_layer.fp8_meta[k].scale[i] for k, i in TE_ROLE_SLOTS]).float().cpu()
        te_history = torch.stack([te_layer.fp8_meta[k].amax_history[:, i] for k, i in TE_ROLE_SLOTS], 1).float().cpu()
        scale, history = ours.fp8_scale.cpu(), ours.fp8_amax_history.cpu()
        assert not te_history[0].any() and torch.isfinite(history).all(), step
        mapped = te_history[1:].flip(0)  # TE's H - 1 newest amaxes, newest first
        if exact_input:
            assert torch.equal(history[:H - 1], mapped) and torch.equal(scale, te_scale), step
        else:
            assert torch.equal(history[:H - 1, 1:], mapped[:, 1:]) and torch.equal(scale[1:], te_scale[1:]), step
            assert torch.allclose(history[:H - 1, 0], mapped[:, 0], rtol=1e-5, atol=0), step
            assert torch.allclose(scale[0], te_scale[0], rtol=1e-5, atol=0), step
        assert_within_one_fp8_step(y_ours, y_te, f"step {step} output")
        assert_within_one_fp8_step(x_ours.grad, x_te.grad, f"step {step} dx")
        assert_within_one_fp8_step(ours.weight.grad, te_layer.weight.grad, f"step {step} dw")
        ours.zero_grad(set_to_none=True)
        te_layer.zero_grad(set_to_none=True)
        if step % 5 == 4:
            te_clipped += te_backend.telemetry(te_layer)["fp8_saturated_tensors"]
            ours_clipped += backend.telemetry(ours)["fp8_saturated_tensors"]
            if exact_input:
                assert ours_clipped == te_clipped, step
    assert te_clipped >= 2  # the spikes at least


class HostSyncCounter(TorchDispatchMode):
    """Counts what makes a GPU's host wait or copy: reading a value back (aten._local_scalar_dense:
    .item(), bool(), int()), a tensor built from Python data (aten.lift_fresh: a host-to-device
    copy on a GPU) and .tolist() (which bypasses the dispatcher, so it is patched). `ops` lists
    every ATen op seen."""

    def __enter__(self):
        self.syncs, self.ops, self._tolist = [], [], torch.Tensor.tolist
        counter = self

        def tolist(t):
            counter.syncs.append("tolist")
            return counter._tolist(t)
        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__)
        self.ops.append(name)
        if name in ("_local_scalar_dense", "lift_fresh"):
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


def micro_batch(model, backend, x, tweo=False):
    """One training micro-batch as train.py runs it: autocast entry (the scale update), forward,
    backward."""
    with backend.autocast(model):
        out = model(x, torch.roll(x, -1, 1), with_tweo=tweo)
    (out.loss + 0.01 * out.tweo_loss).backward()


@pytest.mark.parametrize("backend_name,cpu_gemm,recipe", [("torch", "native", "delayed"), ("torch", "fp32", "delayed"),
                                                          ("torch", "fp32", "current"), ("emulated", "fp32", "delayed")])
def test_a_micro_batch_and_its_scale_update_never_wait_for_the_host(backend_name, cpu_gemm, recipe):
    """No host sync in a training micro-batch (forward, TWEO, backward) and the scale update of the
    torch backend, on the code a GPU runs (the emulation too, where its GEMMs run in fp32).
    Negative control: the emulation's native bf16 GEMM takes its factor as a Python number, one
    read per GEMM, and the counter sees each of them."""
    torch.manual_seed(0)
    x = torch.randint(0, 512, (2, 32))
    counts = {}
    for name, path in ((backend_name, cpu_gemm), ("emulated", "native")):
        backend = make_backend("fp8", name, recipe, cpu_gemm=path)
        model = GPT(tiny(), backend)
        micro_batch(model, backend, x)  # the first one builds the model's stacked scaling state
        with HostSyncCounter() as counter:
            micro_batch(model, backend, x, tweo=True)
        counts[name, path] = (counter.syncs, 3 * len(fp8_layers(model)))
    syncs, _ = counts[backend_name, cpu_gemm]
    assert syncs == [], f"{backend_name} ({cpu_gemm}): {len(syncs)} host syncs: {sorted(set(syncs))}"
    syncs, gemms = counts["emulated", "native"]
    assert syncs == ["_local_scalar_dense"] * gemms  # forward, dgrad and wgrad of every FP8 layer


def test_the_scale_update_costs_the_same_ops_for_2_and_16_layers():
    """One collective's worth of data and one vectorised update for all GEMMs: the ops of a scale
    update do not grow with the number of layers (9 FP8 GEMMs against 65)."""
    ops = {}
    for n_layer in (2, 16):
        backend = make_backend("fp8", "torch", cpu_gemm="fp32")
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=32, vocab_size=512, n_layer=n_layer, n_head=2, n_embd=64), backend)
        micro_batch(model, backend, torch.randint(0, 512, (2, 32)))
        with HostSyncCounter() as counter:
            update_fp8_scales(model)
        ops[n_layer] = counter.ops
        history = torch.stack([m.fp8_amax_history for _, m in fp8_layers(model)])
        assert (history[:, 0] > 0).all() and not history[:, 1:].any()  # every layer's micro-batch pushed, once
    assert len(fp8_layers(GPT(GPTConfig(block_size=32, vocab_size=512, n_layer=16, n_head=2, n_embd=64),
                              make_backend("fp8", "emulated")))) == 65
    assert ops[2] == ops[16] and 0 < len(ops[2]) < 40, ops


def test_layers_are_views_of_one_stacked_state_that_survives_checkpoints_and_casts():
    backend = make_backend("fp8", "emulated")
    model = GPT(tiny(), backend)
    micro_batch(model, backend, torch.randint(0, 512, (2, 32)))
    update_fp8_scales(model)
    state = FP8ScalingState.of(model)
    layers = fp8_layers(model)
    for i, (_, m) in enumerate(layers):
        assert m.fp8_scale.untyped_storage().data_ptr() == state.stacked["fp8_scale"].untyped_storage().data_ptr()
        assert torch.equal(m.fp8_amax_history, state.stacked["fp8_amax_history"][i])
    # a checkpoint keeps per-layer keys and loads back into the stacked tensors
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    assert saved["lm_head.fp8_scale"].shape == (3,) and saved["lm_head.fp8_amax_history"].shape == (16, 3)
    state.stacked["fp8_scale"].fill_(7.0)
    model.load_state_dict(saved)
    assert torch.equal(state.stacked["fp8_scale"], torch.stack([saved[f"{n}.fp8_scale"] for n, _ in layers]))
    # a buffer replaced behind the state's back (a dtype or device move) rebuilds it from the buffers
    model.lm_head.fp8_scale = torch.full((3,), 2.0, dtype=torch.float32)
    assert FP8ScalingState.of(model) is not state
    assert FP8ScalingState.of(model).stacked["fp8_scale"][-1].tolist() == [2.0] * 3


@pytest.mark.parametrize("fp8_dtype", [E4M3, E5M2])
def test_rounding_to_the_fp8_grid_is_torchs_conversion(fp8_dtype):
    """round_to_fp8_grid (the compiled emulation's cast) against torch's float8 conversion on
    every 9973rd fp32 bit pattern (both signs, zeros, fp32 subnormals, every binade), a million
    values spread over 2^±40, and each midpoint between neighbouring FP8 values (the ties) with
    the fp32 values just either side of it: the same fp32 bits, -0.0 included."""
    limit = torch.finfo(fp8_dtype).max
    patterns = torch.arange(-2**31, 2**31, 9973, dtype=torch.int64).to(torch.int32).view(torch.float32)
    torch.manual_seed(0)
    spread = torch.randn(1_000_000) * torch.exp(torch.randn(1_000_000) * 9)
    grid = torch.arange(256, dtype=torch.uint8).view(fp8_dtype).float()
    grid = grid[torch.isfinite(grid)].unique()
    ties = (grid[1:] + grid[:-1]) / 2
    near = torch.cat([ties, torch.nextafter(ties, -ties.abs() - 1), torch.nextafter(ties, ties.abs() + 1)])
    assert (ties * 2 == grid[1:] + grid[:-1]).all()  # exact midpoints, so the rounding rule decides
    for name, y in {"bit patterns": patterns, "spread": spread, "ties": near}.items():
        y = y[torch.isfinite(y)].clamp(-limit, limit)
        ours, torchs = round_to_fp8_grid(y, fp8_dtype), y.to(fp8_dtype).float()
        assert torch.equal(ours.view(torch.int32), torchs.view(torch.int32)), name
    assert patterns.numel() > 400_000 and (near == 0).sum() == 0 and near.numel() > 700


@pytest.mark.parametrize("role,dtype,recipe", [(0, torch.bfloat16, "delayed"), (1, torch.float32, "delayed"),
                                               (2, torch.bfloat16, "delayed"), (0, torch.bfloat16, "current")])
def test_the_compiled_cast_gives_the_eager_bits(role, dtype, recipe):
    """cast_function(True) is torch.compile of cast_to_fp8; both, on every role's dtype and both
    recipes, on tensors with NaN, inf, zeros, values past the format's maximum and below its
    smallest subnormal: the same FP8 bits (widened to bf16 and fp32, the emulation's operands,
    by another computation when compiled), amax, saturation count and scale."""
    fp8_dtype = ROLE_DTYPES[role]
    limit = torch.finfo(fp8_dtype).max
    torch.manual_seed(role)
    special = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3 * limit, -5 * limit,
                            1e-9, -1e-9, limit, 2.0 ** -10])
    cases = {"special": torch.cat([torch.randn(4083) * 10, special]).reshape(65, 63),
             "zeros": torch.zeros(32, 16), "one NaN": torch.full((16, 16), float("nan"))}
    eager, compiled = cast_function(False), cast_function(True)
    scales = torch.tensor([0.5, 3.0, 1e-3])
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for name, x in cases.items():
            x = x.to(dtype)
            for wide in (None, torch.bfloat16, torch.float32):
                a = eager(x, scales, role, fp8_dtype, recipe == "current", wide)
                b = compiled(x, scales, role, fp8_dtype, recipe == "current", wide)
                assert a[0].dtype == b[0].dtype, (name, wide)
                if wide is None:
                    assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)), name
                else:  # a widened NaN is a NaN in the same place; any other value has the same bits
                    bits = torch.int16 if wide == torch.bfloat16 else torch.int32
                    nan = a[0].isnan()
                    assert torch.equal(nan, b[0].isnan()), (name, wide)
                    assert torch.equal(a[0][~nan].view(bits), b[0][~nan].view(bits)), (name, wide)
                for u, v in zip(a[1:], b[1:]):
                    assert torch.equal(u, v), (name, wide, u, v)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the compiled path really ran


# ---- Transformer Engine's module lifecycle: when its FP8 state exists and what writes it ----

class TEModuleOracle(torch.nn.Module):
    """Test oracle: the FP8-state lifecycle of a TE module (transformer_engine/pytorch/module/
    base.py, TE 2.4-2.18), re-implemented for the order of its calls. A new module's fp8_meta has
    no num_gemms; set_meta_tensor sizes the state from it (3 scales per GEMM forward, 2 backward:
    a KeyError before the first forward or set_extra_state), and returns early when the tensors
    are already initialised for a delayed recipe. forward (prepare_forward ->
    init_fp8_metadata(num_gemms=1)) sets the recipe and num_gemms once, then max-writes its
    casts' amaxes into row 0 of the history, under no_grad too (the cast kernels' atomicMax);
    the update (te_delayed_update) runs at autocast exit with grad enabled, here called by hand."""

    def __init__(self):
        super().__init__()
        self.fp8_meta = {"fp8_checkpoint": False}
        self.fp8_meta_tensors_initialized = self.fp8_initialized = False
        self.weight = torch.nn.Parameter(torch.randn(16, 16))

    def set_meta_tensor(self, fwd, recipe):
        key = "scaling_fwd" if fwd else "scaling_bwd"
        if self.fp8_meta_tensors_initialized and hasattr(self.fp8_meta.get(key), "amax_history"):
            return
        n = self.fp8_meta["num_gemms"] * (3 if fwd else 2)
        self.fp8_meta[key] = SimpleNamespace(scale=torch.ones(n), amax_history=torch.zeros(recipe.amax_history_len, n))

    def init_fp8_meta_tensors(self, recipe):
        self.set_meta_tensor(True, recipe)
        self.set_meta_tensor(False, recipe)
        self.fp8_meta_tensors_initialized = True

    def forward(self, x, recipe):
        if not self.fp8_initialized:
            self.fp8_meta["recipe"], self.fp8_meta["num_gemms"] = recipe, 1
            self.init_fp8_meta_tensors(recipe)
            self.fp8_initialized = True
        row = self.fp8_meta["scaling_fwd"].amax_history[0]
        row[0] = torch.maximum(row[0], x.detach().abs().max())
        row[1] = torch.maximum(row[1], self.weight.detach().abs().max())
        return x @ self.weight

    def update(self):
        te_delayed_update(self.fp8_meta["scaling_fwd"], (448.0,) * 3)


TE_RECIPE = SimpleNamespace(amax_history_len=4)  # the part of DelayedScaling the lifecycle reads


def trained_te_modules(steps=6):
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": TEModuleOracle(), "b": TEModuleOracle()})
    for step in range(steps):
        for m in model.values():
            m(torch.randn(8, 16) * (step + 1), TE_RECIPE)
            m.update()
    return model


def test_te_state_loads_into_modules_that_never_ran_a_forward():
    """A resume, bench/eval.py and sample.py put the saved TE state into modules that have not run a
    forward: it lands there, sized from the saved tensors, and their first forward keeps it."""
    state = te_fp8_state(trained_te_modules())
    with pytest.raises(KeyError):  # the oracle fails where TE fails: no num_gemms before a forward
        TEModuleOracle().init_fp8_meta_tensors(TE_RECIPE)
    fresh = torch.nn.ModuleDict({"a": TEModuleOracle(), "b": TEModuleOracle()})
    assert load_te_fp8_state(fresh, state, TE_RECIPE) == 2
    assert fresh.a.fp8_meta["num_gemms"] == 1 and fresh.a.fp8_meta["fp8_checkpoint"]  # TE's get_extra_state saves
    loaded = te_fp8_state(fresh)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    x = torch.randn(8, 16)
    fresh.a(x, TE_RECIPE)  # the first forward keeps the loaded tensors, writing only row 0
    after = te_fp8_state(fresh)
    assert torch.equal(after["a.scaling_fwd.scale"], state["a.scaling_fwd.scale"])
    assert torch.equal(after["a.scaling_fwd.amax_history"][1:], state["a.scaling_fwd.amax_history"][1:])
    assert after["a.scaling_fwd.amax_history"][0, 0] == x.abs().max()


def te_backend_around(te_autocast=contextlib.nullcontext):
    """TransformerEngineBackend's own autocast() with TE's context manager stubbed (TE cannot be
    imported here): what is under test is what the backend wraps around it."""
    backend = object.__new__(TransformerEngineBackend)
    backend.te = SimpleNamespace(autocast=lambda **kw: te_autocast())
    backend.recipe, backend.amax_reduction_group, backend.saturation = TE_RECIPE, None, SaturationCounter()
    backend.micro_batches = MicroBatches()
    return backend


def test_te_evaluation_leaves_the_scaling_state_as_it_was():
    """Under no_grad TE still writes the evaluation's amaxes into row 0 and the next training update
    would take them; the backend's evaluation autocast restores the state in place, as our other
    backends never touch it. A training micro-batch's writes stay."""
    model, backend = trained_te_modules(), te_backend_around()
    before = te_fp8_state(model)
    tensors = [id(m.fp8_meta[k].amax_history) for m in model.values() for k in ("scaling_fwd", "scaling_bwd")]
    outlier = torch.full((8, 16), 1e4)
    with torch.no_grad(), backend.autocast(model):
        model.a(outlier, TE_RECIPE)
        assert model.a.fp8_meta["scaling_fwd"].amax_history[0, 0] == 1e4  # the leak, inside
    after = te_fp8_state(model)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert tensors == [id(m.fp8_meta[k].amax_history) for m in model.values() for k in ("scaling_fwd", "scaling_bwd")]
    with backend.autocast(model):  # training: TE's own bookkeeping, untouched
        model.a(outlier, TE_RECIPE)
    assert model.a.fp8_meta["scaling_fwd"].amax_history[0, 0] == 1e4
    # a module whose first forward is an evaluation starts training from TE's initial state
    new = torch.nn.ModuleDict({"a": TEModuleOracle()})
    with torch.no_grad(), backend.autocast(new):
        new.a(outlier, TE_RECIPE)
    assert new.a.fp8_meta["scaling_fwd"].scale.tolist() == [1.0] * 3 and not new.a.fp8_meta["scaling_fwd"].amax_history.any()


def test_weights_are_cast_once_per_iteration():
    """With several micro-batches per iteration (train.py passes first_micro_batch), the first casts
    each weight and keeps it, later ones reuse the same FP8 bits without casting or recording the
    weight again (TE's is_first_microbatch: its weight amax history rolls once per iteration); the
    next iteration casts again. Without the flag every forward casts."""
    torch.manual_seed(0)
    backend = make_backend("fp8", "torch", cpu_gemm="fp32")
    model = GPT(tiny(), backend)
    layers = [m for _, m in fp8_layers(model)]
    weight_casts = []
    for m in layers:
        m.fp8_gemm = RecordingGemm(m.fp8_gemm)
        cast = m.fp8_cast
        m.fp8_cast = lambda x, scales, role, *rest, cast=cast: (weight_casts.append(role == 1), cast(x, scales, role, *rest))[1]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 512, (2, 32))

    def micro_batch(first):
        weight_casts.clear()
        for m in layers:
            m.fp8_gemm.operands_seen.clear()
        with backend.autocast(model, first_micro_batch=first):
            model(x, torch.roll(x, -1, 1)).loss.backward()
        forward_weights = [m.fp8_gemm.operands_seen[0][1] for m in layers]  # the forward GEMM's b = W^T
        return sum(weight_casts), forward_weights

    casts_1, weights_1 = micro_batch(True)
    casts_2, weights_2 = micro_batch(False)
    update_fp8_scales(model)
    assert casts_1 == len(layers) and casts_2 == 0
    assert all(torch.equal(a, b) for a, b in zip(weights_1, weights_2))
    history = torch.stack([m.fp8_amax_history for m in layers])
    assert (history[:, :2, 0] > 0).all() and (history[:, 0, 1] > 0).all() and not history[:, 1, 1].any()
    optimizer.step()
    casts_3, weights_3 = micro_batch(True)  # a new iteration: the stepped weights are cast again
    assert casts_3 == len(layers) and not torch.equal(weights_3[0], weights_1[0])
    assert micro_batch(None)[0] == micro_batch(None)[0] == len(layers)
    with torch.no_grad(), backend.autocast(model, first_micro_batch=False):  # evaluation never reuses
        weight_casts.clear()
        model.eval()(x, x)
    assert sum(weight_casts) == len(layers)


def test_te_layers_get_is_first_microbatch_from_the_backend():
    class FakeTELinear(torch.nn.Module):  # TE's forward signature: forward(inp, is_first_microbatch=None, ...)
        def forward(self, inp, is_first_microbatch=None):
            return is_first_microbatch

    micro_batches = MicroBatches()
    layer = _te_layer(FakeTELinear, micro_batches)()
    seen = []
    for first in (True, False, None):
        micro_batches.enter(first)
        seen.append(layer(torch.zeros(1)))
    assert seen == [True, False, None] and layer(torch.zeros(1), is_first_microbatch=True) is True
    assert layer.get_extra_state().numel() == 0 and layer.set_extra_state(torch.ones(3)) is None
