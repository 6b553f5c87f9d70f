"""Several machines on one PostgreSQL queue.

Each "machine" is a set of worker supervisors started with its own host
identity (QUEUECTL_HOST=alpha, QUEUECTL_HOST=beta): they share the database
and nothing else.  A worker judges another machine's workers by their leases
only, never by process ids, so these tests show that:

- the machines share the work and every job runs exactly once (a ledger);
- ``worker stop`` on one machine stops that machine's workers only;
- when one machine dies (``kill -9`` of its supervisor, workers and jobs), the
  other rescues its jobs once their leases expire, not before, and runs them;
- a machine that only froze finds its lease gone when it wakes up and cannot
  overwrite the result of the machine that took the job over (fencing), and
  a rescuer never kills processes of another machine.

Marked ``postgres``: needs the local PostgreSQL server ($QUEUECTL_TEST_PG).
"""

import contextlib
import json
import os
import signal
import subprocess
import time

import pytest

import conftest
from conftest import Result, Workers, db_rows, pid_exists, program, wait_until

pytestmark = pytest.mark.postgres  # not e2e: the plain .pyz has no PostgreSQL driver

LEASE = 2  # lease-seconds: short, so that a dead machine's jobs are rescued quickly


def cli(url, *args, host=None, stdin=None):
    env = conftest.program_env(url)
    if host:
        env["QUEUECTL_HOST"] = host
    proc = subprocess.run(program() + ["--db", url] + [str(a) for a in args], env=env, capture_output=True,
                          input=stdin.encode() if stdin else None, stdin=None if stdin else subprocess.DEVNULL,
                          timeout=60)
    return Result(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))


class Machine:
    """Worker supervisors presenting one host identity."""

    def __init__(self, url, tmp_path, host, mark=None):
        self.url, self.host = url, host
        self.workers = Workers(url, tmp_path / host, mark=mark)  # teardown kills by the test's marker too
        (tmp_path / host).mkdir()

    def start(self, count):
        env = dict(conftest.program_env(self.url), QUEUECTL_HOST=self.host)
        return self.workers.start(count, poll=0.05, env=env)

    def worker_pids(self):
        return [r[0] for r in db_rows(self.url, "SELECT pid FROM workers WHERE host = ?", (self.host,))]

    def job_pids(self):
        return [r[0] for r in db_rows(self.url, "SELECT pid FROM attempts WHERE host = ? AND pid IS NOT NULL",
                                      (self.host,))]

    def freeze(self, sig):
        for p in self.workers.procs:
            os.kill(p.pid, sig)
        for pid in self.worker_pids():
            os.kill(pid, sig)


@pytest.fixture
def machines(pg_url, tmp_path, process_mark):
    made = {}

    def make(host):
        made[host] = Machine(pg_url, tmp_path, host, process_mark)
        return made[host]

    yield make
    for m in made.values():
        with contextlib.suppress(OSError):
            m.freeze(signal.SIGCONT)
        m.workers.kill_all()


def attempts(url, job_id):
    return db_rows(url, "SELECT n, host, outcome, error, started_at, ended_at FROM attempts WHERE job_id = ? "
                        "ORDER BY n", (job_id,))


def state(url, job_id):
    rows = db_rows(url, "SELECT state FROM jobs WHERE id = ?", (job_id,))
    return rows[0][0] if rows else None


def gate(path):
    return "while [ ! -e %s ]; do sleep 0.02; done" % path


def test_two_machines_share_the_queue_and_every_job_runs_exactly_once(pg_url, machines, tmp_path):
    ledger = tmp_path / "ledger"
    jobs = "".join(json.dumps({"id": "job%03d" % i, "command": "echo $QUEUECTL_JOB_ID $QUEUECTL_HOST >> %s" % ledger})
                   + "\n" for i in range(300))
    assert cli(pg_url, "enqueue", "-", stdin=jobs).rc == 0
    alpha, beta = machines("alpha"), machines("beta")
    alpha.start(2)
    beta.start(2)
    wait_until(lambda: db_rows(pg_url, "SELECT count(*) FROM jobs WHERE state = 'completed'")[0][0] == 300, 120,
               message="the jobs were not all completed")
    lines = [line.split() for line in ledger.read_text().splitlines()]
    assert sorted(job for job, _ in lines) == ["job%03d" % i for i in range(300)], "a job ran twice or never"
    assert db_rows(pg_url, "SELECT count(*) FROM attempts")[0][0] == 300
    by_host = dict(db_rows(pg_url, "SELECT host, count(*) FROM attempts GROUP BY host"))
    assert set(by_host) == {"alpha", "beta"} and sum(by_host.values()) == 300, by_host
    assert sorted(set(host for _, host in lines)) == ["alpha", "beta"]  # each job ran where its attempt says
    # `worker stop` on a machine stops that machine's workers, and only those
    r = cli(pg_url, "worker", "stop", host="alpha")
    assert r.rc == 0 and "stopped 2 worker(s)" in r.out, r.out + r.err
    assert alpha.worker_pids() == [] and len(beta.worker_pids()) == 2
    assert all(pid_exists(pid) for pid in beta.worker_pids())
    status = json.loads(cli(pg_url, "status", "--json", host="beta").out)
    assert status["job_counts"]["completed"] == 300 and status["workers"]["running"] == 2


def test_a_dead_machines_jobs_are_rescued_by_another_when_their_leases_expire(pg_url, machines, tmp_path):
    assert cli(pg_url, "config", "set", "lease-seconds", LEASE).rc == 0
    ledger, go = tmp_path / "ledger", tmp_path / "go"
    for i in range(2):
        cmd = "%s; echo $QUEUECTL_JOB_ID $QUEUECTL_HOST >> %s" % (gate(go), ledger)
        assert cli(pg_url, "enqueue", json.dumps({"id": "j%d" % i, "command": cmd})).rc == 0
    alpha = machines("alpha")
    sup = alpha.start(2)
    wait_until(lambda: len(alpha.job_pids()) == 2, 20, message="alpha did not start both jobs")
    beta = machines("beta")
    beta.start(2)
    leases = dict(db_rows(pg_url, "SELECT id, lease_until FROM jobs"))
    # the machine dies: its supervisor, its workers and the jobs it ran
    victims = [sup.pid] + alpha.worker_pids()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    for pgid in alpha.job_pids():
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)
    killed_at = time.monotonic()
    sup.wait(10)
    wait_until(lambda: not any(pid_exists(p) for p in victims + alpha.job_pids()), 10)
    # beta takes both jobs over once their leases (renewed every LEASE/3 s) have expired
    wait_until(lambda: all([a[2] for a in attempts(pg_url, j)] == ["lost", None] for j in ("j0", "j1")), 20,
               message="the dead machine's jobs were not rescued and run again")
    assert time.monotonic() - killed_at < LEASE + 10
    go.touch()
    wait_until(lambda: state(pg_url, "j0") == state(pg_url, "j1") == "completed", 20)
    for job in ("j0", "j1"):
        lost, rerun = attempts(pg_url, job)
        assert (lost[1], lost[2]) == ("alpha", "lost")
        # judged by its lease, not by its pid: no same-host shortcut between machines
        assert "lease of worker alpha-" in lost[3] and "expired" in lost[3] and "died" not in lost[3]
        assert lost[5] > leases[job]  # not rescued before its lease (as renewed until the kill) ran out
        assert (rerun[1], rerun[2]) == ("beta", "completed")
    assert sorted(ledger.read_text().split()) == ["beta", "beta", "j0", "j1"]  # each job exactly once


def test_a_frozen_machine_cannot_overwrite_the_result_of_the_machine_that_took_over(pg_url, machines, tmp_path):
    assert cli(pg_url, "config", "set", "lease-seconds", LEASE).rc == 0
    go = tmp_path / "go"
    # alpha's run fails, beta's succeeds: an overwrite by alpha would show
    cmd = "echo $$ > %s/pid-$QUEUECTL_HOST; %s; echo ran on $QUEUECTL_HOST; [ $QUEUECTL_HOST = beta ]" % (
        tmp_path, gate(go))
    assert cli(pg_url, "enqueue", json.dumps({"id": "frozen", "command": cmd, "max_retries": 0})).rc == 0
    alpha = machines("alpha")
    alpha.start(1)
    wait_until(lambda: (tmp_path / "pid-alpha").exists() and (tmp_path / "pid-alpha").read_text().strip(), 20)
    alpha_job = int((tmp_path / "pid-alpha").read_text())
    alpha.freeze(signal.SIGSTOP)  # alive but silent: its lease runs out
    beta = machines("beta")
    beta.start(1)
    wait_until(lambda: len(attempts(pg_url, "frozen")) == 2, 20, message="the frozen machine's job was not rescued")
    assert pid_exists(alpha_job), "a rescuer must never kill a process of another machine"
    go.touch()
    wait_until(lambda: state(pg_url, "frozen") == "completed", 20)
    alpha.freeze(signal.SIGCONT)
    # alpha wakes up, finds it no longer owns the run, stops its job and discards its result
    wait_until(lambda: "result discarded" in alpha.workers.log(0), 20, message=alpha.workers.log(0))
    lost, done = attempts(pg_url, "frozen")
    assert (lost[1], lost[2]) == ("alpha", "lost") and (done[1], done[2]) == ("beta", "completed")
    job = json.loads(cli(pg_url, "get", "frozen", "--json").out)
    assert (job["state"], job["exit_code"], job["attempts"]) == ("completed", 0, 1)
    assert cli(pg_url, "logs", "frozen").out == "ran on beta\n"
    assert cli(pg_url, "logs", "frozen", "--attempt", "1").out == ""
