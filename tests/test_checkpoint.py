"""checkpoint.py's checks before the engine exists: which checkpoint a resume takes and whether the
run in out_dir trained this model. Saving, rotation, full disks, universal resharding and exact
resumes are checked on real DeepSpeed runs in tests/test_train.py."""
import json
import os

from checkpoint import model_change, resume_point
from configurator import write_atomically
from model import GPTConfig


def test_resume_point(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert resume_point(str(ckpt)) == (None, None)  # stopped before its first checkpoint
    write_atomically(str(ckpt / "latest"), "iter_0000008")
    assert resume_point(str(ckpt)) == ("iter_0000008", 0)  # names a tag that is not there
    tag = ckpt / "iter_0000008"
    tag.mkdir()
    for r in range(3):
        (tag / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
    (tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"")
    assert resume_point(str(ckpt)) == ("iter_0000008", 3)
    assert not os.path.exists(ckpt / "latest.tmp")


def test_model_change(tmp_path):
    args = {**vars(GPTConfig()), "n_layer": 2, "activation_checkpointing": False}
    assert model_change(str(tmp_path), args).startswith(f"{tmp_path}/run.json is missing or unreadable (FileNotFoundError)")
    (tmp_path / "run.json").write_text("{")
    assert "(JSONDecodeError)" in model_change(str(tmp_path), args)
    (tmp_path / "run.json").write_text(json.dumps({"model_args": args}))
    assert model_change(str(tmp_path), args) is None
    assert model_change(str(tmp_path), {**args, "activation_checkpointing": True}) is None  # the same weights
    assert model_change(str(tmp_path), {**args, "n_layer": 4}) == f"{tmp_path} holds a run of another model (n_layer: 2 -> 4)"
    old = {k: v for k, v in args.items() if k != "attn_bias"}  # a run from before attn_bias existed
    (tmp_path / "run.json").write_text(json.dumps({"model_args": old}))
    assert model_change(str(tmp_path), args) is None
