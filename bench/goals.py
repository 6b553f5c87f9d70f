"""The measurements: anchors (what the machine can do without a queue) and
queuectl's figures for the goals of the performance issue.  Each function
returns a plain dict; run.py turns them into tables."""

import contextlib
import io
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from lib import PY, ROOT, StartProbe, Gate, cli_env, cpu_seconds, median, rss_bytes, run_quiet, summary, wait_for
from systems import Queuectl, queuectl

# --- anchors ----------------------------------------------------------------------------


def anchor_spawn_latency(workdir, samples):
    """Popen(['/bin/sh', '-c', 'echo N > FIFO']) to the token arriving: the cost
    of starting the job's process itself, which pickup latency is measured above."""
    probe = StartProbe(Path(workdir) / "anchor.fifo")
    lat = []
    try:
        for i in range(samples):
            t0 = time.monotonic()
            p = subprocess.Popen(["/bin/sh", "-c", probe.command(i)])
            lat.append(probe.wait(i) - t0)
            p.wait()
            time.sleep(0.01)
    finally:
        probe.close()
    return summary(lat)


SPAWN_LOOP = r"""
import subprocess, sys, time
n = int(sys.argv[1])
sys.stdin.readline()
t0 = time.monotonic()
for _ in range(n):
    subprocess.run(["/bin/sh", "-c", "true"])
print(t0, time.monotonic(), flush=True)
"""


def anchor_spawn_rate(n_total, parallel):
    """`sh -c true` started and waited for, one after another, by ``parallel``
    Python processes at once (subprocess.run, as a script would): jobs/s."""
    procs = [subprocess.Popen([PY, "-c", SPAWN_LOOP, str(n_total // parallel)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE) for _ in range(parallel)]
    time.sleep(0.3)  # let them start
    for p in procs:
        p.stdin.write(b"go\n")
        p.stdin.flush()
    spans = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        spans.append(tuple(float(x) for x in out.split()))
    start = min(s for s, _ in spans)
    end = max(e for _, e in spans)
    return (n_total // parallel * parallel) / (end - start)


def anchor_sh_loop_rate(n):
    """`sh -c true` from a dash loop (fork+exec from a tiny process): the floor of the machine."""
    t0 = time.monotonic()
    subprocess.run(["/bin/sh", "-c", 'i=0; while [ $i -lt %d ]; do /bin/sh -c true; i=$((i+1)); done' % n], check=True)
    return n / (time.monotonic() - t0)


def _fresh_sqlite(path, sync):
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(path) + suffix)
    c = sqlite3.connect(str(path), isolation_level=None)
    c.execute("PRAGMA journal_mode = WAL")
    c.execute("PRAGMA synchronous = %s" % sync)
    c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT, command TEXT, state TEXT, priority INTEGER, "
              "run_at REAL, created_at REAL)")
    return c


def anchor_commit_rate(workdir, sync, n):
    """Single-row transactions (BEGIN IMMEDIATE; INSERT; COMMIT), WAL, the given synchronous: commits/s."""
    c = _fresh_sqlite(Path(workdir) / ("commit-%s.db" % sync.lower()), sync)
    row = ("abcdefghij", "true", "pending", 2, 0.0, 0.0)
    t0 = time.perf_counter()
    for _ in range(n):
        c.execute("BEGIN IMMEDIATE")
        c.execute("INSERT INTO t (k, command, state, priority, run_at, created_at) VALUES (?, ?, ?, ?, ?, ?)", row)
        c.execute("COMMIT")
    dt = time.perf_counter() - t0
    c.close()
    return n / dt


def anchor_batch_insert_rate(workdir, n, batch=1000):
    """executemany of ``batch``-row transactions into a plain table (WAL, synchronous=FULL): rows/s."""
    c = _fresh_sqlite(Path(workdir) / "batch.db", "FULL")
    now = time.time()
    rows = [("job%09d" % i, "true", "pending", 2, now, now) for i in range(batch)]
    t0 = time.perf_counter()
    for _ in range(n // batch):
        c.execute("BEGIN IMMEDIATE")
        c.executemany("INSERT INTO t (k, command, state, priority, run_at, created_at) VALUES (?, ?, ?, ?, ?, ?)", rows)
        c.execute("COMMIT")
    dt = time.perf_counter() - t0
    c.close()
    return (n // batch * batch) / dt


def anchor_schema_insert_rate(workdir, n, batch=1000):
    """The same executemany, but into queuectl's own jobs table (its indexes and
    its counting trigger), with the statement the store uses: what the store's
    schema costs per row, before any Python work.  Rows/s."""
    db = Path(workdir) / "schema-batch.db"
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(db) + suffix)
    store = queuectl.SqliteStore(str(db))
    cfg = store.config()
    now = time.time()
    job = queuectl.validate_job({"command": "true"}, cfg, now, cwd="/tmp")
    rows = []
    for i in range(batch):
        row = store._job_row(job, now, "pending") if hasattr(store, "_job_row") else dict(job, now=now)
        rows.append(dict(row, id=queuectl.new_job_id()))
    conn = store.conn
    t0 = time.perf_counter()
    for _ in range(n // batch):
        for r in rows:  # fresh random ids, as the store draws them (~1 µs each)
            r["id"] = queuectl.new_job_id()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(queuectl.SQL_INSERT_JOB, rows)
        conn.execute("COMMIT")
    dt = time.perf_counter() - t0
    store.close()
    return (n // batch * batch) / dt


MIN_SCRIPT = """import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], timeout=5, isolation_level=None)
c.execute("PRAGMA synchronous = FULL")
c.execute("BEGIN IMMEDIATE")
c.execute("INSERT INTO t (k, command, state, priority, run_at, created_at) VALUES ('x', 'true', 'pending', 2, ?, ?)",
          (time.time(), time.time()))
c.execute("COMMIT")
print(c.execute("SELECT last_insert_rowid()").fetchone()[0])
"""


CPU_TIMES = {}  # id(list of wall times) -> CPU seconds (user + sys) of the same runs


def _time_cmd(argv, runs, env, warm=2):
    """Wall times of ``runs`` runs (after ``warm`` unmeasured ones); the CPU time of
    each run (user + sys, from wait4) is kept in CPU_TIMES: on a shared machine it
    is the steadier figure."""
    for _ in range(warm):
        run_quiet(argv, env=env)
    times, cpu = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        err = p.stderr.read()
        _, status, usage = os.wait4(p.pid, 0)
        times.append(time.perf_counter() - t0)
        cpu.append(usage.ru_utime + usage.ru_stime)
        p.returncode = os.waitstatus_to_exitcode(status)
        p.stderr.close()
        if p.returncode != 0:
            raise RuntimeError("%s failed: %s" % (" ".join(argv[:4]), err.decode(errors="replace")[-300:]))
    CPU_TIMES[id(times)] = cpu
    return times


def _wall_cpu(argv, runs, env, warm=2):
    times = _time_cmd(argv, runs, env, warm)
    return median(times), median(CPU_TIMES.pop(id(times)))


# --- goal 1: pickup latency and idle CPU -------------------------------------------------


def pickup(system, workers, samples, probe_dir, idle_gap=0.05):
    """Idle workers; enqueue ``echo N > FIFO``; the token's arrival is the job's
    process starting.  Returns summaries from enqueue returned / enqueue called."""
    probe = StartProbe(Path(probe_dir) / ("pickup-%d.fifo" % os.getpid()))
    after_return, after_call = [], []
    try:
        for i in range(samples):
            time.sleep(idle_gap + random.random() * idle_gap)  # workers are back asleep
            probe.drain()
            t_call = time.monotonic()
            system.enqueue(probe.command(i))
            t_ret = time.monotonic()
            t_run = probe.wait(i)
            after_return.append(t_run - t_ret)
            after_call.append(t_run - t_call)
        if hasattr(system, "wait_all"):
            system.wait_all()
    finally:
        probe.close()
    return {"after_return": summary(after_return), "after_call": summary(after_call)}


def idle_cpu(workdir, workers, seconds):
    """CPU used by idle workers and their supervisor over ``seconds``, in % of one core."""
    q = Queuectl(Path(workdir) / "idle")
    q.setup()
    try:
        q.start_workers(workers)
        pids = q.worker_pids()
        sup = q.supervisor.pid
        before = {p: cpu_seconds(p) for p in pids + [sup]}
        t0 = time.monotonic()
        time.sleep(seconds)
        dt = time.monotonic() - t0
        after = {p: cpu_seconds(p) for p in pids + [sup]}
        per_worker = [100.0 * (after[p] - before[p]) / dt for p in pids]
        return {"seconds": dt, "worker_pct": max(per_worker), "workers_pct": per_worker,
                "supervisor_pct": 100.0 * (after[sup] - before[sup]) / dt,
                "clock_tick": 1.0 / os.sysconf("SC_CLK_TCK")}
    finally:
        q.teardown()


# --- goal 2 and 6: drain throughput -------------------------------------------------------


def drain(system, workers, n, gate_dir, command="true"):
    """Queue ``n`` jobs behind ``workers`` blocker jobs, release the blockers, and
    time until all ``n`` are done.  Returns enqueue and drain rates (jobs/s)."""
    if hasattr(system, "max_queued"):  # leave room for the blockers and our own status calls
        n = min(n, system.max_queued - workers - 20)
    gate = Gate(gate_dir)
    system.start_workers(workers)
    try:
        for i in range(workers):
            system.enqueue(gate.command(i))
        gate.wait_started(workers)
        if hasattr(system, "done"):
            with contextlib.suppress(NotImplementedError):
                base = system.done()
        t_e0 = time.perf_counter()
        if hasattr(system, "timed_enqueue_many"):
            enqueue_s = system.timed_enqueue_many([command] * n)
        else:
            system.enqueue_many([command] * n)
            enqueue_s = time.perf_counter() - t_e0
        gate.release()
        t0 = time.monotonic()
        if hasattr(system, "wait_all"):
            system.wait_all()
        else:
            target = base + n + workers
            wait_for(lambda: system.done() >= target, 600, 0.002, "%d jobs done" % n)
        t1 = time.monotonic()
    finally:
        system.stop_workers()
    return {"enqueue_rate": n / enqueue_s, "drain_rate": n / (t1 - t0), "seconds": t1 - t0, "jobs": n}


# --- goal 3: bulk enqueue and CLI start-up --------------------------------------------------


def bulk_enqueue(workdir, n_cli, n_api, batch_rate):
    d = Path(workdir) / "bulk"
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    # `enqueue -` with JSON Lines on stdin: one process, one transaction
    data = "".join('{"command": "true %d"}\n' % i for i in range(n_cli)).encode()
    times = []
    for rep in range(2):
        db = d / ("cli-%d.db" % rep)
        argv = [PY, str(ROOT / "queuectl.py"), "--db", str(db), "enqueue", "-"]
        run_quiet(argv[:5] + ["status"], env=cli_env())  # create the database first
        t0 = time.perf_counter()
        r = subprocess.run(argv, input=data, capture_output=True, env=cli_env())
        times.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise RuntimeError("enqueue - failed: %s" % r.stderr.decode(errors="replace")[-300:])
        assert len(r.stdout.splitlines()) == n_cli
    out["cli_rate"] = n_cli / min(times)
    # the Python-level call: validate + SqliteStore.enqueue in 1,000-job batches
    store = queuectl.SqliteStore(str(d / "api.db"))
    cfg = store.config()
    t0 = time.perf_counter()
    for start in range(0, n_api, 1000):
        now = time.time()
        jobs = [queuectl.validate_job({"command": "true %d" % i}, cfg, now) for i in range(start, min(n_api, start + 1000))]
        store.enqueue(jobs, now)
    out["api_rate"] = n_api / (time.perf_counter() - t0)
    # the same without validation (what the store itself costs)
    now = time.time()
    jobs = [queuectl.validate_job({"command": "true %d" % i}, cfg, now) for i in range(1000)]
    t0 = time.perf_counter()
    reps = max(1, n_api // 1000)
    for _ in range(reps):
        store.enqueue([dict(j) for j in jobs], now)
    out["store_rate"] = reps * 1000 / (time.perf_counter() - t0)
    store.close()
    out["cli_ratio"] = out["cli_rate"] / batch_rate
    out["api_ratio"] = out["api_rate"] / batch_rate
    out["n_cli"], out["n_api"] = n_cli, n_api
    return out


def build_pyz(d):
    """Build a .pyz of the current sources with the project's own build.sh, in a
    private copy of the tree (so dist/ of the checkout is left alone)."""
    tree = Path(d) / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    for name in ("build.sh", "queuectl.py", "pyproject.toml"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, tree / name)
    if (ROOT / "queuectl_web").is_dir():
        shutil.copytree(ROOT / "queuectl_web", tree / "queuectl_web",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    os.symlink(ROOT / ".venv", tree / ".venv")
    r = run_quiet(["bash", str(tree / "build.sh")], timeout=600)
    pyz = tree / "dist" / "queuectl.pyz"
    if r.returncode != 0 or not pyz.exists():
        raise RuntimeError("build.sh failed: %s" % r.stderr.decode(errors="replace")[-300:])
    return pyz


def cli_startup(workdir, runs):
    """One `enqueue` invocation (source file, installed module, .pyz) against a
    minimal Python script that commits one row: medians of ``runs`` of the wall
    time and of the CPU time (user + sys)."""
    d = Path(workdir) / "startup"
    d.mkdir(parents=True, exist_ok=True)
    env = cli_env(SHIV_ROOT=str(d / "shiv-root"))
    out = {}
    anchor_db = d / "min.db"
    _fresh_sqlite(anchor_db, "FULL").close()
    (d / "min.py").write_text(MIN_SCRIPT)
    out["python_bare"] = _wall_cpu([PY, "-c", "pass"], runs, env)
    out["min_script"] = _wall_cpu([PY, str(d / "min.py"), str(anchor_db)], runs, env)
    db = str(d / "q.db")
    run_quiet([PY, str(ROOT / "queuectl.py"), "--db", db, "status"], env=env)
    # 1. the source file, as `python3 queuectl.py` (Python compiles a script on every run)
    out["source"] = _wall_cpu([PY, str(ROOT / "queuectl.py"), "--db", db, "enqueue", "--", "true"], runs, env)
    src = (ROOT / "queuectl.py").read_text()
    t0 = time.perf_counter()
    compile(src, "queuectl.py", "exec")
    out["compile"] = time.perf_counter() - t0
    out["source_bytes"] = len(src.encode())
    # 2. installed (pip install . gives a console script: `from queuectl import main`), bytecode cached
    site = d / "site"
    site.mkdir(exist_ok=True)
    shutil.copy2(ROOT / "queuectl.py", site / "queuectl.py")
    if (ROOT / "queuectl_web").is_dir():
        shutil.rmtree(site / "queuectl_web", ignore_errors=True)
        shutil.copytree(ROOT / "queuectl_web", site / "queuectl_web")
    entry = "import sys; sys.path.insert(0, %r); from queuectl import main; sys.exit(main())" % str(site)
    out["installed"] = _wall_cpu([PY, "-c", entry, "--db", db, "enqueue", "--", "true"], runs, env)
    # ... and its import alone
    imp = _wall_cpu([PY, "-c", "import sys; sys.path.insert(0, %r); import queuectl" % str(site)], runs, env)
    out["import"] = (imp[0] - out["python_bare"][0], imp[1] - out["python_bare"][1])
    # 3. a .pyz of these sources, built by build.sh (shiv), run with the same python3
    try:
        pyz = build_pyz(d)
        out["pyz"] = _wall_cpu([PY, str(pyz), "--db", db, "enqueue", "--", "true"], runs, env, warm=3)
    except Exception as e:
        out["pyz_error"] = str(e)
    out["runs"] = runs
    return out


# --- goal 4: scale ------------------------------------------------------------------------------


def populate(db, n, pending=1000, output="ok\n"):
    """A queuectl database with ``n`` jobs: ``pending`` due ones, 1% dead, the rest
    completed with one attempt each (written with plain SQL, fast)."""
    store = queuectl.SqliteStore(str(db))
    cfg = store.config()
    now = time.time()
    sample = queuectl.validate_job({"command": "true"}, cfg, now, cwd="/tmp")
    store.enqueue([dict(sample, id="probe-0")], now)  # learn the columns the store writes
    store.close()
    c = sqlite3.connect(str(db), isolation_level=None)
    cols = [r[1] for r in c.execute("PRAGMA table_info(jobs)")]
    probe = dict(zip(cols, c.execute("SELECT * FROM jobs WHERE id = 'probe-0'").fetchone()))
    c.execute("DELETE FROM jobs WHERE id = 'probe-0'")
    acols = [r[1] for r in c.execute("PRAGMA table_info(attempts)")]
    c.execute("PRAGMA synchronous = OFF")
    insert_cols = [k for k in cols if k != "seq"]
    sql = "INSERT INTO jobs (%s) VALUES (%s)" % (", ".join(insert_cols), ", ".join("?" * len(insert_cols)))
    a_fields = {"job_id", "n", "worker_id", "host", "pid", "started_at", "ended_at", "exit_code", "outcome",
                "output", "output_bytes"}
    a_cols = [k for k in acols if k in a_fields]
    asql = "INSERT INTO attempts (%s) VALUES (%s)" % (", ".join(a_cols), ", ".join("?" * len(a_cols)))
    n_dead = n // 100
    n_done = n - pending - n_dead
    t_base = now - n * 0.01
    batch = 50000
    i = 0
    while i < n:
        c.execute("BEGIN")
        rows, arows = [], []
        for j in range(i, min(n, i + batch)):
            t = t_base + j * 0.01
            row = dict(probe, id="j%08d" % j, created_at=t, updated_at=t + 0.005, run_at=t)
            if j < n_done:
                row.update(state="completed", attempts=1, runs=1, started_at=t + 0.001, finished_at=t + 0.005,
                           exit_code=0)
            elif j < n_done + n_dead:
                row.update(state="dead", attempts=1, runs=1, started_at=t + 0.001, finished_at=t + 0.005,
                           exit_code=1, last_error="exit code 1", max_retries=0)
            else:
                row.update(state="pending", run_at=t_base)
            rows.append([row.get(k) for k in insert_cols])
            if row["runs"]:
                a = {"job_id": row["id"], "n": 1, "worker_id": "bench-w", "host": "bench", "pid": 1,
                     "started_at": t + 0.001, "ended_at": t + 0.005, "exit_code": row["exit_code"],
                     "outcome": "completed" if row["exit_code"] == 0 else "failed", "output": output,
                     "output_bytes": len(output)}
                arows.append([a[k] for k in a_cols])
        c.executemany(sql, rows)
        c.executemany(asql, arows)
        c.execute("COMMIT")
        i += batch
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.close()


PLAN_QUERIES = {
    "claim (next due job)": lambda: queuectl.SQL_CLAIM_SELECT,
    "status (counts)": lambda: queuectl.SQL_COUNTS,
    "list --limit 50": lambda: queuectl.SQL_LIST_ALL,
    "list --state S --limit 50": lambda: queuectl.SQL_LIST_STATE,
}


def query_plans(db):
    """EXPLAIN QUERY PLAN of the hot queries: 'index' unless a step scans a whole table
    (``SCAN jobs`` without an index) or sorts with a temporary B-tree."""
    c = sqlite3.connect(str(db))
    params = {"now": time.time(), "limit": 50, "state": "completed", "queue": "default", "worker": "w",
              "lease_until": 0, "host": "h"}
    out = {}
    for name, sql in PLAN_QUERIES.items():
        try:
            text = sql()
            rows = c.execute("EXPLAIN QUERY PLAN " + text, params).fetchall()
            steps = [r[-1] for r in rows]
            bad = [s for s in steps if (s.startswith("SCAN ") and "USING" not in s and "job_counts" not in s)
                   or "TEMP B-TREE" in s]
            out[name] = {"plan": steps, "full_scan": bool(bad)}
        except Exception as e:  # a renamed constant: report, do not fail the run
            out[name] = {"plan": ["error: %s" % e], "full_scan": None}
    c.close()
    return out


def _in_process(argv):
    """queuectl.main(argv) with stdout discarded: seconds."""
    sink = io.StringIO()
    old = sys.stdout
    sys.stdout = sink
    try:
        t0 = time.perf_counter()
        rc = queuectl.main(argv)
        dt = time.perf_counter() - t0
    finally:
        sys.stdout = old
    if rc != 0:
        raise RuntimeError("queuectl %s exited %s" % (" ".join(argv), rc))
    return dt


def _dashboard(db, workdir):
    """Start `queuectl dashboard` on a free port if this build has it; returns (proc, url) or (None, why)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    argv = [PY, str(ROOT / "queuectl.py"), "--db", str(db), "dashboard", "--port", str(port)]
    log = open(Path(workdir) / "dashboard.log", "ab")
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=cli_env(),
                         start_new_session=True)
    log.close()
    url = "http://127.0.0.1:%d/api/status" % port
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if p.poll() is not None:
            return None, "no `dashboard` command in this build"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                r.read()
            return p, url
        except OSError:
            time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    return None, "dashboard did not answer"


SCALE_COMMANDS = (("status", ["status"]), ("status --json", ["status", "--json"]),
                  ("list --limit 50", ["list", "--limit", "50"]),
                  ("list --state completed --limit 50", ["list", "--state", "completed", "--limit", "50"]))


def scale(workdir, sizes, runs):
    """Databases of each size in ``sizes``; every operation is timed on them in
    turn (small, big, small, big, ...), so a change in the machine's load
    during the run weighs on both alike."""
    points = {}
    for n in sizes:
        d = Path(workdir) / ("scale-%d" % n)
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        db = d / "q.db"
        t0 = time.perf_counter()
        populate(db, n)
        out = {"n": n, "populate_s": time.perf_counter() - t0, "dir": d, "db": db}
        size = sum(os.path.getsize(str(db) + s) for s in ("", "-wal") if os.path.exists(str(db) + s))
        out["db_bytes"] = size
        out["bytes_per_job"] = size / n
        out["plans"] = query_plans(db)
        points[n] = out
    stores = {}
    for n, pt in points.items():
        store = queuectl.SqliteStore(str(pt["db"]))
        store.register_worker({"id": "bench-w", "host": "bench", "pid": os.getpid(), "pid_started": None,
                               "supervisor_pid": None, "now": time.time(), "wake": None})
        stores[n] = store
        pt["claim_stmt"], pt["claim_txn"] = [], []
        for name, _ in SCALE_COMMANDS:
            pt[name] = []
        pt["api_status"] = []
    try:
        # claim: the statement alone (rolled back), and the whole transaction
        for _ in range(runs):
            for n, store in stores.items():
                conn = store.conn
                conn.execute("BEGIN IMMEDIATE")
                t = time.perf_counter()
                conn.execute(queuectl.SQL_CLAIM, {"worker": "bench-w", "now": time.time(),
                                                  "lease_until": time.time() + 15, "host": "bench"}).fetchall()
                points[n]["claim_stmt"].append(time.perf_counter() - t)
                conn.execute("ROLLBACK")
        for _ in range(runs):
            for n, store in stores.items():
                t = time.perf_counter()
                job = store.claim("bench-w", "bench", time.time(), 15.0)
                points[n]["claim_txn"].append(time.perf_counter() - t)
                assert job is not None
    finally:
        for store in stores.values():
            store.close()
    for name, argv in SCALE_COMMANDS:
        for n, pt in points.items():
            _in_process(["--db", str(pt["db"])] + argv)  # warm
        for _ in range(runs):
            for n, pt in points.items():
                pt[name].append(_in_process(["--db", str(pt["db"])] + argv))
    dashboards = {}
    try:
        for n, pt in points.items():
            proc, url = _dashboard(pt["db"], pt["dir"])
            if proc is None:
                pt["api_status"] = None
                pt["api_status_why"] = url
            else:
                dashboards[n] = (proc, url)
        if len(dashboards) == len(points):
            for _ in range(runs):
                for n, (proc, url) in dashboards.items():
                    t = time.perf_counter()
                    with urllib.request.urlopen(url, timeout=30) as r:
                        r.read()
                    points[n]["api_status"].append(time.perf_counter() - t)
    finally:
        for proc, _ in dashboards.values():
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for n, pt in points.items():
        for key in ["claim_stmt", "claim_txn", "api_status"] + [name for name, _ in SCALE_COMMANDS]:
            if pt.get(key) is not None:
                pt[key] = summary(pt[key]) if pt[key] else None
        shutil.rmtree(pt.pop("dir"), ignore_errors=True)
        pt.pop("db")
    return points


# --- goal 5: memory ----------------------------------------------------------------------------


def memory(workdir, n):
    """One worker runs ``n`` jobs that print from nothing to 3 MB; RSS sampled as it goes."""
    q = Queuectl(Path(workdir) / "memory")
    q.setup()
    cmds = []
    for i in range(n):
        if i % 1000 == 999:
            cmds.append("head -c 3000000 /dev/zero | tr '\\0' x")  # over the 1 MiB output limit
        elif i % 10 == 9:
            cmds.append("head -c 20000 /dev/urandom | od -An | head -c 20000")
        elif i % 2:
            cmds.append("echo job %d says hello" % i)
        else:
            cmds.append("true")
    samples = []
    try:
        q.start_workers(1)
        pid = q.worker_pids()[0]
        start_rss = rss_bytes(pid)
        start_anon = rss_bytes(pid, "RssAnon")
        t0 = time.monotonic()
        now = time.time()
        cfg = q.cfg
        for i in range(0, n, 5000):
            jobs = [queuectl.validate_job({"command": c}, cfg, now) for c in cmds[i:i + 5000]]
            q.store.enqueue(jobs, now)  # (it wakes the idle worker)
        next_sample = 0
        while True:
            done = q.done()
            if done >= next_sample:
                samples.append((done, rss_bytes(pid)))
                next_sample = done + max(1, n // 20)
            failed = q._reader.execute("SELECT COALESCE(SUM(n), 0) FROM job_counts WHERE state NOT IN "
                                       "('completed', 'pending', 'processing')").fetchone()[0]
            if done + failed >= n:
                break
            if time.monotonic() - t0 > 3600:
                raise TimeoutError("memory run did not finish")
            time.sleep(0.05)
        dt = time.monotonic() - t0
        # "At the end" as "at the start": with the worker idle (its CPU time no longer moving).  The
        # last job prints 3 MB, and when its result becomes visible the worker may still hold that
        # output while it finishes recording it: a moment, not what it keeps.
        def settled():
            before = cpu_seconds(pid)
            time.sleep(0.05)
            return cpu_seconds(pid) == before

        wait_for(settled, 30, 0.01, "the worker idle after the last job")
        end_rss = rss_bytes(pid)
        end_anon = rss_bytes(pid, "RssAnon")
        hwm = rss_bytes(pid, "VmHWM")
        samples.append((n, end_rss))
    finally:
        q.teardown()
    warm = [r for d, r in samples if d >= n // 100] or [start_rss]
    db_size = os.path.getsize(q.db)
    shutil.rmtree(Path(workdir) / "memory", ignore_errors=True)
    return {"n": n, "start_rss": start_rss, "warm_rss": warm[0], "end_rss": end_rss, "peak_rss": hwm,
            "start_anon": start_anon, "end_anon": end_anon,
            "samples": samples, "seconds": dt, "rate": n / dt, "db_bytes": db_size}
