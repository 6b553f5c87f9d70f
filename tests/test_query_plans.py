"""The hot paths stay flat however many jobs the database holds: every statement
that a claim, `status`, `list --limit 50` and `list --state S --limit 50` run
is served by an index -- no step reads the whole jobs (or attempts) table, and
none sorts their rows in a temporary B-tree.

The statements are not named here: the test records the SQL that the real code
runs (the store's connection traces it) and asks SQLite for the plan of each,
so a new or rewritten query on these paths is checked too.  Timings live in
bench/ (`./build.sh bench`), not in tests.
"""

import re
import sqlite3
import time

import pytest

import queuectl

BIG_TABLES = ("jobs", "attempts")


@pytest.fixture
def traced(monkeypatch):
    """Every SQL statement any SqliteStore connection runs, expanded with its parameters."""
    statements = []
    connect = queuectl.SqliteStore._connect

    def tracing_connect(self):
        conn = connect(self)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(queuectl.SqliteStore, "_connect", tracing_connect)
    return statements


def fill(db, n=3000):
    """Mostly finished jobs with an attempt each, some dead, some due, as after a day of work."""
    store = queuectl.SqliteStore(str(db))
    cfg = store.config()
    now = time.time()
    store.enqueue([queuectl.validate_job({"command": "true %d" % i}, cfg, now) for i in range(n)], now)
    store.register_worker({"id": "w-fill", "host": queuectl.HOST, "pid": 1, "pid_started": None,
                           "supervisor_pid": None, "now": now, "wake": None})
    for i in range(20):  # a few real runs, with their attempt records ...
        job = store.claim("w-fill", queuectl.HOST, now, 60.0)
        store.finish(job.id, job.runs, "w-fill", "completed", now, "completed", exit_code=0, output="ok\n",
                     output_bytes=3)
    store.close()
    conn = sqlite3.connect(str(db), isolation_level=None)  # ... and the bulk of the history, written directly
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    conn.execute("INSERT INTO attempts (job_id, n, worker_id, host, started_at, ended_at, exit_code, outcome, output) "
                 "SELECT id, 1, 'w-fill', 'h', :now, :now, 0, 'completed', 'ok' FROM jobs WHERE state = 'pending' "
                 "AND seq <= :last", {"now": now, "last": n - 100})
    conn.execute("UPDATE jobs SET state = CASE WHEN seq % 50 = 0 THEN 'dead' ELSE 'completed' END, runs = 1, "
                 "attempts = 1, started_at = :now, finished_at = :now, updated_at = :now + seq * 0.001 "
                 "WHERE state = 'pending' AND seq <= :last", {"now": now, "last": n - 100})
    conn.execute("COMMIT")
    conn.close()


def plans(db, statements):
    """(statement, [plan steps]) for every statement that reads or writes rows."""
    conn = sqlite3.connect(str(db))
    out = []
    try:
        for sql in statements:
            head = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else ""
            if head not in ("SELECT", "UPDATE", "DELETE", "INSERT", "WITH"):
                continue
            sql = re.sub(r"\bInf\b", "1e999", sql)  # (the trace spells an infinite float parameter Inf)
            steps = [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql)]
            out.append((sql, steps))
    finally:
        conn.close()
    return out


def full_scans(planned):
    bad = []
    for sql, steps in planned:
        for step in steps:
            words = step.split()
            table = words[1] if len(words) > 1 and words[0] in ("SCAN", "SEARCH") else None
            if table in BIG_TABLES and words[0] == "SCAN" and "INDEX" not in step:
                bad.append((step, sql))
            if "TEMP B-TREE" in step and any(" %s " % t in " %s " % sql for t in BIG_TABLES):
                bad.append((step, sql))
    return bad


def run_cli(db, *args):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        assert queuectl.main(["--db", str(db)] + list(args)) == 0


@pytest.mark.parametrize("command", [
    ["status"],
    ["status", "--json"],
    ["list", "--limit", "50"],
    ["list", "--state", "completed", "--limit", "50"],
    ["list", "--state", "pending", "--limit", "50", "--json"],
    ["top", "--once"],
    ["top", "--once", "--state", "scheduled"],
    ["top", "--once", "--state", "dead", "--queue", "default"],
], ids=" ".join)
def test_read_commands_use_indexes_only(db, traced, command):
    fill(db)
    traced.clear()
    run_cli(db, *command)
    planned = plans(db, traced)
    assert any(" jobs" in sql or "job_counts" in sql for sql, _ in planned), "no query of the jobs seen: %s" % traced
    assert full_scans(planned) == []


def test_top_job_view_uses_indexes_only(db, traced):
    fill(db)
    store = queuectl.SqliteStore(str(db))
    try:
        job_id = store.jobs_page(state="completed", limit=1)[0][0].id
        traced.clear()
        snap = queuectl.top_snapshot(store, time.time(), job_id=job_id)
        assert snap.job.id == job_id and snap.attempt is not None
    finally:
        store.close()
    planned = plans(db, traced)
    assert any("attempts" in sql for sql, _ in planned)
    assert full_scans(planned) == []


def test_claim_uses_indexes_only(db, traced):
    fill(db)
    store = queuectl.SqliteStore(str(db))
    try:
        store.register_worker({"id": "w-test", "host": queuectl.HOST, "pid": 1, "pid_started": None,
                               "supervisor_pid": None, "now": time.time(), "wake": None})
        traced.clear()
        job = store.claim("w-test", queuectl.HOST, time.time(), 60.0)
        assert job is not None
        claimed = list(traced)
        traced.clear()
        store.finish(job.id, job.runs, "w-test", "completed", time.time(), "completed", exit_code=0)
        finished = list(traced)
    finally:
        store.close()
    planned = plans(db, claimed)
    assert any("UPDATE jobs" in sql for sql, _ in planned), claimed
    assert full_scans(planned) == []
    assert full_scans(plans(db, finished)) == []


def test_the_check_itself_catches_a_full_scan(db, traced):
    """Guard against a test that cannot fail: an unindexed filter is reported."""
    fill(db, 200)
    assert full_scans(plans(db, ["SELECT id FROM jobs WHERE command = 'true 7'"])) != []
    assert full_scans(plans(db, ["SELECT id FROM jobs ORDER BY command LIMIT 5"])) != []
