"""End-to-end tests of the features beyond the core: named queues with limits and
pausing, dependencies, unique keys, cancel, wait, logs --follow, purge and
retention, cron schedules and webhooks.

The real program runs as separate processes, as a user runs it (the command
comes from QUEUECTL_CMD, so `./build.sh test` runs these against
dist/queuectl.pyz too).  Nothing sleeps to wait for something: tests poll with
deadlines.  A schedule tick is made due by setting ``next_run`` in the past in
the schedules table, which is what the clock reaching the tick looks like to
the supervisors; nobody waits a minute.
"""

import contextlib
import datetime
import http.client
import http.server
import json
import os
import shlex
import signal
import sqlite3
import subprocess
import threading
import time

import pytest

import conftest
import queuectl
from conftest import db_rows, pid_exists, program, program_python, state_of, states, wait_state, wait_until

pytestmark = pytest.mark.e2e


# --- helpers --------------------------------------------------------------------------------


def job_field(db, job_id, column):
    rows = db_rows(db, "SELECT %s FROM jobs WHERE id = ?" % column, (job_id,))
    return rows[0][0] if rows else None


def noted_spans(notes_file, prefix):
    """{job: (start, end)} that the jobs noted themselves (see noted_sleep), for jobs named prefix*:
    one clock, and in causal order, unlike the attempts' times taken by different workers."""
    spans_ = {}
    for job, what, t in (line.split() for line in notes_file.read_text().splitlines()):
        if job.startswith(prefix):
            spans_.setdefault(job, {})[what] = float(t)
    return {job: (d["start"], d["end"]) for job, d in spans_.items()}


def noted_sleep(job, notes_file, seconds=0.3):
    return "echo %s start $(date +%%s.%%N) >> %s; sleep %s; echo %s end $(date +%%s.%%N) >> %s" % (
        job, notes_file, seconds, job, notes_file)


def n_attempts(db, job_id):
    return db_rows(db, "SELECT count(*) FROM attempts WHERE job_id = ?", (job_id,))[0][0]


def n_jobs(db, where="1=1", params=()):
    return db_rows(db, "SELECT count(*) FROM jobs WHERE " + where, params)[0][0]


def db_exec(db, sql, params=()):
    """Write to the database straight (what a clock jump or an old database looks like)."""
    if queuectl.is_db_url(db):
        conftest._pg_conn(str(db)).execute(sql.replace("?", "%s"), tuple(params) or None)
        return
    conn = sqlite3.connect(str(db), timeout=10, isolation_level=None)
    try:
        conn.execute(sql, params)
    finally:
        conn.close()


def jsonl(jobs):
    return "".join(json.dumps(j) + "\n" for j in jobs)


def gate_wait(path):
    """Shell snippet that blocks until ``path`` exists (the test opens the gate)."""
    return "while [ ! -f %s ]; do sleep 0.02; done" % shlex.quote(str(path))


def next_new_year_utc(now=None):
    now = datetime.datetime.fromtimestamp(now or time.time(), datetime.timezone.utc)
    return datetime.datetime(now.year + 1, 1, 1, tzinfo=datetime.timezone.utc).timestamp()


class Procs:
    """Programs a test starts itself (besides workers); killed by PID at teardown."""

    def __init__(self, db, tmp_path):
        self.db, self.tmp_path, self.procs = db, tmp_path, []

    def start(self, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE):
        proc = subprocess.Popen(program() + [str(a) for a in args], stdout=stdout, stderr=stderr,
                                stdin=subprocess.DEVNULL, env=conftest.program_env(self.db), cwd=self.tmp_path)
        self.procs.append(proc)
        return proc

    def kill_all(self):
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    os.kill(p.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                p.communicate(timeout=10)


@pytest.fixture
def procs(db, tmp_path):
    p = Procs(db, tmp_path)
    yield p
    p.kill_all()


class LineReader:
    """Collects the lines a child writes to a pipe, as they arrive (a thread per stream)."""

    def __init__(self, stream):
        self.lines = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream):
        for raw in iter(stream.readline, b""):
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def wait_for(self, n, timeout=15):
        try:
            wait_until(lambda: len(self.lines) >= n, timeout)
        except AssertionError:
            raise AssertionError("waited for %d lines, got %r" % (n, self.lines)) from None
        return list(self.lines)

    def join(self, timeout=10):
        self._thread.join(timeout)
        return list(self.lines)


def supervisor_descendants(pids):
    """Processes forked by these supervisors (workers, the webhook sender), from /proc."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open("/proc/%s/stat" % name, "rb") as f:
                    stat = f.read()
                parents[int(name)] = int(stat[stat.rindex(b")") + 2:].split()[1])
    found, todo = set(), list(pids)
    while todo:
        parent = todo.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                todo.append(pid)
    return found


# --- a webhook endpoint ----------------------------------------------------------------------


class Hook:
    """A local HTTP endpoint.  Paths: anything -> 200; /flaky -> 500 the first time, then
    200; /hang -> no answer until the test releases it."""

    def __init__(self):
        self.requests = []  # dicts: path, headers, body, at
        self.release = threading.Event()
        self.hanging = 0
        self._lock = threading.Lock()
        self._failed = set()
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with hook._lock:
                    hook.requests.append({"path": self.path, "headers": dict(self.headers),
                                          "body": json.loads(body), "at": time.monotonic()})
                    first_failure = self.path == "/flaky" and self.path not in hook._failed
                    hook._failed.add(self.path)
                if self.path == "/hang":
                    with hook._lock:
                        hook.hanging += 1
                    hook.release.wait(60)
                code = 500 if first_failure else 200
                with contextlib.suppress(OSError):
                    self.send_response(code)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def to(self, path):
        with self._lock:
            return [r for r in self.requests if r["path"] == path]

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook(workers):
    h = Hook()
    yield h
    # the webhook sender is forked by a supervisor and is no worker record: kill it by PID too
    workers.extra_pids |= supervisor_descendants([p.pid for p in workers.procs])
    h.close()


# --- named queues ----------------------------------------------------------------------------


def test_queue_limit_of_one_holds_across_two_supervisors(run, db, workers, tmp_path):
    r = run("queue", "set-limit", "lim", "1", "--create")
    assert r.rc == 0 and "at most 1 running" in r.out
    notes = tmp_path / "notes"
    jobs = [{"id": "lim%d" % i, "command": noted_sleep("lim%d" % i, notes), "queue": "lim"} for i in range(4)]
    jobs += [{"id": "free%d" % i, "command": noted_sleep("free%d" % i, notes)} for i in range(2)]  # no limit
    assert run("enqueue", "-", stdin=jsonl(jobs)).rc == 0
    workers.start(2)
    workers.start(2)
    wait_until(lambda: n_jobs(db, "state = 'completed'") == 6, 30, message="not all jobs completed")
    lim = sorted(noted_spans(notes, "lim").items(), key=lambda kv: kv[1])
    assert len(lim) == 4
    for (_, (_, end)), (job, (start, _)) in zip(lim, lim[1:]):
        assert start >= end, "%s started while another job of queue lim was running" % job
    assert len({r[0] for r in db_rows(db, "SELECT worker_id FROM attempts")}) >= 2
    # a free job ran while a job of lim did (whichever of the two processes noted its start first)
    free = noted_spans(notes, "free").values()
    assert any(fs < le and ls < fe for fs, fe in free for _, (ls, le) in lim), \
        "a full queue must not hold up the jobs of other queues"
    (q,) = [q for q in json.loads(run("queue", "list", "--json").out) if q["name"] == "lim"]
    assert q["max_running"] == 1 and q["paused"] is False


def test_queue_pause_lets_running_job_finish_starts_nothing_then_resume(run, db, workers, tmp_path):
    workers.start(1)
    assert run("enqueue", "--id", "first", "-q", "pq", "--", gate_wait(tmp_path / "gate")).rc == 0
    wait_state(db, "first", "processing")
    r = run("queue", "pause", "pq")
    assert r.rc == 0 and "paused" in r.out
    assert run("enqueue", "--id", "second", "-q", "pq", "-p", "high", "--", "true").rc == 0
    # a witness in another queue, lower priority: a worker that ignored the pause would take `second` first
    assert run("enqueue", "--id", "witness", "-p", "low", "--", "true").rc == 0
    (tmp_path / "gate").touch()
    wait_state(db, "first", "completed")  # the running job finished despite the pause
    wait_state(db, "witness", "completed")
    assert state_of(db, "second") == "pending" and n_attempts(db, "second") == 0
    (q,) = [q for q in json.loads(run("queue", "list", "--json").out) if q["name"] == "pq"]
    assert q["paused"] is True and q["counts"].get("pending") == 1
    assert "paused" in run("queue", "list").out
    r = run("queue", "resume", "pq")
    assert r.rc == 0 and "resumed" in r.out
    wait_state(db, "second", "completed")


def test_worker_with_queue_option_serves_only_those_queues(run, db, workers):
    jobs = [{"id": "b1", "command": "true", "queue": "b", "priority": "high"},
            {"id": "a1", "command": "true", "queue": "a"}, {"id": "a2", "command": "true", "queue": "a"},
            {"id": "d1", "command": "true"}]
    assert run("enqueue", "-", stdin=jsonl(jobs)).rc == 0
    workers.start(1, args=["--queue", "a"])
    wait_state(db, "a1", "completed")
    wait_state(db, "a2", "completed")
    # the worker ran out of work in `a` (it would have taken b1 first, being high priority, and d1)
    assert state_of(db, "b1") == "pending" and state_of(db, "d1") == "pending"
    assert n_attempts(db, "b1") == 0 and n_attempts(db, "d1") == 0
    workers.start(1, args=["--queue", "b,default"])
    wait_state(db, "b1", "completed")
    wait_state(db, "d1", "completed")


def test_queue_options_are_validated(run, db):
    for args in (("queue", "set-limit", "q1", "many"), ("queue", "set-limit", "q1", "1.5"),
                 ("queue", "pause", "bad/name"), ("enqueue", "-q", "bad name", "--", "true"),
                 ("worker", "start", "--foreground", "--queue", "a,bad/name")):
        r = run(*args, timeout=20)  # a worker start that is not refused would run on
        assert r.rc == 2, (args, r)
        assert r.err.startswith("queuectl: error:") and len(r.err.splitlines()) == 1, (args, r.err)
    assert n_jobs(db) == 0
    assert json.loads(run("queue", "list", "--json").out) == []
    r = run("queue", "set-limit", "q1", "none", "--create")
    assert r.rc == 0 and "no limit" in r.out


# --- dependencies ----------------------------------------------------------------------------


def test_dependency_chain_runs_in_order(run, db, workers, tmp_path):
    notes = tmp_path / "notes"  # each job notes its own start and end (noted_spans)
    assert run("enqueue", "--id", "a", "--", noted_sleep("a", notes)).rc == 0
    assert run("enqueue", "--id", "b", "--after", "a", "--", noted_sleep("b", notes, 0)).rc == 0
    assert run("enqueue", "--id", "c", "--after", "b", "--", noted_sleep("c", notes, 0)).rc == 0
    assert run("enqueue", "--id", "d", "-a", "a,b", "--", noted_sleep("d", notes, 0)).rc == 0
    assert [state_of(db, j) for j in "abcd"] == ["pending", "waiting", "waiting", "waiting"]
    assert json.loads(run("get", "d", "--json").out)["after"] == ["a", "b"]
    workers.start(3)
    for j in "abcd":
        wait_state(db, j, "completed")
    times = noted_spans(notes, "")
    assert times["b"][0] >= times["a"][1]
    assert times["c"][0] >= times["b"][1]
    assert times["d"][0] >= max(times["a"][1], times["b"][1])
    # a dependency that already completed does not hold a new job back
    assert run("enqueue", "--id", "e", "--after", "a", "--", "true").rc == 0
    wait_state(db, "e", "completed")


def test_dead_dependency_cancels_its_dependents_naming_it(run, db, workers):
    assert run("enqueue", "--id", "root", "-r", "0", "--", "exit 3").rc == 0
    assert run("enqueue", "--id", "mid", "--after", "root", "--", "true").rc == 0
    assert run("enqueue", "--id", "leaf", "--after", "mid", "--", "true").rc == 0
    assert run("enqueue", "--id", "other", "--", "true").rc == 0
    workers.start(1)
    wait_state(db, "root", "dead")
    wait_state(db, "mid", "cancelled")
    wait_state(db, "leaf", "cancelled")
    wait_state(db, "other", "completed")
    mid = json.loads(run("get", "mid", "--json").out)
    assert "root" in mid["last_error"] and "dead" in mid["last_error"]
    leaf = json.loads(run("get", "leaf", "--json").out)
    assert "mid" in leaf["last_error"] and "cancelled" in leaf["last_error"]
    assert n_attempts(db, "mid") == 0 and n_attempts(db, "leaf") == 0
    # a new job after a dead one is refused: it could never run
    r = run("enqueue", "--id", "late", "--after", "root", "--", "true")
    assert r.rc == 4 and "root" in r.err
    assert state_of(db, "late") is None


def test_unknown_dependencies_and_cycles_are_refused_with_nothing_added(run, db):
    r = run("enqueue", "--after", "nope", "--", "true")
    assert r.rc == 3 and "nope" in r.err
    cycle = [{"id": "ok1", "command": "true"}, {"id": "x", "command": "true", "after": ["y"]},
             {"id": "y", "command": "true", "after": ["z"]}, {"id": "z", "command": "true", "after": "x"}]
    r = run("enqueue", "-", stdin=jsonl(cycle))
    assert r.rc == 2 and "cycle" in r.err and r.out == ""
    r = run("enqueue", "-", stdin=jsonl([{"id": "self", "command": "true", "after": ["self"]}]))
    assert r.rc == 2 and "cycle" in r.err
    r = run("enqueue", "-", stdin=jsonl([{"id": "ok2", "command": "true"},
                                         {"id": "w", "command": "true", "after": ["ok2", "ghost"]}]))
    assert r.rc == 3 and "ghost" in r.err
    assert n_jobs(db) == 0
    # a dependency later in the same batch is fine: ids come out in input order
    r = run("enqueue", "-", stdin=jsonl([{"id": "late", "command": "true", "after": ["early"]},
                                         {"id": "early", "command": "true"}]))
    assert r.rc == 0 and r.lines == ["late", "early"]
    assert state_of(db, "late") == "waiting" and state_of(db, "early") == "pending"


# --- unique jobs -----------------------------------------------------------------------------


def test_unique_key_concurrent_enqueues_create_exactly_one_job(run, db, workers, procs):
    racers = [procs.start("enqueue", "--unique-key", "K", "--", "true") for _ in range(8)]
    results = [(p.wait(60), *[s.decode() for s in p.communicate()]) for p in racers]
    assert all(rc == 0 for rc, _, _ in results), results
    ids = {out for _, out, _ in results}
    assert len(ids) == 1 and len(ids.pop().split()) == 1, results
    assert n_jobs(db, "unique_key = 'K'") == 1
    (held,) = [r[0] for r in db_rows(db, "SELECT id FROM jobs WHERE unique_key = 'K'")]
    assert sum("unique key already queued" in err for _, _, err in results) == 7
    workers.start(1)
    wait_state(db, held, "completed")
    r = run("enqueue", "--unique-key", "K", "--", "true")  # the key is free again
    assert r.rc == 0 and r.out.strip() != held
    assert n_jobs(db, "unique_key = 'K'") == 2


def test_concurrent_commands_on_one_database_all_succeed(run, db, procs):
    """What the unique-key race runs on: commands that open and close the database while others
    do (a fan-out script) must never be refused; the first round also creates the database."""
    for round_ in range(3):
        racers = [procs.start("enqueue", "--", "true") if i % 2 or round_ == 0 else procs.start("status")
                  for i in range(8)]
        for p in racers:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err.decode()
    assert n_jobs(db) == 8 + 4 + 4


def test_unique_key_is_held_by_a_failed_job_until_it_is_cancelled(run, db, workers):
    run("config", "set", "backoff-base", "1000")  # the failed job waits for its retry for a long time
    assert run("enqueue", "--id", "flaky", "--unique-key", "F", "-r", "2", "--", "exit 1").rc == 0
    workers.start(1)
    wait_state(db, "flaky", "failed")
    r = run("enqueue", "--unique-key", "F", "--", "true")
    assert r.rc == 0 and r.out == "flaky\n"
    r = run("cancel", "flaky")
    assert r.rc == 0 and state_of(db, "flaky") == "cancelled"
    r = run("enqueue", "--id", "fresh", "--unique-key", "F", "--", "true")
    assert r.rc == 0 and r.out == "fresh\n"
    wait_state(db, "fresh", "completed")


# --- cancel ----------------------------------------------------------------------------------


def test_cancel_a_pending_job_and_its_dependents(run, db, workers):
    assert run("enqueue", "--id", "p", "--", "true").rc == 0
    assert run("enqueue", "--id", "q", "--after", "p", "--", "true").rc == 0
    r = run("cancel", "p")
    assert r.rc == 0 and r.out == "job p cancelled\n"
    assert state_of(db, "p") == "cancelled" and state_of(db, "q") == "cancelled"
    assert "p" in job_field(db, "q", "last_error")
    r = run("cancel", "p")
    assert r.rc == 4 and "already cancelled" in r.err
    r = run("cancel", "ghost")
    assert r.rc == 3 and "ghost" in r.err
    assert run("enqueue", "--id", "witness", "-p", "low", "--", "true").rc == 0
    workers.start(1)
    wait_state(db, "witness", "completed")
    assert n_attempts(db, "p") == 0 and n_attempts(db, "q") == 0


def test_cancel_a_running_job_kills_its_whole_tree(run, db, workers, tmp_path):
    cmd = "sleep 300 & echo $! > %s; sleep 300" % (tmp_path / "gc.pid")
    assert run("enqueue", "--id", "tree", "-r", "3", "--", cmd).rc == 0
    workers.start(1)
    wait_until(lambda: (tmp_path / "gc.pid").exists() and (tmp_path / "gc.pid").read_text().strip(), 15)
    grandchild = int((tmp_path / "gc.pid").read_text())
    assert pid_exists(grandchild) and state_of(db, "tree") == "processing"
    started = time.monotonic()
    r = run("cancel", "tree")
    assert r.rc == 0 and "cancelled (its process tree was killed)" in r.out, r
    assert time.monotonic() - started < 10
    assert state_of(db, "tree") == "cancelled"
    wait_until(lambda: not pid_exists(grandchild), 5, message="the background grandchild survived the cancel")
    job = json.loads(run("get", "tree", "--json").out)
    assert job["runs"] == 1 and [a["outcome"] for a in job["attempt_history"]] == ["cancelled"]
    assert "cancelled" in job["last_error"]
    assert run("enqueue", "--id", "next", "--", "true").rc == 0  # the worker is free again
    wait_state(db, "next", "completed")
    assert state_of(db, "tree") == "cancelled" and n_attempts(db, "tree") == 1  # no retry


def test_a_dashboard_cancel_stops_a_running_job_as_fast_as_a_cli_cancel(run, db, workers):
    """Waking the job's worker is the store's job, whoever cancels: the dashboard's API or `queuectl
    cancel`.  Each cancel comes right after the job started, so a worker that was not woken would
    see it only at its own look at the job, a second later (an idle one at its poll interval: 30 s
    here).  Timed from the cancel request's commit to the job's end."""
    from queuectl_web import server as web

    workers.start(1, poll=30)
    dashboard = web.make_server(str(db), port=0)  # in this process: its store is the one that cancels
    dashboard.start()

    def dashboard_cancel(job_id):
        conn = http.client.HTTPConnection("127.0.0.1", dashboard.server_address[1], timeout=10)
        try:
            conn.request("POST", "/api/jobs/%s/cancel" % job_id, body=b"{}", headers={
                "Authorization": "Bearer " + dashboard.token, "Content-Type": "application/json"})
            response = conn.getresponse()
            assert (response.status, json.loads(response.read())["result"]) == (200, "requested")
        finally:
            conn.close()

    def cli_cancel(job_id):
        """Starts `queuectl cancel`; returns a function that waits for it and checks what it said."""
        proc = subprocess.Popen(program() + ["cancel", job_id], env=conftest.program_env(db), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def finished():
            out = proc.communicate(timeout=30)[0].decode()
            assert proc.returncode == 0 and "job %s cancelled (its process tree was killed)" % job_id in out, out
        return finished

    took = {}
    try:
        for how, cancel in (("dashboard", dashboard_cancel), ("cli", cli_cancel)):
            job_id = "long-" + how
            assert run("enqueue", "--id", job_id, "--", "sleep 60").rc == 0
            wait_until(lambda: db_rows(db, "SELECT pid FROM attempts WHERE job_id = ?", (job_id,)) not in ([], [(None,)]),
                       20, interval=0.005, message="job %s did not start" % job_id)
            finished = cancel(job_id)
            wait_until(lambda: job_field(db, job_id, "cancel_requested") == 1, 10, interval=0.002)
            requested = time.monotonic()
            wait_state(db, job_id, "cancelled", timeout=10)
            took[how] = time.monotonic() - requested
            if finished:
                finished()
    finally:
        dashboard.stop()
    assert took["dashboard"] < 0.5 and took["cli"] < 0.5, took


# --- wait ------------------------------------------------------------------------------------


def test_wait_exit_statuses(run, db, workers, procs, tmp_path):
    jobs = [{"id": "ok", "command": "true"}, {"id": "ok2", "command": "echo hi"},
            {"id": "bad", "command": "exit 7", "max_retries": 0},
            {"id": "later", "command": "true", "delay": 3600},
            {"id": "slow", "command": gate_wait(tmp_path / "gate")}]
    assert run("enqueue", "-", stdin=jsonl(jobs)).rc == 0
    r = run("wait", "ghost")
    assert r.rc == 3 and "ghost" in r.err
    waiter = procs.start("wait", "slow")
    workers.start(2)
    for j in ("ok", "ok2", "bad"):
        wait_state(db, j, ("completed", "dead"))
    r = run("wait", "ok")
    assert r.rc == 0 and r.out == "ok completed (exit code 0)\n"
    r = run("wait", "bad")
    assert r.rc == 7 and "bad dead (exit code 7)" in r.out
    assert run("wait", "ok", "ok2").rc == 0
    assert run("wait", "ok", "bad", "--quiet").rc == 1
    started = time.monotonic()
    r = run("wait", "later", "ok", "--timeout", "0.3")
    assert r.rc == 124 and "later" in r.err and "ok" not in r.err.split("waiting for")[-1]
    assert time.monotonic() - started < 5
    assert run("cancel", "later").rc == 0
    assert run("wait", "later").rc == 1  # cancelled
    wait_state(db, "slow", "processing")
    assert waiter.poll() is None, "wait returned while its job was still running"
    (tmp_path / "gate").touch()
    assert waiter.wait(15) == 0
    assert state_of(db, "slow") == "completed"


# --- logs --follow ---------------------------------------------------------------------------


def test_logs_follow_streams_while_running_and_across_a_retry(run, db, workers, procs, tmp_path):
    run("config", "set", "backoff-max", "0.1")  # the retry starts right after the failed run
    gate = tmp_path / "gate"
    cmd = ('echo "attempt $QUEUECTL_ATTEMPT start"; '
           'while [ ! -f %s$QUEUECTL_ATTEMPT ]; do sleep 0.02; done; '
           'echo "attempt $QUEUECTL_ATTEMPT end"; [ "$QUEUECTL_ATTEMPT" -ge 2 ]') % shlex.quote(str(gate))
    assert run("enqueue", "--id", "chatty", "-r", "1", "--", cmd).rc == 0
    follower = procs.start("logs", "chatty", "--follow")
    out, err = LineReader(follower.stdout), LineReader(follower.stderr)
    workers.start(1)
    assert out.wait_for(1) == ["attempt 1 start"]
    assert state_of(db, "chatty") == "processing", "the first line must arrive while the job runs"
    (tmp_path / "gate1").touch()
    assert out.wait_for(3) == ["attempt 1 start", "attempt 1 end", "attempt 2 start"]
    assert state_of(db, "chatty") == "processing" and follower.poll() is None
    (tmp_path / "gate2").touch()
    assert follower.wait(15) == 0
    assert out.join() == ["attempt 1 start", "attempt 1 end", "attempt 2 start", "attempt 2 end"]
    assert any("--- run 2 ---" in line for line in err.join())
    assert state_of(db, "chatty") == "completed"
    # following a job that already ended prints its output and exits with its status
    assert run("enqueue", "--id", "done", "-r", "0", "--", "echo bye; exit 5").rc == 0
    wait_state(db, "done", "dead")
    r = run("logs", "done", "--follow")
    assert r.rc == 5 and r.out == "bye\n"
    assert run("logs", "ghost", "--follow").rc == 3


# --- purge and retention ---------------------------------------------------------------------


def _finished_jobs(run, db):
    """Jobs in every final state, run by a burst worker; returns the statistics rows."""
    jobs = [{"id": i, "command": "true"} for i in ("old1", "old2", "new1")]
    jobs += [{"id": "olddead", "command": "exit 1", "max_retries": 0}, {"id": "oldcanc", "command": "true",
                                                                          "delay": 3600}]
    assert run("enqueue", "-", stdin=jsonl(jobs)).rc == 0
    assert run("cancel", "oldcanc").rc == 0
    r = run("worker", "start", "--burst")
    assert r.rc == 0, r.err
    assert [state_of(db, j) for j in ("old1", "old2", "new1", "olddead", "oldcanc")] == \
        ["completed", "completed", "completed", "dead", "cancelled"]
    # two days pass for the old ones
    db_exec(db, "UPDATE jobs SET updated_at = updated_at - 172800, finished_at = finished_at - 172800 "
                "WHERE id LIKE 'old%'")


def _statistics(db):
    """The per-minute statistics (with their run-time histogram) and the lifetime attempt totals,
    as the store reports them (PostgreSQL keeps recent ones as events until housekeeping folds them)."""
    store = queuectl.open_store(str(db))
    try:
        rows, hist = store.stats_by_queue(0, 2 ** 40)
        return sorted(rows, key=lambda r: (r["queue"], r["outcome"])), hist, store.attempt_totals()
    finally:
        store.close()


def test_purge_older_than_keeps_recent_jobs_and_statistics(run, db):
    _finished_jobs(run, db)
    stats = _statistics(db)
    assert sum(r["count"] for r in stats[0]) == 4  # four finished attempts counted
    r = run("purge", "--state", "completed", "--older-than", "1d")
    assert r.rc == 0 and r.out == "purged 2 job(s)\n"
    assert state_of(db, "old1") is None and state_of(db, "old2") is None
    assert db_rows(db, "SELECT count(*) FROM attempts WHERE job_id IN ('old1', 'old2')")[0][0] == 0
    assert state_of(db, "new1") == "completed" and state_of(db, "olddead") == "dead"
    r = run("purge", "--older-than", "3d")  # nothing is that old
    assert r.rc == 0 and r.out == "purged 0 job(s)\n"
    r = run("purge", "--older-than", "36h")  # every final state
    assert r.rc == 0 and r.out == "purged 2 job(s)\n"
    assert sorted(conftest.states(db)) == ["new1"]
    assert _statistics(db) == stats, "purging must not change the statistics"
    assert json.loads(run("status", "--json").out)["job_counts"]["completed"] == 1
    for args in (("purge", "--state", "processing", "--older-than", "1d"), ("purge", "--state", "completed"),
                 ("purge", "--older-than", "soon")):
        r = run(*args)
        assert r.rc == 2 and "error" in r.err, args
    assert state_of(db, "new1") == "completed"


def test_retention_setting_purges_old_jobs_automatically(run, db, workers):
    r = run("config", "set", "retention", "1d")
    assert r.rc == 0 and r.out == "retention = 1d\n"
    _finished_jobs(run, db)
    stats = _statistics(db)
    workers.start(1)  # a supervisor's housekeeping applies the retention
    wait_until(lambda: state_of(db, "old1") is None, 10, message="old completed jobs were not purged")
    wait_until(lambda: state_of(db, "oldcanc") is None, 10, message="old cancelled jobs were not purged")
    assert state_of(db, "old2") is None
    assert state_of(db, "new1") == "completed"  # too young
    assert state_of(db, "olddead") == "dead"  # the dead letter queue is kept for a human
    assert _statistics(db) == stats


# --- schedules -------------------------------------------------------------------------------


def schedule_row(db, name):
    rows = db_rows(db, "SELECT next_run, last_run, last_job, paused FROM schedules WHERE name = ?", (name,))
    return rows[0] if rows else None


def make_due(db, name, late=1.0):
    """The clock reaches the schedule's tick: its next run is now ``late`` seconds past."""
    db_exec(db, "UPDATE schedules SET next_run = ? WHERE name = ?", (time.time() - late, name))


def wait_advanced(db, name, timeout=10):
    wait_until(lambda: schedule_row(db, name)[0] > time.time(), timeout,
               message="schedule %s did not fire or advance" % name)


def jobs_of(db, name):
    return [r[0] for r in db_rows(db, "SELECT id FROM jobs WHERE schedule = ? ORDER BY seq", (name,))]


def test_schedule_add_is_validated_and_lists_the_next_run(run, db):
    bad = [
        (("nightly", "61 * * * *", "--", "true"), "minute"),
        (("nightly", "* * * *", "--", "true"), "5 fields"),
        (("nightly", "* * 0 * *", "--", "true"), "day of month"),
        (("nightly", "@reboot", "--", "true"), "alias"),
        (("nightly", "@daily", "--tz", "Mars/Olympus_Mons", "--", "true"), "time zone"),
        (("nightly", "@daily"), "command"),
        (("bad/name", "@daily", "--", "true"), "schedule name"),
        (("nightly", "@daily", "--webhook", "ftp://example.com/", "--", "true"), "webhook"),
        (("nightly", "@daily", "--missed", "twice", "--", "true"), "missed"),
    ]
    for args, words in bad:
        r = run("schedule", "add", *args)
        assert r.rc == 2, (args, r)
        assert words in r.err and r.err.count("queuectl: error:") == 1, (args, r.err)
    assert json.loads(run("schedule", "list", "--json").out) == []
    r = run("schedule", "add", "nightly", "0 3 * * *", "--tz", "Europe/Berlin", "-p", "high", "-q", "night",
            "--", "echo", "hi there")
    if program_python() < (3, 9):  # no zoneinfo: named zones are refused with the reason, UTC and local work
        assert r.rc == 2 and "needs Python 3.9 or newer" in r.err and r.err.count("\n") == 1, r
        r = run("schedule", "add", "nightly", "0 3 * * *", "--tz", "local", "--", "true")
        assert r.rc == 0 and "next run" in r.out, r
        return
    assert r.rc == 0 and "next run" in r.out, r
    import zoneinfo

    berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    today = datetime.datetime.now(berlin).date()
    expected = min(t for t in (datetime.datetime.combine(today + datetime.timedelta(days=d), datetime.time(3),
                                                          tzinfo=berlin).timestamp() for d in (0, 1, 2))
                   if t > time.time())
    (s,) = json.loads(run("schedule", "list", "--json").out)
    assert s["name"] == "nightly" and s["cron"] == "0 3 * * *" and s["tz"] == "Europe/Berlin"
    assert s["next_run"] == queuectl.rfc3339(expected) and s["paused"] is False
    assert s["spec"]["command"] == "echo 'hi there'" and s["spec"]["priority"] == "high"
    assert "nightly" in run("schedule", "list").out
    r = run("schedule", "add", "nightly", "@hourly", "--", "true")
    assert r.rc == 4 and "already exists" in r.err


def test_schedule_fires_exactly_one_job_per_tick_with_three_supervisors(run, db, workers):
    r = run("schedule", "add", "tick", "0 0 1 1 *", "-q", "sq", "-p", "high", "--overlap", "allow",
            "--", "echo fired")
    assert r.rc == 0, r.err
    for _ in range(3):
        workers.start(1)
    for round_ in range(1, 4):
        make_due(db, "tick")
        wait_advanced(db, "tick")
        assert len(jobs_of(db, "tick")) == round_, "a tick must enqueue exactly one job"
    next_run, last_run, last_job, _ = schedule_row(db, "tick")
    assert next_run == next_new_year_utc()
    ids = jobs_of(db, "tick")
    assert last_job == ids[-1] and len(set(ids)) == 3 and all(i.startswith("tick.") for i in ids)
    for job_id in ids:
        wait_state(db, job_id, "completed")
        job = json.loads(run("get", job_id, "--json").out)
        assert (job["queue"], job["priority"], job["command"], job["schedule"]) == ("sq", "high", "echo fired", "tick")
        assert run("logs", job_id).out == "fired\n"


def test_schedule_missed_tick_policy_once_and_skip(run, db, workers):
    assert run("schedule", "add", "catchup", "0 0 1 1 *", "--missed", "once", "--", "true").rc == 0
    assert run("schedule", "add", "skipper", "0 0 1 1 *", "--missed", "skip", "--", "true").rc == 0
    make_due(db, "catchup", late=3 * 3600)  # nothing ran for three hours
    make_due(db, "skipper", late=3 * 3600)
    workers.start(1)
    wait_advanced(db, "catchup")
    wait_advanced(db, "skipper")
    assert len(jobs_of(db, "catchup")) == 1
    assert jobs_of(db, "skipper") == [] and schedule_row(db, "skipper")[2] is None
    make_due(db, "skipper", late=5)  # a tick that is only a little late is not missed
    wait_advanced(db, "skipper")
    assert len(jobs_of(db, "skipper")) == 1
    for job_id in jobs_of(db, "catchup") + jobs_of(db, "skipper"):
        wait_state(db, job_id, "completed")


def test_schedule_overlap_policy_skip_and_allow(run, db, workers, tmp_path):
    busy = gate_wait(tmp_path / "gate")
    assert run("schedule", "add", "lone", "0 0 1 1 *", "--overlap", "skip", "--", busy).rc == 0
    assert run("schedule", "add", "many", "0 0 1 1 *", "--overlap", "allow", "--", busy).rc == 0
    workers.start(3)
    for name in ("lone", "many"):
        make_due(db, name)
    for name in ("lone", "many"):
        wait_advanced(db, name)
        (job_id,) = jobs_of(db, name)
        wait_state(db, job_id, "processing")
    for name in ("lone", "many"):
        make_due(db, name)  # the next tick, while the first runs are still running
    for name in ("lone", "many"):
        wait_advanced(db, name)
    assert len(jobs_of(db, "lone")) == 1, "overlap skip: no second run while the first is unfinished"
    assert len(jobs_of(db, "many")) == 2, "overlap allow: a second run"
    (tmp_path / "gate").touch()
    for job_id in jobs_of(db, "lone") + jobs_of(db, "many"):
        wait_state(db, job_id, "completed")
    make_due(db, "lone")  # the previous run is over: this tick runs
    wait_advanced(db, "lone")
    assert len(jobs_of(db, "lone")) == 2


def test_schedule_pause_resume_and_remove(run, db, workers):
    assert run("schedule", "add", "held", "0 0 1 1 *", "--", "true").rc == 0
    assert run("schedule", "add", "witness", "0 0 1 1 *", "--", "true").rc == 0
    r = run("schedule", "pause", "held")
    assert r.rc == 0 and "paused" in r.out
    listed = {s["name"]: s for s in json.loads(run("schedule", "list", "--json").out)}
    assert listed["held"]["paused"] is True and listed["witness"]["paused"] is False
    make_due(db, "held")
    make_due(db, "witness")
    paused_next = schedule_row(db, "held")[0]
    workers.start(1)
    wait_advanced(db, "witness")  # due schedules are fired together: `held` was looked at too
    assert jobs_of(db, "held") == [] and schedule_row(db, "held")[0] == paused_next
    r = run("schedule", "resume", "held")
    assert r.rc == 0 and "resumed" in r.out
    assert schedule_row(db, "held")[0] == next_new_year_utc()  # the paused tick is not made up for
    assert schedule_row(db, "held")[3] == 0
    make_due(db, "held")
    wait_advanced(db, "held")
    assert len(jobs_of(db, "held")) == 1
    job_id = jobs_of(db, "held")[0]
    r = run("schedule", "remove", "held")
    assert r.rc == 0 and "removed" in r.out
    assert [s["name"] for s in json.loads(run("schedule", "list", "--json").out)] == ["witness"]
    wait_state(db, job_id, "completed")  # its jobs stay
    for action in ("remove", "pause", "resume"):
        r = run("schedule", action, "held")
        assert r.rc == 3 and "held" in r.err, (action, r)


# --- webhooks --------------------------------------------------------------------------------


def test_webhooks_for_completed_dead_and_cancelled_jobs(run, db, workers, hook):
    assert run("config", "set", "webhook-url", hook.url + "/global").rc == 0
    per_job = hook.url + "/job"
    jobs = [{"id": "fine", "command": "echo ok", "webhook": per_job, "env": {"TOKEN": "secret"}},
            {"id": "broken", "command": "exit 5", "max_retries": 0, "webhook": per_job},
            {"id": "dropped", "command": "true", "delay": 3600, "webhook": per_job},
            {"id": "plain", "command": "true"}]
    assert run("enqueue", "-", stdin=jsonl(jobs)).rc == 0
    assert run("cancel", "dropped").rc == 0
    workers.start(1)
    wait_until(lambda: len(hook.to("/job")) == 3 and len(hook.to("/global")) == 4, 20,
               message="webhooks not delivered: %r" % [(r["path"], r["body"]["job"]["id"]) for r in hook.requests])
    events = {r["body"]["job"]["id"]: r for r in hook.to("/job")}
    expected = {"fine": ("job.completed", "completed", 0), "broken": ("job.dead", "dead", 5),
                "dropped": ("job.cancelled", "cancelled", None)}
    for job_id, (event, state, code) in expected.items():
        req = events[job_id]
        body = req["body"]
        assert body["event"] == event and body["job"]["state"] == state and body["job"]["exit_code"] == code
        assert body["sent_by"].startswith("queuectl")
        assert req["headers"]["Content-Type"] == "application/json"
        assert body["job"]["finished_at"] and "env" not in body["job"]
    assert "secret" not in json.dumps([r["body"] for r in hook.requests])
    assert events["dropped"]["body"]["job"]["last_error"] == "cancelled by a user"
    assert sorted(r["body"]["job"]["id"] for r in hook.to("/global")) == ["broken", "dropped", "fine", "plain"]
    wait_until(lambda: db_rows(db, "SELECT count(*) FROM webhooks WHERE delivered_at > 0")[0][0] == 7, 10)
    assert db_rows(db, "SELECT max(attempts) FROM webhooks")[0][0] == 1


def test_webhook_is_retried_after_a_server_error(run, db, workers, hook):
    assert run("enqueue", "--id", "j", "--webhook", hook.url + "/flaky", "--", "true").rc == 0
    workers.start(1)
    wait_until(lambda: len(hook.to("/flaky")) >= 2, 20, message="the webhook was not retried")
    first, second = hook.to("/flaky")[:2]
    assert first["body"] == second["body"] and second["body"]["job"]["id"] == "j"
    assert second["at"] - first["at"] >= 1.5, "retried with a backoff, not at once"
    wait_until(lambda: db_rows(db, "SELECT delivered_at FROM webhooks")[0][0], 10)
    ((attempts, error),) = db_rows(db, "SELECT attempts, last_error FROM webhooks")
    assert attempts == 2 and error is None
    assert len(hook.to("/flaky")) == 2


def test_hanging_webhook_delays_no_job(run, db, workers, hook):
    jobs = [{"id": "slowhook", "command": "true", "priority": "high", "webhook": hook.url + "/hang"}]
    jobs += [{"id": "quick%d" % i, "command": "true", "webhook": hook.url + "/ok"} for i in range(3)]
    assert run("enqueue", "-", stdin=jsonl(jobs)).rc == 0
    workers.start(1)
    wait_until(lambda: hook.hanging >= 1, 20, message="the webhook was never sent")

    def hang_in_flight():  # the sender has neither had an answer nor given up on this POST yet
        return db_rows(db, "SELECT attempts, delivered_at FROM webhooks WHERE url LIKE '%/hang'") == [(0, None)]

    assert hang_in_flight()
    # the jobs after the hooked one did not wait for its webhook (whose timeout is 5 s)
    ends = dict(db_rows(db, "SELECT id, finished_at FROM jobs WHERE state = 'completed'"))
    assert sorted(ends) == ["quick0", "quick1", "quick2", "slowhook"]
    assert max(ends.values()) - ends["slowhook"] < queuectl.WebhookSender.TIMEOUT / 2
    # and jobs keep completing while the POST hangs
    batch = [{"id": "later%d" % i, "command": "true", "webhook": hook.url + "/ok"} for i in range(5)]
    assert run("enqueue", "-", stdin=jsonl(batch)).rc == 0
    wait_until(lambda: n_jobs(db, "id LIKE 'later%' AND state = 'completed'") == 5, 20)
    assert hang_in_flight(), "the jobs completed only after the hanging webhook timed out"
    # the other jobs' webhooks all arrive (after the hanging one times out, at the latest)
    wait_until(lambda: len(hook.to("/ok")) == 8, 20, message="webhooks behind a hanging one were lost")


def test_stats_and_metrics_survive_purging(run, db, workers):
    run("config", "set", "backoff-base", "1")
    run("enqueue", "-", stdin="".join('{"id":"ok%d","command":"true"}\n' % i for i in range(4)))
    run("enqueue", '{"id":"bad","command":"exit 3","max_retries":1,"queue":"batch"}')
    workers.start(1)
    wait_until(lambda: states(db).get("bad") == "dead" and
               sum(1 for s in states(db).values() if s == "completed") == 4, 30)
    before = json.loads(run("stats", "--json").out)["queues"]
    assert before["default"]["completed"] == 4 and before["default"]["success_rate"] == 1.0
    assert before["batch"]["failed"] == 2 and before["batch"]["success_rate"] == 0.0
    assert before["default"]["p95_run"] > 0
    text = run("stats").out
    assert "batch" in text and "100.0%" in text
    metrics = run("metrics").out
    assert 'queuectl_attempts_total{queue="default",outcome="completed"} 4' in metrics
    assert run("clear", "--yes").rc == 0
    assert json.loads(run("stats", "--json").out)["queues"] == before
    assert 'queuectl_attempts_total{queue="default",outcome="completed"} 4' in run("metrics").out
    assert 'queuectl_jobs{state="completed"} 0' in run("metrics").out
