"""
What a run logs, from rank 0: out_dir/metrics.jsonl (strict JSON, one object per line) and, when
asked, wandb. Neither stops training: wandb's failures turn wandb off with a warning, and a failed
write to metrics.jsonl (a full disk) is kept in write_failed for train.py to stop on, with a checkpoint.
"""
import json
import math
import os


def json_safe(v):
    """metrics.jsonl is strict JSON: a non-finite float is written as the string "nan", "inf" or
    "-inf", which float() reads back."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def drop_cut_short_line(path):
    """A run killed while writing metrics.jsonl leaves its last line cut short, and appending after
    it would fuse that fragment with the next line into one unreadable line. The fragment goes (the
    resume redoes its iteration, and logs it again)."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        start = max(0, size - (1 << 20))  # a line is far shorter than 1 MiB
        f.seek(start)
        tail = f.read()
        if not tail or tail.endswith(b"\n") or (b"\n" not in tail and start > 0):
            return
        keep = start + tail.rfind(b"\n") + 1
        f.truncate(keep)
    print(f"note: {path} ended in a line cut short (the run was killed while writing it): "
          f"dropped its {size - keep} bytes")


def wandb_row(row):
    """A metrics.jsonl row as wandb's flat keys: per-layer maxima and the quantization-error tree
    become one key each."""
    flat = {k: v for k, v in row.items() if not isinstance(v, (dict, list))}
    flat.update({f"act_max/layer{i}": v for i, v in enumerate(row.get("act_max_per_layer", []))})
    flat.update({f"fp8_quant_error/{gemm}/{role}/{k}": v for gemm, roles in row.get("fp8_quant_error", {}).items()
                 for role, stats in roles.items() for k, v in stats.items()})
    return flat


class RunLog:
    def __init__(self, out_dir, master, resuming):
        self.out_dir, self.path, self.master = out_dir, os.path.join(out_dir, "metrics.jsonl"), master
        self.wandb = None
        self.write_failed = None  # why the last write to metrics.jsonl failed
        if master and resuming and os.path.exists(self.path):
            drop_cut_short_line(self.path)

    def start_wandb(self, project, name, config, mode, run_id):
        """A wandb run (resumed when run_id names one); returns its id, or run_id when wandb fails."""
        if not self.master:
            return run_id
        try:
            import wandb
            self.wandb = wandb.init(project=project, name=name, config=config, mode=mode, id=run_id,
                                    resume="allow" if run_id else None, dir=self.out_dir)
            # Every metric is plotted against `iter`, and wandb's own step just counts log calls:
            # a resumed run redoes the iterations after its checkpoint, and wandb drops a row
            # logged at a step at or below the last one it has, so step=iter would lose them
            self.wandb.define_metric("iter")
            self.wandb.define_metric("*", step_metric="iter")
            return self.wandb.id
        except Exception as e:
            print(f"warning: wandb.init failed ({type(e).__name__}: {e}); logging to metrics.jsonl only", flush=True)
            self.wandb = None
            return run_id

    def __call__(self, row):
        if not self.master:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(json_safe(row), allow_nan=False) + "\n")
        except OSError as e:
            self.write_failed = self.write_failed or f"a failed write to {self.path} ({e.strerror})"
        if self.wandb is not None:
            try:
                self.wandb.log(wandb_row(row))  # plotted against `iter` (define_metric), never step=iter
            except Exception as e:  # wandb never stops training
                print(f"warning: wandb.log failed ({type(e).__name__}: {e}); wandb logging off", flush=True)
                self.wandb = None

    def summary(self, **kw):
        if self.wandb is not None:
            try:
                self.wandb.summary.update(kw)
            except Exception:
                pass

    def finish(self):
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:
                pass
