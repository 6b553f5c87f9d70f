"""In-process CLI tests: ``queuectl.main(argv)`` through the ``cli`` fixture.

Every command of the seed README and of the additions, a table of bad inputs
(each must exit with the right code, print one error line, never a traceback,
and leave the database as it was), and unusable databases.  Runs of jobs are
simulated through the store (claim/finish) with explicit times: nothing here
waits.
"""

import json
import os
import re
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

import queuectl
from conftest import ROOT, db_rows, states

ERROR_PREFIX = "queuectl: error:"
SEED_STATES = ["pending", "processing", "completed", "failed", "dead"]


def zero_counts(**counts):
    """Expected job counts: every state (including any a later issue adds) 0 unless given."""
    return dict({s: 0 for s in queuectl.STATES}, **counts)


def ok(result):
    assert result.rc == 0, result
    assert "Traceback" not in result.out + result.err
    return result


def assert_one_error_line(result, code, allow_usage=False):
    """stderr is one ``queuectl: error:`` line; with ``allow_usage`` argparse's usage may come first."""
    text = result.out + result.err
    assert "Traceback" not in text, text
    assert result.rc == code, result
    lines = result.err.splitlines()
    if allow_usage and lines and lines[0].startswith("usage:"):
        i = 1
        while i < len(lines) and lines[i].startswith(" "):  # a long usage wraps onto indented lines
            i += 1
        lines = lines[i:]
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), result.err


def enqueue(cli, doc=None, *flags):
    args = ["enqueue", *flags] + ([json.dumps(doc) if isinstance(doc, dict) else doc] if doc is not None else [])
    result = ok(cli(*args))
    return result.lines


def get_json(cli, job_id):
    return json.loads(ok(cli("get", job_id, "--json")).out)


def run_job(store, job_id, outcome="completed", output="", exit_code=None, error=None):
    """Play a worker: claim (it must be ``job_id``) and finish it."""
    now = time.time() + 1
    job = store.claim("w-test", "test-host", now, 30.0)
    assert job is not None and job.id == job_id, job
    if outcome == "completed":
        state, retry_at = "completed", None
    else:
        state, retry_at = queuectl.after_failure(job, store.config(), now)
    assert store.finish(job.id, job.runs, "w-test", state, now, outcome,
                        0 if outcome == "completed" else (exit_code if exit_code is not None else 1),
                        error, output=output, output_bytes=len(output.encode()), retry_at=retry_at)
    return state


def make_dead(cli, store, job_id, max_retries=0, output=""):
    enqueue(cli, {"id": job_id, "command": "false", "max_retries": max_retries, "priority": "high"})
    for _ in range(max_retries + 1):
        if run_job(store, job_id, "failed", output=output) is queuectl.JobState.DEAD:
            return
        # the retry is due later: make it due now so the next claim takes it
        conn = sqlite3.connect(str(store.path))
        conn.execute("UPDATE jobs SET run_at = 0 WHERE id = ?", (job_id,))
        conn.commit()
        conn.close()
    raise AssertionError("job %s is not dead after max_retries + 1 = %d failed runs" % (job_id, max_retries + 1))


###############################################################################
# enqueue
###############################################################################


def test_enqueue_json_prints_the_id(cli, db):
    result = ok(cli("enqueue", '{"id":"hello-world","command":"echo Hello, QueueCTL!"}'))
    assert result.out == "hello-world\n"
    assert result.err == ""
    job = get_json(cli, "hello-world")
    assert (job["command"], job["state"], job["priority"], job["max_retries"], job["attempts"]) == (
        "echo Hello, QueueCTL!", "pending", "medium", 3, 0)
    assert job["cwd"] == str(db.parent)


def test_enqueue_without_id_prints_a_generated_one(cli, db):
    (job_id,) = enqueue(cli, {"command": "true"})
    assert queuectl.ID_RE.match(job_id)
    assert states(db) == {job_id: "pending"}


@pytest.mark.parametrize("p, t", [("-p", "-t"), ("--priority", "--timeout")])
def test_enqueue_priority_and_timeout_options_override_the_json(cli, p, t):
    enqueue(cli, {"id": "j", "command": "x", "priority": "low", "timeout": 30}, p, "high", t, "7.5")
    job = get_json(cli, "j")
    assert (job["priority"], job["timeout"]) == ("high", 7.5)


def test_enqueue_seed_examples(cli):
    enqueue(cli, '{"id":"urgent","command":"echo URGENT"}', "-p", "high")
    enqueue(cli, '{"id":"long-job","command":"sleep 60","timeout":30}')
    enqueue(cli, '{"id":"retry-job","command":"exit 1","max_retries":5}')
    assert get_json(cli, "urgent")["priority"] == "high"
    assert get_json(cli, "long-job")["timeout"] == 30.0
    assert get_json(cli, "retry-job")["max_retries"] == 5


def test_enqueue_other_options(cli, tmp_path):
    enqueue(cli, None, "--id", "opt", "-r", "0", "--delay", "3600", "--cwd", "sub", "-e", "A=1", "--env", "B=x=y",
            "--", "true")
    job = get_json(cli, "opt")
    assert (job["max_retries"], job["cwd"], job["env"]) == (0, str(tmp_path / "sub"), {"A": "1", "B": "x=y"})
    assert queuectl.parse_rfc3339(job["run_at"]) > time.time() + 3000
    enqueue(cli, None, "--id", "at", "--run-at", "2030-01-31T09:00:00Z", "--", "true")
    assert get_json(cli, "at")["run_at"] == "2030-01-31T09:00:00.000Z"


@pytest.mark.parametrize("words, command", [
    (["echo a && echo b > out.txt"], "echo a && echo b > out.txt"),  # one word: a shell string, verbatim
    (["tar czf /backup/etc.tgz /etc"], "tar czf /backup/etc.tgz /etc"),
    (["echo", "a b", "$HOME", "it's"], "echo 'a b' '$HOME' 'it'\"'\"'s'"),  # several: shlex-joined
    (["tar", "czf", "/backup/etc.tgz", "/etc"], "tar czf /backup/etc.tgz /etc"),
    (["ls", "-l", "--", "-p"], "ls -l -- -p"),  # words after -- never reach the parser
])
def test_enqueue_command_after_double_dash(cli, words, command):
    (job_id,) = enqueue(cli, None, "-p", "high", "--", *words)
    job = get_json(cli, job_id)
    assert (job["command"], job["priority"]) == (command, "high")


@pytest.mark.parametrize("name, content", [
    ("job.json", '{"id": "f1", "command": "echo one"}'),
    ("jobs.json", '[{"id": "f1", "command": "echo one"}, {"id": "f2", "command": "echo two"},\n'
                  ' {"id": "f3", "command": "echo three", "priority": "high"}]'),
    ("jobs.jsonl", '{"id": "f1", "command": "echo one"}\n{"id": "f2", "command": "echo two"}\n\n'
                   '{"id": "f3", "command": "echo three", "priority": "high"}\n'),
])
def test_enqueue_from_a_file(cli, db, tmp_path, name, content):
    (tmp_path / name).write_text(content)
    result = ok(cli("enqueue", "@" + name))
    expected = ["f1"] if name == "job.json" else ["f1", "f2", "f3"]
    assert result.lines == expected
    assert states(db) == {i: "pending" for i in expected}


def test_enqueue_file_options_apply_to_every_job(cli, tmp_path):
    (tmp_path / "jobs.json").write_text('[{"id": "a", "command": "x"}, {"id": "b", "command": "y", "timeout": 9}]')
    ok(cli("enqueue", "-p", "low", "-t", "5", "@jobs.json"))
    assert [(j["priority"], j["timeout"]) for j in (get_json(cli, "a"), get_json(cli, "b"))] == [("low", 5.0), ("low", 5.0)]


def test_enqueue_json_lines_on_stdin(cli, db):
    lines = "".join(json.dumps({"id": "s%d" % i, "command": "echo %d" % i}) + "\n" for i in range(1, 6))
    result = ok(cli("enqueue", "-", stdin=lines))
    assert result.lines == ["s1", "s2", "s3", "s4", "s5"]
    assert states(db) == {"s%d" % i: "pending" for i in range(1, 6)}


def test_enqueue_stdin_without_ids_prints_one_id_per_job(cli, db):
    result = ok(cli("enqueue", "-", stdin='{"command":"true"}\n{"command":"false"}\n'))
    assert len(result.lines) == 2 and len(set(result.lines)) == 2
    assert set(states(db)) == set(result.lines)


def test_enqueue_stdin_is_all_or_nothing_on_invalid_json(cli, db):
    stdin = '{"id":"a","command":"x"}\n{"id":"b","command":"y"}\n{"id":"c","command":\n{"id":"d","command":"z"}\n'
    result = cli("enqueue", "-", stdin=stdin)
    assert_one_error_line(result, 2)
    assert "line 3" in result.err
    assert result.out == ""
    assert db_rows(db, "SELECT count(*) FROM jobs") == [(0,)]


def test_enqueue_stdin_is_all_or_nothing_on_an_invalid_job(cli, db):
    stdin = '{"id":"a","command":"x"}\n{"id":"b","command":"y","priority":"urgent"}\n'
    result = cli("enqueue", "-", stdin=stdin)
    assert_one_error_line(result, 2)
    assert "priority" in result.err
    assert db_rows(db, "SELECT count(*) FROM jobs") == [(0,)]


def test_enqueue_stdin_error_names_the_line_of_an_invalid_job(cli, db):
    """With blank lines the n-th job is not on line n: the user needs the line."""
    stdin = '{"id":"a","command":"x"}\n\n{"id":"b","command":""}\n'
    result = cli("enqueue", "-", stdin=stdin)
    assert_one_error_line(result, 2)
    assert "line 3" in result.err, result.err
    assert db_rows(db, "SELECT count(*) FROM jobs") == [(0,)]


def test_enqueue_stdin_duplicate_of_an_existing_job_inserts_nothing(cli, db):
    enqueue(cli, {"id": "old", "command": "x"})
    result = cli("enqueue", "-", stdin='{"id":"new","command":"x"}\n{"id":"old","command":"y"}\n')
    assert_one_error_line(result, 4)
    assert "old" in result.err
    assert states(db) == {"old": "pending"}


###############################################################################
# status, list, get, logs
###############################################################################


def test_status(cli, db, store):
    enqueue(cli, {"id": "a", "command": "x", "priority": "high"})
    enqueue(cli, {"id": "b", "command": "x"})
    run_job(store, "a")
    result = ok(cli("status"))
    assert str(db) in result.out
    counts = {line.split()[0]: int(line.split()[1]) for line in result.lines if line.startswith("  ")}
    assert counts == zero_counts(pending=1, completed=1)
    assert list(counts)[:5] == SEED_STATES
    assert "2 total" in result.out


def test_status_json_is_one_document(cli, db, store):
    enqueue(cli, {"id": "a", "command": "x"})
    result = ok(cli("status", "--json"))
    doc = json.loads(result.out)  # the whole of stdout is one JSON document
    assert doc["job_counts"] == zero_counts(pending=1)
    assert doc["db"] == str(db)
    assert doc["version"] == queuectl.__version__
    assert result.err == ""


def test_list_filters_limits_and_json(cli, store):
    for i in range(1, 5):
        enqueue(cli, {"id": "j%d" % i, "command": "echo %d" % i, "priority": "high" if i == 1 else "low"})
    run_job(store, "j1")
    result = ok(cli("list"))
    assert result.lines[0].split()[:3] == ["ID", "STATE", "PRIORITY"]
    assert [line.split()[0] for line in result.lines[1:]] == ["j2", "j3", "j4", "j1"]  # updated last, last
    for flag in ("-s", "--state"):
        assert [line.split()[0] for line in ok(cli("list", flag, "pending")).lines[1:]] == ["j2", "j3", "j4"]
        assert [line.split()[:2] for line in ok(cli("list", flag, "completed")).lines[1:]] == [["j1", "completed"]]
    for flag in ("-l", "--limit"):
        assert [line.split()[0] for line in ok(cli("list", flag, "2")).lines[1:]] == ["j4", "j1"]
    docs = json.loads(ok(cli("list", "--state", "pending", "--limit", "2", "--json")).out)
    assert [(d["id"], d["state"], d["command"]) for d in docs] == [("j3", "pending", "echo 3"), ("j4", "pending", "echo 4")]
    assert ok(cli("list", "-s", "dead")).out == "no dead jobs\n"
    assert json.loads(ok(cli("list", "-s", "dead", "--json")).out) == []


def test_get_shows_the_job_and_its_attempts(cli, store):
    enqueue(cli, {"id": "g", "command": "exit 3", "max_retries": 1})
    run_job(store, "g", "failed", exit_code=3, error="exit code 3")
    result = ok(cli("get", "g"))
    for expected in (["id", "g"], ["command", "exit", "3"], ["state", "failed"], ["priority", "medium"]):
        assert expected in [line.split() for line in result.lines], result.out
    assert "runs:" in result.out and "timeout      300s, from job-timeout" in result.out
    assert "exit code 3" in result.out
    doc = get_json(cli, "g")
    assert (doc["id"], doc["state"], doc["attempts"], doc["exit_code"], doc["last_error"]) == ("g", "failed", 1, 3, "exit code 3")
    (attempt,) = doc["attempt_history"]
    assert (attempt["n"], attempt["outcome"], attempt["exit_code"], attempt["worker_id"]) == (1, "failed", 3, "w-test")


def test_get_json_of_a_job_that_never_ran(cli):
    enqueue(cli, {"id": "fresh", "command": "true"})
    doc = get_json(cli, "fresh")
    assert doc["attempt_history"] == [] and doc["state"] == "pending"


def test_logs(cli, store):
    enqueue(cli, {"id": "l", "command": "echo hi", "max_retries": 2})
    result = ok(cli("logs", "l"))
    assert result.out == "" and "not run yet" in result.err
    run_job(store, "l", "failed", output="first run\n")
    conn = sqlite3.connect(store.path)
    conn.execute("UPDATE jobs SET run_at = 0 WHERE id = 'l'")
    conn.commit()
    conn.close()
    run_job(store, "l", "completed", output="second run: héllo\n")
    assert ok(cli("logs", "l")).out == "second run: héllo\n"
    assert ok(cli("logs", "l", "--attempt", "1")).out == "first run\n"
    assert ok(cli("logs", "l", "-a", "2")).out == "second run: héllo\n"
    result = cli("logs", "l", "--attempt", "3")
    assert_one_error_line(result, 3)
    assert result.out == ""


###############################################################################
# dead letter queue
###############################################################################


def test_dlq_list_retry_and_clear(cli, db, store):
    make_dead(cli, store, "d1", max_retries=1)
    make_dead(cli, store, "d2")
    make_dead(cli, store, "d3")
    enqueue(cli, {"id": "alive", "command": "true"})
    assert [line.split()[:2] for line in ok(cli("dlq", "list")).lines[1:]] == [["d1", "dead"], ["d2", "dead"],
                                                                              ["d3", "dead"]]
    assert [d["id"] for d in json.loads(ok(cli("dlq", "list", "--json")).out)] == ["d1", "d2", "d3"]
    assert [d["id"] for d in json.loads(ok(cli("dlq", "list", "-l", "1", "--json")).out)] == ["d3"]

    result = ok(cli("dlq", "retry", "d1"))
    assert "d1" in result.out
    assert get_json(cli, "d1")["state"] == "pending"
    assert run_job(store, "d1", "failed") is queuectl.JobState.DEAD  # exactly one more run

    result = ok(cli("dlq", "retry", "d1", "--reset-attempts"))
    assert "d1" in result.out
    assert get_json(cli, "d1")["attempts"] == 0
    assert run_job(store, "d1", "failed") is queuectl.JobState.FAILED  # the whole budget again

    ok(cli("dlq", "retry", "d2", "-r"))
    assert (get_json(cli, "d2")["state"], get_json(cli, "d2")["attempts"]) == ("pending", 0)

    assert_one_error_line(cli("dlq", "clear"), 2)  # (asks first, like clear; a script says --yes)
    result = ok(cli("dlq", "clear", "--yes"))
    assert "1" in result.out
    assert states(db) == {"d1": "failed", "d2": "pending", "alive": "pending"}
    assert ok(cli("dlq", "list")).out == "no dead jobs\n"


###############################################################################
# config
###############################################################################


def config_rows(db):
    return db_rows(db, "SELECT key, value FROM config ORDER BY key")


def shown(setting):
    """A setting's default as `config show` prints it."""
    return setting.show(setting.default)


@pytest.mark.parametrize("name, value, show", [
    ("job-timeout", "300", "300s"), ("job-timeout", "0", "none"), ("job-timeout", "none", "none"),
    ("job-timeout", "2h", "2h"), ("retention", "forever", "forever"), ("retention", "7d", "7d"),
    ("retention", "90m", "5400s"), ("output-limit", "1M", "1M"), ("output-limit", "64k", "64K"),
    ("output-limit", "65536", "64K"), ("output-limit", "100000", "100000"), ("backoff-base", "1.5", "1.5"),
    ("webhook-url", "none", "none")])
def test_settings_take_and_show_units(name, value, show):
    key, parsed = queuectl.validate_config(name, value)
    assert queuectl.SETTINGS_BY_NAME[key].show(parsed) == show


def test_config_show_and_config_set_help_list_every_setting_from_the_table(cli):
    ok(cli("enqueue", "--id", "x", "--", "true"))  # (a read command does not create a database)
    lines = ok(cli("config", "show")).out.splitlines()
    assert lines[0].split() == ["KEY", "VALUE", "MEANING"]
    assert [line.split()[0] for line in lines[1:]] == [s.name for s in queuectl.SETTINGS]
    for line, s in zip(lines[1:], queuectl.SETTINGS):
        assert line.endswith(s.help) and line.split()[1] == shown(s)
    help_text = ok(cli("config", "set", "--help")).out
    for s in queuectl.SETTINGS:
        assert s.help in help_text and "(default %s)" % shown(s) in help_text, s.name


def test_the_readmes_configuration_listing_is_the_table():
    """The README shows `config show` (its runnable example is run by test_docs.py as well)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("## Configuration", 1)[1].split("$ queuectl config show\n", 1)[1].split("\n$ ", 1)[0]
    rows = []
    for line in block.splitlines()[1:]:
        if line.startswith(" "):  # the meaning goes on (wrapped at 80 columns)
            rows[-1][-1] += " " + line.strip()
        else:
            rows.append(re.split(r"\s{2,}", line.strip()))
    assert [(r[0], r[1] if len(r) == 3 else "", r[-1]) for r in rows] == [
        (s.name, shown(s), s.help) for s in queuectl.SETTINGS]


def test_config_show_get_set(cli, db):
    ok(cli("enqueue", "--id", "x", "--", "true"))  # (a read command does not create a database)
    result = ok(cli("config", "show"))
    for key in queuectl.DEFAULTS:
        assert key in result.out
    assert json.loads(ok(cli("config", "show", "--json")).out) == queuectl.DEFAULTS
    assert ok(cli("config", "get", "max-retries")).out == "3\n"

    assert ok(cli("config", "set", "max-retries", "5")).out == "max-retries = 5\n"
    assert ok(cli("config", "set", "backoff_base", "3")).out == "backoff-base = 3\n"  # underscore alias
    ok(cli("config", "set", "job-timeout", "600"))
    ok(cli("config", "set", "worker-poll-interval", "2.5"))
    assert ok(cli("config", "get", "max_retries")).out == "5\n"
    assert ok(cli("config", "get", "worker-poll-interval")).out == "2.5\n"
    shown = json.loads(ok(cli("config", "show", "--json")).out)
    assert shown == dict(queuectl.DEFAULTS, **{"max-retries": 5, "backoff-base": 3.0, "job-timeout": 600.0,
                                               "worker-poll-interval": 2.5})
    assert "(default 3)" in ok(cli("config", "show")).out

    # the new default applies to new jobs
    enqueue(cli, {"id": "after", "command": "x"})
    assert get_json(cli, "after")["max_retries"] == 5


@pytest.mark.parametrize("key, value", [("bogus", "1"), ("max-retries", "-1"), ("max-retries", "lots"),
                                        ("backoff-base", "0"), ("job-timeout", "nan"), ("output-limit", "1")])
def test_config_set_refuses_bad_keys_and_values_and_stores_nothing(cli, db, key, value):
    ok(cli("config", "set", "max-retries", "4"))
    before = config_rows(db)
    result = cli("config", "set", key, value)
    assert_one_error_line(result, 2)
    assert config_rows(db) == before
    assert ok(cli("config", "get", "max-retries")).out == "4\n"


###############################################################################
# clear
###############################################################################


def make_mixed(cli, store):
    enqueue(cli, {"id": "run", "command": "x", "priority": "high"})
    enqueue(cli, {"id": "done", "command": "x", "priority": "high"})
    store.claim("w-test", "test-host", time.time() + 1, 30.0)  # "run" stays processing
    run_job(store, "done")
    make_dead(cli, store, "dead")
    enqueue(cli, {"id": "wait", "command": "x"})


def test_clear_one_state(cli, db, store):
    make_mixed(cli, store)
    result = ok(cli("clear", "--state", "completed"))
    assert "1" in result.out
    assert states(db) == {"run": "processing", "dead": "dead", "wait": "pending"}
    ok(cli("clear", "-s", "pending"))
    assert states(db) == {"run": "processing", "dead": "dead"}


def test_clear_without_state_needs_yes_when_stdin_is_not_a_terminal(cli, db, store):
    make_mixed(cli, store)
    before = states(db)
    result = cli("clear", stdin="y\n")
    assert_one_error_line(result, 2)
    assert "--yes" in result.err
    assert states(db) == before


@pytest.mark.parametrize("flag", ["--yes", "-y"])
def test_clear_yes_deletes_all_but_running_jobs(cli, db, store, flag):
    make_mixed(cli, store)
    result = ok(cli("clear", flag))
    assert "3" in result.out
    assert states(db) == {"run": "processing"}
    assert db_rows(db, "SELECT DISTINCT job_id FROM attempts") == [("run",)]


def test_clear_processing_is_refused(cli, db, store):
    make_mixed(cli, store)
    before = states(db)
    assert_one_error_line(cli("clear", "--state", "processing"), 4)
    assert states(db) == before


###############################################################################
# version and help
###############################################################################


def test_version(cli):
    result = ok(cli("--version"))
    assert result.out == "queuectl %s\n" % queuectl.__version__


@pytest.mark.parametrize("command", [
    "", "enqueue", "worker", "worker start", "worker stop", "worker status", "status", "list", "get", "logs",
    "dlq", "dlq list", "dlq retry", "dlq clear", "config", "config show", "config get", "config set", "clear",
])
def test_help_of_every_command_has_examples(cli, command):
    for flag in ("--help", "-h"):
        result = ok(cli(*command.split(), flag))
        assert "examples" in result.out
        assert result.out.startswith("usage: queuectl " + command)


###############################################################################
# bad input: a table
###############################################################################

FILES = {
    "deep.json": "[" * 100_000 + "]" * 100_000,
    "latin1.json": b'{"command": "caf\xe9"}',
    "empty.json": "",
    "emptylist.json": "[]",
    "twice.json": '[{"id": "t1", "command": "a"}, {"id": "t1", "command": "b"}]',
    "two.json": '[{"command": "a"}, {"command": "b"}]',
    "badline.jsonl": '{"command": "a"}\n{"command": "b"}\n{oops\n',
    "badjob.jsonl": '{"command": "a"}\n{"command": "b", "timeout": -1}\n',
    "adir": None,
}

LONG = "x" * 200_000


def J(**fields):
    return json.dumps(fields)


BAD_INPUT = [
    # malformed or non-object JSON
    (("enqueue", "{bad json"), 2, None),
    (("enqueue", "echo hi"), 2, None),
    (("enqueue", '{"command": "x"} trailing'), 2, None),
    (("enqueue", "[]"), 2, None),
    (("enqueue", "42"), 2, None),
    (("enqueue", "null"), 2, None),
    (("enqueue", '"echo hi"'), 2, None),
    (("enqueue", "[1, 2]"), 2, None),
    (("enqueue", "{}"), 2, None),
    (("enqueue", "@deep.json"), 2, None),
    (("enqueue", "@latin1.json"), 2, None),
    (("enqueue", "@empty.json"), 2, None),
    (("enqueue", "@emptylist.json"), 2, None),
    (("enqueue", "@missing.json"), 2, None),
    (("enqueue", "@adir"), 2, None),
    (("enqueue", "@badline.jsonl"), 2, None),
    (("enqueue", "@badjob.jsonl"), 2, None),
    (("enqueue", "-"), 2, ""),
    (("enqueue", "-"), 2, '{"command": "a"}\n{nope\n'),
    (("enqueue", "-"), 2, b'{"command": "caf\xe9"}\n'),
    # wrong types and values per field
    (("enqueue", J(command=5)), 2, None),
    (("enqueue", J(command=None)), 2, None),
    (("enqueue", J(command="")), 2, None),
    (("enqueue", J(command="  \t ")), 2, None),
    (("enqueue", J(command=["echo", "hi"])), 2, None),
    (("enqueue", J(command="echo \x00 hi")), 2, None),
    (("enqueue", J(command=LONG)), 2, None),
    (("enqueue", '{"command": "echo \\ud800"}'), 2, None),  # a lone surrogate is not text
    (("enqueue", J(id="x" * 300, command="x")), 2, None),
    (("enqueue", J(id="jöb", command="x")), 2, None),
    (("enqueue", J(id="日本語", command="x")), 2, None),
    (("enqueue", J(id="", command="x")), 2, None),
    (("enqueue", J(id=7, command="x")), 2, None),
    (("enqueue", J(id="a b", command="x")), 2, None),
    (("enqueue", J(id="-rf", command="x")), 2, None),
    (("enqueue", J(id="x'; DROP TABLE jobs; --", command="x")), 2, None),
    (("enqueue", J(id="abc\n", command="x")), 2, None),
    (("enqueue", J(command="x", priority="urgent")), 2, None),
    (("enqueue", J(command="x", priority=4)), 2, None),
    (("enqueue", J(command="x", timeout=-5)), 2, None),
    (("enqueue", J(command="x", timeout="30")), 2, None),
    (("enqueue", '{"command": "x", "timeout": NaN}'), 2, None),
    (("enqueue", '{"command": "x", "timeout": 1e999}'), 2, None),
    (("enqueue", J(command="x", max_retries=-1)), 2, None),
    (("enqueue", J(command="x", max_retries=10 ** 30)), 2, None),
    (("enqueue", J(command="x", max_retries=2.5)), 2, None),
    (("enqueue", J(command="x", max_retries=True)), 2, None),
    (("enqueue", J(command="x", run_at="tomorrow")), 2, None),
    (("enqueue", J(command="x", run_at="2030-01-31T09:00:00")), 2, None),
    (("enqueue", J(command="x", delay=-1)), 2, None),
    (("enqueue", J(command="x", delay=1e20)), 2, None),
    (("enqueue", J(command="x", delay=5, run_at="2030-01-31T09:00:00Z")), 2, None),
    (("enqueue", J(command="x", cwd="")), 2, None),
    (("enqueue", J(command="x", cwd="\udce9")), 2, None),
    (("enqueue", J(command="x", env="A=1")), 2, None),
    (("enqueue", J(command="x", env={"1A": "x"})), 2, None),
    (("enqueue", J(command="x", env={"A\n": "x"})), 2, None),
    (("enqueue", J(command="x", env={"A": 1})), 2, None),
    (("enqueue", J(command="x", colour="red")), 2, None),
    # options
    (("enqueue", "-p", "urgent", J(command="x")), 2, None),
    (("enqueue", "-t", "abc", J(command="x")), 2, None),
    (("enqueue", "-t", "-1", J(command="x")), 2, None),
    (("enqueue", "-t", "nan", J(command="x")), 2, None),
    (("enqueue", "-t", "1e400", J(command="x")), 2, None),
    (("enqueue", "-r", "-1", J(command="x")), 2, None),
    (("enqueue", "-r", "1.5", J(command="x")), 2, None),
    (("enqueue", "--delay", "-5", J(command="x")), 2, None),
    (("enqueue", "--run-at", "next week", J(command="x")), 2, None),
    (("enqueue", "--env", "NOEQUALS", J(command="x")), 2, None),
    (("enqueue", "--env", "1BAD=x", J(command="x")), 2, None),
    (("enqueue", "--id", "bad id", J(command="x")), 2, None),
    (("enqueue", "--id", "one", "@two.json"), 2, None),
    (("enqueue", "--cwd", "", J(command="x")), 2, None),
    # enqueue with nothing, or with two things
    (("enqueue",), 2, None),
    (("enqueue", "-p", "high"), 2, None),
    (("enqueue", J(command="x"), "--", "echo", "hi"), 2, None),
    (("enqueue", J(command="x"), J(command="y")), 2, None),
    (("enqueue", "--"), 2, None),
    (("enqueue", "--", ""), 2, None),
    (("enqueue", "--", "   "), 2, None),
    (("enqueue", "--", "echo \x00"), 2, None),
    (("enqueue", "--", LONG), 2, None),
    (("enqueue", "--", "echo caf\udce9"), 2, None),  # what Python makes of a non-UTF-8 argument
    # '--' with other commands
    (("status", "--", "echo", "hi"), 2, None),
    (("list", "--", "x"), 2, None),
    (("get", "--", "existing"), 2, None),
    # conflicts
    (("enqueue", J(id="existing", command="x")), 4, None),
    (("enqueue", "@twice.json"), 4, None),
    (("dlq", "retry", "existing"), 4, None),
    (("dlq", "retry", "done"), 4, None),
    (("clear", "--state", "processing"), 4, None),
    # not found
    (("get", "nope"), 3, None),
    (("get", "x" * 300), 3, None),
    (("get", "ñandú"), 3, None),
    (("get", "' OR '1'='1"), 3, None),
    (("get", "existing; DELETE FROM jobs"), 3, None),
    (("get", "\udcff"), (2, 3), None),  # a non-UTF-8 argument
    (("logs", "nope"), 3, None),
    (("logs", "x' OR 1=1 --"), 3, None),
    (("logs", "existing", "--attempt", "1"), 3, None),
    (("logs", "done", "--attempt", "2"), 3, None),
    (("logs", "done", "--attempt", str(10 ** 30)), (2, 3), None),
    (("dlq", "retry", "nope"), 3, None),
    (("dlq", "retry", "deadjob-not-here"), 3, None),
    (("dlq", "retry", "x' OR 1=1 --"), (2, 3), None),
    # usage: states, limits, keys, unknown things
    (("list", "--state", "bogus"), 2, None),
    (("list", "-s", "PENDING"), 2, None),
    (("list", "--limit", "0"), 2, None),
    (("list", "-l", "-5"), 2, None),
    (("list", "-l", "ten"), 2, None),
    (("list", "-l", "1e3"), 2, None),
    (("list", "-l", "99999999999"), 2, None),
    (("dlq", "list", "--limit", "0"), 2, None),
    (("logs", "existing", "--attempt", "0"), 2, None),
    (("logs", "existing", "-a", "first"), 2, None),
    (("config", "set", "bogus", "1"), 2, None),
    (("config", "set", "max-retries", "-1"), 2, None),
    (("config", "set", "max-retries", "1e9"), 2, None),
    (("config", "set", "max-retries", "99999999999999999999"), 2, None),
    (("config", "set", "backoff-base", "nan"), 2, None),
    (("config", "set", "job-timeout", "-0.5"), 2, None),
    (("config", "set", "job-timeout", "1e400"), 2, None),
    (("config", "set", "max-retries"), 2, None),
    (("config", "get", "bogus"), 2, None),
    (("config", "bogus"), 2, None),
    (("clear", "--state", "bogus"), 2, None),
    (("clear",), 2, None),
    (("dlq",), 2, None),
    (("dlq", "purge"), 2, None),
    (("worker",), 2, None),
    (("worker", "start", "-c", "many"), 2, None),
    (("worker", "stop", "--timeout", "soon"), 2, None),
    (("frobnicate",), 2, None),
    ((), 2, None),
    (("status", "--bogus"), 2, None),
    (("get",), 2, None),
]


def table_id(row):
    args, code, stdin = row
    text = " ".join(args) or "(no args)"
    text = (text[:50] + "...") if len(text) > 50 else text
    return text + (" <%r" % stdin[:20] if stdin is not None else "")


def dump(db):
    """Everything a bad input must not change."""
    return (db_rows(db, "SELECT * FROM jobs ORDER BY seq"), db_rows(db, "SELECT * FROM config ORDER BY key"),
            db_rows(db, "SELECT * FROM attempts ORDER BY job_id, n"), db_rows(db, "SELECT * FROM job_counts ORDER BY state"))


@pytest.fixture
def seeded(cli, store, tmp_path, db):
    """A database with a pending job 'existing', a completed 'done', a dead 'dead1' and one config change."""
    enqueue(cli, {"id": "done", "command": "echo done", "priority": "high"})
    run_job(store, "done", output="done\n")
    make_dead(cli, store, "dead1")
    enqueue(cli, {"id": "existing", "command": "echo existing", "env": {"A": "1"}})
    ok(cli("config", "set", "backoff-base", "3"))
    for name, content in FILES.items():
        path = tmp_path / name
        if content is None:
            path.mkdir()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return dump(db)


def test_bad_input_table_is_big_enough():
    assert len(BAD_INPUT) >= 40
    assert len({table_id(r) for r in BAD_INPUT}) == len(BAD_INPUT)


@pytest.mark.parametrize("args, code, stdin", BAD_INPUT, ids=[table_id(r) for r in BAD_INPUT])
def test_bad_input(cli, db, seeded, args, code, stdin):
    try:
        result = cli(*args, stdin=stdin)
    except Exception as e:  # a user would see a traceback
        pytest.fail("main() raised %s: %s" % (type(e).__name__, str(e)[:200]))
    codes = code if isinstance(code, tuple) else (code,)
    assert "Traceback" not in result.out + result.err
    assert result.rc in codes, "exit %s, expected %s; stderr: %r" % (result.rc, code, result.err[-300:])
    assert_one_error_line(result, result.rc, allow_usage=result.rc == 2)
    assert result.out == ""
    assert dump(db) == seeded, "the database changed"


###############################################################################
# unusable databases
###############################################################################


def test_db_in_a_missing_directory(cli, tmp_path):
    path = tmp_path / "no" / "such" / "dir" / "q.db"
    for args in (("--db", path, "status"), ("status", "--db", path), ("--db", path, "enqueue", "--", "true")):
        result = cli(*args)
        assert_one_error_line(result, 74)
        assert str(path.parent) in result.err
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("args", [("status",), ("list",), ("get", "x"), ("enqueue", "--", "true"),
                                  ("config", "set", "max-retries", "1"), ("clear", "--yes")])
def test_garbage_database_file(cli, db, args):
    content = b"definitely not an SQLite database\n" * 100
    db.write_bytes(content)
    result = cli(*args)
    assert_one_error_line(result, 74)
    assert result.out == ""
    assert db.read_bytes() == content


def test_a_foreign_sqlite_database(cli, db):
    conn = sqlite3.connect(str(db))
    conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, amount REAL)")
    conn.commit()
    conn.close()
    for args in (("status",), ("enqueue", "--", "true")):
        result = cli(*args)
        assert_one_error_line(result, 74)
        assert "not a queuectl" in result.err
    assert [r[0] for r in db_rows(db, "SELECT name FROM sqlite_master")] == ["invoices"]


def test_a_directory_as_database(cli, tmp_path):
    (tmp_path / "d.db").mkdir()
    assert_one_error_line(cli("--db", tmp_path / "d.db", "status"), 74)


@pytest.fixture
def readonly_db(cli, db, store):
    enqueue(cli, {"id": "ro", "command": "echo ro"})
    run_job(store, "ro", output="ro\n")
    enqueue(cli, {"id": "ro2", "command": "echo ro2"})
    store.close()
    os.chmod(db, 0o444)
    yield db
    os.chmod(db, 0o644)


def test_readonly_database_can_be_read(cli, readonly_db):
    assert json.loads(ok(cli("status", "--json")).out)["job_counts"]["completed"] == 1
    assert sorted(line.split()[0] for line in ok(cli("list")).lines[1:]) == ["ro", "ro2"]
    assert get_json(cli, "ro")["state"] == "completed"
    assert ok(cli("logs", "ro")).out == "ro\n"
    assert ok(cli("config", "get", "max-retries")).out == "3\n"


WRITES = (("enqueue", "--", "true"), ("config", "set", "max-retries", "5"), ("clear", "--yes"),
          ("dlq", "clear", "--yes"))


def test_readonly_database_refuses_writes(cli, readonly_db, tmp_path):
    before = dump(readonly_db)
    if not os.access(readonly_db, os.W_OK):
        for args in WRITES:
            result = cli(*args)
            assert_one_error_line(result, 74)
            assert "read-only" in result.err
    else:  # root writes whatever the mode: a second account (nobody) is who cannot
        runuser = shutil.which("runuser")
        assert runuser and os.access("/usr/bin/python3", os.X_OK), "root without runuser or /usr/bin/python3"
        dirs = [tmp_path, tmp_path.parent, tmp_path.parent.parent]  # (pytest's directories are 0700)
        modes = [d.stat().st_mode & 0o7777 for d in dirs]
        try:
            for d in dirs:
                d.chmod(0o755)
            os.chmod(readonly_db, 0o644)  # readable by others, writable by its owner (root) only
            for args in WRITES:
                r = subprocess.run([runuser, "-u", "nobody", "--", "/usr/bin/python3", "-I",
                                    str(ROOT / "queuectl.py"), "--db", str(readonly_db)] + list(args),
                                   capture_output=True, text=True, timeout=60, cwd="/",
                                   env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"})
                assert r.returncode == 74 and r.stderr.count("\n") == 1 and "read-only" in r.stderr, (args, r.stderr)
        finally:
            for d, mode in zip(dirs, modes):
                d.chmod(mode)
    assert dump(readonly_db) == before


# --- start-up: only the named subcommand's parser is built ------------------------------------


@pytest.mark.parametrize("argv, word", [
    (["enqueue", "--", "true"], "enqueue"),
    (["--db", "x.db", "-v", "worker", "start"], "worker"),
    (["--db=x.db", "status"], "status"),
    (["--verbose", "list", "--state", "dead"], "list"),
    (["--help"], None),
    (["--db"], None),
    ([], None),
])
def test_command_word_skips_the_global_options(argv, word):
    assert queuectl.command_word(argv) == word


@pytest.mark.parametrize("argv", [
    ["enqueue", "-p", "high", "--timeout", "30", '{"command": "true"}'],
    ["--db", "x.db", "worker", "start", "-c", "3", "--burst"],
    ["dlq", "retry", "j1", "--reset-attempts"],
    ["config", "set", "max-retries", "5"],
    ["schedule", "add", "nightly", "0 3 * * *", "--", "true"],
    ["list", "--state", "completed", "--limit", "5"],
])
def test_a_parser_of_one_subcommand_parses_as_the_whole_parser_does(argv):
    head, _ = queuectl._split_command(argv)
    word = queuectl.command_word(head)
    assert vars(queuectl.build_parser(only=word).parse_args(head)) == vars(queuectl.build_parser().parse_args(head))


def test_an_unknown_subcommand_still_lists_every_choice(cli):
    r = cli("frobnicate")
    assert r.rc == queuectl.EXIT_USAGE
    assert "invalid choice: 'frobnicate'" in r.err and "'enqueue'" in r.err and "'schedule'" in r.err


# --- the environment of a job ------------------------------------------------------------------


class QuietEvents:
    interval = 0.05
    worker_id = "w-env"

    def poll_fds(self):
        return []

    def on_start(self, pid):
        pass

    def tick(self, now, buf):
        return None


@pytest.mark.parametrize("own_env", [None, {"FOO": "bar"}])
def test_a_job_sees_its_marks_and_the_worker_environment_is_left_as_it_was(db, own_env, monkeypatch):
    monkeypatch.delenv("QUEUECTL_JOB_ID", raising=False)
    monkeypatch.setenv("QUEUECTL_ATTEMPT", "mine")  # a value of the worker's own: restored after the spawn
    store = queuectl.SqliteStore(str(db))
    try:
        now = time.time()
        doc = {"command": 'echo "$QUEUECTL_JOB_ID $QUEUECTL_ATTEMPT $QUEUECTL_WORKER_ID ${FOO-none} $HOME"'}
        if own_env:
            doc["env"] = own_env
        store.enqueue([queuectl.validate_job(doc, store.config(), now, cwd="/")], now)
        job = store.claim("w-env", "host", now, 15.0)
        result = queuectl.run_command(job, 10, 65536, 1.0, QuietEvents())
    finally:
        store.close()
    assert result.outcome == "completed"
    assert result.output.split() == [job.id, "1", "w-env", (own_env or {}).get("FOO", "none"), os.environ["HOME"]]
    assert "QUEUECTL_JOB_ID" not in os.environ and os.environ["QUEUECTL_ATTEMPT"] == "mine"
    after = subprocess_output(["/bin/sh", "-c", 'echo "${QUEUECTL_JOB_ID-unset} $QUEUECTL_ATTEMPT"'])
    assert after.split() == ["unset", "mine"]  # the process environment (putenv) as well


def subprocess_output(argv):
    import subprocess

    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def test_metrics_is_a_core_command_that_needs_no_dashboard_package(tmp_path):
    """`queuectl metrics` prints what the dashboard's /metrics serves, without importing queuectl_web."""
    import subprocess
    import sys

    queuectl.SqliteStore(str(tmp_path / "q.db")).close()
    code = ("import sys, queuectl; rc = queuectl.main(['--db', %r, 'metrics']); "
            "sys.exit(rc or ('queuectl_web' in sys.modules and 9))") % str(tmp_path / "q.db")
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(Path(queuectl.__file__).parent), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert 'queuectl_jobs{state="pending"} 0' in proc.stdout and "queuectl_info{" in proc.stdout
