#!/usr/bin/env python3
"""PostgreSQL next to SQLite: the store's raw rates and the wake-up latency.

    .venv/bin/python bench/pg_bench.py [--pg URL] [--quick] [--json FILE]

Measures, through the Store interface queuectl's CLI and workers use (the same
calls, the same durability: SQLite with synchronous=FULL, PostgreSQL with its
server's settings, printed):

- the anchor: one-row INSERTs, one transaction each, no queue (the disk's limit);
- single enqueue: one job per ``enqueue()`` call (one transaction each);
- batch enqueue: 1,000 jobs per call;
- claim and complete: 1-4 processes, each making a worker's store calls for
  every job until the queue is empty, as queuectl's worker does for jobs
  shorter than a second: on SQLite ``started()`` (the run's pid; it makes the
  claim durable) and ``finish_and_claim()`` (the result and the next claim,
  committed without waiting for the disk); on PostgreSQL ``finish_and_claim()``
  alone (one statement, durable at commit, the pid going with the result).
  No command is run: this is the store's share of a job's cost;
- the claim anchor, on PostgreSQL, run right after queuectl's in each round (so
  load that drifts hits both): a bare jobs table on the same server (id, state,
  run_at, two timestamps; one partial index on due rows), kept for the whole
  run and emptied after each drain as queuectl's is, the same job count and
  processes; before each drain, queuectl's tables and the anchor's are
  vacuumed, so both start without dead rows; each looping a claim (``UPDATE ... WHERE id = (SELECT ... FOR UPDATE
  SKIP LOCKED LIMIT 1)``) and a completing ``UPDATE``, one transaction each
  (each commit waits for the disk): what a minimal queue costs, and queuectl's
  rate as a fraction of it;
- for both on PostgreSQL, what one job writes while the processes drain: rows
  inserted, updated and deleted per table (``pg_stat_user_tables`` deltas of the
  benchmark's schema), WAL bytes (``pg_current_wal_lsn()`` delta; server-wide,
  so the commits of the whole server in the same window are shown next to it:
  about 2 per job means nothing else wrote) and commits;
- wake-up latency: from the start of an ``enqueue()`` of a due job to an idle
  worker process waking up (PostgreSQL: NOTIFY in the enqueue's transaction,
  the worker select()s on its LISTEN connection; SQLite: the enqueuing
  process sends a datagram to the worker's socket after the commit), and
  the notification alone (a NOTIFY statement; a datagram).

PostgreSQL runs in a fresh schema (dropped afterwards), SQLite in a temporary
file.  The PostgreSQL URL is --pg, else $QUEUECTL_TEST_PG, else
postgresql://postgres@127.0.0.1:5432/test.
"""

import argparse
import json
import multiprocessing
import os
import secrets
import select
import shutil
import socket
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import queuectl  # noqa: E402

HOST = "bench-host"
LEASE = 60.0


def job(i):
    return queuectl.validate_job({"command": "true"}, queuectl.DEFAULTS, time.time(), cwd="/")


def percentile(values, p):
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


class Backend:
    def __init__(self, name, db):
        self.name, self.db = name, db

    def open(self):
        return queuectl.open_store(self.db)


# --- measurements -----------------------------------------------------------------------


def raw_commit(backend, n):
    """The anchor: commits of one small row per transaction, no queue (what the disk allows)."""
    if backend.name == "SQLite":
        import sqlite3

        conn = sqlite3.connect(backend.db + ".anchor", isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        run = conn.execute
    else:
        import psycopg
        import queuectl_pg

        conninfo, schema = queuectl_pg.parse_url(backend.db)
        conn = psycopg.connect(conninfo, autocommit=True)
        conn.execute('SET search_path TO "%s"' % schema)
        run = conn.execute
    try:
        run("CREATE TABLE anchor (id integer PRIMARY KEY, v text)")
        t0 = time.perf_counter()
        for i in range(n):
            run("INSERT INTO anchor (id, v) VALUES (%d, 'x')" % i)
        return n / (time.perf_counter() - t0)
    finally:
        run("DROP TABLE anchor")
        conn.close()


def single_enqueue(backend, n):
    store = backend.open()
    try:
        specs = [job(i) for i in range(n)]
        t0 = time.perf_counter()
        for spec in specs:
            store.enqueue([spec], time.time())
        return n / (time.perf_counter() - t0)
    finally:
        store.delete_jobs()
        store.close()


def batch_enqueue(backend, batches, size=1000):
    store = backend.open()
    try:
        specs = [[job(i) for i in range(size)] for _ in range(batches)]
        t0 = time.perf_counter()
        for batch in specs:
            store.enqueue(batch, time.time())
        return batches * size / (time.perf_counter() - t0)
    finally:
        store.delete_jobs()
        store.close()


def _busy_retry(call):
    """``call()``, again while the database is busy (a worker waits and tries again too)."""
    while True:
        try:
            return call()
        except queuectl.DatabaseBusy:
            continue


def _drainer(db, n, start, done):
    """The store calls a worker makes for each job (queuectl.Worker): its first claim, then for each
    job ``started`` (the run's pid) when the store wants it at once (``pid_delay`` 0: SQLite, where
    it makes the claim durable; PostgreSQL takes a run's pid with its result when the run is shorter
    than a second, as these are) and ``finish_and_claim`` (the run's result and the next claim)."""
    store = queuectl.open_store(db)
    worker = "bench-%d" % n
    count = 0
    start.wait()
    j = _busy_retry(lambda: store.claim(worker, HOST, time.time(), LEASE))
    while j is not None:
        if store.pid_delay <= 0:
            _busy_retry(lambda: store.started(j.id, j.runs, os.getpid()))
        finished = dict(job_id=j.id, run=j.runs, worker_id=worker, state="completed", now=time.time(),
                        outcome="completed", exit_code=0, output="", output_bytes=0, pid=os.getpid())
        ok, j = _busy_retry(lambda: store.finish_and_claim(
            finished, dict(worker_id=worker, host=HOST, now=time.time(), lease=LEASE)))
        count += 1
    store.close()
    done.put((count, time.perf_counter()))


# The anchor: a minimal queue on the same server, claimed and completed as queuectl's jobs are
# (a claim is one statement and one transaction, the completion another).
ANCHOR_TABLE = """
CREATE TABLE anchor_jobs (
    id bigserial PRIMARY KEY,
    state text NOT NULL DEFAULT 'pending',
    run_at timestamptz NOT NULL DEFAULT now(),
    claimed_at timestamptz,
    finished_at timestamptz
);
CREATE INDEX anchor_jobs_due ON anchor_jobs (run_at, id) WHERE state = 'pending'
"""
ANCHOR_CLAIM = """
UPDATE anchor_jobs SET state = 'running', claimed_at = now()
WHERE id = (SELECT id FROM anchor_jobs WHERE state = 'pending' AND run_at <= now()
            ORDER BY run_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING id
"""
ANCHOR_COMPLETE = "UPDATE anchor_jobs SET state = 'done', finished_at = now() WHERE id = %s"


def _pg_connect(url):
    import psycopg
    import queuectl_pg

    conninfo, schema = queuectl_pg.parse_url(url)
    conn = psycopg.connect(conninfo, autocommit=True)
    conn.execute('SET search_path TO "%s"' % schema)
    return conn


def _anchor_drainer(db, n, start, done):
    conn = _pg_connect(db)
    count = 0
    start.wait()
    while True:
        row = conn.execute(ANCHOR_CLAIM).fetchone()
        if row is None:
            break
        conn.execute(ANCHOR_COMPLETE, row)
        count += 1
    conn.close()
    done.put((count, time.perf_counter()))


def pg_write_counters(conn, schema):
    """What the server has written so far: WAL position, commits of the whole server, and per
    table of ``schema`` the rows inserted, updated (of which HOT) and deleted."""
    conn.execute("SELECT pg_stat_clear_snapshot()")
    lsn = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint").fetchone()[0]
    commits = conn.execute("SELECT sum(xact_commit)::bigint FROM pg_stat_database").fetchone()[0]
    tables = {r[0]: tuple(r[1:]) for r in conn.execute(
        "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del FROM pg_stat_user_tables "
        "WHERE schemaname = %s", (schema,))}
    return {"wal": lsn, "commits": commits, "tables": tables}


def vacuum_schema(conn, schema):
    """VACUUM ANALYZE every table of ``schema``: each drain, queuectl's and the anchor's alike,
    starts from tables with no dead rows left by the drains before it (autovacuum's timing would
    otherwise favour whichever table it happened to visit)."""
    for (table,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,)).fetchall():
        conn.execute('VACUUM ANALYZE "%s"."%s"' % (schema, table))


def settled_counters(conn, schema, timeout=15.0):
    """pg_write_counters once the table statistics stop moving: a backend reports them at its
    exit or, idle, up to some seconds later, never at its commit."""
    last = pg_write_counters(conn, schema)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = pg_write_counters(conn, schema)
        if now["tables"] == last["tables"]:
            return now
        last = now
    return last


def write_delta(before, after, jobs):
    """Per job: WAL bytes, commits (server-wide) and {table: (ins, upd, hot, del)} in the window."""
    tables = {}
    for name, counts in after["tables"].items():
        old = before["tables"].get(name, (0, 0, 0, 0))
        d = tuple((a - b) / jobs for a, b in zip(counts, old))
        if any(d):
            tables[name] = d
    return {"wal": (after["wal"] - before["wal"]) / jobs, "commits": (after["commits"] - before["commits"]) / jobs,
            "tables": tables, "rows": sum(d[0] + d[1] + d[3] for d in tables.values())}


def _drain(target, db, processes, before):
    """Start ``processes`` of ``target`` on ``db`` and let them drain the queue: returns their
    ``(count, end time)`` results and the seconds from the start to the last one's end.
    ``before()`` runs once they are connected, just before the clock starts."""
    ctx = multiprocessing.get_context("fork")
    start, done = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(db, n, start, done)) for n in range(processes)]
    for p in procs:
        p.start()
    time.sleep(0.5)  # let every process connect before the clock starts (a benchmark, not a test)
    before()
    t0 = time.perf_counter()
    start.set()
    results = [done.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(30)
    return results, max(t for _, t in results) - t0


def claim_complete(backend, processes, jobs):
    """queuectl's claim + finish: ``{"rate": jobs/s, "writes": per job (PostgreSQL) or None}``."""
    store = backend.open()
    try:
        for start in range(0, jobs, 1000):
            store.enqueue([job(i) for i in range(min(1000, jobs - start))], time.time())
    finally:
        store.close()  # (its statistics are reported when it exits, before the window opens)
    stats = marks = None
    if backend.name == "PostgreSQL":
        import queuectl_pg

        schema = queuectl_pg.parse_url(backend.db)[1]
        with _pg_connect(backend.db) as setup:
            vacuum_schema(setup, schema)
        stats, marks = _pg_connect(backend.db), {}
    try:
        results, elapsed = _drain(_drainer, backend.db, processes,
                                  lambda: stats and marks.update(before=settled_counters(stats, schema)))
        after = stats and settled_counters(stats, schema)
        writes = stats and write_delta(marks["before"], after, jobs)
        store = backend.open()
        try:
            assert sum(c for c, _ in results) == jobs, results
            assert store.counts()["completed"] == jobs  # (on PostgreSQL it folds the count deltas too)
        finally:
            store.close()
        if stats:  # what that fold wrote, later, for the same jobs (housekeeping does it in a worker)
            writes["fold"] = write_delta(after, settled_counters(stats, schema), jobs)
        store = backend.open()
        store.delete_jobs()
        store.close()
        return {"rate": jobs / elapsed, "writes": writes}
    finally:
        if stats:
            stats.close()


def anchor_claim_complete(backend, processes, jobs):
    """The bare anchor on the same server: ``{"rate": jobs/s, "writes": per job}``."""
    import queuectl_pg

    schema = queuectl_pg.parse_url(backend.db)[1]
    stats = _pg_connect(backend.db)
    try:
        setup = _pg_connect(backend.db)  # (closed before the window opens: it reports its writes at exit)
        if setup.execute("SELECT to_regclass('anchor_jobs')").fetchone()[0] is None:
            for statement in ANCHOR_TABLE.split(";"):  # (one table for the whole run, as queuectl's)
                setup.execute(statement)
        setup.execute("INSERT INTO anchor_jobs (run_at) SELECT now() - interval '1 second' FROM generate_series(1, %s)",
                      (jobs,))
        vacuum_schema(setup, schema)
        setup.close()
        marks = {}
        results, elapsed = _drain(_anchor_drainer, backend.db, processes,
                                  lambda: marks.update(before=settled_counters(stats, schema)))
        writes = write_delta(marks["before"], settled_counters(stats, schema), jobs)
        assert sum(c for c, _ in results) == jobs, results
        assert stats.execute("SELECT count(*) FROM anchor_jobs WHERE state = 'done'").fetchone()[0] == jobs
        with _pg_connect(backend.db) as tidy:  # (as queuectl's jobs are deleted after their drain)
            tidy.execute("DELETE FROM anchor_jobs")
        return {"rate": jobs / elapsed, "writes": writes}
    finally:
        stats.close()


def _listener(db, ready, conn, rounds):
    """An idle worker: registers, then waits for wake-ups and reports when each came."""
    store = queuectl.open_store(db)
    fds = store.wait_fds()
    sock = None
    worker = "listener-%d" % os.getpid()
    wake = None
    if not fds:  # SQLite: the datagram socket a worker binds
        wake = queuectl.wake_address(db, worker)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind("\0" + wake)
        fds = [sock.fileno()]
    store.register_worker({"id": worker, "host": queuectl.HOST, "pid": os.getpid(), "pid_started": None,
                           "supervisor_pid": None, "now": time.time(), "wake": wake})
    ready.set()
    for _ in range(rounds):
        select.select(fds, [], [], 30)
        woken = time.monotonic()
        if sock:
            sock.recv(64)
        else:
            store.consume_notifications()
        conn.send(woken)
    store.unregister_worker(worker)
    store.close()


def wakeup_latency(backend, rounds):
    """``(enqueue, signal)``: each a (p50, p99) in ms.  enqueue: from calling ``enqueue()`` (its
    commit included) to the idle worker waking; signal: the notification alone, from sending it
    (PostgreSQL: a NOTIFY statement; SQLite: the datagram of ``send_wakeups``) to the wake-up."""
    store = backend.open()
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    here, there = ctx.Pipe()
    p = ctx.Process(target=_listener, args=(backend.db, ready, there, 2 * rounds))
    p.start()
    ready.wait(30)
    end_to_end, signal_only = [], []
    try:
        for _ in range(rounds):
            spec = job(0)
            t0 = time.monotonic()
            store.enqueue([spec], time.time())  # it wakes the worker after its commit
            end_to_end.append(here.recv() - t0)
            time.sleep(0.005)
            t0 = time.monotonic()
            if backend.name == "SQLite":
                queuectl.send_wakeups(store.wake_addresses(queuectl.HOST, 1))
            else:
                store.conn.execute(store.sql.NOTIFY, {"channel": store.channel})
            signal_only.append(here.recv() - t0)
            time.sleep(0.005)
    finally:
        p.join(30)
        store.delete_jobs()
        store.close()
    return [(percentile(lat, 50) * 1000, percentile(lat, 99) * 1000) for lat in (end_to_end, signal_only)]


# --- main -------------------------------------------------------------------------------


def pg_settings(url):
    import queuectl_pg

    s = queuectl_pg.PostgresStore(url)
    try:
        row = s._one("SELECT version() AS v, current_setting('fsync') AS fsync, "
                     "current_setting('synchronous_commit') AS sc, current_setting('wal_sync_method') AS ws")
        return "%s; fsync=%s, synchronous_commit=%s, wal_sync_method=%s" % (
            row["v"].split(" on ")[0], row["fsync"], row["sc"], row["ws"])
    finally:
        s.close()


PROCESSES = (1, 2, 3, 4)


def print_anchor(drains, results):
    """queuectl on PostgreSQL against the bare anchor, measured in the same rounds: rates, their
    ratio, and what one job writes (rows per table, WAL, commits)."""
    print()
    header = "%-44s %12s %12s %9s" % ("PostgreSQL: queuectl against a bare queue", "queuectl", "anchor", "ratio")
    print(header)
    print("-" * len(header))
    for procs, rounds in drains.items():
        q, a = ([r[i]["rate"] for r in rounds] for i in (1, 2))
        ratios = [x / y for x, y in zip(q, a)]  # per round: both under the same load
        label = "claim + complete, %d process%s (jobs/s)" % (procs, "es" if procs > 1 else "")
        results["anchor: " + label] = {"queuectl": percentile(q, 50), "anchor": percentile(a, 50),
                                       "ratio": percentile(ratios, 50), "runs": [[x, y] for x, y in zip(q, a)]}
        print("%-44s %12.0f %12.0f %8.2fx" % (label, percentile(q, 50), percentile(a, 50), percentile(ratios, 50)))
    every = [r for rounds in drains.values() for r in rounds]
    # WAL and commits are the whole server's: a run during which other sessions wrote shows more
    # than its 2 commits per job (plus a few to connect), and more WAL.  Those only ever add, so
    # the lowest run is the closest to the workload's own.
    for key, what, fmt, pick in (("rows", "rows written per job (ins + upd + del)", "%12.2f", 50),
                                 ("wal", "WAL bytes per job, median", "%12.0f", 50),
                                 ("wal", "WAL bytes per job, lowest run", "%12.0f", 0),
                                 ("commits", "commits per job (whole server), median", "%12.2f", 50)):
        q, a = (percentile([r[i]["writes"][key] for r in every], pick) for i in (1, 2))
        results["anchor: " + what] = {"queuectl": q, "anchor": a}
        print(("%-44s " + fmt + " " + fmt + " %8.2fx") % (what, q, a, q / a if a else float("nan")))
    for procs, rounds in drains.items():
        wal = ["%.0f/%.0f B (%.2f/%.2f)" % (r[1]["writes"]["wal"], r[2]["writes"]["wal"], r[1]["writes"]["commits"],
                                            r[2]["writes"]["commits"]) for r in rounds]
        print("  %d process%s, each round, queuectl/anchor: WAL per job (server commits per job): %s" % (
            procs, "es" if procs > 1 else "", ", ".join(wal)))
    results["anchor: writes of each run (queuectl, anchor)"] = {
        procs: [[r[1]["writes"], r[2]["writes"]] for r in rounds] for procs, rounds in drains.items()}
    print("\nper table, per job (median over all runs): inserted, updated (of which HOT), deleted")
    for i, who in ((1, "queuectl"), (2, "anchor")):
        names = sorted({t for r in every for t in r[i]["writes"]["tables"]})
        table = {}
        for name in names:
            cols = [percentile([r[i]["writes"]["tables"].get(name, (0, 0, 0, 0))[k] for r in every], 50)
                    for k in range(4)]
            table[name] = cols
            print("  %-9s %-22s ins %5.2f  upd %5.2f (HOT %5.2f)  del %5.2f" % ((who, name) + tuple(cols)))
        results["anchor: per table, " + who] = table
    fold = {}
    for name in sorted({t for r in every for t in r[1]["writes"]["fold"]["tables"]}):
        fold[name] = [percentile([r[1]["writes"]["fold"]["tables"].get(name, (0, 0, 0, 0))[k] for r in every], 50)
                      for k in range(4)]
        print("  %-9s %-22s ins %5.2f  upd %5.2f (HOT %5.2f)  del %5.2f" % (("(fold)", name) + tuple(fold[name])))
    results["anchor: per table, queuectl's later fold of the count deltas"] = fold


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pg", default=os.environ.get("QUEUECTL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test"))
    p.add_argument("--quick", action="store_true", help="fewer jobs (a smoke run)")
    p.add_argument("--repeat", type=int, default=3, metavar="N",
                   help="run each measurement N times, SQLite and PostgreSQL alternating, and print the median "
                        "(default 3; 1 with --quick)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    opts = p.parse_args(argv)
    n_single, n_batches, n_drain, n_wake = (300, 5, 600, 50) if opts.quick else (2000, 20, 4000, 300)
    repeat = 1 if opts.quick else max(1, opts.repeat)
    tmp = tempfile.mkdtemp(prefix="queuectl-pgbench-")
    schema = "bench_%d_%s" % (os.getpid(), secrets.token_hex(3))
    pg_url = opts.pg + ("&" if "?" in opts.pg else "?") + "schema=" + schema
    backends = [Backend("SQLite", os.path.join(tmp, "bench.db")), Backend("PostgreSQL", pg_url)]
    rows = [("anchor: one-row commits, no queue (rows/s)", lambda b: raw_commit(b, n_single)),
            ("single enqueue (jobs/s)", lambda b: single_enqueue(b, n_single)),
            ("batch enqueue, 1000 per call (jobs/s)", lambda b: batch_enqueue(b, n_batches))]
    results = {}
    drains = {}  # processes -> [(SQLite, PostgreSQL, anchor) per round], each {"rate", "writes"}
    try:
        print("machine: %d CPU(s), load average %.1f; Python %s" % (
            os.cpu_count(), os.getloadavg()[0], sys.version.split()[0]))
        print("SQLite %s (WAL, synchronous=FULL); PostgreSQL: %s" % (
            __import__("sqlite3").sqlite_version, pg_settings(pg_url)))
        print()
        header = "%-44s %12s %12s %9s" % ("", "SQLite", "PostgreSQL", "PG/SQLite")
        print(header)
        print("-" * len(header))
        for label, fn in rows:
            runs = [[fn(backend) for backend in backends] for _ in range(repeat)]
            a, b = (percentile([r[i] for r in runs], 50) for i in (0, 1))
            results[label] = {"sqlite": a, "postgres": b, "runs": runs}
            print("%-44s %12.0f %12.0f %8.2fx" % (label, a, b, b / a), flush=True)
        for procs in PROCESSES:
            # each round: SQLite, PostgreSQL, then the anchor on the same server, so drift hits all
            drains[procs] = [(claim_complete(backends[0], procs, n_drain), claim_complete(backends[1], procs, n_drain),
                              anchor_claim_complete(backends[1], procs, n_drain)) for _ in range(repeat)]
            label = "claim + complete, %d process%s (jobs/s)" % (procs, "es" if procs > 1 else "")
            a, b = (percentile([r[i]["rate"] for r in drains[procs]], 50) for i in (0, 1))
            results[label] = {"sqlite": a, "postgres": b, "runs": [[r[0]["rate"], r[1]["rate"]] for r in drains[procs]]}
            print("%-44s %12.0f %12.0f %8.2fx" % (label, a, b, b / a), flush=True)
        wakes = [[wakeup_latency(backend, n_wake) for backend in backends] for _ in range(repeat)]
        for k, what in enumerate(("enqueue() to worker awake", "notification alone")):
            for i, pct in enumerate(("p50", "p99")):
                label = "wake-up, %s, %s (ms)" % (what, pct)
                a, b = (percentile([w[j][k][i] for w in wakes], 50) for j in (0, 1))
                results[label] = {"sqlite": a, "postgres": b}
                print("%-44s %12.2f %12.2f %8.2fx" % (label, a, b, b / a), flush=True)
        print_anchor(drains, results)
        print("\n(median of %d run(s) each; %d jobs per drain; load average now %.1f)" % (
            repeat, n_drain, os.getloadavg()[0]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        import queuectl_pg

        s = queuectl_pg.PostgresStore(pg_url)
        s.drop_schema()
        s.close()
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
