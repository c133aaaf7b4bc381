"""bench/throughput.py: the four modes side by side, printed and written as JSON; its timer and
memory count against steps of known cost; the fp32 reference row is fp32."""
import json
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, refused

from bench.throughput import MODES, cpu_peak_bytes, main as throughput, make_step, peak_bytes, seconds_per_step
from precision import LayerNormLinear, choose_cpu_gemm

SMALL = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--vocab_size=512", "--micro_batch_size=2",
         "--iters=2", "--warmup=1", "--device=cpu"]


def run(*args):
    return subprocess.run([sys.executable, "bench/throughput.py", *SMALL, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_four_modes_and_the_fp32_reference_printed_and_written(tmp_path):
    path = tmp_path / "sub" / "throughput.json"
    r = run(f"--json={path}")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "FP8 is emulated on CPU" in r.stdout
    native, amx = torch.ops.mkldnn._is_mkldnn_bf16_supported(), torch.cpu._is_amx_tile_supported()
    assert f"CPU: native bf16 GEMMs {native} (torch.ops.mkldnn._is_mkldnn_bf16_supported()), AMX {amx}," in r.stdout
    table = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in MODES}
    assert list(table) == ["fp32", "bf16", "bf16_tweo", "fp8", "fp8_tweo"]
    path_here = choose_cpu_gemm()[0]  # --cpu_gemm=auto
    assert [t[1] for t in table.values()] == ["-"] + [path_here] * 4
    assert [t[2] for t in table.values()] == ["fp32", "bf16", "bf16", "emulated", "emulated"]
    assert [t[3] for t in table.values()] == ["on"] * 5  # train.py's default: FP8 casts and TWEO compiled
    report = json.loads(path.read_text())
    assert report["device"] == "cpu" and report["fp8_emulated"] is True and report["model"]["n_layer"] == 1
    assert report["native_bf16_gemms"] is native and report["amx"] is amx
    assert [x["mode"] for x in report["results"]] == list(table)
    for x in report["results"]:
        assert x["iter_per_hour"] == 3600 / x["s_per_iter"] and x["peak_gb"] > 0
        assert f"{x['s_per_iter']:.3f}" == table[x["mode"]][4]  # the JSON holds what was printed
        assert [x["ops_per_micro_batch"], x["host_syncs_per_micro_batch"]] == [int(v) for v in table[x["mode"]][-2:]]
    fp32, bf16 = report["results"][:2]
    assert fp32["step_time_vs_fp32"] == 1.0 and fp32["iter_per_hour_vs_bf16"] is None
    assert bf16["iter_per_hour_vs_bf16"] == 1.0 and bf16["step_time_vs_fp32"] == bf16["s_per_iter"] / fp32["s_per_iter"]
    assert table["bf16"][6] == f"{bf16['step_time_vs_fp32']:.2f}x" and table["fp32"][7] == "-"
    # a micro-batch's host cost: the FP8 casts and scale bookkeeping add ops; only the emulation's native bf16
    # GEMM reads its factor back (forward, dgrad, wgrad of each of the 5 FP8 GEMMs of one block and the head)
    fp8 = report["results"][3]
    assert fp8["ops_per_micro_batch"] > bf16["ops_per_micro_batch"] > 0 and bf16["host_syncs_per_micro_batch"] == 0
    assert fp8["host_syncs_per_micro_batch"] == (15 if path_here == "native" else 0)


def test_both_gemm_paths_side_by_side(tmp_path):
    path = tmp_path / "both.json"
    r = run("--modes=fp32,bf16,fp8", "--cpu_gemm=both", f"--json={path}")
    assert r.returncode == 0, r.stderr
    rows = [(x["mode"], x["gemm_path"]) for x in json.loads(path.read_text())["results"]]
    assert rows == [("fp32", "-"), ("bf16", "native"), ("fp8", "native"), ("bf16", "fp32"), ("fp8", "fp32")]
    for x in json.loads(path.read_text())["results"][1:]:  # each against the BF16 row of its own path
        base = next(b for b in json.loads(path.read_text())["results"] if b["mode"] == "bf16" and b["gemm_path"] == x["gemm_path"])
        assert x["iter_per_hour_vs_bf16"] == x["iter_per_hour"] / base["iter_per_hour"]
    r = run("--cpu_gemm=bf16")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--cpu_gemm takes auto, native, fp32 or both" in r.stderr


def test_an_existing_json_is_never_overwritten(tmp_path):
    path = tmp_path / "t.json"
    path.write_text("keep")
    r = run(f"--json={path}")
    assert r.returncode == 2 and "already exists" in r.stderr and r.stdout == "" and path.read_text() == "keep"


def test_a_config_file_is_timed_at_its_runs_block_size_and_micro_batch():
    from bench.throughput import model_config
    small = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=50304, micro_batch_size=4,
                 activation_checkpointing=False, iters=5)
    shape = ("n_layer", "n_head", "n_embd", "block_size", "micro_batch_size", "activation_checkpointing")

    def timed(*argv):
        cfg = model_config(small, list(argv))
        return tuple(cfg[k] for k in shape)
    assert timed() == (6, 6, 384, 256, 4, False)  # no config file: the small model
    # configs/sizes/gpt2_124m.py sets no block_size: train.py's 1024, as in a run of it
    assert timed("configs/gpt2_124m_bf16.py") == (12, 12, 768, 1024, 16, False)
    assert timed("configs/gpt2_3b_fp8.py", "--micro_batch_size=2") == (32, 32, 2560, 1024, 2, True)
    assert timed("configs/gpt2_124m_bf16.py", "--block_size=256") == (12, 12, 768, 256, 16, False)
    assert timed("configs/tiny.py") == (2, 2, 64, 64, 8, False)  # a config's own block_size


def test_the_printed_and_written_model_is_the_configs(tmp_path):
    config = tmp_path / "narrow.py"  # like the gpt2_* configs, no block_size of its own
    config.write_text("n_layer = 1\nn_head = 2\nn_embd = 32\nvocab_size = 512\nmicro_batch_size = 1\nmax_iters = 7\n")
    path = tmp_path / "t.json"
    r = subprocess.run([sys.executable, "bench/throughput.py", str(config), "--modes=bf16", "--iters=1", "--warmup=0",
                        "--device=cpu", f"--json={path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "model: 1 layers x 32, 1 x 1024 tokens, cpu"
    assert json.loads(path.read_text())["model"]["block_size"] == 1024


@pytest.mark.parametrize("cpu_gemm", ["auto", "native"])
def test_the_torch_fp8_backend_trains_with_its_scaling_state_in_fp32(cpu_gemm):
    """--fp8_backend=torch: the bench's bf16 model keeps its FP8 scales and amaxes in fp32, which
    torch._scaled_mm ('native': the kernel itself) and its fp32 stand-in require (it crashed:
    'scales must be single-element fp32 tensors, got torch.bfloat16')."""
    from bench.throughput import make_step
    cfg = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=512, micro_batch_size=2,
               activation_checkpointing=False, fp8_backend="torch", compile=False)
    step, backend, model, _ = make_step(cfg, "fp8", torch.device("cpu"), cpu_gemm)
    step()
    step()
    assert backend.name == "torch" and next(model.parameters()).dtype == torch.bfloat16
    assert model.lm_head.fp8_scale.dtype == model.lm_head.fp8_amax_history.dtype == torch.float32
    assert (model.lm_head.fp8_amax_history[0] > 0).all()  # both steps went through the FP8 casts


def test_a_json_path_that_cannot_be_written_is_refused_before_timing(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    path = tmp_path / "afile" / "t.json"
    err = refused(capsys, throughput, f"--json={path}")
    assert err == f"error: --json={path} is not a file this process can write (its folder cannot be written or created)\n"


def test_the_timer_measures_steps_of_known_duration():
    """seconds_per_step: the mean wall time of one call, over n calls (sleeps of 20 and 60 ms)."""
    calls = []
    for seconds in (0.02, 0.06):
        t = seconds_per_step(lambda: calls.append(time.sleep(seconds)), 3, torch.device("cpu"))
        assert seconds <= t < 2 * seconds, (seconds, t)  # per step, not the 3 steps' total
    assert len(calls) == 6


def test_peak_memory_counts_the_resident_state_and_the_highest_point_of_a_step():
    """peak_bytes on CPU: parameters and AdamW state (counted here from the shapes), plus the
    most a step holds at once: 6 MiB for 4 and 2 MiB alive together, 4 MiB (not 8) for two 4 MiB
    tensors one after the other."""
    model = torch.nn.Linear(256, 128)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 256)).sum().backward()
    optimizer.step()  # AdamW's state: exp_avg and exp_avg_sq per parameter, and a step count (fp32 scalar)
    model.zero_grad(set_to_none=True)
    resident = 3 * 4 * (256 * 128 + 128) + 2 * 4
    MiB = 2 ** 20

    def together():
        a = torch.ones(MiB)  # 4 MiB of fp32
        b = torch.ones(MiB // 2)
        del a, b

    def in_turn():
        for _ in range(2):
            a = torch.ones(MiB)
            del a
    cpu = torch.device("cpu")
    assert resident + 6 * MiB <= peak_bytes(together, model, optimizer, cpu) <= resident + 6 * MiB + 4096
    assert 4 * MiB <= cpu_peak_bytes(in_turn) <= 4 * MiB + 4096


def test_the_fp32_reference_has_fp32_weights_and_no_autocast():
    """make_step's 'fp32' row: every parameter fp32 and the GEMMs outside autocast, fp32 out;
    the 'bf16' row (the negative control): bf16 weights, under autocast, bf16 out."""
    cfg = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=512, micro_batch_size=2,
               activation_checkpointing=False, fp8_backend="auto", compile=False)
    seen = {}
    for mode, dtype, autocast in (("fp32", torch.float32, False), ("bf16", torch.bfloat16, True)):
        step, _, model, _ = make_step(cfg, mode, torch.device("cpu"))
        gemms = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, LayerNormLinear))]
        hooks = [m.register_forward_hook(lambda m, a, out, mode=mode: seen.setdefault(mode, set()).add(
            (out.dtype, torch.is_autocast_enabled("cpu")))) for m in gemms]
        step.micro_batch()
        for h in hooks:
            h.remove()
        assert {p.dtype for p in model.parameters()} == {dtype} and len(gemms) == 5  # QKV, out, fc, proj, head
        assert seen[mode] == {(dtype, autocast)}, mode
