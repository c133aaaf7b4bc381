"""run_lock.py: one run per out_dir; a live holder blocks, a gone one is taken over."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from run_lock import STALE_S, LockHeld, RunLock, _start_time


def write_lock(out_dir, **holder):
    out_dir.mkdir(exist_ok=True)
    (out_dir / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                  "pid_start_time": _start_time(os.getpid()), "started": 0, **holder}))


def test_a_live_holder_blocks_and_is_named_until_it_releases(tmp_path):
    out_dir = tmp_path / "run"
    held = RunLock(str(out_dir)).acquire()
    holder = json.loads((out_dir / "run.lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and held.made_dir
    with pytest.raises(LockHeld, match=f"in use by another run \\(host {socket.gethostname()} PID {os.getpid()}"):
        RunLock(str(out_dir)).acquire()
    held.release()
    assert not out_dir.exists()  # the lock made the folder and nothing else was written there
    again = RunLock(str(out_dir)).acquire()
    (out_dir / "metrics.jsonl").write_text("{}\n")
    again.release()
    assert sorted(os.listdir(out_dir)) == ["metrics.jsonl"]  # a folder with the run's files stays


def test_a_lock_of_a_process_that_is_gone_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: the PID names no process now
    write_lock(tmp_path / "a", pid=dead.pid, pid_start_time=None)
    lock = RunLock(str(tmp_path / "a")).acquire()
    assert f"PID {dead.pid}" in lock.took_over and "its process is gone" in lock.took_over
    assert json.loads((tmp_path / "a" / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    # a recycled PID: our own, but a process started at another time
    write_lock(tmp_path / "b", pid_start_time=(_start_time(os.getpid()) or 0) + 1)
    assert "its process is gone" in RunLock(str(tmp_path / "b")).acquire().took_over


def test_another_hosts_lock_blocks_until_its_heartbeat_stops(tmp_path):
    out_dir = tmp_path / "run"
    write_lock(out_dir, host="another-node", pid=1)
    with pytest.raises(LockHeld, match="host another-node PID 1"):
        RunLock(str(out_dir)).acquire()
    past = time.time() - STALE_S - 60
    os.utime(out_dir / "run.lock", (past, past))
    lock = RunLock(str(out_dir)).acquire()
    assert "host another-node PID 1" in lock.took_over and "no heartbeat for" in lock.took_over
    # an unreadable lock is a holder between creating and writing it while it is fresh
    lock.release()
    (out_dir / "run.lock").write_text("")
    with pytest.raises(LockHeld, match="starting now"):
        RunLock(str(out_dir)).acquire()
    os.utime(out_dir / "run.lock", (past, past))
    assert "unreadable" in RunLock(str(out_dir)).acquire().took_over
