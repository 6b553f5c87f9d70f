"""The executor, in process: how a job's command is run, watched and killed.

``run_command`` runs real shell commands here (each in its own session and process group,
as a worker does) with an ``events`` stand-in for the worker; the pid and process-group
helpers that rescues rely on (``pid_alive``, ``kill_lost_group``, ``group_alive``...) are
checked against real processes.  Every process a test starts carries the test's marker in
its environment (``process_mark``) and is killed by PID at teardown; the tests find the
processes of a job by that marker too, never through the code under test.
"""

import ctypes
import os
import signal
import subprocess
import time

import pytest

import queuectl
from conftest import marked_processes, wait_until


def make_job(command, job_id="job1", runs=1, env=None, cwd=None):
    now = time.time()
    return queuectl.Job(id=job_id, command=command, state="processing", priority=2, max_retries=0, run_at=now,
                        created_at=now, updated_at=now, runs=runs, env=env, cwd=cwd)


class Events:
    """What a worker gives run_command: a pid callback and a tick that may ask for a stop."""

    def __init__(self, verdict_after=None, verdict=None, interval=0.05, worker_id="w-test"):
        self.interval = interval
        self.worker_id = worker_id
        self.pids = []
        self.ticks = 0
        self.verdict_after = verdict_after  # seconds after the start
        self.verdict = verdict
        self.started = None
        self.outputs = []

    def poll_fds(self):
        return []

    def on_start(self, pid):
        self.pids.append(pid)
        self.started = time.monotonic()

    def tick(self, now, buf):
        self.ticks += 1
        self.outputs.append(buf.total)
        if self.verdict_after is not None and time.monotonic() - self.started >= self.verdict_after:
            return self.verdict
        return None


def run(command, timeout=None, limit=65536, grace=0.2, events=None, **job):
    events = events or Events()
    start = time.monotonic()
    result = queuectl.run_command(make_job(command, **job), timeout, limit, grace, events)
    return result, time.monotonic() - start, events


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:][:1] not in (b"Z", b"X")


def assert_all_gone(mark, within=2.0):
    """No process of the test is left: a SIGKILLed one is gone within milliseconds (the kernel
    takes a moment to tear it down); one never killed is still there after ``within`` seconds."""
    wait_until(lambda: marked_processes(mark) == [], within,
               message="processes left running: %s" % marked_processes(mark))


def spawn(*argv, **kw):
    """A process of the test's own, in its own session (a job's group, as a worker starts it)."""
    return subprocess.Popen(list(argv), start_new_session=True, stdin=subprocess.DEVNULL, **kw)


# --- outcomes ----------------------------------------------------------------------------------


def test_a_command_that_exits_zero_completes_with_its_output(process_mark):
    result, _, events = run("echo hello; echo world >&2")
    assert (result.outcome, result.exit_code, result.error) == ("completed", 0, None)
    assert result.output == "hello\nworld\n" and result.output_bytes == 12
    assert len(events.pids) == 1


@pytest.mark.parametrize("command, code, error", [
    ("exit 3", 3, "exit code 3"),
    ("exit 1", 1, "exit code 1"),
    ("kill -9 $$", -9, "killed by SIGKILL"),
    ("kill -TERM $$", -15, "killed by SIGTERM"),
])
def test_a_command_that_fails_says_how(process_mark, command, code, error):
    result, _, _ = run(command)
    assert (result.outcome, result.exit_code, result.error) == ("failed", code, error)


def test_describe_exit():
    assert queuectl.describe_exit(None) is None
    assert queuectl.describe_exit(0) == "exit code 0"
    assert queuectl.describe_exit(-9) == "killed by SIGKILL"
    assert queuectl.describe_exit(-200) == "killed by signal 200"


def test_a_command_that_cannot_start_is_an_error(process_mark, tmp_path):
    missing = str(tmp_path / "gone")
    result, _, events = run("true", cwd=missing)
    assert result.outcome == "error" and result.exit_code is None
    assert result.error == "cannot start: working directory %s does not exist" % missing
    assert events.pids == []


def test_a_job_runs_in_its_cwd_with_its_env_and_the_runs_marks(process_mark, tmp_path, monkeypatch):
    monkeypatch.setenv("FROM_THE_WORKER", "inherited")
    result, _, _ = run('pwd; echo "$A|$FROM_THE_WORKER|$QUEUECTL_JOB_ID|$QUEUECTL_ATTEMPT|$QUEUECTL_WORKER_ID"',
                       cwd=str(tmp_path), env={"A": "from the job"}, job_id="j-7", runs=3)
    assert result.output == "%s\nfrom the job|inherited|j-7|3|w-test\n" % tmp_path


def test_the_job_env_cannot_override_the_runs_marks(process_mark):
    result, _, _ = run('echo "$QUEUECTL_JOB_ID $QUEUECTL_ATTEMPT"', env={"QUEUECTL_JOB_ID": "forged",
                                                                            "QUEUECTL_ATTEMPT": "99"})
    assert result.output == "job1 1\n"


def test_without_a_worker_id_the_run_is_marked_by_job_and_attempt_only(process_mark):
    events = Events(worker_id=None)
    result, _, _ = run('echo "${QUEUECTL_WORKER_ID-unset}"', events=events)
    assert result.output == "unset\n"


def test_the_job_gets_no_stdin_and_its_own_session(process_mark):
    result, _, events = run("cat; ps -o sid= -p $$")
    (pid,) = events.pids
    assert result.outcome == "completed"
    assert int(result.output.split()[-1]) == pid  # session leader: its own session and group


def test_output_is_capped_to_the_end_and_counted_whole(process_mark):
    result, _, _ = run("head -c 300000 /dev/zero | tr '\\0' a; echo; echo END", limit=1024)
    assert result.outcome == "completed"
    assert result.output_bytes == 300000 + 1 + 4
    assert result.output.endswith("a\nEND\n")
    assert result.output.startswith("[... %d earlier bytes not kept ...]\n" % (300005 - 1024))
    assert len(result.output.split("\n", 1)[1]) == 1024


def test_output_written_after_the_process_exits_by_a_grandchild_is_not_waited_for_forever(process_mark):
    """The job's own process decides when it ended: a background child still holding the output
    pipe is not waited for (it is the job's business; a timeout would kill it)."""
    result, took, _ = run("(sleep 5; echo late) & echo early")
    assert result.outcome == "completed" and result.output == "early\n"
    assert took < 4


def test_output_is_seen_while_the_job_runs(process_mark):
    events = Events()
    result, _, _ = run("echo first; sleep 0.3; echo second", events=events)
    assert result.outcome == "completed"
    assert 0 < min(n for n in events.outputs if n) < result.output_bytes  # ticks saw the output grow


# --- timeouts: TERM the whole group, then KILL after the grace --------------------------------


def test_a_timeout_kills_the_whole_group_and_says_so(process_mark):
    result, took, events = run("sleep 30 & sleep 30; echo never", timeout=0.3)
    assert result.outcome == "timeout"
    assert result.error == "timed out after 0.3s; process group killed"
    assert 0.3 <= took < 5
    assert_all_gone(process_mark)  # the background sleep too


def test_a_job_that_ignores_sigterm_is_killed_after_the_grace(process_mark):
    """`trap '' TERM`: only the SIGKILL after kill-grace stops it (and its sleep, which inherits
    the ignored TERM)."""
    result, took, _ = run("trap '' TERM; sleep 30; sleep 30", timeout=0.2, grace=0.3)
    assert result.outcome == "timeout"
    assert_all_gone(process_mark)
    assert 0.5 <= took < 3  # the whole grace, then no longer


def test_sigterm_comes_first_and_a_job_that_exits_on_it_is_not_waited_for(process_mark):
    result, took, _ = run("trap 'echo got TERM; exit 0' TERM; sleep 30 & wait", timeout=0.2, grace=20)
    assert result.outcome == "timeout"
    assert "got TERM" in result.output
    assert took < 0.9  # nowhere near the 20 s grace: the group is watched closely
    assert_all_gone(process_mark)


def test_a_grace_of_zero_kills_at_once(process_mark):
    result, took, _ = run("trap '' TERM; sleep 30", timeout=0.2, grace=0)
    assert result.outcome == "timeout" and took < 2
    assert_all_gone(process_mark)


def test_no_timeout_means_none(process_mark):
    result, took, _ = run("sleep 0.4", timeout=None)
    assert result.outcome == "completed" and took >= 0.4


# --- what the worker may ask for while the job runs ------------------------------------------


@pytest.mark.parametrize("verdict", ["stopped", "lost", "cancelled"])
def test_a_verdict_of_the_worker_kills_the_group(process_mark, verdict):
    events = Events(verdict_after=0.2, verdict=verdict)
    result, took, _ = run("trap '' TERM; sleep 30 & sleep 30", events=events, grace=0.2)
    assert result.outcome == verdict
    assert result.error == queuectl.VERDICTS[verdict]
    assert took < 5
    assert_all_gone(process_mark)


def test_an_unknown_tick_answer_is_ignored(process_mark):
    events = Events(verdict_after=0, verdict="something else")
    result, _, _ = run("sleep 0.2", events=events)
    assert result.outcome == "completed"


def test_ticks_come_at_the_events_interval_while_the_job_is_quiet(process_mark):
    events = Events(interval=0.05)
    result, took, _ = run("sleep 0.5", events=events)
    assert result.outcome == "completed"
    assert 5 <= events.ticks <= took / 0.05 + 3


def test_an_exception_in_the_worker_never_leaves_the_group_behind(process_mark):
    class Broken(Events):
        def tick(self, now, buf):
            raise RuntimeError("the worker broke")

    with pytest.raises(RuntimeError):
        queuectl.run_command(make_job("sleep 30 & sleep 30"), None, 65536, 0.2, Broken())
    assert_all_gone(process_mark)


def test_a_job_that_closes_its_output_early_still_finishes(process_mark):
    result, _, _ = run("echo bye; exec >&- 2>&-; sleep 0.2; exit 4")
    assert (result.outcome, result.exit_code, result.output) == ("failed", 4, "bye\n")


# --- pids and process groups: what a rescue relies on ----------------------------------------


def test_process_started_at_is_the_start_time_of_that_process(process_mark):
    before = time.time()
    proc = spawn("sleep", "30")
    try:
        started = queuectl.process_started_at(proc.pid)
        assert before - 1.0 <= started <= time.time() + 1.0
    finally:
        proc.kill()
        proc.wait()
    assert queuectl.process_started_at(proc.pid) is None  # gone (reaped)
    me = queuectl.process_started_at(os.getpid())
    assert me is not None and me < before


def test_pid_alive(process_mark):
    proc = spawn("sleep", "30")
    started = queuectl.process_started_at(proc.pid)
    try:
        assert queuectl.pid_alive(proc.pid) is True
        assert queuectl.pid_alive(proc.pid, started) is True
        assert queuectl.pid_alive(proc.pid, started + 1.5) is True  # within the clock-tick slack
    finally:
        proc.kill()
        proc.wait()
    assert queuectl.pid_alive(proc.pid) is False
    for nothing in (None, 0, -1):
        assert queuectl.pid_alive(nothing) is False


@pytest.mark.parametrize("shift", [-100.0, -2.5, 2.5, 100.0])
def test_a_reused_pid_is_not_the_worker_that_had_it(process_mark, shift):
    """The pid is alive, but the process that has it started at another time than the one
    recorded: the worker that had it is dead (its jobs must be rescued)."""
    proc = spawn("sleep", "30")
    try:
        started = queuectl.process_started_at(proc.pid)
        assert queuectl.pid_alive(proc.pid, started + shift) is False
    finally:
        proc.kill()
        proc.wait()


def test_a_pid_whose_start_time_cannot_be_read_is_taken_as_alive(process_mark, monkeypatch):
    proc = spawn("sleep", "30")
    try:
        monkeypatch.setattr(queuectl, "process_started_at", lambda pid: None)
        assert queuectl.pid_alive(proc.pid, 12345.0) is True
    finally:
        proc.kill()
        proc.wait()


def test_a_zombie_is_not_alive(process_mark):
    proc = spawn("true")
    wait_until(lambda: not alive(proc.pid), 10)  # exited, not reaped yet: a zombie
    try:
        assert queuectl.pid_alive(proc.pid) is False
    finally:
        proc.wait()


def test_group_alive_and_kill_group(process_mark):
    proc = spawn("sh", "-c", "sleep 30 & sleep 30")
    wait_until(lambda: len(marked_processes(process_mark)) == 3, 10)
    assert queuectl.group_alive(proc.pid) is True
    assert queuectl.kill_group(proc.pid, signal.SIGKILL) is True
    wait_until(lambda: marked_processes(process_mark) == [], 10)
    proc.wait()
    assert queuectl.group_alive(proc.pid) is False


def test_kill_group_of_an_empty_group_says_so(process_mark):
    proc = spawn("true")
    proc.wait()
    assert queuectl.kill_group(proc.pid, signal.SIGKILL) is False
    assert queuectl.group_alive(proc.pid) is False


def test_a_group_of_zombies_only_is_not_alive(process_mark):
    proc = spawn("true")
    wait_until(lambda: not alive(proc.pid), 10)
    other = spawn("sleep", "30")  # a live group started later (a higher pid) is someone else's
    try:
        assert queuectl.kill_group(proc.pid, 0) is True  # the zombie is still a member...
        assert queuectl.group_alive(proc.pid) is False  # ...but nothing runs
    finally:
        proc.wait()
        other.kill()
        other.wait()


def proc_state(pid):
    with open("/proc/%d/stat" % pid, "rb") as f:
        stat = f.read()
    return stat[stat.rindex(b")") + 2:].split()[0]


def test_a_group_stopped_by_a_debugger_is_alive(process_mark):
    """A job someone attached a debugger to (state 't', tracing stop) still runs: never judged gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    ptrace_attach, ptrace_detach = 16, 17
    proc = spawn("sleep", "30")
    try:
        if libc.ptrace(ptrace_attach, proc.pid, None, None) != 0:
            pytest.fail("ptrace(PTRACE_ATTACH) failed: %s (the test needs root or ptrace_scope 0)"
                        % os.strerror(ctypes.get_errno()))
        try:
            wait_until(lambda: proc_state(proc.pid) == b"t", 10)
            assert queuectl.group_alive(proc.pid) is True
            assert queuectl.pid_alive(proc.pid) is True
        finally:
            libc.ptrace(ptrace_detach, proc.pid, None, None)
    finally:
        proc.kill()
        proc.wait()


def test_asking_whether_a_process_or_group_is_alive_sends_it_no_signal(process_mark, tmp_path):
    log = tmp_path / "signals"
    proc = spawn("sh", "-c", 'trap "echo HUP >> %s" HUP; trap "echo USR1 >> %s" USR1; echo ready >> %s; '
                 'while :; do sleep 0.05; done' % (log, log, log))
    try:
        wait_until(lambda: log.exists() and "ready" in log.read_text(), 10)
        assert queuectl.group_alive(proc.pid) is True and queuectl.pid_alive(proc.pid) is True
        proc.send_signal(signal.SIGUSR1)  # after anything those sent: its trap runs last
        wait_until(lambda: "USR1" in log.read_text(), 10)
        assert log.read_text().split() == ["ready", "USR1"]
    finally:
        queuectl.kill_group(proc.pid, signal.SIGKILL)
        proc.wait()


def test_terminate_notices_at_once_a_group_that_ends_on_sigterm(process_mark):
    proc = spawn("sleep", "30")
    started = time.monotonic()
    queuectl._terminate(proc, grace=30.0)
    assert time.monotonic() - started < 0.5  # not the 30 s grace, nor a coarse poll of it
    assert proc.returncode == -signal.SIGTERM


def test_group_alive_sees_a_live_member_after_its_leader_exited(process_mark):
    proc = spawn("sh", "-c", "sleep 30 & exit 0")
    proc.wait()
    wait_until(lambda: len(marked_processes(process_mark)) == 1, 10)
    assert queuectl.group_alive(proc.pid) is True
    queuectl.kill_group(proc.pid, signal.SIGKILL)
    wait_until(lambda: not queuectl.group_alive(proc.pid), 10)


def test_kill_lost_group_kills_the_group_of_the_run(process_mark):
    proc = spawn("sh", "-c", "sleep 30 & sleep 30")
    wait_until(lambda: len(marked_processes(process_mark)) == 3, 10)
    started = queuectl.process_started_at(proc.pid)
    queuectl.kill_lost_group(proc.pid, started)
    proc.wait(timeout=10)
    wait_until(lambda: marked_processes(process_mark) == [], 10)


@pytest.mark.parametrize("run_started_later_by", [3.0, 100.0])
def test_kill_lost_group_spares_a_process_older_than_the_run(process_mark, run_started_later_by):
    """The recorded pid now belongs to a process that started before the run did: the run's
    leader is gone and its pid reused, so this group is someone else's."""
    proc = spawn("sleep", "30")
    try:
        started = queuectl.process_started_at(proc.pid)
        queuectl.kill_lost_group(proc.pid, started + run_started_later_by)
        time.sleep(0.2)  # a SIGKILL sent would have landed by now; nothing else to wait for
        assert proc.poll() is None and alive(proc.pid)
        queuectl.kill_lost_group(proc.pid, started + 1.5)  # within the slack: the run's own
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kill_lost_group_without_a_start_time_kills(process_mark):
    proc = spawn("sleep", "30")
    queuectl.kill_lost_group(proc.pid, None)
    assert proc.wait(timeout=10) == -signal.SIGKILL


def run_env(job_id, attempt, worker):
    env = dict(os.environ, QUEUECTL_JOB_ID=job_id, QUEUECTL_ATTEMPT=str(attempt), QUEUECTL_WORKER_ID=worker)
    return env


@pytest.fixture
def lost_runs():
    saved = dict(queuectl._LOST_RUNS)
    queuectl._LOST_RUNS.clear()
    yield queuectl._LOST_RUNS
    queuectl._LOST_RUNS.clear()
    queuectl._LOST_RUNS.update(saved)


def test_run_processes_finds_the_processes_of_one_run_by_their_variables(process_mark):
    mine = spawn("sleep", "30", env=run_env("jX", 2, "wA"))
    other_attempt = spawn("sleep", "30", env=run_env("jX", 1, "wA"))
    other_worker = spawn("sleep", "30", env=run_env("jX", 2, "wB"))
    other_job = spawn("sleep", "30", env=run_env("jY", 2, "wA"))
    try:
        wait_until(lambda: len(marked_processes(process_mark)) == 4, 10)
        assert queuectl.run_processes("jX", 2, "wA") == [mine.pid]
    finally:
        for p in (mine, other_attempt, other_worker, other_job):
            p.kill()
            p.wait()


def test_a_lost_run_without_a_pid_is_killed_by_its_variables_now_and_at_the_next_sweeps(process_mark, lost_runs):
    first = spawn("sh", "-c", "sleep 30 & sleep 30", env=run_env("jL", 1, "wD"))
    bystander = spawn("sleep", "30", env=run_env("jL", 2, "wD"))
    try:
        wait_until(lambda: len(marked_processes(process_mark)) == 4, 10)
        queuectl.kill_lost_group(None, time.time(), ("jL", 1, "wD"))
        assert first.wait(timeout=10) == -signal.SIGKILL
        wait_until(lambda: marked_processes(process_mark) == [bystander.pid], 10)
        assert set(lost_runs) == {("jL", 1, "wD")}
        # a child that was still between fork and exec shows up later: the sweep gets it
        late = spawn("sleep", "30", env=run_env("jL", 1, "wD"))
        wait_until(lambda: late.pid in marked_processes(process_mark), 10)
        queuectl.sweep_lost_runs()
        assert late.wait(timeout=10) == -signal.SIGKILL
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_the_sweep_forgets_a_lost_run_after_its_time(process_mark, lost_runs):
    lost_runs[("jOld", 1, "wD")] = time.monotonic() - 1
    lost_runs[("jNew", 1, "wD")] = time.monotonic() + 60
    proc = spawn("sleep", "30", env=run_env("jOld", 1, "wD"))
    try:
        wait_until(lambda: proc.pid in marked_processes(process_mark), 10)
        queuectl.sweep_lost_runs()
        assert set(lost_runs) == {("jNew", 1, "wD")}
        assert proc.poll() is None  # its time was over: not looked for any more
    finally:
        proc.kill()
        proc.wait()


def test_a_lost_run_without_a_pid_or_a_worker_is_left_alone(process_mark, lost_runs):
    proc = spawn("sleep", "30", env=run_env("jN", 1, ""))
    try:
        queuectl.kill_lost_group(None, time.time(), ("jN", 1, ""))
        queuectl.kill_lost_group(None, time.time(), None)
        assert lost_runs == {}
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_a_job_inherits_no_descriptor_of_its_worker(process_mark):
    """Not even one the worker left inheritable: only stdin, stdout and stderr (the stream the
    worker reads) are the job's."""
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        os.set_inheritable(fd, True)
        result, _, _ = run("ls /proc/$$/fd")
    finally:
        os.close(fd)
    assert result.outcome == "completed"
    assert sorted(int(n) for n in result.output.split()) == [0, 1, 2]


def test_a_command_the_system_refuses_to_start_is_an_error_with_the_reason(process_mark):
    """A single environment string over the kernel's limit (128 KiB): exec fails with E2BIG."""
    result, _, events = run("true", env={"BIG": "x" * 200_000})
    assert result.outcome == "error"
    assert result.error == "cannot start: Argument list too long"
    assert events.pids == []


def test_a_lost_run_without_a_pid_is_looked_for_during_the_sweep_time_only(process_mark, lost_runs):
    before = time.monotonic()
    queuectl.kill_lost_group(None, time.time(), ("jT", 1, "wT"))
    (until,) = lost_runs.values()
    assert before + queuectl.LOST_RUN_SWEEP <= until <= time.monotonic() + queuectl.LOST_RUN_SWEEP


def test_a_timeout_is_noticed_on_time_however_seldom_the_worker_ticks(process_mark):
    events = Events(interval=10)
    result, took, _ = run("sleep 30", timeout=0.2, events=events)
    assert result.outcome == "timeout"
    assert took < 0.8


def test_the_grace_is_for_the_whole_group_not_just_its_leader(process_mark, tmp_path):
    """The leader dies at SIGTERM at once; a background member cleans up for a moment on its
    SIGTERM: the SIGKILL waits for it (up to the grace), it does not come when the leader is gone."""
    done = tmp_path / "cleaned"
    command = ("(trap 'sleep 0.3; echo yes > %s; exit 0' TERM; while :; do sleep 0.05; done) & sleep 30" % done)
    result, took, _ = run(command, timeout=0.3, grace=10)
    assert result.outcome == "timeout"
    assert done.read_text() == "yes\n"
    assert took < 5


def test_without_proc_a_pid_that_answers_is_alive(process_mark, monkeypatch):
    """No /proc (another Unix): the zombie check cannot look, and kill(pid, 0) decides."""
    def no_proc(path, *a, **kw):
        raise FileNotFoundError(path)

    monkeypatch.setattr(queuectl, "open", no_proc, raising=False)
    assert queuectl.pid_alive(os.getpid()) is True


def test_a_process_of_another_user_is_alive_but_cannot_be_killed(monkeypatch):
    """kill() answers EPERM for another user's process: it exists (a worker of another
    account is alive), and its group cannot be signalled (kill_group says so)."""
    def eperm(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(queuectl.os, "kill", eperm)
    monkeypatch.setattr(queuectl.os, "killpg", eperm)
    assert queuectl.pid_alive(1) is True
    assert queuectl.kill_group(1, signal.SIGKILL) is False


def test_output_memory_stays_bounded_with_large_reads():
    buf = queuectl.OutputBuffer(1024)
    for _ in range(100):
        buf.write(b"y" * 65536)  # what one read of the pipe may return
    assert buf.size <= 2 * 1024 + 65536
    assert buf.total == 100 * 65536
    assert buf.text().endswith("y" * 1024)


def test_describe_exit_of_minus_one_is_sighup():
    assert queuectl.describe_exit(-1) == "killed by SIGHUP"


def test_running_jobs_leaks_no_descriptor_in_the_worker(process_mark):
    def open_fds():
        return len(os.listdir("/proc/self/fd"))

    run("true")  # (anything opened once, lazily)
    before = open_fds()
    for _ in range(10):
        run("echo x")
    assert open_fds() == before


def test_the_end_of_the_job_is_seen_at_once_though_a_child_holds_its_output(process_mark):
    """The exit is watched (pidfd), not only the output pipe, which a background child keeps
    open; a worker that ticks seldom still records the end at once."""
    result, took, _ = run("(sleep 3; echo late) & echo early; sleep 0.3", events=Events(interval=10))
    assert result.outcome == "completed" and result.output == "early\n"
    assert 0.3 <= took < 2


class FakeRead:
    def __init__(self, *answers):
        self.answers = list(answers)

    def __call__(self, fd, n):
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


@pytest.mark.parametrize("answers, open_after, kept", [
    ([b"ab", b"c", BlockingIOError()], True, b"abc"),  # all there is for now
    ([b"ab", b""], False, b"ab"),  # the end of the stream
    ([b"ab", OSError(5, "Input/output error")], False, b"ab"),  # a broken pipe: the end too
])
def test_drain_reads_what_is_there_and_says_whether_the_stream_goes_on(monkeypatch, answers, open_after, kept):
    monkeypatch.setattr(queuectl.os, "read", FakeRead(*answers))
    buf = queuectl.OutputBuffer(1024)
    assert queuectl._drain(99, buf) is open_after
    assert b"".join(buf.chunks) == kept


def test_without_proc_a_group_that_answers_is_alive(process_mark, monkeypatch):
    proc = spawn("sleep", "30")
    try:
        monkeypatch.setattr(queuectl.os.path, "isdir", lambda path: False)
        assert queuectl.group_alive(proc.pid) is True
    finally:
        monkeypatch.undo()
        proc.kill()
        proc.wait()


def test_process_start_times_are_precise_to_the_clock_tick(process_mark):
    first = spawn("sleep", "30")
    t0 = time.monotonic()
    wait_until(lambda: time.monotonic() - t0 >= 0.25, 5, interval=0.005)
    second = spawn("sleep", "30")
    try:
        gap = queuectl.process_started_at(second.pid) - queuectl.process_started_at(first.pid)
        assert 0.2 <= gap <= 0.6
    finally:
        for p in (first, second):
            p.kill()
            p.wait()


def test_group_alive_looks_past_processes_that_vanish_while_it_scans(process_mark, monkeypatch):
    proc = spawn("sleep", "30")
    real_open = open

    def vanishing(path, *a, **kw):  # every other process ends while /proc is read
        if str(path).startswith("/proc/") and str(path) != "/proc/%d/stat" % proc.pid:
            raise FileNotFoundError(path)
        return real_open(path, *a, **kw)

    try:
        monkeypatch.setattr(queuectl, "open", vanishing, raising=False)
        assert queuectl.group_alive(proc.pid) is True
    finally:
        monkeypatch.undo()
        proc.kill()
        proc.wait()
