"""
One train.py per out_dir. Cluster schedulers requeue a job while the old one still runs, and two
runs on one out_dir would interleave their checkpoints and metrics; so the global rank 0 of a run
holds out_dir/run.lock for the run's lifetime.

The lock is a file created with O_CREAT | O_EXCL, which is atomic on local filesystems, NFSv3+ and
Lustre (where flock may not be honoured across nodes). It names its holder: host, PID, the PID's
start time (so that a recycled PID is not mistaken for the holder) and when the run started. The
holder refreshes its mtime every HEARTBEAT_S seconds from a daemon thread.

A lock whose holder is gone is stale: on the same host, no process with that PID and start time;
on another host, no heartbeat for STALE_S seconds, measured on the filesystem's own clock (the mtime
of a file touched now), so that the nodes' clocks need not agree. A stale lock is taken over: renamed
aside (of two takers one wins the rename), then created anew.
"""
import json
import os
import socket
import threading
import time

HEARTBEAT_S = 30
STALE_S = 300
LOCK_NAME = "run.lock"


class LockHeld(Exception):
    """Another live run holds the lock; the message names it."""


def _proc_stat(pid):
    """(state, start time in clock ticks since boot) from /proc/PID/stat (fields 3 and 22), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _start_time(pid):
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def _alive(pid, start_time):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    stat = _proc_stat(pid)
    if stat is None:  # no /proc (not Linux): the PID exists
        return True
    state, started = stat
    # a zombie (killed, not yet reaped) is gone; a recycled PID belongs to a process started later
    return state not in ("Z", "X") and (start_time is None or started == start_time)


def _filesystem_now(out_dir):
    """The filesystem's clock: the mtime of a file touched now (on NFS the server sets it)."""
    probe = os.path.join(out_dir, f".{LOCK_NAME}.clock.{socket.gethostname()}.{os.getpid()}")
    with open(probe, "w"):
        pass
    try:
        return os.stat(probe).st_mtime
    finally:
        os.remove(probe)


def _why_stale(path, holder, out_dir):
    """Why the lock's holder is gone, or None while it may be alive."""
    if holder is None:  # a holder between creating the file and writing it, or a damaged file
        silent = _filesystem_now(out_dir) - os.stat(path).st_mtime
        return f"its file is unreadable and {silent:.0f} s old" if silent > 2 * HEARTBEAT_S else None
    if holder.get("host") == socket.gethostname():
        if not _alive(holder.get("pid", -1), holder.get("pid_start_time")):
            return "its process is gone"
        return None
    silent = _filesystem_now(out_dir) - os.stat(path).st_mtime
    return f"no heartbeat for {silent:.0f} s" if silent > STALE_S else None


def _read(path):
    try:
        with open(path) as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):
        return None


def describe(holder):
    return (f"host {holder.get('host')} PID {holder.get('pid')}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started', 0)))}")


class RunLock:
    """acquire(): hold out_dir/run.lock (creating out_dir if needed), or raise LockHeld. `took_over`
    says whose stale lock it replaced, or is None. release() removes it, and out_dir too if the lock
    made it and it is still empty."""

    def __init__(self, out_dir):
        self.out_dir, self.path = out_dir, os.path.join(out_dir, LOCK_NAME)
        self.took_over, self.made_dir, self._stop = None, False, threading.Event()

    def acquire(self):
        if not os.path.isdir(self.out_dir):
            os.makedirs(self.out_dir)
            self.made_dir = True
        me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start_time": _start_time(os.getpid()),
              "started": time.time()}
        for _ in range(3):  # a lock that appears or goes while we look: look again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if not os.path.exists(self.path):
                    continue
                why = _why_stale(self.path, holder, self.out_dir)
                if why is None:
                    self.release_dir()
                    whose = describe(holder) if holder else "starting now"
                    raise LockHeld(f"{self.out_dir} is in use by another run ({whose}; {self.path}); "
                                   f"wait for it to end or stop it, or choose another out_dir")
                aside = f"{self.path}.stale.{me['host']}.{me['pid']}"
                try:
                    os.rename(self.path, aside)  # of two takers, one wins
                except FileNotFoundError:
                    continue
                os.remove(aside)
                self.took_over = f"{describe(holder) if holder else 'an unreadable lock'} ({why})"
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            threading.Thread(target=self._heartbeat, daemon=True).start()
            return self
        raise LockHeld(f"{self.path} keeps changing: another run is starting on {self.out_dir}")

    def _heartbeat(self):
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self):
        self._stop.set()
        holder = _read(self.path)
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            os.remove(self.path)
        self.release_dir()

    def release_dir(self):
        if self.made_dir:
            try:
                os.rmdir(self.out_dir)  # only if nothing else was written there
            except OSError:
                pass
