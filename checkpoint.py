"""
A run's checkpoints, written so that a crash, a full disk or a preemption never costs a complete one.

    out_dir/ckpt/<tag>/                 DeepSpeed's checkpoint (ZeRO shards, client state), each rank's RNG state
    out_dir/ckpt/latest, ckpt/best      pointer files, moved to a tag only once every rank has written all of it
    out_dir/model_last.pt, model_best.pt  consolidated bf16 weights with model args, config and FP8 state

Before the engine exists: resume_point() reads ckpt/latest, convert_to_universal() reshards a
checkpoint saved on another number of ranks. After: Checkpoints.save() and Checkpoints.resume().
Nothing here reads train.py's globals; what a save needs is given once, to Checkpoints.
"""
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import torch
import torch.distributed as dist

from configurator import write_atomically
from model import GPTConfig
from precision import load_te_fp8_state, te_fp8_state


def read_pointer(path):
    with open(path) as f:
        return f.read().strip()


def torch_save_atomic(obj, path):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def model_change(out_dir, model_args):
    """Why out_dir's run cannot be resumed with model_args (its run.json is unreadable, or it trained
    another model), or None. An option newer than the run counts at its default."""
    run_json = os.path.join(out_dir, "run.json")
    try:
        with open(run_json) as f:
            previous = {**vars(GPTConfig()), **json.load(f)["model_args"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{run_json} is missing or unreadable ({type(e).__name__}): cannot check that the checkpoint fits this model"
    changed = {k: (previous.get(k), v) for k, v in model_args.items()
               if previous.get(k) != v and k != "activation_checkpointing"}
    if changed:
        return f"{out_dir} holds a run of another model ({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in changed.items())})"
    return None


def resume_point(ckpt_dir):
    """(tag, ranks it was saved on) of ckpt/latest: (None, None) when the run stopped before its first
    checkpoint, (tag, 0) when the tag holds no DeepSpeed checkpoint."""
    if not os.path.exists(os.path.join(ckpt_dir, "latest")):
        return None, None
    tag = read_pointer(os.path.join(ckpt_dir, "latest"))
    path = os.path.join(ckpt_dir, tag)
    # DeepSpeed writes one optimizer shard per data-parallel rank
    return tag, len([f for f in os.listdir(path) if f.endswith("optim_states.pt")]) if os.path.isdir(path) else 0


def convert_to_universal(ckpt_dir, tag, saved_world, world_size, master, device, all_reduce):
    """Collective. DeepSpeed's universal checkpoint of ckpt/<tag>, which reshards it for this world
    size: made once, by rank 0, and kept inside the tag (so it goes when the tag is rotated out).
    Returns why it failed, or None."""
    universal = os.path.join(ckpt_dir, tag, "universal")
    convert = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
               f"--input_folder={os.path.join(ckpt_dir, tag)}", f"--output_folder={universal}"]
    failed = torch.zeros(1, device=device)
    if master and not os.path.isdir(universal):
        print(f"{ckpt_dir}/{tag} was saved on {saved_world} rank(s) and this run has {world_size}: "
              f"converting it to a universal checkpoint: {' '.join(convert[1:])}", flush=True)
        shutil.rmtree(universal + ".tmp", ignore_errors=True)
        r = subprocess.run(convert[:-1] + [f"--output_folder={universal}.tmp"], capture_output=True, text=True)
        if r.returncode == 0:
            os.replace(universal + ".tmp", universal)
        else:
            failed[0] = 1
            print((r.stdout + r.stderr)[-3000:], file=sys.stderr)
    if all_reduce(failed, dist.ReduceOp.MAX).item():
        return (f"converting {ckpt_dir}/{tag} to a universal checkpoint failed (above); "
                f"after fixing the cause run `{' '.join(convert)}` and resume again")
    return None


class Checkpoints:
    """Saves and resumes the DeepSpeed engine's checkpoints under out_dir/ckpt, keeping the newest
    `keep` iteration checkpoints besides the best (0 keeps every one)."""

    def __init__(self, engine, out_dir, keep, model_file_meta, rank, world_size, device, all_reduce):
        self.engine, self.model = engine, engine.module
        self.out_dir, self.dir, self.keep = out_dir, os.path.join(out_dir, "ckpt"), keep
        self.meta = model_file_meta  # model_args and config, in every consolidated model file
        self.rank, self.world_size, self.master = rank, world_size, rank == 0
        self.device, self.all_reduce = device, all_reduce
        self.write_errors = []  # this rank's failed writes since the save began
        deepspeed_save = engine.checkpoint_engine.save  # every file DeepSpeed writes goes through try_write
        engine.checkpoint_engine.save = lambda state_dict, path: self.try_write(deepspeed_save, state_dict, path)

    def try_write(self, write, *args):
        """A write whose failure (a full disk, a lost mount) is recorded for save() to act on, not
        raised: DeepSpeed's save runs collectives after its writes, which every rank must still
        reach when the disk fails on some of them."""
        try:
            write(*args)
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
            self.write_errors.append(f"{args[-1]}: {e.strerror if isinstance(e, OSError) else str(e).splitlines()[0]}")

    def pointed_tags(self):
        return {read_pointer(os.path.join(self.dir, p)) for p in ("latest", "best") if os.path.exists(os.path.join(self.dir, p))}

    def model_file(self, pointer):
        return os.path.join(self.out_dir, f"model_{'best' if pointer == 'best' else 'last'}.pt")

    def consolidated_state(self):
        """bf16 weights gathered on rank 0 (collective), with the FP8 state: the emulated and torch
        backends' scales and amax histories are buffers and come with the weights; Transformer
        Engine's are saved as plain tensors (fp8_te_state), never as its pickled _extra_state."""
        zero3 = self.engine.zero_optimization_stage() == 3
        sd = self.engine._zero3_consolidated_16bit_state_dict() if zero3 else self.model.state_dict()
        if not self.master:
            return None
        sd = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}
        return {"model": sd, "fp8_te_state": te_fp8_state(self.model), **self.meta}

    def save(self, tag, pointer, client_state):
        """DeepSpeed checkpoint under ckpt/tag; then, once every rank has written everything, the
        pointer file `latest` or `best` is moved to it atomically and the consolidated model file
        replaced, so a crash mid-save leaves both at the previous complete checkpoint. A failed
        write on any rank stops the run with one line, after removing the partial tag: pointers
        and model files stay as they were."""
        self.write_errors.clear()
        path = os.path.join(self.dir, tag)
        if self.master and os.path.isdir(path):  # (DeepSpeed's save begins with a barrier: the other ranks wait)
            if tag in self.pointed_tags():  # a best saved after the checkpoint this run resumed from: kept until replaced
                shutil.rmtree(path + ".old", ignore_errors=True)
                os.replace(path, path + ".old")
                for p in ("latest", "best"):
                    if os.path.exists(os.path.join(self.dir, p)) and read_pointer(os.path.join(self.dir, p)) == tag:
                        write_atomically(os.path.join(self.dir, p), tag + ".old")
            else:
                shutil.rmtree(path)  # left by an interrupted save
        client_state = {**client_state, **self.meta, "fp8_te_state": te_fp8_state(self.model)}
        self.try_write(lambda path: self.engine.save_checkpoint(self.dir, tag=tag, client_state=client_state,
                                                                save_latest=False), path)
        self.try_write(torch.save, {"torch": torch.get_rng_state(),
                                    "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                                    "numpy": np.random.get_state(), "python": random.getstate()},
                       os.path.join(path, f"rng_rank{self.rank}.pt"))
        model_file = self.consolidated_state()
        self.stop_if_a_write_failed(tag, pointer)
        if self.master:  # commit: the pointer, then the model file
            pointer_path = os.path.join(self.dir, pointer)
            old = read_pointer(pointer_path) if os.path.exists(pointer_path) else None
            self.try_write(write_atomically, pointer_path, tag)
            model_file.update(iter=client_state["iter"], val_loss=client_state.get("val_loss"))
            self.try_write(torch_save_atomic, model_file, self.model_file(pointer))
        self.stop_if_a_write_failed(tag, pointer)
        if self.master:
            # rotation: a superseded best goes; iteration checkpoints beyond the newest `keep` go
            # unless a pointer names them
            keep = self.pointed_tags()
            iters = sorted(t for t in os.listdir(self.dir) if t.startswith("iter_") and os.path.isdir(os.path.join(self.dir, t)))
            stale = ([old] if old and old.startswith("best_") else []) + (iters[:-self.keep] if self.keep > 0 else [])
            for t in stale:
                if t not in keep:
                    shutil.rmtree(os.path.join(self.dir, t), ignore_errors=True)
        dist.barrier()

    def stop_if_a_write_failed(self, tag, pointer):
        """Collective: if any rank's write failed, remove what the save left (the tag, unless a
        pointer already names it, and temporary files) and stop every rank; the first rank that
        failed says why, in one line."""
        mine = torch.tensor([self.rank if self.write_errors else self.world_size], device=self.device)
        first_failed = int(self.all_reduce(mine, dist.ReduceOp.MIN).item())
        if first_failed == self.world_size:
            return
        free_mib = shutil.disk_usage(self.out_dir).free / 2**20
        if self.master:
            if tag not in self.pointed_tags():
                shutil.rmtree(os.path.join(self.dir, tag), ignore_errors=True)
            for f in (os.path.join(self.dir, pointer), self.model_file(pointer)):
                if os.path.exists(f + ".tmp"):
                    os.remove(f + ".tmp")
        dist.barrier()
        if self.rank == first_failed:
            print(f"error: saving checkpoint {tag} failed ({self.write_errors[0]}; {free_mib:.0f} MiB free): the run "
                  f"stops; {self.dir}/latest and best still name complete checkpoints", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)

    def resume(self, tag, convert_from, backend):
        """Loads ckpt/<tag> into the engine (through its universal checkpoint when it was saved on
        convert_from ranks), the FP8 scaling state and this rank's RNG state; returns the client state."""
        engine, path = self.engine, os.path.join(self.dir, tag)
        if convert_from:
            built_groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
            _, client = engine.load_checkpoint(path, tag="universal")
            # Two faults of DeepSpeed's ZeRO-3 universal load (deepspeed/runtime/zero/stage3.py,
            # load_hp_checkpoint_state_from_checkpoint_dir_stage3), undone here:
            # 1. it hands one `step` tensor to every param group's state, and AdamW increments each
            #    group's step in place: the count went up by 2 per iteration (10 -> 22 in 6 steps, and
            #    saved so), with the bias corrections of those later steps. Each group gets its own copy;
            # 2. it gives every param group the first group's hyperparameters (["param_groups"][0]): the
            #    no-decay group (biases, LayerNorm) decayed. Each takes back the settings this run built
            #    it with (the run's own config; lr is set every iteration).
            # Measured (configs/tiny.py in bf16, saved on 2 ranks at iter 10, resumed on 1 to 16): its
            # losses were 1.9e-3 off the uninterrupted run, now 5.8e-5, as a 1-rank run from scratch (4e-5).
            for state in engine.optimizer.optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
            for group, built in zip(engine.optimizer.param_groups, built_groups):
                group.update(built)
            # a universal checkpoint restores parameters and optimizer state; the module's buffers
            # (the emulated and torch backends' FP8 scaling state) come from the model states themselves
            model_states = sorted(f for f in os.listdir(path) if f.endswith("model_states.pt"))
            saved = torch.load(os.path.join(path, model_states[0]), map_location=self.device, weights_only=False)["module"]
            persistent = self.model.state_dict().keys()  # saturation flags are per micro-batch, never saved
            for n, b in self.model.named_buffers():
                if n in persistent:
                    b.copy_(saved[n])
        else:
            _, client = engine.load_checkpoint(self.dir, tag=tag)  # copies into the fp32 FP8 buffers as they are
        if backend.name == "te":  # TE's scaling state, saved as plain tensors in the client state
            load_te_fp8_state(self.model, client.get("fp8_te_state", {}), backend.recipe)
        # every rank starts from the same seed, so a rank the checkpoint did not have takes rank 0's state
        rng_file = os.path.join(path, f"rng_rank{self.rank}.pt")
        rng = torch.load(rng_file if os.path.exists(rng_file) else os.path.join(path, "rng_rank0.pt"), weights_only=False)
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available() and rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        return client
