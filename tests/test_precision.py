"""precision.py: the emulated FP8 numerics (E4M3/E5M2, delayed and current scaling),
the backend choice, and state that moves between backends."""
import socket

import pytest
import torch
import torch.multiprocessing as mp

from model import GPT, GPTConfig
from precision import (E4M3, FP8Linear, LayerNormLinear, dequantize, fp8_layers, fp8_telemetry, make_backend, quantize,
                       te_available, update_fp8_scales)


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


def test_fp8_linear_gradients_are_close_to_exact():
    torch.manual_seed(0)
    layer = FP8Linear(64, 32, bias=True, recipe="current", history_len=16, compute_algo="max")
    ref = torch.nn.Linear(64, 32)
    ref.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("fp8_")})
    x1 = torch.randn(16, 64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    layer(x1).pow(2).sum().backward()
    ref(x2).pow(2).sum().backward()
    for a, b in [(x1.grad, x2.grad), (layer.weight.grad, ref.weight.grad), (layer.bias.grad, ref.bias.grad)]:
        assert ((a - b).norm() / b.norm()).item() < 0.1  # FP8-level error, not a wrong formula


def tiny():
    return GPTConfig(block_size=32, vocab_size=512, n_layer=2, n_head=2, n_embd=64)


@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_whole_model_runs_in_emulated_fp8_near_bf16_loss(recipe):
    losses = {}
    for name, backend in [("bf16", make_backend("bf16")), ("fp8", make_backend("fp8", "emulated", recipe))]:
        torch.manual_seed(0)
        model = GPT(tiny(), backend)
        x, y = torch.randint(0, 512, (4, 32)), torch.randint(0, 512, (4, 32))
        for _ in range(2):  # the second step runs with scales from the first
            with backend.autocast(model):
                out = model(x, y, with_tweo=True)
            (out.loss + 0.01 * out.tweo_loss).backward()
        losses[name] = out.loss.item()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
    print(f"loss at init ({recipe}): bf16 {losses['bf16']:.4f}, emulated fp8 {losses['fp8']:.4f}")
    assert abs(losses["fp8"] / losses["bf16"] - 1) < 0.03


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
    if not te_available()[0]:
        assert make_backend("fp8", "auto").name == "emulated"
        with pytest.raises(RuntimeError, match="Transformer Engine"):
            make_backend("fp8", "te")
    for bad in [dict(precision="fp16"), dict(precision="fp8", fp8_backend="x"), dict(precision="fp8", fp8_recipe="y"),
                dict(precision="fp8", fp8_amax_compute_algo="z")]:
        with pytest.raises(ValueError):
            make_backend(**bad)


def _amax_worker(rank, port, results):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    layer = delayed_linear(4)
    x = torch.randn(8, 64) * (1.0 if rank == 0 else 5.0)
    x[0, 0] = 7.0 if rank == 0 else 3.0
    train_step(layer, x)
    update_fp8_scales(layer)
    results[rank] = layer.fp8_amax_history[0].tolist()
    torch.distributed.destroy_process_group()


def test_amax_is_max_reduced_across_data_parallel_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_amax_worker, args=(port, results), nprocs=2)
    assert results[0] == results[1]
    assert results[0][0] >= 7.0  # rank 0's outlier reached rank 1's history
