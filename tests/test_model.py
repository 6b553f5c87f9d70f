"""Unit tests of the model layer: pure functions, time passed in, nothing sleeps.

Covers retry policy (backoff_delay, after_failure), timeouts, the state
transition table, job and config validation, RFC 3339 time, job document
parsing and the output buffer.
"""

import json

import pytest

import queuectl
from queuectl import InvalidInput, JobState

NOW = 1_700_000_000.0
CFG = dict(queuectl.DEFAULTS)


def make_job(**fields):
    base = dict(id="j1", command="true", state="pending", priority=2, max_retries=3,
                run_at=NOW, created_at=NOW, updated_at=NOW)
    base.update(fields)
    return queuectl.Job(**base)


def validate(spec, now=NOW, cwd="/base", cfg=CFG):
    return queuectl.validate_job(spec, cfg, now, cwd=cwd)


def invalid(spec, **kw):
    with pytest.raises(InvalidInput) as info:
        validate(spec, **kw)
    return str(info.value)


###############################################################################
# backoff_delay
###############################################################################


@pytest.mark.parametrize("failures, base, cap, expected", [
    (1, 2, 3600, 2.0),
    (2, 2, 3600, 4.0),
    (3, 2, 3600, 8.0),
    (2, 3, 3600, 9.0),
    (1, 1.5, 3600, 1.5),
    (1, 1, 3600, 1.0),
    (10, 2, 3600, 1024.0),
    (12, 2, 3600, 3600.0),  # 4096 is capped
    (5, 2, 10, 10.0),
    (3, 2, 8, 8.0),  # exactly at the cap
])
def test_backoff_delay(failures, base, cap, expected):
    assert queuectl.backoff_delay(failures, base, cap) == expected


@pytest.mark.parametrize("failures, base", [(10_000, 2), (1_000_000, 2.0), (1000, 1000), (10 ** 6, 1000.0)])
def test_backoff_delay_is_overflow_safe(failures, base):
    assert queuectl.backoff_delay(failures, base, 3600) == 3600.0


###############################################################################
# after_failure
###############################################################################


def simulate_failures(max_retries, cfg=CFG):
    """Fail a job on every run, as a worker would; return the (state, retry_at) decisions."""
    job = make_job(max_retries=max_retries)
    decisions = []
    now = NOW
    while True:
        job.attempts += 1  # claim counts the run
        state, retry_at = queuectl.after_failure(job, cfg, now)
        decisions.append((state, retry_at, now))
        if state is JobState.DEAD:
            return decisions
        assert len(decisions) <= max_retries + 1, "job keeps being retried"
        now = retry_at


@pytest.mark.parametrize("max_retries", [0, 1, 3, 5])
def test_a_job_runs_at_most_max_retries_plus_one_times(max_retries):
    decisions = simulate_failures(max_retries)
    assert len(decisions) == max_retries + 1
    assert [d[0] for d in decisions] == [JobState.FAILED] * max_retries + [JobState.DEAD]
    assert decisions[-1][1] is None


def test_max_retries_zero_goes_dead_after_the_first_failure():
    job = make_job(max_retries=0, attempts=1)
    assert queuectl.after_failure(job, CFG, NOW) == (JobState.DEAD, None)


@pytest.mark.parametrize("base, expected_delays", [(2.0, [2, 4, 8]), (3.0, [3, 9, 27])])
def test_retry_at_is_now_plus_base_to_the_n(base, expected_delays):
    cfg = dict(CFG, **{"backoff-base": base})
    decisions = simulate_failures(3, cfg)
    delays = [retry_at - now for state, retry_at, now in decisions if state is JobState.FAILED]
    assert delays == expected_delays


def test_retry_delay_is_capped_by_backoff_max():
    cfg = dict(CFG, **{"backoff-base": 10.0, "backoff-max": 60.0})
    job = make_job(max_retries=5, attempts=3)
    assert queuectl.after_failure(job, cfg, NOW) == (JobState.FAILED, NOW + 60.0)


def test_after_failure_uses_the_time_it_is_given():
    job = make_job(max_retries=3, attempts=1)
    assert queuectl.after_failure(job, CFG, 5.0) == (JobState.FAILED, 7.0)
    assert queuectl.after_failure(job, CFG, NOW + 100) == (JobState.FAILED, NOW + 102.0)


###############################################################################
# effective_timeout
###############################################################################


@pytest.mark.parametrize("job_timeout, global_timeout, expected", [
    (30, 300, 30.0),  # per-job wins
    (600, 300, 600.0),  # ... also when longer
    (None, 300, 300.0),  # global applies
    (None, 0, None),  # global 0 = no timeout
    (None, 0.0, None),
    (5, 0, 5.0),  # per-job still applies when global is off
    (0.5, 300, 0.5),
])
def test_effective_timeout(job_timeout, global_timeout, expected):
    cfg = dict(CFG, **{"job-timeout": global_timeout})
    assert queuectl.effective_timeout(make_job(timeout=job_timeout), cfg) == expected


###############################################################################
# state transitions (among the seed's five states; later issues may add more)
###############################################################################

SEED_STATES = ["pending", "processing", "completed", "failed", "dead"]

ALLOWED = {
    ("pending", "processing"),
    ("failed", "processing"),
    ("processing", "completed"),
    ("processing", "failed"),
    ("processing", "dead"),
    ("processing", "pending"),  # rescue of a lost run, forced stop
    ("dead", "pending"),  # dlq retry
}


@pytest.mark.parametrize("old", SEED_STATES)
@pytest.mark.parametrize("new", SEED_STATES)
def test_can_transition(old, new):
    assert queuectl.can_transition(old, new) == ((old, new) in ALLOWED)
    assert queuectl.can_transition(JobState(old), JobState(new)) == ((old, new) in ALLOWED)


def test_transition_table_covers_every_state_and_completed_is_final():
    assert set(queuectl.TRANSITIONS) == set(JobState)
    assert queuectl.TRANSITIONS[JobState.COMPLETED] == set()
    among_seed = {(o.value, n.value) for o, ns in queuectl.TRANSITIONS.items() for n in ns
                  if o.value in SEED_STATES and n.value in SEED_STATES}
    assert among_seed == ALLOWED


def test_the_seed_states_come_first():
    assert queuectl.STATES[:5] == SEED_STATES
    assert [str(s) for s in JobState][:5] == SEED_STATES


@pytest.mark.parametrize("old, new", [("bogus", "pending"), ("pending", "bogus")])
def test_can_transition_refuses_unknown_states(old, new):
    with pytest.raises(ValueError):
        queuectl.can_transition(old, new)


###############################################################################
# validate_job: accepted input
###############################################################################


def test_minimal_job_gets_defaults():
    job = validate({"command": "echo hi"})
    assert job == {
        "id": None, "command": "echo hi", "priority": 2, "timeout": None, "max_retries": 3,
        "run_at": NOW, "cwd": "/base", "env": None, "queue": "default", "after": [], "unique_key": None,
        "webhook": None,
    }


def test_max_retries_default_comes_from_config():
    assert validate({"command": "x"}, cfg=dict(CFG, **{"max-retries": 7}))["max_retries"] == 7


@pytest.mark.parametrize("field, value, key, expected", [
    ("id", "job-1", "id", "job-1"),
    ("id", "A_b.c:d@e+f-9", "id", "A_b.c:d@e+f-9"),
    ("id", "_x", "id", "_x"),
    ("id", "9", "id", "9"),
    ("id", "x" * 128, "id", "x" * 128),
    ("id", None, "id", None),
    ("priority", "high", "priority", 1),
    ("priority", "medium", "priority", 2),
    ("priority", "low", "priority", 3),
    ("priority", "HIGH", "priority", 1),
    ("timeout", 30, "timeout", 30.0),
    ("timeout", 0.25, "timeout", 0.25),
    ("max_retries", 0, "max_retries", 0),
    ("max_retries", 1000, "max_retries", 1000),
    ("run_at", "2030-01-31T09:00:00Z", "run_at", 1896080400.0),
    ("run_at", "2030-01-31T10:00:00+01:00", "run_at", 1896080400.0),
    ("run_at", "2030-01-31T09:00:00.500Z", "run_at", 1896080400.5),
    ("delay", 0, "run_at", NOW),
    ("delay", 10, "run_at", NOW + 10),
    ("delay", 2.5, "run_at", NOW + 2.5),
    ("cwd", "sub/dir", "cwd", "/base/sub/dir"),
    ("cwd", "/abs/path", "cwd", "/abs/path"),
    ("cwd", "../other", "cwd", "/other"),
    ("cwd", ".", "cwd", "/base"),
    ("env", {"FOO": "1", "_BAR2": ""}, "env", {"FOO": "1", "_BAR2": ""}),
    ("env", {}, "env", None),
])
def test_validate_job_accepts(field, value, key, expected):
    assert validate({"command": "x", field: value})[key] == expected


def test_command_is_kept_verbatim():
    command = "  printf '%s\\n' \"$HOME\" | tr a-z A-Z; exit 3  "
    assert validate({"command": command})["command"] == command


def test_command_at_the_size_cap_is_accepted():
    command = "x" * queuectl.MAX_COMMAND_BYTES
    assert validate({"command": command})["command"] == command


def test_cwd_defaults_to_the_given_cwd():
    assert validate({"command": "x"}, cwd="/srv/app")["cwd"] == "/srv/app"
    assert validate({"command": "x", "cwd": "logs"}, cwd="/srv/app")["cwd"] == "/srv/app/logs"


def test_null_optional_fields_mean_default():
    job = validate({"command": "x", "id": None, "timeout": None, "run_at": None, "env": None, "cwd": None})
    assert (job["id"], job["timeout"], job["run_at"], job["env"], job["cwd"]) == (None, None, NOW, None, "/base")


###############################################################################
# validate_job: refused input (the message names the field)
###############################################################################


BAD_JOBS = [
    # (spec, words the error must contain)
    ([], "object"),
    ("echo hi", "object"),
    (None, "object"),
    (42, "object"),
    ({}, "command"),
    ({"command": None}, "command"),
    ({"command": ""}, "command"),
    ({"command": "   \n\t"}, "command"),
    ({"command": 5}, "command"),
    ({"command": ["echo", "hi"]}, "command"),
    ({"command": "echo \x00 hi"}, "command"),
    ({"command": "x" * (queuectl.MAX_COMMAND_BYTES + 1)}, "command"),
    ({"command": "é" * (queuectl.MAX_COMMAND_BYTES // 2 + 1)}, "command"),  # the cap is in bytes
    ({"command": "x", "id": ""}, "id"),
    ({"command": "x", "id": 5}, "id"),
    ({"command": "x", "id": True}, "id"),
    ({"command": "x", "id": "x" * 129}, "id"),
    ({"command": "x", "id": "a b"}, "id"),
    ({"command": "x", "id": "-a"}, "id"),
    ({"command": "x", "id": ".a"}, "id"),
    ({"command": "x", "id": "a/b"}, "id"),
    ({"command": "x", "id": "jöb"}, "id"),
    ({"command": "x", "id": "日本"}, "id"),
    ({"command": "x", "id": "a'; DROP TABLE jobs; --"}, "id"),
    ({"command": "x", "id": "abc\n"}, "id"),
    ({"command": "x", "id": "a\x00"}, "id"),
    ({"command": "x", "priority": "urgent"}, "priority"),
    ({"command": "x", "priority": None}, "priority"),
    ({"command": "x", "timeout": -1}, "timeout"),
    ({"command": "x", "timeout": "30"}, "timeout"),
    ({"command": "x", "timeout": True}, "timeout"),
    ({"command": "x", "timeout": float("nan")}, "timeout"),
    ({"command": "x", "timeout": float("inf")}, "timeout"),
    ({"command": "x", "timeout": 10 ** 400}, "timeout"),
    ({"command": "x", "max_retries": -1}, "max_retries"),
    ({"command": "x", "max_retries": 1001}, "max_retries"),
    ({"command": "x", "max_retries": 2.5}, "max_retries"),
    ({"command": "x", "max_retries": 3.0}, "max_retries"),
    ({"command": "x", "max_retries": "3"}, "max_retries"),
    ({"command": "x", "max_retries": True}, "max_retries"),
    ({"command": "x", "max_retries": False}, "max_retries"),
    ({"command": "x", "max_retries": None}, "max_retries"),
    ({"command": "x", "run_at": "tomorrow"}, "run_at"),
    ({"command": "x", "run_at": "2030-01-31T09:00:00"}, "run_at"),  # no zone
    ({"command": "x", "run_at": "2030-01-31"}, "run_at"),
    ({"command": "x", "run_at": "2030-02-30T09:00:00Z"}, "run_at"),
    ({"command": "x", "run_at": 1896080400}, "run_at"),
    ({"command": "x", "delay": -1}, "delay"),
    ({"command": "x", "delay": "10"}, "delay"),
    ({"command": "x", "delay": True}, "delay"),
    ({"command": "x", "delay": float("nan")}, "delay"),
    ({"command": "x", "delay": 1e20}, "delay"),
    ({"command": "x", "run_at": "2030-01-31T09:00:00Z", "delay": 5}, "run_at"),
    ({"command": "x", "cwd": ""}, "cwd"),
    ({"command": "x", "cwd": 5}, "cwd"),
    ({"command": "x", "cwd": "/tmp/\x00x"}, "cwd"),
    ({"command": "x", "env": "A=1"}, "env"),
    ({"command": "x", "env": ["A=1"]}, "env"),
    ({"command": "x", "env": {"1A": "x"}}, "env"),
    ({"command": "x", "env": {"A-B": "x"}}, "env"),
    ({"command": "x", "env": {"A=B": "x"}}, "env"),
    ({"command": "x", "env": {"": "x"}}, "env"),
    ({"command": "x", "env": {"A\n": "x"}}, "env"),
    ({"command": "x", "env": {"A": 1}}, "env"),
    ({"command": "x", "env": {"A": None}}, "env"),
    ({"command": "x", "env": {"A": "x\x00y"}}, "env"),
    ({"command": "x", "colour": "red"}, "colour"),
    ({"command": "x", "Command": "y"}, "Command"),
    ({"command": "x", "retries": 3}, "retries"),
]


@pytest.mark.parametrize("spec, words", BAD_JOBS, ids=lambda v: None if not isinstance(v, (dict, list)) else
                         json.dumps(v, default=str)[:60])
def test_validate_job_refuses(spec, words):
    message = invalid(spec)
    assert words in message, message
    assert "\n" not in message


def test_both_run_at_and_delay_are_refused_whatever_their_values():
    message = invalid({"command": "x", "run_at": "2030-01-31T09:00:00Z", "delay": 0})
    assert "run_at" in message and "delay" in message


def test_unknown_field_error_lists_allowed_fields():
    message = invalid({"command": "x", "prio": "high"})
    assert "'prio'" in message
    for field in queuectl.JOB_FIELDS:
        assert field in message


def test_validate_job_does_not_modify_its_input():
    spec = {"command": "x", "priority": "HIGH", "env": {"A": "1"}, "delay": 5}
    copy = json.loads(json.dumps(spec))
    validate(spec)
    assert spec == copy


###############################################################################
# configuration validation
###############################################################################


@pytest.mark.parametrize("key, value, expected", [
    ("max-retries", "5", ("max-retries", 5)),
    ("max_retries", "5", ("max-retries", 5)),
    ("MAX-RETRIES", "0", ("max-retries", 0)),
    (" max-retries ", " 1000 ", ("max-retries", 1000)),
    ("backoff-base", "3", ("backoff-base", 3.0)),
    ("backoff_base", "1.5", ("backoff-base", 1.5)),
    ("backoff-base", "1", ("backoff-base", 1.0)),
    ("backoff-max", "0.5", ("backoff-max", 0.5)),
    ("worker-poll-interval", "2.0", ("worker-poll-interval", 2.0)),
    ("worker_poll_interval", "0.01", ("worker-poll-interval", 0.01)),
    ("job-timeout", "0", ("job-timeout", 0.0)),
    ("job-timeout", "600", ("job-timeout", 600.0)),
    ("lease-seconds", "1", ("lease-seconds", 1.0)),
    ("output-limit", "1024", ("output-limit", 1024)),
    ("max-rescues", "0", ("max-rescues", 0)),
    ("kill-grace", "0", ("kill-grace", 0.0)),
    ("max-retries", 7, ("max-retries", 7)),
])
def test_validate_config_accepts(key, value, expected):
    result = queuectl.validate_config(key, value)
    assert result == expected
    assert type(result[1]) is type(expected[1])


@pytest.mark.parametrize("key, value", [
    ("max-retries", "-1"),
    ("max-retries", "1001"),
    ("max-retries", "2.5"),
    ("max-retries", "three"),
    ("max-retries", ""),
    ("backoff-base", "0.5"),
    ("backoff-base", "0"),
    ("backoff-base", "1001"),
    ("backoff-base", "nan"),
    ("backoff-base", "inf"),
    ("backoff-max", "0"),  # the lower bound is excluded
    ("backoff-max", "-5"),
    ("worker-poll-interval", "0"),
    ("job-timeout", "-1"),
    ("job-timeout", "1e400"),
    ("job-timeout", "abc"),

    ("lease-seconds", "0.5"),
    ("lease-seconds", "3601"),
    ("output-limit", "1023"),
    ("output-limit", "1e6"),
    ("max-rescues", "-1"),
    ("kill-grace", "601"),
])
def test_validate_config_refuses_bad_values(key, value):
    with pytest.raises(InvalidInput) as info:
        queuectl.validate_config(key, value)
    assert queuectl.normalize_config_key(key) in str(info.value)


@pytest.mark.parametrize("key", ["bogus", "", "max retries", "maxretries", "max-retries-", "job--timeout", "DEFAULTS"])
def test_unknown_config_keys_are_refused(key):
    with pytest.raises(InvalidInput) as info:
        queuectl.normalize_config_key(key)
    assert "unknown config key" in str(info.value)
    assert "max-retries" in str(info.value)  # lists the known keys
    with pytest.raises(InvalidInput):
        queuectl.validate_config(key, "1")


def test_every_setting_comes_from_the_one_table_and_its_default_is_valid():
    names = [s.name for s in queuectl.SETTINGS]
    assert len(set(names)) == len(names) and list(queuectl.DEFAULTS) == names
    for s in queuectl.SETTINGS:
        assert queuectl.DEFAULTS[s.name] == s.default and type(s.default) is s.kind and s.help
        assert queuectl.validate_config(s.name, str(s.default)) == (s.name, s.default)


def test_a_setting_shows_its_value_in_its_unit_and_its_word_for_zero():
    by = queuectl.SETTINGS_BY_NAME
    assert by["job-timeout"].show(0) == "none" and by["job-timeout"].show(1) == "1s"
    assert by["job-timeout"].show(300) == "300s" and by["backoff-base"].show(2.0) == "2"
    assert by["output-limit"].show(1048576) == "1M" and by["retention"].show(0) == "forever"
    assert by["kill-grace"].show(0) == "0s"  # 0 is a value where no word says otherwise
    assert by["max-retries"].show(0) == "0" and by["max-retries"].show(3) == "3"
    assert by["webhook-url"].show("") == "none"
    assert by["webhook-url"].show("http://hooks.example/x") == "http://hooks.example/x"


@pytest.mark.parametrize("setting", queuectl.SETTINGS[:-1], ids=lambda s: s.name)
def test_validation_takes_each_settings_range_from_the_table(setting):
    for value in (setting.lo, setting.hi):
        if value == setting.lo and setting.lo_open:
            with pytest.raises(InvalidInput):
                queuectl.validate_config(setting.name, str(value))
        else:
            assert queuectl.validate_config(setting.name, str(value))[1] == value
    for outside in (setting.lo - 1, setting.hi + 1):
        with pytest.raises(InvalidInput):
            queuectl.validate_config(setting.name, str(outside))


###############################################################################
# RFC 3339
###############################################################################


@pytest.mark.parametrize("ts, text", [
    (0, "1970-01-01T00:00:00.000Z"),
    (1896080400, "2030-01-31T09:00:00.000Z"),
    (1896080400.5, "2030-01-31T09:00:00.500Z"),
    (1700000000.1239, "2023-11-14T22:13:20.123Z"),  # truncated to milliseconds
])
def test_rfc3339(ts, text):
    assert queuectl.rfc3339(ts) == text


def test_rfc3339_plain_and_none():
    assert queuectl.rfc3339(1896080400.75, precise=False) == "2030-01-31T09:00:00Z"
    assert queuectl.rfc3339(None) is None


@pytest.mark.parametrize("ts", [0.0, 1.0, NOW, NOW + 0.123, 1896080400.999, 4102444800.001, 86400 * 365.25 * 20])
def test_rfc3339_round_trip(ts):
    assert queuectl.parse_rfc3339(queuectl.rfc3339(ts)) == pytest.approx(ts, abs=0.0011)
    # and at millisecond precision the trip is exact
    ms = int(ts * 1000) / 1000
    assert queuectl.parse_rfc3339(queuectl.rfc3339(ms)) == pytest.approx(ms, abs=1e-6)
    assert queuectl.rfc3339(queuectl.parse_rfc3339(queuectl.rfc3339(ts))) == queuectl.rfc3339(ts)


@pytest.mark.parametrize("text, ts", [
    ("2030-01-31T09:00:00Z", 1896080400.0),
    ("2030-01-31t09:00:00z", 1896080400.0),
    ("2030-01-31 09:00:00Z", 1896080400.0),
    ("2030-01-31T11:00:00+02:00", 1896080400.0),
    ("2030-01-31T04:30:00-04:30", 1896080400.0),
    ("2030-01-31T09:00:00.250+00:00", 1896080400.25),
])
def test_parse_rfc3339(text, ts):
    assert queuectl.parse_rfc3339(text) == ts


@pytest.mark.parametrize("text", ["", "now", "2030-01-31", "2030-01-31T09:00:00", "31/01/2030 09:00Z",
                                  "2030-13-01T00:00:00Z", "2030-01-31T25:00:00Z", None, 1896080400])
def test_parse_rfc3339_refuses(text):
    with pytest.raises(ValueError):
        queuectl.parse_rfc3339(text)


###############################################################################
# parse_job_documents
###############################################################################


def test_documents_object():
    assert queuectl.parse_job_documents('{"command": "a"}', "f") == [{"command": "a"}]


def test_documents_pretty_printed_object():
    assert queuectl.parse_job_documents('{\n  "command": "a",\n  "id": "x"\n}\n', "f") == [{"command": "a", "id": "x"}]


def test_documents_array():
    text = '[{"command": "a"}, {"command": "b"}]'
    assert queuectl.parse_job_documents(text, "f") == [{"command": "a"}, {"command": "b"}]


def test_documents_json_lines_with_blank_lines():
    text = '{"command": "a"}\n\n{"command": "b"}\r\n  \n{"command": "c"}'
    assert queuectl.parse_job_documents(text, "f") == [{"command": "a"}, {"command": "b"}, {"command": "c"}]


@pytest.mark.parametrize("text, line", [
    ('{"command": "a"}\n{"command": "b"\n{"command": "c"}\n', 2),
    ('{"command": "a"}\n\n\n{oops}\n', 4),
    ('{"command": "a"}\n{"command": "b"}\nnot json\n', 3),
    ("nope\n", 1),
])
def test_documents_bad_line_is_named(text, line):
    with pytest.raises(InvalidInput) as info:
        queuectl.parse_job_documents(text, "jobs.jsonl")
    message = str(info.value)
    assert "jobs.jsonl line %d" % line in message
    assert "\n" not in message


@pytest.mark.parametrize("text", ["", "   \n\n", "[]"])
def test_documents_empty_input_is_refused(text):
    with pytest.raises(InvalidInput) as info:
        queuectl.parse_job_documents(text, "jobs.json")
    assert "jobs.json" in str(info.value)


###############################################################################
# OutputBuffer
###############################################################################


def test_output_buffer_small_output_is_kept_whole():
    buf = queuectl.OutputBuffer(1024)
    buf.write(b"hello ")
    buf.write(b"world\n")
    assert buf.text() == "hello world\n"
    assert buf.total == 12
    assert buf.dirty


def test_output_buffer_keeps_the_end_and_counts_everything():
    buf = queuectl.OutputBuffer(1000)
    data = b"".join(b"line %05d\n" % i for i in range(1000))  # 11000 bytes
    for i in range(0, len(data), 333):
        buf.write(data[i:i + 333])
    assert buf.total == len(data)
    text = buf.text()
    header, kept = text.split("\n", 1)
    assert kept == data[-1000:].decode()
    assert "10000 earlier bytes not kept" in header
    assert kept.endswith("line 00999\n")


def test_output_buffer_memory_stays_bounded():
    buf = queuectl.OutputBuffer(1024)
    for _ in range(10_000):
        buf.write(b"x" * 100)
    assert buf.size <= 2 * 1024 + 100
    assert buf.total == 1_000_000


def test_output_buffer_exactly_at_limit_is_not_marked():
    buf = queuectl.OutputBuffer(1024)
    buf.write(b"a" * 1024)
    assert buf.text() == "a" * 1024
    buf.write(b"b")
    assert buf.text() == "[... 1 earlier bytes not kept ...]\n" + "a" * 1023 + "b"


def test_output_buffer_replaces_invalid_utf8():
    buf = queuectl.OutputBuffer(1024)
    buf.write(b"caf\xe9 ok \xff\xfe end \xe2\x82")
    text = buf.text()
    assert text.startswith("caf\ufffd ok \ufffd\ufffd end ")
    assert text.endswith("\ufffd")
    text.encode("utf-8")  # always storable


def test_output_buffer_split_multibyte_characters_survive():
    buf = queuectl.OutputBuffer(1024)
    data = "héllo wörld €\n".encode()
    for i in range(len(data)):
        buf.write(data[i:i + 1])
    assert buf.text() == "héllo wörld €\n"


def test_output_buffer_replaces_nul():
    buf = queuectl.OutputBuffer(1024)
    buf.write(b"a\x00b\x00")
    assert buf.text() == "a\ufffdb\ufffd"
    assert "\x00" not in buf.text()


def test_output_buffer_empty():
    buf = queuectl.OutputBuffer(1024)
    assert buf.text() == ""
    assert buf.total == 0
    assert not buf.dirty


# --- statistics -----------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [0.0, 0.0005, 0.001, 0.0011, 0.05, 1.0, 7.3, 3600.0])
def test_run_time_bucket_holds_the_time_within_25_percent(seconds):
    bucket = queuectl.run_time_bucket(seconds)
    upper = queuectl.HIST_BASE * queuectl.HIST_RATIO ** bucket
    assert seconds <= upper + 1e-12
    if seconds > queuectl.HIST_BASE:
        assert upper <= seconds * queuectl.HIST_RATIO + 1e-12


def test_run_time_bucket_caps_absurd_times():
    assert queuectl.run_time_bucket(1e12) == queuectl.HIST_TOP - 1


def test_bucket_percentile():
    hist = {queuectl.run_time_bucket(0.1): 95, queuectl.run_time_bucket(10.0): 5}
    p95 = queuectl.bucket_percentile(hist, 0.95)
    assert 0.1 <= p95 <= 0.125
    assert 10.0 <= queuectl.bucket_percentile(hist, 0.99) <= 12.5
    assert queuectl.bucket_percentile({}, 0.95) is None


def test_summarize_stats_per_queue():
    rows = [
        {"queue": "a", "outcome": "completed", "count": 3, "run_sum": 3.0, "wait_sum": 0.3},
        {"queue": "a", "outcome": "timeout", "count": 1, "run_sum": 5.0, "wait_sum": 0.1},
        {"queue": "a", "outcome": "lost", "count": 2, "run_sum": 0.0, "wait_sum": 0.0},
        {"queue": "b", "outcome": "cancelled", "count": 1, "run_sum": 1.0, "wait_sum": 0.0},
    ]
    out = queuectl.summarize_stats(rows, {"a": {queuectl.run_time_bucket(1.0): 4}}, 120.0)
    a = out["a"]
    assert (a["finished"], a["completed"], a["failed"], a["lost"]) == (4, 3, 1, 2)
    assert a["success_rate"] == 0.75 and a["per_minute"] == 2.0
    assert a["mean_run"] == 2.0 and a["mean_wait"] == 0.1
    assert 1.0 <= a["p95_run"] <= 1.25
    assert out["b"]["success_rate"] is None and out["b"]["cancelled"] == 1


###############################################################################
# config messages (what `queuectl config set` prints)
###############################################################################


@pytest.mark.parametrize("key, value, message", [
    ("max-retries", "three", "config max-retries must be a whole number from 0 to 1000, got \"three\""),
    ("backoff-base", "abc", "config backoff-base must be a number from 1 to 1000, got \"abc\""),
    ("max-retries", "1001", "config max-retries must be a whole number from 0 to 1000, got \"1001\""),
    ("backoff-max", "0", "config backoff-max must be a duration above 0, up to 366d, got \"0\""),
    ("job-timeout", "-5", "config job-timeout must be a duration from 0 to 366d, or none, got \"-5\""),
    ("output-limit", "12", "config output-limit must be a size from 1K to 64M, got \"12\""),
    ("webhook-url", "ftp://x", "config webhook-url must be an http:// or https:// URL, got \"ftp://x\""),
])
def test_config_errors_say_what_is_expected(key, value, message):
    with pytest.raises(InvalidInput) as info:
        queuectl.validate_config(key, value)
    assert str(info.value) == message


@pytest.mark.parametrize("value, expected", [("", ""), ("none", ""), (" ", ""), ("https://h/x", "https://h/x")])
def test_webhook_url_config(value, expected):
    assert queuectl.validate_config("webhook-url", value) == ("webhook-url", expected)


def test_a_lower_bound_is_included_unless_said_otherwise():
    assert queuectl._validate_number(queuectl.Setting("x", int, 1, 1, 100000), "1") == 1
    with pytest.raises(InvalidInput):
        queuectl._validate_number(queuectl.Setting("x", int, 2, 1, 100000, lo_open=True), "1")


###############################################################################
# judge_lost_run: what a rescue does with one lost run
###############################################################################


class Kills:
    def __init__(self):
        self.calls = []

    def __call__(self, *args):
        self.calls.append(args)


def lost_row(**fields):
    row = {"id": "j", "runs": 2, "worker_id": "w1", "host": "host-b", "pid": 4242, "lease_until": NOW + 5,
           "rescues": 0}
    row.update(fields)
    return row


def test_a_lost_local_run_is_killed_by_its_pid():
    kill = Kills()
    assert queuectl.judge_lost_run(lost_row(), NOW, "host-b", 5, kill, 123.0) == ("pending", "worker w1 died")
    assert kill.calls == [(4242, 123.0)]


def test_a_lost_local_run_without_a_pid_is_killed_by_its_variables():
    kill = Kills()
    queuectl.judge_lost_run(lost_row(pid=None), NOW, "host-b", 5, kill, 123.0)
    assert kill.calls == [(None, 123.0, ("j", 2, "w1"))]
    kill = Kills()
    queuectl.judge_lost_run(lost_row(pid=None, worker_id=None), NOW, "host-b", 5, kill, 123.0)
    assert kill.calls == []  # nothing to find it by


@pytest.mark.parametrize("row_host, here", [("host-a", "host-b"), ("host-c", "host-b"), ("host-b", "host-a")])
@pytest.mark.parametrize("pid", [4242, None])
def test_a_run_on_another_host_is_never_killed_from_here(row_host, here, pid):
    kill = Kills()
    queuectl.judge_lost_run(lost_row(host=row_host, pid=pid), NOW, here, 5, kill, 123.0)
    assert kill.calls == []


def test_the_same_host_name_is_compared_by_value():
    kill = Kills()
    queuectl.judge_lost_run(lost_row(host="".join(["host", "-b"]), pid=None), NOW, "host-b", 5, kill, 1.0)
    assert kill.calls == [(None, 1.0, ("j", 2, "w1"))]


@pytest.mark.parametrize("lease_until, why", [
    (NOW - 0.001, "lease of worker w1 expired"),
    (NOW, "worker w1 died"),  # not expired yet: the worker was seen dead
    (NOW + 10, "worker w1 died"),
])
def test_the_reason_says_whether_the_lease_expired_or_the_worker_died(lease_until, why):
    assert queuectl.judge_lost_run(lost_row(lease_until=lease_until), NOW, "elsewhere", 5, Kills(), 1.0) == (
        "pending", why)


@pytest.mark.parametrize("rescues, max_rescues, expected", [
    (0, 0, ("dead", "worker w1 died; lost 1 times, moved to the dead letter queue")),
    (2, 3, ("pending", "worker w1 died")),
    (3, 3, ("dead", "worker w1 died; lost 4 times, moved to the dead letter queue")),
    (4, 3, ("dead", "worker w1 died; lost 5 times, moved to the dead letter queue")),
])
def test_a_run_lost_once_more_than_max_rescues_goes_dead(rescues, max_rescues, expected):
    assert queuectl.judge_lost_run(lost_row(rescues=rescues), NOW, "elsewhere", max_rescues, Kills(), 1.0) == expected
