"""Shared fixtures.

- ``db``: a fresh database path per test (also exported as QUEUECTL_DB).
- ``cli(*args, stdin=None)``: runs ``queuectl.main(argv)`` in process.
- ``run(*args, stdin=None)``: runs the real program as a subprocess; the
  command comes from QUEUECTL_CMD, so the same tests run against
  ``queuectl.py`` and against ``dist/queuectl.pyz``.
- ``workers``: starts foreground worker supervisors; teardown kills every
  process they started, by PID.
- ``wait_until(predicate, timeout)``: poll with a deadline instead of sleeping.
"""

import contextlib
import dataclasses
import io
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import queuectl  # noqa: E402


def program():
    cmd = os.environ.get("QUEUECTL_CMD")
    return shlex.split(cmd) if cmd else [sys.executable, str(ROOT / "queuectl.py")]


def wait_until(predicate, timeout=10.0, interval=0.01, message=None):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message or "condition not met within %gs" % timeout)
        time.sleep(interval)


@dataclasses.dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def lines(self):
        return self.out.splitlines()


@pytest.fixture
def db(tmp_path, monkeypatch):
    path = tmp_path / "q.db"
    monkeypatch.setenv("QUEUECTL_DB", str(path))
    monkeypatch.chdir(tmp_path)
    return path


class _Stdin(io.TextIOWrapper):
    def isatty(self):
        return False


@pytest.fixture
def cli(db, capsys, monkeypatch):
    def call(*args, stdin=None):
        capsys.readouterr()
        data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
        monkeypatch.setattr(sys, "stdin", _Stdin(io.BytesIO(data), encoding="utf-8"))
        rc = queuectl.main([str(a) for a in args])
        captured = capsys.readouterr()
        return Result(rc, captured.out, captured.err)

    return call


@pytest.fixture
def store(db):
    s = queuectl.SqliteStore(str(db))
    yield s
    s.close()


def test_env(db):
    env = dict(os.environ)
    env["QUEUECTL_DB"] = str(db)
    env.pop("NO_COLOR", None)
    # Keep a .pyz's extraction cache inside the project build dir, not in ~/.shiv.
    env.setdefault("SHIV_ROOT", str(ROOT / "build" / "shiv-root"))
    return env


@pytest.fixture
def run(db, tmp_path):
    def call(*args, stdin=None, timeout=60, env=None, cwd=None):
        proc = subprocess.run(
            program() + [str(a) for a in args], input=stdin.encode() if isinstance(stdin, str) else stdin,
            capture_output=True, timeout=timeout, cwd=cwd or tmp_path, env=env or test_env(db),
            stdin=None if stdin is not None else subprocess.DEVNULL,
        )
        return Result(proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace"))

    return call


def db_rows(db, sql, params=()):
    conn = sqlite3.connect(str(db), timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def states(db):
    return dict(db_rows(db, "SELECT id, state FROM jobs"))


def pids_of_database(db):
    """Every worker, supervisor and job process recorded in the database."""
    pids = set()
    with contextlib.suppress(sqlite3.Error):
        for pid, sup in db_rows(db, "SELECT pid, supervisor_pid FROM workers"):
            pids.add(pid)
            if sup:
                pids.add(sup)
    return pids


def job_pgids(db):
    with contextlib.suppress(sqlite3.Error):
        return {r[0] for r in db_rows(db, "SELECT pid FROM attempts WHERE pid IS NOT NULL")}
    return set()


class Workers:
    """Foreground worker supervisors started by a test; all killed by PID at teardown."""

    def __init__(self, db, tmp_path):
        self.db = db
        self.tmp_path = tmp_path
        self.procs = []
        self.extra_pids = set()

    def start(self, count=1, poll=0.05, env=None, args=()):
        log = open(self.tmp_path / ("workers-%d.log" % len(self.procs)), "wb")
        argv = program() + ["--db", str(self.db), "worker", "start", "--foreground", "-c", str(count),
                            "--poll-interval", str(poll)] + list(args)
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env or test_env(self.db), cwd=self.tmp_path, start_new_session=True)
        log.close()
        self.procs.append(proc)
        wait_until(lambda: len(self.children(proc.pid)) >= count or proc.poll() is not None, 20,
                   message="workers did not register")
        assert proc.poll() is None, self.log(len(self.procs) - 1)
        return proc

    def children(self, supervisor_pid):
        with contextlib.suppress(sqlite3.Error):
            return [r[0] for r in db_rows(self.db, "SELECT pid FROM workers WHERE supervisor_pid = ?",
                                          (supervisor_pid,))]
        return []

    def log(self, index=0):
        return (self.tmp_path / ("workers-%d.log" % index)).read_text(errors="replace")

    def kill_all(self):
        pids = {p.pid for p in self.procs} | pids_of_database(self.db) | self.extra_pids
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for pgid in job_pgids(self.db):
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.wait(timeout=10)


@pytest.fixture
def workers(db, tmp_path):
    w = Workers(db, tmp_path)
    yield w
    w.kill_all()


def pid_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2:][:1] != b"Z"
    except OSError:
        return False
