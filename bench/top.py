#!/usr/bin/env python3
"""`queuectl top`: what one refresh costs as the queue grows, and the CPU `top` uses.

    .venv/bin/python bench/top.py [--sizes 10000,1000000] [--runs 100] [--seconds 30] [--pg URL]

- Refresh at scale: databases of each size (1% dead, 1,000 due, the rest completed with an
  attempt each, as bench/goals.py's ``populate``), and on each the work of one refresh of the
  screen: the change check (``data_version``), the snapshot (``top_snapshot``: every query
  behind the frame) and the frame itself (``render_top`` at 80x24), for the jobs list
  unfiltered, filtered by state, the scheduled jobs, the list of one queue (all the jobs are in
  "default"; "nosuch" has none: the list looks at its bound of jobs), and the job view.
  Sizes alternate run after run, so a change in the machine's load weighs on all alike.
  Prints the median, the p99, the statements per refresh and the ratio of the largest size
  to the smallest: about 1x means flat.  With --pg the same on PostgreSQL (a fresh schema,
  dropped afterwards).
- CPU while busy: `queuectl top` (the real program, on a pseudo-terminal of 80x24, refreshing
  every second) while two workers run a stream of short jobs, and while the queue is idle:
  its CPU time over the wall time (% of one core), the bytes it writes to the terminal per
  second and the jobs per second the queue finished meanwhile.
"""

import argparse
import contextlib
import fcntl
import os
import secrets
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from goals import populate  # noqa: E402
from lib import PY, ROOT, cli_env, cpu_seconds, md_table, ms, ratio, summary  # noqa: E402

import queuectl  # noqa: E402

CASES = ("list", "list --state dead", "list --state scheduled", "list --queue default", "list --queue nosuch",
         "job view")


def log(msg):
    sys.stderr.write("[bench top %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


# --- one refresh at scale -------------------------------------------------------------------------------------


def refresh(store, case, job_id):
    """Everything one refresh of the screen does: change check, snapshot, frame."""
    now = time.time()
    queuectl.top_change_marker(store)
    kw = {"limit": 24}
    if case == "list --state dead":
        kw["filt"] = "dead"
    elif case == "list --state scheduled":
        kw["filt"] = "scheduled"
    elif case.startswith("list --queue "):
        kw["queue"] = case.split()[-1]
    elif case == "job view":
        kw["job_id"] = job_id
    snap = queuectl.top_snapshot(store, now, "bench.db", **kw)
    view = queuectl.TopView(mode="job" if case == "job view" else "list")
    lines, _ = queuectl.render_top(snap, view, 80, 24)
    assert snap.job is not None if case == "job view" else snap.jobs is not None
    return lines


def populate_pg(url, n, pending=1000):
    """A PostgreSQL schema with ``n`` jobs shaped as ``populate`` makes them (plain SQL, fast)."""
    import psycopg
    import queuectl_pg

    store = queuectl_pg.PostgresStore(url)  # creates the schema
    store.close()
    conninfo, schema = queuectl_pg.parse_url(url)
    now = time.time()
    n_dead = n // 100
    n_done = n - pending - n_dead
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute('SET search_path TO "%s"' % schema)
        conn.execute("SET synchronous_commit = off")
        p = {"n": n, "done": n_done, "dead": n_dead, "base": now - n * 0.01}
        conn.execute("""
            INSERT INTO jobs (id, command, state, priority, queue, max_retries, attempts, runs, run_at, created_at,
                              updated_at, started_at, finished_at, exit_code, last_error, cwd)
            SELECT 'j' || lpad(g::text, 8, '0'), 'true',
                   CASE WHEN g <= %(done)s THEN 'completed' WHEN g <= %(done)s + %(dead)s THEN 'dead' ELSE 'pending' END,
                   2, 'default', CASE WHEN g <= %(done)s THEN 3 ELSE 0 END,
                   CASE WHEN g <= %(done)s + %(dead)s THEN 1 ELSE 0 END, CASE WHEN g <= %(done)s + %(dead)s THEN 1 ELSE 0 END,
                   CASE WHEN g <= %(done)s + %(dead)s THEN %(base)s + g * 0.01 ELSE %(base)s END,
                   %(base)s + g * 0.01, %(base)s + g * 0.01 + 0.005,
                   CASE WHEN g <= %(done)s + %(dead)s THEN %(base)s + g * 0.01 + 0.001 END,
                   CASE WHEN g <= %(done)s + %(dead)s THEN %(base)s + g * 0.01 + 0.005 END,
                   CASE WHEN g <= %(done)s THEN 0 WHEN g <= %(done)s + %(dead)s THEN 1 END,
                   CASE WHEN g > %(done)s AND g <= %(done)s + %(dead)s THEN 'exit code 1' END, '/tmp'
            FROM generate_series(0, %(n)s - 1) g""", p)
        conn.execute("""
            INSERT INTO attempts (job_id, n, worker_id, host, pid, started_at, ended_at, exit_code, outcome, output,
                                  output_bytes)
            SELECT id, 1, 'bench-w', 'bench', 1, started_at, finished_at, exit_code,
                   CASE WHEN exit_code = 0 THEN 'completed' ELSE 'failed' END, 'ok' || chr(10), 3
            FROM jobs WHERE runs = 1""")
        conn.execute("ANALYZE")


def drop_pg(url):
    import psycopg
    import queuectl_pg

    conninfo, schema = queuectl_pg.parse_url(url)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute('DROP SCHEMA IF EXISTS "%s" CASCADE' % schema)


def refresh_cost(workdir, sizes, runs, pg_url=None):
    """{backend: {n: {case: summary, case + ' statements': k}}}: one refresh timed on each size in turn."""
    out = {}
    backends = [("SQLite", None)] + ([("PostgreSQL", pg_url)] if pg_url else [])
    for backend, base in backends:
        stores, urls, traced = {}, [], {}
        try:
            for n in sizes:
                t0 = time.perf_counter()
                if base is None:
                    db = Path(workdir) / ("top-%d.db" % n)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(db)
                    populate(db, n)
                    store = queuectl.SqliteStore(str(db))
                    statements = []
                    store.conn.set_trace_callback(statements.append)
                    traced[n] = statements
                else:
                    url = base + ("&" if "?" in base else "?") + "schema=qbench_top_%d_%s" % (n, secrets.token_hex(3))
                    urls.append(url)
                    populate_pg(url, n)
                    import queuectl_pg

                    store = queuectl_pg.PostgresStore(url)
                log("%s: %d jobs ready in %.0fs" % (backend, n, time.perf_counter() - t0))
                stores[n] = store
            job_ids = {n: s.jobs_page(state="completed", limit=1)[0][0].id for n, s in stores.items()}
            times = {n: {case: [] for case in CASES} for n in sizes}
            counts = {n: {} for n in sizes}
            for n, store in stores.items():  # warm: the first refresh reads pages from disk
                for case in CASES:
                    refresh(store, case, job_ids[n])
                    if n in traced:
                        traced[n].clear()
                        refresh(store, case, job_ids[n])
                        counts[n][case] = sum(1 for s in traced[n] if not s.lstrip().upper().startswith(
                            ("BEGIN", "COMMIT", "ROLLBACK", "PRAGMA QUERY_ONLY")))
            for _ in range(runs):
                for n, store in stores.items():
                    for case in CASES:
                        t = time.perf_counter()
                        refresh(store, case, job_ids[n])
                        times[n][case].append(time.perf_counter() - t)
            out[backend] = {n: {case: summary(times[n][case]) for case in CASES} for n in sizes}
            for n in sizes:
                for case in CASES:
                    out[backend][n][case]["statements"] = counts[n].get(case)
        finally:
            for store in stores.values():
                store.close()
            for url in urls:
                drop_pg(url)
    return out


# --- CPU while the queue is busy ---------------------------------------------------------------------------


def top_cpu(workdir, seconds, busy, job_seconds=0.05, feed_per_second=20):
    """Run `queuectl top` on a pseudo-terminal for ``seconds`` (after a warm-up) while two
    workers run ``feed_per_second`` jobs of ``job_seconds`` each (``busy``), or an idle queue."""
    d = Path(workdir) / ("cpu-%s" % ("busy" if busy else "idle"))
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    db = str(d / "q.db")
    env = cli_env(QUEUECTL_DB=db)
    queuectl.SqliteStore(db).close()
    procs = []
    stop = threading.Event()
    written = [0]
    master = None
    try:
        log_file = open(d / "workers.log", "wb")
        workers = subprocess.Popen([PY, str(ROOT / "queuectl.py"), "worker", "start", "--foreground", "-c", "2"],
                                   stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                   cwd=str(d), start_new_session=True)
        log_file.close()
        procs.append(workers)
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        top = subprocess.Popen([PY, str(ROOT / "queuectl.py"), "top"], stdin=slave, stdout=slave, stderr=slave,
                               env=dict(env, TERM="xterm-256color", LC_ALL="C.UTF-8"), cwd=str(d),
                               start_new_session=True)
        os.close(slave)
        procs.append(top)

        def drain():
            while not stop.is_set():
                try:
                    data = os.read(master, 65536)
                except OSError:
                    return
                if not data:
                    return
                written[0] += len(data)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()

        def feed():
            store = queuectl.SqliteStore(db)
            try:
                cfg = store.config()
                while not stop.is_set():
                    now = time.time()
                    store.enqueue([queuectl.validate_job({"command": "sleep %g" % job_seconds}, cfg, now, cwd="/")],
                                  now)
                    stop.wait(1.0 / feed_per_second)
            finally:
                store.close()

        if busy:
            threading.Thread(target=feed, daemon=True).start()
        time.sleep(3.0)  # warm-up: imports, the first frame, workers at full speed
        if top.poll() is not None:
            raise RuntimeError("top exited early (%s)" % top.returncode)
        done0 = _completed(db)
        cpu0, bytes0, t0 = cpu_seconds(top.pid), written[0], time.monotonic()
        time.sleep(seconds)
        cpu1, bytes1, t1 = cpu_seconds(top.pid), written[0], time.monotonic()
        done1 = _completed(db)
        stop.set()
        os.write(master, b"q")
        top.wait(timeout=10)
        return {"cpu_percent": 100.0 * (cpu1 - cpu0) / (t1 - t0), "bytes_per_second": (bytes1 - bytes0) / (t1 - t0),
                "jobs_per_second": (done1 - done0) / (t1 - t0), "seconds": t1 - t0, "top_exit": top.returncode}
    finally:
        stop.set()
        for p in procs:
            with contextlib.suppress(OSError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                p.wait(timeout=10)
        if master is not None:
            with contextlib.suppress(OSError):
                os.close(master)


def _completed(db):
    conn = sqlite3.connect(db, timeout=10)
    try:
        row = conn.execute("SELECT n FROM job_counts WHERE state = 'completed'").fetchone()
        return row[0] if row else 0
    finally:
        conn.close()


# --- the report ---------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,1000000", help="database sizes, comma-separated")
    parser.add_argument("--runs", type=int, default=100, help="refreshes timed per case and size")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the CPU of top is measured")
    parser.add_argument("--pg", metavar="URL", help="also measure the refresh on this PostgreSQL database")
    parser.add_argument("--only", choices=("refresh", "cpu"), help="one of the two measurements")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    workdir = tempfile.mkdtemp(prefix="queuectl-bench-top-")
    try:
        if args.only in (None, "refresh"):
            log("refresh at %s jobs, %d runs" % (" and ".join(map(str, sizes)), args.runs))
            result = refresh_cost(workdir, sizes, args.runs, args.pg)
            small, big = sizes[0], sizes[-1]
            for backend, points in result.items():
                print("\n### One refresh of `top` (%s): change check, snapshot, 80x24 frame\n" % backend)
                headers = ["screen", "statements"] + ["p50 at %s" % f"{n:,}" for n in sizes] + \
                    ["p99 at %s" % f"{n:,}" for n in sizes] + ["%s / %s" % (f"{big:,}", f"{small:,}")]
                rows = []
                for case in CASES:
                    k = points[small][case]["statements"]
                    rows.append([case, "-" if k is None else str(k)] + [ms(points[n][case]["p50"], 2) for n in sizes]
                                + [ms(points[n][case]["p99"], 2) for n in sizes]
                                + [ratio(points[big][case]["p50"] / points[small][case]["p50"])])
                print(md_table(headers, rows))
        if args.only in (None, "cpu"):
            rows = []
            for busy in (True, False):
                log("CPU of top, queue %s, %gs" % ("busy" if busy else "idle", args.seconds))
                r = top_cpu(workdir, args.seconds, busy)
                rows.append(["busy: 2 workers, 20 jobs/s" if busy else "idle", "%.2f%%" % r["cpu_percent"],
                             "%.0f B/s" % r["bytes_per_second"], "%.1f" % r["jobs_per_second"],
                             "%.0f s" % r["seconds"], str(r["top_exit"])])
            print("\n### CPU of `queuectl top` (80x24, refresh every 1 s)\n")
            print(md_table(["queue", "top CPU (% of a core)", "terminal output", "jobs/s finished", "measured",
                            "exit after q"], rows))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
