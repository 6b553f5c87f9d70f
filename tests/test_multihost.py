"""Several machines on one PostgreSQL queue.

Each "machine" is a pair of Linux namespaces of its own, made with
``unshare --uts --pid --fork --mount-proc``: its own host name (set inside
with ``hostname``, so queuectl takes it from the kernel as it does on a real
machine) and its own process ids, counted from 1 (its init, a reaper), with a
/proc of its own.  Worker supervisors and commands run inside with ``nsenter``.
The network stays shared (the server at 127.0.0.1).  So, as in a fleet, the
same pid is a different process on each machine, and the machines share the
database and nothing else.  A worker judges another machine's workers by
their leases and heartbeats only, never by process ids, so these tests show
that:

- the machines share the work and every job runs exactly once (a ledger);
- ``worker stop`` on one machine stops that machine's workers only;
- two machines whose workers and jobs have the same pids (asserted from the
  pids recorded in the database) never rescue each other's live run nor kill
  a process because of it, and a dead machine's jobs are still rescued, by
  lease, without harm to the live job that has its pid on the other machine;
- when one machine dies (its namespace's init killed: every process in it
  dies), the other rescues its jobs once their leases expire, not before, and
  runs them;
- a machine that only froze finds its lease gone when it wakes up and cannot
  overwrite the result of the machine that took the job over (fencing), and
  a rescuer never kills processes of another machine.

Needs root and util-linux's ``unshare`` and ``nsenter`` (CI runs as root):
without them these tests fail with a message, never skip.  Marked
``postgres``: needs the local PostgreSQL server ($QUEUECTL_TEST_PG).

Teardown kills each machine's init by its pid from the outside (the kernel
then kills every process of that PID namespace), then every process carrying
the test's marker.  Never by the pids in the database: those are the
namespaces' own numbers, another process's outside.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import conftest
import queuectl
from conftest import Result, db_rows, program, wait_until

pytestmark = pytest.mark.postgres  # not e2e: the plain .pyz has no PostgreSQL driver

LEASE = 2  # lease-seconds: short, so that a dead machine's jobs are rescued quickly

#: The init of a machine: reaps the orphans reparented to it and waits to be killed from outside
#: (as a PID namespace's init it ignores every signal sent from inside without a handler).
REAPER = ("import os, time\n"
          "while True:\n"
          "    try:\n"
          "        os.wait()\n"
          "    except ChildProcessError:\n"
          "        time.sleep(1)\n")


def need_namespaces():
    missing = [tool for tool in ("unshare", "nsenter", "hostname") if shutil.which(tool) is None]
    if missing:
        pytest.fail("the multi-machine tests need %s (util-linux, hostname): apt-get install util-linux hostname"
                    % " and ".join(missing))
    if os.geteuid() != 0:
        pytest.fail("the multi-machine tests run each machine in its own UTS and PID namespaces "
                    "(unshare --uts --pid --fork --mount-proc): they must run as root (CI does)")


def cli(url, *args, stdin=None):
    """A command run outside the machines (as an operator's laptop would)."""
    env = conftest.program_env(url)
    env.pop("QUEUECTL_HOST", None)
    proc = subprocess.run(program() + ["--db", url] + [str(a) for a in args], env=env, capture_output=True,
                          input=stdin.encode() if stdin else None, stdin=None if stdin else subprocess.DEVNULL,
                          timeout=60)
    return Result(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))


def _status_field(pid, name):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split()[1:]
    return []


class Machine:
    """A host name and a pid space of its own (UTS, PID and mount namespaces), its init a reaper
    whose pid outside (``init``) is how the test reaches and kills it.  Pids that queuectl records
    (and ``worker_pids``, ``job_pids``) are the machine's own numbers; ``outside(pid)`` finds the
    process one of them is, from here."""

    def __init__(self, url, tmp_path, host):
        self.url, self.host = url, host
        self.dir = tmp_path / host
        self.dir.mkdir()
        self.procs = []  # nsenter processes of the supervisors started
        self.unshare = subprocess.Popen(
            ["unshare", "--uts", "--pid", "--fork", "--kill-child", "--mount-proc", "sh", "-c",
             'hostname "$1" && exec "$2" -c "$3"', "sh", host, sys.executable, REAPER],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.init = None
        try:
            self.init = wait_until(self._started_init, 20, message="the namespaces of machine %s were not made" % host)
            self.pidns = os.readlink("/proc/%d/ns/pid" % self.init)
            assert self.run("hostname").out.strip() == host
        except BaseException:
            self.close()
            raise

    def _started_init(self):
        """The outside pid of the namespace's init once it runs the reaper (its host name set)."""
        if self.unshare.poll() is not None:
            raise AssertionError("unshare failed for machine %s (exit %s): %s" % (
                self.host, self.unshare.returncode, self.unshare.stdout.read().decode(errors="replace")))
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open("/proc/%d/task/%d/children" % (self.unshare.pid, self.unshare.pid)) as f:
                child = int(f.read().split()[0])
            with open("/proc/%d/cmdline" % child, "rb") as f:
                if f.read().split(b"\0")[0] == os.fsencode(sys.executable):  # sh has exec'd the reaper
                    return child
        return None

    def env(self):
        env = conftest.program_env(self.url)
        env.pop("QUEUECTL_HOST", None)  # the machine is its host name, as in production
        return env

    def enter(self):
        return ["nsenter", "-t", str(self.init), "--uts", "--pid", "--mount", "--"]

    def run(self, *argv, stdin=None):
        """Run a command inside the machine."""
        proc = subprocess.run(self.enter() + [str(a) for a in argv], env=self.env(), capture_output=True,
                              input=stdin.encode() if stdin else None, stdin=None if stdin else subprocess.DEVNULL,
                              cwd=self.dir, timeout=60)
        return Result(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))

    def cli(self, *args, stdin=None):
        return self.run(*(program() + ["--db", self.url] + [str(a) for a in args]), stdin=stdin)

    def start(self, count):
        """A foreground worker supervisor with ``count`` workers inside the machine."""
        index = len(self.procs)
        log = open(self.dir / ("workers-%d.log" % index), "wb")
        argv = self.enter() + program() + ["--db", self.url, "worker", "start", "--foreground", "-c", str(count),
                                           "--poll-interval", "0.05"]
        before = len(self.worker_pids())
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=self.env(), cwd=self.dir, start_new_session=True)
        log.close()
        self.procs.append(proc)
        wait_until(lambda: len(self.worker_pids()) >= before + count or proc.poll() is not None, 20,
                   message="the workers of %s did not register" % self.host)
        assert proc.poll() is None, self.log(index)
        return proc

    def log(self, index=0):
        return (self.dir / ("workers-%d.log" % index)).read_text(errors="replace")

    def worker_pids(self):
        return [r[0] for r in db_rows(self.url, "SELECT pid FROM workers WHERE host = ? ORDER BY pid", (self.host,))]

    def supervisor_pids(self):
        return sorted({r[0] for r in db_rows(self.url, "SELECT supervisor_pid FROM workers WHERE host = ?",
                                             (self.host,))})

    def job_pids(self):
        return [r[0] for r in db_rows(self.url, "SELECT pid FROM attempts WHERE host = ? AND pid IS NOT NULL "
                                                "ORDER BY pid", (self.host,))]

    def processes(self):
        """``{pid inside: pid outside}`` of the machine's live (non-zombie) processes."""
        found = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            try:
                if os.readlink("/proc/%d/ns/pid" % pid) != self.pidns:
                    continue
                if _status_field(pid, "State")[:1] in (["Z"], ["X"]):
                    continue
                ids = [int(x) for x in _status_field(pid, "NSpid")]
            except (OSError, ValueError):
                continue
            if len(ids) >= 2:
                found[ids[-1]] = pid
        return found

    def outside(self, pid):
        """The pid outside of the machine's live process ``pid``, or None."""
        return self.processes().get(pid)

    def alive(self, pid):
        return self.outside(pid) is not None

    def signal(self, pids, sig):
        """Send ``sig`` to the machine's processes ``pids`` (its own numbers)."""
        inside = self.processes()
        for pid in pids:
            if pid in inside:
                with contextlib.suppress(OSError):
                    os.kill(inside[pid], sig)

    def freeze(self, sig):
        """SIGSTOP or SIGCONT the machine's supervisors and workers (not their jobs)."""
        self.signal(self.supervisor_pids() + self.worker_pids(), sig)
        if sig == signal.SIGCONT:
            self._resume_nsenter()

    def _resume_nsenter(self):
        """nsenter stops itself when the supervisor it waits for is stopped, and is not woken when
        the supervisor is: continue it, or it never reaps the supervisor and the PID namespace
        cannot end (its init waits for every process in it to be reaped)."""
        for p in self.procs:
            with contextlib.suppress(OSError):
                os.kill(p.pid, signal.SIGCONT)

    def kill(self):
        """The machine dies: SIGKILL of its init from outside kills every process in it."""
        if self.init is not None:
            with contextlib.suppress(OSError):
                os.kill(self.init, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.kill(self.unshare.pid, signal.SIGKILL)

    def close(self):
        self.kill()
        self._resume_nsenter()
        for p in self.procs + [self.unshare]:
            with contextlib.suppress(Exception):
                p.wait(timeout=10)
        if self.unshare.stdout:
            self.unshare.stdout.close()


@pytest.fixture
def machines(pg_url, tmp_path, process_mark):
    """``machines(host)`` makes a machine; teardown kills each by its init's pid, then (by the
    process_mark fixture) every process carrying the test's marker."""
    need_namespaces()
    made = []

    def make(host):
        made.append(Machine(pg_url, tmp_path, host))
        return made[-1]

    yield make
    for m in made:
        m.close()
    for m in made:
        wait_until(lambda: not m.processes(), 10, message="processes of machine %s outlived its init" % m.host)


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
    jobs = "".join(json.dumps({"id": "job%03d" % i, "command": "echo $QUEUECTL_JOB_ID $(hostname) >> %s" % ledger})
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
    assert {(j, h) for j, h in lines} == set(db_rows(pg_url, "SELECT job_id, host FROM attempts"))
    # `worker stop` on a machine stops that machine's workers, and only those
    r = alpha.cli("worker", "stop")
    assert r.rc == 0 and "stopped 2 worker(s)" in r.out, r.out + r.err
    assert alpha.worker_pids() == [] and len(beta.worker_pids()) == 2
    assert all(beta.alive(pid) for pid in beta.worker_pids())
    status = json.loads(beta.cli("status", "--json").out)
    assert status["job_counts"]["completed"] == 300 and status["workers"]["running"] == 2


def test_same_pids_on_two_machines_never_rescue_or_kill_the_others_live_run(pg_url, machines, tmp_path):
    """In a fleet the same pid is a different process on each machine.  Two machines whose worker
    and job have the same pids, each process started over 2 s after the other machine's (so a
    check of that pid and its start time on the wrong machine finds another process): neither
    rescues the other's live run, and when one dies, the other rescues its job by lease without
    killing its own job that has the dead run's pid."""
    assert cli(pg_url, "config", "set", "lease-seconds", LEASE).rc == 0
    ledger, go = tmp_path / "ledger", tmp_path / "go"
    for job in ("first", "second"):
        cmd = "%s; echo $QUEUECTL_JOB_ID $(hostname) >> %s" % (gate(go), ledger)
        assert cli(pg_url, "enqueue", json.dumps({"id": job, "command": cmd})).rc == 0
    alpha, beta = machines("alpha"), machines("beta")
    worker = "SELECT pid, pid_started FROM workers WHERE host = ?"
    run = "SELECT job_id, pid FROM attempts WHERE host = ?"
    alpha.start(1)
    wait_until(lambda: alpha.job_pids(), 20, message="alpha did not start a job")
    (alpha_worker, alpha_started), = db_rows(pg_url, worker, ("alpha",))
    (alpha_job, alpha_pid), = db_rows(pg_url, run, ("alpha",))
    # beta's processes start over pid_alive's 2 s tolerance later than alpha's (no event to wait for;
    # a process's start time is read against the boot time, which the kernel gives in whole seconds)
    wait_until(lambda: time.time() > alpha_started + 4, 10)
    beta.start(1)
    wait_until(lambda: beta.job_pids(), 20, message="beta did not start a job")
    (beta_worker, beta_started), = db_rows(pg_url, worker, ("beta",))
    (beta_job, beta_pid), = db_rows(pg_url, run, ("beta",))
    # the collision, as the machines recorded it: the same worker pid, the same job pid
    assert alpha_worker == beta_worker and alpha_pid == beta_pid, (alpha_worker, beta_worker, alpha_pid, beta_pid)
    assert beta_started - alpha_started > 2.5
    pid = alpha_pid
    assert None not in (alpha.outside(pid), beta.outside(pid)) and alpha.outside(pid) != beta.outside(pid)
    # both machines go on through several housekeeping rounds (each rescues every 2 s): wait until
    # both leases have been renewed well past them, on the database clock, or a run was lost
    t0 = db_rows(pg_url, "SELECT extract(epoch from clock_timestamp())::float8")[0][0]
    until = t0 + 3 * queuectl.HOUSEKEEPING_INTERVAL + 1 + LEASE
    wait_until(lambda: db_rows(pg_url, "SELECT count(*) FROM attempts WHERE outcome IS NOT NULL")[0][0] or
               db_rows(pg_url, "SELECT min(coalesce(lease_until, 0)) FROM jobs")[0][0] > until, 30,
               message="the runs' leases were not renewed")
    for host, job in (("alpha", alpha_job), ("beta", beta_job)):
        assert [(a[1], a[2], a[3]) for a in attempts(pg_url, job)] == [(host, None, None)], \
            "a live run was rescued: %s" % (attempts(pg_url, job),)
        assert state(pg_url, job) == "processing"
    assert sorted(r[0] for r in db_rows(pg_url, "SELECT host FROM workers")) == ["alpha", "beta"]
    assert alpha.alive(pid) and beta.alive(pid), "a job process was killed"
    # alpha dies; beta rescues alpha's job by its lease (its pid means nothing there)...
    leases = dict(db_rows(pg_url, "SELECT id, lease_until FROM jobs"))
    alpha.kill()
    wait_until(lambda: not alpha.processes(), 10, message="alpha's processes outlived its init")
    wait_until(lambda: [a[2] for a in attempts(pg_url, alpha_job)][:1] == ["lost"], 20,
               message="the dead machine's job was not rescued")
    lost = attempts(pg_url, alpha_job)[0]
    assert "lease of worker alpha-" in lost[3] and "expired" in lost[3], lost
    assert lost[5] > leases[alpha_job]
    # ...without killing beta's own job, whose pid on beta is the one the lost run had on alpha
    assert beta.alive(pid), "the rescuer killed its own job: it had the dead run's pid"
    assert [(a[1], a[2]) for a in attempts(pg_url, beta_job)] == [("beta", None)]
    go.touch()
    wait_until(lambda: state(pg_url, "first") == state(pg_url, "second") == "completed", 20)
    assert [a[2] for a in attempts(pg_url, alpha_job)] == ["lost", "completed"]
    assert [a[2] for a in attempts(pg_url, beta_job)] == ["completed"]
    assert sorted(ledger.read_text().splitlines()) == ["first beta", "second beta"]  # each job exactly once


def test_a_dead_machines_jobs_are_rescued_by_another_when_their_leases_expire(pg_url, machines, tmp_path):
    assert cli(pg_url, "config", "set", "lease-seconds", LEASE).rc == 0
    ledger, go = tmp_path / "ledger", tmp_path / "go"
    for i in range(2):
        cmd = "%s; echo $QUEUECTL_JOB_ID $(hostname) >> %s" % (gate(go), ledger)
        assert cli(pg_url, "enqueue", json.dumps({"id": "j%d" % i, "command": cmd})).rc == 0
    alpha = machines("alpha")
    alpha.start(2)
    wait_until(lambda: len(alpha.job_pids()) == 2, 20, message="alpha did not start both jobs")
    assert all(alpha.alive(pid) for pid in alpha.job_pids() + alpha.worker_pids() + alpha.supervisor_pids())
    beta = machines("beta")
    beta.start(2)
    leases = dict(db_rows(pg_url, "SELECT id, lease_until FROM jobs"))
    # the machine dies: its init killed from outside, every process in it (supervisor, workers, jobs) goes
    alpha.kill()
    killed_at = time.monotonic()
    wait_until(lambda: not alpha.processes(), 10, message="alpha's processes outlived its init")
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
    cmd = "h=$(hostname); echo $$ > %s/pid-$h; %s; echo ran on $h; [ $h = beta ]" % (tmp_path, gate(go))
    assert cli(pg_url, "enqueue", json.dumps({"id": "frozen", "command": cmd, "max_retries": 0})).rc == 0
    alpha = machines("alpha")
    alpha.start(1)
    wait_until(lambda: (tmp_path / "pid-alpha").exists() and (tmp_path / "pid-alpha").read_text().strip(), 20)
    alpha_job = int((tmp_path / "pid-alpha").read_text())  # alpha's own number for it
    wait_until(lambda: alpha.job_pids() == [alpha_job], 20, message="alpha did not record its job's pid")
    alpha.freeze(signal.SIGSTOP)  # alive but silent: its lease runs out
    beta = machines("beta")
    beta.start(1)
    wait_until(lambda: len(attempts(pg_url, "frozen")) == 2, 20, message="the frozen machine's job was not rescued")
    assert alpha.alive(alpha_job), "a rescuer must never kill a process of another machine"
    go.touch()
    wait_until(lambda: state(pg_url, "frozen") == "completed", 20)
    alpha.freeze(signal.SIGCONT)
    # alpha wakes up, finds it no longer owns the run, stops its job and discards its result
    wait_until(lambda: "result discarded" in alpha.log(0), 20, message=alpha.log(0))
    lost, done = attempts(pg_url, "frozen")
    assert (lost[1], lost[2]) == ("alpha", "lost") and (done[1], done[2]) == ("beta", "completed")
    job = json.loads(cli(pg_url, "get", "frozen", "--json").out)
    assert (job["state"], job["exit_code"], job["attempts"]) == ("completed", 0, 1)
    assert cli(pg_url, "logs", "frozen").out == "ran on beta\n"
    assert cli(pg_url, "logs", "frozen", "--attempt", "1").out == ""
