"""model.py: sizes, FLOPs, the TWEO term (value, gradient, memory), causality, the loss, forward outputs, activation checkpointing, generation, Hugging Face GPT-2 parity and loading."""
import json
import math
import os
import runpy
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bench.throughput import cpu_peak_bytes
from conftest import REPO
from precision import fp8_layers, make_backend
from model import GPT, GPTConfig, TWEOPenalty, activation_moments, clipped_softmax_attention, outlier_stats, record_activations, summarize_moments, tweo_penalty

PAPER_SIZES = {"124m": 124e6, "medium": 355e6, "large": 774e6, "xl": 1.56e9, "3b": 2.65e9, "7b": 6.65e9}


def tiny_config(**kw):
    args = dict(block_size=32, vocab_size=256, n_layer=2, n_head=2, n_embd=32)
    args.update(kw)
    return GPTConfig(**args)


@pytest.mark.parametrize("size", PAPER_SIZES)
def test_parameter_counts_match_the_paper(size):
    cfg = runpy.run_path(os.path.join(REPO, "configs", f"gpt2_{size}_fp8_tweo.py"))
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"]))
    n = model.get_num_params(non_embedding=False)
    assert abs(n / PAPER_SIZES[size] - 1) < 0.02, f"{size}: {n / 1e6:.1f}M"
    assert cfg["precision"] == "fp8" and cfg["tweo_lambda"] == 0.01


def test_tweo_value_equals_the_formula_on_a_hand_made_tensor():
    a = torch.tensor([[0.0, 3.0, -6.0], [1.5, -3.0, 30.0]])
    tau, eps = 3.0, 1e-6
    expected = sum((abs(v) / (tau + eps)) ** 4 for v in a.flatten().tolist()) / 6
    assert tweo_penalty(a, tau, 4.0, eps).item() == pytest.approx(expected, rel=1e-6)
    # 30 = 10 tau contributes 10^4: the soft threshold of Sec. 3.3
    assert expected == pytest.approx((0 + 1 + 16 + 1 / 16 + 1 + 1e4) / 6, rel=1e-5)
    # the defaults are the paper's tau = 3, p = 4, eps = 1e-6, eps included exactly (float64)
    a = torch.tensor([3.0, -1.5], dtype=torch.float64)
    assert tweo_penalty(a).item() == pytest.approx((1 + 1 / 16) / 2 * (3 / (3 + 1e-6)) ** 4, rel=1e-12)


@pytest.mark.parametrize("p", [4.0, 3.0, 2.5, 1.0])
def test_tweo_gradient_equals_autograd_on_the_naive_formula(p):
    torch.manual_seed(0)
    a = torch.randn(4, 16, 32, dtype=torch.float64) * 2
    a[0, 3, 5] = 40.0  # an outlier
    a1 = a.clone().requires_grad_()
    a2 = a.clone().requires_grad_()
    tau, eps = 3.0, 1e-6
    naive = ((a1.abs() / (tau + eps)) ** p).mean()
    naive.backward()
    ours = tweo_penalty(a2, tau, p, eps)
    ours.backward()
    assert ours.item() == pytest.approx(naive.item(), rel=1e-10)
    rel = ((a1.grad - a2.grad).norm() / a1.grad.norm()).item()
    assert rel < 1e-6, rel
    assert torch.autograd.gradcheck(lambda t: TWEOPenalty.apply(t, tau, p, eps), (a[:1, :2].clone().requires_grad_(),))


@pytest.mark.parametrize("p", [4.0, 2.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_tweo_term_equals_the_eager_one(p, dtype):
    """compile=True (train.py's default) runs the term's forward and backward as one fused pass
    each: the same value and gradient as the eager kernels, up to fp32 rounding (one bf16 step
    of a bf16 gradient), the subgradient 0 at 0 for p <= 1 included."""
    torch.manual_seed(0)
    a = torch.randn(4, 16, 32) * 2
    a[0, 3, 5], a[1, 2, :4] = 40.0, 0.0  # an outlier and exact zeros
    a = a.to(dtype)
    grads, values = [], []
    for compiled in (False, True):
        t = a.clone().requires_grad_()
        v = tweo_penalty(t, 3.0, p, 1e-6, compiled)
        v.backward()
        values.append(v.item())
        grads.append(t.grad.float())
    assert values[1] == pytest.approx(values[0], rel=1e-5)
    step = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-5
    assert ((grads[1] - grads[0]).abs() <= step * grads[0].abs()).all()
    if p <= 1:
        assert (grads[1][1, 2, :4] == 0).all()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the compiled kernels really ran


def test_tweo_is_fp32_under_bf16_autocast():
    a = (torch.randn(64, 64) * 3).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = tweo_penalty(a)
    assert v.dtype == torch.float32
    assert v.item() == pytest.approx(((a.float().abs() / 3) ** 4).mean().item(), rel=1e-4)


def test_lambda_zero_computes_no_tweo(monkeypatch):
    calls = []
    monkeypatch.setattr(TWEOPenalty, "apply", lambda *a: calls.append(1) or torch.tensor(1.0))
    model = GPT(tiny_config())
    x = torch.randint(0, 256, (2, 32))
    out = model(x, x, with_tweo=False)
    assert calls == [] and out.tweo_loss.item() == 0.0
    model(x, x, with_tweo=True)
    assert len(calls) == model.config.n_layer


def test_forward_outputs_and_act_max():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    x, y = torch.randint(0, 256, (3, 32)), torch.randint(0, 256, (3, 32))
    block_out = []
    hooks = [b.register_forward_hook(lambda m, i, o: block_out.append(o.detach())) for b in model.transformer.h]
    out = model(x, y, with_tweo=True)
    for h in hooks:
        h.remove()
    assert out.logits.shape == (3, 32, 256)
    assert out.loss.item() == pytest.approx(math.log(256), rel=0.05)  # near-uniform at init
    assert torch.allclose(out.act_max, torch.stack([a.abs().max() for a in block_out]))
    expected = sum(((a.abs() / (3 + 1e-6)) ** 4).mean() for a in block_out) / len(block_out)
    assert out.tweo_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert model(x).logits.shape == (3, 1, 256)


def test_gpt2_initialisation_and_tied_head():
    torch.manual_seed(0)
    cfg = tiny_config(n_layer=8, n_embd=128, n_head=4)
    model = GPT(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.transformer.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.h[0].mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.h[0].mlp.c_fc.bias.abs().max().item() == 0


def test_flops_per_token_of_gpt2_124m_by_hand():
    """6N + 12 L T d (PaLM's appendix B, as nanoGPT), N the parameters that take part in a GEMM
    or LayerNorm: the tied wte/LM head once, wpe not."""
    cfg = runpy.run_path(os.path.join(REPO, "configs", "gpt2_124m_bf16.py"))
    with torch.device("meta"):  # block_size and vocab_size: the defaults (train.py's and the model's)
        model = GPT(GPTConfig(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"]))
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (12, 12, 768, 1024, 50304)
    ln = 2 * 768
    attn = ln + (768 * 2304 + 2304) + (768 * 768 + 768)     # ln_1, QKV, out projection
    mlp = ln + (768 * 3072 + 3072) + (3072 * 768 + 768)     # ln_2, fc, fc projection
    assert attn + mlp == 7_087_872
    n = 50304 * 768 + 12 * (attn + mlp) + ln                 # wte (= LM head), 12 blocks, ln_f
    assert n == 123_689_472 == model.get_num_params()
    attention = 12 * 12 * 1024 * 768                         # QK^T and AV: 2 x 2 T d per layer forward, x3 with backward
    assert model.flops_per_token() == 6 * n + attention == 855_383_040
    assert model.get_num_params(non_embedding=False) == n + 1024 * 768


# ---- causality, the task loss, the TWEO term in the model, and Hugging Face as an oracle ----

ATTENTION_PATHS = {"sdpa": {}, "attn_bias": dict(attn_bias=True), "clipped_softmax": dict(clipped_softmax_gamma=-0.05),
                   "clipped_softmax_zeta": dict(clipped_softmax_gamma=-0.05, clipped_softmax_zeta=1.1),
                   "attn_bias_clipped": dict(attn_bias=True, clipped_softmax_gamma=-0.05)}


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
@pytest.mark.parametrize("path", ATTENTION_PATHS)
def test_later_tokens_change_no_earlier_logit(path, precision):
    """The whole model, as train.py runs it (the backend's autocast; FP8 with delayed scales from
    one training step): changing tokens t.. leaves logits[:, :t] bit-identical and changes
    every logit row from t on."""
    torch.manual_seed(0)
    backend = make_backend(precision, "emulated")
    model = GPT(tiny_config(block_size=16, **ATTENTION_PATHS[path]), backend)
    idx = torch.randint(0, 256, (2, 16))
    with backend.autocast(model):
        model(idx, idx).loss.backward()
    model.eval()
    later = idx.clone()
    later[:, 9:] = (idx[:, 9:] + torch.randint(1, 256, (2, 7))) % 256  # every token from position 9 on differs
    with torch.no_grad(), backend.autocast(model):  # the FP8 scales now come from that step's amax
        a, b = model(idx, idx).logits, model(later, later).logits
    assert a.dtype == torch.bfloat16
    assert torch.equal(a[:, :9], b[:, :9])
    assert (a[:, 9:] != b[:, 9:]).any(dim=-1).all()
    if precision == "fp8":
        assert all((m.fp8_scale[:2] != 1).all() for _, m in fp8_layers(model))


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_loss_is_the_cross_entropy_of_the_returned_logits(autocast):
    """Mean over the target positions of logsumexp(logits) - logit[target], by hand in float64;
    target -1 is ignored (not counted in the mean)."""
    torch.manual_seed(0)
    model = GPT(tiny_config())
    x, y = torch.randint(0, 256, (3, 32)), torch.randint(0, 256, (3, 32))
    y[0, :5] = -1
    y[2, 30:] = -1
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x, y)
    logits = out.logits.double()
    keep = y != -1
    nll = torch.logsumexp(logits, -1) - logits.gather(-1, y.clamp(min=0)[..., None])[..., 0]
    by_hand = nll[keep].sum() / keep.sum()
    assert out.loss.dtype == torch.float32 and out.logits.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert out.loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert abs(nll.mean().item() - by_hand.item()) > 1e-4  # counting the ignored positions would show
    # without targets: the last position only, the same logits
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        last = model(x).logits
    assert last.shape == (3, 1, 256)
    tol = dict(rtol=2 ** -7, atol=1e-2) if autocast else dict(rtol=1e-5, atol=1e-6)  # a 1-row GEMM rounds its own way
    torch.testing.assert_close(last[:, 0], out.logits[:, -1], **tol)


def test_tweo_term_of_the_model_by_hand():
    """Eq. (3) on block outputs set by hand: attention and MLP matrices zero, so block l adds
    its MLP output bias b_l to the embeddings: A_1 = e + b_1, A_2 = e + b_1 + b_2."""
    model = GPT(tiny_config(block_size=4, vocab_size=8, n_layer=2, n_head=1, n_embd=4))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.transformer.wte.weight[1] = torch.tensor([3.0, 0, 0, 0])
        model.transformer.wte.weight[2] = torch.tensor([0, -6.0, 0, 0])
        model.transformer.h[0].mlp.c_proj.bias.copy_(torch.tensor([0, 0, 1.5, 0]))
        model.transformer.h[1].mlp.c_proj.bias.copy_(torch.tensor([0, 0, 0, -7.0]))
    idx = torch.tensor([[1, 2]])  # A_1 = [[3, 0, 1.5, 0], [0, -6, 1.5, 0]], A_2 adds -7 in the last column
    out = model(idx, idx, with_tweo=True)
    # tau = 3, p = 4: |3| -> 1, |-6| -> 16, |1.5| -> 1/16, |-7| -> (7/3)^4, mean over the 8 elements
    layer1 = (1 + 16 + 1 / 16 + 1 / 16) / 8
    layer2 = (1 + 16 + 1 / 16 + 1 / 16 + 2 * (7 / 3) ** 4) / 8
    assert out.tweo_loss.item() == pytest.approx((layer1 + layer2) / 2, rel=1e-5)
    assert out.act_max.tolist() == [6.0, 7.0]
    model.config.tweo_tau, model.config.tweo_p = 1.5, 2.0  # the model's tau and p, not the defaults
    layer1 = (4 + 16 + 1 + 1) / 8
    layer2 = (4 + 16 + 1 + 1 + 2 * (7 / 1.5) ** 2) / 8
    assert model(idx, idx, with_tweo=True).tweo_loss.item() == pytest.approx((layer1 + layer2) / 2, rel=1e-5)


def test_tweo_gradient_on_bf16_block_outputs():
    """Training's path: bf16 weights (DeepSpeed bf16) under autocast, so every block output is
    bf16. The hand-written backward must agree with fp32 autograd on the naive formula."""
    torch.manual_seed(0)
    a = (torch.randn(4, 16, 32) * 2).bfloat16()
    a[0, 3, 5] = 40.0  # an outlier
    ours, ref = a.clone().requires_grad_(), a.float().requires_grad_()
    value = tweo_penalty(ours)
    value.backward()
    naive = ((ref.abs() / (3 + 1e-6)) ** 4).mean()
    naive.backward()
    assert value.dtype == torch.float32 and ours.grad.dtype == torch.bfloat16
    assert value.item() == pytest.approx(naive.item(), rel=2e-5)  # fp32; the norm kernel's root and power cost ~5e-6
    assert torch.allclose(ours.grad.float(), ref.grad, rtol=2 ** -8, atol=0)  # one bf16 rounding

    # the whole model in bf16: parameter gradients of the TWEO term, ours and the naive formula
    # (in fp32, on the same bf16 block outputs) through the same bf16 network
    model = GPT(tiny_config()).bfloat16()
    x = torch.randint(0, 256, (2, 32))

    def grads(naive_p=None):
        model.zero_grad(set_to_none=True)
        acts = []
        hooks = [b.register_forward_hook(lambda m, i, o: acts.append(o)) for b in model.transformer.h]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, x, with_tweo=naive_p is None)
        for h in hooks:
            h.remove()
        assert all(o.dtype == torch.bfloat16 for o in acts)
        term = out.tweo_loss if naive_p is None else sum(((o.float().abs() / (3 + 1e-6)) ** naive_p).mean() for o in acts) / 2
        term.backward()
        return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])

    g, g_ref, g_other = grads(), grads(naive_p=4.0), grads(naive_p=3.0)
    assert ((g - g_ref).norm() / g_ref.norm()).item() < 1e-2
    assert ((g - g_other).norm() / g_other.norm()).item() > 0.1  # the check tells p = 4 from p = 3


def to_hf_state(model):
    """Our GPT's weights in GPT2LMHeadModel's names, written out here (not with model.py's
    hf_gpt2_state): Conv1D holds [in, out], ln_1 / ln_2 / ln_f are the LayerNorms of QKV, fc and the head."""
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    hf = {"transformer.wte.weight": ours["transformer.wte.weight"], "transformer.wpe.weight": ours["transformer.wpe.weight"],
          "transformer.ln_f.weight": ours["lm_head.layer_norm_weight"], "transformer.ln_f.bias": ours["lm_head.layer_norm_bias"],
          "lm_head.weight": ours["lm_head.weight"]}
    for i in range(model.config.n_layer):
        h, o = f"transformer.h.{i}.", f"transformer.h.{i}."
        for ln, layer in (("ln_1", "attn.c_attn"), ("ln_2", "mlp.c_fc")):
            hf[h + ln + ".weight"], hf[h + ln + ".bias"] = ours[o + layer + ".layer_norm_weight"], ours[o + layer + ".layer_norm_bias"]
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            hf[h + layer + ".weight"], hf[h + layer + ".bias"] = ours[o + layer + ".weight"].t(), ours[o + layer + ".bias"]
    return hf


def randomize(model, generator):
    """Every parameter random, LayerNorm gains and biases included (init's ones and zeros would
    hide a swapped or dropped LayerNorm or bias)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator) * (0.3 if p.dim() == 1 else 0.1)
            gain = name.endswith("layer_norm_weight") or (name.split(".")[-2].startswith("ln") and name.endswith(".weight"))
            p.copy_(1 + noise if gain else noise)


def test_logits_equal_hugging_face_gpt2_with_the_same_weights():
    """GPT2LMHeadModel as an independent oracle, both ways: our random weights copied into it
    by this file's own mapping, and its random weights loaded by model.load_hf."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from model import load_hf
    g = torch.Generator().manual_seed(7)
    n_layer, n_head, head_dim = (int(torch.randint(lo, hi, (), generator=g)) for lo, hi in ((2, 4), (2, 5), (4, 9)))
    n_embd, vocab, block = n_head * head_dim, 64 + int(torch.randint(0, 64, (), generator=g)), 24
    hf_config = GPT2Config(vocab_size=vocab, n_positions=block, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    idx = torch.randint(0, vocab, (3, block), generator=g)

    ours = GPT(GPTConfig(block_size=block, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd)).eval()
    randomize(ours, g)
    hf = GPT2LMHeadModel(hf_config).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state(ours), strict=False)
    assert not unexpected and all(k.endswith(".attn.bias") or k.endswith("masked_bias") for k in missing), (missing, unexpected)
    with torch.no_grad():
        want, got = hf(idx).logits, ours(idx, idx).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - want.mean()).abs().mean() > 0.1  # logits far from constant: the comparison has teeth

    hf2 = GPT2LMHeadModel(hf_config).eval()
    randomize(hf2, g)
    hf2.lm_head.weight = hf2.transformer.wte.weight
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        hf2.save_pretrained(d)
        loaded, info = load_hf(d, dtype=torch.float32)
    with torch.no_grad():
        want, got = hf2(idx).logits, loaded(idx, idx).logits
    assert info["hf_vocab_size"] == vocab and got.shape[-1] == loaded.config.vocab_size > vocab
    torch.testing.assert_close(got[..., :vocab], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [1.0, 0.5])
def test_tweo_gradient_at_zero_is_zero_for_p_up_to_1(p):
    """|a|^p has no derivative at 0 for p <= 1: the subgradient 0 (not +-1, nor the inf of |a|^(p-1))."""
    a = torch.tensor([0.0, -0.0, 1.5, -6.0], requires_grad=True)
    tweo_penalty(a, 3.0, p).backward()
    expected = [0.0, 0.0, p * 1.5 ** (p - 1) / (4 * 3 ** p), -p * 6 ** (p - 1) / (4 * 3 ** p)]
    assert a.grad.tolist() == pytest.approx(expected, rel=1e-5, abs=0)


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_activation_checkpointing_changes_no_number(precision):
    """Recomputing the blocks in backward (the 3B and 7B configs) gives the same loss, TWEO term
    and gradients bit for bit; it is used in training only, and only when asked for."""
    def step(checkpointing):
        torch.manual_seed(0)
        backend = make_backend(precision, "emulated")
        calls, checkpoint = [], backend.checkpoint
        backend.checkpoint = lambda fn, *args: calls.append("train" if model.training else "eval") or checkpoint(fn, *args)
        model = GPT(tiny_config(activation_checkpointing=checkpointing), backend)
        x = torch.randint(0, 256, (2, 32))
        for _ in range(2):  # FP8: the second step runs on the scales of the first
            model.zero_grad(set_to_none=True)
            with backend.autocast(model):
                out = model(x, x, with_tweo=True)
            (out.loss + 0.01 * out.tweo_loss).backward()
        model.eval()
        with torch.no_grad(), backend.autocast(model):
            model(x, x)
        return out, [p.grad for p in model.parameters()], calls

    (plain, plain_grads, plain_calls), (ckpt, ckpt_grads, ckpt_calls) = step(False), step(True)
    assert plain_calls == [] and ckpt_calls == ["train"] * 4  # 2 blocks x 2 steps, not in eval
    assert torch.equal(plain.loss, ckpt.loss) and torch.equal(plain.tweo_loss, ckpt.tweo_loss)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, ckpt_grads))


def test_attention_initialisation():
    """GPT-2's: QKV N(0, 0.02), the output projection N(0, 0.02 / sqrt(2 L)) (a residual
    projection), biases 0; attn_bias's k' and v' N(0, 0.02)."""
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=8, n_embd=128, n_head=4, attn_bias=True))
    for block in model.transformer.h[:2]:
        attn = block.attn
        assert attn.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
        assert attn.c_attn.bias.abs().max().item() == attn.c_proj.bias.abs().max().item() == 0
        for bias in (attn.k_bias, attn.v_bias):
            assert bias.shape == (4, 1, 32)
            assert bias.std().item() == pytest.approx(0.02, rel=0.2) and abs(bias.mean().item()) < 0.01


# ---- generation, activation statistics, imports ---------------------------------------

def test_generate_is_deterministic_and_respects_the_vocab_limit():
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=8)).eval()  # 16 tokens: past the block, the context is cropped
    idx = torch.zeros(2, 1, dtype=torch.long)
    a = model.generate(idx, 16, temperature=1.0, top_k=50, vocab_limit=200, generator=torch.Generator().manual_seed(3))
    b = model.generate(idx, 16, temperature=1.0, top_k=50, vocab_limit=200, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 17) and torch.equal(a, b)
    assert a.max().item() < 200


def test_outlier_stats_and_record_activations():
    t = torch.tensor([1.0, -2.0, 3.0, -10.0, 0.5, 0.0])
    s = outlier_stats(t)
    assert (s["top1"], s["top2"], s["top3"]) == (10.0, 3.0, 2.0)
    assert s["median"] == pytest.approx(1.5) and s["mean_abs"] == pytest.approx(16.5 / 6)
    x = t.double()
    c = x - x.mean()
    assert s["kurtosis"] == pytest.approx(((c ** 4).mean() / (c ** 2).mean() ** 2).item())
    assert outlier_stats(torch.randn(200000))["kurtosis"] == pytest.approx(3.0, abs=0.1)
    model = GPT(tiny_config())
    with record_activations(model, ffn=True) as rec:
        model(torch.randint(0, 256, (2, 32)))
    assert len(rec["block"]) == 2 and len(rec["ffn"]) == 2 and len(rec["block"][0]) == 1
    # batches merge exactly (but for the median)
    a, b = torch.randn(1000) * 2, torch.randn(3000) + 1
    merged = summarize_moments([activation_moments(v) for v in (a, b)])
    direct = outlier_stats(torch.cat([a, b]))
    for k in ("top1", "top2", "top3", "mean_abs", "kurtosis"):
        assert merged[k] == pytest.approx(direct[k], rel=1e-9)
    assert not model.transformer.h[0]._forward_hooks  # hooks removed


def test_importing_model_imports_neither_te_nor_deepspeed():
    code = "import sys, model; bad = [m for m in ('deepspeed', 'transformer_engine') if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# ---- the invasive baselines of Table 2: attention bias and clipped softmax ------------

def reference_attention_block(attn, x, gamma=0.0, zeta=1.0):
    """A CausalSelfAttention written out from its weights, one query at a time: LayerNorm,
    QKV, [k'; keys up to the query], softmax stretched to [gamma, zeta] and clipped to [0, 1]."""
    B, T, C = x.shape
    H = attn.n_head
    D = C // H
    ln = attn.c_attn
    xn = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    qkv = torch.einsum("btc,oc->bto", xn * ln.layer_norm_weight + ln.layer_norm_bias, ln.weight) + ln.bias
    q, k, v = (qkv[..., i * C:(i + 1) * C].reshape(B, T, H, D) for i in range(3))
    y = torch.zeros(B, T, H, D, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                keys, values = k[b, :t + 1, h], v[b, :t + 1, h]
                if attn.attn_bias:
                    keys, values = torch.cat([attn.k_bias[h], keys]), torch.cat([attn.v_bias[h], values])
                scores = torch.einsum("d,sd->s", q[b, t, h], keys) / math.sqrt(D)
                p = torch.exp(scores - scores.max())
                p = torch.clamp((zeta - gamma) * p / p.sum() + gamma, 0.0, 1.0)
                y[b, t, h] = torch.einsum("s,sd->d", p, values)
    return torch.einsum("btc,oc->bto", y.reshape(B, T, C), attn.c_proj.weight) + attn.c_proj.bias


def invasive_model(**kw):
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=12, n_embd=16, **kw)).double().eval()
    for block in model.transformer.h:  # weights of a trained model's size, for peaked attention and a k', v' that matter
        block.attn.c_attn.weight.data.normal_(0.0, 0.5)
        if kw.get("attn_bias"):
            block.attn.k_bias.data.normal_(0.0, 1.0)
            block.attn.v_bias.data.normal_(0.0, 1.0)
    return model, torch.randn(2, 12, 16, dtype=torch.float64)


@pytest.mark.parametrize("kw", [dict(attn_bias=True), dict(clipped_softmax_gamma=-0.1),
                                dict(clipped_softmax_gamma=-0.2, clipped_softmax_zeta=1.2),
                                dict(attn_bias=True, clipped_softmax_gamma=-0.1)], ids=str)
def test_invasive_attention_equals_a_direct_computation(kw):
    model, x = invasive_model(**kw)
    attn = model.transformer.h[0].attn
    gamma, zeta = kw.get("clipped_softmax_gamma", 0.0), kw.get("clipped_softmax_zeta", 1.0)
    ours, direct = attn(x), reference_attention_block(attn, x, gamma, zeta)
    assert (ours - direct).abs().max().item() < 1e-12
    # negative controls: the same check tells the option from plain attention ...
    plain, _ = invasive_model()
    assert (plain.transformer.h[0].attn(x) - direct).abs().max().item() > 1e-3
    # ... and is causal: a later token changes nothing before it (a wrong mask, or a clipped
    # softmax letting gamma through to hidden keys, would)
    x2 = x.clone()
    x2[:, 7:] = torch.randn(2, 5, 16, dtype=torch.float64)
    assert torch.equal(attn(x2)[:, :7], ours[:, :7]) and not torch.equal(attn(x2)[:, 7:], ours[:, 7:])


def test_clipped_softmax_reaches_exact_zeros_and_with_gamma_0_is_plain_softmax():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, dtype=torch.float64) * 3 for _ in range(3))
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(clipped_softmax_attention(q, k, v, causal, 0.0, 1.0), plain, rtol=0, atol=1e-12)
    # v = identity reads out the probabilities: clipped ones are exactly 0 where softmax is small but positive
    eye = torch.eye(10, dtype=torch.float64).expand(2, 3, 10, 10)
    soft, clipped = clipped_softmax_attention(q, k, eye, causal, 0.0, 1.0), clipped_softmax_attention(q, k, eye, causal, -0.1, 1.0)
    small = causal & (soft < 0.1 / 1.1)
    assert small.any() and (soft[small] > 0).all() and (clipped[small] == 0).all()
    assert torch.equal(clipped[~small & causal], 1.1 * soft[~small & causal] - 0.1)
    assert (clipped[..., ~causal] == 0).all()
    # in the model: the explicit path with gamma = 0, zeta = 1 gives the SDPA path's logits
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 256, (2, 32))
    fast = model(idx, idx).logits
    for block in model.transformer.h:
        block.attn.clip = (0.0, 1.0)
    assert torch.allclose(model(idx, idx).logits, fast, rtol=0, atol=1e-5)
    with pytest.raises(AssertionError, match="gamma <= 0"):  # a positive gamma would let hidden keys through
        GPT(tiny_config(clipped_softmax_gamma=0.01))


def test_attention_bias_with_zero_k_and_v_is_softmax_plus_one():
    """k' = v' = 0: the bias key has logit 0 and adds nothing to the output, so attention
    becomes sum_j e^s_j v_j / (1 + sum_j e^s_j), the "softmax + 1" of the paper's Table 1."""
    model, x = invasive_model(attn_bias=True)
    attn = model.transformer.h[0].attn
    attn.k_bias.data.zero_()
    attn.v_bias.data.zero_()
    C, H = 16, attn.n_head
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(2, 12, H, C // H).transpose(1, 2) for t in (q, k, v))
    s = (q @ k.transpose(-2, -1) / math.sqrt(C // H)).masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), -math.inf)
    y = (s.exp() / (1 + s.exp().sum(-1, keepdim=True))) @ v
    expected = attn.c_proj(y.transpose(1, 2).reshape(2, 12, C))
    assert (attn(x) - expected).abs().max().item() < 1e-12


def test_invasive_options_off_leave_the_model_unchanged():
    """Off, the attention takes the SDPA fast path, adds no parameter and draws no random
    number: the logits are bit-identical to the attention this repository had before."""
    def sdpa_forward(self, x):  # CausalSelfAttention.forward before the options existed
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))

    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=1))
    after_init = torch.randn(3)
    assert set(model.state_dict()) == {
        "transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight", "lm_head.layer_norm_weight",
        "lm_head.layer_norm_bias"} | {f"transformer.h.0.{m}.{p}" for m in ("attn.c_attn", "mlp.c_fc") for p in (
            "layer_norm_weight", "layer_norm_bias", "weight", "bias")} | {
        f"transformer.h.0.{m}.{p}" for m in ("attn.c_proj", "mlp.c_proj") for p in ("weight", "bias")}
    torch.manual_seed(0)
    clipped = GPT(tiny_config(n_layer=1, clipped_softmax_gamma=-0.05))  # adds no parameter either
    assert torch.equal(torch.randn(3), after_init)  # the same random draws: the same init
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), clipped.state_dict().values()))
    torch.manual_seed(0)
    with_bias = GPT(tiny_config(n_layer=1, attn_bias=True))
    assert set(with_bias.state_dict()) - set(model.state_dict()) == {"transformer.h.0.attn.k_bias", "transformer.h.0.attn.v_bias"}
    assert with_bias.transformer.h[0].attn.k_bias.std().item() == pytest.approx(0.02, rel=0.3)

    idx = torch.randint(0, 256, (2, 32))
    ours = model(idx, idx).logits
    attention = type(model.transformer.h[0].attn)
    original, attention.forward = attention.forward, sdpa_forward
    try:
        before = model(idx, idx).logits
    finally:
        attention.forward = original
    assert torch.equal(ours, before)
    assert not torch.allclose(clipped(idx, idx).logits, before, atol=1e-4)  # the test would see a change


# ---- Hugging Face GPT-2 checkpoints ------------------------------------------------------

@pytest.mark.parametrize("safe", [True, False])
def test_hf_gpt2_logits_equal_transformers(hf_gpt2, tmp_path, safe):
    from model import hf_gpt2_state, load_hf
    hf_dir, hf = hf_gpt2
    if not safe:  # an older checkpoint: a torch state dict (transformers 5 writes only safetensors)
        shutil.copy(os.path.join(hf_dir, "config.json"), tmp_path)
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
        hf_dir = str(tmp_path)
    ours, info = load_hf(hf_dir, dtype=torch.float32)
    assert ours.config.vocab_size == 50304 and info["hf_vocab_size"] == 50257 and ours.config.block_size == 64
    idx = torch.randint(0, 50257, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(idx).logits
        got = ours(idx, idx).logits
    torch.testing.assert_close(got[..., :50257], want, rtol=1e-5, atol=1e-5)
    assert torch.all(got[..., 50257:] == -float("inf"))  # the padding is never predicted nor sampled
    assert torch.all(ours.transformer.wte.weight[50257:] == 0)
    assert ours.lm_head.weight is ours.transformer.wte.weight
    state, args, n_vocab = hf_gpt2_state(hf_dir, block_size=32)  # wpe cropped, as for a shorter block
    assert state["transformer.wpe.weight"].shape == (32, 32) and args["block_size"] == 32


def test_an_hf_gpt2_cropped_to_a_shorter_block_keeps_its_first_positions(hf_gpt2):
    """block_size 32 < n_positions 64: wpe holds the HF model's first 32 rows, and the logits on a
    32-token input are transformers' own; the last 32 rows (a wrong crop) would give others."""
    from model import hf_gpt2_state, load_hf
    hf_dir, hf = hf_gpt2
    wpe = hf.transformer.wpe.weight.detach()
    state, args, _ = hf_gpt2_state(hf_dir, block_size=32)
    assert args["block_size"] == 32 and torch.equal(state["transformer.wpe.weight"], wpe[:32])
    ours, _ = load_hf(hf_dir, dtype=torch.float32, block_size=32)
    assert ours.config.block_size == 32 and torch.equal(ours.transformer.wpe.weight, wpe[:32])
    idx = torch.randint(0, 50257, (3, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(idx).logits
        torch.testing.assert_close(ours(idx, idx).logits[..., :50257], want, rtol=1e-5, atol=1e-5)
        ours.transformer.wpe.weight.copy_(wpe[32:])
        assert (ours(idx, idx).logits[..., :50257] - want).abs().max() > 1e-2


def test_an_hf_gpt2_runs_under_the_torch_fp8_backend(hf_gpt2):
    """load_hf with an FP8 backend: bf16 weights, the scaling state in fp32 (torch._scaled_mm
    refuses bf16 scales: this crashed), and FP8 logits close to the bf16 ones."""
    from model import load_hf
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(1))
    logits = {}
    for precision in ("bf16", "fp8"):
        backend = make_backend(precision, "torch")
        model, _ = load_hf(hf_gpt2[0], backend=backend)
        with torch.no_grad(), backend.autocast(model):
            logits[precision] = model(idx, idx).logits[..., :50257].float()
    assert all(m.fp8_scale.dtype == torch.float32 for _, m in fp8_layers(model))
    assert 0 < (logits["fp8"] - logits["bf16"]).norm() / logits["bf16"].norm() < 0.1


def test_hf_directories_that_do_not_fit_fail_clearly(hf_gpt2, tmp_path):
    from model import CheckpointError, load_hf
    with pytest.raises(CheckpointError, match="config.json unreadable"):
        load_hf(str(tmp_path))
    cfg = json.load(open(os.path.join(hf_gpt2[0], "config.json")))
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, activation_function="relu")))
    with pytest.raises(CheckpointError, match="activation_function='relu'"):
        load_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="neither model.safetensors nor pytorch_model.bin"):
        load_hf(str(tmp_path))


# ---- memory (the slowest test, last: a mutant the tests above kill never waits for it) ----

def test_tweo_adds_no_activation_memory():
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=128, vocab_size=512, n_layer=12, n_head=4, n_embd=128))
    x = torch.randint(0, 512, (8, 128))

    def step(tweo, naive=False):
        def run():
            if naive:  # the same term through plain autograd, for contrast
                acts = []
                hooks = [b.register_forward_hook(lambda m, i, o: acts.append(o)) for b in model.transformer.h]
                out = model(x, x)
                for h in hooks:
                    h.remove()
                loss = out.loss + 0.01 * sum(((a.float().abs() / 3) ** 4).mean() for a in acts) / len(acts)
            else:
                out = model(x, x, with_tweo=tweo)
                loss = out.loss + 0.01 * out.tweo_loss
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    step(False)()  # warm up
    base, tweo, naive = cpu_peak_bytes(step(False)), cpu_peak_bytes(step(True)), cpu_peak_bytes(step(False, naive=True))
    print(f"peak memory: lambda=0 {base / 2**20:.2f} MiB, TWEO {tweo / 2**20:.2f} MiB ({100 * (tweo / base - 1):+.3f}%), "
          f"naive autograd TWEO {naive / 2**20:.2f} MiB ({100 * (naive / base - 1):+.1f}%)")
    assert tweo <= 1.01 * base
    assert naive > 1.02 * base  # the measurement does see a term that keeps activations


@pytest.mark.parametrize("recipe", ["current", "delayed"])
def test_a_te_run_is_evaluated_with_the_fp8_state_its_recipe_has(tmp_path, recipe):
    """TE's Float8CurrentScaling keeps no scaling state (its fp8_meta holds no scale and no amax
    history), so a TE current-scaling run's checkpoint has none and load_trained takes it as it
    is; a delayed-scaling one without state would evaluate with every scale at 1.0: refused."""
    from model import CheckpointError, load_trained
    from precision import BF16Backend

    class TEStandIn(BF16Backend):  # TE cannot be imported here: the decision under test is load_trained's
        name, recipe_name = "te", recipe

    args = dict(block_size=32, vocab_size=512, n_layer=2, n_head=2, n_embd=64)
    torch.manual_seed(0)
    trained = GPT(GPTConfig(**args), make_backend("bf16"))
    torch.save({"model": trained.state_dict(), "model_args": args, "fp8_te_state": {},
                "config": {"precision": "fp8", "fp8_backend": "te", "fp8_recipe": recipe}}, tmp_path / "model_last.pt")
    if recipe == "delayed":
        with pytest.raises(CheckpointError, match="holds no Transformer Engine FP8 scaling state"):
            load_trained(str(tmp_path), "last", backend=TEStandIn())
        return
    model, info = load_trained(str(tmp_path), "last", backend=TEStandIn())
    assert info["trained_in_fp8"] and torch.equal(model.lm_head.weight.float(), trained.lm_head.weight.bfloat16().float())
