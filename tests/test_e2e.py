"""End-to-end: the real program in separate processes, as a user runs it.

These run against queuectl.py, and again against dist/queuectl.pyz
(QUEUECTL_CMD) in `./build.sh test`.
"""

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import (Workers, db_rows, marked_processes, pid_exists, pids_of_database, program, program_env, state_of,
                      states, wait_state, wait_until)

pytestmark = pytest.mark.e2e


def all_in(db, wanted, n, timeout=60):
    def done():
        rows = db_rows(db, "SELECT count(*) FROM jobs WHERE state IN (%s)" % ",".join("?" * len(wanted)), tuple(wanted))
        return rows[0][0] >= n
    wait_until(done, timeout, message="jobs did not all reach %s" % (wanted,))


def attempts_of(db, job_id):
    return db_rows(db, "SELECT n, outcome, started_at, ended_at, pid, error FROM attempts WHERE job_id = ? ORDER BY n",
                   (job_id,))


def worker_pids(db):
    return [r[0] for r in db_rows(db, "SELECT pid FROM workers")]


def read_pid(path, timeout=10):
    wait_until(lambda: path.exists() and path.read_text().strip(), timeout, message="%s not written" % path)
    return int(path.read_text().split()[0])


# --- the seed README's Quick Start and manual scenarios -------------------------------


def test_quick_start_detached_workers(run, db, workers):
    r = run("enqueue", '{"id":"hello","command":"echo Hello, QueueCTL!"}')
    assert r.rc == 0 and r.out == "hello\n"
    r = run("worker", "start", "--count", "1")  # detached: this process exits at once
    assert r.rc == 0, r.err
    assert "started 1 worker" in r.out
    sup = [p for p in pids_of_database(db)]
    assert sup and all(pid_exists(p) for p in sup), "workers must outlive the command that started them"
    wait_state(db, "hello", "completed")
    r = run("status")
    assert r.rc == 0 and "completed   1" in r.out and str(db) in r.out
    r = run("logs", "hello")
    assert r.out == "Hello, QueueCTL!\n"
    r = run("worker", "status", "--json")
    assert len(json.loads(r.out)["workers"]) == 1
    r = run("worker", "stop")
    assert r.rc == 0 and "stopped 1 worker" in r.out
    wait_until(lambda: not any(pid_exists(p) for p in sup), 10)
    assert db_rows(db, "SELECT count(*) FROM workers")[0][0] == 0


def test_priority_order_high_medium_low(run, db, workers):
    for prio, jid in (("low", "low"), ("high", "high"), ("medium", "med")):
        assert run("enqueue", "-p", prio, '{"id":"%s","command":"echo %s"}' % (jid, jid)).rc == 0
    workers.start(1)
    all_in(db, ["completed"], 3)
    r = run("list", "--state", "completed")
    order = [line.split()[0] for line in r.lines[1:]]
    assert order == ["high", "med", "low"]
    started = [r[0] for r in db_rows(db, "SELECT job_id FROM attempts ORDER BY started_at")]
    assert started == ["high", "med", "low"]


def test_fifo_within_a_priority(run, db, workers):
    ids = ["j%02d" % i for i in range(10)]
    run("enqueue", "-", stdin="".join('{"id":"%s","command":"true"}\n' % i for i in ids))
    workers.start(1)
    all_in(db, ["completed"], 10)
    assert [r[0] for r in db_rows(db, "SELECT job_id FROM attempts ORDER BY started_at")] == ids


def test_global_and_per_job_timeouts(run, db, workers):
    assert run("config", "set", "job-timeout", "1").rc == 0
    run("enqueue", '{"id":"timeout1","command":"sleep 10"}')
    run("enqueue", '{"id":"timeout2","command":"sleep 20","timeout":0.5}')
    run("enqueue", '{"id":"quick","command":"sleep 0.1","timeout":5}')
    workers.start(2)
    wait_state(db, "timeout1", "failed")
    wait_state(db, "timeout2", "failed")
    wait_state(db, "quick", "completed")
    listed = run("list", "--state", "failed").out
    assert "timeout1" in listed and "timeout2" in listed
    (_, outcome, start1, end1, _, err1), = attempts_of(db, "timeout1")[:1]
    assert outcome == "timeout" and "timed out after 1s" in err1
    assert 0.9 < end1 - start1 < 4
    first2 = attempts_of(db, "timeout2")[0]
    assert first2[1] == "timeout" and 0.4 < first2[3] - first2[2] < 3.5


def test_timeout_kills_background_grandchildren(run, db, workers, tmp_path):
    cmd = "sleep 300 & echo $! > %s/gc.pid; sleep 300" % tmp_path
    run("enqueue", json.dumps({"id": "tree", "command": cmd, "timeout": 1, "max_retries": 0}))
    workers.start(1)
    grandchild = read_pid(tmp_path / "gc.pid")
    assert pid_exists(grandchild)
    wait_state(db, "tree", "dead")
    wait_until(lambda: not pid_exists(grandchild), 5, message="grandchild survived the timeout")
    job = json.loads(run("get", "tree", "--json").out)
    assert "timed out" in job["last_error"] and "process group killed" in job["last_error"]


def test_retry_backoff_timing_and_dlq(run, db, workers):
    run("config", "set", "backoff-base", "1.5")
    run("enqueue", '{"id":"dlq1","command":"exit 1","max_retries":2}')
    run("enqueue", '{"id":"dlq2","command":"exit 1","max_retries":2}')
    workers.start(1)
    wait_state(db, "dlq1", "dead", 30)
    wait_state(db, "dlq2", "dead", 30)
    for jid in ("dlq1", "dlq2"):
        rows = attempts_of(db, jid)
        assert [r[1] for r in rows] == ["failed", "failed", "failed"]  # max_retries + 1 runs
        gaps = [rows[i + 1][2] - rows[i][3] for i in range(2)]
        assert gaps[0] >= 1.5 - 0.05 and gaps[1] >= 2.25 - 0.05, gaps  # base ** n after the n-th failure
        assert gaps[0] < 1.5 + 1.5 and gaps[1] < 2.25 + 1.5, gaps
    dlq = run("dlq", "list").out
    assert "dlq1" in dlq and "dlq2" in dlq
    assert run("dlq", "retry", "dlq1", "--reset-attempts").rc == 0
    wait_until(lambda: len(attempts_of(db, "dlq1")) == 4, 10)  # ran again at once
    wait_state(db, "dlq1", ["failed", "dead"])
    assert json.loads(run("get", "dlq1", "--json").out)["attempts"] == 1  # a fresh budget
    r = run("dlq", "clear", "--yes")
    assert r.rc == 0 and "deleted 1" in r.out  # dlq2 only: dlq1 is back in the queue
    assert state_of(db, "dlq2") is None and state_of(db, "dlq1") is not None


def test_dlq_retry_without_reset_gives_one_more_run(run, db, workers):
    run("enqueue", '{"id":"once","command":"exit 7","max_retries":0}')
    workers.start(1)
    wait_state(db, "once", "dead")
    run("dlq", "retry", "once")
    wait_until(lambda: len(attempts_of(db, "once")) == 2, 10)
    wait_state(db, "once", "dead")
    assert len(attempts_of(db, "once")) == 2
    assert json.loads(run("get", "once", "--json").out)["exit_code"] == 7


# --- many workers, exactly once ------------------------------------------------------------


def test_500_jobs_4_workers_two_invocations_each_job_once(run, db, workers, tmp_path):
    ledger = tmp_path / "ledger"
    jobs = "".join(json.dumps({"id": "job%03d" % i, "command": "echo $QUEUECTL_JOB_ID >> %s" % ledger}) + "\n"
                   for i in range(500))
    r = run("enqueue", "-", stdin=jobs)
    assert r.rc == 0 and len(r.lines) == 500
    assert run("worker", "start", "-c", "2").rc == 0
    assert run("worker", "start", "--count", "2").rc == 0
    assert len(worker_pids(db)) == 4
    all_in(db, ["completed"], 500, timeout=120)
    lines = ledger.read_text().split()
    assert len(lines) == 500 and len(set(lines)) == 500
    by_worker = db_rows(db, "SELECT count(DISTINCT worker_id) FROM attempts")[0][0]
    assert by_worker >= 2, "several workers should have shared the work"
    assert db_rows(db, "SELECT count(*) FROM attempts")[0][0] == 500
    assert run("worker", "stop").rc == 0


# --- crashes and rescue ------------------------------------------------------------------------


def test_kill9_of_busy_worker_rescues_job_and_kills_its_tree(run, db, workers, tmp_path):
    cmd = "echo $$ > %s/run$QUEUECTL_ATTEMPT.pid; sleep 2; echo $QUEUECTL_ATTEMPT >> %s/ledger" % (tmp_path, tmp_path)
    run("enqueue", json.dumps({"id": "busy", "command": cmd}))
    sup = workers.start(1)
    first = read_pid(tmp_path / "run1.pid")
    wait_until(lambda: attempts_of(db, "busy")[0][4], 10)  # the worker recorded the job's pid
    (worker_pid,) = worker_pids(db)
    os.kill(worker_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_until(lambda: len(attempts_of(db, "busy")) >= 2, 10, message="job was not rescued within 10s")
    rescue_time = time.monotonic() - killed_at
    assert rescue_time < 10
    assert not pid_exists(first), "the lost run's process group must be killed"
    wait_state(db, "busy", "completed")
    rows = attempts_of(db, "busy")
    assert [r[1] for r in rows] == ["lost", "completed"]
    assert "died" in rows[0][5]
    assert (tmp_path / "ledger").read_text().split() == ["2"]
    job = json.loads(run("get", "busy", "--json").out)
    assert job["attempts"] == 1 and job["rescues"] == 1  # the lost run used no retry
    assert sup.poll() is None, "the supervisor keeps running and replaced the worker"
    assert len(worker_pids(db)) == 1 and worker_pids(db)[0] != worker_pid


def test_a_runs_pid_is_recorded_while_a_long_run_goes_and_with_a_short_runs_result(run, db, workers, tmp_path):
    """The pid rescue kills by: SQLite records it as the process starts (that write makes the claim
    durable); PostgreSQL a second into the run, or with the result of a shorter run."""
    run("enqueue", json.dumps({"id": "short", "priority": "high", "command": "echo $$ > %s/short.pid" % tmp_path}))
    run("enqueue", json.dumps({"id": "long", "command": "echo $$ > %s/long.pid; sleep 300" % tmp_path}))
    workers.start(1)
    long_pid = read_pid(tmp_path / "long.pid")
    wait_until(lambda: attempts_of(db, "long") and attempts_of(db, "long")[0][4] == long_pid, 10,
               message="the long run's pid was not recorded while it ran")
    assert attempts_of(db, "short")[0][4] == read_pid(tmp_path / "short.pid")
    assert run("cancel", "long").rc == 0
    wait_state(db, "long", "cancelled")


def test_kill9_of_whole_worker_tree_rescued_by_new_workers(run, db, workers, tmp_path):
    run("enqueue", json.dumps({"id": "orphan", "command": "echo $$ > %s/p$QUEUECTL_ATTEMPT; sleep 300" % tmp_path}))
    run("enqueue", '{"id":"after","command":"true"}')
    sup = workers.start(1)
    first = read_pid(tmp_path / "p1")
    (worker_pid,) = worker_pids(db)
    os.kill(sup.pid, signal.SIGKILL)
    os.kill(worker_pid, signal.SIGKILL)
    sup.wait(5)
    wait_until(lambda: not pid_exists(worker_pid), 5)
    assert state_of(db, "orphan") == "processing"
    started = time.monotonic()
    run("config", "set", "job-timeout", "1")
    workers.start(1)
    wait_until(lambda: len(attempts_of(db, "orphan")) >= 2, 10, message="not rescued within 10s")
    assert time.monotonic() - started < 10
    assert not pid_exists(first)
    wait_state(db, "after", "completed")
    assert attempts_of(db, "orphan")[0][1] == "lost"


def test_the_workers_fixture_leaves_no_process_behind_even_one_never_recorded(run, db, tmp_path, process_mark):
    """The fixture's teardown: a job's grandchild that left the job's process group and session
    (as a process whose pid the worker had not recorded yet is unknown to the database too)
    survives killing everything the database names; the test's marker finds it."""
    pidfile = tmp_path / "escaped"
    run("enqueue", json.dumps({"id": "escape", "command": "setsid sh -c 'echo $$ > %s; exec sleep 300' & sleep 300"
                               % pidfile}))
    by_database = Workers(db, tmp_path)  # the old teardown: recorded pids and groups only
    by_database.start(1)
    escaped = read_pid(pidfile)
    wait_until(lambda: db_rows(db, "SELECT pid FROM attempts WHERE job_id = 'escape'")[0][0], 10)
    by_database.kill_all()
    assert pid_exists(escaped) and escaped in marked_processes(process_mark)  # left behind
    Workers(db, tmp_path, mark=process_mark).kill_all()
    assert marked_processes(process_mark) == [] and not pid_exists(escaped)


def test_expired_lease_is_rescued_when_worker_is_frozen(run, db, workers, tmp_path):
    run("config", "set", "lease-seconds", "2")
    run("enqueue", json.dumps({"id": "frozen", "command": "echo $QUEUECTL_ATTEMPT >> %s/ledger; sleep 4" % tmp_path}))
    sup = workers.start(1)
    wait_state(db, "frozen", "processing")
    (stuck,) = worker_pids(db)
    os.kill(stuck, signal.SIGSTOP)  # alive but silent: only its lease can tell
    try:
        os.kill(sup.pid, signal.SIGSTOP)
        workers.start(1)
        wait_until(lambda: len(attempts_of(db, "frozen")) >= 2, 15, message="expired lease not rescued")
        assert attempts_of(db, "frozen")[0][1] == "lost"
        assert "lease" in attempts_of(db, "frozen")[0][5]
    finally:
        os.kill(stuck, signal.SIGCONT)
        os.kill(sup.pid, signal.SIGCONT)
    wait_state(db, "frozen", "completed", 20)
    # the frozen worker woke up, found its lease gone and did not overwrite the result
    assert [r[1] for r in attempts_of(db, "frozen")][-1] == "completed"
    assert db_rows(db, "SELECT count(*) FROM attempts WHERE job_id='frozen' AND outcome='completed'")[0][0] == 1


# --- stopping --------------------------------------------------------------------------------


def test_graceful_stop_finishes_current_job_and_does_not_forward_signals(run, db, workers, tmp_path):
    # the job runs until the test creates `go`, so the stop surely arrives while it runs
    cmd = "trap 'echo TERM >> %s/sig' TERM; while [ ! -f %s/go ]; do sleep 0.02; done; echo done" % (tmp_path, tmp_path)
    run("enqueue", json.dumps({"id": "current", "command": cmd}))
    run("enqueue", '{"id":"next","command":"true","priority":"low"}')
    workers.start(1)
    wait_state(db, "current", "processing")
    stopper = subprocess.Popen(program() + ["worker", "stop"], env=program_env(db), cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    workers.extra_pids.add(stopper.pid)
    wait_until(lambda: "graceful stop requested" in workers.log(), 20)
    (tmp_path / "go").touch()
    out, _ = stopper.communicate(timeout=60)
    assert stopper.returncode == 0 and b"stopped 1 worker" in out
    assert state_of(db, "current") == "completed"
    assert state_of(db, "next") == "pending", "a stopping worker claims nothing new"
    assert not (tmp_path / "sig").exists(), "the worker's SIGTERM must not reach the job"
    assert run("logs", "current").out == "done\n"
    assert worker_pids(db) == []


def test_forced_stop_kills_tree_and_requeues_without_using_a_retry(run, db, workers, tmp_path):
    run("enqueue", json.dumps({"id": "long", "command": "sleep 300 & echo $! > %s/gc; sleep 300" % tmp_path}))
    assert run("worker", "start").rc == 0
    grandchild = read_pid(tmp_path / "gc")
    t0 = time.monotonic()
    r = run("worker", "stop", "--force")
    assert r.rc == 0 and time.monotonic() - t0 < 10
    assert not pid_exists(grandchild)
    job = json.loads(run("get", "long", "--json").out)
    assert job["state"] == "pending" and job["attempts"] == 0
    assert job["attempt_history"][0]["outcome"] == "stopped"


def test_foreground_worker_exits_zero_on_sigterm(run, db, workers):
    proc = workers.start(2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert worker_pids(db) == []


def test_second_sigint_is_a_cold_stop(run, db, workers, tmp_path):
    run("enqueue", '{"id":"slow","command":"sleep 300"}')
    proc = workers.start(1)
    wait_state(db, "slow", "processing")
    proc.send_signal(signal.SIGINT)
    wait_until(lambda: "graceful stop requested" in workers.log(), 5)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(15) == 0
    assert state_of(db, "slow") == "pending"


# --- state survives restarts; configuration applies live --------------------------------------


def test_state_survives_full_restart(run, db, workers, tmp_path):
    run("enqueue", "-", stdin="".join('{"id":"r%d","command":"true"}\n' % i for i in range(5)))
    run("enqueue", '{"id":"bad","command":"exit 2","max_retries":0}')
    proc = workers.start(1)
    all_in(db, ["completed", "dead"], 6)
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    run("enqueue", '{"id":"later","command":"echo later"}')
    before = states(db)
    assert before["later"] == "pending" and before["bad"] == "dead"
    workers.start(1)
    wait_state(db, "later", "completed")
    after = states(db)
    assert {k: v for k, v in after.items() if k != "later"} == {k: v for k, v in before.items() if k != "later"}


def test_config_change_applies_to_running_workers(run, db, workers):
    workers.start(1)
    run("config", "set", "job-timeout", "0.5")
    run("enqueue", '{"id":"cfg","command":"sleep 5","max_retries":0}')
    wait_state(db, "cfg", "dead", 10)
    assert "timed out after 0.5s" in json.loads(run("get", "cfg", "--json").out)["last_error"]


def test_huge_binary_output_is_capped_and_job_succeeds(run, db, workers):
    run("config", "set", "output-limit", "65536")
    run("enqueue", '{"id":"noisy","command":"head -c 3000000 /dev/urandom; echo; echo THE-END"}')
    workers.start(1)
    wait_state(db, "noisy", "completed")
    r = run("logs", "noisy")
    out = r.out
    assert out.endswith("THE-END\n")
    assert "earlier bytes not kept" not in out  # the note goes to stderr: stdout is the job's own output
    assert "earlier bytes not kept (output-limit)" in r.err
    assert len(out.encode()) < 65536 * 4
    hist = json.loads(run("get", "noisy", "--json").out)["attempt_history"]
    assert hist[0]["output_bytes"] == 3000000 + 1 + 8


def test_command_that_cannot_start_is_a_failure(run, db, workers, tmp_path):
    run("enqueue", json.dumps({"id": "nocwd", "command": "true", "cwd": str(tmp_path / "missing"), "max_retries": 0}))
    run("enqueue", '{"id":"nocmd","command":"/no/such/program","max_retries":0}')
    workers.start(1)
    wait_state(db, "nocwd", "dead")
    wait_state(db, "nocmd", "dead")
    assert "does not exist" in json.loads(run("get", "nocwd", "--json").out)["last_error"]
    assert json.loads(run("get", "nocmd", "--json").out)["exit_code"] == 127


def test_enqueue_uses_callers_cwd_and_env(run, db, workers, tmp_path):
    sub = tmp_path / "here"
    sub.mkdir()
    r = run("enqueue", "-e", "GREETING=hi there", "--", "pwd; echo $GREETING", cwd=str(sub))
    jid = r.out.strip()
    workers.start(1)
    wait_state(db, jid, "completed")
    assert run("logs", jid).out == "%s\nhi there\n" % sub
