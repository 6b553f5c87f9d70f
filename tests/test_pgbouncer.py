"""PostgreSQL through PgBouncer in transaction mode, and the connection budget of a machine.

Through a real PgBouncer (Debian's ``pgbouncer``; ``.ci/run`` installs it) in
``pool_mode = transaction``, started by this module on a free port in front of
the test server: consecutive statements of one client may reach different
server sessions, so a store that kept session state (a ``SET``, a ``LISTEN``, a
session advisory lock, a named prepared statement) would break here.  The
store's contract checks of fencing and rescue run through it; workers claim and
finish jobs through it, each exactly once; and the LISTEN connection, which
cannot go through a transaction pooler, goes straight to the server
(``QUEUECTL_LISTEN_URL``): a job enqueued while the workers idle on a long poll
interval starts at once.  Without PgBouncer: a supervisor and its N workers
hold N + 2 server connections (the workers' one each, the supervisor's store
connection and its LISTEN connection), counted in ``pg_stat_activity``.

Marked ``postgres``: needs the local PostgreSQL server ($QUEUECTL_TEST_PG).
"""

import json
import os
import select
import signal
import socket
import statistics
import subprocess
import time
import urllib.parse

import psycopg
import pytest

import conftest
import queuectl_pg
from conftest import PG_TEST_URL, Workers, db_rows, program, wait_until
from queuectl import DatabaseBusy
from test_store import StoreContract, spec

pytestmark = pytest.mark.postgres

PGBOUNCER = "/usr/sbin/pgbouncer"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bouncer(tmp_path_factory):
    """A PgBouncer in transaction mode in front of the test server; yields a function that turns
    a direct URL into the same URL through PgBouncer.  Killed by pid at the end."""
    assert os.access(PGBOUNCER, os.X_OK), "%s is missing: apt-get install pgbouncer (.ci/run does)" % PGBOUNCER
    server = psycopg.conninfo.conninfo_to_dict(queuectl_pg.parse_url(PG_TEST_URL)[0])
    user, dbname = server.get("user", "postgres"), server["dbname"]
    port = free_port()
    d = tmp_path_factory.mktemp("pgbouncer")
    (d / "users.txt").write_text('"%s" ""\n' % user)
    (d / "pgbouncer.ini").write_text("\n".join([
        "[databases]",
        "%s = host=%s port=%s dbname=%s" % (dbname, server.get("host", "127.0.0.1"), server.get("port", 5432), dbname),
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        "listen_port = %d" % port,
        "unix_socket_dir =",
        "auth_type = trust",
        "auth_file = %s" % (d / "users.txt"),
        "pool_mode = transaction",
        "default_pool_size = 20",
        "max_client_conn = 500",
        "server_reset_query =",
        "",
    ]))
    os.chmod(d, 0o755)
    for f in d.iterdir():
        os.chmod(f, 0o644)
    argv = [PGBOUNCER, str(d / "pgbouncer.ini")]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root: it drops to the server's account
        argv[1:1] = ["-u", "postgres"]
    log = open(d / "pgbouncer.log", "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()

    def accepts():
        assert proc.poll() is None, "pgbouncer exited: %s" % (d / "pgbouncer.log").read_text()
        try:
            with psycopg.connect(host="127.0.0.1", port=port, dbname=dbname, user=user, connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def through(url):
        parts = urllib.parse.urlsplit(url)
        netloc = "%s@127.0.0.1:%d" % (parts.username or user, port)
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

    try:
        wait_until(accepts, 20, interval=0.05, message="pgbouncer did not start")
        yield through
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)


def app_connections(url):
    """The server sessions queuectl holds for the schema of ``url`` (its application_name)."""
    return db_rows(PG_TEST_URL, "SELECT pid, query FROM pg_stat_activity WHERE application_name = ?",
                   ("queuectl:" + conftest.pg_schema_of(url),))


def listening(url):
    return [pid for pid, query in app_connections(url) if query.startswith("LISTEN")]


def troubles(log):
    """The warnings and errors of a workers' log, but for the note that more workers join."""
    return [line for line in log.splitlines()
            if (" WARNING " in line or " ERROR " in line) and "already run on this database" not in line]


def cli(url, *args, env=None):
    proc = subprocess.run(program() + ["--db", url] + [str(a) for a in args], env=env or conftest.program_env(url),
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
    return conftest.Result(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))


# --- the store's fencing and rescue through PgBouncer ------------------------------------

#: The contract checks that matter most through a pooler: a stale run number cannot overwrite a
#: result or renew a lease, and leases run out and are rescued.
THROUGH_BOUNCER = {
    "test_heartbeat_renews_the_lease", "test_finish_is_fenced", "test_finish_and_claim_is_fenced_and_still_claims",
    "test_release_by_a_non_owner_is_refused", "test_rescue_of_an_expired_lease",
    "test_late_finish_of_a_rescued_run_is_refused", "test_a_job_lost_more_than_max_rescues_times_goes_dead",
    "test_rescue_does_not_kill_runs_on_another_host",
}


class TestStoreThroughPgBouncer(StoreContract):
    @pytest.fixture
    def store(self, pg_url, bouncer):
        s = queuectl_pg.PostgresStore(bouncer(pg_url), clock="caller", listen_url=pg_url)
        assert s.pooled, "PgBouncer accepted the lock_timeout startup option: not a pooler?"
        yield s
        s.close()

    @pytest.fixture
    def open_store(self, pg_url, bouncer):
        opened = []

        def make():
            s = queuectl_pg.PostgresStore(bouncer(pg_url), clock="caller", listen_url=pg_url)
            opened.append(s)
            return s

        yield make
        for s in opened:
            s.close()


for _name in dir(StoreContract):
    if _name.startswith("test_") and _name not in THROUGH_BOUNCER:
        setattr(TestStoreThroughPgBouncer, _name, None)  # not collected here (tests/test_store_pg.py runs them)


def test_the_chosen_contract_checks_exist():
    assert THROUGH_BOUNCER <= set(dir(StoreContract))


def test_through_pgbouncer_every_transaction_has_its_lock_timeout_and_nothing_is_prepared(pg_url, bouncer):
    s = queuectl_pg.PostgresStore(bouncer(pg_url))
    try:
        assert s.pooled  # PgBouncer refused the startup option: no session SET either
        assert s.conn.prepare_threshold is None
        with s._cursor(transaction=True) as cur:
            assert cur.execute("SHOW lock_timeout").fetchone()["lock_timeout"] == "5s"
    finally:
        s.close()
    direct = queuectl_pg.PostgresStore(pg_url)
    try:
        assert not direct.pooled
        assert direct._one("SHOW lock_timeout")["lock_timeout"] == "5s"  # the startup option
        assert direct.conn.prepare_threshold == queuectl_pg.PREPARE_THRESHOLD  # half the CPU per job
    finally:
        direct.close()


def test_a_pooler_that_let_prepared_statements_through_turns_them_off(pg_url, bouncer):
    """A pooler that passes the startup option on (PgBouncer with ``options`` in its
    ignore_startup_parameters, another pooler) looks like the server: statements get prepared,
    and two clients' prepared statements meet on one server session.  The first that fails
    turns preparing off for its store; that call is busy (retried), the following ones work."""
    stores = [queuectl_pg.PostgresStore(bouncer(pg_url)) for _ in range(2)]
    try:
        for s in stores:  # as if the pooler had taken the startup option
            s.pooled = False
            s.conn.prepare_threshold = 0  # prepare at once
        failures = [0, 0]
        for _ in range(10):
            for i, s in enumerate(stores):
                try:
                    s.get("nothing")
                except DatabaseBusy as e:
                    assert "no longer prepared" in str(e)
                    failures[i] += 1
        assert sum(failures) >= 1 and max(failures) == 1, failures
        for s, failed in zip(stores, failures):
            assert s.pooled == bool(failed)
        for _ in range(5):
            for s in stores:
                assert s.get("nothing") is None
    finally:
        for s in stores:
            s.close()


def test_listening_through_pgbouncer_is_lost_so_it_says_so(pg_url, bouncer, caplog, monkeypatch):
    """LISTEN through a transaction pooler is accepted, and its notifications are lost: the LISTEN
    connection must go straight to the server (QUEUECTL_LISTEN_URL), and a warning says so."""
    monkeypatch.delenv("QUEUECTL_LISTEN_URL", raising=False)
    url = bouncer(pg_url)
    listener = queuectl_pg.PostgresStore(url)
    try:
        fds = listener.wait_fds()
        assert fds and "looks like a connection pooler" in caplog.text and "QUEUECTL_LISTEN_URL" in caplog.text
        listener.enqueue([spec(time.time())], time.time())
        assert not select.select(fds, [], [], 1)[0]  # the notification went to a server session left long ago
    finally:
        listener.close()
    caplog.clear()
    direct = queuectl_pg.PostgresStore(url, listen_url=pg_url)
    try:
        fds = direct.wait_fds()
        direct.enqueue([spec(time.time())], time.time())
        assert select.select(fds, [], [], 10)[0], "no notification on the direct LISTEN connection"
        assert "pooler" not in caplog.text
    finally:
        direct.close()


# --- workers through PgBouncer ---------------------------------------------------------------


@pytest.fixture
def bounced(pg_url, bouncer, tmp_path, process_mark):
    """(URL through PgBouncer, the environment of programs that use it, a Workers to start them)."""
    url = bouncer(pg_url)
    env = dict(conftest.program_env(url), QUEUECTL_LISTEN_URL=pg_url)
    w = Workers(pg_url, tmp_path, mark=process_mark)  # the test reads the database directly
    yield url, env, w
    w.kill_all()


def test_workers_through_pgbouncer_run_every_job_exactly_once(pg_url, bounced, tmp_path):
    url, env, workers = bounced
    ledger = tmp_path / "ledger"
    jobs = "".join(json.dumps({"id": "job%03d" % i, "command": "echo $QUEUECTL_JOB_ID >> %s" % ledger}) + "\n"
                   for i in range(60))
    proc = subprocess.run(program() + ["--db", url, "enqueue", "-"], input=jobs.encode(), env=env,
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    workers.start(3, env=env, db=url)
    workers.start(2, env=env, db=url)
    wait_until(lambda: db_rows(pg_url, "SELECT count(*) FROM jobs WHERE state = 'completed'")[0][0] == 60, 60,
               message="not every job completed: %s" % workers.log(0))
    lines = ledger.read_text().split()
    assert sorted(lines) == ["job%03d" % i for i in range(60)]  # each exactly once
    r = cli(url, "status", env=env)
    assert r.rc == 0 and "completed" in r.out
    for i in range(2):
        assert troubles(workers.log(i)) == [], workers.log(i)  # no prepared statement or LISTEN trouble


def start_delays(direct, url, tmp_path, idle, rounds):
    """Seconds from the commit of an enqueue (through ``url``) to the start of the job's process,
    for ``rounds`` jobs, each enqueued while ``idle`` workers wait."""
    store = queuectl_pg.PostgresStore(url)
    try:
        delays = []
        for i in range(rounds):
            wait_until(lambda: db_rows(direct, "SELECT count(*) FROM workers WHERE state = 'idle'")[0][0] == idle, 20)
            mark = tmp_path / ("started-%d" % i)
            t0 = time.time()
            store.enqueue([spec(t0, command="date +%%s.%%N > %s" % mark)], t0)
            t1 = time.time()
            wait_until(lambda: mark.exists() and mark.read_text().strip(), 20)
            delays.append(float(mark.read_text()) - t1)
        return delays
    finally:
        store.close()


def test_a_job_enqueued_through_pgbouncer_wakes_idle_workers_at_once(pg_url, bounced, tmp_path):
    url, env, workers = bounced
    # Idle workers look by themselves every 2 s at most (housekeeping), whatever the poll interval:
    # only a wake-up makes the median start of several jobs much sooner than 1 s.
    workers.start(2, poll=30, env=env, db=url)
    wait_until(lambda: len(listening(pg_url)) == 1, 20, message="the supervisor does not LISTEN")
    delays = start_delays(pg_url, url, tmp_path, 2, 7)
    assert statistics.median(delays) < 0.25, delays
    assert troubles(workers.log(0)) == [], workers.log(0)


def test_a_cancel_through_pgbouncer_stops_the_running_job(pg_url, bounced, tmp_path):
    url, env, workers = bounced
    workers.start(1, poll=30, env=env, db=url)
    wait_until(lambda: len(listening(pg_url)) == 1, 20, message="the supervisor does not LISTEN")
    assert cli(url, "enqueue", json.dumps({"id": "long", "command": "sleep 60"}), env=env).rc == 0
    wait_until(lambda: db_rows(pg_url, "SELECT count(*) FROM attempts WHERE job_id = 'long' AND pid IS NOT NULL")
               [0][0] == 1, 20)
    t0 = time.monotonic()
    assert cli(url, "cancel", "long", env=env).rc == 0
    wait_until(lambda: db_rows(pg_url, "SELECT state FROM jobs WHERE id = 'long'")[0][0] == "cancelled", 20)
    assert time.monotonic() - t0 < 5


# --- the connection budget --------------------------------------------------------------------


@pytest.fixture
def workers(pg_url, tmp_path, process_mark):
    """Workers started straight on the server (no pooler)."""
    w = Workers(pg_url, tmp_path, mark=process_mark)
    yield w
    w.kill_all()


@pytest.mark.parametrize("count", [4])
def test_a_supervisor_and_its_workers_hold_one_connection_each_and_one_listens(pg_url, workers, count):
    """N workers: N + 2 server sessions (each worker's store connection, the supervisor's store
    connection and its LISTEN connection), of which exactly one LISTENs."""
    workers.start(count, poll=30)
    wait_until(lambda: len(listening(pg_url)) == 1, 20, message="the supervisor does not LISTEN")
    wait_until(lambda: len(app_connections(pg_url)) == count + 2, 10,
               message="connections: %s" % app_connections(pg_url))
    assert len(listening(pg_url)) == 1
    # jobs run, and the number stays
    assert cli(pg_url, "enqueue", "--", "true").rc == 0
    wait_until(lambda: db_rows(pg_url, "SELECT count(*) FROM jobs WHERE state = 'completed'")[0][0] == 1, 20)
    assert len(app_connections(pg_url)) == count + 2, app_connections(pg_url)


def test_after_a_worker_restart_the_supervisor_still_wakes_its_workers(pg_url, workers, tmp_path):
    """The supervisor closes its connections around a fork (a worker restarted) and LISTENs
    again after, for the new worker too.  (What it missed meanwhile: tests/test_store_pg.py.)"""
    sup = workers.start(2, poll=30)
    wait_until(lambda: len(listening(pg_url)) == 1, 20, message="the supervisor does not LISTEN")
    victim = workers.children(sup.pid)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in workers.children(sup.pid) and len(workers.children(sup.pid)) == 2, 20)
    wait_until(lambda: len(listening(pg_url)) == 1, 20, message="the supervisor does not LISTEN again")
    delays = start_delays(pg_url, pg_url, tmp_path, 2, 5)
    assert statistics.median(delays) < 0.25, delays


def test_a_bad_listen_url_is_a_clear_error(pg_url, tmp_path):
    env = dict(conftest.program_env(pg_url), QUEUECTL_LISTEN_URL="db.internal:5432")
    r = cli(pg_url, "status", env=env)
    assert r.rc != 0 and "Traceback" not in r.err
    assert r.err.count("\n") == 1 and "QUEUECTL_LISTEN_URL" in r.err, r.err
