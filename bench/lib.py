"""Shared helpers of the benchmarks: statistics, tables, processes, FIFOs.

Nothing here knows about queuectl or a peer; see goals.py and peers.py.
"""

import contextlib
import math
import os
import platform
import re
import select
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PY = sys.executable  # the interpreter the bench runs on; queuectl's CLI is run with it too


# --- statistics ------------------------------------------------------------------


def percentile(values, p):
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    v = sorted(values)
    if not v:
        return float("nan")
    k = max(0, min(len(v) - 1, math.ceil(p / 100.0 * len(v)) - 1))
    return v[k]


def median(values):
    v = sorted(values)
    if not v:
        return float("nan")
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2.0


def summary(values):
    """{'n', 'p50', 'p99', 'min', 'max'} of a list of numbers."""
    return {"n": len(values), "p50": median(values), "p99": percentile(values, 99),
            "min": min(values) if values else float("nan"), "max": max(values) if values else float("nan")}


# --- formatting ------------------------------------------------------------------


def ms(seconds, digits=1):
    if seconds is None or seconds != seconds:
        return "-"
    return "%.*f ms" % (digits, seconds * 1000.0)


def us(seconds):
    if seconds is None or seconds != seconds:
        return "-"
    return "%.0f µs" % (seconds * 1e6)


def rate(per_second):
    if per_second is None or per_second != per_second:
        return "-"
    if per_second >= 10000:
        return "%.0fk/s" % (per_second / 1000.0)
    if per_second >= 1000:
        return "%.2fk/s" % (per_second / 1000.0)
    if per_second < 10:
        return "%.1f/s" % per_second
    return "%.0f/s" % per_second


def ratio(x, digits=2):
    if x is None or x != x:
        return "-"
    return "%.*fx" % (digits, x)


def mib(nbytes):
    return "%.1f MiB" % (nbytes / 1048576.0)


def verdict(ok):
    if ok is None:
        return "n/a"
    return "**met**" if ok else "**NOT met**"


def md_table(headers, rows):
    """A Markdown pipe table (printed as is, and pasted into docs/performance.md)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in cells:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))
    line = lambda r: "| " + " | ".join(c.ljust(widths[i]) for i, c in enumerate(r)) + " |"  # noqa: E731
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


# --- the machine -----------------------------------------------------------------


def machine_info():
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = "%.0f GiB" % (int(line.split()[1]) / 1048576.0)
    fs = ""
    with contextlib.suppress(Exception):
        out = subprocess.run(["df", "-T", str(ROOT)], capture_output=True, text=True).stdout.splitlines()[-1].split()
        fs = "%s on %s" % (out[1], out[0])
    return {
        "nproc": os.cpu_count(), "cpu": cpu, "memory": mem, "kernel": platform.release(),
        "python": platform.python_version(), "python_executable": sys.executable,
        "sqlite": sqlite3.sqlite_version, "filesystem": fs, "os": _os_name(),
    }


def _os_name():
    with contextlib.suppress(OSError):
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    return platform.system()


def load_average():
    with contextlib.suppress(OSError):
        return os.getloadavg()
    return (float("nan"),) * 3


# --- processes -------------------------------------------------------------------


def cli_env(**extra):
    """The environment CLI programs run in: a user's default, so PYTHONDONTWRITEBYTECODE
    (set in some sandboxes) is dropped and the bytecode cache works as on a normal machine."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("NO_COLOR", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cpu_seconds(pid):
    """utime + stime of a process, in seconds (Linux /proc)."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read().decode()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid, key="VmRSS"):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def kill_pids(pids, sig=signal.SIGKILL):
    for pid in pids:
        if pid and pid > 1 and pid != os.getpid():
            with contextlib.suppress(OSError):
                os.kill(pid, sig)


def kill_group(pgid, sig=signal.SIGKILL):
    if pgid and pgid > 1:
        with contextlib.suppress(OSError):
            os.killpg(pgid, sig)


def wait_for(predicate, timeout, interval=0.005, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("%s not reached within %gs" % (what, timeout))
        time.sleep(interval)


# --- a FIFO that tells when a job's process ran ------------------------------------


class StartProbe:
    """A named pipe that jobs write a token into (``echo TOKEN > FIFO``).

    A reader thread keeps the read end open (with a spare writer of our own, so
    it never sees end-of-file) and stamps each token with the monotonic time it
    arrived, so a job that starts before its enqueue call has returned shows a
    negative latency instead of zero.  ``wait(token)`` returns that time.
    """

    def __init__(self, path):
        import threading

        self.path = str(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.mkfifo(self.path, 0o600)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self._keep = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        self._stop_r, self._stop_w = os.pipe()
        self.arrived = {}
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._reader, daemon=True)
        self.thread.start()

    def _reader(self):
        buf = b""
        while True:
            ready, _, _ = select.select([self.fd, self._stop_r], [], [])
            now = time.monotonic()
            if self._stop_r in ready:
                return
            with contextlib.suppress(BlockingIOError):
                buf += os.read(self.fd, 65536)
            lines = buf.split(b"\n")
            buf = lines.pop()
            with self.cond:
                for line in lines:
                    self.arrived.setdefault(line.strip().decode(errors="replace"), now)
                self.cond.notify_all()

    def command(self, token):
        return "echo %s > %s" % (token, self.path)

    def drain(self):
        with self.cond:
            self.arrived.clear()

    def wait(self, token, timeout=30.0):
        token = str(token)
        with self.cond:
            if not self.cond.wait_for(lambda: token in self.arrived, timeout):
                raise TimeoutError("token %s did not arrive within %gs" % (token, timeout))
            return self.arrived.pop(token)

    def close(self):
        os.write(self._stop_w, b"x")
        self.thread.join(5)
        for fd in (self.fd, self._keep, self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class Gate:
    """Blocker jobs for drain tests: each announces itself in a file, then waits
    on a FIFO until ``release()``; so N jobs can be queued behind busy workers."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.fifo = str(self.dir / "gate.fifo")
        self.log = str(self.dir / "gate.started")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.fifo)
        os.mkfifo(self.fifo, 0o600)
        Path(self.log).write_text("")

    def command(self, i):
        return "echo %d >> %s; cat %s > /dev/null" % (i, self.log, self.fifo)

    def started(self):
        with contextlib.suppress(OSError):
            return len(Path(self.log).read_text().split())
        return 0

    def wait_started(self, n, timeout=60):
        wait_for(lambda: self.started() >= n, timeout, 0.005, "%d blocker jobs started" % n)
        time.sleep(0.05)  # let each reach its open() of the FIFO

    def release(self):
        """Open and close the writer end: every blocker's cat sees end-of-file."""
        fd = os.open(self.fifo, os.O_WRONLY)
        os.close(fd)

    def reset(self):
        Path(self.log).write_text("")


def run_quiet(argv, timeout=600, **kw):
    return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=timeout, **kw)


def sh_quote(s):
    return "'" + str(s).replace("'", "'\\''") + "'"


def slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
