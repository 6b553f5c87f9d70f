"""The worker, in process: one claim-run-record cycle at a time, with time injected.

A ``Worker`` runs here on a real SQLite store in the test's directory, inside the test
process (no supervisor, no fork): ``step(now)`` claims and runs at most one job, as the
loop in ``run()`` does.  Jobs are short shell commands; every process a test starts
carries its marker (``process_mark``) and is killed by PID at teardown.  ``JobMonitor`` is
driven tick by tick with the time passed in.
"""

import os
import signal
import threading
import time

import pytest

import queuectl
from conftest import MARK_VAR, marked_processes, wait_until
from queuectl import DatabaseBusy, DatabaseGone
from test_store import spec

NOW = 1_700_000_000.0


@pytest.fixture
def db_path(db, process_mark):
    return str(db)


@pytest.fixture
def store(db_path):
    s = queuectl.SqliteStore(db_path)
    yield s
    s.close()


@pytest.fixture
def make_worker(db_path):
    made = []

    def make(**kw):
        w = queuectl.Worker(db_path, **kw)
        made.append(w)
        return w

    yield make
    for w in made:
        if w._sock:
            w._sock.close()
        for fd in (w._wake_r, w._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        w.store.close()


@pytest.fixture
def signals_restored():
    """Worker.run installs its signal handlers in this (the test) process: put pytest's back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    signal.set_wakeup_fd(-1)
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def enqueue(store, now=NOW, **fields):
    (job_id,) = store.enqueue([spec(now, **fields)], now)
    return job_id


def job(store, job_id):
    return store.get(job_id)


def settle(worker):
    """Record the last run's result now (a worker records it with its next claim)."""
    worker.record_result()


# --- one step: claim, run, record ----------------------------------------------------------------


def test_a_worker_starts_with_nothing_done(make_worker):
    w = make_worker()
    assert w.id.startswith("%s-%d-" % (queuectl.HOST, os.getpid())) and len(w.id.rsplit("-", 1)[1]) == 4
    assert (w.stop_level, w.jobs_done, w._unrecorded, w.queues, w.burst) == (0, 0, None, None, False)
    assert w.cfg == queuectl.DEFAULTS
    assert w.store._polling is True  # workers poll for locks (poll_for_locks)
    assert make_worker(queues=[]).queues is None  # an empty list serves every queue


def test_a_step_with_nothing_to_do(store, make_worker):
    w = make_worker()
    w.register()
    assert w.step(NOW) is False
    assert w.jobs_done == 0
    (rec,) = store.workers()
    assert (rec["state"], rec["job_id"], rec["heartbeat_at"]) == ("idle", None, NOW)


def test_a_step_runs_one_job_and_its_result_lands_with_the_next_claim(store, make_worker):
    first = enqueue(store, command="echo one", priority="high")
    second = enqueue(store, command="echo two")
    w = make_worker()
    w.register()
    assert w.step(NOW) is True
    assert w.jobs_done == 1
    assert job(store, first).state == "processing"  # ran; result not written yet
    assert w._unrecorded is not None
    assert w.step(NOW + 1) is True  # records the first, claims and runs the second
    a = job(store, first)
    assert (a.state, a.exit_code, a.worker_id) == ("completed", 0, None)
    assert store.attempt(first, 1).output == "one\n"
    assert store.attempt(first, 1).pid is not None
    assert job(store, second).state == "processing"
    assert w.step(NOW + 2) is False  # nothing left: the second is recorded on its own
    assert job(store, second).state == "completed"
    assert store.attempt(second, 1).output == "two\n"
    assert w.jobs_done == 2 and w._unrecorded is None


def test_a_failed_run_is_retried_after_the_backoff(store, make_worker):
    store.set_config("backoff-base", 3)
    job_id = enqueue(store, command="echo bad; exit 5", max_retries=2)
    w = make_worker()
    assert w.step(NOW) is True
    settle(w)
    j = job(store, job_id)
    assert (j.state, j.exit_code, j.last_error, j.attempts) == ("failed", 5, "exit code 5", 1)
    assert j.finished_at >= NOW and abs(j.run_at - (j.finished_at + 3)) < 1e-6
    assert store.attempt(job_id, 1).outcome == "failed"


def run_one(store, make_worker, **fields):
    """Enqueue one job, let a worker run it to its end; the job as it ends."""
    job_id = enqueue(store, **fields)
    w = make_worker()
    assert w.step(NOW)
    settle(w)
    return job(store, job_id)


def test_the_last_failed_run_sends_the_job_to_the_dead_letter_queue(store, make_worker):
    assert run_one(store, make_worker, command="exit 1", max_retries=0).state == "dead"


def test_a_timeout_is_a_failed_run_and_the_job_timeout_setting_applies(store, make_worker):
    store.set_config("kill-grace", 0.1)
    store.set_config("job-timeout", 0.3)
    job_id = enqueue(store, command="sleep 30", max_retries=0)
    w = make_worker()
    start = time.monotonic()
    assert w.step(NOW)
    assert time.monotonic() - start < 5
    settle(w)
    j = job(store, job_id)
    assert j.state == "dead" and j.last_error == (
        "timed out after 0.3s (job-timeout, for jobs without their own: lift it with -t 0 or config set "
        "job-timeout 0); process group killed")
    assert store.attempt(job_id, 1).outcome == "timeout"


def test_a_failed_run_under_the_global_timeout_keeps_its_own_error(store, make_worker):
    store.set_config("job-timeout", 300)
    assert run_one(store, make_worker, command="exit 3", max_retries=0).last_error == "exit code 3"


def test_a_jobs_own_timeout_is_not_blamed_on_the_global_one(store, make_worker):
    store.set_config("kill-grace", 0.1)
    error = run_one(store, make_worker, command="sleep 30", max_retries=0, timeout=0.3).last_error
    assert error.startswith("timed out after 0.3s") and "job-timeout" not in error


def test_a_command_that_cannot_start_is_an_error_run(store, make_worker, tmp_path):
    job_id = enqueue(store, command="true", cwd=str(tmp_path / "gone"), max_retries=0)
    w = make_worker()
    assert w.step(NOW)
    settle(w)
    assert (job(store, job_id).state, store.attempt(job_id, 1).outcome) == ("dead", "error")


def test_a_worker_serving_some_queues(store, make_worker):
    other = enqueue(store, command="true", queue="other", priority="high")
    mine = enqueue(store, command="true", queue="mine")
    w = make_worker(queues=["mine"])
    assert w.step(NOW)
    settle(w)
    assert (job(store, mine).state, job(store, other).state) == ("completed", "pending")
    assert w.step(NOW) is False


def test_config_is_read_before_every_claim(store, make_worker):
    w = make_worker()
    w.step(NOW)
    store.set_config("max-retries", 9)
    w.step(NOW + 1)
    assert w.cfg["max-retries"] == 9


# --- what happens while the job runs -----------------------------------------------------------


def test_a_cancelled_run_ends_cancelled(store, make_worker, tmp_path):
    gate = tmp_path / "running"
    job_id = enqueue(store, command="touch %s; sleep 30" % gate)
    w = make_worker()
    store.set_config("kill-grace", 0.1)

    def cancel_when_running():
        wait_until(gate.exists, 10)
        other = queuectl.SqliteStore(str(store.path))  # as `queuectl cancel` does, from another connection
        try:
            assert other.cancel(job_id, time.time()) == "requested"  # the busy worker looks every second
        finally:
            other.close()

    t = threading.Thread(target=cancel_when_running)
    t.start()
    start = time.monotonic()
    assert w.step(time.time())
    t.join(10)
    assert time.monotonic() - start < 5
    settle(w)
    j = job(store, job_id)
    assert (j.state, j.last_error) == ("cancelled", "cancelled by a user; process group killed")
    assert store.attempt(job_id, 1).outcome == "cancelled"
    wait_until(lambda: marked_processes(os.environ[MARK_VAR]) == [], 5)  # the sleep was killed


def test_a_cold_stop_puts_the_job_back_without_using_a_retry(store, make_worker, tmp_path):
    gate = tmp_path / "running"
    job_id = enqueue(store, command="touch %s; sleep 30" % gate, max_retries=0)
    store.set_config("kill-grace", 0.1)
    w = make_worker()

    def stop_when_running():
        wait_until(gate.exists, 10)
        w.stop_level = 2
        os.write(w._wake_w, b"!")

    t = threading.Thread(target=stop_when_running)
    t.start()
    assert w.step(time.time())
    t.join(10)
    j = job(store, job_id)
    assert (j.state, j.attempts, j.rescues, j.worker_id) == ("pending", 0, 1, None)
    assert store.attempt(job_id, 1).outcome == "stopped"
    assert w._unrecorded is None


def test_a_run_whose_lease_was_lost_is_discarded(store, make_worker, tmp_path):
    """Another worker rescued the job (the lease ran out): this run's result must not land."""
    gate = tmp_path / "running"
    job_id = enqueue(store, command="touch %s; sleep 30" % gate)
    store.set_config("kill-grace", 0.1)
    store.set_config("lease-seconds", 1.5)  # heartbeats every 0.5 s
    w = make_worker()

    def steal_when_running():
        wait_until(gate.exists, 10)
        s = queuectl.SqliteStore(str(store.path))
        try:
            assert s.rescue(time.time() + 60, "elsewhere", lambda pid, started: True, lambda *a: None) == [job_id]
            assert s.claim("thief", "elsewhere", time.time() + 60, 15.0).id == job_id
        finally:
            s.close()

    t = threading.Thread(target=steal_when_running)
    t.start()
    start = time.monotonic()
    assert w.step(time.time())
    t.join(10)
    assert time.monotonic() - start < 5
    assert w._unrecorded is None
    j = job(store, job_id)
    assert (j.state, j.worker_id, j.runs) == ("processing", "thief", 2)
    assert store.attempt(job_id, 1).outcome == "lost"


def test_a_graceful_stop_records_the_result_at_once(store, make_worker):
    job_id = enqueue(store, command="true")
    w = make_worker()
    w.stop_level = 1
    assert w.step(NOW)
    assert w._unrecorded is None
    assert job(store, job_id).state == "completed"


# --- housekeeping inside step ------------------------------------------------------------------


def test_a_step_rescues_the_jobs_of_dead_workers_every_housekeeping_interval(store, make_worker):
    job_id = enqueue(store, command="true")
    dead = {"id": "dead-worker", "host": queuectl.HOST, "pid": 2 ** 22 + 12345, "pid_started": 1.0,
            "supervisor_pid": None, "now": NOW, "wake": None}
    store.register_worker(dead)
    assert store.claim("dead-worker", queuectl.HOST, NOW, 15.0).id == job_id
    w = make_worker()
    w._rescued_at = NOW - 1  # rescued a second ago: not yet again
    assert w.step(NOW) is False
    assert job(store, job_id).state == "processing"
    w._rescued_at = NOW - queuectl.HOUSEKEEPING_INTERVAL - 0.5
    assert w.step(NOW) is True  # rescued, then claimed and run by this worker
    settle(w)
    j = job(store, job_id)
    assert (j.state, j.rescues, j.runs) == ("completed", 1, 2)
    assert "dead-worker" not in [r["id"] for r in store.workers()]


def test_housekeeping_comes_every_interval_not_more_often(store, make_worker, monkeypatch):
    rescues = []
    w = make_worker()
    real = w.store.rescue
    monkeypatch.setattr(w.store, "rescue", lambda now, *a: rescues.append(now) or real(now, *a))
    interval = queuectl.HOUSEKEEPING_INTERVAL
    for t in (0, 0.5, interval - 0.01, interval, interval + 0.5, 3 * interval):
        w.step(NOW + t)
    assert rescues == [NOW, NOW + interval, NOW + 3 * interval]


def test_the_start_of_a_run_is_logged_with_the_command_on_one_short_line(store, make_worker, caplog):
    enqueue(store, id="logged", command="echo " + "x" * 100 + " \\\n  tail")
    w = make_worker()
    with caplog.at_level("INFO", logger="queuectl"):
        assert w.step(NOW)
    (line,) = [r.getMessage() for r in caplog.records if "started" in r.getMessage()]
    shown = line.split("started: ", 1)[1]
    assert line.startswith("job logged run 1 started: echo xxx")
    assert len(shown) == 80 and shown.endswith("…") and "\n" not in shown


def test_a_step_beats_the_workers_heart_every_third_of_a_lease(store, make_worker):
    w = make_worker()
    w.register()
    store.set_config("lease-seconds", 30)
    beats = []
    real = w.store.heartbeat

    def heartbeat(worker_id, *a, **kw):
        beats.append(kw.get("now"))
        return real(worker_id, *a, **kw)

    w.store.heartbeat = heartbeat
    for t in (0, 5, 9.9, 10, 15, 20.5):
        w.step(NOW + t)
    assert beats == [NOW, NOW + 10, NOW + 20.5]
    store.set_config("lease-seconds", 1.5)
    del beats[:]
    for t in (30, 30.3, 30.5):
        w.step(NOW + t)
    assert beats == [NOW + 30, NOW + 30.5]


def test_a_busy_database_makes_a_step_a_quiet_one(store, make_worker, monkeypatch):
    enqueue(store, command="true")
    w = make_worker()

    def busy(**kw):
        raise DatabaseBusy("database is locked")

    monkeypatch.setattr(w.store, "claim", busy)
    assert w.step(NOW) is False
    monkeypatch.undo()
    assert w.step(NOW) is True


def test_a_deleted_database_stops_the_step(store, make_worker, db_path):
    w = make_worker()
    os.unlink(db_path)
    with pytest.raises(DatabaseGone):
        w.step(NOW)


def test_recording_a_result_retries_through_a_busy_database(store, make_worker, monkeypatch):
    job_id = enqueue(store, command="true")
    w = make_worker()
    assert w.step(NOW)
    real, calls = w.store.finish, []

    def finish(**kw):
        calls.append(1)
        if len(calls) < 3:
            raise DatabaseBusy("database is locked")
        return real(**kw)

    monkeypatch.setattr(w.store, "finish", finish)
    start = time.monotonic()
    assert w.record_result() is True
    assert time.monotonic() - start < 1.0  # tried again within milliseconds, not seconds
    assert len(calls) == 3 and job(store, job_id).state == "completed"
    assert w.record_result() is False  # nothing left to record


def test_recording_gives_up_when_the_lease_is_gone(store, make_worker, monkeypatch):
    enqueue(store, command="true")
    w = make_worker()
    assert w.step(NOW)
    w.cfg = dict(w.cfg, **{"lease-seconds": 0.2})

    def finish(**kw):
        raise DatabaseBusy("database is locked")

    monkeypatch.setattr(w.store, "finish", finish)
    start = time.monotonic()
    with pytest.raises(DatabaseBusy):
        w.record_result()
    assert 0.2 <= time.monotonic() - start < 3


# --- run(): the loop ---------------------------------------------------------------------------


def test_a_burst_worker_runs_everything_due_then_stops(store, make_worker, signals_restored):
    now = time.time()
    ids = [enqueue(store, now, command="echo %d" % n) for n in range(3)]
    later = enqueue(store, now, command="true", delay=3600)
    w = make_worker(burst=True)
    assert w.run() == 0
    assert [job(store, i).state for i in ids] == ["completed"] * 3
    assert job(store, later).state == "pending"
    assert store.workers() == []  # unregistered on the way out
    assert w.jobs_done == 3
    assert w._sock.fileno() == -1  # its wake-up socket closed


@pytest.mark.parametrize("other", [1, -1])
def test_a_worker_whose_supervisor_is_gone_stops(store, make_worker, signals_restored, other):
    """Its parent is not the supervisor that started it any more (that one died: it was
    re-parented)."""
    job_id = enqueue(store, time.time(), command="true")
    w = make_worker(supervisor_pid=os.getppid() + other)
    assert w.run() == 0
    assert job(store, job_id).state == "pending"  # never claimed
    assert store.workers() == []


def test_a_stop_signal_ends_the_loop_and_the_last_result_is_recorded(store, make_worker, signals_restored):
    first = enqueue(store, time.time(), command="true")
    w = make_worker()
    orig_step = w.step
    steps = []

    def step(now=None):
        steps.append(now)
        done = orig_step(now)
        os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag
        return done

    w.step = step
    assert w.run() == 0
    assert w.stop_level == 1 and len(steps) == 1
    assert job(store, first).state == "completed"
    assert store.workers() == []


def test_a_result_that_cannot_be_recorded_at_the_stop_is_left_for_a_rescue(store, make_worker, signals_restored,
                                                                           monkeypatch, caplog):
    """The database stays locked past the lease while the worker stops: it logs that and stops
    cleanly (the run stays processing, and a rescue runs it again)."""
    job_id = enqueue(store, time.time(), command="true")
    store.set_config("lease-seconds", 0.05)  # (below what `config set` allows: a quick give-up)
    w = make_worker()
    real_step = w.step

    def step(now=None):
        done = real_step(now)  # runs the job; its result waits for the next claim...
        w.stop_level = 1  # ...which never comes: a stop
        return done

    def busy(**kw):
        raise DatabaseBusy("database is locked")

    w.step = step
    monkeypatch.setattr(w.store, "finish", busy)
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="queuectl"):
        assert w.run() == 0
    assert time.monotonic() - start < 5
    assert job(store, job_id).state == "processing"
    assert store.workers() == []
    assert any("could not record the last result" in r.getMessage() for r in caplog.records)


def test_signals_set_stop_levels(make_worker):
    """(Python hands a handler the signal's number, a plain int.)"""
    w = make_worker()
    w._on_signal(int(signal.SIGTERM), None)
    assert w.stop_level == 1
    w._on_signal(int(signal.SIGINT), None)
    assert w.stop_level == 2
    w2 = make_worker()
    w2._on_signal(int(signal.SIGQUIT), None)  # a cold stop at once
    assert w2.stop_level == 2
    w3 = make_worker()
    w3._on_signal(int(signal.SIGINT), None)  # Ctrl-C: graceful first, like SIGTERM
    assert w3.stop_level == 1


def test_a_worker_under_its_own_supervisor_keeps_working(store, make_worker, signals_restored):
    job_id = enqueue(store, time.time(), command="true")
    w = make_worker(supervisor_pid=os.getppid(), burst=True)  # (the parent: as if it had forked us)
    assert w.run() == 0
    assert job(store, job_id).state == "completed"


def register_with_its_address_taken(w):
    """Another process holds the worker's wake address (a worker id reused) while it registers."""
    import socket

    taken = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        taken.bind("\0" + queuectl.wake_address(w.db_path, w.id))
        w.register()
    finally:
        taken.close()


def test_a_wake_address_in_use_means_no_wake_socket(store, make_worker):
    """Another process holds the address (a worker id reused): the worker polls instead."""
    w = make_worker()
    register_with_its_address_taken(w)
    (rec,) = store.workers()
    assert rec["wake"] is None and w._sock is None
    assert w.wake_fds() == [w._wake_r]


def test_register_records_the_worker_with_its_wake_address(store, make_worker):
    w = make_worker()
    w.register()
    (rec,) = store.workers()
    assert (rec["id"], rec["host"], rec["pid"], rec["state"]) == (w.id, queuectl.HOST, os.getpid(), "idle")
    assert abs(rec["pid_started"] - queuectl.process_started_at(os.getpid())) < 1e-6
    assert rec["wake"] == queuectl.wake_address(w.db_path, w.id)
    assert w._sock is not None and w._sock.fileno() in w.wake_fds()


@pytest.fixture
def listening_store(monkeypatch):
    """Make a worker's store one with notifications of its own (PostgreSQL's LISTEN connection),
    here a pipe: ``attach(worker)`` returns the pipe's read end, the fd the store would offer."""
    pipes = []

    def attach(w):
        r, wr = os.pipe()
        pipes.extend((r, wr))
        monkeypatch.setattr(w.store, "wait_fds", lambda: [r])
        monkeypatch.setattr(w.store, "consume_notifications", lambda: queuectl.drain_fd(r))
        return r

    yield attach
    for fd in pipes:
        os.close(fd)


def test_a_worker_on_its_own_waits_on_the_stores_notifications(store, make_worker, listening_store):
    w = make_worker()
    listened = listening_store(w)
    w.register()
    (rec,) = store.workers()
    assert rec["wake"] is None and w._sock is None  # nobody would send it a datagram
    assert listened in w.wake_fds()


def test_a_worker_under_a_supervisor_is_woken_by_datagram_and_does_not_listen_itself(store, make_worker,
                                                                                     listening_store):
    """One listening connection per machine: the supervisor's (PostgreSQL)."""
    w = make_worker(supervisor_pid=os.getppid())
    listened = listening_store(w)
    w.register()
    (rec,) = store.workers()
    assert rec["wake"] == queuectl.wake_address(w.db_path, w.id)
    assert listened not in w.wake_fds() and w._sock.fileno() in w.wake_fds()


def test_a_worker_under_a_supervisor_that_cannot_bind_its_socket_listens_itself(store, make_worker,
                                                                               listening_store):
    w = make_worker(supervisor_pid=os.getppid())
    listened = listening_store(w)
    register_with_its_address_taken(w)
    (rec,) = store.workers()
    assert rec["wake"] is None and listened in w.wake_fds()  # no datagram can reach it


def test_idle_wait_wakes_on_a_datagram_and_drains_it(store, make_worker):
    w = make_worker(poll_interval=5)
    w.register()
    queuectl.send_wakeups(store.wake_addresses(queuectl.HOST, 1))  # what a commit of the store sends
    start = time.monotonic()
    w.idle_wait()
    assert time.monotonic() - start < 2
    assert w.drain_wakeups() is False  # drained by the wait


def test_idle_wait_sleeps_the_poll_interval(make_worker):
    w = make_worker(poll_interval=0.3)
    start = time.monotonic()
    w.idle_wait()
    assert 0.25 <= time.monotonic() - start < 2
    w2 = make_worker()
    w2.cfg = dict(w2.cfg, **{"worker-poll-interval": 0.2})
    start = time.monotonic()
    w2.idle_wait()
    assert 0.15 <= time.monotonic() - start < 2


def test_drain_wakeups_reports_a_signal_wakeup(make_worker):
    w = make_worker()
    assert w.drain_wakeups() is False
    os.write(w._wake_w, b"x")
    assert w.drain_wakeups() is True
    assert w.drain_wakeups() is False


# --- JobMonitor, tick by tick --------------------------------------------------------------------


class FakeStore:
    pid_delay = 0.0

    def __init__(self):
        self.calls = []
        self.heartbeat_answer = True
        self.cancel = False
        self.fail_started = 0
        self.busy_heartbeats = 0

    def started(self, job_id, run, pid):
        self.calls.append(("started", job_id, run, pid))
        if self.fail_started:
            self.fail_started -= 1
            raise DatabaseBusy("locked")

    def cancel_requested(self, job_id, run):
        self.calls.append(("cancel_requested", job_id, run))
        return self.cancel

    def heartbeat(self, worker_id, job_id, run, now, lease, output):
        self.calls.append(("heartbeat", worker_id, job_id, run, now, lease, output))
        if self.busy_heartbeats:
            self.busy_heartbeats -= 1
            raise DatabaseBusy("locked")
        return self.heartbeat_answer

    def wait_fds(self):
        return []

    def consume_notifications(self):
        return False


class FakeWorker:
    def __init__(self):
        self.id = "w9"
        self.store = FakeStore()
        self.stop_level = 0
        self.woken = False

    def drain_wakeups(self):
        woken, self.woken = self.woken, False
        return woken

    def wake_fds(self):
        return [123]


def monitor(lease=15.0, at=NOW):
    worker = FakeWorker()
    job = queuectl.Job(id="j", command="true", state="processing", priority=2, max_retries=0, run_at=at,
                       created_at=at, updated_at=at, runs=3)
    real_time = time.time
    try:
        time.time = lambda: at
        m = queuectl.JobMonitor(worker, job, lease)
    finally:
        time.time = real_time
    return m, worker, worker.store


def names(store):
    return [c[0] for c in store.calls]


@pytest.mark.parametrize("lease, interval", [(15.0, 1.0), (3.0, 1.0), (1.5, 0.5), (0.09, 0.05), (0.3, 0.1)])
def test_the_monitor_ticks_at_a_third_of_the_lease_between_50_ms_and_a_second(lease, interval):
    m, _, _ = monitor(lease)
    assert abs(m.interval - interval) < 1e-9
    assert m.worker_id == "w9" and m.poll_fds() == [123]


def test_the_monitor_records_the_pid_and_retries_when_busy():
    m, _, store = monitor()
    store.fail_started = 1
    m.on_start(4242)
    assert (m.pid, m.recorded) == (4242, False)
    buf = queuectl.OutputBuffer(1024)
    assert m.tick(NOW + 0.1, buf) is None
    assert m.recorded is True
    assert [c for c in store.calls if c[0] == "started"] == [("started", "j", 3, 4242)] * 2
    m.tick(NOW + 0.2, buf)
    assert names(store).count("started") == 2  # once recorded, never again


def test_the_monitor_records_the_pid_after_the_stores_pid_delay(monkeypatch):
    m, _, store = monitor()
    store.pid_delay = 1.0  # (PostgreSQL: its claims are durable without it)
    monkeypatch.setattr(time, "time", lambda: NOW)
    m.on_start(4242)
    buf = queuectl.OutputBuffer(1024)
    assert m.tick(NOW + 0.99, buf) is None
    assert "started" not in names(store) and m.recorded is False
    m.tick(NOW + 1.0, buf)
    assert [c for c in store.calls if c[0] == "started"] == [("started", "j", 3, 4242)] and m.recorded is True


def test_the_monitor_renews_the_lease_every_third_of_it():
    m, _, store = monitor(lease=3.0)
    m.on_start(1)
    buf = queuectl.OutputBuffer(1024)
    for t in (0.5, 0.99):
        assert m.tick(NOW + t, buf) is None
    assert "heartbeat" not in names(store)
    assert m.tick(NOW + 1.0, buf) is None
    assert [c for c in store.calls if c[0] == "heartbeat"] == [("heartbeat", "w9", "j", 3, NOW + 1.0, 3.0, None)]
    m.tick(NOW + 1.9, buf)
    assert names(store).count("heartbeat") == 1
    m.tick(NOW + 2.0, buf)
    assert names(store).count("heartbeat") == 2


def test_the_first_heartbeat_comes_a_third_of_a_short_lease_after_the_start():
    m, _, store = monitor(lease=1.5)
    m.on_start(1)
    buf = queuectl.OutputBuffer(1024)
    assert m.tick(NOW + 0.4, buf) is None
    assert "heartbeat" not in names(store)
    m.tick(NOW + 0.5, buf)
    assert names(store).count("heartbeat") == 1
    m.tick(NOW + 0.9, buf)  # the next one a third of the lease later again
    assert names(store).count("heartbeat") == 1
    m.tick(NOW + 1.0, buf)
    assert names(store).count("heartbeat") == 2


def test_the_monitor_publishes_new_output_at_most_every_second():
    m, _, store = monitor(lease=15.0)
    m.on_start(1)
    buf = queuectl.OutputBuffer(1024)
    buf.write(b"hello\n")
    assert m.tick(NOW + 0.5, buf) is None
    assert "heartbeat" not in names(store)
    assert m.tick(NOW + 1.0, buf) is None
    beats = [c for c in store.calls if c[0] == "heartbeat"]
    assert beats == [("heartbeat", "w9", "j", 3, NOW + 1.0, 15.0, ("hello\n", 6))]
    assert buf.dirty is False and m.flushed_at == NOW + 1.0
    m.tick(NOW + 2.5, buf)  # nothing new: no flush, and the lease is not due
    assert names(store).count("heartbeat") == 1
    buf.write(b"more\n")
    m.tick(NOW + 2.6, buf)
    assert [c[6] for c in store.calls if c[0] == "heartbeat"][-1] == ("hello\nmore\n", 11)


def test_a_busy_heartbeat_keeps_the_output_for_the_next_tick():
    m, _, store = monitor(lease=15.0)
    m.on_start(1)
    buf = queuectl.OutputBuffer(1024)
    buf.write(b"x")
    store.busy_heartbeats = 1
    assert m.tick(NOW + 1.0, buf) is None
    assert buf.dirty is True
    assert m.next_beat == NOW + 5.0  # not renewed
    assert m.tick(NOW + 1.1, buf) is None  # (the next flush is a second after the last try)
    assert m.tick(NOW + 2.0, buf) is None
    assert [c[6] for c in store.calls if c[0] == "heartbeat"] == [("x", 1), ("x", 1)]
    assert m.next_beat == NOW + 2.0 + 5.0 and buf.dirty is False


def test_a_refused_heartbeat_means_the_lease_is_lost():
    m, _, store = monitor(lease=3.0)
    m.on_start(1)
    store.heartbeat_answer = False
    assert m.tick(NOW + 1.0, queuectl.OutputBuffer(1024)) == "lost"


def test_a_cold_stop_is_seen_at_the_next_tick():
    m, worker, _ = monitor()
    m.on_start(1)
    worker.stop_level = 1
    assert m.tick(NOW + 0.1, queuectl.OutputBuffer(1024)) is None
    worker.stop_level = 2
    assert m.tick(NOW + 0.2, queuectl.OutputBuffer(1024)) == "stopped"
    worker.stop_level = 3  # a third signal came before the tick
    assert m.tick(NOW + 0.3, queuectl.OutputBuffer(1024)) == "stopped"


def test_a_cancel_is_looked_for_every_second_or_when_woken():
    m, worker, store = monitor()
    m.on_start(1)
    store.cancel = True
    buf = queuectl.OutputBuffer(1024)
    assert m.tick(NOW + 0.5, buf) is None
    assert "cancel_requested" not in names(store)
    worker.woken = True
    assert m.tick(NOW + 0.6, buf) == "cancelled"
    assert [c for c in store.calls if c[0] == "cancel_requested"] == [("cancel_requested", "j", 3)]
    m2, _, store2 = monitor()
    m2.on_start(1)
    assert m2.tick(NOW + 0.99, buf) is None
    store2.cancel = True
    assert m2.tick(NOW + 1.0, buf) == "cancelled"
    assert m2.checked_at == NOW + 1.0


def test_a_cancel_check_that_finds_none_waits_a_second_again():
    m, _, store = monitor()
    m.on_start(1)
    buf = queuectl.OutputBuffer(1024)
    assert m.tick(NOW + 1.0, buf) is None
    assert m.tick(NOW + 1.5, buf) is None
    assert names(store).count("cancel_requested") == 1
    assert m.tick(NOW + 2.0, buf) is None
    assert names(store).count("cancel_requested") == 2
