"""Shared fixtures.

- ``db``: a fresh database path per test (also exported as QUEUECTL_DB).
- ``cli(*args, stdin=None)``: runs ``queuectl.main(argv)`` in process.
- ``run(*args, stdin=None)``: runs the real program as a subprocess; the
  command comes from QUEUECTL_CMD, so the same tests run against
  ``queuectl.py`` and against ``dist/queuectl.pyz``.
- ``workers``: starts foreground worker supervisors; teardown kills every
  process they started, by PID.  Every process the test starts from then on
  (supervisors, workers, jobs and whatever the jobs start, detached or not)
  carries a marker in its environment (``process_mark``), and teardown kills
  them all by that marker too: whatever state the run was in, nothing is left.
- ``process_mark``: that marker alone, for tests that start processes without
  workers; ``marked_processes(mark)`` lists the live ones.
- ``wait_until(predicate, timeout)``: poll with a deadline instead of sleeping.
- ``pg_url``: a postgresql:// URL of a fresh, empty schema on the test server
  ($QUEUECTL_TEST_PG, default postgresql://postgres@127.0.0.1:5432/test),
  dropped after the test.  With QUEUECTL_TEST_BACKEND=postgres, ``db`` is such
  a URL instead of a file, so the end-to-end suite runs on PostgreSQL.
- ``db_rows(db, sql, params)``: read the database straight (SQLite file or
  PostgreSQL URL; ``?`` placeholders either way).
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

#: Which backend the ``db`` fixture gives: "sqlite" (a file) or "postgres" (a fresh schema's URL).
BACKEND = os.environ.get("QUEUECTL_TEST_BACKEND", "sqlite")
if BACKEND not in ("sqlite", "postgres"):
    raise RuntimeError("QUEUECTL_TEST_BACKEND must be sqlite or postgres, not %r" % BACKEND)
PG_TEST_URL = os.environ.get("QUEUECTL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")

try:
    import psycopg
except ImportError:  # the SQLite tests run without it; the PostgreSQL ones fail, never skip
    psycopg = None

#: What reading a database straight may raise (a file being created, a schema being migrated).
DB_ERRORS = (sqlite3.Error,) + ((psycopg.Error,) if psycopg else ())


def program():
    cmd = os.environ.get("QUEUECTL_CMD")
    return shlex.split(cmd) if cmd else [sys.executable, str(ROOT / "queuectl.py")]


_PROGRAM_PYTHON = []


def program_python():
    """(major, minor) of the Python that runs the program under test (QUEUECTL_CMD may name another)."""
    if not _PROGRAM_PYTHON:
        argv = program()
        exe = argv[0] if "python" in os.path.basename(argv[0]) else sys.executable
        out = subprocess.run([exe, "-c", "import sys; print('%d %d' % sys.version_info[:2])"], capture_output=True,
                             text=True, timeout=60).stdout.split()
        _PROGRAM_PYTHON.append(tuple(int(x) for x in out))
    return _PROGRAM_PYTHON[0]


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
def db(tmp_path, monkeypatch, request):
    if BACKEND == "postgres":
        path = request.getfixturevalue("pg_url")
        # workers started detached log to the per-user data directory: keep it inside the test's
        monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    else:
        path = tmp_path / "q.db"
    monkeypatch.setenv("QUEUECTL_DB", str(path))
    monkeypatch.chdir(tmp_path)
    return path


# --- PostgreSQL --------------------------------------------------------------------

_PG_CONNS = {}  # URL -> the open connection db_rows reads it with


def pg_schema_of(url):
    import queuectl_pg

    return queuectl_pg.parse_url(url)[1]


def _pg_conn(url):
    conn = _PG_CONNS.get(url)
    if conn is None or conn.closed:
        import queuectl_pg

        conninfo, schema = queuectl_pg.parse_url(url)
        conn = psycopg.connect(conninfo, autocommit=True, connect_timeout=10)
        conn.execute('SET search_path TO "%s"' % schema)
        _PG_CONNS[url] = conn
    return conn


def new_pg_url(base=None):
    """The URL of a schema no one uses yet (queuectl creates it on first open)."""
    import secrets

    base = base or PG_TEST_URL
    return base + ("&" if "?" in base else "?") + "schema=qt_%d_%s" % (os.getpid(), secrets.token_hex(4))


def drop_pg_schema(url):
    """Drop a test schema, after ending any server session still holding it (of a killed process)."""
    conn = _PG_CONNS.pop(url, None)
    if conn is not None:
        conn.close()
    import queuectl_pg

    conninfo, schema = queuectl_pg.parse_url(url)
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as admin:
        admin.execute("SET lock_timeout = '2s'")
        deadline = time.monotonic() + 30
        while True:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE application_name = %s AND pid <> pg_backend_pid()", ("queuectl:" + schema,))
            try:
                admin.execute('DROP SCHEMA IF EXISTS "%s" CASCADE' % schema)
                return
            except psycopg.errors.LockNotAvailable:
                if time.monotonic() > deadline:
                    raise


def pytest_collection_modifyitems(config, items):
    """With QUEUECTL_TEST_BACKEND=postgres every test on the ``db`` fixture needs the server:
    mark it ``postgres`` (so ``-m "not postgres"`` leaves the whole PostgreSQL run out)."""
    if BACKEND == "postgres":
        for item in items:
            if "db" in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.postgres)


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL schema's URL; the schema is dropped after the test."""
    if psycopg is None:
        raise RuntimeError("the PostgreSQL tests need psycopg: pip install 'psycopg[binary]'")
    url = new_pg_url()
    yield url
    drop_pg_schema(url)


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
    if queuectl.is_db_url(db):  # QUEUECTL_TEST_BACKEND=postgres: time injected by the test, as with SQLite
        import queuectl_pg

        s = queuectl_pg.PostgresStore(str(db), clock="caller")
    else:
        s = queuectl.SqliteStore(str(db))
    yield s
    s.close()


def program_env(db):
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
            capture_output=True, timeout=timeout, cwd=cwd or tmp_path, env=env or program_env(db),
            stdin=None if stdin is not None else subprocess.DEVNULL,
        )
        return Result(proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace"))

    return call


def sqlite_at_version(path, number):
    """A new SQLite database of schema version ``number`` (an older queuectl's), open for the test
    to fill in before a store migrates it."""
    conn = sqlite3.connect(str(path), isolation_level=None)
    for script in queuectl.SCHEMA[:number]:
        for statement in queuectl._split_sql(script):
            conn.execute(statement)
    conn.execute("PRAGMA user_version = %d" % number)
    return conn


def db_rows(db, sql, params=()):
    """Rows (tuples) of ``sql`` read straight from the database: an SQLite file, or the schema of a
    postgresql:// URL.  ``?`` placeholders work for both."""
    if queuectl.is_db_url(db):
        if params:
            sql = sql.replace("%", "%%").replace("?", "%s")
        try:
            cur = _pg_conn(str(db)).execute(sql, tuple(params) or None)
            return cur.fetchall() if cur.description is not None else []
        except psycopg.OperationalError:
            _PG_CONNS.pop(str(db), None)
            raise
    conn = sqlite3.connect(str(db), timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def states(db):
    return dict(db_rows(db, "SELECT id, state FROM jobs"))

def state_of(db, job_id):
    rows = db_rows(db, "SELECT state FROM jobs WHERE id = ?", (job_id,))
    return rows[0][0] if rows else None


def wait_state(db, job_id, wanted, timeout=20):
    wanted = {wanted} if isinstance(wanted, str) else set(wanted)
    wait_until(lambda: state_of(db, job_id) in wanted, timeout,
               message="job %s never reached %s (is %s)" % (job_id, wanted, state_of(db, job_id)))



# --- processes a test started, found by a marker in their environment ---------------------

#: The environment variable that marks every process a test starts (jobs inherit it from their
#: worker, grandchildren from the job), as the chaos suite does with CHAOS_TAG.
MARK_VAR = "QUEUECTL_TEST_MARK"


def marked_processes(mark):
    """Pids of the live (non-zombie) processes whose environment carries ``MARK_VAR=mark``."""
    needle = ("%s=%s" % (MARK_VAR, mark)).encode()
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open("/proc/%s/environ" % name, "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open("/proc/%s/stat" % name, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if stat[stat.rindex(b")") + 2:][:1] not in (b"Z", b"X"):
            found.append(int(name))
    return found


def kill_marked(mark, timeout=10.0):
    """SIGKILL, by PID, every process carrying the marker, until none is left (a process may
    fork while we look).  Returns the pids killed."""
    killed = set()
    deadline = time.monotonic() + timeout
    while True:
        pids = marked_processes(mark)
        if not pids:
            return killed
        if time.monotonic() > deadline:
            raise AssertionError("processes of this test still alive after SIGKILL: %s" % pids)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        time.sleep(0.01)


@pytest.fixture
def process_mark(monkeypatch):
    """A marker put in this process's environment, so every process the test starts from now on
    inherits it; teardown kills every live process that carries it, by PID."""
    import secrets

    mark = secrets.token_hex(8)
    monkeypatch.setenv(MARK_VAR, mark)
    yield mark
    kill_marked(mark)


def pids_of_database(db):
    """Every worker, supervisor and job process recorded in the database."""
    pids = set()
    with contextlib.suppress(*DB_ERRORS):
        for pid, sup in db_rows(db, "SELECT pid, supervisor_pid FROM workers"):
            pids.add(pid)
            if sup:
                pids.add(sup)
    return pids


def job_pgids(db):
    with contextlib.suppress(*DB_ERRORS):
        return {r[0] for r in db_rows(db, "SELECT pid FROM attempts WHERE pid IS NOT NULL")}
    return set()


class Workers:
    """Foreground worker supervisors started by a test; all killed by PID at teardown."""

    def __init__(self, db, tmp_path, mark=None):
        self.db = db
        self.tmp_path = tmp_path
        self.mark = mark  # MARK_VAR of every process started (kill_all kills them all by it)
        self.procs = []
        self.extra_pids = set()

    def start(self, count=1, poll=0.05, env=None, args=(), db=None):
        """``db``: the URL the workers are given, when it is not the one the test reads (a pooler's)."""
        log = open(self.tmp_path / ("workers-%d.log" % len(self.procs)), "wb")
        argv = program() + ["--db", str(db or self.db), "worker", "start", "--foreground", "-c", str(count),
                            "--poll-interval", str(poll)] + list(args)
        env = dict(env or program_env(self.db))
        if self.mark:
            env[MARK_VAR] = self.mark
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=self.tmp_path, start_new_session=True)
        log.close()
        self.procs.append(proc)
        wait_until(lambda: len(self.children(proc.pid)) >= count or proc.poll() is not None, 20,
                   message="workers did not register")
        assert proc.poll() is None, self.log(len(self.procs) - 1)
        return proc

    def children(self, supervisor_pid):
        with contextlib.suppress(*DB_ERRORS):
            return [r[0] for r in db_rows(self.db, "SELECT pid FROM workers WHERE supervisor_pid = ?",
                                          (supervisor_pid,))]
        return []

    def log(self, index=0):
        return (self.tmp_path / ("workers-%d.log" % index)).read_text(errors="replace")

    def kill_all(self):
        """Kill, by PID, the supervisors, every worker and job recorded in the database, and
        then every process carrying the test's marker: a job whose pid was not recorded yet,
        a grandchild that left its process group, a detached supervisor."""
        pids = {p.pid for p in self.procs} | pids_of_database(self.db) | self.extra_pids
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for pgid in job_pgids(self.db):
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)
        if self.mark:
            kill_marked(self.mark)
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.wait(timeout=10)


@pytest.fixture
def workers(db, tmp_path, process_mark):
    w = Workers(db, tmp_path, mark=process_mark)
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
