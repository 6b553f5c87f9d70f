"""The Store contract on PostgreSQL, and what only the PostgreSQL store does.

``TestPostgresStore`` runs every test of ``StoreContract`` (tests/test_store.py)
against ``PostgresStore`` in a fresh schema per test.  The contract passes
time explicitly (``NOW + 10`` is ten seconds later, nothing sleeps), so the
store runs with ``clock="caller"``: it takes the caller's ``now`` as the time
of each statement, exactly as SQLite does.  The program itself always uses the
database clock; the tests below the contract check that path with the real
clocks: a caller whose clock is an hour off changes nothing.

Needs the local PostgreSQL server ($QUEUECTL_TEST_PG); marked ``postgres``.
Without a server these tests fail: they are never skipped.
"""

import os
import select
import socket
import sys
import json
import threading
import time

import psycopg
import pytest

import queuectl
import queuectl_pg
from conftest import PG_TEST_URL, db_rows, drop_pg_schema, new_pg_url, pg_schema_of, wait_until
from queuectl import Conflict, DatabaseBusy, DatabaseError, JobState
from test_store import (HOST, LEASE, OTHER_HOST, Recorder, StoreContract, always_alive, assert_implements_the_contract,
                        spec, worker_record)

pytestmark = pytest.mark.postgres


class TestPostgresStore(StoreContract):
    @pytest.fixture
    def store(self, pg_url):
        s = queuectl_pg.PostgresStore(pg_url, clock="caller")
        yield s
        s.close()

    @pytest.fixture
    def open_store(self, pg_url):
        opened = []

        def make():
            s = queuectl_pg.PostgresStore(pg_url, clock="caller")
            opened.append(s)
            return s

        yield make
        for s in opened:
            s.close()

    @pytest.fixture
    def raw_counts(self, pg_url):
        return lambda: dict(db_rows(pg_url, "SELECT state, count(*) FROM jobs GROUP BY state"))


def test_the_postgresql_store_implements_the_whole_contract():
    assert_implements_the_contract(queuectl_pg.PostgresStore, extra={"drop_schema"})


###############################################################################
# The database clock
###############################################################################


@pytest.fixture
def pg(pg_url):
    """A store as the program opens it: on the database clock."""
    s = queuectl_pg.PostgresStore(pg_url)
    yield s
    s.close()


def new_job(**fields):
    """A validated job dict specified now, on this machine's clock."""
    return spec(time.time(), **fields)


def db_now(url):
    return db_rows(url, "SELECT extract(epoch from clock_timestamp())::float8")[0][0]


HOUR = 3600.0
SLACK = 5.0  # seconds a test may take between reading the database clock and the store using it


def near(value, expected):
    return abs(value - expected) < SLACK


def test_times_are_on_the_database_clock_whatever_the_callers_clock(pg, pg_url):
    behind, ahead = db_now(pg_url) - HOUR, db_now(pg_url) + HOUR  # an enqueuer's and a worker's clock
    t = db_now(pg_url)
    pg.enqueue([spec(behind, id="now"), spec(behind, id="soon", delay=60)], behind)
    job, soon = pg.get("now"), pg.get("soon")
    assert near(job.created_at, t) and near(job.run_at, t)
    assert near(soon.run_at, t + 60) and abs((soon.run_at - job.run_at) - 60) < 0.5
    # a worker whose clock is an hour ahead takes what is due on the database clock, and only that
    claimed = pg.claim("w1", HOST, ahead, LEASE)
    assert claimed.id == "now"
    assert near(claimed.started_at, t) and abs(claimed.lease_until - claimed.started_at - LEASE) < 1e-6
    assert pg.claim("w1", HOST, ahead, LEASE) is None, "a job due in 60 s must not be claimed early"
    # its heartbeat renews the lease from the database clock too
    assert pg.heartbeat("w1", "now", 1, ahead + 100, LEASE)
    assert near(pg.get("now").lease_until, db_now(pg_url) + LEASE)
    # a rescuer whose clock is two hours ahead sees a fresh lease, not an expired one
    assert pg.rescue(ahead + HOUR, OTHER_HOST, always_alive, Recorder()) == []
    assert pg.get("now").state == "processing"
    # a retry computed on the worker's clock ("in 10 s") is 10 s on the database clock
    assert pg.finish("now", 1, "w1", "failed", ahead, "failed", 1, retry_at=ahead + 10)
    failed = pg.get("now")
    assert near(failed.run_at, db_now(pg_url) + 10) and abs(failed.run_at - failed.finished_at - 10) < 1e-6
    assert pg.claim("w2", HOST, ahead + 20, LEASE) is None


def test_an_expired_lease_is_rescued_by_any_machine_on_the_database_clock(pg, pg_url):
    pg.set_config("lease-seconds", 1)
    pg.enqueue([new_job(id="j")], time.time())
    assert pg.claim("far-away", "host-far", time.time(), 1.0).id == "j"
    lease_until = pg.get("j").lease_until
    # a rescuer whose clock is an hour behind still sees the lease expire, after about a second
    behind = time.time() - HOUR
    wait_until(lambda: pg.rescue(behind, HOST, always_alive, Recorder()) == ["j"], 10,
               message="expired lease not rescued")
    (attempt,) = pg.attempts("j")
    assert attempt.outcome == "lost" and "lease of worker far-away expired" in attempt.error
    assert attempt.ended_at >= lease_until


###############################################################################
# LISTEN/NOTIFY
###############################################################################


def readable(fds, timeout):
    return select.select(fds, [], [], timeout)[0]


def notifications(store):
    """Count the notifications waiting on a store's LISTEN connection (reads them)."""
    pgconn = store._listen.pgconn
    pgconn.consume_input()
    n = 0
    while pgconn.notifies() is not None:
        n += 1
    return n


def test_an_enqueue_of_a_due_job_wakes_a_listening_worker(pg, pg_url):
    worker = queuectl_pg.PostgresStore(pg_url)
    try:
        fds = worker.wait_fds()
        assert len(fds) == 1
        assert worker.consume_notifications() is False
        pg.enqueue([new_job(id="later", delay=3600)], time.time())  # not due: no wake-up
        with pytest.raises(Conflict):
            pg.enqueue([new_job(id="x"), new_job(id="later")], time.time())  # rolled back: no wake-up
        t0 = time.monotonic()
        pg.enqueue([new_job(id="due")], time.time())
        assert readable(fds, 10), "no notification within 10 s"
        assert time.monotonic() - t0 < 5
        # notifications arrive in commit order: the due enqueue's is the first and only one
        assert notifications(worker) == 1
        pg.enqueue([new_job(id="due2")], time.time())
        assert readable(fds, 10)
        # "jobs are due" is for idle workers: it does not ask a busy one to look at its job
        assert worker.consume_notifications() is False
        assert not readable(fds, 0), "consumed"
        # a cancel of a running job does
        job = pg.claim("w1", HOST, time.time(), LEASE)
        assert pg.cancel(job.id, time.time()) == "requested"
        assert readable(fds, 10)
        assert worker.consume_notifications() is True
        assert worker.consume_notifications() is False
    finally:
        worker.close()


@pytest.mark.parametrize("action", ["retry_dead", "release", "rescue"])
def test_jobs_back_in_the_queue_wake_listening_workers(pg, pg_url, action):
    worker = queuectl_pg.PostgresStore(pg_url)
    try:
        pg.enqueue([new_job(id="j", max_retries=0)], time.time())
        job = pg.claim("w1", HOST, time.time(), LEASE)
        fds = worker.wait_fds()
        if action == "retry_dead":
            assert pg.finish("j", job.runs, "w1", "dead", time.time(), "failed", 1)
            assert pg.retry_dead("j", time.time())
        elif action == "release":
            assert pg.release("j", job.runs, "w1", time.time(), "stopped")
        else:
            pg.register_worker(worker_record("w1", pid=999999))
            assert pg.rescue(time.time(), HOST, lambda pid, started: False, Recorder()) == ["j"]
        assert readable(fds, 10)
        assert notifications(worker) == 1
    finally:
        worker.close()


def test_notifications_stay_inside_their_schema(pg, pg_url):
    other_url = new_pg_url()
    other = queuectl_pg.PostgresStore(other_url)
    try:
        mine = queuectl_pg.PostgresStore(pg_url)
        try:
            fds = mine.wait_fds() + other.wait_fds()
            other.enqueue([new_job(id="theirs")], time.time())
            assert readable(fds, 10) == [other.wait_fds()[0]]
            pg.enqueue([new_job(id="ours")], time.time())
            assert readable(mine.wait_fds(), 10)
            assert notifications(mine) == 1 and notifications(other) == 1
            # and the jobs too
            assert pg.get("theirs") is None and other.get("ours") is None
            assert [j.id for j in other.list_jobs()] == ["theirs"]
        finally:
            mine.close()
    finally:
        other.close()
        drop_pg_schema(other_url)


def test_a_broken_listen_connection_falls_back_to_polling_and_comes_back(pg, pg_url, monkeypatch):
    worker = queuectl_pg.PostgresStore(pg_url)
    try:
        fds = worker.wait_fds()
        pid = db_rows(pg_url, "SELECT pid FROM pg_stat_activity WHERE application_name = ? AND query LIKE 'LISTEN%'",
                      ("queuectl:" + pg_schema_of(pg_url),))
        assert len(pid) == 1
        db_rows(pg_url, "SELECT pg_terminate_backend(?)", (pid[0][0],))
        # the socket turns readable (the server's goodbye, then the end of the stream): "look now"
        wait_until(lambda: readable(fds, 1) and worker.consume_notifications(), 10, message="loss not noticed")
        assert worker.wait_fds() == []  # polling until the retry time
        monkeypatch.setattr(worker, "_listen_retry_at", 0.0)
        fds = worker.wait_fds()
        assert len(fds) == 1
        pg.enqueue([new_job(id="due")], time.time())
        assert readable(fds, 10)
        assert worker.consume_notifications() is False and not readable(fds, 0)
    finally:
        worker.close()


@pytest.fixture
def relay(pg, pg_url):
    """A supervisor (not started: its relay is called by the test) with three workers on this
    host, each with a bound wake-up socket: ``idle`` and ``busy`` (running job ``j``) are its own,
    ``other`` is another supervisor's.  Yields (supervisor, the signal pipe, sockets by name)."""
    sup = queuectl.Supervisor(pg_url, 2)
    socks = {}
    for name in ("idle", "busy", "other"):
        addr = "queuectl-test/%s/%s" % (pg_schema_of(pg_url), name)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind("\0" + addr)
        s.setblocking(False)
        socks[name] = s
        pg.register_worker(dict(worker_record(name, host=queuectl.HOST, wake=addr),
                                supervisor_pid=sup.pid if name != "other" else 1))
    pg.enqueue([new_job(id="j")], time.time())
    assert pg.claim("busy", queuectl.HOST, time.time(), LEASE).id == "j"
    r, w = os.pipe()
    os.set_blocking(r, False)  # as the supervisor's
    try:
        yield sup, r, socks
    finally:
        for fd in (r, w):
            os.close(fd)
        for s in socks.values():
            s.close()


def woken(socks):
    """The names of the sockets that received a wake-up (read empty)."""
    return sorted(name for name, s in socks.items() if queuectl.drain_fd(s.fileno()))


def test_the_supervisor_relays_notifications_to_its_workers(pg, pg_url, relay, monkeypatch):
    """One LISTEN connection per machine: the supervisor's.  Jobs due wake its idle workers; a
    cancel, a LISTEN connection that broke or was re-opened (around a fork) wake them all."""
    sup, r, socks = relay
    store = queuectl_pg.PostgresStore(pg_url)
    try:
        sup._wait(store, r, 0)
        assert woken(socks) == ["busy", "idle"]  # listening starts: anything missed before, look now
        sup._wait(store, r, 0)
        assert woken(socks) == []
        pg.enqueue([new_job(id="due")], time.time())
        sup._wait(store, r, 10)
        assert woken(socks) == ["idle"]  # jobs are due: the idle worker looks
        assert pg.cancel("j", time.time()) == "requested"
        sup._wait(store, r, 10)
        assert woken(socks) == ["busy", "idle"]  # a cancel: the busy worker looks at its job
        (pid,) = [p for p, q in db_rows(pg_url, "SELECT pid, query FROM pg_stat_activity WHERE application_name = ?",
                                        ("queuectl:" + pg_schema_of(pg_url),)) if q.startswith("LISTEN")]
        db_rows(pg_url, "SELECT pg_terminate_backend(?)", (pid,))
        wait_until(lambda: sup._wait(store, r, 1) or woken(socks) == ["busy", "idle"], 10,
                   message="the broken LISTEN connection woke no one")  # all poll until it is back
        monkeypatch.setattr(store, "_listen_retry_at", 0.0)
        sup._wait(store, r, 0)
        assert woken(socks) == ["busy", "idle"]  # back: whatever was missed meanwhile, look now
        # Closed around a fork (Supervisor._spawn_without_connection), then re-opened: an enqueue
        # made meanwhile was never heard, so every worker looks once.
        store.close()
        pg.enqueue([new_job(id="while-closed")], time.time())
        store = queuectl_pg.PostgresStore(pg_url)
        sup._wait(store, r, 0)
        assert woken(socks) == ["busy", "idle"]
    finally:
        store.close()


def test_a_worker_under_a_supervisor_has_no_listen_connection_of_its_own(pg, pg_url):
    worker = queuectl.Worker(pg_url, store=queuectl_pg.PostgresStore(pg_url), supervisor_pid=os.getppid())
    try:
        worker.register()
        (record,) = pg.workers()
        assert record["wake"]  # woken by datagram, by its supervisor
        assert worker.wake_fds() == worker._local_wake_fds()
        assert worker.store._listen is None
        assert db_rows(pg_url, "SELECT count(*) FROM pg_stat_activity WHERE application_name = ? "
                               "AND query LIKE 'LISTEN%'", ("queuectl:" + pg_schema_of(pg_url),))[0][0] == 0
    finally:
        worker._sock.close()
        worker.store.close()
    alone = queuectl.Worker(pg_url, store=queuectl_pg.PostgresStore(pg_url))  # no supervisor: listens itself
    try:
        alone.register()
        assert len(alone.wake_fds()) == 2 and alone.store._listen is not None
    finally:
        alone.store.close()


###############################################################################
# Contention: no hot rows
###############################################################################


def hold_open(url, sql, params):
    """Run ``sql`` in a transaction left open; returns the connection (roll it back)."""
    conninfo, schema = queuectl_pg.parse_url(url)
    conn = psycopg.connect(conninfo)
    conn.execute(sql, params)
    return conn


def test_claims_and_finishes_of_different_jobs_never_wait_for_each_other(pg, pg_url):
    """Every claim changes the per-state counts and every finish the per-minute statistics: with
    one counter row per state (or per minute), a second worker would wait for the first one's
    transaction to end.  Here the first transaction stays open while another worker claims and
    finishes: it must not wait (the store's lock timeout would turn a wait into an error)."""
    now = time.time()
    pg.enqueue([new_job(id="a"), new_job(id="b"), new_job(id="c")], now)
    pg.claim("w0", HOST, now, LEASE)  # a, finished below inside the open transaction
    open_tx = hold_open(pg_url, pg.sql.CLAIM, {"now": None, "worker": "w1", "host": HOST, "lease": LEASE})
    try:
        other = queuectl_pg.PostgresStore(pg_url)
        try:
            other.conn.execute("SET lock_timeout = '1s'")
            t0 = time.monotonic()
            job = other.claim("w2", HOST, time.time(), LEASE)
            assert job is not None and job.id == "c", "b is claimed by the open transaction: SKIP LOCKED"
            assert other.finish("c", 1, "w2", "completed", time.time(), "completed", 0)
            assert time.monotonic() - t0 < 1.0
        finally:
            other.close()
        finish_open = hold_open(pg_url, pg.sql.FINISH, {
            "now": None, "id": "a", "n": 1, "worker": "w0", "state": "completed", "exit_code": 0, "error": None,
            "retry_at": None, "retry_in": None, "outcome": "completed", "output": "", "output_bytes": 0, "pid": None})
        try:
            pg.conn.execute("SET lock_timeout = '1s'")
            assert pg.counts()["completed"] == 1  # reads while both transactions are open
        finally:
            finish_open.rollback()
            finish_open.close()
    finally:
        open_tx.rollback()
        open_tx.close()
    counts = pg.counts()
    assert (counts["processing"], counts["completed"], counts["pending"]) == (1, 1, 1)


def test_counts_stay_exact_under_concurrent_workers(pg_url):
    stores = [queuectl_pg.PostgresStore(pg_url) for _ in range(4)]
    try:
        now = time.time()
        stores[0].enqueue([new_job() for _ in range(400)], now)
        errors = []

        def work(s, n):
            try:
                while True:
                    job = s.claim("w%d" % n, HOST, time.time(), LEASE)
                    if job is None:
                        return
                    state = "completed" if job.seq % 3 else "dead"
                    while n % 2 and job is not None:  # half the workers go on by finish_and_claim
                        ok, job = s.finish_and_claim(
                            dict(job_id=job.id, run=job.runs, worker_id="w%d" % n, state=state, now=time.time(),
                                 outcome=state, exit_code=0),
                            dict(worker_id="w%d" % n, host=HOST, now=time.time(), lease=LEASE))
                        assert ok
                        state = "completed" if job is None or job.seq % 3 else "dead"
                    if job is None:
                        return
                    assert s.finish(job.id, job.runs, "w%d" % n, state, time.time(), state, 0)
                    if n == 0:
                        s.counts()  # folds the deltas while the others write
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(s, n)) for n, s in enumerate(stores)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        truth = dict(db_rows(pg_url, "SELECT state, count(*) FROM jobs GROUP BY state"))
        assert stores[1].counts() == dict({s: 0 for s in queuectl.STATES}, **truth)
        assert sum(truth.values()) == 400 and truth.get("pending", 0) == 0
    finally:
        for s in stores:
            s.close()


###############################################################################
# Schema: created, migrated, shared, refused
###############################################################################


def test_the_schema_is_created_and_migrated_once(pg_url):
    barrier = threading.Barrier(4)
    opened, errors = [], []

    def open_it():
        try:
            barrier.wait(10)
            opened.append(queuectl_pg.PostgresStore(pg_url))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors and len(opened) == 4
        versions = [r[0] for r in db_rows(pg_url, "SELECT version FROM schema_migrations ORDER BY version")]
        assert versions == list(range(1, len(queuectl_pg.PG_SCHEMA) + 1))
        tables = {r[0] for r in db_rows(pg_url, "SELECT tablename FROM pg_tables WHERE schemaname = ?",
                                        (pg_schema_of(pg_url),))}
        assert {"jobs", "attempts", "workers", "config", "job_counts", "job_count_deltas"} <= tables
    finally:
        for s in opened:
            s.close()


def test_migration_names_the_job_of_every_stored_webhook_delivery(pg_url):
    """A schema at version 1 (deliveries without their job) migrates, taking the job from the payload."""
    import psycopg

    conninfo, schema = queuectl_pg.parse_url(pg_url)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute('CREATE SCHEMA "%s"' % schema)
        conn.execute(queuectl_pg.SQL_MIGRATIONS_TABLE.replace("{s}", '"%s"' % schema))
        conn.execute(queuectl_pg.PG_SCHEMA[0].replace("{s}", '"%s"' % schema))
        conn.execute(queuectl_pg.SQL_RECORD_MIGRATION.replace("{s}", '"%s"' % schema), {"v": 1})
        conn.execute('INSERT INTO "%s".webhooks (url, payload, attempts, next_at, created_at, delivered_at) '
                     "VALUES ('http://hooks.test/x', %%s, 1, 0, 0, 5)" % schema,
                     (json.dumps({"event": "job.completed", "job": {"id": "old"}}),))
    store = queuectl_pg.PostgresStore(pg_url)
    try:
        [d] = store.job_webhooks("old")
        assert (d["url"], d["state"], d["attempts"], d["delivered_at"]) == ("http://hooks.test/x", "delivered", 1, 5)
    finally:
        store.close()


def test_migration_to_run_events_keeps_counts_totals_and_marks_jobs_whose_end_has_followers(pg_url):
    """A schema at version 2 (count deltas for every state change, statistics written by the
    finish, a trigger for attempt totals), with jobs in every bucket, migrates: the counts are
    rebuilt per bucket, the totals kept, and jobs with a webhook or a dependent are marked, so
    that their end takes the general path."""
    import psycopg

    conninfo, schema = queuectl_pg.parse_url(pg_url)
    q = '"%s"' % schema
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA %s" % q)
        conn.execute(queuectl_pg.SQL_MIGRATIONS_TABLE.replace("{s}", q))
        for v in (1, 2):
            conn.execute(queuectl_pg.PG_SCHEMA[v - 1].replace("{s}", q))
            conn.execute(queuectl_pg.SQL_RECORD_MIGRATION.replace("{s}", q), {"v": v})
        now = time.time()
        for job_id, state, webhook in (("a", "pending", None), ("b", "processing", None), ("c", "completed", None),
                                       ("d", "waiting", None), ("e", "pending", "http://hooks.test/e")):
            conn.execute("INSERT INTO %s.jobs (id, command, state, priority, max_retries, run_at, created_at, "
                         "updated_at, webhook, worker_id, runs, attempts, started_at) VALUES (%%s, 'true', %%s, 2, 0, "
                         "%%s, %%s, %%s, %%s, %%s, %%s, %%s, %%s)" % q,
                         (job_id, state, now, now, now, webhook, "w1" if state == "processing" else None,
                          int(state in ("processing", "completed")), int(state in ("processing", "completed")),
                          now if state in ("processing", "completed") else None))
        conn.execute("INSERT INTO %s.job_deps (job_id, depends_on) VALUES ('d', 'b')" % q)
        conn.execute("INSERT INTO %s.attempts (job_id, n, worker_id, host, started_at) VALUES ('b', 1, 'w1', %%s, %%s),"
                     " ('c', 1, 'w1', %%s, %%s)" % q, (HOST, now, HOST, now - 2))
        conn.execute("UPDATE %s.attempts SET ended_at = %%s, outcome = 'completed' WHERE job_id = 'c'" % q, (now,))
    def raw_counts_of():
        return dict(db_rows(pg_url, "SELECT state, count(*) FROM jobs GROUP BY state"))

    store = queuectl_pg.PostgresStore(pg_url)  # migrates
    try:
        totals = {(t["queue"], t["outcome"]): t["count"] for t in store.attempt_totals()}
        assert totals == {("default", "completed"): 1}  # (written by the old trigger)
        assert store.counts() == dict({st: 0 for st in queuectl.STATES}, **raw_counts_of())
        assert store.counts()["processing"] == 1 and store.counts()["pending"] == 2
        assert dict(db_rows(pg_url, "SELECT id, followup FROM jobs")) == {
            "a": False, "b": True, "c": False, "d": False, "e": True}
        # (and version 4: jobs keeps the indexes of ids, due jobs, states and unique keys, no more)
        assert sorted(r[0] for r in db_rows(pg_url, "SELECT indexname FROM pg_indexes WHERE schemaname = '%s' "
                                                    "AND tablename = 'jobs'" % schema)) == [
            "jobs_id_key", "jobs_ready", "jobs_state_updated", "jobs_unique_key"]
        assert sorted(j.id for j in store.jobs_page(limit=10)[0]) == ["a", "b", "c", "d", "e"]
        ok, job = store.finish_and_claim(
            dict(job_id="b", run=1, worker_id="w1", state="completed", now=time.time(), outcome="completed",
                 exit_code=0), dict(worker_id="w1", host=HOST, now=time.time(), lease=LEASE))
        assert ok and job is not None
        assert store.get("d").state in ("pending", "processing")  # released by b's end
        assert store.counts() == dict({st: 0 for st in queuectl.STATES}, **raw_counts_of())
        totals = {(t["queue"], t["outcome"]): t["count"] for t in store.attempt_totals()}
        assert totals == {("default", "completed"): 2}
    finally:
        store.close()


def test_default_schema_and_schema_in_the_url(pg_url):
    assert queuectl_pg.parse_url("postgresql://u@h/db")[1] == "queuectl"
    conninfo, schema = queuectl_pg.parse_url("postgresql://u@h:5433/db?sslmode=require&schema=jobs_a")
    assert schema == "jobs_a" and "schema" not in conninfo and "sslmode=require" in conninfo
    for bad in ("Upper", "has-dash", "1digit", "x" * 49, 'q"uote'):
        with pytest.raises(queuectl.InvalidInput):
            queuectl_pg.parse_url("postgresql://u@h/db?schema=" + bad)


def test_a_schema_that_is_not_ours_is_refused_and_left_alone(pg_url):
    schema = pg_schema_of(pg_url)
    db_rows(pg_url, 'CREATE SCHEMA "%s"' % schema)
    db_rows(pg_url, 'CREATE TABLE "%s".jobs (x integer)' % schema)
    db_rows(pg_url, 'INSERT INTO "%s".jobs VALUES (42)' % schema)
    with pytest.raises(DatabaseError) as info:
        queuectl_pg.PostgresStore(pg_url)
    assert "not a queuectl schema" in str(info.value)
    assert db_rows(pg_url, 'SELECT x FROM "%s".jobs' % schema) == [(42,)]


def test_a_schema_from_a_newer_queuectl_is_refused(pg, pg_url):
    db_rows(pg_url, "INSERT INTO schema_migrations VALUES (99, 0)")
    with pytest.raises(DatabaseError) as info:
        queuectl_pg.PostgresStore(pg_url)
    assert "newer than this queuectl" in str(info.value)


def test_open_without_create_does_not_create(pg_url):
    with pytest.raises(queuectl.DatabaseMissing):
        queuectl_pg.PostgresStore(pg_url, create=False)
    assert db_rows(pg_url, "SELECT count(*) FROM pg_namespace WHERE nspname = ?", (pg_schema_of(pg_url),)) == [(0,)]


###############################################################################
# Connection problems and the CLI
###############################################################################


def test_passwords_are_never_shown():
    url = "postgresql://alice:s3cret@db.example:5432/q?schema=x&password=other"
    assert queuectl.db_label(url) == "postgresql://alice:***@db.example:5432/q?schema=x&password=***"


def test_an_unreachable_server_is_a_clear_retryable_error(cli):
    r = cli("--db", "postgresql://alice:s3cret@127.0.0.1:1/test?connect_timeout=2", "status")
    assert r.rc == queuectl.EXIT_BUSY
    assert r.err.startswith("queuectl: error: cannot reach PostgreSQL at postgresql://alice:***@127.0.0.1:1/")
    assert len(r.err.splitlines()) == 1 and "s3cret" not in r.err and "Traceback" not in r.err


def test_a_missing_database_is_a_clear_error(cli):
    r = cli("--db", PG_NO_SUCH_DB, "status")
    assert r.rc == queuectl.EXIT_DB and "does not exist" in r.err and len(r.err.splitlines()) == 1


PG_NO_SUCH_DB = PG_TEST_URL.split("?")[0].rsplit("/", 1)[0] + "/queuectl_no_such_db"


def test_without_psycopg_the_error_says_how_to_install_it(cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg now fails
    monkeypatch.delitem(sys.modules, "queuectl_pg")
    r = cli("--db", "postgresql://postgres@127.0.0.1/test", "status")
    assert r.rc == 1 and len(r.err.splitlines()) == 1
    assert "pip install 'queuectl[postgres]'" in r.err and "./build.sh --with-postgres" in r.err


def test_the_default_path_imports_no_driver(tmp_path):
    import subprocess

    db = str(tmp_path / "q.db")
    code = ("import sys, queuectl; rc = queuectl.main(['--db', %r, 'enqueue', '--', 'true']) or "
            "queuectl.main(['--db', %r, 'status']); "
            "sys.exit(rc or ('psycopg' in sys.modules or 'queuectl_pg' in sys.modules) and 9)") % (db, db)
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(queuectl_pg.__file__.rsplit("/", 1)[0]),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_the_cli_runs_on_postgresql(cli, pg_url):
    assert cli("--db", pg_url, "enqueue", '{"id":"hello","command":"echo hi"}').out == "hello\n"
    r = cli("--db", pg_url, "status")
    assert r.rc == 0 and "database: %s" % pg_url in r.out and "pending     1" in r.out
    r = cli("--db", pg_url, "worker", "start", "--burst")
    assert r.rc == 0, r.err
    assert cli("--db", pg_url, "logs", "hello").out == "hi\n"
    assert "completed   1" in cli("--db", pg_url, "status").out


def test_a_lost_connection_is_busy_then_reconnects(pg, pg_url):
    pg.enqueue([new_job(id="j")], time.time())
    sessions = "SELECT pid FROM pg_stat_activity WHERE application_name = ?"
    app = ("queuectl:" + pg_schema_of(pg_url),)
    db_rows(pg_url, "SELECT pg_terminate_backend(pid) FROM (%s) s" % sessions, app)
    wait_until(lambda: not db_rows(pg_url, sessions, app), 10, message="session not terminated")
    with pytest.raises(DatabaseBusy) as info:
        pg.get("j")  # finds its connection gone: "try again"
    assert "try again" in str(info.value)
    assert pg.get("j").state == JobState.PENDING.value  # and the next call reconnects


def test_a_generated_id_that_exists_already_is_drawn_again(pg, monkeypatch):
    pg.enqueue([new_job(id="taken")], time.time())
    draws = iter(["taken", "fresh"])
    monkeypatch.setattr(queuectl_pg, "new_job_id", lambda: next(draws))
    assert pg.enqueue([new_job()], time.time()) == ["fresh"]
    assert pg.get("taken").command == pg.get("fresh").command == "true"


def test_detached_workers_get_the_url_in_their_environment_not_on_their_command_line(pg_url, tmp_path):
    import os
    import signal
    import subprocess

    from conftest import pid_exists, program, program_env

    # trust authentication accepts any password: enough to see where it travels
    url = pg_url.replace("postgresql://postgres@", "postgresql://postgres:s3cret@")
    env = dict(program_env(url), XDG_DATA_HOME=str(tmp_path))
    started = subprocess.run(program() + ["--db", url, "worker", "start"], env=env, capture_output=True, text=True,
                             timeout=60)
    pids = [r[0] for r in db_rows(pg_url, "SELECT supervisor_pid FROM workers")]
    try:
        assert started.returncode == 0, started.stderr
        assert len(pids) == 1
        with open("/proc/%d/cmdline" % pids[0], "rb") as f:
            assert b"s3cret" not in f.read()
        logs = list((tmp_path / "queuectl").glob("workers-*.log"))
        assert len(logs) == 1 and "s3cret" not in logs[0].read_text() and "postgres:***@" in logs[0].read_text()
        status = subprocess.run(program() + ["--db", url, "status"], env=env, capture_output=True, text=True,
                                timeout=60)
        assert "database: " + url.replace(":s3cret@", ":***@") in status.stdout and "s3cret" not in status.stdout
        stop = subprocess.run(program() + ["--db", url, "worker", "stop"], env=env, capture_output=True, text=True,
                              timeout=90)
        assert stop.returncode == 0 and "stopped 1 worker" in stop.stdout
    finally:
        for pid in pids + [r[0] for r in db_rows(pg_url, "SELECT pid FROM workers")]:
            if pid_exists(pid):
                os.kill(pid, signal.SIGKILL)


def test_data_version_changes_with_every_kind_of_change(pg, pg_url):
    other = queuectl_pg.PostgresStore(pg_url)  # the dashboard watches on a store of its own
    try:
        seen = [other.data_version()]

        def changed():
            now = other.data_version()
            assert now != seen[-1]
            seen.append(now)

        assert other.data_version() == seen[-1], "stable while nothing changes"
        pg.enqueue([new_job(id="a"), new_job(id="b")], time.time())
        changed()
        pg.register_worker(worker_record("w1"))
        changed()
        job = pg.claim("w1", HOST, time.time(), LEASE)
        changed()
        assert pg.heartbeat("w1", job.id, 1, time.time(), LEASE, output=("so far", 6))
        changed()
        assert pg.finish(job.id, 1, "w1", "completed", time.time(), "completed", 0)
        changed()
        assert pg.delete_jobs("completed") == 1
        changed()
        pg.set_config("max-retries", 7)
        changed()
        pg.set_queue("q1", max_running=2)
        changed()
        pg.unregister_worker("w1")
        changed()
        assert other.data_version() == seen[-1]
    finally:
        other.close()


@pytest.mark.parametrize("skew", [3600.0, -3600.0], ids=["ahead", "behind"])
def test_rescue_hands_kill_the_run_start_on_this_machines_clock(pg, pg_url, skew):
    pg.enqueue([new_job(id="j"), new_job(id="k")], time.time())
    a = pg.claim("gone", HOST, time.time(), LEASE)
    b = pg.claim("gone", HOST, time.time(), LEASE)
    pg.started(a.id, 1, 4242)  # b died before its pid was recorded
    pg.register_worker(worker_record("gone", pid=999999))
    kill = Recorder()
    # this machine's clock is an hour ahead of the database's, or behind it
    local_now = time.time() + skew
    assert sorted(pg.rescue(local_now, HOST, lambda pid, started: False, kill)) == ["j", "k"]
    calls = {c[0]: c for c in kill.calls}
    started = {r.id: pg.attempts(r.id)[0].started_at for r in (a, b)}
    assert abs(calls[4242][1] - (started[a.id] + skew)) < SLACK
    (none_call,) = [c for c in kill.calls if c[0] is None]
    assert abs(none_call[1] - (started[b.id] + skew)) < SLACK and none_call[2] == (b.id, 1, "gone")


###############################################################################
# Races between machines: dependencies, queue limits, schedules, unique keys
###############################################################################


def blocked_sessions(url):
    """Sessions of this schema's stores that wait for a lock."""
    return db_rows(url, "SELECT count(*) FROM pg_stat_activity WHERE application_name = ? AND wait_event_type = 'Lock'",
                   ("queuectl:" + pg_schema_of(url),))[0][0]


def in_thread(fn):
    """Run ``fn`` in a thread; returns a function that joins it and gives its result (or raises)."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # pragma: no cover - re-raised by the joiner
            box["error"] = e

    t = threading.Thread(target=target)
    t.start()

    def join():
        t.join(30)
        assert not t.is_alive(), "the thread is stuck"
        if "error" in box:
            raise box["error"]
        return box["value"]

    return join


@pytest.mark.parametrize("pipeline,end", [(True, "finish"), (False, "finish"), (True, "finish_and_claim")])
def test_a_dependency_that_ends_while_its_dependent_is_being_enqueued_releases_it(pg, pg_url, monkeypatch, pipeline,
                                                                                  end):
    """The enqueue holds the dependency (locked, and marked as having followers) until it commits its
    edge; the finish waits for it, then looks for dependents in a statement of its own, so it sees
    the edge and releases the job.  The one-statement finish-and-claim waits too, then sees the mark
    on the row it locked and leaves the run's end to that finish."""
    monkeypatch.setattr(queuectl_pg, "PIPELINE", pipeline)
    pg.enqueue([new_job(id="a")], time.time())
    run = pg.claim("w1", HOST, time.time(), LEASE)
    enqueuer = queuectl_pg.PostgresStore(pg_url)
    try:
        with enqueuer._transaction():  # the job-by-job path of enqueue, not committed yet
            enqueuer._enqueue_each([new_job(id="b", after="a")], time.time(), None)
            assert dict(db_rows(pg_url, "SELECT id, state FROM jobs")) == {"a": "processing"}  # not committed yet
            if end == "finish":
                finish = in_thread(lambda: pg.finish("a", run.runs, "w1", "completed", time.time(), "completed", 0))
            else:
                finish = in_thread(lambda: pg.finish_and_claim(
                    dict(job_id="a", run=run.runs, worker_id="w1", state="completed", now=time.time(),
                         outcome="completed", exit_code=0), dict(worker_id="w1", host=HOST, now=time.time(), lease=LEASE)))
            wait_until(lambda: blocked_sessions(pg_url) == 1, 10, message="the finish did not wait for the enqueue")
        result = finish()
        if end == "finish":
            assert result is True
            assert pg.get("b").state == "pending", "the dependent was left waiting"
        else:
            assert result[0] is True and result[1] is not None and result[1].id == "b", "the dependent was left waiting"
        assert db_rows(pg_url, "SELECT count(*) FROM job_deps") == [(0,)]
    finally:
        enqueuer.close()


def test_a_workers_usual_step_is_one_statement_and_records_the_pid_with_the_result(pg, monkeypatch):
    """finish_and_claim closes a run and claims the next in one statement, without the general path
    (one round trip per job: the pid of a run shorter than pid_delay goes with its result)."""
    pg.enqueue([new_job(id="a", priority="high"), new_job(id="b")], time.time())
    run = pg.claim("w1", HOST, time.time(), LEASE)
    for general in ("finish", "claim"):
        monkeypatch.setattr(pg, general, lambda *a, **kw: pytest.fail("took the general path"))

    def step(job, pid):
        return pg.finish_and_claim(dict(job_id=job.id, run=job.runs, worker_id="w1", state="completed",
                                        now=time.time(), outcome="completed", exit_code=0, pid=pid),
                                   dict(worker_id="w1", host=HOST, now=time.time(), lease=LEASE))

    ok, b = step(run, 4241)
    assert ok and b.id == "b"
    pg.started("b", b.runs, 4242)  # (a run that lasted longer than pid_delay)
    assert step(b, 9999) == (True, None)
    assert [pg.attempt(j, 1).pid for j in ("a", "b")] == [4241, 4242]  # a recorded pid stays
    assert pg.pid_delay > 0


def plans_of(store):
    """The plans of the statements ``store`` runs from now on, as the server runs them (auto_explain,
    sent to this session as notices)."""
    plans = []
    store.conn.add_notice_handler(lambda d: plans.append(d.message_primary or ""))
    for sql in ("LOAD 'auto_explain'", "SET auto_explain.log_min_duration = 0",
                "SET auto_explain.log_level = 'notice'", "SET auto_explain.log_nested_statements = on"):
        store.conn.execute(sql)
    return plans


def test_plans_made_while_the_tables_were_small_are_made_again_as_they_grow(pg, pg_url):
    """A worker's statements are prepared: one plan for all parameters, sized on the tables as they
    were then.  Made while ``attempts`` was nearly empty, the usual step would scan every attempt
    for each job once the table has grown; the store has its plans made again every REPLAN_EVERY
    statements, so they follow the tables' sizes."""
    db_rows(pg_url, "VACUUM ANALYZE attempts")  # (as after a purge: the statistics say empty)
    pg.enqueue([new_job(id="j%02d" % i) for i in range(40)], time.time())
    plans = plans_of(pg)

    def step(job):
        plans.clear()
        ok, nxt = pg.finish_and_claim(dict(job_id=job.id, run=job.runs, worker_id="w1", state="completed",
                                           now=time.time(), outcome="completed", exit_code=0, pid=1),
                                      dict(worker_id="w1", host=HOST, now=time.time(), lease=LEASE))
        assert ok and nxt is not None
        (plan,) = [p for p in plans if "claim_now" in p]
        return nxt, plan

    job = pg.claim("w1", HOST, time.time(), LEASE)
    for _ in range(15):  # prepared at the 5th run; its own plan for each of the next 5, then one for all
        job, plan = step(job)
    assert "Seq Scan on attempts" in plan  # (the premise: so small a table is read whole)
    db_rows(pg_url, "INSERT INTO attempts (job_id, n, started_at) "
                    "SELECT 'x' || i, 1, 0 FROM generate_series(1, 20000) i")
    job, plan = step(job)
    assert "Seq Scan on attempts" in plan  # the same plan, until ...
    assert pg.conn.execute("SELECT generic_plans FROM pg_prepared_statements WHERE statement LIKE '%%claim_now%%'"
                           ).fetchone()["generic_plans"] > 1
    for _ in range(queuectl_pg.REPLAN_EVERY):
        pg.get(job.id)
    job, plan = step(job)
    assert "Index Scan using attempts_pkey on attempts" in plan and "Seq Scan on attempts" not in plan


def test_no_statement_of_a_worker_or_of_the_dashboard_reads_a_whole_big_table(pg_url):
    """With 20,000 jobs and their attempts, the statements of claims, ends (both paths), a release,
    a rescue, reads, pages and a purge find their rows through an index: none reads all of jobs
    or attempts.  (A statement that looked a job up by seq, which has no index of its own, would;
    so would a join of attempts.job_id, in the database's collation, with jobs.id, in "C", that
    does not name the collation of the attempts index.)"""
    store = queuectl_pg.PostgresStore(pg_url, clock="caller")
    try:
        now = time.time()
        store.enqueue([spec(now, id="b%05d" % i) for i in range(20000)], now)
        db_rows(pg_url, "UPDATE jobs SET state = 'completed', updated_at = CASE WHEN id < 'b01000' THEN %s ELSE %s END "
                        "WHERE id < 'b18000'" % (now - 3600, now - 60))
        db_rows(pg_url, "INSERT INTO attempts (job_id, n, started_at, ended_at, outcome) "
                        "SELECT id, 1, %s, %s, 'completed' FROM jobs WHERE state = 'completed'" % (now - 61, now - 60))
        db_rows(pg_url, "INSERT INTO schedules (name, cron, tz, spec, missed, overlap, next_run, last_job, created_at) "
                        "VALUES ('nightly', '0 3 * * *', 'UTC', '{}', 'skip', 'skip', %s, 'b00005', %s)" % (now, now))
        for table in ("jobs", "attempts", "schedules"):
            db_rows(pg_url, "VACUUM ANALYZE " + table)
        plans = plans_of(store)
        t = now + 1
        job = store.claim("w1", HOST, t, LEASE)
        for _ in range(3):
            ok, job = store.finish_and_claim(
                dict(job_id=job.id, run=job.runs, worker_id="w1", state="completed", now=t, outcome="completed",
                     exit_code=0, pid=1), dict(worker_id="w1", host=HOST, now=t, lease=LEASE))
        store.heartbeat("w1", job.id, job.runs, t, LEASE, output=("out", 3))
        store.started(job.id, job.runs, 4242)
        assert store.finish(job.id, job.runs, "w1", "completed", t, "completed", exit_code=0)
        job = store.claim("w1", HOST, t, LEASE)
        assert store.release(job.id, job.runs, "w1", t, "stopped")
        job = store.claim("w2", OTHER_HOST, t, LEASE)
        assert store.rescue(t + LEASE + 30, HOST, always_alive, Recorder()) == [job.id]
        store.get("b19000")
        store.attempts("b00001")
        store.list_jobs(limit=50)
        store.list_jobs(state="pending", limit=50)
        store.jobs_page(limit=50)
        store.jobs_page(state="completed", limit=50, after=(now - 60, 10 ** 6))
        store.jobs_page(id_prefix="b001", limit=50)
        store.queue_page("default", limit=50)
        store.queue_page("nightly", limit=50)  # (a queue with no job: the newest 2,000, then a look beyond)
        store.scheduled_page(t, limit=50)
        store.schedules()
        store.counts()
        store.data_version()
        assert store.purge(["completed"], now - 1800, batch=50) == 1000
    finally:
        store.close()
    ran = [p for p in plans if "Query Text" in p]
    assert len(ran) > 20
    whole = [p for p in ran if "Seq Scan on jobs " in p or "Seq Scan on attempts " in p]
    assert not whole, "\n\n".join(whole)


def test_a_dependency_that_ended_before_the_enqueue_committed_is_seen(pg, pg_url):
    pg.enqueue([new_job(id="a", max_retries=0)], time.time())
    run = pg.claim("w1", HOST, time.time(), LEASE)
    finisher = queuectl_pg.PostgresStore(pg_url)
    try:
        with finisher._cursor(transaction=True) as cur:  # the end of `a`, not committed yet
            cur.execute(finisher.sql.FINISH, {
                "now": None, "id": "a", "n": run.runs, "worker": "w1", "state": "dead", "exit_code": 1, "error": "boom",
                "retry_at": None, "retry_in": None, "outcome": "failed", "output": "", "output_bytes": 0, "pid": None})
            enqueue = in_thread(lambda: pg.enqueue([new_job(id="b", after="a")], time.time()))
            wait_until(lambda: blocked_sessions(pg_url) == 1, 10, message="the enqueue did not wait for the finish")
        with pytest.raises(Conflict) as info:
            enqueue()
        assert "depends on a, which is dead" in str(info.value)
        assert pg.get("b") is None
    finally:
        finisher.close()


def test_a_queue_limit_holds_for_workers_claiming_at_the_same_time(pg, pg_url):
    pg.set_queue("q", max_running=1)
    pg.enqueue([new_job(id="q%d" % i, queue="q") for i in range(3)] + [new_job(id="free")], time.time())
    first = queuectl_pg.PostgresStore(pg_url)
    try:
        with first._cursor(transaction=True) as cur:  # a claim from the limited queue, not committed yet
            job_id = first._pick(cur, first._now(None, cur), cur.execute(first.sql.LIMITED_QUEUES).fetchall(), None)
            claimed = cur.execute(first.sql.CLAIM_ID, {"now": None, "worker": "w1", "host": HOST, "lease": LEASE,
                                                       "id": job_id}).fetchone()
            assert claimed["queue"] == "q"
            second = in_thread(lambda: pg.claim("w2", OTHER_HOST, time.time(), LEASE))
            wait_until(lambda: blocked_sessions(pg_url) == 1, 10, message="the second claim did not wait")
        job = second()
        assert job is not None and job.id == "free", "the queue's limit of 1 was exceeded"
        assert pg.claim("w3", OTHER_HOST, time.time(), LEASE) is None
        running = db_rows(pg_url, "SELECT count(*) FROM jobs WHERE queue = 'q' AND state = 'processing'")
        assert running == [(1,)]
    finally:
        first.close()


def test_a_schedule_tick_makes_one_job_however_many_supervisors_fire_it(pg_url):
    stores = [queuectl_pg.PostgresStore(pg_url) for _ in range(4)]
    try:
        now = time.time()
        stores[0].add_schedule("every-minute", "* * * * *", "UTC", {"command": "true", "cwd": "/"}, "once", "allow",
                               now - 1, now)
        barrier = threading.Barrier(4)

        def fire(s):
            barrier.wait(10)
            return s.fire_schedules(time.time(), queuectl.schedule_next_run, queuectl.DEFAULTS)

        joins = [in_thread(lambda s=s: fire(s)) for s in stores]
        created = [job for j in joins for job in j()]
        assert len(created) == 1, created
        assert db_rows(pg_url, "SELECT count(*) FROM jobs WHERE schedule = 'every-minute'") == [(1,)]
        (schedule,) = stores[1].schedules()
        assert schedule["next_run"] > now and schedule["last_job"] == created[0]
    finally:
        for s in stores:
            s.close()


def test_two_enqueues_of_one_unique_key_at_once_make_one_job(pg, pg_url):
    first = queuectl_pg.PostgresStore(pg_url)
    try:
        existing = []
        with first._transaction():  # the first enqueue, not committed yet
            first._enqueue_each([new_job(id="one", unique_key="K")], time.time(), None)
            second = in_thread(lambda: pg.enqueue([new_job(id="two", unique_key="K")], time.time(), existing))
            wait_until(lambda: blocked_sessions(pg_url) == 1, 10, message="the second enqueue did not wait")
        assert second() == ["one"] and existing == ["one"]
        assert db_rows(pg_url, "SELECT id FROM jobs") == [("one",)]
    finally:
        first.close()
