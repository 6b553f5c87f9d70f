"""Faults: the database locked, read-only, full, deleted or overwritten, and
``kill -9`` of a worker at the worst moments.

Each test runs the real program as separate processes.  The rule for every
failure a user can meet: a distinct exit code (75 = busy, safe to retry; 74 =
the database is unusable), exactly one ``queuectl: error:`` line on stderr,
no traceback, and nothing half-written.
"""

import contextlib
import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import conftest
from conftest import ROOT, db_rows, pid_exists, program, state_of, wait_until

ERROR = "queuectl: error: "


def env_of(db):
    return conftest.program_env(db)  # (not imported by name: pytest would collect a test_* function)


def one_error_line(r, code, *words):
    """The failure rule: exit ``code``, one ``queuectl: error:`` line naming ``words``, no traceback."""
    text = r.out + r.err
    assert "Traceback" not in text, text
    assert r.rc == code, (r.rc, r.err)
    lines = r.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR), r.err
    for w in words:
        assert w in lines[0], (w, lines[0])


def dump(db):
    """Every row of every table but the statistics: what 'nothing changed' compares."""
    conn = sqlite3.connect("file:%s?mode=ro" % db, uri=True, timeout=30)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: sorted(map(repr, conn.execute("SELECT * FROM %s" % t))) for t in tables if t != "stats"}
    finally:
        conn.close()


def integrity(db):
    return db_rows(db, "PRAGMA integrity_check")[0][0]


def attempts_of(db, job_id):
    return db_rows(db, "SELECT n, outcome, error, pid FROM attempts WHERE job_id = ? ORDER BY n", (job_id,))


def read_pids(path):
    with contextlib.suppress(OSError):
        return [int(x) for x in path.read_text().split()]
    return []


def seed(run, db):
    """A database with a job in several states, for 'nothing changed' checks."""
    assert run("enqueue", '{"id":"pending1","command":"true"}').rc == 0
    assert run("config", "set", "max-retries", "2").rc == 0
    import queuectl

    store = queuectl.SqliteStore(str(db))
    try:
        for jid, state in (("done1", "completed"), ("dead1", "dead")):
            store.enqueue([queuectl.validate_job({"id": jid, "command": "true", "priority": "high",
                                                  "max_retries": 0}, store.config(), time.time())], time.time())
            job = store.claim("w-seed", "seed-host", time.time() + 1, 30)
            assert job.id == jid
            store.finish(jid, job.runs, "w-seed", state, time.time() + 1, "completed" if state == "completed"
                         else "failed", 0 if state == "completed" else 1)
    finally:
        store.close()


# --- a locked database -------------------------------------------------------------------------

LOCKER = textwrap.dedent("""\
    import sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
    if sys.argv[2] == "readers-too":
        conn.execute("PRAGMA locking_mode = EXCLUSIVE")
    conn.execute("BEGIN EXCLUSIVE")
    conn.execute("UPDATE config SET value = value")
    print("locked", flush=True)
    sys.stdin.read()
    conn.execute("ROLLBACK")
""")


@contextlib.contextmanager
def locked(db, mode):
    """Another process holds the database's write lock (and with ``readers-too``, every lock)."""
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, str(db), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"locked\n"
        yield proc
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def timed(run, *args, stdin=None):
    t0 = time.monotonic()
    r = run(*args, stdin=stdin)
    return r, time.monotonic() - t0


@pytest.mark.e2e
def test_database_locked_longer_than_busy_timeout_exits_75_and_writes_nothing(run, db):
    seed(run, db)
    before = dump(db)
    writes = [
        ("enqueue", '{"id":"new1","command":"true"}'),
        ("enqueue", "-", '{"id":"b1","command":"true"}\n{"id":"b2","command":"true"}\n'),
        ("enqueue", "--", "echo", "hi"),
        ("config", "set", "max-retries", "7"),
        ("dlq", "retry", "dead1"),
        ("clear", "--state", "completed"),
        ("cancel", "pending1"),
    ]
    reads = [("list",), ("status",), ("get", "done1", "--json"), ("config", "show")]
    with locked(db, "writers"):
        with ThreadPoolExecutor(len(writes) + len(reads)) as pool:
            w = [pool.submit(timed, run, *(a[:-1] if a[1] == "-" else a), stdin=a[-1] if a[1] == "-" else None)
                 for a in writes]
            rd = [pool.submit(timed, run, *a) for a in reads]
            for args, f in zip(reads, rd):
                r, _ = f.result()
                assert r.rc == 0 and r.err == "", (args, r)  # WAL: readers are not blocked by a writer
            for args, f in zip(writes, w):
                r, took = f.result()
                one_error_line(r, 75, "locked", "try again")
                assert took >= 4.5, (args, took)  # it waited for the busy timeout before giving up
                assert r.out == "", (args, r.out)  # no id printed for a job that was not written
    assert dump(db) == before, "a command that exited 75 changed the database"
    assert integrity(db) == "ok"
    r = run("enqueue", '{"id":"new1","command":"true"}')  # 75 means: safe to retry
    assert r.rc == 0 and r.out == "new1\n"


@pytest.mark.e2e
def test_database_locked_even_for_readers_exits_75(run, db):
    seed(run, db)
    before = dump(db)
    with locked(db, "readers-too"):
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda a: run(*a), [("list",), ("status", "--json"), ("get", "done1")]))
    for r in results:
        one_error_line(r, 75, "locked")
        assert r.out == ""
    assert dump(db) == before
    assert run("list").rc == 0


# --- a read-only database -----------------------------------------------------------------------


@pytest.fixture
def read_only_db(run, db):
    """A seeded database made read-only in a way that also binds root (chattr +i), or by mode for others."""
    seed(run, db)
    if os.geteuid() != 0:
        os.chmod(db, 0o444)
        yield db
        os.chmod(db, 0o644)
        return
    if not shutil.which("chattr"):
        pytest.skip("running as root without chattr: file modes do not stop root from writing")
    r = subprocess.run(["chattr", "+i", str(db)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("running as root and chattr +i is not supported here: %s" % r.stderr.decode().strip())
    try:
        yield db
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=True)


@pytest.mark.e2e
def test_read_only_database_reads_work_and_writes_fail_clearly(run, read_only_db):
    db = read_only_db
    before = dump(db)
    for args in (("list",), ("status",), ("get", "done1"), ("config", "show"), ("dlq", "list"), ("logs", "done1"),
                 ("worker", "status")):
        r = run(*args)
        assert r.rc == 0, (args, r)
        assert "Traceback" not in r.err
    assert "pending1" in run("list").out
    writes = [("enqueue", '{"id":"new1","command":"true"}'), ("enqueue", "--", "true"),
              ("config", "set", "max-retries", "5"), ("dlq", "retry", "dead1"), ("clear", "--state", "completed"),
              ("cancel", "pending1"), ("worker", "start", "--burst"), ("worker", "start", "--foreground"),
              ("worker", "start")]
    with ThreadPoolExecutor(len(writes)) as pool:
        results = list(pool.map(lambda a: run(*a, timeout=30), writes))
    for args, r in zip(writes, results):
        one_error_line(r, 74, "read-only")
    assert dump(db) == before
    assert not list(db.parent.glob("*.workers.log")) or "Traceback" not in "".join(
        p.read_text() for p in db.parent.glob("*.workers.log"))


# --- a full disk ----------------------------------------------------------------------------------


def run_with_file_limit(db, limit, *args, stdin=None):
    def limit_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(program() + [str(a) for a in args], input=stdin, capture_output=True, timeout=60,
                          env=env_of(db), cwd=str(db.parent), preexec_fn=limit_files)
    from conftest import Result

    return Result(proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace"))


@pytest.mark.e2e
def test_full_disk_enqueue_fails_clearly_and_database_stays_intact(run, db):
    seed(run, db)
    before = dump(db)
    size = os.path.getsize(db)
    # 300 jobs of 20 KB: a 6 MB transaction into a file that may not grow past 1 MB
    batch = "".join(json.dumps({"id": "big%03d" % i, "command": "echo " + "x" * 20000}) + "\n" for i in range(300))
    limit = max(size, 1 << 20)
    r = run_with_file_limit(db, limit, "enqueue", "-", stdin=batch.encode())
    one_error_line(r, 74, "cannot write")
    assert "file size limit" in r.err or "disk is full" in r.err, r.err  # says why
    assert r.out == ""
    assert integrity(db) == "ok"
    assert dump(db) == before, "a failed enqueue left part of its batch behind"
    r = run("enqueue", '{"id":"after","command":"true"}')  # once there is room again, it works
    assert r.rc == 0 and r.out == "after\n"
    assert integrity(db) == "ok"


# --- the database deleted or overwritten while workers run ---------------------------------------------


@pytest.mark.e2e
def test_database_deleted_while_workers_run(run, db, workers, tmp_path):
    """`rm` of the database under running workers: no enqueue is acknowledged and then silently lost.

    While processes still hold the deleted file, an enqueue is refused (exit 74, saying why); the
    workers notice, say so, and their supervisor starts them again on a new database at that
    path, where every acknowledged job then runs.
    """
    ledger = tmp_path / "ledger"
    cmd = "echo $QUEUECTL_JOB_ID >> %s" % ledger
    assert run("enqueue", json.dumps({"id": "before", "command": cmd})).rc == 0
    sup = workers.start(2)
    wait_until(lambda: ledger.exists() and "before" in ledger.read_text(), 20)
    os.unlink(db)
    acked, refused = [], []
    deadline = time.monotonic() + 30
    n = 0
    while len(acked) < 3 and time.monotonic() < deadline:
        n += 1
        r = run("enqueue", json.dumps({"id": "after%d" % n, "command": cmd}))
        if r.rc == 0:
            assert r.out == "after%d\n" % n
            acked.append("after%d" % n)
        else:
            one_error_line(r, 74, "deleted")
            refused.append(r.err)
    assert acked, "no enqueue succeeded within 30s of deleting the database: %s" % refused[-1:]
    wait_until(lambda: ledger.exists() and all(a in ledger.read_text().split() for a in acked), 30,
               message="acknowledged jobs were not run by the running workers: %s" % workers.log())
    assert sup.poll() is None, "the supervisor keeps serving the database path"
    log = workers.log()
    assert "was deleted" in log, log
    assert "Traceback" not in log
    wait_until(lambda: all(state_of(db, a) == "completed" for a in acked), 20)
    assert integrity(db) == "ok"


def test_a_supervisor_whose_database_is_overwritten_while_it_forks_stops_cleanly(db):
    """Its workers can run jobs before the supervisor opens its own connection: a file changed in
    that moment is handled as at any other time (stop, exit 74), not by an exception."""
    import queuectl

    store = queuectl.SqliteStore(str(db))
    store.close()  # the supervisor closes its connection before it forks
    db.write_bytes(b"not a database" * 1000)
    sup = queuectl.Supervisor(str(db), 1)
    assert sup._open_after_spawn(store) is store
    assert isinstance(sup.db_failure, queuectl.DatabaseCorrupt) and sup.stop_level == 1


@pytest.mark.e2e
@pytest.mark.parametrize("how", ["overwritten", "replaced"])
def test_database_overwritten_or_replaced_with_garbage_while_workers_run(run, db, workers, tmp_path, how):
    """Commands say so (74, one line); the workers stop and their supervisor exits 74 saying what
    is wrong (and, for a file renamed over the database, what to do before using it), instead of
    restarting them forever."""
    assert run("enqueue", '{"id":"before","command":"true"}').rc == 0
    sup = workers.start(2)
    wait_until(lambda: state_of(db, "before") == "completed", 20)
    garbage = b"this is not a database\n" * 4096
    if how == "overwritten":  # same file, new content
        db_rows(db, "PRAGMA wal_checkpoint(TRUNCATE)")  # so no page of it is still served from the WAL
        with open(db, "r+b") as f:
            f.write(garbage)
            f.truncate()
        words = "not a usable queuectl database"
    else:  # another file renamed over it
        (tmp_path / "garbage").write_bytes(garbage)
        os.replace(tmp_path / "garbage", db)
        words = "replaced by another file"
    for args in (("status",), ("list",), ("enqueue", '{"id":"after","command":"true"}')):
        r = run(*args)
        one_error_line(r, 74)
        # while the old workers still hold the replaced file's write-ahead log, commands refuse to pair
        # the new file with it; once they are gone (within ~0.1s here), SQLite reads the garbage itself
        assert words in r.err or "not a usable queuectl database" in r.err, r.err
    assert sup.wait(20) == 74, workers.log()
    log = workers.log()
    assert "Traceback" not in log
    last = log.rstrip().splitlines()[-1]
    assert last.startswith(ERROR) and words in last, log
    if how == "replaced":
        assert "remove %s-wal" % db in last  # says what to do


# --- kill -9 of a worker at the worst moments ---------------------------------------------------------

# A foreground supervisor whose workers die by SIGKILL at one chosen point, once: the fault
# fires in the first worker process that reaches it (the marker file is removed atomically).
FAULTY = textwrap.dedent("""    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    import queuectl
    marker, point = sys.argv[2], sys.argv[3]

    def die_once():
        try:
            os.unlink(marker)
        except FileNotFoundError:
            return
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "after-claim":  # the claim is committed, the command not started
        real_run = queuectl.run_command
        def run_command(*a, **k):
            die_once()
            return real_run(*a, **k)
        queuectl.run_command = run_command
    elif point == "before-pid-recorded":  # the command runs, its pid is not in the database yet
        real_started = queuectl.SqliteStore.started
        def started(self, *a, **k):
            die_once()
            return real_started(self, *a, **k)
        queuectl.SqliteStore.started = started
    sys.exit(queuectl.main(sys.argv[4:]))
""")


@pytest.fixture
def faulty_workers(db, tmp_path):
    procs = []

    def start(point):
        marker = tmp_path / "fault"
        marker.write_text("armed")
        log = open(tmp_path / "faulty.log", "wb")
        proc = subprocess.Popen([sys.executable, "-c", FAULTY, str(ROOT), str(marker), point, "--db", str(db),
                                 "worker", "start", "--foreground", "-c", "1", "--poll-interval", "0.05"],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env_of(db),
                                start_new_session=True)
        log.close()
        procs.append(proc)
        return proc, marker

    yield start
    pids = {p.pid for p in procs}
    with contextlib.suppress(sqlite3.Error):
        pids |= {r[0] for r in db_rows(db, "SELECT pid FROM workers")}
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for p in procs:
        p.wait(10)


def test_kill9_between_claim_and_start(run, db, faulty_workers, tmp_path):
    """The worker dies after its claim committed and before the command started: the job is
    rescued by its supervisor at once, without using a retry, and runs exactly once."""
    ledger = tmp_path / "ledger"
    assert run("enqueue", json.dumps({"id": "j", "command": "echo $QUEUECTL_ATTEMPT >> %s" % ledger,
                                      "max_retries": 0})).rc == 0
    sup, marker = faulty_workers("after-claim")
    wait_until(lambda: state_of(db, "j") == "completed", 20, message=(tmp_path / "faulty.log").read_text())
    assert not marker.exists(), "the fault did not fire"
    rows = attempts_of(db, "j")
    assert [r[1] for r in rows] == ["lost", "completed"]
    assert rows[0][3] is None  # it never started
    assert ledger.read_text().split() == ["2"]  # ran once (as attempt 2)
    job = json.loads(run("get", "j", "--json").out)
    assert job["attempts"] == 1 and job["rescues"] == 1  # the lost run used no retry
    assert sup.poll() is None


def test_kill9_after_start_before_the_pid_is_recorded(run, db, faulty_workers, tmp_path):
    """The worker dies in the instant between starting the command and recording its pid: the
    rescue must still find and kill the whole process tree of that run (it has no pid on record)."""
    pids = tmp_path / "pids"
    cmd = ('if [ "$QUEUECTL_ATTEMPT" = 1 ]; then echo $$ >> %s; sleep 300 & echo $! >> %s; sleep 300; fi'
           % (pids, pids))
    assert run("enqueue", json.dumps({"id": "j", "command": cmd, "max_retries": 0})).rc == 0
    sup, marker = faulty_workers("before-pid-recorded")
    wait_until(lambda: len(read_pids(pids)) == 2, 20, message=(tmp_path / "faulty.log").read_text())
    wait_until(lambda: state_of(db, "j") == "completed", 20, message=(tmp_path / "faulty.log").read_text())
    assert not marker.exists(), "the fault did not fire"
    rows = attempts_of(db, "j")
    assert [r[1] for r in rows] == ["lost", "completed"]
    assert rows[0][3] is None, "the fault must hit before the pid was recorded"
    shell, grandchild = read_pids(pids)
    wait_until(lambda: not pid_exists(shell) and not pid_exists(grandchild), 5,
               message="the lost run's processes survived its rescue")
    assert sup.poll() is None


@pytest.mark.e2e
def test_kill9_during_backoff(run, db, workers, tmp_path):
    """Workers killed while a failed job waits for its retry: nothing is lost or run early, the
    retry budget is intact, and new workers pick the job up at its time."""
    run("config", "set", "backoff-base", "2")
    flag = tmp_path / "ok"
    cmd = "test -e %s" % flag  # fails until the flag exists
    assert run("enqueue", json.dumps({"id": "j", "command": cmd, "max_retries": 3})).rc == 0
    sup = workers.start(1)
    wait_until(lambda: state_of(db, "j") == "failed", 20)
    retry_at = db_rows(db, "SELECT run_at FROM jobs WHERE id = 'j'")[0][0]
    (worker_pid,) = [r[0] for r in db_rows(db, "SELECT pid FROM workers")]
    os.kill(sup.pid, signal.SIGKILL)
    os.kill(worker_pid, signal.SIGKILL)
    sup.wait(10)
    wait_until(lambda: not pid_exists(worker_pid), 5)
    assert state_of(db, "j") == "failed"
    flag.write_text("")
    workers.start(1)
    wait_until(lambda: state_of(db, "j") == "completed", 20)
    rows = db_rows(db, "SELECT n, outcome, started_at FROM attempts WHERE job_id = 'j' ORDER BY n")
    assert [r[1] for r in rows] == ["failed", "completed"]
    assert rows[1][2] >= retry_at - 0.01, "the retry ran before its backoff ended"
    job = json.loads(run("get", "j", "--json").out)
    assert (job["attempts"], job["rescues"]) == (2, 0)


@pytest.mark.e2e
@pytest.mark.parametrize("victims", ["worker", "worker-and-supervisor"])
def test_kill9_during_worker_stop(run, db, workers, tmp_path, victims):
    """`worker stop` is waiting for a job to finish when the worker (or its whole tree) is killed:
    the stop returns promptly and the job is back in the queue, not left `processing`."""
    started = tmp_path / "started"
    cmd = "echo $$ > %s; sleep 300" % started
    assert run("enqueue", json.dumps({"id": "j", "command": cmd})).rc == 0
    assert run("worker", "start").rc == 0
    wait_until(lambda: started.exists() and started.read_text().strip(), 20)
    shell = int(started.read_text())
    sup_pid, worker_pid = db_rows(db, "SELECT supervisor_pid, pid FROM workers")[0]
    workers.extra_pids |= {sup_pid, worker_pid}
    stop = subprocess.Popen(program() + ["worker", "stop", "--timeout", "60"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env_of(db), cwd=str(tmp_path))
    try:
        wait_until(lambda: "graceful stop requested" in (db.parent / "q.workers.log").read_text(), 10)
        t0 = time.monotonic()
        if victims == "worker-and-supervisor":
            os.kill(sup_pid, signal.SIGKILL)
        os.kill(worker_pid, signal.SIGKILL)
        out, err = stop.communicate(timeout=30)
    finally:
        if stop.poll() is None:
            stop.kill()
            stop.wait()
    assert stop.returncode == 0, err
    assert time.monotonic() - t0 < 10
    assert b"stopped 1 worker" in out
    assert state_of(db, "j") == "pending", "the killed worker's job must not stay processing"
    assert attempts_of(db, "j")[0][1] == "lost"
    wait_until(lambda: not pid_exists(shell), 5, message="the lost run's process survived")
    assert db_rows(db, "SELECT count(*) FROM workers")[0][0] == 0


# --- stop signals during startup ----------------------------------------------------------------------


def _children(pid):
    kids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open("/proc/%s/stat" % name, "rb") as f:
                    stat = f.read()
                if int(stat[stat.rindex(b")") + 2:].split()[1]) == pid:
                    kids.append(int(name))
    return kids


@pytest.mark.e2e
def test_sigterm_while_the_supervisor_forks_its_workers_still_stops_them_all(db, tmp_path):
    """A SIGTERM that lands while the supervisor is forking its workers reaches every one of
    them: the graceful stop ends within seconds instead of waiting forever for a worker that
    never heard of it.  (Tried several times, each aimed at the middle of the forking.)"""
    for attempt in range(4):
        log = open(tmp_path / ("sup%d.log" % attempt), "wb")
        sup = subprocess.Popen(program() + ["worker", "start", "--foreground", "-c", "12", "--poll-interval", "0.05"],
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env_of(db),
                               cwd=str(tmp_path), start_new_session=True)
        log.close()
        seen = set()
        try:
            wait_until(lambda: seen.update(_children(sup.pid)) or seen or sup.poll() is not None, 30, interval=0.001)
            sup.send_signal(signal.SIGTERM)  # while it is still forking the rest
            code = sup.wait(15)
        except (subprocess.TimeoutExpired, AssertionError):
            code = None
        finally:
            seen.update(_children(sup.pid))
            for pid in seen | {sup.pid}:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            sup.wait(10)
        assert code == 0, "supervisor did not stop on SIGTERM (attempt %d): %s" % (
            attempt, (tmp_path / ("sup%d.log" % attempt)).read_text())
        wait_until(lambda: not any(pid_exists(p) for p in seen), 10, message="a worker outlived its supervisor")
