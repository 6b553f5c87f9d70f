"""Day one for a sysadmin: defaults that never surprise, a CLI that fits the terminal, recipes
that run as written.  Each test runs the real program (some in an 80x24 terminal) the way a
pueue, task-spooler or cron user would."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import queuectl
from conftest import ROOT, db_rows, program, state_of, wait_state, wait_until
from test_docs import run_in_terminal

pytestmark = pytest.mark.e2e


@pytest.fixture
def term(db, tmp_path):
    """term("list") -> what `queuectl list` shows in an 80x24 terminal."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "queuectl"
    shim.write_text("#!/bin/sh\nexec %s \"$@\"\n" % " ".join("'%s'" % a for a in program()))
    shim.chmod(0o755)
    env = dict(os.environ, PATH="%s:%s" % (bindir, os.environ["PATH"]), QUEUECTL_DB=str(db),
               SHIV_ROOT=str(ROOT / "build" / "shiv-root"))

    def call(command):
        return run_in_terminal("queuectl " + command, tmp_path, env)

    return call


def lines_fit(text, width=80):
    wide = [line for line in text.split("\n") if len(line) > width]
    assert not wide, "lines wider than %d columns:\n%s" % (width, "\n".join(wide))


# --- 1. a long job is not killed by a limit it never asked for, or run again -------------------


def test_no_limit_per_job_and_the_effective_timeout_is_named(run, db, workers):
    assert run("config", "set", "job-timeout", "1").rc == 0
    for args in (["-t", "0"], ["-t", "none"]):
        assert run("enqueue", "--id", "long" + args[1], *args, "--", "sleep 1.5").rc == 0
    assert run("enqueue", json.dumps({"id": "longjson", "command": "sleep 1.5", "timeout": 0})).rc == 0
    assert run("enqueue", "--id", "capped", "-r", "0", "--", "sleep 5").rc == 0
    workers.start(2)
    for job in ("long0", "longnone", "longjson"):
        wait_state(db, job, "completed", 30)
    wait_state(db, "capped", "dead", 30)
    doc = json.loads(run("get", "capped", "--json").out)
    assert "timed out after 1s (job-timeout" in doc["last_error"] and "-t 0" in doc["last_error"]
    assert (doc["effective_timeout"], doc["timeout_from"]) == (1.0, "job-timeout")
    assert "timeout      1s, from job-timeout" in run("get", "capped").out
    assert "timeout      none (the job's own)" in run("get", "long0").out
    assert json.loads(run("get", "long0", "--json").out)["timeout"] == 0.0
    # The log line of the timeout says the same.
    assert any("timed out after 1s (job-timeout" in line for line in workers.log().splitlines())


# --- 3. the cron recipe, as written in the README, under cron's bare environment ----------------


def readme_block(kind, after):
    text = (ROOT / "README.md").read_text()
    start = text.index(after)
    m = re.search(r"```%s\n(.*?)```" % kind, text[start:], re.S)
    return m.group(1)


def test_the_readme_cron_recipe_runs_under_cron_s_environment(tmp_path):
    cron = readme_block("cron", "## Using it from cron and systemd")
    state = tmp_path / "var-lib-queuectl"
    program_file = tmp_path / "usr-local-bin-queuectl"
    program_file.write_text("#!/bin/sh\nexec %s \"$@\"\n" % " ".join("'%s'" % a for a in program()))
    program_file.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SHELL": "/bin/sh", "LOGNAME": "queue",
           "SHIV_ROOT": str(ROOT / "build" / "shiv-root")}
    commands = []
    for line in cron.splitlines():
        line = line.replace("/var/lib/queuectl", str(state)).replace("/usr/local/bin/queuectl", str(program_file))
        line = line.replace("tar czf /backup/etc.tgz /etc", "echo backed up")
        if re.match(r"^[A-Z_]+=", line):
            key, _, value = line.partition("=")
            env[key] = value
        elif line.strip() and not line.startswith("#"):
            commands.append(line.split(None, 5)[5])  # after the five time fields, as cron runs it
    assert len(commands) == 2 and env.get("QUEUECTL_DB", "").startswith(str(state))
    subprocess.run(["install", "-d", "-m", "0700", str(state)], check=True)  # the README's set-up line

    def cron_runs(command):
        r = subprocess.run(["/bin/sh", "-c", command], env=env, capture_output=True, text=True, timeout=60,
                           cwd="/")
        return r.returncode, r.stdout + r.stderr

    enqueue, burst = commands
    assert cron_runs(burst) == (0, "")  # nothing due: nothing for cron to mail
    rc, out = cron_runs(enqueue)
    assert rc == 0 and out.strip()  # the job's id (cron mails it: one line a night)
    assert cron_runs(enqueue)[0] == 0  # the unique key: a second run adds nothing, fails nothing
    assert cron_runs(burst) == (0, "")  # the job ran; -q: nothing to mail
    rows = db_rows(state / "q.db", "SELECT state, timeout FROM jobs")
    assert rows == [("completed", 7200.0)]


# --- 4. tables that fit an 80-column terminal ----------------------------------------------------


def test_list_fits_80_columns_with_relative_times_queues_and_due_times(run, db, term):
    jobs = [{"id": "a-rather-long-job-identifier-from-a-script-%d" % i,
             "command": "rsync -a --delete /srv/media/ backup01:/srv/media/ --exclude '*.tmp' # %d" % i,
             "queue": "media" if i % 2 else "default"} for i in range(3)]
    jobs.append({"id": "next-year", "command": "true", "delay": 300 * 86400})
    assert run("enqueue", "-", stdin="\n".join(json.dumps(j) for j in jobs)).rc == 0
    for command in ("list", "dlq list", "get next-year", "status", "worker status", "config show",
                    "queue list", "stats"):
        screen = term(command)
        lines_fit(screen)
    screen = term("list")
    assert "QUEUE" in screen.split("\n")[0] and "media" in screen
    assert "\u2026" in screen  # long commands and ids are cut, not wrapped
    assert re.search(r"next-year .* due in (9|10)mo", screen), screen
    assert re.search(r"just now|\ds ago", screen)
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", term("list --utc"))
    piped = run("list").out  # piped: the same for scripts at any width, UTC stamps
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", piped) and "ago" not in piped
    assert "rsync -a --delete /srv/media/ backup01:/srv/med" in piped


# --- 5. typos are caught ----------------------------------------------------------------------------


def test_a_queue_nobody_used_needs_create(run, db):
    assert run("enqueue", "--id", "j", "-q", "emails", "--", "true").rc == 0
    r = run("queue", "pause", "emials")
    assert r.rc == 3 and "no queue named \"emials\" (known: default, emails)" in r.err and "--create" in r.err
    assert "emials" not in run("queue", "list").out
    assert run("queue", "pause", "emails").rc == 0
    r = run("queue", "set-limit", "reports", "2", "--create")
    assert r.rc == 0 and "reports" in run("queue", "list").out


def test_a_read_command_on_a_missing_database_creates_nothing(run, tmp_path):
    typo = tmp_path / "qeue.db"
    for args in (["status"], ["list"], ["get", "x"], ["dlq", "list"], ["config", "show"], ["stats"],
                 ["worker", "status"]):
        r = run("--db", typo, *args)
        assert r.rc == 74 and r.err.count("\n") == 1 and "no database at" in r.err and "typo" in r.err, (args, r)
        assert not typo.exists()
    assert run("--db", typo, "enqueue", "--", "true").rc == 0 and typo.exists()


def test_a_second_worker_start_says_how_many_already_run(run, db):
    first = run("worker", "start", "-c", "2")
    try:
        assert first.rc == 0 and first.err == ""
        second = run("worker", "start")
        assert second.rc == 0
        assert "2 worker(s) already run on this database on this host; starting 1 more" in second.err
    finally:
        run("worker", "stop", "--force")


# --- 6. wait says why nothing happens -------------------------------------------------------------


def test_wait_warns_when_no_worker_can_run_the_job(run, db, workers):
    assert run("enqueue", "--id", "w", "--", "true").rc == 0
    r = run("wait", "w", "--timeout", "4")
    assert r.rc == 124
    assert "queuectl: warning: no worker is running on this database, so w will not start" in r.err
    assert run("queue", "pause", "default").rc == 0
    workers.start(1)
    r = run("wait", "w", "--timeout", "4")
    assert r.rc == 124 and "job w is in queue default, which is paused: `queuectl queue resume default`" in r.err
    assert run("queue", "resume", "default").rc == 0
    r = run("wait", "w", "--timeout", "20")
    assert r.rc == 0 and "warning" not in r.err


# --- 7. bulk retry --------------------------------------------------------------------------------


def test_dlq_retry_takes_several_ids_or_all(run, db, workers):
    for name in ("d1", "d2", "d3", "d4"):
        assert run("enqueue", "--id", name, "-r", "0", "--", "false").rc == 0
    assert run("worker", "start", "--burst").rc == 0
    r = run("dlq", "retry", "d1", "nosuch", "d2")
    assert r.rc == 3 and "no job with id \"nosuch\"" in r.err
    assert "job d1 moved back" in r.out and "job d2 moved back" in r.out
    assert run("dlq", "retry").rc == 2
    r = run("dlq", "retry", "--all", "-r")
    assert r.rc == 0 and "moved 2 dead job(s) back to pending with their attempts reset" in r.out
    assert {state_of(db, j) for j in ("d1", "d2", "d3", "d4")} == {"pending"}


# --- 8 and 9. one vocabulary; every field that is set ----------------------------------------------


def test_get_shows_every_field_set_and_names_runs_and_attempts_once(run, db):
    assert run("enqueue", "--id", "dep", "--", "true").rc == 0
    spec = {"id": "full", "command": "make report", "queue": "reports", "priority": 1, "unique_key": "rep-1",
            "webhook": "https://hooks.example.com/x", "env": {"A": "1"}, "after": ["dep"], "timeout": 90,
            "max_retries": 2}
    assert run("enqueue", json.dumps(spec)).rc == 0
    out = run("get", "full").out
    for label, value in (("queue", "reports"), ("priority", "high"), ("attempts", "0 of 3"),
                         ("timeout", "90s (the job's own)"), ("after", "dep (pending)"), ("unique_key", "rep-1"),
                         ("webhook", "https://hooks.example.com/x"), ("env", "A=1"), ("state", "waiting")):
        assert re.search(r"^%s +%s$" % (label, re.escape(value)), out, re.M), (label, out)
    assert "full" in run("list", "--utc").out and "0/3" in run("list").out


def test_logs_and_get_speak_of_runs(run, db, workers):
    assert run("config", "set", "backoff-base", "1").rc == 0
    assert run("enqueue", "--id", "r", "-r", "1", "--", "echo out; exit 3").rc == 0
    workers.start(1)
    wait_state(db, "r", "dead", 30)
    out = run("get", "r").out
    assert "attempts     2 of 2" in out and "\nruns:\nRUN" in out
    assert run("logs", "r", "--run", "1").out == "out\n" and run("logs", "r", "-a", "2").out == "out\n"
    assert "has no run 3" in run("logs", "r", "--run", "3").err


# --- 10. the smaller items ----------------------------------------------------------------------------


@pytest.mark.parametrize("args, code, words", [
    (["enqueue", "ls", "-la"], 2, "put it after --: queuectl enqueue ... -- ls -la"),
    (["purge", "--older-than", "-1d"], 2, "a duration cannot be negative"),
    (["config", "set", "backoff-base", "-2"], 2, "must be a number from 1 to 1000, got \"-2\""),
    (["config", "set", "job-timeout", "-1e3"], 2, "must be a duration from 0 to 366d, or none"),
    (["config", "set", "output-limit", "1T"], 2, "must be a size from 1K to 64M"),
    (["worker", "stop", "--timeout", "-5"], 2, "a duration cannot be negative"),
    (["dlq", "clear"], 2, "refusing to delete every dead job without confirmation: add --yes"),
    (["enqueue", '{"command": "x", "priority": 4}'], 2, "high, medium, low (or 1, 2, 3)"),
])
def test_smaller_mistakes_get_a_line_that_helps(run, db, args, code, words):
    assert run("enqueue", "--id", "seed", "--", "true").rc == 0
    r = run(*args)
    assert r.rc == code and "Traceback" not in r.err, r
    assert words in r.err.splitlines()[-1], r.err
    assert r.err.splitlines()[-1].startswith("queuectl: error:")


def test_smaller_things_that_now_work(run, db, tmp_path):
    assert run("enqueue", "--id", "seed", "--", "true").rc == 0
    assert run("worker", "stop", "--timeout", "2m").rc == 0  # (no workers: says so)
    assert run("dlq", "clear", "--yes").rc == 0
    assert "max-retries" in run("config").out and run("config", "list").out == run("config", "show").out
    for value, name in ((1, "high"), (2, "medium"), (3, "low"), ("1", "high"), ("3", "low")):  # the seed's form
        r = run("enqueue", json.dumps({"command": "true", "priority": value}))
        assert r.rc == 0 and json.loads(run("get", r.out.strip(), "--json").out)["priority"] == name
    gone = tmp_path / "gone"
    gone.mkdir()
    r = subprocess.run(program() + ["--db", str(db), "enqueue", "--", "true"], cwd=gone, capture_output=True,
                       text=True, preexec_fn=lambda: os.rmdir(gone), env=dict(os.environ, QUEUECTL_DB=str(db)))
    assert r.returncode == 2 and r.stderr.startswith("queuectl: error: the current directory was deleted")


def test_colour_follows_color_force_color_and_no_color(run, db):
    assert run("enqueue", "--id", "c", "--", "true").rc == 0
    red = "\x1b["
    assert red not in run("list").out  # piped: no colour
    assert red in run("--color", "always", "list").out
    assert red in run("list", "--color=always").out
    env = dict(os.environ, QUEUECTL_DB=str(db), FORCE_COLOR="1")
    assert red in run("list", env=env).out
    assert red not in run("list", "--color", "never", env=env).out


def test_completion_scripts_come_from_the_parser(run, tmp_path):
    script = tmp_path / "queuectl.bash"
    script.write_text(run("completion", "bash").out)
    probe = ('source %s; t(){ COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]}-1)); _queuectl; '
             'echo "${COMPREPLY[*]}"; }; t queuectl wo; t queuectl worker st; t queuectl list --state d; '
             't queuectl --db x.db dlq retry --a' % script)
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30).stdout.splitlines()
    assert out == ["worker", "start stop status", "dead", "--all"]
    for shell, check in (("zsh", ["zsh", "-n"]), ("fish", ["fish", "-n"])):
        text = run("completion", shell).out
        assert "worker" in text and "dlq" in text and "reset-attempts" in text
        if shutil.which(check[0]):
            path = tmp_path / ("completion." + shell)
            path.write_text(text)
            assert subprocess.run(check + [str(path)], capture_output=True, timeout=30).returncode == 0


# --- 7. re-run a finished job (pueue's restart) -------------------------------------------------------


def test_restart_queues_finished_jobs_again_keeping_their_history(run, db):
    assert run("enqueue", "--id", "once", "--", "echo run $QUEUECTL_ATTEMPT").rc == 0
    assert run("enqueue", "--id", "later", "--delay", "1h", "--", "true").rc == 0
    assert run("worker", "start", "--burst").rc == 0
    r = run("restart", "once", "later", "nosuch")
    assert r.rc == 4  # the first failure's code: `later` has not run (a conflict)
    assert r.out == "job once queued again, with its whole retry budget (its history is kept)\n"
    assert "job later is pending: only a completed, cancelled or dead job can be restarted" in r.err
    assert 'no job with id "nosuch"' in r.err
    assert run("worker", "start", "--burst").rc == 0
    assert run("logs", "once").out == "run 2\n" and run("logs", "once", "--run", "1").out == "run 1\n"
    assert run("rerun", "once").rc == 0 and state_of(db, "once") == "pending"


# --- 9. failed webhook deliveries are visible ---------------------------------------------------------


def test_a_failing_webhook_shows_in_get_and_in_the_workers_log(run, db, workers):
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = "http://hook:s3cret@127.0.0.1:%d/hook" % server.server_address[1]
        assert run("enqueue", "--id", "hooked", "--webhook", url, "--", "true").rc == 0
        workers.start(1)
        wait_state(db, "hooked", "completed")
        wait_until(lambda: " failing " in run("get", "hooked").out, 30, message="no failed delivery shown")
        out = run("get", "hooked").out
        assert re.search(r"^http://hook:\*\*\*@127\.0\.0\.1:\d+/hook +failing +1 +\S+ +HTTP 500$", out, re.M), out
        [d] = json.loads(run("get", "hooked", "--json").out)["webhook_deliveries"]
        assert (d["state"], d["attempts"], d["last_error"]) == ("failing", 1, "HTTP 500") and d["next_at"]
        wait_until(lambda: "webhook of job hooked to http://hook:***@127.0.0.1" in workers.log(), 10)
        assert "failed (attempt 1 of 8): HTTP 500; next try in 2s" in workers.log()
        assert "s3cret" not in workers.log()
    finally:
        server.shutdown()
        server.server_close()


def test_list_takes_several_states_and_a_queue(run, db):
    for i in range(3):
        assert run("enqueue", "--id", "r%d" % i, "-q", "reports", "--", "true").rc == 0
    assert run("enqueue", "--id", "bad", "-r", "0", "--", "false").rc == 0
    assert run("enqueue", "--id", "later", "--delay", "1h", "--", "true").rc == 0
    assert run("worker", "start", "--burst").rc == 0
    ids = lambda *args: [j["id"] for j in json.loads(run("list", "--json", *args).out)]  # noqa: E731
    assert ids("-s", "dead,completed") == ["r0", "r1", "r2", "bad"]
    assert ids("-s", "dead", "-s", "pending") == ["later", "bad"]  # (oldest update first)
    assert ids("--queue", "reports", "-s", "completed") == ["r0", "r1", "r2"]
    assert ids("--queue", "reports", "-s", "dead") == []
    assert ids("--queue", "default") == ["later", "bad"]
    assert ids("-s", "completed", "-l", "2") == ["r1", "r2"]  # the newest two, oldest first
    r = run("list", "--queue", "reprots")
    assert r.rc == 3 and "no queue named \"reprots\" (known: default, reports)" in r.err
