"""runlog.py: strict JSON lines, a line cut short by a kill dropped on resume, wandb's flat keys, and
a failed write kept for train.py to stop on (the runs themselves: tests/test_train.py)."""
import json
import math
import os

from runlog import RunLog, drop_cut_short_line, json_safe, wandb_row


def test_non_finite_numbers_are_strings_float_reads_back():
    row = {"loss": math.nan, "peak": [1.0, math.inf], "nested": {"x": -math.inf}, "n": 3, "s": "nan"}
    line = json.dumps(json_safe(row), allow_nan=False)
    back = json.loads(line)
    assert back == {"loss": "nan", "peak": [1.0, "inf"], "nested": {"x": "-inf"}, "n": 3, "s": "nan"}
    assert math.isnan(float(back["loss"])) and float(back["peak"][1]) == math.inf


def test_a_line_cut_short_goes_and_complete_lines_stay(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"iter": 1}\n{"iter": 2}\n{"iter": 3, "lo')
    drop_cut_short_line(str(path))
    assert path.read_bytes() == b'{"iter": 1}\n{"iter": 2}\n'
    assert "dropped its 15 bytes" in capsys.readouterr().out
    drop_cut_short_line(str(path))  # complete: untouched
    assert path.read_bytes() == b'{"iter": 1}\n{"iter": 2}\n'
    path.write_bytes(b'{"it')  # the first line cut short: the file empties
    drop_cut_short_line(str(path))
    assert path.read_bytes() == b""


def test_only_the_last_mebibyte_is_read(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    lines = b"".join(b'{"iter": %d}\n' % i for i in range(200000))  # ~2.5 MiB of complete lines
    path.write_bytes(lines + b'{"iter": 2000')
    drop_cut_short_line(str(path))
    assert path.read_bytes() == lines and "dropped its 13 bytes" in capsys.readouterr().out
    drop_cut_short_line(str(path))  # complete: untouched, and no note
    assert path.read_bytes() == lines and capsys.readouterr().out == ""
    path.write_bytes(lines + b"x" * (1 << 20) + b"y")  # no newline in the last MiB: not a line, left alone
    drop_cut_short_line(str(path))
    assert path.stat().st_size == len(lines) + (1 << 20) + 1 and capsys.readouterr().out == ""


def test_resuming_log_drops_the_fragment_and_appends(tmp_path):
    (tmp_path / "metrics.jsonl").write_bytes(b'{"iter": 1}\n{"iter": 2, "lo')
    log = RunLog(str(tmp_path), master=True, resuming=True)
    log({"iter": 2, "loss": math.nan})
    assert [json.loads(line) for line in open(tmp_path / "metrics.jsonl")] == [{"iter": 1}, {"iter": 2, "loss": "nan"}]
    assert log.write_failed is None


def test_only_rank_0_writes_and_a_failed_write_is_kept_not_raised(tmp_path):
    RunLog(str(tmp_path), master=False, resuming=False)({"iter": 1})
    assert not os.path.exists(tmp_path / "metrics.jsonl")
    log = RunLog(str(tmp_path / "gone"), master=True, resuming=False)  # a directory that does not exist
    log({"iter": 1})
    log({"iter": 2})
    assert log.write_failed == f"a failed write to {tmp_path}/gone/metrics.jsonl (No such file or directory)"


def test_wandb_rows_are_flat():
    row = {"iter": 5, "loss": 2.0, "act_max_per_layer": [1.5, 7.0],
           "fp8_quant_error": {"lm_head": {"input": {"rel_error": 0.03, "flushed": 0.0}}}}
    assert wandb_row(row) == {"iter": 5, "loss": 2.0, "act_max/layer0": 1.5, "act_max/layer1": 7.0,
                              "fp8_quant_error/lm_head/input/rel_error": 0.03,
                              "fp8_quant_error/lm_head/input/flushed": 0.0}


class Wandb:
    def __init__(self, fail_on_log):
        self.fail_on_log, self.rows, self.summary, self.finished = fail_on_log, [], {}, False

    def finish(self):
        self.finished = True

    def log(self, row):
        if self.fail_on_log:
            raise ConnectionError("wandb is down")
        self.rows.append(row)


def test_a_failing_wandb_turns_itself_off_and_metrics_go_on(tmp_path, capsys):
    log = RunLog(str(tmp_path), master=True, resuming=False)
    log.wandb = Wandb(fail_on_log=True)
    log({"iter": 1})
    log({"iter": 2})
    assert log.wandb is None and capsys.readouterr().out.count("warning: wandb.log failed (ConnectionError") == 1
    assert len(open(tmp_path / "metrics.jsonl").readlines()) == 2


def test_summary_and_finish_reach_wandb_and_other_ranks_start_none(tmp_path):
    log = RunLog(str(tmp_path), master=True, resuming=False)
    log.summary(best_val_loss=2.5)  # no wandb: nothing to do, nothing raised
    log.finish()
    log.wandb = run = Wandb(fail_on_log=False)
    log.summary(best_val_loss=2.5)
    log.finish()
    assert run.summary == {"best_val_loss": 2.5} and run.finished
    other = RunLog(str(tmp_path), master=False, resuming=False)
    assert other.start_wandb("p", "n", {}, "offline", "abc") == "abc" and other.wandb is None
    assert not os.path.exists(tmp_path / "wandb")
