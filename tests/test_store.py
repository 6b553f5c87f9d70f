"""The Store contract, and the SQLite specifics of SqliteStore.

``StoreContract`` is backend-agnostic: its tests talk to the ``store`` fixture
only through the Store interface and pass time explicitly (``NOW + 10`` stands
for ten seconds later; nothing sleeps).  A backend reuses it by subclassing
and providing three fixtures:

- ``store``: a fresh, empty store;
- ``open_store``: a callable returning another, independent connection to the
  same database (closed by the fixture);
- ``raw_counts``: a callable returning ``{state: n}`` counted straight from the
  backend's job table (not from the store's maintained counters).
"""

import datetime
import inspect
import json
import os
import re
import socket
import sqlite3
import threading
import time

import pytest

import queuectl
from conftest import db_rows, sqlite_at_version
from queuectl import Conflict, DatabaseError, JobState, NotFound

NOW = 1_700_000_000.0
LEASE = 15.0
HOST = "host-a"
OTHER_HOST = "host-b"


#: The schedule tests' clock: the ticks of */5 around it are 12:00, 12:05 and 12:10.
TICK_NOW = datetime.datetime(2031, 5, 14, 12, 0, 30, tzinfo=datetime.timezone.utc).timestamp()


def tick(hour, minute=0, second=0, day=14, tz=datetime.timezone.utc):
    """A time on 2031-05-(day) (in ``tz``), in epoch seconds."""
    return datetime.datetime(2031, 5, day, hour, minute, second, tzinfo=tz).timestamp()


def spec(now=NOW, **fields):
    """A validated job dict, as the CLI would hand it to the store."""
    doc = {"command": "true"}
    doc.update(fields)
    return queuectl.validate_job(doc, queuectl.DEFAULTS, now, cwd="/")


def worker_record(worker_id, host=HOST, pid=4000, now=NOW, wake=None, pid_started=123.0):
    return {"id": worker_id, "host": host, "pid": pid, "pid_started": pid_started, "supervisor_pid": None,
            "now": now, "wake": wake}


class Recorder:
    """A stand-in for ``alive``/``kill``: records its calls, answers from a function."""

    def __init__(self, answer=None):
        self.calls = []
        self.answer = answer

    def __call__(self, *args):
        self.calls.append(args)
        return self.answer(*args) if self.answer else None


def always_alive(pid, started_at):
    return True


def snapshot(store, job_id):
    job = store.get(job_id)
    return job.to_dict(), [a.to_dict(with_output=True) for a in store.attempts(job_id, with_output=True)]


class StoreContract:
    # --- helpers -------------------------------------------------------------------

    def enqueue_one(self, store, now=NOW, **fields):
        (job_id,) = store.enqueue([spec(now, **fields)], now)
        return job_id

    def claim(self, store, worker="w1", now=NOW, host=HOST, lease=LEASE):
        return store.claim(worker, host, now, lease)

    def claim_id(self, store, worker="w1", now=NOW, host=HOST):
        job = self.claim(store, worker, now, host)
        return job.id if job else None

    def fail(self, store, job, now):
        """Record a failed run the way a worker does, deciding with the model's policy."""
        state, retry_at = queuectl.after_failure(job, store.config(), now)
        assert store.finish(job.id, job.runs, job.worker_id, state, now, "failed", 1, "exit code 1",
                            retry_at=retry_at)
        return state, retry_at

    def runs_until_dead(self, store, job_id, now):
        """Claim and fail the job until it is dead; returns (number of runs, time)."""
        runs = 0
        while True:
            job = self.claim(store, now=now)
            assert job is not None and job.id == job_id, "job %s not claimable at %r" % (job_id, now)
            runs += 1
            state, retry_at = self.fail(store, job, now + 1)
            if state is JobState.DEAD:
                return runs, now + 1
            assert runs < 50
            assert self.claim(store, now=retry_at - 0.001) is None, "claimed before its retry time"
            now = retry_at

    def assert_counts(self, store, raw_counts, expected=None):
        truth = {s: 0 for s in queuectl.STATES}
        truth.update(raw_counts())
        assert store.counts() == truth
        if expected is not None:
            assert truth == dict({s: 0 for s in queuectl.STATES}, **expected)

    # --- enqueue ---------------------------------------------------------------------

    def test_data_survives_reopening(self, store, open_store):
        store.enqueue([spec(id="j", command="echo durable")], NOW)
        store.close()
        assert open_store().get("j").command == "echo durable"

    def test_enqueue_returns_ids_in_order(self, store):
        ids = store.enqueue([spec(id="a", command="echo a"), spec(command="echo gen"), spec(id="c")], NOW)
        assert ids[0] == "a" and ids[2] == "c"
        assert queuectl.ID_RE.match(ids[1]) and ids[1] not in ("a", "c")
        got = store.get(ids[1])
        assert (got.command, got.state, got.attempts, got.runs, got.created_at) == ("echo gen", "pending", 0, 0, NOW)

    def test_enqueue_keeps_every_field(self, store):
        job_id = self.enqueue_one(store, id="full", command="make -C /srv report", priority="high", timeout=30,
                                  max_retries=7, delay=60, cwd="/srv", env={"A": "1", "B": "two words"})
        job = store.get(job_id)
        assert (job.command, job.priority, job.timeout, job.max_retries, job.run_at, job.cwd, job.env) == (
            "make -C /srv report", 1, 30.0, 7, NOW + 60, "/srv", {"A": "1", "B": "two words"})

    def test_generated_ids_are_unique(self, store):
        ids = store.enqueue([spec() for _ in range(500)], NOW)
        assert len(ids) == 500 and len(set(ids)) == 500
        assert all(queuectl.ID_RE.match(i) for i in ids)

    def test_duplicate_id_refuses_the_whole_batch(self, store, raw_counts):
        self.enqueue_one(store, id="a")
        with pytest.raises(Conflict) as info:
            store.enqueue([spec(id="b"), spec(), spec(id="a"), spec(id="c")], NOW + 1)
        assert str(info.value) == 'a job with id "a" already exists'
        assert store.get("b") is None and store.get("c") is None
        assert [j.id for j in store.list_jobs()] == ["a"]
        self.assert_counts(store, raw_counts, {"pending": 1})

    def test_duplicate_id_inside_one_batch_inserts_nothing(self, store, raw_counts):
        with pytest.raises(Conflict):
            store.enqueue([spec(id="x", command="first"), spec(id="x", command="second")], NOW)
        assert store.get("x") is None
        self.assert_counts(store, raw_counts, {})

    # --- claim -----------------------------------------------------------------------

    def test_claim_order_is_high_medium_low(self, store):
        for job_id, prio in [("low1", "low"), ("high1", "high"), ("med1", "medium"), ("high2", "high"),
                             ("low2", "low"), ("med2", "medium")]:
            self.enqueue_one(store, id=job_id, priority=prio)
        order = [self.claim_id(store, now=NOW + 1) for _ in range(6)]
        assert order == ["high1", "high2", "med1", "med2", "low1", "low2"]
        assert self.claim(store, now=NOW + 1) is None

    def test_claim_is_fifo_by_run_at_then_enqueue_order(self, store):
        self.enqueue_one(store, id="later", delay=5)  # enqueued first, due later
        self.enqueue_one(store, id="zeta")  # ids in reverse alphabetical order: order is not by id
        self.enqueue_one(store, id="alpha")
        self.enqueue_one(store, NOW - 3, id="oldest")  # due earliest, enqueued last
        order = [self.claim_id(store, now=NOW + 10) for _ in range(4)]
        assert order == ["oldest", "zeta", "alpha", "later"]

    def test_priority_beats_an_earlier_run_at(self, store):
        self.enqueue_one(store, NOW - 100, id="old-low", priority="low")
        self.enqueue_one(store, id="new-high", priority="high")
        assert self.claim_id(store, now=NOW + 1) == "new-high"

    def test_future_job_is_not_claimed_until_due(self, store):
        self.enqueue_one(store, id="later", delay=10)
        assert self.claim(store, now=NOW) is None
        assert self.claim(store, now=NOW + 9.99) is None
        assert store.get("later").state == "pending"
        assert self.claim_id(store, now=NOW + 10) == "later"

    def test_claim_marks_processing_counts_the_attempt_and_opens_its_record(self, store):
        self.enqueue_one(store, id="j")
        job = store.claim("w1", HOST, NOW + 1, 20.0)
        assert (job.id, job.state, job.worker_id, job.lease_until, job.attempts, job.runs, job.started_at) == (
            "j", "processing", "w1", NOW + 21, 1, 1, NOW + 1)
        stored = store.get("j")
        assert (stored.state, stored.worker_id, stored.lease_until, stored.attempts, stored.runs) == (
            "processing", "w1", NOW + 21, 1, 1)
        (attempt,) = store.attempts("j")
        assert (attempt.n, attempt.worker_id, attempt.host, attempt.started_at, attempt.ended_at, attempt.outcome) == (
            1, "w1", HOST, NOW + 1, None, None)
        assert store.attempt("j").n == 1

    def test_claim_on_empty_store_returns_none(self, store):
        assert self.claim(store) is None

    def test_two_claims_never_return_the_same_job(self, store):
        self.enqueue_one(store, id="a")
        self.enqueue_one(store, id="b")
        first, second = self.claim(store, "w1"), self.claim(store, "w2")
        assert {first.id, second.id} == {"a", "b"}
        assert store.get(first.id).worker_id == "w1" and store.get(second.id).worker_id == "w2"
        assert self.claim(store, "w3") is None

    def test_concurrent_claims_from_separate_connections_never_share_a_job(self, store, open_store):
        ids = store.enqueue([spec() for _ in range(200)], NOW)
        claimed, errors = [], []

        def work(n):
            try:
                s = open_store()
                while True:
                    job = s.claim("w%d" % n, HOST, NOW + 1, LEASE)
                    if job is None:
                        return
                    claimed.append((n, job.id))
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        got = [job_id for _, job_id in claimed]
        assert len(got) == len(set(got)) == 200
        assert set(got) == set(ids)
        for n, job_id in claimed:
            assert store.get(job_id).worker_id == "w%d" % n

    # --- heartbeat --------------------------------------------------------------------

    def test_heartbeat_renews_the_lease(self, store):
        self.enqueue_one(store, id="j")
        self.claim(store, now=NOW)
        assert store.heartbeat("w1", "j", 1, NOW + 10, LEASE) is True
        assert store.get("j").lease_until == NOW + 25
        # the old lease (NOW + 15) has passed, the renewed one has not
        assert store.rescue(NOW + 20, HOST, always_alive, Recorder()) == []
        assert store.get("j").state == "processing"

    def test_heartbeat_stores_output_so_far(self, store):
        self.enqueue_one(store, id="j")
        self.claim(store)
        assert store.heartbeat("w1", "j", 1, NOW + 1, LEASE, output=("partial\n", 8))
        attempt = store.attempt("j", 1)
        assert (attempt.output, attempt.output_bytes) == ("partial\n", 8)

    @pytest.mark.parametrize("worker, run", [("w2", 1), ("w1", 2), ("w1", 0)])
    def test_heartbeat_refused_for_a_non_owner_or_an_old_run(self, store, worker, run):
        self.enqueue_one(store, id="j")
        self.claim(store)
        assert store.heartbeat(worker, "j", run, NOW + 10, LEASE, output=("other", 5)) is False
        assert store.get("j").lease_until == NOW + LEASE
        assert store.attempt("j", 1).output == ""

    def test_heartbeat_for_a_finished_job_is_refused(self, store):
        self.enqueue_one(store, id="j")
        self.claim(store)
        assert store.finish("j", 1, "w1", "completed", NOW + 1, "completed", 0)
        assert store.heartbeat("w1", "j", 1, NOW + 2, LEASE) is False

    # --- finish -----------------------------------------------------------------------

    def test_finish_completed(self, store):
        self.enqueue_one(store, id="j")
        self.claim(store)
        assert store.finish("j", 1, "w1", "completed", NOW + 5, "completed", exit_code=0,
                            output="hello\n", output_bytes=6) is True
        job = store.get("j")
        assert (job.state, job.exit_code, job.finished_at, job.worker_id, job.lease_until, job.attempts) == (
            "completed", 0, NOW + 5, None, None, 1)
        attempt = store.attempt("j", 1)
        assert (attempt.ended_at, attempt.outcome, attempt.exit_code, attempt.output, attempt.output_bytes) == (
            NOW + 5, "completed", 0, "hello\n", 6)
        assert attempt.duration == 5
        assert self.claim(store, now=NOW + 1000) is None

    def test_finish_failed_schedules_the_retry(self, store):
        self.enqueue_one(store, id="j")
        self.claim(store)
        assert store.finish("j", 1, "w1", "failed", NOW + 5, "failed", exit_code=3, error="exit code 3",
                            retry_at=NOW + 7)
        job = store.get("j")
        assert (job.state, job.run_at, job.exit_code, job.last_error, job.worker_id) == (
            "failed", NOW + 7, 3, "exit code 3", None)
        assert store.attempt("j", 1).outcome == "failed"
        assert self.claim(store, now=NOW + 6.9) is None
        again = self.claim(store, "w2", now=NOW + 7)
        assert (again.id, again.runs, again.attempts, again.worker_id) == ("j", 2, 2, "w2")
        assert [a.n for a in store.attempts("j")] == [1, 2]

    def test_finish_dead(self, store):
        self.enqueue_one(store, id="j")
        self.claim(store)
        assert store.finish("j", 1, "w1", "dead", NOW + 5, "timeout", error="timed out after 1s")
        job = store.get("j")
        assert (job.state, job.last_error, job.worker_id, job.finished_at) == ("dead", "timed out after 1s", None, NOW + 5)
        assert [j.id for j in store.list_jobs("dead")] == ["j"]
        assert self.claim(store, now=NOW + 10 ** 6) is None

    @pytest.mark.parametrize("worker, run", [("w2", 1), ("w1", 2), ("w1", 0)])
    def test_finish_is_fenced(self, store, worker, run):
        self.enqueue_one(store, id="j")
        self.claim(store)
        before = snapshot(store, "j")
        assert store.finish("j", run, worker, "completed", NOW + 5, "completed", 0, output="x", output_bytes=1) is False
        assert snapshot(store, "j") == before

    def test_finishing_twice_is_refused(self, store):
        self.enqueue_one(store, id="j")
        self.claim(store)
        assert store.finish("j", 1, "w1", "failed", NOW + 1, "failed", 1, retry_at=NOW + 3)
        before = snapshot(store, "j")
        assert store.finish("j", 1, "w1", "completed", NOW + 2, "completed", 0) is False
        assert snapshot(store, "j") == before

    def test_finish_of_an_unknown_job_is_refused(self, store):
        assert store.finish("nope", 1, "w1", "completed", NOW, "completed", 0) is False

    # --- finish_and_claim: a worker closes its last run and takes its next job ---------

    @staticmethod
    def finished(job_id, run=1, worker="w1", state="completed", now=NOW + 5, **kw):
        return dict(dict(job_id=job_id, run=run, worker_id=worker, state=state, now=now, outcome="completed",
                         exit_code=0), **kw)

    @staticmethod
    def claim_args(worker="w1", now=NOW + 5):
        return {"worker_id": worker, "host": HOST, "now": now, "lease": LEASE}

    def test_finish_and_claim_records_the_result_then_claims(self, store):
        store.register_worker(worker_record("w1"))
        self.enqueue_one(store, id="a")
        self.enqueue_one(store, id="b", priority="low")
        self.claim(store)
        ok, job = store.finish_and_claim(self.finished("a", output="done\n", output_bytes=5), self.claim_args())
        assert ok is True and job.id == "b" and job.runs == 1
        a = store.get("a")
        assert (a.state, a.finished_at, a.worker_id) == ("completed", NOW + 5, None)
        assert store.attempt("a", 1).output == "done\n"
        assert store.get("b").state == "processing"
        (worker,) = store.workers()
        assert (worker["state"], worker["job_id"]) == ("busy", "b")  # on its next job, not on none

    def test_finish_and_claim_with_nothing_left_marks_the_worker_idle(self, store):
        store.register_worker(worker_record("w1"))
        self.enqueue_one(store, id="a")
        self.claim(store)
        assert store.finish_and_claim(self.finished("a"), self.claim_args()) == (True, None)
        assert store.get("a").state == "completed"
        attempt = store.attempt("a", 1)
        assert (attempt.output, attempt.output_bytes) == ("", 0)  # a result without output
        (worker,) = store.workers()
        assert (worker["state"], worker["job_id"]) == ("idle", None)

    def test_finish_and_claim_releases_a_dependent_for_the_same_claim(self, store):
        self.enqueue_one(store, id="a")
        self.enqueue_one(store, id="b", after=["a"])
        self.enqueue_one(store, id="c", priority="low")
        self.claim(store)
        ok, job = store.finish_and_claim(self.finished("a"), self.claim_args())
        assert ok and job.id == "b"

    def test_finish_and_claim_is_fenced_and_still_claims(self, store):
        self.enqueue_one(store, id="a")
        self.enqueue_one(store, id="b", priority="low")
        self.claim(store)
        before = snapshot(store, "a")
        ok, job = store.finish_and_claim(self.finished("a", worker="w2"), self.claim_args("w2"))
        assert ok is False and job.id == "b" and job.worker_id == "w2"
        assert snapshot(store, "a") == before

    def test_a_queue_slot_freed_by_the_result_goes_to_the_same_claim(self, store):
        store.set_queue("deploy", max_running=1)
        self.enqueue_one(store, id="d1", queue="deploy", priority="high")
        self.enqueue_one(store, id="d2", queue="deploy", priority="high")
        self.enqueue_one(store, id="low", priority="low")
        assert self.claim_id(store) == "d1"
        ok, job = store.finish_and_claim(self.finished("d1"), self.claim_args())
        assert ok and job.id == "d2"  # not "low": d1's slot is free by the time the claim looks

    def test_finish_and_claim_keeps_counts_statistics_and_totals(self, store, raw_counts):
        minute = int(NOW // 60)
        self.enqueue_one(store, NOW - 0.5, id="a", queue="q", priority="high")
        self.enqueue_one(store, NOW, id="b", queue="q")
        self.enqueue_one(store, NOW, id="c", queue="r", priority="low")
        assert self.claim_id(store, now=NOW) == "a"  # waited 0.5 s
        ok, b = store.finish_and_claim(self.finished("a", now=NOW + 5), self.claim_args(now=NOW + 10))
        assert ok and b.id == "b"  # a ran 5 s; b waited 10 s
        self.assert_counts(store, raw_counts, {"completed": 1, "processing": 1, "pending": 1})
        ok, c = store.finish_and_claim(
            self.finished("b", now=NOW + 10.5, state="failed", outcome="failed", exit_code=1, retry_at=NOW + 1000),
            self.claim_args(now=NOW + 20))
        assert ok and c.id == "c" and store.get("b").run_at == NOW + 1000
        self.assert_counts(store, raw_counts, {"completed": 1, "failed": 1, "processing": 1})
        assert store.finish_and_claim(self.finished("c", now=NOW + 23, state="dead", outcome="failed", exit_code=1),
                                      self.claim_args(now=NOW + 23)) == (True, None)
        self.assert_counts(store, raw_counts, {"completed": 1, "failed": 1, "dead": 1})
        rows, hist = store.stats_by_queue(minute, minute)
        got = {(r["queue"], r["outcome"]): (r["count"], r["run_sum"], r["wait_sum"]) for r in rows}
        assert got == {("q", "completed"): (1, 5.0, 0.5), ("q", "failed"): (1, 0.5, 10.0), ("r", "failed"): (1, 3.0, 20.0)}
        assert hist == {"q": {queuectl.run_time_bucket(5.0): 1, queuectl.run_time_bucket(0.5): 1},
                        "r": {queuectl.run_time_bucket(3.0): 1}}
        totals = {(t["queue"], t["outcome"]): (t["count"], t["duration_sum"]) for t in store.attempt_totals()}
        assert totals == {("q", "completed"): (1, 5.0), ("q", "failed"): (1, 0.5), ("r", "failed"): (1, 3.0)}
        assert store.counts() == store.counts()  # (reading folds: the same answer after)
        assert store.stats_by_queue(minute, minute) == (rows, hist)

    def test_a_result_records_the_runs_pid_unless_one_is_recorded(self, store):
        store.enqueue([spec(id=i) for i in "abc"], NOW)
        a = self.claim(store)
        assert store.finish("a", a.runs, "w1", "completed", NOW + 1, "completed", 0, pid=4241)
        b = self.claim(store)
        store.started("b", b.runs, 4242)
        ok, c = store.finish_and_claim(self.finished("b", pid=9999), self.claim_args())
        assert ok and c.id == "c"
        assert store.finish_and_claim(self.finished("c"), self.claim_args()) == (True, None)
        assert [store.attempt(j, 1).pid for j in "abc"] == [4241, 4242, None]

    def test_finish_and_claim_releases_a_dependent_enqueued_while_it_ran(self, store):
        self.enqueue_one(store, id="a")
        self.claim(store)
        self.enqueue_one(store, id="b", after=["a"])
        assert store.get("b").state == "waiting"
        ok, job = store.finish_and_claim(self.finished("a"), self.claim_args())
        assert ok and job.id == "b"

    def test_finish_and_claim_cancels_a_dependent_when_the_run_ends_dead(self, store):
        self.enqueue_one(store, id="a", max_retries=0)
        self.claim(store)
        self.enqueue_one(store, id="b", after=["a"])
        assert store.finish_and_claim(self.finished("a", state="dead", outcome="failed", exit_code=1),
                                      self.claim_args()) == (True, None)
        assert store.get("b").state == "cancelled"

    @pytest.mark.parametrize("own", [True, False])
    def test_finish_and_claim_queues_the_webhook_of_the_job_or_of_the_setting(self, store, own):
        if not own:
            store.set_config("webhook-url", "http://hooks.test/all")
        self.enqueue_one(store, id="a", webhook="http://hooks.test/a" if own else None)
        self.enqueue_one(store, id="b")
        self.claim(store)
        ok, job = store.finish_and_claim(self.finished("a"), self.claim_args())
        assert ok and job.id == "b"
        url = "http://hooks.test/a" if own else "http://hooks.test/all"
        assert {k: v[0] for k, v in self.outbox(store).items()} == {(url, "a"): "job.completed"}

    def test_finish_and_claim_takes_nothing_from_a_paused_queue(self, store):
        self.enqueue_one(store, id="a")
        self.enqueue_one(store, id="p", queue="held")
        store.set_queue("held", paused=True)
        self.claim(store)
        assert store.finish_and_claim(self.finished("a"), self.claim_args()) == (True, None)
        assert store.get("p").state == "pending"

    # --- release ------------------------------------------------------------------------

    def test_release_puts_the_job_back_without_using_a_retry(self, store):
        self.enqueue_one(store, id="j", max_retries=0)
        self.claim(store)
        assert store.release("j", 1, "w1", NOW + 3, "stopped by a forced worker stop") is True
        job = store.get("j")
        assert (job.state, job.attempts, job.rescues, job.worker_id, job.lease_until) == ("pending", 0, 1, None, None)
        attempt = store.attempt("j", 1)
        assert (attempt.outcome, attempt.ended_at) == ("stopped", NOW + 3)
        again = self.claim(store, now=NOW + 3)
        assert (again.id, again.attempts, again.runs) == ("j", 1, 2)
        # max_retries 0: the released run did not count, so this failure is the first and the last
        state, _ = self.fail(store, again, NOW + 4)
        assert state is JobState.DEAD

    @pytest.mark.parametrize("worker, run", [("w2", 1), ("w1", 2)])
    def test_release_by_a_non_owner_is_refused(self, store, worker, run):
        self.enqueue_one(store, id="j")
        self.claim(store)
        before = snapshot(store, "j")
        assert store.release("j", run, worker, NOW + 3, "stop") is False
        assert snapshot(store, "j") == before

    # --- rescue ----------------------------------------------------------------------------

    def test_rescue_of_an_expired_lease(self, store):
        self.enqueue_one(store, id="j")
        self.claim(store, now=NOW)
        kill = Recorder()
        assert store.rescue(NOW + 14, HOST, always_alive, kill) == []
        assert store.get("j").state == "processing"
        assert store.rescue(NOW + 16, HOST, always_alive, kill) == ["j"]
        job = store.get("j")
        assert (job.state, job.attempts, job.rescues, job.worker_id, job.lease_until) == ("pending", 0, 1, None, None)
        attempt = store.attempt("j", 1)
        assert (attempt.outcome, attempt.ended_at) == ("lost", NOW + 16)
        again = self.claim(store, "w2", now=NOW + 16)
        assert (again.id, again.attempts, again.runs) == ("j", 1, 2)

    def test_rescue_kills_the_process_group_of_a_lost_local_run(self, store):
        self.enqueue_one(store, id="j")
        self.claim(store, now=NOW)
        store.started("j", 1, 4242)
        kill = Recorder()
        assert store.rescue(NOW + 16, HOST, always_alive, kill) == ["j"]
        assert kill.calls == [(4242, NOW)]
        assert store.attempts("j")[0].pid == 4242

    def test_rescue_does_not_kill_runs_on_another_host(self, store):
        self.enqueue_one(store, id="j")
        self.claim(store, now=NOW, host=OTHER_HOST)
        store.started("j", 1, 4242)
        kill = Recorder()
        assert store.rescue(NOW + 16, HOST, always_alive, kill) == ["j"]
        assert kill.calls == []

    def test_job_of_a_dead_local_worker_is_rescued_at_once(self, store):
        store.register_worker(worker_record("w1", pid=111, pid_started=55.0))
        store.register_worker(worker_record("w2", pid=222))
        self.enqueue_one(store, id="j")
        self.enqueue_one(store, id="k")
        self.claim(store, "w1", now=NOW)
        self.claim(store, "w2", now=NOW)
        store.started("j", 1, 4242)
        alive = Recorder(lambda pid, started: pid != 111)
        kill = Recorder()
        # the lease is valid until NOW + 15, but the worker is gone
        assert store.rescue(NOW + 1, HOST, alive, kill) == ["j"]
        assert (111, 55.0) in alive.calls
        assert kill.calls == [(4242, NOW)]
        job = store.get("j")
        assert (job.state, job.attempts, job.rescues) == ("pending", 0, 1)
        assert store.attempt("j", 1).outcome == "lost"
        assert store.get("k").state == "processing"
        assert [w["id"] for w in store.workers()] == ["w2"]

    def test_a_dead_workers_jobs_are_all_rescued_even_one_whose_lease_also_expired(self, store):
        store.register_worker(worker_record("w1", pid=111))
        self.enqueue_one(store, id="j")
        self.enqueue_one(store, id="k")
        store.claim("w1", HOST, NOW, 1.0)  # j: a short lease, expired by the rescue
        store.claim("w1", HOST, NOW, 1000.0)  # k: a long one
        dead = Recorder(lambda pid, started: False)
        assert sorted(store.rescue(NOW + 5, HOST, dead, Recorder())) == ["j", "k"]
        assert (store.get("j").rescues, store.get("k").rescues) == (1, 1)  # once each
        assert [a.outcome for a in store.attempts("j")] == ["lost"]

    def test_workers_on_other_hosts_are_judged_by_heartbeat_not_pid(self, store):
        store.register_worker(worker_record("remote", host=OTHER_HOST, pid=111))
        self.enqueue_one(store, id="j")
        self.claim(store, "remote", now=NOW, host=OTHER_HOST)
        never_alive = Recorder(lambda pid, started: False)
        assert store.rescue(NOW + 1, HOST, never_alive, Recorder()) == []
        assert store.get("j").state == "processing"
        assert [w["id"] for w in store.workers()] == ["remote"]

    def test_rescue_with_nothing_to_rescue(self, store):
        kill = Recorder()
        assert store.rescue(NOW, HOST, always_alive, kill) == []
        self.enqueue_one(store, id="p")
        self.enqueue_one(store, id="r")
        store.register_worker(worker_record("w1"))
        self.claim(store, "w1", now=NOW)
        assert store.rescue(NOW + 5, HOST, always_alive, kill) == []
        assert store.get("p").state == "processing" or store.get("r").state == "processing"
        assert [w["id"] for w in store.workers()] == ["w1"]
        assert kill.calls == []

    @pytest.mark.parametrize("max_rescues", [0, 1, 3])
    def test_a_job_lost_more_than_max_rescues_times_goes_dead(self, store, max_rescues):
        store.set_config("max-rescues", max_rescues)
        self.enqueue_one(store, id="j")
        now, losses = NOW, 0
        while True:
            assert self.claim_id(store, now=now) == "j"
            now += LEASE + 1
            assert store.rescue(now, HOST, always_alive, Recorder()) == ["j"]
            losses += 1
            job = store.get("j")
            if job.state == "dead":
                break
            assert job.state == "pending" and losses <= max_rescues
        assert losses == max_rescues + 1
        assert (job.rescues, job.attempts) == (max_rescues + 1, 0)
        assert [j.id for j in store.list_jobs("dead")] == ["j"]
        assert self.claim(store, now=now + 1000) is None

    def test_late_finish_of_a_rescued_run_is_refused(self, store):
        self.enqueue_one(store, id="j")
        self.claim(store, "w1", now=NOW)
        assert store.rescue(NOW + 16, HOST, always_alive, Recorder()) == ["j"]
        # nobody has it: the old owner still cannot finish, renew or release
        assert store.finish("j", 1, "w1", "completed", NOW + 17, "completed", 0) is False
        assert store.heartbeat("w1", "j", 1, NOW + 17, LEASE) is False
        assert store.release("j", 1, "w1", NOW + 17, "stop") is False
        assert store.get("j").state == "pending"
        # and once w1 itself claims it again, run 1 is still not run 2
        again = self.claim(store, "w1", now=NOW + 18)
        assert again.runs == 2
        assert store.finish("j", 1, "w1", "completed", NOW + 19, "completed", 0) is False
        assert store.get("j").state == "processing"
        assert store.finish("j", 2, "w1", "completed", NOW + 20, "completed", 0) is True
        assert [a.outcome for a in store.attempts("j")] == ["lost", "completed"]

    # --- dead letter queue ---------------------------------------------------------------

    def test_retry_dead_gives_exactly_one_more_run(self, store):
        self.enqueue_one(store, id="j", max_retries=2)
        runs, now = self.runs_until_dead(store, "j", NOW)
        assert runs == 3
        assert store.retry_dead("j", now + 100) is True
        job = store.get("j")
        assert (job.state, job.run_at, job.finished_at) == ("pending", now + 100, None)
        assert self.claim(store, now=now + 99) is None
        runs, now = self.runs_until_dead(store, "j", now + 100)
        assert runs == 1
        assert [a.n for a in store.attempts("j")] == [1, 2, 3, 4]

    def test_retry_dead_with_reset_gives_the_full_budget(self, store):
        self.enqueue_one(store, id="j", max_retries=2)
        _, now = self.runs_until_dead(store, "j", NOW)
        assert store.retry_dead("j", now + 100, reset_attempts=True) is True
        assert store.get("j").attempts == 0
        runs, _ = self.runs_until_dead(store, "j", now + 100)
        assert runs == 3

    def test_retry_dead_of_a_job_lost_to_rescues_gives_exactly_one_more_run(self, store):
        """Its lost runs did not use its retries, yet a plain retry still means one run, not the whole budget."""
        store.set_config("max-rescues", 0)
        self.enqueue_one(store, id="j", max_retries=2)
        self.claim(store, now=NOW)
        assert store.rescue(NOW + 16, HOST, always_alive, Recorder()) == ["j"]
        assert store.get("j").state == "dead"
        assert store.retry_dead("j", NOW + 20) is True
        runs, _ = self.runs_until_dead(store, "j", NOW + 20)
        assert runs == 1

    def test_retry_dead_after_too_many_rescues_with_reset(self, store):
        store.set_config("max-rescues", 0)
        self.enqueue_one(store, id="j")
        self.claim(store, now=NOW)
        assert store.rescue(NOW + 16, HOST, always_alive, Recorder()) == ["j"]
        assert store.get("j").state == "dead"
        assert store.retry_dead("j", NOW + 20, reset_attempts=True)
        job = store.get("j")
        assert (job.state, job.rescues, job.attempts) == ("pending", 0, 0)
        assert self.claim_id(store, now=NOW + 20) == "j"

    @pytest.mark.parametrize("state", ["pending", "processing", "completed", "failed"])
    def test_retry_dead_of_a_job_that_is_not_dead_is_a_conflict(self, store, state):
        self.enqueue_one(store, id="j")
        if state != "pending":
            job = self.claim(store)
            if state == "completed":
                store.finish("j", 1, "w1", "completed", NOW + 1, "completed", 0)
            elif state == "failed":
                store.finish("j", 1, "w1", "failed", NOW + 1, "failed", 1, retry_at=NOW + 3)
            assert job.id == "j"
        assert store.get("j").state == state
        before = snapshot(store, "j")
        with pytest.raises(Conflict) as info:
            store.retry_dead("j", NOW + 10)
        assert state in str(info.value)
        assert snapshot(store, "j") == before

    def test_retry_dead_of_an_unknown_job_is_not_found(self, store):
        with pytest.raises(NotFound):
            store.retry_dead("nope", NOW)

    # --- restart (pueue's restart: a finished job queued again, its history kept) ------------

    @pytest.mark.parametrize("end", ["completed", "dead", "cancelled"])
    def test_restart_queues_a_finished_job_again_with_its_whole_budget(self, store, end):
        self.enqueue_one(store, id="j", max_retries=1)
        if end == "completed":
            self.run(store, "j")
            now = NOW + 10
        elif end == "dead":
            _, now = self.runs_until_dead(store, "j", NOW)
        else:
            self.claim(store)
            assert store.cancel("j", NOW + 1) == "requested"  # running: its flag set, then it ends cancelled
            assert store.finish("j", 1, "w1", "cancelled", NOW + 2, "cancelled", -15, "cancelled")
            now = NOW + 10
        before = len(store.attempts("j"))
        assert store.restart("j", now + 5) is True
        job = store.get("j")
        assert (job.state, job.attempts, job.run_at, job.finished_at) == ("pending", 0, now + 5, None)
        assert job.cancel_requested == 0  # (or its next run would be killed at once)
        assert self.claim(store, now=now + 4.9) is None
        again = self.claim(store, now=now + 5)
        assert again.id == "j" and again.runs == before + 1
        assert store.cancel_requested("j", again.runs) is False
        assert [a.n for a in store.attempts("j")] == list(range(1, before + 2))  # the history is kept
        self.fail(store, again, now + 6)
        assert store.get("j").state == "failed"  # a retry is left: the budget was renewed

    @pytest.mark.parametrize("state", ["pending", "processing", "failed", "waiting"])
    def test_restart_of_an_unfinished_job_is_a_conflict(self, store, state):
        self.enqueue_one(store, id="a")
        self.enqueue_one(store, id="j", after=["a"] if state == "waiting" else None)
        if state in ("processing", "failed"):
            self.claim(store)  # takes a (enqueued first)
            job = self.claim(store)
            assert job.id == "j"
            if state == "failed":
                store.finish("j", 1, "w1", "failed", NOW + 1, "failed", 1, retry_at=NOW + 30)
        assert store.get("j").state == state
        before = snapshot(store, "j")
        with pytest.raises(Conflict) as info:
            store.restart("j", NOW + 10)
        assert "is %s" % state in str(info.value)
        assert snapshot(store, "j") == before
        with pytest.raises(NotFound):
            store.restart("nope", NOW)

    def test_restart_keeps_unique_keys_unique(self, store):
        self.enqueue_one(store, id="old", unique_key="k")
        self.run(store, "old")
        self.enqueue_one(store, id="new", unique_key="k", now=NOW + 20)
        with pytest.raises(Conflict):
            store.restart("old", NOW + 30)
        assert store.get("old").state == "completed"

    # --- delete --------------------------------------------------------------------------

    def make_one_of_each(self, store):
        """Jobs p1, p2 pending; r processing; c completed; f failed; d dead."""
        for job_id in ["r", "c", "f", "d", "p1", "p2"]:
            self.enqueue_one(store, id=job_id, priority="high" if job_id in "rcfd" else "low")
        for job_id, state in [("r", None), ("c", "completed"), ("f", "failed"), ("d", "dead")]:
            assert self.claim_id(store, now=NOW + 1) == job_id
            if state:
                store.finish(job_id, 1, "w1", state, NOW + 2, state, 1, retry_at=NOW + 100 if state == "failed" else None)
        return {"p1": "pending", "p2": "pending", "r": "processing", "c": "completed", "f": "failed", "d": "dead"}

    def states(self, store):
        return {j.id: j.state for j in store.list_jobs(limit=1000)}

    def test_delete_jobs_by_state(self, store, raw_counts):
        expected = self.make_one_of_each(store)
        assert self.states(store) == expected
        assert store.delete_jobs("completed") == 1
        assert store.get("c") is None and store.attempts("c") == []
        assert store.delete_jobs("pending") == 2
        assert store.delete_jobs("pending") == 0
        assert self.states(store) == {"r": "processing", "f": "failed", "d": "dead"}
        self.assert_counts(store, raw_counts, {"processing": 1, "failed": 1, "dead": 1})

    def test_delete_all_keeps_running_jobs(self, store, raw_counts):
        self.make_one_of_each(store)
        assert store.delete_jobs() == 5
        assert self.states(store) == {"r": "processing"}
        assert [a.n for a in store.attempts("r")] == [1]
        for gone in ["c", "f", "d"]:
            assert store.attempts(gone) == []
        self.assert_counts(store, raw_counts, {"processing": 1})

    def test_delete_all_takes_waiting_and_cancelled_jobs_too(self, store, raw_counts):
        self.enqueue_one(store, id="dep")
        assert self.claim_id(store) == "dep"  # running: kept, so its dependent is deleted as waiting
        self.enqueue_one(store, id="w", after=["dep"])
        self.enqueue_one(store, id="c")
        store.cancel("c", NOW)
        assert store.delete_jobs() == 2
        assert self.states(store) == {"dep": "processing"}
        self.assert_counts(store, raw_counts, {"processing": 1})

    def test_deleting_a_completed_job_leaves_the_jobs_that_ran_after_it_alone(self, store):
        self.enqueue_one(store, id="dep")
        self.run(store, "dep")
        self.enqueue_one(store, NOW + 2, id="next", after=["dep"])  # its dependency is met: pending
        assert store.get("next").state == "pending"
        assert store.delete_jobs("completed") == 1
        assert self.states(store) == {"next": "pending"}

    def test_delete_of_processing_jobs_is_refused(self, store):
        expected = self.make_one_of_each(store)
        with pytest.raises(Conflict):
            store.delete_jobs("processing")
        assert self.states(store) == expected

    # --- counts ---------------------------------------------------------------------------

    def test_counts_follow_every_transition(self, store, raw_counts):
        check = lambda **expected: self.assert_counts(store, raw_counts, expected)  # noqa: E731
        check()
        store.enqueue([spec(id=i, priority="high" if i < "d" else "low") for i in "abcdef"], NOW)
        check(pending=6)
        a = self.claim(store, now=NOW + 1)
        check(pending=5, processing=1)
        store.finish(a.id, a.runs, "w1", "completed", NOW + 2, "completed", 0)
        check(pending=5, completed=1)
        b = self.claim(store, now=NOW + 2)
        store.finish(b.id, b.runs, "w1", "failed", NOW + 3, "failed", 1, retry_at=NOW + 5)
        check(pending=4, completed=1, failed=1)
        c = self.claim(store, now=NOW + 3)
        store.finish(c.id, c.runs, "w1", "dead", NOW + 4, "failed", 1)
        check(pending=3, completed=1, failed=1, dead=1)
        b2 = self.claim(store, now=NOW + 5)
        assert b2.id == b.id
        check(pending=3, completed=1, processing=1, dead=1)
        store.release(b2.id, b2.runs, "w1", NOW + 6, "stop")
        check(pending=4, completed=1, dead=1)
        d = self.claim(store, now=NOW + 6)
        store.rescue(NOW + 100, HOST, always_alive, Recorder())
        assert store.get(d.id).state == "pending"
        check(pending=4, completed=1, dead=1)
        store.retry_dead(c.id, NOW + 101)
        check(pending=5, completed=1)
        self.claim(store, now=NOW + 102)
        with pytest.raises(Conflict):
            store.delete_jobs("processing")
        check(pending=4, completed=1, processing=1)
        store.delete_jobs("completed")
        check(pending=4, processing=1)
        store.delete_jobs()
        check(processing=1)

    # --- configuration ----------------------------------------------------------------------

    def test_config_defaults_overlay_and_set(self, store):
        assert store.config() == queuectl.DEFAULTS
        store.set_config("max-retries", 5)
        store.set_config("backoff-base", 3.5)
        cfg = store.config()
        assert cfg == dict(queuectl.DEFAULTS, **{"max-retries": 5, "backoff-base": 3.5})
        assert type(cfg["max-retries"]) is int
        store.set_config("max-retries", 0)
        assert store.config()["max-retries"] == 0
        assert queuectl.DEFAULTS["max-retries"] == 3  # the defaults themselves are untouched

    def test_config_is_shared_between_connections(self, store, open_store):
        store.set_config("job-timeout", 600.0)
        assert open_store().config()["job-timeout"] == 600.0

    # --- workers -----------------------------------------------------------------------------

    def test_register_unregister_and_list_workers(self, store):
        assert store.workers() == []
        store.register_worker(worker_record("w2", pid=12, now=NOW + 1))
        store.register_worker(worker_record("w1", pid=11, now=NOW))
        workers = store.workers()
        assert [(w["id"], w["pid"], w["host"], w["state"], w["job_id"]) for w in workers] == [
            ("w1", 11, HOST, "idle", None), ("w2", 12, HOST, "idle", None)]
        store.register_worker(worker_record("w1", pid=99, now=NOW + 2))  # replaces, no duplicate
        assert sorted((w["id"], w["pid"]) for w in store.workers()) == [("w1", 99), ("w2", 12)]
        store.unregister_worker("w1")
        assert [w["id"] for w in store.workers()] == ["w2"]
        store.unregister_worker("never-registered")
        assert [w["id"] for w in store.workers()] == ["w2"]

    def test_a_claiming_worker_is_recorded_busy_with_its_job(self, store):
        store.register_worker(worker_record("w1"))
        self.enqueue_one(store, id="j")
        self.claim(store, "w1", now=NOW + 1)
        (w,) = store.workers()
        assert (w["state"], w["job_id"], w["heartbeat_at"]) == ("busy", "j", NOW + 1)
        assert self.claim(store, "w1", now=NOW + 2) is None
        (w,) = store.workers()
        assert (w["state"], w["job_id"]) == ("idle", None)

    def test_wake_addresses_are_of_idle_local_workers_only(self, store):
        store.register_worker(worker_record("idle1", wake="addr-idle1"))
        store.register_worker(worker_record("idle2", wake="addr-idle2"))
        store.register_worker(worker_record("busy", wake="addr-busy"))
        store.register_worker(worker_record("remote", host=OTHER_HOST, wake="addr-remote"))
        store.register_worker(worker_record("nowake", wake=None))
        self.enqueue_one(store, id="j")
        assert self.claim_id(store, "busy", now=NOW + 1) == "j"
        assert sorted(store.wake_addresses(HOST, 10)) == ["addr-idle1", "addr-idle2"]
        one = store.wake_addresses(HOST, 1)
        assert len(one) == 1 and one[0] in ("addr-idle1", "addr-idle2")
        assert store.wake_addresses(OTHER_HOST, 10) == ["addr-remote"]
        assert store.wake_addresses("host-c", 10) == []
        assert sorted(store.wake_addresses(HOST, None)) == ["addr-idle1", "addr-idle2"]  # None: no limit

    def test_wake_addresses_of_one_supervisors_workers_idle_or_all(self, store):
        """What a supervisor relaying the store's notifications wakes: its idle workers, or all of them."""
        for worker_id, sup in (("idle", 100), ("busy", 100), ("other", 200)):
            store.register_worker(dict(worker_record(worker_id, wake="addr-" + worker_id), supervisor_pid=sup))
        self.enqueue_one(store, id="j")
        assert self.claim_id(store, "busy", now=NOW + 1) == "j"
        assert store.wake_addresses(HOST, None, supervisor_pid=100) == ["addr-idle"]
        assert sorted(store.wake_addresses(HOST, None, supervisor_pid=100, idle=False)) == ["addr-busy", "addr-idle"]
        assert store.wake_addresses(HOST, None, supervisor_pid=200, idle=False) == ["addr-other"]
        assert store.wake_addresses(OTHER_HOST, None, supervisor_pid=100, idle=False) == []

    # --- reading ---------------------------------------------------------------------------------

    def test_list_jobs_most_recently_updated_last(self, store):
        self.enqueue_one(store, NOW, id="a")
        self.enqueue_one(store, NOW + 1, id="b")
        self.enqueue_one(store, NOW + 2, id="c")
        self.enqueue_one(store, NOW + 3, id="d")
        assert [j.id for j in store.list_jobs()] == ["a", "b", "c", "d"]
        assert self.claim_id(store, now=NOW + 10) == "a"  # a is updated last now
        assert [j.id for j in store.list_jobs()] == ["b", "c", "d", "a"]
        assert [j.id for j in store.list_jobs(limit=2)] == ["d", "a"]  # the limit keeps the newest
        assert [j.id for j in store.list_jobs(limit=1)] == ["a"]
        assert [j.id for j in store.list_jobs(state="pending")] == ["b", "c", "d"]
        assert [j.id for j in store.list_jobs(state="pending", limit=2)] == ["c", "d"]
        assert [j.id for j in store.list_jobs(state="processing")] == ["a"]
        assert store.list_jobs(state="dead") == []

    def test_list_jobs_same_update_time_in_enqueue_order(self, store):
        store.enqueue([spec(id=i) for i in ["z", "y", "x"]], NOW)
        assert [j.id for j in store.list_jobs()] == ["z", "y", "x"]
        assert [j.id for j in store.list_jobs(limit=2)] == ["y", "x"]

    def test_scheduled_page_walks_future_pending_jobs_soonest_first(self, store):
        store.enqueue([spec(id="due", command="echo due")], NOW)  # due now: not scheduled
        store.enqueue([spec(id="later-low", priority="low", delay=300), spec(id="soon-high", priority="high", delay=10),
                       spec(id="mid", delay=100), spec(id="mid-too", delay=100), spec(id="last", delay=900)], NOW)
        self.enqueue_one(store, id="retry", max_retries=3)
        job = self.claim(store, now=NOW)
        assert job.id == "due"
        job = self.claim(store, now=NOW)
        assert job.id == "retry"
        state, retry_at = self.fail(store, job, NOW + 1)  # failed, waiting for its retry: listed as failed
        assert state == "failed" and retry_at > NOW + 1
        jobs, more = store.scheduled_page(NOW + 1, limit=10)
        order = ["soon-high", "mid", "mid-too", "later-low", "last"]  # by run_at, then enqueue order
        assert [j.id for j in jobs] == order and not more
        seen, after = [], None
        while True:  # pages of two, each starting after the last one
            jobs, more = store.scheduled_page(NOW + 1, limit=2, after=after)
            seen += [j.id for j in jobs]
            assert len(jobs) == 2 or not more
            if not more:
                break
            after = (jobs[-1].run_at, jobs[-1].seq)
        assert seen == order
        # Time goes by: what is due now is no longer scheduled, an old cursor does not bring it back.
        jobs, more = store.scheduled_page(NOW + 150, limit=10, after=(NOW + 10, jobs[0].seq))
        assert [j.id for j in jobs] == ["later-low", "last"]
        assert store.scheduled_page(NOW + 1000, limit=10) == ([], False)
        store.cancel("last", NOW + 2)  # cancelled: not scheduled any more
        assert [j.id for j in store.scheduled_page(NOW + 150, limit=10)[0]] == ["later-low"]

    def test_scheduled_page_leaves_out_jobs_due_now_and_says_more_only_when_there_is(self, store):
        store.enqueue([spec(id="due%03d" % i) for i in range(130)], NOW)  # due now, whatever their seq
        store.enqueue([spec(id="f%d" % i, delay=10 + i) for i in range(3)], NOW)
        jobs, more = store.scheduled_page(NOW, limit=3)
        assert [j.id for j in jobs] == ["f0", "f1", "f2"] and not more  # exactly the limit: no more
        jobs, more = store.scheduled_page(NOW, limit=2)
        assert [j.id for j in jobs] == ["f0", "f1"] and more
        jobs, more = store.scheduled_page(NOW, limit=2, after=(jobs[-1].run_at, jobs[-1].seq))
        assert [j.id for j in jobs] == ["f2"] and not more
        jobs, more = store.scheduled_page(NOW, limit=50, after=(NOW - 5, 1))  # a cursor before now starts at now
        assert [j.id for j in jobs] == ["f0", "f1", "f2"] and not more

    def test_queue_page_lists_one_queue_newest_first_within_a_bound(self, store):
        for i in range(10):  # r0..r9 in "reports", every third one dead; older than the rest
            self.enqueue_one(store, NOW + i, id="r%d" % i, queue="reports")
        for i in range(20):
            self.enqueue_one(store, NOW + 100 + i, id="d%d" % i)
        jobs, more, cut = store.queue_page("reports", limit=4)
        assert [j.id for j in jobs] == ["r9", "r8", "r7", "r6"] and more and not cut
        jobs, more, cut = store.queue_page("reports", limit=4, after=(jobs[-1].updated_at, jobs[-1].seq))
        assert [j.id for j in jobs] == ["r5", "r4", "r3", "r2"] and more and not cut
        jobs, more, cut = store.queue_page("reports", limit=4, after=(jobs[-1].updated_at, jobs[-1].seq))
        assert [j.id for j in jobs] == ["r1", "r0"] and not more and not cut
        jobs, more, cut = store.queue_page("reports", limit=50)
        assert len(jobs) == 10 and not more and not cut
        jobs, more, cut = store.queue_page("reports", limit=10)  # exactly the limit: no more
        assert len(jobs) == 10 and not more and not cut
        # The 25 newest jobs hold only 5 of reports: the look stops there, and says so.
        jobs, more, cut = store.queue_page("reports", limit=50, scan=25)
        assert [j.id for j in jobs] == ["r9", "r8", "r7", "r6", "r5"] and more and cut
        jobs, more, cut = store.queue_page("reports", limit=3, scan=25)
        assert [j.id for j in jobs] == ["r9", "r8", "r7"] and more and not cut
        # Of one state: the bound counts jobs of that state.
        self.enqueue_one(store, NOW + 200, id="late", queue="reports")
        assert self.claim_id(store, now=NOW + 300) == "r0"  # the oldest due job runs: r0 is updated last
        jobs, more, cut = store.queue_page("reports", state="processing", limit=5, scan=1)
        assert [j.id for j in jobs] == ["r0"] and not more and not cut
        jobs, more, cut = store.queue_page("reports", state="pending", limit=5, scan=3)
        assert [j.id for j in jobs] == ["late"] and more and cut  # the 3 newest pending: late, d19, d18
        assert store.queue_page("nosuch", limit=5) == ([], False, False)

    def test_queue_settings_without_counting_jobs(self, store):
        self.enqueue_one(store, id="a", queue="reports")
        self.enqueue_one(store, id="b")
        assert store.queue_settings() == {"default": {"max_running": None, "paused": False},
                                          "reports": {"max_running": None, "paused": False}}
        store.set_queue("reports", max_running=2, paused=True)
        store.set_queue("empty", paused=False)
        assert store.queue_settings() == {"default": {"max_running": None, "paused": False},
                                          "reports": {"max_running": 2, "paused": True},
                                          "empty": {"max_running": None, "paused": False}}
        store.set_queue("reports", max_running=None, paused=False)
        assert store.queue_settings()["reports"] == {"max_running": None, "paused": False}

    def test_get_and_attempts_of_an_unknown_job(self, store):
        assert store.get("nope") is None
        assert store.attempts("nope") == []
        assert store.attempt("nope") is None

    def test_attempt_lookup_by_number(self, store):
        self.enqueue_one(store, id="j")
        job = self.claim(store, now=NOW)
        store.finish("j", 1, "w1", "failed", NOW + 1, "failed", 1, output="first", output_bytes=5, retry_at=NOW + 2)
        job = self.claim(store, now=NOW + 2)
        store.finish("j", job.runs, "w1", "completed", NOW + 3, "completed", 0, output="second", output_bytes=6)
        assert store.attempt("j", 1).output == "first"
        assert store.attempt("j", 2).output == "second"
        assert store.attempt("j").n == 2
        assert store.attempt("j", 3) is None

    # --- helpers for the features beyond the core ----------------------------------------

    def run(self, store, job_id, state="completed", now=NOW + 1, worker="w1"):
        """Claim ``job_id`` (the next due job) and end its run in ``state``."""
        job = self.claim(store, worker, now=now)
        assert job is not None and job.id == job_id, "job %s is not the next due one: %r" % (job_id, job)
        if state == "failed":
            assert store.finish(job_id, job.runs, worker, "failed", now, "failed", 1, "exit code 1",
                                retry_at=now + 1000)
        elif state != "processing":
            assert store.finish(job_id, job.runs, worker, state, now, "completed" if state == "completed" else "failed",
                                0 if state == "completed" else 1)
        return job

    def claims(self, store, now=NOW + 1, **kw):
        """Every job a worker can claim at ``now``, in claim order (each left processing)."""
        got = []
        while True:
            job = store.claim("w-all", HOST, now, LEASE, **kw)
            if job is None:
                return got
            got.append(job.id)

    # --- cancel ------------------------------------------------------------------------------

    @pytest.mark.parametrize("state", ["pending", "failed", "waiting"])
    def test_cancel_of_a_job_that_is_not_running_is_at_once(self, store, raw_counts, state):
        self.enqueue_one(store, id="before")
        self.enqueue_one(store, id="j", after=["before"] if state == "waiting" else None)
        if state == "failed":
            self.run(store, "before")
            self.run(store, "j", "failed")
        assert store.get("j").state == state
        assert store.cancel("j", NOW + 5) == "cancelled"
        job = store.get("j")
        assert (job.state, job.finished_at, job.updated_at, job.last_error) == (
            "cancelled", NOW + 5, NOW + 5, "cancelled by a user")
        assert "j" not in self.claims(store, now=NOW + 10 ** 6)
        self.assert_counts(store, raw_counts)

    def test_cancel_of_a_running_job_is_a_request_its_worker_records(self, store):
        self.enqueue_one(store, id="j")
        self.run(store, "j", "processing")
        assert store.cancel_requested("j", 1) is False
        assert store.cancel("j", NOW + 2) == "requested"
        assert store.get("j").state == "processing"  # the worker kills the process tree first
        assert store.cancel_requested("j", 1) is True
        assert store.cancel_requested("j", 2) is False  # a request is for the run that was running
        assert store.finish("j", 1, "w1", "cancelled", NOW + 3, "cancelled", -15, "cancelled by a user")
        job = store.get("j")
        assert (job.state, job.finished_at, job.worker_id) == ("cancelled", NOW + 3, None)
        assert store.attempt("j", 1).outcome == "cancelled"

    @pytest.mark.parametrize("state", ["completed", "dead", "cancelled"])
    def test_cancel_of_a_finished_job_is_a_conflict_and_changes_nothing(self, store, state):
        self.enqueue_one(store, id="j")
        if state == "cancelled":
            store.cancel("j", NOW + 1)
        else:
            self.run(store, "j", state)
        before = snapshot(store, "j")
        with pytest.raises(Conflict) as info:
            store.cancel("j", NOW + 10)
        assert str(info.value) == "job j is already %s" % state
        assert snapshot(store, "j") == before

    def test_cancel_of_an_unknown_job_is_not_found(self, store):
        with pytest.raises(NotFound):
            store.cancel("nope", NOW)

    def test_cancel_reaches_the_jobs_waiting_for_it_and_theirs(self, store):
        for job_id, after in [("a", None), ("b", ["a"]), ("c", ["b"]), ("free", None)]:
            self.enqueue_one(store, id=job_id, after=after)
        assert store.cancel("a", NOW + 1) == "cancelled"
        assert {j: store.get(j).state for j in "abc"} == {"a": "cancelled", "b": "cancelled", "c": "cancelled"}
        assert store.get("b").last_error == "dependency a ended cancelled"
        assert store.get("c").last_error == "dependency b ended cancelled"
        assert self.claims(store) == ["free"]

    # --- purge -----------------------------------------------------------------------------

    def finished_jobs(self, store):
        """old-c, old-d, old-x completed/dead/cancelled at NOW + 1; new-c completed at NOW + 100;
        p pending."""
        for job_id in ["old-c", "old-d", "old-x", "new-c", "p"]:
            self.enqueue_one(store, id=job_id, priority="low" if job_id == "p" else "high")
        self.run(store, "old-c", now=NOW + 1)
        self.run(store, "old-d", "dead", now=NOW + 1)
        store.cancel("old-x", NOW + 1)
        self.run(store, "new-c", now=NOW + 100)

    def test_purge_deletes_finished_jobs_of_the_given_states_last_updated_before_a_time(self, store, raw_counts):
        self.finished_jobs(store)
        assert store.purge(["completed"], NOW + 50) == 1
        assert store.get("old-c") is None and store.attempts("old-c") == []
        assert store.get("new-c").state == "completed" and store.get("old-d").state == "dead"
        assert store.purge(["dead", "cancelled"], NOW + 50) == 2
        assert store.purge(["completed", "dead", "cancelled"], NOW + 50) == 0
        assert sorted(j.id for j in store.list_jobs()) == ["new-c", "p"]
        self.assert_counts(store, raw_counts, {"completed": 1, "pending": 1})

    def test_purge_goes_batch_by_batch_until_nothing_is_left(self, store):
        store.enqueue([spec(id="c%d" % i) for i in range(7)], NOW)
        for i in range(7):
            self.run(store, "c%d" % i)
        assert store.purge(["completed"], NOW + 50, batch=2) == 7
        assert store.list_jobs() == []

    def test_purge_goes_on_past_a_full_batch_of_any_size(self, store):
        store.enqueue([spec(id="c%03d" % i) for i in range(301)], NOW)
        for i in range(301):
            self.run(store, "c%03d" % i)
        assert store.purge(["completed"], NOW + 50, batch=300) == 301
        assert store.list_jobs() == []

    def test_purge_keeps_the_statistics(self, store):
        self.finished_jobs(store)
        minute = int((NOW + 1) // 60)
        stats, totals = store.stats_by_queue(minute - 10, minute + 10), store.attempt_totals()
        assert store.purge(["completed", "dead", "cancelled"], NOW + 1000) == 4
        assert store.stats_by_queue(minute - 10, minute + 10) == stats
        assert store.attempt_totals() == totals

    @pytest.mark.parametrize("state", ["pending", "processing", "failed", "waiting", "bogus"])
    def test_purge_refuses_a_state_that_is_not_final(self, store, state):
        self.finished_jobs(store)
        before = sorted((j.id, j.state) for j in store.list_jobs())
        with pytest.raises(queuectl.InvalidInput) as info:
            store.purge([state], NOW + 1000)
        assert state in str(info.value)
        assert sorted((j.id, j.state) for j in store.list_jobs()) == before

    # --- queues and limits -----------------------------------------------------------------

    def test_queues_lists_every_queue_with_its_limit_pause_and_unfinished_counts(self, store):
        self.enqueue_one(store, id="a", priority="low")
        self.enqueue_one(store, id="r1", queue="reports", priority="high")
        self.enqueue_one(store, id="r2", queue="reports")
        self.enqueue_one(store, id="r3", queue="reports", after=["r2"])
        self.run(store, "r1", "processing")
        self.run(store, "r2", "failed")
        store.set_queue("empty", max_running=2)
        store.set_queue("reports", paused=True)
        assert store.queues() == [
            {"name": "default", "max_running": None, "paused": False, "counts": {"pending": 1}},
            {"name": "empty", "max_running": 2, "paused": False, "counts": {}},
            {"name": "reports", "max_running": None, "paused": True,
             "counts": {"processing": 1, "failed": 1, "waiting": 1}},
        ]

    def test_set_queue_changes_only_what_it_is_given(self, store):
        store.set_queue("q", max_running=3)
        store.set_queue("q", paused=True)
        assert store.queues() == [{"name": "q", "max_running": 3, "paused": True, "counts": {}}]
        store.set_queue("q", max_running=None)
        store.set_queue("q", paused=False)
        assert store.queues() == [{"name": "q", "max_running": None, "paused": False, "counts": {}}]

    def test_a_queue_limit_counts_the_running_jobs_of_every_worker(self, store):
        store.set_queue("deploy", max_running=2)
        for i in range(4):
            self.enqueue_one(store, id="d%d" % i, queue="deploy", priority="high")
        self.enqueue_one(store, id="other", priority="low")
        assert [self.claim_id(store, w) for w in ("w1", "w2", "w3")] == ["d0", "d1", "other"]
        assert self.claim(store, "w4") is None  # two deploy jobs run: the others wait
        assert store.finish("d0", 1, "w1", "completed", NOW + 2, "completed", 0)
        assert self.claim_id(store, "w4", now=NOW + 2) == "d2"
        store.set_queue("deploy", max_running=None)
        assert self.claim_id(store, "w5", now=NOW + 2) == "d3"

    def test_a_paused_queue_keeps_its_jobs_until_it_is_resumed(self, store):
        self.enqueue_one(store, id="running", queue="q", priority="high")
        self.enqueue_one(store, id="waits", queue="q", priority="high")
        self.enqueue_one(store, id="other", priority="low")
        assert self.claim_id(store) == "running"
        store.set_queue("q", paused=True)
        assert self.claims(store) == ["other"]
        assert store.heartbeat("w1", "running", 1, NOW + 2, LEASE)  # a running job is not touched
        assert store.finish("running", 1, "w1", "completed", NOW + 3, "completed", 0)
        store.set_queue("q", paused=False)
        assert self.claims(store, now=NOW + 4) == ["waits"]

    def test_a_worker_may_take_from_given_queues_only(self, store):
        self.enqueue_one(store, id="a", queue="a", priority="high")
        self.enqueue_one(store, id="b", queue="b", priority="low")
        self.enqueue_one(store, id="c", queue="c")
        assert self.claims(store, queues=["b", "c"]) == ["c", "b"]
        assert self.claims(store, queues=["nope"]) == []
        assert self.claims(store) == ["a"]

    # --- schedules -------------------------------------------------------------------------

    def add_schedule(self, store, name, expr="*/5 * * * *", next_run=None, missed="once", overlap="skip",
                     tz="UTC", **job):
        job_spec = dict({"command": "echo %s" % name, "cwd": "/"}, **job)
        first = next_run if next_run is not None else queuectl.Cron.parse(expr).next_after(TICK_NOW)
        store.add_schedule(name, expr, tz, job_spec, missed, overlap, first, TICK_NOW - 3600)

    def fire(self, store, now):
        return store.fire_schedules(now, queuectl.schedule_next_run, store.config())

    def schedule(self, store, name):
        (s,) = [s for s in store.schedules() if s["name"] == name]
        return s

    def test_a_schedule_is_stored_as_given(self, store):
        self.add_schedule(store, "s", "0 3 * * *", tz="Asia/Tokyo", missed="skip", overlap="allow", priority="high")
        s = self.schedule(store, "s")
        assert {k: s[k] for k in ("name", "cron", "tz", "spec", "missed", "overlap", "paused", "next_run", "last_run",
                                  "last_job", "created_at", "last_state")} == {
            "name": "s", "cron": "0 3 * * *", "tz": "Asia/Tokyo",
            "spec": {"command": "echo s", "cwd": "/", "priority": "high"}, "missed": "skip", "overlap": "allow",
            "paused": False, "next_run": queuectl.Cron.parse("0 3 * * *").next_after(TICK_NOW),
            "last_run": None, "last_job": None, "created_at": TICK_NOW - 3600, "last_state": None}

    def test_nothing_fires_before_the_tick(self, store):
        self.add_schedule(store, "s")
        assert self.fire(store, TICK_NOW) == []
        assert self.fire(store, tick(12, 4, 59)) == []
        assert store.counts()["pending"] == 0 and self.schedule(store, "s")["next_run"] == tick(12, 5)

    def test_a_due_tick_enqueues_one_job_with_the_schedules_options(self, store):
        self.add_schedule(store, "s", priority="high", queue="reports", timeout=60.0, max_retries=1, env={"A": "1"})
        now = tick(12, 5, 10)
        (job_id,) = self.fire(store, now)
        assert job_id == "s.20310514T1205Z"
        job = store.get(job_id)
        assert (job.state, job.command, job.schedule, job.queue, job.priority_name) == \
            ("pending", "echo s", "s", "reports", "high")
        assert (job.timeout, job.max_retries, job.env, job.cwd, job.run_at) == (60.0, 1, {"A": "1"}, "/", now)
        s = self.schedule(store, "s")
        assert s["next_run"] == tick(12, 10) and s["last_run"] == tick(12, 5)
        assert s["last_job"] == job_id and s["last_state"] == "pending"
        assert "reports" in [q["name"] for q in store.queues()]

    def test_a_tick_fires_once_however_many_processes_ask(self, store, open_store):
        self.add_schedule(store, "s", overlap="allow")
        now = tick(12, 5, 1)
        other = open_store()
        assert len(self.fire(store, now)) == 1
        assert self.fire(other, now) == [] and self.fire(store, now) == []
        assert self.fire(other, now + 30) == []
        assert store.counts()["pending"] == 1

    def test_missed_ticks_run_once_with_missed_once(self, store):
        self.add_schedule(store, "s", next_run=TICK_NOW - 3 * 3600 - 30, missed="once")  # 36 ticks missed
        assert len(self.fire(store, TICK_NOW)) == 1
        assert self.schedule(store, "s")["next_run"] == tick(12, 5)  # the next tick after now
        assert self.fire(store, TICK_NOW + 1) == []

    def test_missed_ticks_are_dropped_with_missed_skip(self, store):
        self.add_schedule(store, "s", next_run=TICK_NOW - 3 * 3600 - 30, missed="skip")
        assert self.fire(store, TICK_NOW) == []
        s = self.schedule(store, "s")
        assert s["next_run"] == tick(12, 5) and s["last_job"] is None and s["last_run"] is None
        assert store.counts()["pending"] == 0

    @pytest.mark.parametrize("late, fires", [(0, True), (30, True), (60, True), (61, False), (299, False)])
    def test_a_tick_up_to_a_minute_late_is_not_missed(self, store, late, fires):
        self.add_schedule(store, "s", next_run=tick(12, 5), missed="skip")
        assert len(self.fire(store, tick(12, 5) + late)) == (1 if fires else 0)
        assert self.schedule(store, "s")["next_run"] > tick(12, 5) + late

    def test_overlap_skip_waits_for_the_previous_run(self, store):
        self.add_schedule(store, "s", overlap="skip")
        (first,) = self.fire(store, tick(12, 5))
        assert self.fire(store, tick(12, 10)) == []  # the first run is still pending
        assert self.schedule(store, "s")["next_run"] == tick(12, 15)
        assert self.schedule(store, "s")["last_job"] == first
        self.run(store, first, now=tick(12, 11))
        assert len(self.fire(store, tick(12, 15))) == 1

    def test_overlap_skip_also_while_the_previous_run_is_running_or_failed(self, store):
        self.add_schedule(store, "s", overlap="skip", max_retries=2)
        (first,) = self.fire(store, tick(12, 5))
        job = self.run(store, first, "processing", now=tick(12, 6))
        assert self.fire(store, tick(12, 10)) == []  # processing
        store.finish(job.id, job.runs, "w1", "failed", tick(12, 11), "failed", 1, retry_at=tick(13))
        assert self.fire(store, tick(12, 15)) == []  # failed, awaiting its retry

    def test_overlap_allow_fires_while_the_previous_run_is_unfinished(self, store):
        self.add_schedule(store, "s", overlap="allow")
        assert len(self.fire(store, tick(12, 5))) == 1
        assert len(self.fire(store, tick(12, 10))) == 1
        assert store.counts()["pending"] == 2

    def test_a_paused_schedule_does_not_fire_and_resumes_from_its_next_tick(self, store):
        self.add_schedule(store, "s")
        store.pause_schedule("s", True)
        assert self.schedule(store, "s")["paused"] is True
        assert self.fire(store, tick(13)) == []
        assert self.schedule(store, "s")["next_run"] == tick(12, 5)  # untouched while paused
        resume_at = tick(13, 2)
        store.pause_schedule("s", False, queuectl.schedule_next_run(self.schedule(store, "s"), resume_at))
        assert self.schedule(store, "s")["next_run"] == tick(13, 5) and not self.schedule(store, "s")["paused"]
        assert self.fire(store, resume_at) == []  # the ticks missed while paused are not made up for
        assert len(self.fire(store, tick(13, 5))) == 1

    def test_a_unique_key_held_by_another_job_skips_the_tick(self, store):
        store.enqueue([spec(TICK_NOW, unique_key="K")], TICK_NOW)
        self.add_schedule(store, "s", unique_key="K")
        assert self.fire(store, tick(12, 5)) == []
        assert self.schedule(store, "s")["next_run"] == tick(12, 10)
        assert self.schedule(store, "s")["last_job"] is None

    def test_a_unique_key_nobody_holds_does_not_stop_a_tick(self, store):
        self.add_schedule(store, "s", unique_key="K")
        (job_id,) = self.fire(store, tick(12, 5))
        assert store.get(job_id).unique_key == "K"

    def test_a_taken_job_id_gets_a_suffix(self, store):
        store.enqueue([spec(TICK_NOW, id="s.20310514T1205Z")], TICK_NOW)
        self.add_schedule(store, "s")
        (job_id,) = self.fire(store, tick(12, 5))
        assert re.fullmatch(r"s\.20310514T1205Z\.[%s]{4}" % queuectl.ID_ALPHABET, job_id), job_id
        assert store.get(job_id).schedule == "s"

    def test_a_schedule_without_a_directory_runs_its_jobs_in_the_root(self, store, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)  # not where the firing process happens to be
        self.add_schedule(store, "s", cwd=None)
        (job_id,) = self.fire(store, tick(12, 5))
        assert store.get(job_id).cwd == "/"

    def test_schedules_in_a_time_zone_advance_in_it(self, store):
        tokyo = queuectl.resolve_tz("Asia/Tokyo")  # UTC+9, no DST
        self.add_schedule(store, "t", expr="0 9 * * *", tz="Asia/Tokyo", next_run=tick(9, tz=tokyo))
        assert len(self.fire(store, tick(9, tz=tokyo))) == 1
        assert self.schedule(store, "t")["next_run"] == tick(9, day=15, tz=tokyo)

    def test_schedule_names_are_unique_and_removal_is_checked(self, store):
        self.add_schedule(store, "s")
        with pytest.raises(Conflict):
            self.add_schedule(store, "s")
        store.remove_schedule("s")
        assert store.schedules() == []
        for call in (lambda: store.remove_schedule("s"), lambda: store.pause_schedule("s", True)):
            with pytest.raises(NotFound):
                call()

    def test_removing_a_schedule_keeps_its_jobs(self, store):
        self.add_schedule(store, "s")
        (job_id,) = self.fire(store, tick(12, 5))
        store.remove_schedule("s")
        assert store.get(job_id).schedule == "s"

    # --- webhooks outbox -------------------------------------------------------------------

    def outbox(self, store, now=NOW + 100):
        """{(url, job id): (event, payload)} of the deliveries due at ``now`` (claimed); each once."""
        out = {}
        for d in store.claim_webhooks(now, 100, 30.0):
            payload = json.loads(d["payload"])
            assert (set(payload), d["attempts"]) == ({"event", "job", "sent_by"}, 0)
            key = (d["url"], payload["job"]["id"])
            assert key not in out, "two deliveries of job %s to %s" % key[::-1]
            out[key] = (payload["event"], payload)
        return out

    def test_a_job_that_ends_queues_one_delivery_per_url_with_its_document_without_env(self, store):
        store.set_config("webhook-url", "http://hooks.test/all")
        self.enqueue_one(store, id="a", webhook="http://hooks.test/a", env={"TOKEN": "secret"}, priority="high")
        self.enqueue_one(store, id="b", webhook="http://hooks.test/all")  # the same URL twice: one delivery
        self.enqueue_one(store, id="c", priority="low")
        self.run(store, "a")
        self.run(store, "b", "dead")
        store.cancel("c", NOW + 2)
        out = self.outbox(store)
        assert {k: v[0] for k, v in out.items()} == {
            ("http://hooks.test/a", "a"): "job.completed", ("http://hooks.test/all", "a"): "job.completed",
            ("http://hooks.test/all", "b"): "job.dead", ("http://hooks.test/all", "c"): "job.cancelled"}
        payload = out[("http://hooks.test/a", "a")][1]
        expected = store.get("a").to_dict()
        del expected["env"]  # may hold secrets
        assert payload == {"event": "job.completed", "job": expected, "sent_by": "queuectl " + queuectl.__version__}

    def test_a_run_that_will_be_retried_queues_no_delivery(self, store):
        self.enqueue_one(store, id="a", webhook="http://hooks.test/a")
        self.run(store, "a", "failed")
        assert store.webhooks_due(NOW + 10 ** 6) is False
        assert store.claim_webhooks(NOW + 10 ** 6, 10, 30.0) == []

    def test_a_delivery_is_leased_then_retried_delivered_or_given_up(self, store):
        self.enqueue_one(store, id="a", webhook="http://hooks.test/a", priority="high")
        self.enqueue_one(store, id="b", webhook="http://hooks.test/b")
        self.run(store, "a", now=NOW + 1)
        assert store.webhooks_due(NOW + 1) is True
        (d,) = store.claim_webhooks(NOW + 1, 10, 30.0)
        assert store.claim_webhooks(NOW + 2, 10, 30.0) == []  # leased to the first sender
        assert [x["id"] for x in store.claim_webhooks(NOW + 32, 10, 30.0)] == [d["id"]]  # the lease ran out
        store.webhook_result(d["id"], NOW + 33, error="HTTP 500", next_at=NOW + 100)
        assert store.webhooks_due(NOW + 99) is False and store.webhooks_due(NOW + 100) is True
        (again,) = store.claim_webhooks(NOW + 100, 10, 30.0)
        assert (again["id"], again["attempts"]) == (d["id"], 1)
        store.webhook_result(d["id"], NOW + 101)  # delivered
        assert store.webhooks_due(NOW + 10 ** 6) is False
        self.run(store, "b", now=NOW + 200)
        (d,) = store.claim_webhooks(NOW + 200, 10, 30.0)
        store.webhook_result(d["id"], NOW + 201, error="HTTP 404")  # given up: never sent again
        assert store.webhooks_due(NOW + 10 ** 6) is False

    def test_job_webhooks_say_how_each_delivery_went(self, store):
        store.set_config("webhook-url", "http://hooks.test/all")
        self.enqueue_one(store, id="a", webhook="http://hooks.test/a")
        self.enqueue_one(store, id="b")
        assert store.job_webhooks("a") == []
        self.run(store, "a", now=NOW + 1)
        pending = store.job_webhooks("a")
        assert [(d["url"], d["state"], d["attempts"]) for d in pending] == [
            ("http://hooks.test/a", "pending", 0), ("http://hooks.test/all", "pending", 0)]
        first, second = store.claim_webhooks(NOW + 2, 10, 30.0)
        store.webhook_result(first["id"], NOW + 3)
        store.webhook_result(second["id"], NOW + 3, error="HTTP 500", next_at=NOW + 5)
        delivered, failing = store.job_webhooks("a")
        assert (delivered["state"], delivered["delivered_at"], delivered["next_at"]) == ("delivered", NOW + 3, None)
        assert (failing["state"], failing["attempts"], failing["last_error"], failing["next_at"]) == (
            "failing", 1, "HTTP 500", NOW + 5)
        (again,) = store.claim_webhooks(NOW + 5, 10, 30.0)
        store.webhook_result(again["id"], NOW + 6, error="HTTP 404")  # given up
        failed = store.job_webhooks("a")[1]
        assert (failed["state"], failed["attempts"], failed["next_at"], failed["delivered_at"]) == (
            "failed", 2, None, None)
        assert store.job_webhooks("b") == []  # another job's deliveries are its own

    def test_claim_webhooks_takes_at_most_limit_oldest_first(self, store):
        for i in range(5):
            self.enqueue_one(store, id="j%d" % i, webhook="http://hooks.test/%d" % i)
        for i in range(5):
            self.run(store, "j%d" % i, now=NOW + 1 + i)
        first = store.claim_webhooks(NOW + 10, 3, 30.0)
        assert [d["url"] for d in first] == ["http://hooks.test/0", "http://hooks.test/1", "http://hooks.test/2"]
        assert [d["url"] for d in store.claim_webhooks(NOW + 10, 3, 30.0)] == ["http://hooks.test/3",
                                                                                "http://hooks.test/4"]

    # --- dependencies ----------------------------------------------------------------------

    def test_a_job_waits_until_every_job_it_depends_on_completed(self, store):
        self.enqueue_one(store, id="a", priority="high")
        self.enqueue_one(store, id="b", priority="high")
        self.enqueue_one(store, id="c", after=["a", "b"])
        assert store.get("c").state == "waiting" and store.get("c").after == ["a", "b"]
        self.run(store, "a")
        assert store.get("c").state == "waiting"
        b = self.claim(store, now=NOW + 2)
        assert b.id == "b" and self.claim(store, now=NOW + 2) is None  # c is not due while it waits
        assert store.finish("b", 1, "w1", "completed", NOW + 3, "completed", 0)
        assert store.get("c").state == "pending"
        assert self.claims(store, now=NOW + 3) == ["c"]

    def test_a_job_whose_dependencies_completed_already_is_pending_at_once(self, store):
        self.enqueue_one(store, id="a")
        self.run(store, "a")
        self.enqueue_one(store, id="b", after=["a"])
        assert store.get("b").state == "pending"

    def test_dependencies_inside_one_batch_in_any_order(self, store):
        ids = store.enqueue([spec(id="late", after=["early"]), spec(id="early"), spec(after=["late", "early"])], NOW)
        assert ids[:2] == ["late", "early"]
        assert [store.get(i).state for i in ids] == ["waiting", "pending", "waiting"]
        self.run(store, "early")
        assert self.claims(store) == ["late"]

    @pytest.mark.parametrize("dep_state, error, message", [
        (None, NotFound, 'job j depends on "dep", which does not exist'),
        ("dead", Conflict, "job j depends on dep, which is dead"),
        ("cancelled", Conflict, "job j depends on dep, which is cancelled"),
    ])
    def test_a_dependency_that_is_missing_or_ended_badly_refuses_the_batch(self, store, raw_counts, dep_state, error,
                                                                            message):
        if dep_state is not None:
            self.enqueue_one(store, id="dep")
            if dep_state == "dead":
                self.run(store, "dep", "dead")
            else:
                store.cancel("dep", NOW)
        before = sorted((j.id, j.state) for j in store.list_jobs())
        with pytest.raises(error) as info:
            store.enqueue([spec(id="fine"), spec(id="j", after=["dep"])], NOW + 5)
        assert str(info.value) == message
        assert sorted((j.id, j.state) for j in store.list_jobs()) == before
        self.assert_counts(store, raw_counts)

    def test_a_dependency_cycle_is_refused(self, store):
        with pytest.raises(queuectl.InvalidInput) as info:
            store.enqueue([spec(id="a", after=["b"]), spec(id="b", after=["a"])], NOW)
        assert "cycle" in str(info.value)
        assert store.list_jobs() == []

    def test_a_dependency_that_ends_dead_cancels_the_jobs_waiting_for_it_naming_it(self, store):
        self.enqueue_one(store, id="a", priority="high")
        self.enqueue_one(store, id="b", after=["a"])
        self.enqueue_one(store, id="c", after=["b"])
        self.run(store, "a", "dead", now=NOW + 2)
        assert (store.get("b").state, store.get("b").last_error) == ("cancelled", "dependency a ended dead")
        assert (store.get("c").state, store.get("c").last_error) == ("cancelled", "dependency b ended cancelled")
        assert store.get("b").finished_at == NOW + 2

    def test_a_dependency_lost_for_good_by_rescue_cancels_the_jobs_waiting_for_it(self, store):
        store.set_config("max-rescues", 0)
        self.enqueue_one(store, id="a")
        self.enqueue_one(store, id="b", after=["a"])
        self.run(store, "a", "processing")
        assert store.rescue(NOW + 100, HOST, always_alive, Recorder()) == ["a"]
        assert (store.get("a").state, store.get("b").state) == ("dead", "cancelled")

    def test_deleting_a_job_cancels_the_jobs_waiting_for_it(self, store):
        self.enqueue_one(store, id="a")
        self.enqueue_one(store, id="b", after=["a"])
        self.enqueue_one(store, id="c", after=["b"])
        assert store.delete_jobs("pending") == 1
        assert store.get("a") is None
        assert (store.get("b").state, store.get("b").last_error) == ("cancelled", "dependency a was deleted")
        assert (store.get("c").state, store.get("c").last_error) == ("cancelled", "dependency b ended cancelled")

    # --- unique keys -----------------------------------------------------------------------

    def test_a_unique_key_held_by_an_unfinished_job_adds_nothing_and_names_its_holder(self, store, raw_counts):
        self.enqueue_one(store, id="k1", unique_key="K")
        existing = []
        ids = store.enqueue([spec(id="k2", unique_key="K"), spec(id="other", unique_key="L")], NOW + 1,
                            existing=existing)
        assert ids == ["k1", "other"] and existing == ["k1"]
        assert store.get("k2") is None
        self.assert_counts(store, raw_counts, {"pending": 2})

    def test_a_held_unique_key_stands_for_its_holder_whatever_the_jobs_dependencies(self, store):
        self.enqueue_one(store, id="k1", unique_key="K")
        assert store.enqueue([spec(id="k2", unique_key="K", after=["nosuch"])], NOW + 1) == ["k1"]
        assert store.get("k2") is None

    def test_a_unique_key_taken_between_the_look_and_the_insert_names_its_holder(self, store, monkeypatch):
        """Another process's enqueue commits the key after this one looked it up: the insert
        finds it taken, and the job stands for that holder (no error)."""
        self.enqueue_one(store, id="k1", unique_key="K")
        real, looks = store._holder_of, []

        def late_holder(key):  # the first look comes before the other enqueue's commit
            looks.append(key)
            return None if len(looks) == 1 else real(key)

        monkeypatch.setattr(store, "_holder_of", late_holder)
        assert store.enqueue([spec(NOW + 1, id="k2", unique_key="K")], NOW + 1) == ["k1"]
        assert looks == ["K", "K"] and store.get("k2") is None

    def test_a_unique_key_twice_in_one_batch_adds_one_job(self, store):
        existing = []
        ids = store.enqueue([spec(unique_key="K"), spec(unique_key="K", command="second")], NOW, existing=existing)
        assert ids[0] == ids[1] and existing == [ids[0]]
        assert [j.command for j in store.list_jobs()] == ["true"]

    @pytest.mark.parametrize("state, held", [("processing", True), ("failed", True), ("waiting", True),
                                             ("completed", False), ("dead", False), ("cancelled", False)])
    def test_a_unique_key_is_held_until_its_job_is_finished(self, store, state, held):
        self.enqueue_one(store, id="dep", priority="high")
        self.enqueue_one(store, id="k1", unique_key="K", after=["dep"] if state == "waiting" else None)
        if state != "waiting":
            self.run(store, "dep")
            if state == "cancelled":
                store.cancel("k1", NOW + 2)
            else:
                self.run(store, "k1", state, now=NOW + 2)
        assert store.get("k1").state == state
        (job_id,) = store.enqueue([spec(id="k2", unique_key="K")], NOW + 3)
        assert job_id == ("k1" if held else "k2")

    def test_a_dead_job_whose_key_is_held_again_cannot_be_retried(self, store):
        self.enqueue_one(store, id="k1", unique_key="K")
        self.run(store, "k1", "dead")
        self.enqueue_one(store, id="k2", unique_key="K")
        with pytest.raises(Conflict) as info:
            store.retry_dead("k1", NOW + 5)
        assert "unique key" in str(info.value)
        assert store.retry_all_dead(NOW + 5) == (0, 1)
        assert store.get("k1").state == "dead"

    # --- the whole dead letter queue ---------------------------------------------------------

    def test_retry_all_dead_moves_every_dead_job(self, store):
        store.enqueue([spec(id="d%d" % i, priority="high") for i in range(3)] + [spec(id="ok", priority="low")], NOW)
        for i in range(3):
            self.run(store, "d%d" % i, "dead")
        assert store.retry_all_dead(NOW + 10) == (3, 0)
        assert {j.id: (j.state, j.run_at) for j in store.list_jobs()} == {
            "d0": ("pending", NOW + 10), "d1": ("pending", NOW + 10), "d2": ("pending", NOW + 10),
            "ok": ("pending", NOW)}
        assert store.retry_all_dead(NOW + 20) == (0, 0)

    # --- dashboard and monitoring reads ----------------------------------------------------

    def test_jobs_page_walks_every_job_once_newest_first_even_with_equal_times(self, store):
        store.enqueue([spec(id="a%03d" % i) for i in range(23)], NOW)  # one timestamp for all
        store.enqueue([spec(NOW + 5, id="b%03d" % i) for i in range(7)], NOW + 5)
        seen, after = [], None
        while True:
            jobs, more = store.jobs_page(limit=5, after=after)
            seen += [j.id for j in jobs]
            if not more:
                break
            after = (jobs[-1].updated_at, jobs[-1].seq)
        assert len(seen) == 30 and len(set(seen)) == 30
        assert seen[:7] == ["b%03d" % i for i in reversed(range(7))]  # newest first, then the last enqueued first
        assert seen[7:] == ["a%03d" % i for i in reversed(range(23))]

    def test_jobs_page_filters_by_state(self, store):
        store.enqueue([spec(id="j%d" % i, priority="high" if i in (1, 4, 7) else "low") for i in range(10)], NOW)
        for i in (1, 4, 7):
            self.run(store, "j%d" % i, "dead", now=NOW + i)
        jobs, more = store.jobs_page(state="dead", limit=2)
        assert [j.id for j in jobs] == ["j7", "j4"] and more
        jobs, more = store.jobs_page(state="dead", limit=2, after=(jobs[-1].updated_at, jobs[-1].seq))
        assert [j.id for j in jobs] == ["j1"] and not more
        assert store.jobs_page(state="completed") == ([], False)

    def test_jobs_page_id_prefix_search_in_id_order(self, store):
        ids = ("backup-3", "backup-1", "backup-2", "backupx", "backuP-9", "build-1", "b")
        store.enqueue([spec(id=i, priority="high" if i == "backup-2" else "low") for i in ids], NOW)
        jobs, more = store.jobs_page(id_prefix="backup-", limit=2)
        assert [j.id for j in jobs] == ["backup-1", "backup-2"] and more
        jobs, more = store.jobs_page(id_prefix="backup-", limit=2, after=jobs[-1].id)
        assert [j.id for j in jobs] == ["backup-3"] and not more
        self.run(store, "backup-2", "dead")
        assert [j.id for j in store.jobs_page(id_prefix="backup", state="dead")[0]] == ["backup-2"]
        assert [j.id for j in store.jobs_page(id_prefix="b")[0]] == ["b", "backuP-9", "backup-1", "backup-2",
                                                                     "backup-3", "backupx", "build-1"]
        for impossible in ("back up", "%", "b_ckup'--", "\u00e9"):
            assert store.jobs_page(id_prefix=impossible) == ([], False)

    def test_oldest_due_is_the_longest_waiting_due_job(self, store):
        assert store.oldest_due(NOW) is None
        self.enqueue_one(store, NOW - 100, id="later", delay=60, priority="high")  # due at NOW - 40
        self.enqueue_one(store, NOW - 30, id="low", priority="low")
        self.enqueue_one(store, NOW - 500, id="future", delay=600)  # due at NOW + 100
        assert store.oldest_due(NOW) == NOW - 40
        self.run(store, "later", "processing", now=NOW)
        assert store.oldest_due(NOW) == NOW - 30
        self.run(store, "low", now=NOW)
        assert store.oldest_due(NOW) is None
        assert store.oldest_due(NOW + 200) == NOW + 100

    def run_for(self, store, job_id, state, start, duration):
        job = self.claim(store, now=start)
        assert job.id == job_id
        assert store.finish(job_id, job.runs, "w1", state, start + duration,
                            "completed" if state == "completed" else "failed", 0 if state == "completed" else 1)

    def test_stats_minutes_sum_queues_per_minute(self, store):
        store.enqueue([spec(id="a"), spec(id="b", queue="q2"), spec(id="c")], NOW)
        self.run_for(store, "a", "completed", NOW, 2)
        self.run_for(store, "b", "completed", NOW + 1, 4)
        self.run_for(store, "c", "dead", NOW + 70, 1)
        minute = int((NOW + 2) // 60)
        by = {(r["minute"], r["outcome"]): r for r in store.stats_minutes(minute - 5, minute + 5)}
        assert by[(minute, "completed")]["count"] == 2
        assert by[(minute, "completed")]["run_sum"] == pytest.approx(6)
        assert by[(int((NOW + 71) // 60), "failed")]["count"] == 1
        assert store.stats_minutes(minute + 10, minute + 20) == []

    def test_attempt_totals_histogram_never_goes_down_when_jobs_are_deleted(self, store):
        store.enqueue([spec(id="quick"), spec(id="slow"), spec(id="bad")], NOW)
        self.run_for(store, "quick", "completed", NOW, 0.05)
        self.run_for(store, "slow", "completed", NOW + 1, 42)
        self.run_for(store, "bad", "dead", NOW + 2, 3)
        before = {(t["queue"], t["outcome"]): t for t in store.attempt_totals()}
        done = before[("default", "completed")]
        assert done["count"] == 2 and done["duration_sum"] == pytest.approx(42.05)
        buckets = dict(done["buckets"])
        assert buckets[0.1] == 1 and buckets[60.0] == 2 and buckets[float("inf")] == 2
        counts = [c for _, c in done["buckets"]]
        assert counts == sorted(counts), "buckets are cumulative"
        assert [le for le, _ in done["buckets"]] == list(queuectl.DURATION_BUCKETS) + [float("inf")]
        assert before[("default", "failed")]["count"] == 1
        assert store.delete_jobs() == 3
        assert [store.attempts(j) for j in ("quick", "slow", "bad")] == [[], [], []]
        assert {(t["queue"], t["outcome"]): t for t in store.attempt_totals()} == before

    # --- the per-queue claim path: paused or limited queues, workers serving some queues ----

    # A paused queue (or a limit, or a worker's --queue list) sends every claim through one
    # lookup per queue; the pick across queues must keep the global order: priority, then
    # due time, then enqueue order.

    def per_queue_path(self, store):
        store.set_queue("held", paused=True)  # any paused queue: the store picks queue by queue

    @pytest.mark.parametrize("how", ["paused queue", "limited queue", "worker queues"])
    def test_per_queue_claims_keep_priority_across_queues(self, store, how):
        queues = None
        if how == "paused queue":
            self.per_queue_path(store)
        elif how == "limited queue":
            store.set_queue("c", max_running=5)
        else:
            queues = ["a", "b", "c"]
        # per queue the best is: a -> low, b -> high, c -> medium; earlier run_at for the worse ones
        self.enqueue_one(store, NOW - 30, id="a-low", queue="a", priority="low")
        self.enqueue_one(store, NOW - 20, id="c-med", queue="c", priority="medium")
        self.enqueue_one(store, NOW - 10, id="b-high", queue="b", priority="high")
        self.enqueue_one(store, NOW - 40, id="c-low", queue="c", priority="low")
        order = [getattr(store.claim("w1", HOST, NOW, LEASE, queues=queues), "id", None) for _ in range(5)]
        assert order == ["b-high", "c-med", "c-low", "a-low", None]

    @pytest.mark.parametrize("queues", [None, ["a", "b"]])
    def test_per_queue_claims_are_fifo_across_queues_within_a_priority(self, store, queues):
        self.per_queue_path(store)
        self.enqueue_one(store, NOW - 1, id="b-second", queue="b")
        self.enqueue_one(store, NOW - 3, id="a-first", queue="a")
        self.enqueue_one(store, NOW - 2, id="a-third", queue="a")
        self.enqueue_one(store, NOW - 1, id="a-fourth", queue="a")  # same run_at as b-second, enqueued later
        order = [store.claim("w1", HOST, NOW, LEASE, queues=queues).id for _ in range(4)]
        assert order == ["a-first", "a-third", "b-second", "a-fourth"]

    @pytest.mark.parametrize("queues", [None, ["a"]])
    def test_per_queue_claims_take_a_job_due_exactly_now_and_none_due_later(self, store, queues):
        self.per_queue_path(store)
        self.enqueue_one(store, id="soon", queue="a", delay=10)
        assert store.claim("w1", HOST, NOW + 9.999, LEASE, queues=queues) is None
        job = store.claim("w1", HOST, NOW + 10, LEASE, queues=queues)
        assert job is not None and job.id == "soon"

    def test_a_paused_queue_is_never_claimed_from_and_resumes(self, store):
        store.set_queue("a", paused=True)
        self.enqueue_one(store, id="a1", queue="a", priority="high")
        self.enqueue_one(store, id="d1", priority="low")
        assert self.claim_id(store) == "d1"
        assert self.claim(store) is None
        assert store.get("a1").state == "pending"
        store.set_queue("a", paused=False)
        assert self.claim_id(store) == "a1"

    def test_a_worker_serving_some_queues_takes_only_from_them(self, store):
        self.enqueue_one(store, id="x-high", queue="x", priority="high")
        self.enqueue_one(store, id="a-low", queue="a", priority="low")
        self.enqueue_one(store, id="d-high", priority="high")
        assert store.claim("w1", HOST, NOW, LEASE, queues=["a"]).id == "a-low"
        assert store.claim("w1", HOST, NOW, LEASE, queues=["a"]) is None
        assert store.claim("w1", HOST, NOW, LEASE, queues=["nothing-here"]) is None
        assert store.claim("w2", HOST, NOW, LEASE, queues=["default", "x"]).id == "x-high"

    @pytest.mark.parametrize("queues", [None, ["a", "b"]])
    def test_a_queue_limit_holds_and_frees_up_as_jobs_end(self, store, queues):
        store.set_queue("a", max_running=2)
        for n in range(4):
            self.enqueue_one(store, id="a%d" % n, queue="a", priority="high")
        self.enqueue_one(store, id="b-low", queue="b", priority="low")

        def claim():
            job = store.claim("w1", HOST, NOW, LEASE, queues=queues)
            return job and job.id

        assert [claim(), claim()] == ["a0", "a1"]
        assert claim() == "b-low"  # a is full: its high-priority jobs wait
        assert claim() is None
        assert store.finish("a0", 1, "w1", "completed", NOW + 1, "completed", 0)
        assert claim() == "a2"
        assert claim() is None
        store.set_queue("a", max_running=None)  # no limit any more
        assert claim() == "a3"

    def test_queues_lists_limits_pauses_and_counts(self, store):
        store.set_queue("a", max_running=3)
        store.set_queue("b", paused=True)
        self.enqueue_one(store, id="a1", queue="a")
        self.enqueue_one(store, id="a2", queue="a")
        self.claim(store)
        got = {q["name"]: (q["max_running"], q["paused"], q["counts"]) for q in store.queues()}
        assert got == {"a": (3, False, {"pending": 1, "processing": 1}), "b": (None, True, {})}
        store.set_queue("a", paused=True)  # max_running left as it is
        store.set_queue("b", max_running=1, paused=False)
        got = {q["name"]: (q["max_running"], q["paused"]) for q in store.queues()}
        assert got == {"a": (3, True), "b": (1, False)}

    @pytest.mark.parametrize("queues", [["a", "b"], ["b", "a"]])
    def test_per_queue_claims_break_ties_by_enqueue_order(self, store, queues):
        """Same priority and due time in two queues: the job enqueued first goes first, whichever
        queue the worker looks at first."""
        self.enqueue_one(store, id="b-first", queue="b", priority="low")
        self.enqueue_one(store, id="a-second", queue="a", priority="low")
        order = [store.claim("w1", HOST, NOW, LEASE, queues=queues).id for _ in range(2)]
        assert order == ["b-first", "a-second"]

    def test_a_lowered_queue_limit_applies_to_new_claims(self, store):
        store.set_queue("a", max_running=3)
        for n in range(5):
            self.enqueue_one(store, id="a%d" % n, queue="a")
        assert [self.claim_id(store) for _ in range(3)] == ["a0", "a1", "a2"]
        store.set_queue("a", max_running=1)  # 3 running, over the new limit: nothing new starts
        assert self.claim(store) is None
        for n in range(3):
            assert store.finish("a%d" % n, 1, "w1", "completed", NOW + 1, "completed", 0)
            assert self.claim(store, now=NOW + 1) is None if n < 2 else self.claim_id(store, now=NOW + 1) == "a3"

    def test_a_bulk_enqueue_registers_its_queues(self, store):
        store.enqueue([spec(queue="q2"), spec(queue="q3"), spec(queue="q2")], NOW)
        assert {q["name"]: q["counts"] for q in store.queues()} == {"q2": {"pending": 2}, "q3": {"pending": 1}}

    # --- unique keys -------------------------------------------------------------------------

    @pytest.mark.parametrize("holder", ["pending", "processing", "failed", "waiting"])
    def test_a_unique_key_held_by_an_active_job_returns_that_job(self, store, holder):
        if holder == "waiting":
            self.enqueue_one(store, id="dep")
            self.enqueue_one(store, id="first", unique_key="k", after=["dep"])
        else:
            self.enqueue_one(store, id="first", unique_key="k")
        if holder in ("processing", "failed"):
            job = self.claim(store)
            if holder == "failed":
                assert store.finish("first", job.runs, "w1", "failed", NOW + 1, "failed", 1, retry_at=NOW + 50)
        assert store.get("first").state == holder
        existing = []
        ids = store.enqueue([spec(id="second", unique_key="k"), spec(id="other", unique_key="k2")], NOW + 2,
                            existing=existing)
        assert ids == ["first", "other"] and existing == ["first"]
        assert store.get("second") is None

    @pytest.mark.parametrize("end", ["completed", "dead", "cancelled"])
    def test_a_unique_key_is_free_again_once_its_job_ended(self, store, end):
        self.enqueue_one(store, id="first", unique_key="k")
        if end == "cancelled":
            assert store.cancel("first", NOW + 1) == "cancelled"
        else:
            job = self.claim(store)
            assert store.finish("first", job.runs, "w1", end, NOW + 1, "completed" if end == "completed" else "failed",
                                0 if end == "completed" else 1)
        existing = []
        assert store.enqueue([spec(id="second", unique_key="k")], NOW + 2, existing=existing) == ["second"]
        assert existing == []
        assert self.enqueue_one(store, NOW + 3, id="third", unique_key="k") == "second"

    def test_one_unique_key_twice_in_a_batch_makes_one_job(self, store, raw_counts):
        existing = []
        ids = store.enqueue([spec(id="a", unique_key="k"), spec(id="b"), spec(id="c", unique_key="k")], NOW,
                            existing=existing)
        assert ids == ["a", "b", "a"] and existing == ["a"]
        assert store.get("c") is None
        self.assert_counts(store, raw_counts, {"pending": 2})

    def test_a_dead_job_whose_unique_key_was_taken_meanwhile_cannot_be_retried(self, store):
        self.enqueue_one(store, id="old", unique_key="k", max_retries=0)
        job = self.claim(store)
        self.fail(store, job, NOW + 1)
        assert store.get("old").state == "dead"
        assert self.enqueue_one(store, NOW + 2, id="new", unique_key="k") == "new"
        with pytest.raises(Conflict):
            store.retry_dead("old", NOW + 3)
        assert store.get("old").state == "dead"
        assert store.retry_all_dead(NOW + 3) == (0, 1)
        assert store.get("old").state == "dead"

    def test_retry_all_dead(self, store):
        for job_id in ("d1", "d2"):
            self.enqueue_one(store, id=job_id, max_retries=0)
            job = self.claim(store)
            self.fail(store, job, NOW + 1)
        self.enqueue_one(store, id="p")
        assert store.retry_all_dead(NOW + 5) == (2, 0)
        assert {j: store.get(j).state for j in ("d1", "d2", "p")} == {"d1": "pending", "d2": "pending", "p": "pending"}
        assert store.get("d1").run_at == NOW + 5
        assert store.retry_all_dead(NOW + 6) == (0, 0)

    def test_retry_all_dead_gives_each_one_more_run_unless_reset(self, store):
        for job_id in ("d1", "d2"):
            self.enqueue_one(store, id=job_id, max_retries=1)
            _, now = self.runs_until_dead(store, job_id, NOW)
        assert store.retry_all_dead(NOW + 100) == (2, 0)
        assert self.runs_until_dead(store, "d1", NOW + 100)[0] == 1
        assert self.runs_until_dead(store, "d2", NOW + 100)[0] == 1
        assert store.retry_all_dead(NOW + 200, reset_attempts=True) == (2, 0)
        assert (store.get("d1").attempts, store.get("d2").attempts) == (0, 0)  # the full budget again

    # --- statistics and purge --------------------------------------------------------------

    def test_statistics_of_finished_and_lost_runs(self, store):
        minute = int(NOW // 60)  # NOW - 20 .. NOW + 40
        self.enqueue_one(store, NOW - 0.5, id="a", queue="q")
        assert store.claim("w1", HOST, NOW, LEASE).id == "a"  # waited 0.5 s
        assert store.finish("a", 1, "w1", "completed", NOW + 5, "completed", 0)  # ran 5 s
        self.enqueue_one(store, NOW, id="b", queue="q")
        assert store.claim("w1", HOST, NOW + 10, LEASE).id == "b"  # waited 10 s
        assert store.finish("b", 1, "w1", "failed", NOW + 10.5, "failed", 1, retry_at=NOW + 1000)
        self.enqueue_one(store, NOW, id="c", queue="r")
        assert store.claim("w1", HOST, NOW + 20, LEASE).id == "c"
        assert store.rescue(NOW + 20 + LEASE + 1, HOST, always_alive, Recorder()) == ["c"]
        rows, hist = store.stats_by_queue(minute, minute)
        got = {(r["queue"], r["outcome"]): (r["count"], r["run_sum"], r["wait_sum"]) for r in rows}
        assert got == {("q", "completed"): (1, 5.0, 0.5), ("q", "failed"): (1, 0.5, 10.0), ("r", "lost"): (1, 0.0, 0.0)}
        assert hist == {"q": {queuectl.run_time_bucket(5.0): 1, queuectl.run_time_bucket(0.5): 1}}
        assert store.stats_by_queue(minute + 1, minute + 10) == ([], {})
        per_minute = {(r["minute"], r["outcome"]): r["count"] for r in store.stats_minutes(minute - 5, minute + 5)}
        assert per_minute == {(minute, "completed"): 1, (minute, "failed"): 1, (minute, "lost"): 1}

    def test_purge_deletes_old_finished_jobs_in_batches_and_keeps_statistics(self, store, raw_counts):
        minute = int(NOW // 60)
        for n in range(5):
            self.enqueue_one(store, id="old%d" % n)
            assert self.claim_id(store) == "old%d" % n
            assert store.finish("old%d" % n, 1, "w1", "completed", NOW + 1, "completed", 0)
        self.enqueue_one(store, id="cancelled")
        store.cancel("cancelled", NOW + 1)
        self.enqueue_one(store, id="recent")
        self.claim(store, now=NOW + 2)
        store.finish("recent", 1, "w1", "completed", NOW + 30, "completed", 0)
        self.enqueue_one(store, id="dead", max_retries=0)
        self.fail(store, self.claim(store, now=NOW + 2), NOW + 3)
        stats = store.stats_by_queue(minute, minute)
        assert store.purge(("completed", "cancelled"), NOW + 10, batch=2) == 6
        assert sorted(j.id for j in store.list_jobs()) == ["dead", "recent"]
        assert store.attempts("old0") == []
        assert store.stats_by_queue(minute, minute) == stats
        self.assert_counts(store, raw_counts, {"completed": 1, "dead": 1})
        assert store.purge(("completed",), NOW + 31) == 1  # the default batch
        assert store.purge(("completed", "cancelled"), NOW + 1000) == 0
        with pytest.raises(queuectl.InvalidInput):
            store.purge(("pending",), NOW + 1000)
        assert store.get("dead").state == "dead"

    def test_list_jobs_shows_the_newest_100_by_default(self, store):
        store.enqueue([spec(now=NOW + n, id="j%03d" % n) for n in range(101)], NOW)
        jobs = store.list_jobs()
        assert len(jobs) == 100 and jobs[0].id == "j001" and jobs[-1].id == "j100"

    def test_finish_without_output_records_none(self, store):
        self.enqueue_one(store, id="j")
        self.claim(store)
        assert store.finish("j", 1, "w1", "completed", NOW + 1, "completed", 0)
        attempt = store.attempt("j", 1)
        assert (attempt.output, attempt.output_bytes) == ("", 0)

    @pytest.mark.parametrize("state", ["pending", "processing"])
    def test_a_run_cannot_be_finished_into_a_non_final_state(self, store, state):
        self.enqueue_one(store, id="j")
        self.claim(store)
        with pytest.raises(ValueError):
            store.finish("j", 1, "w1", state, NOW + 1, "completed", 0)
        assert store.get("j").state == "processing"

    def test_attempts_leave_the_output_out_unless_asked(self, store):
        self.enqueue_one(store, id="j")
        self.claim(store)
        store.finish("j", 1, "w1", "completed", NOW + 1, "completed", 0, output="hello\n", output_bytes=6)
        (plain,) = store.attempts("j")
        (full,) = store.attempts("j", with_output=True)
        assert (plain.output, plain.output_bytes, full.output, full.output_bytes) == ("", 6, "hello\n", 6)

    def test_a_heartbeat_without_a_job_marks_the_worker_alive(self, store):
        store.register_worker(worker_record("w1", now=NOW))
        assert store.heartbeat("w1", now=NOW + 7) is True
        (w,) = store.workers()
        assert w["heartbeat_at"] == NOW + 7

    @pytest.mark.parametrize("lease, silent_for, dead", [
        (15.0, 59, False), (15.0, 61, True), (30.0, 119, False), (30.0, 121, True),
        (10.0, 59.5, False), (10.0, 60.5, True),  # 4 leases are 40 s: a minute at least
        (15.0, 60, False),  # silent for exactly the limit: not yet
    ])
    @pytest.mark.parametrize("remote", [OTHER_HOST, "host-0"])  # (names after and before ours)
    def test_a_worker_on_another_host_is_dead_after_4_leases_of_silence_at_least_a_minute(
            self, store, lease, silent_for, dead, remote):
        store.set_config("lease-seconds", lease)
        store.register_worker(worker_record("remote", host=remote, pid=111, now=NOW))
        self.enqueue_one(store, id="j")
        store.claim("remote", remote, NOW, 10 ** 6)  # its lease is far from expired
        never_alive = Recorder(lambda pid, started: False)
        assert store.rescue(NOW + silent_for, HOST, never_alive, Recorder()) == (["j"] if dead else [])
        assert [w["id"] for w in store.workers()] == ([] if dead else ["remote"])
        assert never_alive.calls == []  # its pid means nothing on this host

    def test_a_local_worker_is_judged_by_its_pid_not_its_silence(self, store):
        store.register_worker(worker_record("local", pid=111, now=NOW - 10 ** 5))
        self.enqueue_one(store, id="j")
        store.claim("local", HOST, NOW, 10 ** 6)
        assert store.rescue(NOW + 10 ** 4, HOST, always_alive, Recorder()) == []
        assert [w["id"] for w in store.workers()] == ["local"]

    # --- dependencies and cancel ---------------------------------------------------------------

    def test_a_job_waits_for_all_its_dependencies(self, store):
        self.enqueue_one(store, id="a")
        self.enqueue_one(store, id="b")
        self.enqueue_one(store, id="c", after=["a", "b"])
        assert store.get("c").state == "waiting"
        assert store.get("c").after == ["a", "b"]
        assert self.claim_id(store) == "a"
        assert store.finish("a", 1, "w1", "completed", NOW + 1, "completed", 0)
        assert store.get("c").state == "waiting"  # b has not completed yet
        assert self.claim_id(store, now=NOW + 1) == "b"
        assert store.finish("b", 1, "w1", "completed", NOW + 2, "completed", 0)
        assert store.get("c").state == "pending"
        assert self.claim_id(store, now=NOW + 2) == "c"

    def test_a_dependency_that_failed_once_keeps_its_dependents_waiting(self, store):
        self.enqueue_one(store, id="a")
        self.enqueue_one(store, id="c", after=["a"])
        job = self.claim(store)
        assert store.finish("a", job.runs, "w1", "failed", NOW + 1, "failed", 1, retry_at=NOW + 2)
        assert store.get("c").state == "waiting"

    def test_a_dependency_that_completed_before_the_enqueue_is_no_wait(self, store):
        self.enqueue_one(store, id="a")
        self.claim(store)
        assert store.finish("a", 1, "w1", "completed", NOW + 1, "completed", 0)
        self.enqueue_one(store, NOW + 2, id="c", after=["a"])
        assert store.get("c").state == "pending"
        self.enqueue_one(store, NOW + 2, id="b")
        self.enqueue_one(store, NOW + 2, id="d", after=["a", "b"])  # a completed, b not: waits for b only
        assert store.get("d").state == "waiting"
        assert self.claim_id(store, now=NOW + 3) == "c"
        assert self.claim_id(store, now=NOW + 3) == "b"
        assert store.finish("b", 1, "w1", "completed", NOW + 4, "completed", 0)
        assert store.get("d").state == "pending"

    def test_dependencies_inside_one_batch(self, store):
        ids = store.enqueue([spec(id="child", after=["parent"]), spec(id="parent")], NOW)
        assert ids == ["child", "parent"]
        assert (store.get("parent").state, store.get("child").state) == ("pending", "waiting")

    def test_a_dependency_that_does_not_exist_or_ended_badly_is_refused(self, store, raw_counts):
        with pytest.raises(queuectl.NotFound):
            store.enqueue([spec(id="x"), spec(id="c", after=["nope"])], NOW)
        self.enqueue_one(store, id="gone")
        store.cancel("gone", NOW)
        with pytest.raises(Conflict) as info:
            store.enqueue([spec(id="c", after=["gone"])], NOW)
        assert "cancelled" in str(info.value)
        assert store.get("x") is None and store.get("c") is None
        self.assert_counts(store, raw_counts, {"cancelled": 1})

    @pytest.mark.parametrize("how", ["cancelled", "dead"])
    def test_a_dependency_that_ends_badly_cancels_its_dependents_down_the_chain(self, store, how):
        self.enqueue_one(store, id="a", max_retries=0)
        self.enqueue_one(store, id="b", after=["a"])
        self.enqueue_one(store, id="c", after=["b"])
        self.enqueue_one(store, id="side")
        self.enqueue_one(store, id="d", after=["side", "a"])
        if how == "cancelled":
            assert store.cancel("a", NOW + 1) == "cancelled"
        else:
            job = self.claim(store)
            assert job.id == "a"
            assert self.fail(store, job, NOW + 1)[0] is JobState.DEAD
        for job_id, dep in (("b", "a"), ("c", "b"), ("d", "a")):
            job = store.get(job_id)
            assert job.state == "cancelled", job_id
            assert "dependency %s" % dep in job.last_error and job.finished_at is not None
        assert store.get("side").state == "pending"
        assert self.claim_id(store, now=NOW + 2) == "side"
        assert self.claim(store, now=NOW + 2) is None

    def test_a_completed_dependency_never_cancels(self, store):
        self.enqueue_one(store, id="a")
        self.enqueue_one(store, id="b", after=["a"])
        self.claim(store)
        store.finish("a", 1, "w1", "completed", NOW + 1, "completed", 0)
        assert store.get("b").state == "pending"
        assert store.get("b").last_error is None

    def test_cancel_of_a_waiting_pending_or_failed_job(self, store):
        self.enqueue_one(store, id="p")
        self.enqueue_one(store, id="w", after=["p"])
        assert store.cancel("w", NOW + 1) == "cancelled"
        assert store.get("p").state == "pending"  # cancelling a dependent leaves its dependency be
        self.enqueue_one(store, id="f")
        assert self.claim_id(store) == "p"
        assert self.claim_id(store) == "f"
        assert store.finish("f", 1, "w1", "failed", NOW + 2, "failed", 1, retry_at=NOW + 10)
        assert store.cancel("f", NOW + 3) == "cancelled"
        job = store.get("f")
        assert (job.state, job.finished_at, job.last_error) == ("cancelled", NOW + 3, "cancelled by a user")
        assert self.claim(store, now=NOW + 100) is None

    def test_cancel_of_a_running_job_is_a_request_for_its_worker(self, store):
        self.enqueue_one(store, id="r")
        self.enqueue_one(store, id="after-r", after=["r"])
        job = self.claim(store)
        assert store.cancel_requested("r", 1) is False
        assert store.cancel("r", NOW + 1) == "requested"
        assert store.get("r").state == "processing"
        assert store.cancel_requested("r", 1) is True
        assert store.cancel_requested("r", 2) is False  # another run is not asked
        assert store.finish("r", job.runs, "w1", "cancelled", NOW + 2, "cancelled", error="cancelled")
        assert store.get("r").state == "cancelled"
        assert store.get("after-r").state == "cancelled"

    def test_cancel_of_an_unknown_or_finished_job(self, store):
        with pytest.raises(NotFound):
            store.cancel("nope", NOW)
        self.enqueue_one(store, id="c")
        self.claim(store)
        store.finish("c", 1, "w1", "completed", NOW + 1, "completed", 0)
        with pytest.raises(Conflict) as info:
            store.cancel("c", NOW + 2)
        assert "completed" in str(info.value)
        assert store.get("c").state == "completed"

    def test_deleting_a_dependency_cancels_its_dependents(self, store):
        self.enqueue_one(store, id="a", max_retries=0)
        self.enqueue_one(store, id="x")
        self.enqueue_one(store, id="b", after=["x"])
        job = self.claim(store)
        assert job.id == "a"
        self.fail(store, job, NOW + 1)  # a is dead; b waits on x
        assert store.delete_jobs("pending") == 1  # x
        job = store.get("b")
        assert job.state == "cancelled" and "x" in job.last_error
        assert store.get("a").state == "dead"

    def test_a_dependency_error_names_the_job_and_the_dependency(self, store):
        with pytest.raises(NotFound) as info:
            store.enqueue([spec(id="c", after=["nope"])], NOW)
        assert str(info.value) == 'job c depends on "nope", which does not exist'
        with pytest.raises(NotFound) as info:
            store.enqueue([spec(after=["nope"])], NOW)
        assert str(info.value) == 'job to enqueue depends on "nope", which does not exist'
        self.enqueue_one(store, id="gone")
        store.cancel("gone", NOW)
        with pytest.raises(Conflict) as info:
            store.enqueue([spec(after=["gone"])], NOW)
        assert str(info.value) == "job to enqueue depends on gone, which is cancelled"

    def test_a_lost_run_back_in_the_queue_keeps_its_dependents_waiting(self, store):
        self.enqueue_one(store, id="a")
        self.enqueue_one(store, id="b", after=["a"])
        self.claim(store, now=NOW)
        assert store.rescue(NOW + LEASE + 1, HOST, always_alive, Recorder()) == ["a"]
        assert (store.get("a").state, store.get("b").state) == ("pending", "waiting")

    def test_a_run_lost_too_often_goes_dead_and_cancels_its_dependents(self, store):
        store.set_config("max-rescues", 0)
        self.enqueue_one(store, id="a")
        self.enqueue_one(store, id="b", after=["a"])
        self.claim(store, now=NOW)
        assert store.rescue(NOW + LEASE + 1, HOST, always_alive, Recorder()) == ["a"]
        assert (store.get("a").state, store.get("b").state) == ("dead", "cancelled")
        assert "dependency a ended dead" in store.get("b").last_error

    def test_states_of(self, store):
        self.enqueue_one(store, id="a")
        self.enqueue_one(store, id="b")
        job = self.claim(store)
        store.finish(job.id, 1, "w1", "failed", NOW + 1, "failed", 7, retry_at=NOW + 9)
        assert store.states_of(["a", "b", "nope"]) == {"a": ("failed", 7), "b": ("pending", None)}


###############################################################################
# SqliteStore
###############################################################################


class TestSqliteStore(StoreContract):
    @pytest.fixture
    def open_store(self, db):
        opened = []

        def make():
            s = queuectl.SqliteStore(str(db))
            opened.append(s)
            return s

        yield make
        for s in opened:
            s.close()

    @pytest.fixture
    def raw_counts(self, db):
        return lambda: dict(db_rows(db, "SELECT state, count(*) FROM jobs GROUP BY state"))


def test_worker_commits_wait_for_no_disk_and_a_sync_flushes_the_wal(store, db):
    """A claim commits with synchronous=NORMAL; started() then flushes the WAL by fdatasync
    of the store's own descriptor of the -wal file, the very file SQLite writes."""
    store.enqueue([spec()], NOW)
    job = store.claim("w1", HOST, NOW, LEASE)
    assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL between transactions
    store.started(job.id, job.runs, 4242)
    wal = os.stat(str(db) + "-wal")
    assert os.fstat(store._wal_fd).st_ino == wal.st_ino and wal.st_size > 0
    assert store.attempt(job.id, 1).pid == 4242


def test_the_wal_descriptor_follows_a_new_wal_file(store, db):
    store.enqueue([spec()], NOW)
    store._sync()
    os.unlink(str(db) + "-wal")  # (as if the file had been recreated: the next sync must not flush the old one)
    with open(str(db) + "-wal", "wb"):
        pass
    store._sync()
    assert os.fstat(store._wal_fd).st_ino == os.stat(str(db) + "-wal").st_ino


def test_an_in_memory_store_syncs_without_a_wal_file():
    store = queuectl.SqliteStore(":memory:")
    store.enqueue([spec()], NOW)
    store._sync()
    assert store._wal_fd is None
    store.close()


def test_a_writer_gets_the_lock_soon_after_it_is_released(store, db):
    """A worker's store polls the write lock every 0.05-2 ms, not after SQLite's 1, 2, 5, 10 ms sleeps."""
    store.poll_for_locks()
    other = sqlite3.connect(str(db), isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    released = []

    def release():
        other.execute("COMMIT")
        released.append(time.monotonic())

    timer = threading.Timer(0.02, release)
    timer.start()
    try:
        store.enqueue([spec()], NOW)
        got = time.monotonic()
    finally:
        timer.join()
        other.close()
    assert got - released[0] < 0.008, "took %.1f ms after the lock was free" % ((got - released[0]) * 1e3)
    assert store.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 0  # reads poll too (_read)


def test_a_polling_writer_gives_up_after_the_busy_timeout(store, db, monkeypatch):
    monkeypatch.setattr(queuectl, "BUSY_TIMEOUT", 0.2)
    store.poll_for_locks()
    other = sqlite3.connect(str(db), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        t0 = time.monotonic()
        with pytest.raises(queuectl.DatabaseBusy):
            store.enqueue([spec()], NOW)
        assert 0.2 <= time.monotonic() - t0 < 2.0
        assert store.counts().get("pending", 0) == 0
    finally:
        other.close()


class WakeSocket:
    """The wake-up socket of a worker registered on this host (as Worker binds it)."""

    def __init__(self, store, db, worker_id):
        self.address = queuectl.wake_address(str(db), worker_id)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address)
        self.sock.setblocking(False)
        store.register_worker(worker_record(worker_id, host=queuectl.HOST, wake=self.address))

    def datagrams(self):
        """How many wake-ups arrived since the last call (they are sent before the store's call returns)."""
        n = 0
        while True:
            try:
                self.sock.recv(64)
            except BlockingIOError:
                return n
            n += 1


def test_the_sqlite_store_wakes_workers_after_the_commits_that_give_them_work(store, db):
    """What PostgreSQL's NOTIFY does: idle workers of this host are woken by datagram once a change
    that makes jobs due has committed, and the worker of a job a user cancels; nothing else wakes."""
    idle, busy = WakeSocket(store, db, "idle"), WakeSocket(store, db, "busy")
    try:
        store.enqueue([spec(id="later", delay=60)], NOW)
        assert (idle.datagrams(), busy.datagrams()) == (0, 0)
        store.enqueue([spec(id="a", max_retries=0), spec(id="b", after=["a"])], NOW)
        assert (idle.datagrams(), busy.datagrams()) == (1, 1)  # up to one idle worker per job
        with pytest.raises(Conflict):
            store.enqueue([spec(id="a")], NOW)  # refused, nothing committed: no wake-up
        assert idle.datagrams() == 0
        job = store.claim("busy", queuectl.HOST, NOW, LEASE)
        assert job.id == "a" and (idle.datagrams(), busy.datagrams()) == (0, 0)
        assert store.cancel("a", NOW + 1) == "requested"
        assert (idle.datagrams(), busy.datagrams()) == (0, 1)  # the worker running it, only
        assert store.finish("a", 1, "busy", "dead", NOW + 2, "failed", 1)  # b is cancelled: nothing to do
        assert idle.datagrams() == 0
        assert store.retry_dead("a", NOW + 3)
        assert idle.datagrams() == 1
        store.set_queue("default", paused=True)
        assert idle.datagrams() == 0
        store.set_queue("default", paused=False)
        assert idle.datagrams() == 1
    finally:
        idle.sock.close()
        busy.sock.close()


def test_each_change_wakes_as_many_idle_workers_as_jobs_it_made_due(store, db):
    """Four idle workers: a change that makes n jobs due wakes n of them (not one more, not one
    fewer); a change that makes none due wakes none."""
    idle = [WakeSocket(store, db, "idle%d" % i) for i in range(4)]

    def woken():
        return sum(s.datagrams() for s in idle)

    try:
        store.set_config("max-rescues", 1)
        store.enqueue([spec(id="a"), spec(id="b", after=["a"]), spec(id="c", after=["a"]),
                       spec(id="d", after=["a"]), spec(id="e")], NOW)
        woken()  # (an enqueue wakes one idle worker per job)
        assert store.claim("w1", HOST, NOW, LEASE).id == "a"
        assert store.finish("a", 1, "w1", "completed", NOW + 1, "completed", 0)
        assert woken() == 3  # b, c and d are released
        lost = store.claim("w1", HOST, NOW + 2, LEASE).id
        assert woken() == 0
        assert store.rescue(NOW + 2 + LEASE + 1, queuectl.HOST, always_alive, Recorder()) == [lost]
        assert woken() == 1  # back to pending
        taken = [store.claim(worker, HOST, NOW + 100, LEASE).id for worker in ("w1", "w2", "w3", "w4")]
        assert sorted(taken) == ["b", "c", "d", "e"] and woken() == 0
        now = NOW + 100 + LEASE + 1
        assert sorted(store.rescue(now, queuectl.HOST, always_alive, Recorder())) == sorted(taken)
        assert [store.get(j).state for j in taken].count("pending") == 3 and store.get(lost).state == "dead"
        assert woken() == 3  # the jobs lost once are due again; the dead one wakes nobody
        job = store.claim("w1", HOST, now, LEASE)
        assert woken() == 0
        assert store.release(job.id, job.runs, "w1", now + 1, "stopped")
        assert woken() == 1
        store.add_schedule("s1", "*/5 * * * *", "UTC", {"command": "true", "cwd": "/"}, "once", "allow",
                           now + 10, now)
        store.add_schedule("s2", "*/5 * * * *", "UTC", {"command": "true", "cwd": "/"}, "once", "allow",
                           now + 10, now)
        assert store.fire_schedules(now + 5, queuectl.schedule_next_run, store.config()) == []
        assert woken() == 0
        assert len(store.fire_schedules(now + 11, queuectl.schedule_next_run, store.config())) == 2
        assert woken() == 2
        store.enqueue([spec(now, id="f1"), spec(now, id="f2", run_at=queuectl.rfc3339(now - 60)), spec(now, id="f3", delay=60)], now)
        assert woken() == 2  # the delayed one is not due yet
        assert store.retry_dead(lost, now)
        assert woken() == 1
        store.enqueue([spec(now, id="x%d" % i, max_retries=0) for i in range(20)], now)
        woken()
        for i in range(3):
            job = store.claim("w%d" % i, HOST, now, LEASE)
            assert store.finish(job.id, job.runs, "w%d" % i, "dead", now + 1, "failed", 1)
        assert woken() == 0
        assert store.retry_all_dead(now + 2) == (3, 0)
        assert woken() == 3
        store.set_queue("default", paused=True)
        store.set_queue("default", paused=False)
        assert woken() == 4  # every idle worker looks
        for host, worker in (("0-remote", "r1"), ("~remote", "r2")):  # sorted before and after ours
            remote = WakeSocket(store, db, worker)
            idle.append(remote)
            store.register_worker(worker_record(worker, host=host, wake=remote.address))
            job = store.claim(worker, host, now, LEASE)
            assert store.cancel(job.id, now + 3) == "requested"
        assert woken() == 0  # a worker on another machine cannot be woken from here
        store.enqueue([spec(now, id="p1"), spec(now, id="p2"), spec(now, id="after-both", after=["p1", "p2"])], now)
        woken()
        while True:  # run jobs until p1 is done: after-both still waits for p2
            job = store.claim("w1", HOST, now + 4, LEASE)
            assert store.finish(job.id, job.runs, "w1", "completed", now + 4, "completed", 0)
            if job.id == "p1":
                break
        assert store.get("after-both").state == "waiting" and woken() == 0
    finally:
        for s in idle:
            s.sock.close()


def test_rescue_without_a_time_uses_the_clock(store):
    """``now=None``: the operation's time is the store's clock (what `worker start` passes)."""
    long_ago = time.time() - 1000
    store.enqueue([spec(long_ago, id="j")], long_ago)
    assert store.claim("w1", HOST, long_ago, LEASE).id == "j"
    store.started("j", 1, 4242)
    started_at = store.attempt("j", 1).started_at
    kill = Recorder()
    assert store.rescue(None, HOST, always_alive, kill) == ["j"]
    assert store.get("j").state == "pending"
    assert [c[:2] for c in kill.calls] == [(4242, started_at)]  # the run's start on this machine's clock


def plan(store, sql):
    params = {"now": NOW, "limit": 100, "state": "pending", "worker": "w", "lease_until": NOW + LEASE}
    return [row[3] for row in store.conn.execute("EXPLAIN QUERY PLAN " + sql, params)]


@pytest.mark.parametrize("name", ["SQL_CLAIM_SELECT", "SQL_CLAIM", "SQL_LIST_ALL", "SQL_LIST_STATE"])
def test_claim_and_list_queries_use_an_index(store, name):
    steps = plan(store, getattr(queuectl, name))
    assert not [s for s in steps if "SCAN jobs" in s and "USING" not in s], steps
    assert any("jobs USING" in s and "INDEX" in s for s in steps), steps


def test_claim_reads_the_due_jobs_in_claim_order_without_sorting_them(store):
    """Otherwise every claim sorts every due job: cost grows with the queue length."""
    store.enqueue([spec() for _ in range(100)], NOW)
    steps = plan(store, queuectl.SQL_CLAIM_SELECT)
    assert not [s for s in steps if "TEMP B-TREE" in s], steps


def test_a_new_database_has_the_current_schema_version(db):
    store = queuectl.SqliteStore(str(db))
    store.close()
    assert db_rows(db, "PRAGMA user_version") == [(len(queuectl.SCHEMA),)]
    assert db_rows(db, "PRAGMA journal_mode") == [("wal",)]
    tables = {r[0] for r in db_rows(db, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"jobs", "attempts", "workers", "config", "job_counts"} <= tables


def test_reopening_does_not_migrate_again(db):
    queuectl.SqliteStore(str(db)).close()
    schema = db_rows(db, "SELECT sql FROM sqlite_master ORDER BY name")
    queuectl.SqliteStore(str(db)).close()
    assert db_rows(db, "SELECT sql FROM sqlite_master ORDER BY name") == schema


def test_a_database_from_a_newer_queuectl_is_refused(db):
    queuectl.SqliteStore(str(db)).close()
    conn = sqlite3.connect(str(db))
    conn.execute("PRAGMA user_version = %d" % (len(queuectl.SCHEMA) + 1))
    conn.close()
    with pytest.raises(DatabaseError) as info:
        queuectl.SqliteStore(str(db))
    assert "newer" in str(info.value)


def file_state(path):
    directory = os.path.dirname(path)
    return path.read_bytes(), sorted(os.listdir(directory))


def make_foreign(db):
    conn = sqlite3.connect(str(db))
    conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, amount REAL)")
    conn.execute("INSERT INTO invoices (amount) VALUES (9.5)")
    conn.commit()
    conn.close()


def test_an_sqlite_file_with_foreign_tables_is_refused(db):
    make_foreign(db)
    with pytest.raises(DatabaseError) as info:
        queuectl.SqliteStore(str(db))
    assert "not a queuectl" in str(info.value)
    assert db_rows(db, "SELECT amount FROM invoices") == [(9.5,)]
    assert db_rows(db, "PRAGMA user_version") == [(0,)]
    assert [r[0] for r in db_rows(db, "SELECT name FROM sqlite_master")] == ["invoices"]


def test_an_sqlite_file_with_foreign_tables_is_left_byte_for_byte_untouched(db):
    make_foreign(db)
    before = file_state(db)
    with pytest.raises(DatabaseError):
        queuectl.SqliteStore(str(db))
    assert db_rows(db, "PRAGMA journal_mode") == [("delete",)], "the journal mode of a foreign file was changed"
    assert file_state(db) == before


@pytest.mark.parametrize("content", [b"this is not a database\n" * 200, b"SQLite format 3\x00" + b"\xff" * 4000])
def test_a_garbage_file_is_a_database_error_and_left_untouched(db, content):
    db.write_bytes(content)
    with pytest.raises(DatabaseError):
        queuectl.SqliteStore(str(db))
    assert db.read_bytes() == content


def public_methods(cls):
    return {name for name in dir(cls) if not name.startswith("_") and callable(getattr(cls, name))}


def assert_implements_the_contract(cls, extra=()):
    """Every method a caller may use is declared and documented on Store (callers never probe a
    store with hasattr), and ``cls`` implements each one the contract leaves open, and each query
    StoreRules needs.  ``extra``: public methods that are not for callers (a test helper)."""
    assert public_methods(cls) - public_methods(queuectl.Store) == set(extra)
    for name in public_methods(queuectl.Store):
        assert getattr(queuectl.Store, name).__doc__, "Store.%s has no docstring" % name
    for name in dir(queuectl.StoreRules):
        declared = getattr(queuectl.StoreRules, name)
        if callable(declared) and (name in vars(queuectl.StoreRules) or name in vars(queuectl.Store)) \
                and "raise NotImplementedError" in inspect.getsource(declared):
            assert getattr(cls, name) is not declared, "%s.%s is missing" % (cls.__name__, name)


def test_the_sqlite_store_implements_the_whole_contract_and_nothing_else():
    assert_implements_the_contract(queuectl.SqliteStore)


###############################################################################
# The rules both stores share
###############################################################################


@pytest.mark.parametrize("age, lease, alive", [
    (59.9, 1.0, True), (60.1, 1.0, False),  # never gone within a minute
    (59.9, 15.0, True), (60.1, 15.0, False),  # 4 x 15 s
    (3 * 3600, 3600.0, True), (4 * 3600 + 1, 3600.0, False),  # a long lease: 4 of them
])
def test_a_worker_on_another_host_is_alive_while_its_heartbeat_is_recent(age, lease, alive):
    w = dict(worker_record("remote", host=OTHER_HOST), heartbeat_at=NOW - age)
    never = Recorder(lambda pid, started: False)
    assert queuectl.worker_alive(w, NOW, HOST, lease, never) is alive
    assert never.calls == []  # its pid means nothing on this host


@pytest.mark.parametrize("answer", [True, False])
def test_a_worker_on_this_host_is_alive_while_its_process_is(answer):
    w = dict(worker_record("local", pid=4242, pid_started=55.0), heartbeat_at=NOW - 10 ** 6)
    alive = Recorder(lambda pid, started: answer)
    assert queuectl.worker_alive(w, NOW, HOST, LEASE, alive) is answer
    assert alive.calls == [(4242, 55.0)]  # the pid and its start time: a reused pid is not the worker


def test_rescue_worker_status_and_the_dashboard_judge_a_worker_by_the_same_rule(store):
    """A worker of another machine with a long lease, silent for two hours: alive for rescue, for
    `worker status` and the dashboard (worker_views); gone for all of them after four leases."""
    store.set_config("lease-seconds", 3600)
    store.register_worker(dict(worker_record("remote", host=queuectl.HOST + "-other", now=time.time() - 7200)))
    assert [v["state"] for v in queuectl.worker_views(store, time.time())] == ["idle"]
    assert store.rescue(time.time(), queuectl.HOST, always_alive, Recorder()) == []
    assert [w["id"] for w in store.workers()] == ["remote"]
    later = time.time() + 3 * 3600 + 1
    assert [v["state"] for v in queuectl.worker_views(store, later)] == ["gone"]
    store.rescue(later, queuectl.HOST, always_alive, Recorder())
    assert store.workers() == []


def test_migration_names_the_job_of_every_stored_webhook_delivery(tmp_path):
    """Deliveries stored before they named their job get it from their payload (SQLite; the
    PostgreSQL migration does the same in tests/test_store_pg.py)."""
    number = next(i for i, s in enumerate(queuectl.SCHEMA) if "webhooks_job" in s)
    path = tmp_path / "old.db"
    conn = sqlite_at_version(path, number)
    payload = json.dumps({"event": "job.completed", "job": {"id": "old"}})
    conn.execute("INSERT INTO webhooks (url, payload, attempts, next_at, created_at, delivered_at, last_error) "
                  "VALUES ('http://hooks.test/x', ?, 3, 0, 0, -1, 'HTTP 500')", (payload,))
    conn.close()
    store = queuectl.SqliteStore(str(path))
    try:
        [d] = store.job_webhooks("old")
        assert (d["url"], d["state"], d["attempts"], d["last_error"]) == ("http://hooks.test/x", "failed", 3, "HTTP 500")
    finally:
        store.close()
