"""Hostile input: bad arguments to every command, through the real program.

Each row of ``ROWS`` is one bad input and the rule it must follow:

- the exit code in the row (2 bad input or usage, 3 not found, 4 conflict,
  74 unusable database);
- stderr is exactly one line ``queuectl: error: ...`` (an argparse usage
  error may print its usage lines first), with no control characters and no
  traceback; stdout is empty;
- the database is unchanged: every table (jobs, attempts, config, queues,
  schedules, ...) dumped before and after is identical.

Every row runs as a separate process on its own copy of one seeded database
(in a thread pool, so the table costs seconds, not minutes).  The in-process
CLI tests (tests/test_cli.py) check messages in detail; this table checks the
program as a user runs it, including argument parsing, encoding and exit
codes at the process boundary.
"""

import dataclasses
import json
import os
import re
import shutil
import sqlite3
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import conftest
from conftest import program

pytestmark = pytest.mark.e2e

ERROR = "queuectl: error: "
HUGE = "x" * 200_000  # more than a command may hold (128 KiB)
LONG_ID = "i" * 129  # one more than an id may hold
SQL = "x'; DROP TABLE jobs; --"
CONTROL = "\x1b[31mred\x1b[0m\x07"


@dataclasses.dataclass
class Bad:
    name: str
    argv: list
    code: int
    stdin: bytes = None
    words: tuple = ()  # the error line must contain each of these


def job(**fields):
    doc = {"command": "true"}
    doc.update(fields)
    return json.dumps(doc)


def lines(*docs):
    return ("".join(d + "\n" for d in docs)).encode()


ROWS = [
    # --- enqueue: the JSON document --------------------------------------------------------------
    Bad("json-truncated", ["enqueue", "{"], 2, words=("invalid JSON",)),
    Bad("json-missing-value", ["enqueue", '{"command":}'], 2),
    Bad("json-trailing-garbage", ["enqueue", '{"command":"true"} x'], 2),
    Bad("json-single-quotes", ["enqueue", "{'command':'true'}"], 2),
    Bad("json-empty-array", ["enqueue", "[]"], 2),
    Bad("json-string", ["enqueue", '"just a string"'], 2, words=("object",)),
    Bad("json-number", ["enqueue", "42"], 2, words=("object",)),
    Bad("json-null", ["enqueue", "null"], 2, words=("object",)),
    Bad("json-array-of-numbers", ["enqueue", "[1, 2]"], 2, words=("object",)),
    Bad("json-nested-array", ["enqueue", '[[{"command":"true"}]]'], 2),
    Bad("not-json-at-all", ["enqueue", "echo hello"], 2, words=("--",)),
    Bad("json-deep-nesting", ["enqueue", "[" * 100_000], 2, words=("invalid JSON",)),
    Bad("json-number-too-long", ["enqueue", '{"command":"true","max_retries":%s}' % ("9" * 5000)], 2,
        words=("invalid JSON",)),
    Bad("json-many-bad-jobs", ["enqueue", "-"], 2, stdin=lines(*[job(priority="urgent")] * 10_000)),
    Bad("command-missing", ["enqueue", "{}"], 2, words=("command",)),
    Bad("command-number", ["enqueue", '{"command": 5}'], 2, words=("command",)),
    Bad("command-list", ["enqueue", '{"command": ["ls", "-l"]}'], 2, words=("command",)),
    Bad("command-null", ["enqueue", '{"command": null}'], 2, words=("command",)),
    Bad("command-empty", ["enqueue", job(command="")], 2, words=("command",)),
    Bad("command-blank", ["enqueue", job(command=" \t\n ")], 2, words=("command",)),
    Bad("command-nul", ["enqueue", job(command="echo a\u0000b")], 2, words=("NUL",)),
    Bad("command-huge", ["enqueue", "-"], 2, stdin=lines(job(command=HUGE)), words=("command",)),
    Bad("unknown-field", ["enqueue", job(bogus=1)], 2, words=("bogus",)),
    Bad("unknown-field-sql", ["enqueue", json.dumps({"command": "true", SQL: 1})], 2),
    Bad("id-empty", ["enqueue", job(id="")], 2, words=("id",)),
    Bad("id-number", ["enqueue", job(id=5)], 2, words=("id",)),
    Bad("id-too-long", ["enqueue", job(id=LONG_ID)], 2, words=("id",)),
    Bad("id-huge", ["enqueue", "-"], 2, stdin=lines(job(id="i" * 100_000)), words=("id",)),
    Bad("id-space", ["enqueue", job(id="two words")], 2),
    Bad("id-slash", ["enqueue", job(id="../../etc/passwd")], 2),
    Bad("id-leading-dash", ["enqueue", job(id="-rf")], 2),
    Bad("id-unicode", ["enqueue", job(id="jöb")], 2),
    Bad("id-emoji", ["enqueue", job(id="job-\U0001F4A5")], 2),
    Bad("id-shell", ["enqueue", job(id="$(reboot)")], 2),
    Bad("id-sql", ["enqueue", job(id=SQL)], 2),
    Bad("id-newline", ["enqueue", job(id="a\nb")], 2),
    Bad("id-control", ["enqueue", job(id=CONTROL)], 2),
    Bad("id-duplicate", ["enqueue", job(id="p1")], 4, words=("p1", "already exists")),
    Bad("priority-unknown", ["enqueue", job(priority="urgent")], 2, words=("priority",)),
    Bad("priority-number", ["enqueue", job(priority=4)], 2, words=("priority",)),
    Bad("priority-unicode", ["enqueue", job(priority="hígh")], 2, words=("priority",)),
    Bad("timeout-negative", ["enqueue", job(timeout=-1)], 2, words=("timeout",)),
    Bad("timeout-absurd", ["enqueue", job(timeout=1e18)], 2, words=("timeout",)),
    Bad("timeout-infinite", ["enqueue", '{"command":"true","timeout":1e999}'], 2, words=("timeout",)),
    Bad("timeout-nan", ["enqueue", '{"command":"true","timeout":NaN}'], 2, words=("timeout",)),
    Bad("timeout-bool", ["enqueue", job(timeout=True)], 2, words=("timeout",)),
    Bad("retries-negative", ["enqueue", job(max_retries=-1)], 2, words=("max_retries",)),
    Bad("retries-fraction", ["enqueue", job(max_retries=1.5)], 2, words=("max_retries",)),
    Bad("retries-bool", ["enqueue", job(max_retries=True)], 2, words=("max_retries",)),
    Bad("retries-huge", ["enqueue", '{"command":"true","max_retries":99999999999999999999999}'], 2,
        words=("max_retries",)),
    Bad("retries-string", ["enqueue", job(max_retries="3")], 2, words=("max_retries",)),
    Bad("delay-negative", ["enqueue", job(delay=-5)], 2, words=("delay",)),
    Bad("delay-absurd", ["enqueue", job(delay=1e15)], 2, words=("delay",)),
    Bad("run-at-words", ["enqueue", job(run_at="tomorrow")], 2, words=("run_at",)),
    Bad("run-at-no-zone", ["enqueue", job(run_at="2030-01-01T00:00:00")], 2, words=("run_at",)),
    Bad("run-at-impossible", ["enqueue", job(run_at="2030-13-45T99:00:00Z")], 2, words=("run_at",)),
    Bad("run-at-number", ["enqueue", job(run_at=1700000000)], 2, words=("run_at",)),
    Bad("run-at-and-delay", ["enqueue", job(run_at="2030-01-01T00:00:00Z", delay=5)], 2),
    Bad("env-bad-name", ["enqueue", job(env={"A B": "x"})], 2, words=("env",)),
    Bad("env-number-value", ["enqueue", job(env={"A": 1})], 2, words=("env",)),
    Bad("env-list", ["enqueue", job(env=["A=1"])], 2, words=("env",)),
    Bad("env-nul", ["enqueue", job(env={"A": "x\u0000y"})], 2, words=("env",)),
    Bad("cwd-empty", ["enqueue", job(cwd="")], 2, words=("cwd",)),
    Bad("cwd-number", ["enqueue", job(cwd=5)], 2, words=("cwd",)),
    Bad("queue-bad-name", ["enqueue", job(queue="bad queue")], 2, words=("queue",)),
    Bad("webhook-not-http", ["enqueue", job(webhook="ftp://example.com/x")], 2, words=("webhook",)),
    Bad("unique-key-empty", ["enqueue", job(unique_key="")], 2, words=("unique_key",)),
    Bad("after-bad-id", ["enqueue", job(after=[SQL])], 2, words=("after",)),
    Bad("after-not-list", ["enqueue", job(after={"a": 1})], 2, words=("after",)),
    # --- enqueue: batches, files and stdin: all or nothing -----------------------------------------
    Bad("batch-one-bad-line", ["enqueue", "-"], 2, stdin=lines(job(id="ok1"), job(command=5)), words=("line 2",)),
    Bad("batch-malformed-line", ["enqueue", "-"], 2, stdin=lines(job(id="ok1"), "{nope"), words=("line 2",)),
    Bad("batch-duplicate-inside", ["enqueue", "-"], 4, stdin=lines(job(id="twice"), job(id="twice")),
        words=("twice",)),
    Bad("batch-duplicate-existing", ["enqueue", "-"], 4, stdin=lines(job(id="new1"), job(id="p1")), words=("p1",)),
    Bad("stdin-empty", ["enqueue", "-"], 2, stdin=b""),
    Bad("stdin-blank-lines", ["enqueue", "-"], 2, stdin=b"\n\n  \n"),
    Bad("stdin-not-utf8", ["enqueue", "-"], 2, stdin=b'{"command":"\xff\xfe"}\n', words=("UTF-8",)),
    Bad("stdin-binary", ["enqueue", "-"], 2, stdin=os.urandom(4096).replace(b"\n", b"")),
    Bad("file-missing", ["enqueue", "@/no/such/file.json"], 2, words=("/no/such/file.json",)),
    Bad("file-is-directory", ["enqueue", "@/"], 2),
    # --- enqueue: options -------------------------------------------------------------------------
    Bad("nothing-to-enqueue", ["enqueue"], 2),
    Bad("json-and-command", ["enqueue", job(), "--", "echo", "hi"], 2),
    Bad("dash-dash-nothing", ["enqueue", "--"], 2),
    Bad("opt-priority", ["enqueue", "-p", "urgent", "--", "true"], 2),
    Bad("opt-timeout-word", ["enqueue", "-t", "abc", "--", "true"], 2),
    Bad("opt-timeout-negative", ["enqueue", "-t", "-5", "--", "true"], 2),
    Bad("opt-retries-negative", ["enqueue", "-r", "-1", "--", "true"], 2),
    Bad("opt-retries-word", ["enqueue", "-r", "x", "--", "true"], 2),
    Bad("opt-delay-negative", ["enqueue", "--delay", "-1", "--", "true"], 2),
    Bad("opt-run-at", ["enqueue", "--run-at", "yesterday", "--", "true"], 2),
    Bad("opt-env-no-equals", ["enqueue", "-e", "NOEQUALS", "--", "true"], 2, words=("NAME=VALUE",)),
    Bad("opt-env-bad-name", ["enqueue", "-e", "1BAD=x", "--", "true"], 2),
    Bad("opt-id-traversal", ["enqueue", "--id", "../../etc", "--", "true"], 2),
    Bad("opt-id-duplicate", ["enqueue", "--id", "p1", "--", "true"], 4, words=("p1",)),
    Bad("opt-id-for-a-batch", ["enqueue", "--id", "one", "-"], 2, stdin=lines(job(), job())),
    Bad("opt-webhook", ["enqueue", "--webhook", "not a url", "--", "true"], 2),
    Bad("opt-unknown", ["enqueue", "--bogus", "--", "true"], 2),
    # --- worker -----------------------------------------------------------------------------------
    Bad("worker-count-zero", ["worker", "start", "-c", "0"], 2),
    Bad("worker-count-negative", ["worker", "start", "-c", "-3"], 2),
    Bad("worker-count-absurd", ["worker", "start", "-c", "100000"], 2),
    Bad("worker-count-word", ["worker", "start", "-c", "x"], 2),
    Bad("worker-count-5000-digits", ["worker", "start", "-c", "7" * 5000], 2),
    Bad("worker-queue-bad", ["worker", "start", "--burst", "-q", "bad queue"], 2),
    Bad("worker-stop-timeout-word", ["worker", "stop", "--timeout", "abc"], 2),
    Bad("worker-unknown-action", ["worker", "frobnicate"], 2),
    Bad("worker-no-action", ["worker"], 2),
    Bad("worker-status-extra", ["worker", "status", "extra"], 2),
    # --- status, list, get, logs ------------------------------------------------------------------------
    Bad("status-unknown-flag", ["status", "--bogus"], 2),
    Bad("list-state-unknown", ["list", "--state", "nonsense"], 2),
    Bad("list-state-sql", ["list", "--state", "pending' OR '1'='1"], 2),
    Bad("list-limit-zero", ["list", "--limit", "0"], 2),
    Bad("list-limit-negative", ["list", "--limit", "-1"], 2),
    Bad("list-limit-absurd", ["list", "--limit", "99999999999999999999"], 2),
    Bad("list-limit-word", ["list", "--limit", "abc"], 2),
    Bad("get-unknown", ["get", "nosuch"], 3, words=("nosuch",)),
    Bad("get-sql", ["get", SQL], 3),
    Bad("get-huge-id", ["get", "g" * 100_000], 3),
    Bad("get-unicode", ["get", "jöb-✓"], 3),
    Bad("get-control-chars", ["get", CONTROL], 3),
    Bad("get-newline", ["get", "line1\nline2"], 3),
    Bad("get-missing-id", ["get"], 2),
    Bad("logs-unknown", ["logs", "nosuch"], 3),
    Bad("logs-attempt-zero", ["logs", "c1", "--attempt", "0"], 2),
    Bad("logs-attempt-negative", ["logs", "c1", "--attempt", "-1"], 2),
    Bad("logs-attempt-word", ["logs", "c1", "--attempt", "x"], 2),
    Bad("logs-attempt-missing", ["logs", "c1", "--attempt", "99"], 3, words=("99",)),
    # --- dlq ------------------------------------------------------------------------------------------------
    Bad("dlq-retry-unknown", ["dlq", "retry", "nosuch"], 3),
    Bad("dlq-retry-pending", ["dlq", "retry", "p1"], 4, words=("p1",)),
    Bad("dlq-retry-completed", ["dlq", "retry", "c1"], 4, words=("c1",)),
    Bad("dlq-retry-bad-id", ["dlq", "retry", "bad id!"], 2),
    Bad("dlq-retry-sql", ["dlq", "retry", SQL], 2),
    Bad("dlq-list-limit", ["dlq", "list", "--limit", "0"], 2),
    Bad("dlq-unknown-action", ["dlq", "nuke"], 2),
    Bad("dlq-no-action", ["dlq"], 2),
    # --- config ----------------------------------------------------------------------------------------------
    Bad("config-unknown-key", ["config", "set", "nosuchkey", "1"], 2, words=("nosuchkey",)),
    Bad("config-key-sql", ["config", "set", "max-retries'; DROP TABLE config; --", "1"], 2),
    Bad("config-retries-negative", ["config", "set", "max-retries", "-1"], 2),
    Bad("config-retries-word", ["config", "set", "max-retries", "abc"], 2),
    Bad("config-retries-fraction", ["config", "set", "max-retries", "1.5"], 2),
    Bad("config-retries-absurd", ["config", "set", "max-retries", "99999999999"], 2),
    Bad("config-retries-5000-digits", ["config", "set", "max-retries", "9" * 5000], 2),
    Bad("config-backoff-zero", ["config", "set", "backoff-base", "0"], 2),
    Bad("config-backoff-nan", ["config", "set", "backoff-base", "nan"], 2),
    Bad("config-backoff-inf", ["config", "set", "backoff-base", "inf"], 2),
    Bad("config-timeout-negative", ["config", "set", "job-timeout", "-1"], 2),
    Bad("config-lease-zero", ["config", "set", "lease-seconds", "0"], 2),
    Bad("config-output-tiny", ["config", "set", "output-limit", "10"], 2),
    Bad("config-grace-absurd", ["config", "set", "kill-grace", "1e308"], 2),
    Bad("config-webhook", ["config", "set", "webhook-url", "javascript:alert(1)"], 2),
    Bad("config-get-unknown", ["config", "get", "nosuchkey"], 2),
    Bad("config-set-missing", ["config", "set"], 2),
    Bad("config-set-no-value", ["config", "set", "max-retries"], 2),
    # --- clear, cancel, wait, purge ----------------------------------------------------------------------
    Bad("clear-without-yes", ["clear"], 2, words=("--yes",)),
    Bad("clear-state-unknown", ["clear", "--state", "nonsense"], 2),
    Bad("clear-processing", ["clear", "--state", "processing"], 4),
    Bad("cancel-unknown", ["cancel", "nosuch"], 3),
    Bad("cancel-completed", ["cancel", "c1"], 4, words=("c1",)),
    Bad("cancel-missing-id", ["cancel"], 2),
    Bad("wait-unknown", ["wait", "nosuch"], 3),
    Bad("wait-timeout-negative", ["wait", "p1", "--timeout", "-1"], 2),
    Bad("wait-timeout-word", ["wait", "p1", "--timeout", "abc"], 2),
    Bad("purge-no-age", ["purge"], 2),
    Bad("purge-age-negative", ["purge", "--older-than", "-5"], 2),
    Bad("purge-age-word", ["purge", "--older-than", "forever"], 2),
    Bad("purge-state-pending", ["purge", "--older-than", "1d", "--state", "pending"], 2),
    # --- queue, schedule -------------------------------------------------------------------------------------
    Bad("queue-limit-bad-name", ["queue", "set-limit", "bad name", "3"], 2),
    Bad("queue-limit-negative", ["queue", "set-limit", "q1", "-1"], 2),
    Bad("queue-limit-word", ["queue", "set-limit", "q1", "abc"], 2),
    Bad("queue-pause-sql", ["queue", "pause", SQL], 2),
    Bad("queue-unknown-action", ["queue", "drop"], 2),
    Bad("schedule-cron-words", ["schedule", "add", "n2", "not a cron", "--", "true"], 2),
    Bad("schedule-cron-out-of-range", ["schedule", "add", "n2", "61 * * * *", "--", "true"], 2),
    Bad("schedule-bad-name", ["schedule", "add", "bad name", "0 3 * * *", "--", "true"], 2),
    Bad("schedule-bad-zone", ["schedule", "add", "n2", "0 3 * * *", "--tz", "Mars/Olympus", "--", "true"], 2),
    Bad("schedule-no-command", ["schedule", "add", "n2", "0 3 * * *"], 2),
    Bad("schedule-duplicate", ["schedule", "add", "nightly", "0 4 * * *", "--", "true"], 4),
    Bad("schedule-remove-unknown", ["schedule", "remove", "nosuch"], 3),
    Bad("schedule-pause-unknown", ["schedule", "pause", "nosuch"], 3),
    # --- dashboard / up arguments (the HTTP side is tested with the dashboard) -------------------------
    Bad("dashboard-port-range", ["dashboard", "--port", "70000"], 2),
    Bad("dashboard-port-word", ["dashboard", "--port", "abc"], 2),
    Bad("up-count-zero", ["up", "-c", "0"], 2),
    # --- stats, metrics -----------------------------------------------------------------------------------------
    Bad("stats-since-word", ["stats", "--since", "abc"], 2),
    Bad("stats-since-negative", ["stats", "--since", "-1h"], 2),
    Bad("stats-since-sql", ["stats", "--since", SQL], 2),
    Bad("stats-unknown-flag", ["stats", "--bogus"], 2),
    Bad("metrics-extra-argument", ["metrics", "extra"], 2),
    Bad("completion-unknown-shell", ["completion", "tcsh"], 2),
    Bad("completion-no-shell", ["completion"], 2),
    Bad("top-not-a-terminal", ["top"], 2),
    Bad("restart-pending", ["restart", "p1"], 4, words=("p1",)),
    Bad("restart-unknown", ["rerun", "nosuch"], 3),
    Bad("restart-no-id", ["restart"], 2),
    # --- global -------------------------------------------------------------------------------------------------
    Bad("unknown-command", ["frobnicate"], 2),
    Bad("no-command", [], 2),
    Bad("dash-dash-on-list", ["list", "--", "x"], 2),
    Bad("argv-not-utf8-id", ["get", b"job-\xff\xfe"], 2, words=("UTF-8",)),
    Bad("argv-not-utf8-command", ["enqueue", "--", b"echo \xff"], 2, words=("UTF-8",)),
    Bad("argv-not-utf8-db", ["--db", b"/tmp/q-\xff.db", "status"], 2, words=("UTF-8",)),
    Bad("db-missing-directory", ["--db", "/no/such/dir/q.db", "status"], 74, words=("/no/such/dir",)),
    Bad("db-is-directory", ["--db", "{tmp}", "status"], 74, words=("directory",)),
    Bad("db-is-garbage", ["--db", "{tmp}/garbage.bin", "status"], 74, words=("not a",)),
    Bad("db-is-foreign-sqlite", ["--db", "{tmp}/foreign.db", "enqueue", "--", "true"], 74, words=("not a queuectl",)),
]


def dump(path):
    conn = sqlite3.connect("file:%s?mode=ro" % path, uri=True, timeout=30)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: sorted(map(repr, conn.execute("SELECT * FROM %s" % t))) for t in tables}
    finally:
        conn.close()


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A database with a pending, a completed and a dead job, a queue and a schedule, made by the program."""
    d = tmp_path_factory.mktemp("template")
    db = d / "q.db"
    env = conftest.program_env(db)

    def run(*args):
        r = subprocess.run(program() + list(args), capture_output=True, env=env, cwd=str(d), timeout=60,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, (args, r.stderr)

    run("enqueue", job(id="p1"))
    run("config", "set", "max-retries", "2")
    run("queue", "set-limit", "q1", "2", "--create")
    run("schedule", "add", "nightly", "0 3 * * *", "--", "true")
    import queuectl

    store = queuectl.SqliteStore(str(db))
    try:
        for jid, state in (("c1", "completed"), ("d1", "dead")):
            now = time.time()
            store.enqueue([queuectl.validate_job({"id": jid, "command": "true", "priority": "high",
                                                  "max_retries": 0}, store.config(), now)], now)
            claimed = store.claim("w-seed", "seed-host", now + 1, 30)
            assert claimed.id == jid
            store.finish(jid, claimed.runs, "w-seed", state, now + 1, "completed" if state == "completed" else "failed",
                         0 if state == "completed" else 1, output="seeded output\n")
    finally:
        store.close()
    for p in d.glob("q.db-*"):  # closed cleanly: one file to copy
        p.unlink()
    return db


def run_row(row, template, base):
    d = base / row.name
    d.mkdir()
    db = d / "q.db"
    shutil.copy(template, db)
    (d / "garbage.bin").write_bytes(b"not a database at all\n" * 1000)
    foreign = sqlite3.connect(str(d / "foreign.db"))
    foreign.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    foreign.commit()
    foreign.close()
    before = dump(db)
    argv = [a.replace("{tmp}", str(d)) if isinstance(a, str) else a for a in row.argv]  # bytes: not UTF-8
    t0 = time.monotonic()
    proc = subprocess.run(program() + argv, input=row.stdin, capture_output=True, env=conftest.program_env(db),
                          cwd=str(d), timeout=60, stdin=None if row.stdin is not None else subprocess.DEVNULL)
    took = time.monotonic() - t0
    after = dump(db)
    return proc, before, after, took


@pytest.fixture(scope="module")
def results(template, tmp_path_factory):
    base = tmp_path_factory.mktemp("rows")
    with ThreadPoolExecutor(max(4, min(16, (os.cpu_count() or 2) * 4))) as pool:
        futures = {row.name: pool.submit(run_row, row, template, base) for row in ROWS}
        return {name: f.result() for name, f in futures.items()}


def test_the_table_is_big_and_covers_every_command():
    names = [r.name for r in ROWS]
    assert len(names) == len(set(names))
    assert len(ROWS) >= 80
    import queuectl

    parser = queuectl.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    covered = {next((a for a in r.argv if a in commands), None) for r in ROWS}
    missing = set(commands) - covered
    assert not missing, "commands without a hostile row: %s" % sorted(missing)


CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_input(row, results):
    proc, before, after, took = results[row.name]
    out = proc.stdout.decode("utf-8", "replace")
    err = proc.stderr.decode("utf-8", "replace")
    assert "Traceback" not in out + err, err
    assert proc.returncode == row.code, "exit %d, wanted %d: %s" % (proc.returncode, row.code, err)
    assert out == "", "stdout must be empty on an error: %r" % out[:300]
    err_lines = err.splitlines()
    if err_lines and err_lines[0].startswith("usage:"):  # argparse: usage (maybe wrapped), then the error
        i = 1
        while i < len(err_lines) and err_lines[i].startswith(" "):
            i += 1
        err_lines = err_lines[i:]
    assert len(err_lines) == 1 and err_lines[0].startswith(ERROR), "want one error line, got: %r" % err[:500]
    assert err.endswith("\n") and not CONTROL_CHARS.search(err), "control characters on stderr: %r" % err[:300]
    assert len(err_lines[0]) < 1000, "error line of %d characters" % len(err_lines[0])
    for w in row.words:
        assert w in err_lines[0], (w, err_lines[0])
    assert after == before, "the database changed"
    assert took < 30
