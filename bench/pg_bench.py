#!/usr/bin/env python3
"""PostgreSQL next to SQLite: the store's raw rates and the wake-up latency.

    .venv/bin/python bench/pg_bench.py [--pg URL] [--quick] [--json FILE]

Measures, through the Store interface queuectl's CLI and workers use (the same
calls, the same durability: SQLite with synchronous=FULL, PostgreSQL with its
server's settings, printed):

- the anchor: one-row INSERTs, one transaction each, no queue (the disk's limit);
- single enqueue: one job per ``enqueue()`` call (one transaction each);
- batch enqueue: 1,000 jobs per call;
- claim and complete: 1-4 processes, each claiming a job and recording its
  end (``claim()`` + ``finish()``), until the queue is empty (no command is run:
  this is the store's share of a job's cost);
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


def _drainer(db, n, start, done):
    store = queuectl.open_store(db)
    worker = "bench-%d" % n
    count = 0
    start.wait()
    while True:
        j = store.claim(worker, HOST, time.time(), LEASE)
        if j is None:
            break
        store.finish(j.id, j.runs, worker, "completed", time.time(), "completed", 0, output="", output_bytes=0)
        count += 1
    store.close()
    done.put((count, time.perf_counter()))


def claim_complete(backend, processes, jobs):
    store = backend.open()
    try:
        for start in range(0, jobs, 1000):
            store.enqueue([job(i) for i in range(min(1000, jobs - start))], time.time())
        ctx = multiprocessing.get_context("fork")
        start, done = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_drainer, args=(backend.db, n, start, done)) for n in range(processes)]
        for p in procs:
            p.start()
        time.sleep(0.5)  # let every process connect before the clock starts (a benchmark, not a test)
        t0 = time.perf_counter()
        start.set()
        results = [done.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(30)
        elapsed = max(t for _, t in results) - t0
        assert sum(c for c, _ in results) == jobs, results
        assert store.counts()["completed"] == jobs
        return jobs / elapsed
    finally:
        store.delete_jobs()
        store.close()


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
    for procs in (1, 2, 3, 4):
        rows.append(("claim + complete, %d process%s (jobs/s)" % (procs, "es" if procs > 1 else ""),
                     lambda b, procs=procs: claim_complete(b, procs, n_drain)))
    results = {}
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
        wakes = [[wakeup_latency(backend, n_wake) for backend in backends] for _ in range(repeat)]
        for k, what in enumerate(("enqueue() to worker awake", "notification alone")):
            for i, pct in enumerate(("p50", "p99")):
                label = "wake-up, %s, %s (ms)" % (what, pct)
                a, b = (percentile([w[j][k][i] for w in wakes], 50) for j in (0, 1))
                results[label] = {"sqlite": a, "postgres": b}
                print("%-44s %12.2f %12.2f %8.2fx" % (label, a, b, b / a), flush=True)
        print("\n(median of %d run(s) each; load average now %.1f)" % (repeat, os.getloadavg()[0]))
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
