#!/usr/bin/env python3
"""queuectl: a background job queue for shell commands, in one file.

Queue shell commands, run them with background workers, and trust that every
job runs: priorities, per-job and global timeouts that kill the whole process
tree, retries with exponential backoff, a dead letter queue, leases that rescue
the jobs of crashed workers, graceful shutdown, captured output and a live
dashboard.  The core uses the Python standard library only; SQLite is the
embedded store.

Sections, lower layers first: constants -> errors -> model -> storage ->
executor -> worker and supervisor -> output formatting -> CLI.
"""

__version__ = "0.1.0"

import argparse
import contextlib
import dataclasses
import datetime
import enum
import errno
import json
import logging
import os
import re
import secrets
import select
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import time

log = logging.getLogger("queuectl")

###############################################################################
# Constants and defaults
###############################################################################

#: Every configurable default in one place.  Keys are the names users type in
#: ``queuectl config set KEY VALUE``.
DEFAULTS = {
    "max-retries": 3,  # retries after the first run: at most max-retries + 1 runs
    "backoff-base": 2.0,  # after the n-th failed run wait backoff-base ** n seconds
    "backoff-max": 3600.0,  # ... but never longer than this
    "worker-poll-interval": 1.0,  # idle workers look for due jobs at least this often
    "job-timeout": 300.0,  # global timeout in seconds for jobs without their own; 0 = none
    "lease-seconds": 15.0,  # a job whose worker stops renewing for this long is rescued
    "output-limit": 1048576,  # bytes of output kept per attempt (the end is kept)
    "max-rescues": 5,  # a job whose worker was lost this many times goes to the DLQ
    "kill-grace": 2.0,  # seconds between SIGTERM and SIGKILL when a job is killed
}

PRIORITIES = {"high": 1, "medium": 2, "low": 3}
PRIORITY_NAMES = {v: k for k, v in PRIORITIES.items()}

BUSY_TIMEOUT = 5.0  # seconds a command waits for a locked database
HOUSEKEEPING_INTERVAL = 2.0  # how often idle workers and supervisors rescue lost jobs
STOP_WAIT = 60.0  # how long `worker stop` waits for running jobs before a cold stop
MAX_COMMAND_BYTES = 131071  # Linux MAX_ARG_STRLEN minus the terminating NUL
MAX_ID_LENGTH = 128
ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:@+-]*$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ID_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case

# Exit codes (documented in the README).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_DB = 74  # EX_IOERR: database missing, corrupt, read-only, disk full
EXIT_BUSY = 75  # EX_TEMPFAIL: database locked for longer than the busy timeout; retry later

###############################################################################
# Errors
###############################################################################


class QueuectlError(Exception):
    """An expected failure: printed as one line, exits with ``exit_code``."""

    exit_code = EXIT_ERROR

    def __init__(self, message, exit_code=None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class InvalidInput(QueuectlError):
    exit_code = EXIT_USAGE


class NotFound(QueuectlError):
    exit_code = EXIT_NOT_FOUND


class Conflict(QueuectlError):
    exit_code = EXIT_CONFLICT


class DatabaseError(QueuectlError):
    exit_code = EXIT_DB


class DatabaseBusy(QueuectlError):
    exit_code = EXIT_BUSY


###############################################################################
# Model
###############################################################################


class JobState(str, enum.Enum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"  # failed, will be retried at run_at
    DEAD = "dead"  # in the dead letter queue

    def __str__(self):
        return self.value


STATES = [s.value for s in JobState]

#: Allowed state transitions; the store refuses anything else.
TRANSITIONS = {
    JobState.PENDING: {JobState.PROCESSING},
    JobState.FAILED: {JobState.PROCESSING},
    JobState.PROCESSING: {JobState.COMPLETED, JobState.FAILED, JobState.DEAD, JobState.PENDING},
    JobState.DEAD: {JobState.PENDING},
    JobState.COMPLETED: set(),
}


def can_transition(old, new):
    return JobState(new) in TRANSITIONS[JobState(old)]


#: Job fields a user may give at enqueue time, with their JSON types.
JOB_FIELDS = ("id", "command", "priority", "timeout", "max_retries", "run_at", "delay", "cwd", "env")


@dataclasses.dataclass
class Job:
    id: str
    command: str
    state: str
    priority: int
    max_retries: int
    run_at: float
    created_at: float
    updated_at: float
    timeout: float = None
    attempts: int = 0  # runs that count against the retry budget
    runs: int = 0  # runs started, ever (numbers the attempt history)
    rescues: int = 0  # runs lost to a dead worker or a forced stop
    started_at: float = None
    finished_at: float = None
    worker_id: str = None
    lease_until: float = None
    exit_code: int = None
    last_error: str = None
    cwd: str = None
    env: dict = None
    queue: str = "default"
    seq: int = None

    @classmethod
    def from_row(cls, row):
        data = dict(row)
        data["env"] = json.loads(data["env"]) if data.get("env") else None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def priority_name(self):
        return PRIORITY_NAMES.get(self.priority, str(self.priority))

    def to_dict(self):
        return {
            "id": self.id,
            "command": self.command,
            "state": self.state,
            "priority": self.priority_name,
            "queue": self.queue,
            "attempts": self.attempts,
            "max_retries": self.max_retries,
            "runs": self.runs,
            "rescues": self.rescues,
            "timeout": self.timeout,
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
            "run_at": rfc3339(self.run_at),
            "started_at": rfc3339(self.started_at),
            "finished_at": rfc3339(self.finished_at),
            "worker_id": self.worker_id,
            "lease_until": rfc3339(self.lease_until),
            "exit_code": self.exit_code,
            "last_error": self.last_error,
            "cwd": self.cwd,
            "env": self.env or {},
        }


@dataclasses.dataclass
class Attempt:
    job_id: str
    n: int
    started_at: float
    worker_id: str = None
    host: str = None
    pid: int = None
    ended_at: float = None
    exit_code: int = None
    outcome: str = None  # completed | failed | timeout | error | lost | stopped
    error: str = None
    output: str = ""
    output_bytes: int = 0  # bytes the attempt wrote in all (output keeps the end)

    @classmethod
    def from_row(cls, row):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(row).items() if k in names})

    @property
    def duration(self):
        return None if self.ended_at is None else max(0.0, self.ended_at - self.started_at)

    def to_dict(self, with_output=False):
        d = {
            "n": self.n,
            "worker_id": self.worker_id,
            "host": self.host,
            "pid": self.pid,
            "started_at": rfc3339(self.started_at),
            "ended_at": rfc3339(self.ended_at),
            "duration": None if self.duration is None else round(self.duration, 6),
            "exit_code": self.exit_code,
            "outcome": self.outcome or "running",
            "error": self.error,
            "output_bytes": self.output_bytes,
        }
        if with_output:
            d["output"] = self.output or ""
        return d


# --- time ---------------------------------------------------------------------


def rfc3339(ts, precise=True):
    """Epoch seconds -> RFC 3339 UTC text (None stays None)."""
    if ts is None:
        return None
    dt = datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc)
    if precise:
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (dt.microsecond // 1000)
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text):
    """RFC 3339 text -> epoch seconds; raises ValueError."""
    if not isinstance(text, str) or not re.match(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}", text):
        raise ValueError("not an RFC 3339 timestamp")
    s = text.strip()
    if s[-1] in "Zz":
        s = s[:-1] + "+00:00"
    dt = datetime.datetime.fromisoformat(s.replace("t", "T").replace(" ", "T", 1))
    if dt.tzinfo is None:
        raise ValueError("timestamp needs a time zone (Z or +HH:MM)")
    return dt.timestamp()


# --- policy (pure functions: time is passed in) ---------------------------------


def backoff_delay(failures, base, cap):
    """Seconds to wait after the ``failures``-th failed run: ``base ** failures``, capped."""
    try:
        delay = float(base) ** failures
    except OverflowError:
        delay = float("inf")
    return min(delay, float(cap))


def after_failure(job, cfg, now):
    """Decide what a failed run leads to: ``(JobState.FAILED, retry_at)`` or ``(JobState.DEAD, None)``.

    ``job.attempts`` counts the failed runs including this one; a job runs at most
    ``max_retries + 1`` times.
    """
    failures = job.attempts
    if failures > job.max_retries:
        return JobState.DEAD, None
    return JobState.FAILED, now + backoff_delay(failures, cfg["backoff-base"], cfg["backoff-max"])


def effective_timeout(job, cfg):
    """The per-job timeout wins over the global ``job-timeout``; 0 means no timeout."""
    if job.timeout:
        return float(job.timeout)
    return float(cfg["job-timeout"]) or None


def new_job_id():
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(10))


# --- validation -------------------------------------------------------------------


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def validate_job(spec, cfg, now, cwd=None):
    """Check a user's job object and return a normalised dict ready for the store.

    Raises InvalidInput naming the offending field.  ``cfg`` supplies defaults.
    """
    if not isinstance(spec, dict):
        raise InvalidInput("a job must be a JSON object, got %s" % _json_type(spec))
    unknown = sorted(set(spec) - set(JOB_FIELDS))
    if unknown:
        raise InvalidInput("unknown job field %r (allowed: %s)" % (unknown[0], ", ".join(JOB_FIELDS)))
    job = {}
    jid = spec.get("id")
    if jid is None:
        job["id"] = None
    else:
        job["id"] = validate_id(jid, "id")
    command = spec.get("command")
    if command is None:
        raise InvalidInput("field 'command' is required")
    if not isinstance(command, str):
        raise InvalidInput("field 'command' must be a string, got %s" % _json_type(command))
    if not command.strip():
        raise InvalidInput("field 'command' must not be empty")
    if "\x00" in command:
        raise InvalidInput("field 'command' must not contain NUL bytes")
    if len(command.encode("utf-8", "surrogatepass")) > MAX_COMMAND_BYTES:
        raise InvalidInput("field 'command' is longer than %d bytes" % MAX_COMMAND_BYTES)
    job["command"] = command
    prio = spec.get("priority", "medium")
    if not isinstance(prio, str) or prio.lower() not in PRIORITIES:
        raise InvalidInput("field 'priority' must be one of high, medium, low, got %s" % _short(prio))
    job["priority"] = PRIORITIES[prio.lower()]
    timeout = spec.get("timeout")
    if timeout is not None:
        if not _is_number(timeout) or timeout <= 0 or timeout > 366 * 86400:
            raise InvalidInput("field 'timeout' must be a number of seconds > 0 (at most a year), got %s" % _short(timeout))
        timeout = float(timeout)
    job["timeout"] = timeout
    retries = spec.get("max_retries", cfg["max-retries"])
    if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries <= 1000:
        raise InvalidInput("field 'max_retries' must be an integer from 0 to 1000, got %s" % _short(retries))
    job["max_retries"] = retries
    run_at = now
    if "run_at" in spec and "delay" in spec:
        raise InvalidInput("give either 'run_at' or 'delay', not both")
    if spec.get("run_at") is not None:
        try:
            run_at = parse_rfc3339(spec["run_at"])
        except (ValueError, TypeError) as e:
            raise InvalidInput("field 'run_at' must be an RFC 3339 timestamp such as 2030-01-31T09:00:00Z (%s)" % e)
    if spec.get("delay") is not None:
        delay = spec["delay"]
        if not _is_number(delay) or delay < 0 or delay > 10 * 366 * 86400:
            raise InvalidInput("field 'delay' must be a number of seconds >= 0, got %s" % _short(delay))
        run_at = now + delay
    job["run_at"] = run_at
    base = cwd or os.getcwd()
    jcwd = spec.get("cwd")
    if jcwd is None:
        jcwd = base
    elif not isinstance(jcwd, str) or not jcwd or "\x00" in jcwd:
        raise InvalidInput("field 'cwd' must be a non-empty path string")
    job["cwd"] = os.path.normpath(os.path.join(base, jcwd))
    env = spec.get("env")
    if env is not None:
        if not isinstance(env, dict):
            raise InvalidInput("field 'env' must be an object of strings, got %s" % _json_type(env))
        for k, v in env.items():
            if not ENV_NAME_RE.match(k):
                raise InvalidInput("field 'env' has an invalid variable name %s" % _short(k))
            if not isinstance(v, str) or "\x00" in v:
                raise InvalidInput("field 'env' value of %s must be a string without NUL bytes" % k)
    job["env"] = env or None
    return job


def validate_id(value, what="job id"):
    if not isinstance(value, str):
        raise InvalidInput("field 'id' must be a string, got %s" % _json_type(value))
    if not value or len(value) > MAX_ID_LENGTH or not ID_RE.match(value):
        raise InvalidInput(
            "invalid %s %s: use 1-%d letters, digits and _.:@+- (not starting with one of .:@+-)"
            % (what, _short(value), MAX_ID_LENGTH)
        )
    return value


def _json_type(v):
    if v is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array", dict: "an object"}.get(
        type(v), type(v).__name__
    )


def _short(v, n=40):
    text = json.dumps(v, ensure_ascii=True, default=str)
    return text if len(text) <= n else text[: n - 3] + "..."


def _validate_number(key, text, kind, lo, hi, lo_open=False):
    try:
        value = int(text) if kind is int else float(text)
    except (TypeError, ValueError):
        raise InvalidInput("config %s must be %s, got %s" % (key, "an integer" if kind is int else "a number", _short(text)))
    if value != value or value in (float("inf"), float("-inf")) or value < lo or (lo_open and value == lo) or value > hi:
        raise InvalidInput("config %s must be %s %s and <= %s, got %s" % (key, ">" if lo_open else ">=", lo, hi, _short(text)))
    return value


#: key -> (type, lower bound, upper bound, lower bound excluded, help)
CONFIG_RULES = {
    "max-retries": (int, 0, 1000, False, "retries after the first run (a job runs at most max-retries + 1 times)"),
    "backoff-base": (float, 1, 1000, False, "after the n-th failed run wait backoff-base ** n seconds"),
    "backoff-max": (float, 0, 366 * 86400, True, "longest wait between retries, seconds"),
    "worker-poll-interval": (float, 0, 3600, True, "idle workers look for due jobs this often, seconds"),
    "job-timeout": (float, 0, 366 * 86400, False, "timeout for jobs without their own, seconds (0 = none)"),
    "lease-seconds": (float, 1, 3600, False, "a job is rescued when its worker stops renewing its lease this long"),
    "output-limit": (int, 1024, 64 * 1048576, False, "bytes of output kept per attempt (the end is kept)"),
    "max-rescues": (int, 0, 1000, False, "lost runs (dead worker, forced stop) before a job goes to the DLQ"),
    "kill-grace": (float, 0, 600, False, "seconds between SIGTERM and SIGKILL when a job is killed"),
}


def normalize_config_key(key):
    k = str(key).strip().lower().replace("_", "-")
    if k not in CONFIG_RULES:
        raise InvalidInput("unknown config key %s (known: %s)" % (_short(key), ", ".join(CONFIG_RULES)))
    return k


def validate_config(key, value):
    """Return ``(key, value)`` normalised, or raise InvalidInput; nothing is written."""
    k = normalize_config_key(key)
    kind, lo, hi, lo_open, _ = CONFIG_RULES[k]
    return k, _validate_number(k, value, kind, lo, hi, lo_open)


###############################################################################
# Storage
###############################################################################


class Store:
    """The contract every backend implements.  Times are epoch seconds (floats).

    Every read-modify-write is one atomic transaction.  Methods raise
    DatabaseBusy when the database stays locked past the busy timeout and
    DatabaseError when it is unusable; they never leave a half-written change.
    """

    def enqueue(self, jobs, now):
        """Insert validated jobs (dicts from ``validate_job``) in one transaction.

        A job without id gets a generated one.  A duplicate id refuses the whole
        batch with Conflict naming the id.  Returns the ids in order.  Durable
        on return.
        """
        raise NotImplementedError

    def claim(self, worker_id, host, now, lease):
        """Atomically take the next due job (state pending or failed with
        ``run_at <= now``) by priority, then run_at, then enqueue order; mark it
        processing, owned by ``worker_id`` with a lease until ``now + lease``,
        count the attempt and open its attempt record.  Returns the Job (with
        ``runs`` numbering this attempt) or None.  Two workers never get the
        same job.  When nothing is due the worker is marked idle in the same
        transaction, so an enqueue that commits afterwards sees it and wakes it.
        """
        raise NotImplementedError

    def started(self, job_id, run, pid):
        """Record the process id of a running attempt (for killing its group on rescue)."""
        raise NotImplementedError

    def heartbeat(self, worker_id, job_id=None, run=None, now=None, lease=None, output=None):
        """Renew the worker's heartbeat and, with ``job_id``, the job's lease (and
        store the output so far).  Returns False when the worker no longer owns
        that run (it was rescued): the caller must stop the job and must not
        report a result.
        """
        raise NotImplementedError

    def finish(self, job_id, run, worker_id, state, now, outcome, exit_code=None, error=None,
               output="", output_bytes=0, retry_at=None):
        """Close a run: move the job from processing to ``state`` (completed,
        failed with ``retry_at``, or dead), record exit code, error, output and
        statistics.  Only the owner of ``run`` may finish it: returns False and
        changes nothing otherwise (fencing).
        """
        raise NotImplementedError

    def release(self, job_id, run, worker_id, now, reason):
        """Put an owned running job back to pending without using up a retry
        (forced stop).  Returns False when the caller no longer owns it."""
        raise NotImplementedError

    def rescue(self, now, host, alive, kill):
        """Give back jobs whose owner is gone: leases past ``lease_until``, and
        jobs of workers on ``host`` whose process ``alive(pid, started_at)``
        says is dead.  Each lost run is recorded as outcome ``lost``; the job
        goes back to pending without using up a retry, or to the DLQ after
        ``max-rescues`` lost runs.  ``kill(pid, started_at)`` is called for the
        process group of each lost run that ran on ``host``.  Stale worker
        records are removed.  Returns the rescued job ids.
        """
        raise NotImplementedError

    def get(self, job_id):
        """The Job with that id, or None."""
        raise NotImplementedError

    def attempts(self, job_id, with_output=False):
        """The job's attempt history, oldest first."""
        raise NotImplementedError

    def attempt(self, job_id, n=None):
        """One attempt with its output (the last one when ``n`` is None), or None."""
        raise NotImplementedError

    def list_jobs(self, state=None, limit=100):
        """The ``limit`` most recently updated jobs (optionally of one state), oldest first."""
        raise NotImplementedError

    def counts(self):
        """``{state: number of jobs}`` for every state (zeros included), in constant time."""
        raise NotImplementedError

    def retry_dead(self, job_id, now, reset_attempts=False):
        """Move a dead job back to pending for one more run (its whole budget
        with ``reset_attempts``).  NotFound / Conflict when it is not dead."""
        raise NotImplementedError

    def delete_jobs(self, state=None):
        """Delete jobs of ``state`` (all but processing ones when None) and their
        attempts; running jobs are never deleted.  Returns the number deleted."""
        raise NotImplementedError

    def config(self):
        """The effective configuration: DEFAULTS overlaid with stored values."""
        raise NotImplementedError

    def set_config(self, key, value):
        """Store one validated configuration value."""
        raise NotImplementedError

    def register_worker(self, worker):
        """Insert or replace a worker record (a dict with id, host, pid, ...)."""
        raise NotImplementedError

    def unregister_worker(self, worker_id):
        """Remove a worker record."""
        raise NotImplementedError

    def workers(self):
        """All worker records (dicts), oldest first."""
        raise NotImplementedError

    def wake_addresses(self, host, n):
        """Wake-up addresses of up to ``n`` idle workers on ``host``."""
        raise NotImplementedError

    def close(self):
        raise NotImplementedError


SCHEMA = [
    # 1: the initial schema
    """
    CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        command TEXT NOT NULL,
        state TEXT NOT NULL,
        priority INTEGER NOT NULL,
        queue TEXT NOT NULL DEFAULT 'default',
        timeout REAL,
        max_retries INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        runs INTEGER NOT NULL DEFAULT 0,
        rescues INTEGER NOT NULL DEFAULT 0,
        run_at REAL NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        worker_id TEXT,
        lease_until REAL,
        exit_code INTEGER,
        last_error TEXT,
        cwd TEXT,
        env TEXT
    );
    CREATE INDEX jobs_ready ON jobs(priority, run_at, seq) WHERE state IN ('pending', 'failed');
    CREATE INDEX jobs_lease ON jobs(lease_until) WHERE state = 'processing';
    CREATE INDEX jobs_state_updated ON jobs(state, updated_at, seq);
    CREATE INDEX jobs_updated ON jobs(updated_at, seq);
    CREATE TABLE attempts (
        job_id TEXT NOT NULL,
        n INTEGER NOT NULL,
        worker_id TEXT,
        host TEXT,
        pid INTEGER,
        started_at REAL NOT NULL,
        ended_at REAL,
        exit_code INTEGER,
        outcome TEXT,
        error TEXT,
        output TEXT NOT NULL DEFAULT '',
        output_bytes INTEGER NOT NULL DEFAULT 0
    );
    CREATE UNIQUE INDEX attempts_job ON attempts(job_id, n);
    CREATE TABLE workers (
        id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        pid_started REAL,
        supervisor_pid INTEGER,
        started_at REAL NOT NULL,
        heartbeat_at REAL NOT NULL,
        state TEXT NOT NULL DEFAULT 'idle',
        job_id TEXT,
        wake TEXT
    );
    CREATE TABLE config (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE job_counts (state TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
    CREATE TABLE stats (
        minute INTEGER NOT NULL,
        queue TEXT NOT NULL,
        outcome TEXT NOT NULL,
        count INTEGER NOT NULL,
        run_sum REAL NOT NULL,
        wait_sum REAL NOT NULL,
        PRIMARY KEY (minute, queue, outcome)
    ) WITHOUT ROWID;
    CREATE TRIGGER jobs_count_ins AFTER INSERT ON jobs BEGIN
        INSERT INTO job_counts(state, n) VALUES (NEW.state, 1)
            ON CONFLICT(state) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER jobs_count_del AFTER DELETE ON jobs BEGIN
        UPDATE job_counts SET n = n - 1 WHERE state = OLD.state;
    END;
    CREATE TRIGGER jobs_count_upd AFTER UPDATE OF state ON jobs WHEN OLD.state <> NEW.state BEGIN
        UPDATE job_counts SET n = n - 1 WHERE state = OLD.state;
        INSERT INTO job_counts(state, n) VALUES (NEW.state, 1)
            ON CONFLICT(state) DO UPDATE SET n = n + 1;
    END;
    """,
]

JOB_COLUMNS = (
    "seq, id, command, state, priority, queue, timeout, max_retries, attempts, runs, rescues, run_at, "
    "created_at, updated_at, started_at, finished_at, worker_id, lease_until, exit_code, last_error, cwd, env"
)

SQL_INSERT_JOB = """
INSERT INTO jobs (id, command, state, priority, timeout, max_retries, run_at, created_at, updated_at, cwd, env)
VALUES (:id, :command, 'pending', :priority, :timeout, :max_retries, :run_at, :now, :now, :cwd, :env)
"""
SQL_CLAIM = """
UPDATE jobs SET state = 'processing', worker_id = :worker, lease_until = :lease_until,
       attempts = attempts + 1, runs = runs + 1, started_at = :now, updated_at = :now, finished_at = NULL
WHERE seq = (SELECT seq FROM jobs WHERE state IN ('pending', 'failed') AND run_at <= :now
             ORDER BY priority, run_at, seq LIMIT 1)
RETURNING """ + JOB_COLUMNS
SQL_CLAIM_SELECT = """
SELECT seq FROM jobs WHERE state IN ('pending', 'failed') AND run_at <= :now
ORDER BY priority, run_at, seq LIMIT 1
"""
SQL_CLAIM_UPDATE = """
UPDATE jobs SET state = 'processing', worker_id = :worker, lease_until = :lease_until,
       attempts = attempts + 1, runs = runs + 1, started_at = :now, updated_at = :now, finished_at = NULL
WHERE seq = :seq
"""
SQL_INSERT_ATTEMPT = """
INSERT INTO attempts (job_id, n, worker_id, host, started_at) VALUES (:id, :n, :worker, :host, :now)
"""
SQL_WORKER_STATE = "UPDATE workers SET state = :state, job_id = :job, heartbeat_at = :now WHERE id = :worker"
SQL_SET_PID = "UPDATE attempts SET pid = :pid WHERE job_id = :id AND n = :n"
SQL_OWNS = "SELECT 1 FROM jobs WHERE id = :id AND runs = :n AND worker_id = :worker AND state = 'processing'"
SQL_RENEW = """
UPDATE jobs SET lease_until = :lease_until WHERE id = :id AND runs = :n AND worker_id = :worker AND state = 'processing'
"""
SQL_ATTEMPT_OUTPUT = "UPDATE attempts SET output = :output, output_bytes = :output_bytes WHERE job_id = :id AND n = :n"
SQL_FINISH_JOB = """
UPDATE jobs SET state = :state, worker_id = NULL, lease_until = NULL, exit_code = :exit_code,
       last_error = :error, run_at = COALESCE(:retry_at, run_at), finished_at = :now, updated_at = :now
WHERE id = :id AND runs = :n AND worker_id = :worker AND state = 'processing'
"""
SQL_FINISH_ATTEMPT = """
UPDATE attempts SET ended_at = :now, exit_code = :exit_code, outcome = :outcome, error = :error,
       output = :output, output_bytes = :output_bytes
WHERE job_id = :id AND n = :n
"""
SQL_STATS = """
INSERT INTO stats (minute, queue, outcome, count, run_sum, wait_sum)
VALUES (:minute, :queue, :outcome, 1, :run, :wait)
ON CONFLICT(minute, queue, outcome) DO UPDATE SET count = count + 1, run_sum = run_sum + :run, wait_sum = wait_sum + :wait
"""
SQL_LOSE_JOB = """
UPDATE jobs SET state = :state, worker_id = NULL, lease_until = NULL, attempts = MAX(attempts - 1, 0),
       rescues = rescues + :lost, last_error = :error, run_at = :now, updated_at = :now,
       finished_at = CASE WHEN :state = 'dead' THEN :now ELSE NULL END
WHERE id = :id AND runs = :n AND state = 'processing'
"""
SQL_LOSE_ATTEMPT = "UPDATE attempts SET ended_at = :now, outcome = :outcome, error = :error WHERE job_id = :id AND n = :n"
SQL_LOST_JOBS = """
SELECT j.id, j.runs, j.rescues, j.queue, j.worker_id, j.lease_until, a.host, a.pid, a.started_at
FROM jobs j LEFT JOIN attempts a ON a.job_id = j.id AND a.n = j.runs
WHERE j.state = 'processing' AND j.lease_until < :now
"""
SQL_JOBS_OF_WORKER = """
SELECT j.id, j.runs, j.rescues, j.queue, j.worker_id, j.lease_until, a.host, a.pid, a.started_at
FROM jobs j LEFT JOIN attempts a ON a.job_id = j.id AND a.n = j.runs
WHERE j.state = 'processing' AND j.worker_id = :worker
"""
SQL_ANY_EXPIRED = "SELECT 1 FROM jobs WHERE state = 'processing' AND lease_until < :now LIMIT 1"
SQL_GET_JOB = "SELECT " + JOB_COLUMNS + " FROM jobs WHERE id = :id"
SQL_ATTEMPTS = """
SELECT job_id, n, worker_id, host, pid, started_at, ended_at, exit_code, outcome, error, output_bytes{output}
FROM attempts WHERE job_id = :id ORDER BY n
"""
SQL_ATTEMPT_ONE = "SELECT * FROM attempts WHERE job_id = :id AND n = :n"
SQL_ATTEMPT_LAST = "SELECT * FROM attempts WHERE job_id = :id ORDER BY n DESC LIMIT 1"
SQL_LIST_ALL = "SELECT " + JOB_COLUMNS + " FROM jobs ORDER BY updated_at DESC, seq DESC LIMIT :limit"
SQL_LIST_STATE = (
    "SELECT " + JOB_COLUMNS + " FROM jobs WHERE state = :state ORDER BY updated_at DESC, seq DESC LIMIT :limit"
)
SQL_COUNTS = "SELECT state, n FROM job_counts"
SQL_RETRY_DEAD = """
UPDATE jobs SET state = 'pending', run_at = :now, updated_at = :now, finished_at = NULL,
       attempts = CASE WHEN :reset THEN 0 ELSE MAX(attempts, max_retries) END,
       rescues = CASE WHEN :reset THEN 0 ELSE rescues END
WHERE id = :id AND state = 'dead'
"""
SQL_DELETE_ATTEMPTS_STATE = "DELETE FROM attempts WHERE job_id IN (SELECT id FROM jobs WHERE state = :state)"
SQL_DELETE_JOBS_STATE = "DELETE FROM jobs WHERE state = :state"
SQL_CONFIG_ALL = "SELECT key, value FROM config"
SQL_CONFIG_SET = "INSERT INTO config (key, value) VALUES (:key, :value) ON CONFLICT(key) DO UPDATE SET value = :value"
SQL_WORKER_UPSERT = """
INSERT OR REPLACE INTO workers (id, host, pid, pid_started, supervisor_pid, started_at, heartbeat_at, state, job_id, wake)
VALUES (:id, :host, :pid, :pid_started, :supervisor_pid, :now, :now, 'idle', NULL, :wake)
"""
SQL_WORKER_DELETE = "DELETE FROM workers WHERE id = :worker"
SQL_WORKERS = "SELECT * FROM workers ORDER BY started_at, id"
SQL_WORKER_HEARTBEAT = "UPDATE workers SET heartbeat_at = :now WHERE id = :worker"
SQL_WAKE = "SELECT wake FROM workers WHERE host = :host AND state = 'idle' AND wake IS NOT NULL LIMIT :n"


def default_db_path():
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "queuectl", "queuectl.db")


def _db_error(exc, path):
    """Translate a sqlite3 exception into a QueuectlError with a clear message."""
    text = str(exc)
    low = text.lower()
    if "locked" in low or "busy" in low:
        return DatabaseBusy("database %s is locked by another process (busy for more than %gs); try again" % (path, BUSY_TIMEOUT))
    if "readonly" in low or "read-only" in low:
        return DatabaseError("database %s is read-only: %s" % (path, text))
    if "not a database" in low or "malformed" in low or "corrupt" in low:
        return DatabaseError("database %s is not a usable queuectl database (%s)" % (path, text))
    if "disk is full" in low or "disk i/o" in low or "full" in low:
        return DatabaseError("cannot write database %s: %s" % (path, text))
    if "unable to open" in low:
        return DatabaseError("cannot open database %s (%s)" % (path, text))
    if "no such table" in low or "no such column" in low:
        return DatabaseError("database %s is not a queuectl database or was damaged (%s)" % (path, text))
    return DatabaseError("database %s: %s" % (path, text))


class SqliteStore(Store):
    """The embedded store: one SQLite file in WAL mode.

    Each process opens its own connection.  Writes use ``BEGIN IMMEDIATE`` so
    they queue on the busy timeout instead of failing on a lock upgrade;
    readers never block writers.  ``synchronous=FULL``: a returned enqueue is on
    disk.
    """

    def __init__(self, path, create=True):
        self.path = path
        self.readonly = False
        if path != ":memory:":
            directory = os.path.dirname(os.path.abspath(path)) or "."
            if not os.path.isdir(directory):
                raise DatabaseError("cannot create database %s: directory %s does not exist" % (path, directory))
            if not os.path.exists(path):
                if not create:
                    raise NotFound("database %s does not exist" % path)
                if not os.access(directory, os.W_OK):
                    raise DatabaseError("cannot create database %s: directory %s is not writable" % (path, directory))
            elif os.path.isdir(path):
                raise DatabaseError("cannot open database %s: it is a directory" % path)
        try:
            self.conn = self._connect()
            self._migrate()
        except sqlite3.Error as e:
            raise _db_error(e, path) from None
        self._has_returning = sqlite3.sqlite_version_info >= (3, 35, 0)

    def _connect(self):
        path = self.path
        if path != ":memory:" and os.path.exists(path) and not os.access(path, os.W_OK):
            self.readonly = True
            uri = "file:%s?mode=ro" % _uri_path(path)
            conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
        else:
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = %d" % int(BUSY_TIMEOUT * 1000))
        if not self.readonly:
            conn.execute("PRAGMA synchronous = FULL")
        return conn

    def _migrate(self):
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(SCHEMA):
            raise DatabaseError(
                "database %s has schema version %d, newer than this queuectl %s understands (%d)"
                % (self.path, version, __version__, len(SCHEMA))
            )
        if version == len(SCHEMA):
            return
        if self.readonly:
            raise DatabaseError("database %s is read-only and needs a schema upgrade" % self.path)
        if version == 0 and self.path != ":memory:":
            with contextlib.suppress(sqlite3.OperationalError):  # another process may be creating it
                self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]  # another process may have won
            if version == 0 and self.conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                # A file that has tables but no queuectl schema is not ours: refuse to touch it.
                raise DatabaseError("%s is an SQLite database but not a queuectl one; refusing to modify it" % self.path)
            for number in range(version, len(SCHEMA)):
                for statement in _split_sql(SCHEMA[number]):
                    self.conn.execute(statement)
                self.conn.execute("PRAGMA user_version = %d" % (number + 1))
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    # --- transactions -----------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self):
        """One write transaction (BEGIN IMMEDIATE ... COMMIT); errors are translated."""
        if self.readonly:
            raise DatabaseError("database %s is read-only: this command needs to write" % self.path)
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise _db_error(e, self.path) from None
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except sqlite3.Error as e:
            self._rollback()
            raise _db_error(e, self.path) from None
        except BaseException:
            self._rollback()
            raise

    def _rollback(self):
        try:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def _read(self, sql, params=(), one=False):
        try:
            cur = self.conn.execute(sql, params)
            return cur.fetchone() if one else cur.fetchall()
        except sqlite3.Error as e:
            raise _db_error(e, self.path) from None

    # --- jobs ---------------------------------------------------------------------

    def enqueue(self, jobs, now):
        ids = []
        with self._tx() as conn:
            for job in jobs:
                row = dict(job, now=now, env=json.dumps(job["env"]) if job.get("env") else None)
                given = row.get("id")
                for _ in range(20):
                    row["id"] = given or new_job_id()
                    try:
                        conn.execute(SQL_INSERT_JOB, row)
                        break
                    except sqlite3.IntegrityError:
                        if given:
                            raise Conflict("a job with id %s already exists" % _short(given)) from None
                else:  # pragma: no cover - 20 collisions of 50-bit random ids
                    raise QueuectlError("could not generate a unique job id")
                ids.append(row["id"])
        return ids

    def claim(self, worker_id, host, now, lease):
        params = {"worker": worker_id, "now": now, "lease_until": now + lease, "host": host}
        with self._tx() as conn:
            if self._has_returning:
                rows = conn.execute(SQL_CLAIM, params).fetchall()
                row = rows[0] if rows else None
            else:  # pragma: no cover - SQLite before 3.35
                hit = conn.execute(SQL_CLAIM_SELECT, params).fetchone()
                row = None
                if hit:
                    conn.execute(SQL_CLAIM_UPDATE, dict(params, seq=hit[0]))
                    row = conn.execute("SELECT " + JOB_COLUMNS + " FROM jobs WHERE seq = ?", (hit[0],)).fetchone()
            if row is None:
                conn.execute(SQL_WORKER_STATE, {"state": "idle", "job": None, "now": now, "worker": worker_id})
                return None
            job = Job.from_row(row)
            conn.execute(SQL_INSERT_ATTEMPT, {"id": job.id, "n": job.runs, "worker": worker_id, "host": host, "now": now})
            conn.execute(SQL_WORKER_STATE, {"state": "busy", "job": job.id, "now": now, "worker": worker_id})
        return job

    def started(self, job_id, run, pid):
        with self._tx() as conn:
            conn.execute(SQL_SET_PID, {"pid": pid, "id": job_id, "n": run})

    def heartbeat(self, worker_id, job_id=None, run=None, now=None, lease=None, output=None):
        now = time.time() if now is None else now
        with self._tx() as conn:
            conn.execute(SQL_WORKER_HEARTBEAT, {"now": now, "worker": worker_id})
            if job_id is None:
                return True
            p = {"id": job_id, "n": run, "worker": worker_id, "lease_until": now + lease}
            if conn.execute(SQL_RENEW, p).rowcount != 1:
                return False
            if output is not None:
                conn.execute(SQL_ATTEMPT_OUTPUT, {"id": job_id, "n": run, "output": output[0], "output_bytes": output[1]})
            return True

    def finish(self, job_id, run, worker_id, state, now, outcome, exit_code=None, error=None,
               output="", output_bytes=0, retry_at=None):
        state = JobState(state)
        if not can_transition(JobState.PROCESSING, state) or state is JobState.PENDING:
            raise ValueError("cannot finish a run into state %s" % state)
        p = {"id": job_id, "n": run, "worker": worker_id, "state": state.value, "now": now, "exit_code": exit_code,
             "error": error, "retry_at": retry_at, "outcome": outcome, "output": output or "", "output_bytes": output_bytes}
        with self._tx() as conn:
            row = conn.execute("SELECT queue, created_at, run_at, started_at FROM jobs WHERE id = :id AND runs = :n "
                               "AND worker_id = :worker AND state = 'processing'", p).fetchone()
            if row is None:
                return False
            conn.execute(SQL_FINISH_JOB, p)
            conn.execute(SQL_FINISH_ATTEMPT, p)
            conn.execute(SQL_WORKER_STATE, {"state": "busy", "job": None, "now": now, "worker": worker_id})
            started = row["started_at"] or now
            conn.execute(SQL_STATS, {"minute": int(now // 60), "queue": row["queue"], "outcome": outcome,
                                     "run": now - started, "wait": max(0.0, started - row["run_at"])})
        return True

    def release(self, job_id, run, worker_id, now, reason):
        p = {"id": job_id, "n": run, "worker": worker_id, "now": now, "state": "pending", "lost": 1,
             "error": reason, "outcome": "stopped"}
        with self._tx() as conn:
            if conn.execute(SQL_OWNS, p).fetchone() is None:
                return False
            conn.execute(SQL_LOSE_JOB, p)
            conn.execute(SQL_LOSE_ATTEMPT, p)
            conn.execute(SQL_WORKER_STATE, {"state": "busy", "job": None, "now": now, "worker": worker_id})
        return True

    def rescue(self, now, host, alive, kill):
        cfg = self.config()
        stale_cutoff = now - max(4 * float(cfg["lease-seconds"]), 60.0)
        dead = [w["id"] for w in self.workers()
                if (w["host"] == host and not alive(w["pid"], w["pid_started"]))
                or (w["host"] != host and w["heartbeat_at"] < stale_cutoff)]
        if not dead and self._read(SQL_ANY_EXPIRED, {"now": now}, one=True) is None:
            return []  # the common case: a read, no write lock taken
        rescued = []
        with self._tx() as conn:
            lost = list(conn.execute(SQL_LOST_JOBS, {"now": now}))
            for worker_id in dead:
                lost.extend(conn.execute(SQL_JOBS_OF_WORKER, {"worker": worker_id}))
            for row in lost:
                if row["id"] in rescued:
                    continue
                if row["host"] == host and row["pid"]:
                    kill(row["pid"], row["started_at"])
                if row["lease_until"] < now:
                    why = "lease of worker %s expired" % row["worker_id"]
                else:
                    why = "worker %s died" % row["worker_id"]
                state = "pending"
                if row["rescues"] + 1 > int(cfg["max-rescues"]):
                    state = "dead"
                    why += "; lost %d times, moved to the dead letter queue" % (row["rescues"] + 1)
                p = {"id": row["id"], "n": row["runs"], "now": now, "state": state, "lost": 1, "error": why,
                     "outcome": "lost"}
                conn.execute(SQL_LOSE_JOB, p)
                conn.execute(SQL_LOSE_ATTEMPT, p)
                conn.execute(SQL_STATS, {"minute": int(now // 60), "queue": row["queue"], "outcome": "lost",
                                         "run": 0.0, "wait": 0.0})
                rescued.append(row["id"])
            for worker_id in dead:
                conn.execute(SQL_WORKER_DELETE, {"worker": worker_id})
        return rescued

    def get(self, job_id):
        row = self._read(SQL_GET_JOB, {"id": job_id}, one=True)
        return Job.from_row(row) if row else None

    def attempts(self, job_id, with_output=False):
        sql = SQL_ATTEMPTS.format(output=", output" if with_output else "")
        return [Attempt.from_row(r) for r in self._read(sql, {"id": job_id})]

    def attempt(self, job_id, n=None):
        if n is None:
            row = self._read(SQL_ATTEMPT_LAST, {"id": job_id}, one=True)
        else:
            row = self._read(SQL_ATTEMPT_ONE, {"id": job_id, "n": n}, one=True)
        return Attempt.from_row(row) if row else None

    def list_jobs(self, state=None, limit=100):
        if state:
            rows = self._read(SQL_LIST_STATE, {"state": str(state), "limit": limit})
        else:
            rows = self._read(SQL_LIST_ALL, {"limit": limit})
        return [Job.from_row(r) for r in reversed(rows)]

    def counts(self):
        result = {s: 0 for s in STATES}
        for row in self._read(SQL_COUNTS):
            result[row["state"]] = row["n"]
        return result

    def retry_dead(self, job_id, now, reset_attempts=False):
        with self._tx() as conn:
            cur = conn.execute(SQL_RETRY_DEAD, {"id": job_id, "now": now, "reset": bool(reset_attempts)})
            if cur.rowcount == 1:
                return True
            row = conn.execute("SELECT state FROM jobs WHERE id = :id", {"id": job_id}).fetchone()
        if row is None:
            raise NotFound("no job with id %s" % _short(job_id))
        raise Conflict("job %s is %s, not dead: only jobs in the dead letter queue can be retried" % (job_id, row[0]))

    def delete_jobs(self, state=None):
        states = [str(state)] if state else [s for s in STATES if s != "processing"]
        if "processing" in states:
            raise Conflict("running jobs cannot be cleared; stop the workers first")
        deleted = 0
        with self._tx() as conn:
            for s in states:
                conn.execute(SQL_DELETE_ATTEMPTS_STATE, {"state": s})
                deleted += conn.execute(SQL_DELETE_JOBS_STATE, {"state": s}).rowcount
        return deleted

    # --- configuration ---------------------------------------------------------------

    def config(self):
        cfg = dict(DEFAULTS)
        for row in self._read(SQL_CONFIG_ALL):
            if row["key"] in cfg:
                try:
                    cfg[row["key"]] = json.loads(row["value"])
                except ValueError:
                    pass
        return cfg

    def set_config(self, key, value):
        with self._tx() as conn:
            conn.execute(SQL_CONFIG_SET, {"key": key, "value": json.dumps(value)})

    # --- workers ---------------------------------------------------------------------

    def register_worker(self, worker):
        with self._tx() as conn:
            conn.execute(SQL_WORKER_UPSERT, worker)

    def unregister_worker(self, worker_id):
        with self._tx() as conn:
            conn.execute(SQL_WORKER_DELETE, {"worker": worker_id})

    def workers(self):
        return [dict(r) for r in self._read(SQL_WORKERS)]

    def wake_addresses(self, host, n):
        return [r[0] for r in self._read(SQL_WAKE, {"host": host, "n": n})]

    def close(self):
        with contextlib.suppress(Exception):
            self.conn.close()


def _uri_path(path):
    from urllib.parse import quote

    return quote(os.path.abspath(path))


def _split_sql(script):
    """Split a schema script into statements (triggers contain inner semicolons)."""
    statements, current = [], []
    for line in script.strip().splitlines():
        current.append(line)
        text = "\n".join(current).strip()
        if text.endswith(";") and sqlite3.complete_statement(text):
            statements.append(text)
            current = []
    if "\n".join(current).strip():
        statements.append("\n".join(current).strip())
    return statements


def open_store(db, create=True):
    """Open the store named by a path (SQLite) or a URL."""
    if re.match(r"^postgres(ql)?://", db or ""):
        raise InvalidInput("PostgreSQL URLs are not supported by this build yet")
    return SqliteStore(db, create=create)


###############################################################################
# Executor
###############################################################################


def process_started_at(pid):
    """When process ``pid`` started, in epoch seconds (Linux), or None if unknown/gone."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read().decode("ascii", "replace")
        ticks = int(stat[stat.rindex(")") + 2:].split()[19])
        return _boot_time() + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


_BOOT_TIME = []


def _boot_time():
    if not _BOOT_TIME:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    _BOOT_TIME.append(float(line.split()[1]))
                    break
            else:  # pragma: no cover
                _BOOT_TIME.append(0.0)
    return _BOOT_TIME[0]


def pid_alive(pid, started_at=None):
    """Is ``pid`` running and (when known) the same process that started at ``started_at``?"""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if started_at:
        actual = process_started_at(pid)
        if actual is not None and abs(actual - started_at) > 2.0:
            return False  # the pid was reused by another process
    try:  # a zombie is not alive
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read()
        if stat[stat.rindex(b")") + 2:][:1] == b"Z":
            return False
    except (OSError, ValueError):
        pass
    return True


def kill_group(pgid, sig):
    """Send ``sig`` to a process group; False when the group is empty."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False


def group_alive(pgid):
    """Does process group ``pgid`` still have a live (non-zombie) member?"""
    if not kill_group(pgid, 0):
        return False
    if not os.path.isdir("/proc"):
        return True
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def kill_lost_group(pid, started_at):
    """Kill the process group of a lost run, unless its leader pid now belongs to someone else."""
    if not pid:
        return
    actual = process_started_at(pid)
    if actual is not None and started_at and actual < started_at - 2.0:
        return  # the pid belongs to a process older than the run: not ours
    kill_group(pid, signal.SIGKILL)


class OutputBuffer:
    """Keeps the last ``limit`` bytes of a stream and counts all of them."""

    def __init__(self, limit):
        self.limit = int(limit)
        self.chunks = []
        self.size = 0
        self.total = 0
        self.dirty = False

    def write(self, data):
        self.total += len(data)
        self.chunks.append(data)
        self.size += len(data)
        self.dirty = True
        if self.size > 2 * self.limit:
            self._trim()

    def _trim(self):
        data = b"".join(self.chunks)[-self.limit:]
        self.chunks = [data]
        self.size = len(data)

    def text(self):
        self._trim()
        data = self.chunks[0] if self.chunks else b""
        text = data.decode("utf-8", "replace")
        if self.total > len(data):
            text = "[... %d earlier bytes not kept ...]\n" % (self.total - len(data)) + text
        return text.replace("\x00", "\ufffd")


@dataclasses.dataclass
class RunResult:
    outcome: str  # completed | failed | timeout | error | stopped | lost
    exit_code: int = None
    error: str = None
    output: str = ""
    output_bytes: int = 0


def describe_exit(code):
    if code is None:
        return None
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "signal %d" % -code
        return "killed by %s" % name
    return "exit code %d" % code


def run_command(job, timeout, output_limit, kill_grace, events):
    """Run one job's command in its own session and process group.

    ``events`` is an object with ``poll_fds()`` (extra fds to wake on),
    ``on_start(pid)``, ``tick(now, output_buffer) -> None | 'stop' | 'lost'``
    (called on wake-ups and at least every ``events.interval`` seconds).  A
    timeout, a stop or a lost lease kills the whole group: SIGTERM, then
    SIGKILL after ``kill_grace`` seconds.
    """
    env = dict(os.environ)
    env.update(job.env or {})
    env["QUEUECTL_JOB_ID"] = job.id
    env["QUEUECTL_ATTEMPT"] = str(job.runs)
    buf = OutputBuffer(output_limit)
    try:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", job.command], cwd=job.cwd or None, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
        )
    except OSError as e:
        reason = e.strerror or str(e)
        if job.cwd and not os.path.isdir(job.cwd):
            reason = "working directory %s does not exist" % job.cwd
        return RunResult("error", None, "cannot start: %s" % reason)
    started = time.monotonic()
    deadline = started + timeout if timeout else None
    events.on_start(proc.pid)
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    pidfd = None
    if hasattr(os, "pidfd_open"):
        with contextlib.suppress(OSError):
            pidfd = os.pidfd_open(proc.pid)
    result = None
    stream_open = True
    try:
        while True:
            now_m = time.monotonic()
            if proc.poll() is not None:
                break
            if deadline is not None and now_m >= deadline:
                _terminate(proc, kill_grace)
                result = RunResult("timeout", proc.returncode,
                                   "timed out after %gs; process group killed" % timeout)
                break
            wait = events.interval
            if deadline is not None:
                wait = min(wait, deadline - now_m)
            if pidfd is None:
                wait = min(wait, 0.05)
            fds = list(events.poll_fds())
            if stream_open:
                fds.append(fd)
            if pidfd is not None:
                fds.append(pidfd)
            try:
                ready, _, _ = select.select(fds, [], [], max(0.0, wait))
            except InterruptedError:  # pragma: no cover - PEP 475 retries
                ready = []
            if stream_open and fd in ready:
                stream_open = _drain(fd, buf)
            verdict = events.tick(time.time(), buf)
            if verdict in ("stop", "lost"):
                _terminate(proc, kill_grace)
                result = RunResult("stopped" if verdict == "stop" else "lost", proc.returncode,
                                   "stopped by a forced worker stop" if verdict == "stop" else "lease lost")
                break
        if stream_open:
            _drain(fd, buf)
    finally:
        if proc.poll() is None:  # an exception: never leave the group behind
            _terminate(proc, kill_grace)
        proc.stdout.close()
        if pidfd is not None:
            os.close(pidfd)
    if result is None:
        code = proc.returncode
        if code == 0:
            result = RunResult("completed", 0)
        else:
            result = RunResult("failed", code, describe_exit(code))
    result.output = buf.text()
    result.output_bytes = buf.total
    return result


def _drain(fd, buf):
    """Read what is available; False at end of stream."""
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        buf.write(data)


def _terminate(proc, grace):
    """SIGTERM the whole group, wait up to ``grace`` for it to empty, then SIGKILL it."""
    pgid = proc.pid
    kill_group(pgid, signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end:
        proc.poll()
        if proc.returncode is not None and not group_alive(pgid):
            break
        time.sleep(0.01)
    kill_group(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


###############################################################################
# Worker and supervisor
###############################################################################

HOST = socket.gethostname()


def wake_address(db_path, worker_id):
    """Abstract-namespace unix socket name of a worker (Linux); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import hashlib

    digest = hashlib.sha1(os.path.realpath(db_path).encode()).hexdigest()[:12]
    return "queuectl/%s/%s" % (digest, worker_id)


def wake_workers(store, n):
    """Nudge up to ``n`` idle local workers so they claim at once instead of at their next poll."""
    try:
        addresses = store.wake_addresses(HOST, n)
    except QueuectlError:
        return
    if not addresses:
        return
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.setblocking(False)
        for addr in addresses:
            with contextlib.suppress(OSError):
                s.sendto(b"!", "\0" + addr)
    finally:
        s.close()


class Worker:
    """One worker process: claims jobs one at a time and runs them.

    Signals only set flags: the first SIGTERM/SIGINT asks for a graceful stop
    (finish the current job, claim nothing new), a second one or SIGQUIT asks
    for a cold stop (kill the job's process group, give the job back).
    """

    def __init__(self, db_path, store=None, supervisor_pid=None, poll_interval=None, burst=False):
        self.db_path = db_path
        self.burst = burst
        self.store = store or open_store(db_path)
        self.pid = os.getpid()
        self.id = "%s-%d-%s" % (HOST, self.pid, secrets.token_hex(2))
        self.supervisor_pid = supervisor_pid
        self.stop_level = 0
        self.poll_override = poll_interval
        self.cfg = dict(DEFAULTS)
        self._rescued_at = float("-inf")
        self._beat_at = float("-inf")
        self._wake_r, self._wake_w = os.pipe()  # signal handlers write here (set_wakeup_fd)
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self._sock = None
        self.jobs_done = 0

    def _on_signal(self, signum, frame):
        self.stop_level = 2 if signum == signal.SIGQUIT else self.stop_level + 1

    def _install_signals(self):
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def wake_fds(self):
        return [self._wake_r] + ([self._sock.fileno()] if self._sock else [])

    def drain_wakeups(self):
        for fd in self.wake_fds():
            with contextlib.suppress(OSError):
                while os.read(fd, 4096):
                    pass

    def _open_wake_socket(self):
        addr = wake_address(self.db_path, self.id)
        if addr is None:
            return None
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            s.bind("\0" + addr)
        except OSError:
            s.close()
            return None
        s.setblocking(False)
        self._sock = s
        return addr

    def config(self):
        """The stored configuration, re-read before every claim so `config set` applies at once."""
        self.cfg = self.store.config()
        return self.cfg

    def register(self):
        self.store.register_worker({
            "id": self.id, "host": HOST, "pid": self.pid, "pid_started": process_started_at(self.pid),
            "supervisor_pid": self.supervisor_pid, "now": time.time(), "wake": self._open_wake_socket(),
        })

    def run(self):
        """Run until asked to stop; returns an exit status."""
        self._install_signals()
        self.register()
        log.info("worker %s started (pid %d)", self.id, self.pid)
        try:
            while self.stop_level == 0:
                if self.supervisor_pid and os.getppid() != self.supervisor_pid:
                    log.warning("worker %s: supervisor %d is gone; stopping", self.id, self.supervisor_pid)
                    break
                if not self.step():
                    if self.burst:
                        break  # burst mode: nothing is due, so the work is done
                    self.idle_wait()
        finally:
            with contextlib.suppress(QueuectlError):
                self.store.unregister_worker(self.id)
            if self._sock:
                self._sock.close()
            log.info("worker %s stopped after %d job(s)", self.id, self.jobs_done)
        return 0

    def step(self, now=None):
        """Housekeeping, then claim and run at most one job.  True if a job ran."""
        now = time.time() if now is None else now
        try:
            cfg = self.config()
            lease = float(cfg["lease-seconds"])
            if now - self._rescued_at >= HOUSEKEEPING_INTERVAL:
                self._rescued_at = now
                self.store.rescue(now, HOST, pid_alive, kill_lost_group)
            if now - self._beat_at >= lease / 3.0:
                self._beat_at = now
                self.store.heartbeat(self.id, now=now)
            job = self.store.claim(self.id, HOST, now, lease)
        except DatabaseBusy as e:
            log.warning("worker %s: %s", self.id, e)
            return False
        if job is None:
            return False
        self.execute(job, cfg)
        self.jobs_done += 1
        return True

    def idle_wait(self):
        """Sleep until woken by an enqueue or a signal, or the poll interval passes."""
        interval = self.poll_override or float(self.cfg["worker-poll-interval"])
        with contextlib.suppress(InterruptedError):
            select.select(self.wake_fds(), [], [], min(interval, HOUSEKEEPING_INTERVAL))
        self.drain_wakeups()

    def execute(self, job, cfg):
        """Run a claimed job to its end and record the result (fenced by run number)."""
        log.info("job %s attempt %d started: %s", job.id, job.runs, _one_line(job.command, 80))
        monitor = JobMonitor(self, job, float(cfg["lease-seconds"]))
        result = run_command(job, effective_timeout(job, cfg), cfg["output-limit"], float(cfg["kill-grace"]), monitor)
        now = time.time()
        if result.outcome == "lost":
            log.warning("job %s attempt %d: lease lost to another worker; result discarded", job.id, job.runs)
            return
        if result.outcome == "stopped":
            self._retrying(lambda: self.store.release(job.id, job.runs, self.id, now, "stopped by a forced worker stop"))
            log.info("job %s attempt %d stopped and put back in the queue", job.id, job.runs)
            return
        if result.outcome == "completed":
            state, retry_at = JobState.COMPLETED, None
        else:
            state, retry_at = after_failure(job, cfg, now)
        ok = self._retrying(lambda: self.store.finish(
            job.id, job.runs, self.id, state, now, result.outcome, result.exit_code, result.error,
            result.output, result.output_bytes, retry_at))
        if not ok:
            log.warning("job %s attempt %d: no longer owned by this worker; result discarded", job.id, job.runs)
        elif state is JobState.FAILED:
            log.info("job %s attempt %d %s (%s); retry at %s", job.id, job.runs, result.outcome, result.error,
                     rfc3339(retry_at, precise=False))
        else:
            log.info("job %s attempt %d %s%s", job.id, job.runs, state.value,
                     "" if state is JobState.COMPLETED else " (%s)" % result.error)

    def _retrying(self, fn):
        """Record a result even through a busy database: retry until it lands or the lease is gone."""
        deadline = time.monotonic() + float(self.cfg["lease-seconds"])
        while True:
            try:
                return fn()
            except DatabaseBusy:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


class JobMonitor:
    """What a worker does while its job runs: record the pid, renew the lease,
    publish the output so far, and notice stop requests and lost leases."""

    def __init__(self, worker, job, lease):
        self.worker, self.job, self.lease = worker, job, lease
        self.interval = max(0.05, min(lease / 3.0, 1.0))
        self.next_beat = time.time() + lease / 3.0
        self.flushed_at = time.time()

    def poll_fds(self):
        return self.worker.wake_fds()

    def on_start(self, pid):
        with contextlib.suppress(QueuectlError):
            self.worker.store.started(self.job.id, self.job.runs, pid)

    def tick(self, now, buf):
        """Called on every wake-up; returns None, 'stop' (cold stop) or 'lost' (lease gone)."""
        self.worker.drain_wakeups()
        if self.worker.stop_level >= 2:
            return "stop"
        flush = buf.dirty and now - self.flushed_at >= 1.0
        if now < self.next_beat and not flush:
            return None
        output = None
        if buf.dirty:
            output = (buf.text(), buf.total)
            buf.dirty = False
            self.flushed_at = now
        try:
            if not self.worker.store.heartbeat(self.worker.id, self.job.id, self.job.runs, now, self.lease, output):
                return "lost"
            self.next_beat = now + self.lease / 3.0
        except DatabaseBusy:
            buf.dirty = buf.dirty or output is not None  # try again at the next tick; the lease has slack
        return None


def _one_line(text, n):
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


class Supervisor:
    """Runs ``count`` worker processes (forked), restarts any that die, rescues
    their jobs at once, and passes stop requests on to them."""

    def __init__(self, db_path, count, poll_interval=None, burst=False):
        self.db_path = db_path
        self.burst = burst
        self.count = count
        self.poll_interval = poll_interval
        self.children = {}  # pid -> started (monotonic)
        self.stop_level = 0
        self.pid = os.getpid()
        self._failures = 0

    def _on_signal(self, signum, frame):
        if signum == signal.SIGQUIT:
            self.stop_level = 2
        else:
            self.stop_level += 1
        for pid in list(self.children):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGQUIT if self.stop_level >= 2 else signal.SIGTERM)

    def _spawn(self):
        for stream in (sys.stdout, sys.stderr):  # or the child would write the parent's buffered text again
            with contextlib.suppress(Exception):
                stream.flush()
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the supervisor only, which passes it on once
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                signal.set_wakeup_fd(-1)
                code = Worker(self.db_path, supervisor_pid=self.pid, poll_interval=self.poll_interval,
                              burst=self.burst).run()
            except QueuectlError as e:
                log.error("worker: %s", e)
            except BaseException:  # pragma: no cover - logged, then the supervisor restarts us
                log.exception("worker crashed")
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = time.monotonic()
        return pid

    def run(self):
        store = open_store(self.db_path)
        store.close()  # open once to create/migrate before forking; children open their own
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGCHLD, lambda s, f: None)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        for _ in range(self.count):
            self._spawn()
        log.info("supervisor %d: started %d worker(s) on %s", self.pid, self.count, self.db_path)
        store = open_store(self.db_path)
        last_housekeeping = 0.0
        restart_at = None
        announced = 0
        try:
            while self.children or (self.stop_level == 0 and not self.burst):
                if self.stop_level != announced:
                    announced = self.stop_level
                    log.info("supervisor %d: %s stop requested", self.pid, "cold" if announced >= 2 else "graceful")
                self._reap(store)
                if self.stop_level == 0 and not self.burst:
                    missing = self.count - len(self.children)
                    if missing > 0:
                        if restart_at is None:
                            restart_at = time.monotonic() + min(30.0, 0.1 * 2 ** min(self._failures, 8))
                        if time.monotonic() >= restart_at:
                            for _ in range(missing):
                                self._spawn()
                            restart_at = None
                    now = time.time()
                    if now - last_housekeeping >= HOUSEKEEPING_INTERVAL:
                        last_housekeeping = now
                        with contextlib.suppress(QueuectlError):
                            store.rescue(now, HOST, pid_alive, kill_lost_group)
                with contextlib.suppress(InterruptedError):
                    select.select([r], [], [], 0.5)
                with contextlib.suppress(OSError):
                    while os.read(r, 4096):
                        pass
        finally:
            store.close()
        log.info("supervisor %d: all workers stopped", self.pid)
        return 0

    def _reap(self, store):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            started = self.children.pop(pid, None)
            if started is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if code != 0 or (self.stop_level == 0 and not self.burst):
                log.warning("supervisor: worker pid %d exited (%s)", pid, describe_exit(code))
                self._failures = self._failures + 1 if time.monotonic() - started < 5 else 0
                with contextlib.suppress(QueuectlError):
                    store.rescue(time.time(), HOST, pid_alive, kill_lost_group)


def self_command():
    """argv that starts this program again (source file, installed module or inside the .pyz)."""
    return [sys.executable, os.path.abspath(__file__)]


def local_worker_groups(store):
    """Live supervisors and stray workers of this database on this host: ``{pid: [worker records]}``."""
    groups = {}
    for w in store.workers():
        if w["host"] != HOST or not pid_alive(w["pid"], w["pid_started"]):
            continue
        sup = w["supervisor_pid"]
        target = sup if sup and pid_alive(sup) else w["pid"]
        groups.setdefault(target, []).append(w)
    return groups


###############################################################################
# Output formatting
###############################################################################


def use_color(stream):
    return stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


STATE_COLORS = {"pending": "33", "processing": "36", "completed": "32", "failed": "35", "dead": "31"}


def paint(text, state, stream=None):
    if not use_color(stream or sys.stdout):
        return text
    code = STATE_COLORS.get(state)
    return "\x1b[%sm%s\x1b[0m" % (code, text) if code else text


def safe_text(text):
    """Make a user's string safe to print on a terminal: no control characters."""
    if text is None:
        return ""
    return "".join(ch if ch.isprintable() or ch in "\n\t" else "\ufffd" for ch in str(text))


def table(headers, rows, stream=None):
    stream = stream or sys.stdout
    cells = [[safe_text(c).replace("\n", " ") for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    out = ["  ".join(h.ljust(widths[i]) for i, h in enumerate(headers)).rstrip()]
    for row, raw in zip(cells, rows):
        line = []
        for i, c in enumerate(row):
            text = c.ljust(widths[i])
            if headers[i] == "STATE":
                text = paint(text, c.strip(), stream)
            line.append(text)
        out.append("  ".join(line).rstrip())
    stream.write("\n".join(out) + "\n")


def print_json(doc):
    sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


def human_duration(seconds):
    if seconds is None:
        return "-"
    if seconds < 1:
        return "%dms" % round(seconds * 1000)
    if seconds < 60:
        return "%.1fs" % seconds
    if seconds < 3600:
        return "%dm%02ds" % divmod(int(seconds), 60)
    h, rest = divmod(int(seconds), 3600)
    return "%dh%02dm" % (h, rest // 60)


def ago(ts, now=None):
    if ts is None:
        return "-"
    delta = (now or time.time()) - ts
    if delta < 0:
        return "in " + human_duration(-delta)
    return human_duration(delta) + " ago"


###############################################################################
# CLI
###############################################################################

EPILOG_MAIN = """\
examples:
  queuectl enqueue '{"id":"hello","command":"echo Hello, QueueCTL!"}'
  queuectl enqueue -p high -- tar czf /backup/etc.tgz /etc
  queuectl worker start --count 2
  queuectl status
  queuectl list --state completed
  queuectl logs hello

The database is --db PATH, else $QUEUECTL_DB, else %s.
Exit codes: 0 ok, 1 error, 2 bad input, 3 not found, 4 conflict,
74 database unusable, 75 database busy (safe to retry).
""" % default_db_path().replace(os.path.expanduser("~"), "~")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


class ArgParser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        raise SystemExit(_fail("%s" % message, EXIT_USAGE))


def _fail(message, code):
    sys.stderr.write("queuectl: error: %s\n" % safe_text(message).replace("\n", " "))
    return code


def build_parser():
    common = ArgParser(add_help=False)
    common.add_argument("--db", default=argparse.SUPPRESS, metavar="PATH",
                        help="database file (default: $QUEUECTL_DB, else the per-user data directory)")
    p = ArgParser(prog="queuectl", description="A background job queue for shell commands.",
                  epilog=EPILOG_MAIN, formatter_class=_Formatter, parents=[common])
    p.add_argument("--version", action="version", version="queuectl " + __version__)
    p.add_argument("-v", "--verbose", action="store_true", help="log more (to stderr)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name, help, epilog, parent=sub, **kw):
        return parent.add_parser(name, help=help, description=help, epilog="examples:\n" + epilog,
                                 formatter_class=_Formatter, parents=[common], **kw)

    def json_flag(sp):
        sp.add_argument("--json", action="store_true", help="print one JSON document and nothing else")

    e = add("enqueue", "add a job (JSON, @file, - for JSON Lines on stdin, or -- COMMAND)", """\
  queuectl enqueue '{"id":"backup","command":"tar czf /tmp/etc.tgz /etc","timeout":600}'
  queuectl enqueue -p high -- tar czf /backup/etc.tgz /etc
  queuectl enqueue --delay 60 -- 'make -C /srv/app report'
  queuectl enqueue @jobs.json
  printf '%s\\n' '{"command":"true"}' '{"command":"false"}' | queuectl enqueue -

Prints the id of each job added, one per line.  Job fields: id, command,
priority (high|medium|low), timeout, max_retries, run_at (RFC 3339),
delay (seconds), cwd, env.  Options override the same fields in the JSON.""")
    e.add_argument("spec", nargs="?", metavar="JOB",
                   help="a JSON object, @FILE (a JSON object, array or JSON Lines), or - (JSON Lines on stdin)")
    e.add_argument("-p", "--priority", choices=list(PRIORITIES), help="high, medium (default) or low")
    e.add_argument("-t", "--timeout", type=float, metavar="SECONDS", help="kill the job after this long")
    e.add_argument("--id", dest="job_id", help="job id (default: generated)")
    e.add_argument("-r", "--max-retries", type=int, metavar="N", help="retries after the first run")
    e.add_argument("--delay", type=float, metavar="SECONDS", help="start no earlier than this many seconds from now")
    e.add_argument("--run-at", metavar="TIME", help="start no earlier than this RFC 3339 time")
    e.add_argument("--cwd", metavar="DIR", help="working directory (default: the current one)")
    e.add_argument("-e", "--env", action="append", metavar="NAME=VALUE", default=[], help="extra environment variable")

    w = add("worker", "start, stop and inspect workers", """\
  queuectl worker start --count 3
  queuectl worker start --foreground      # for systemd, tmux or a terminal
  queuectl worker status
  queuectl worker stop""")
    wsub = w.add_subparsers(dest="worker_command", metavar="ACTION")
    wsub.required = True
    ws = add("start", "start worker processes (detached unless --foreground)", """\
  queuectl worker start
  queuectl worker start -c 4
  queuectl worker start -c 2 --foreground
  queuectl worker start --burst           # run what is due, then exit""", parent=wsub)
    ws.add_argument("-c", "--count", type=int, default=1, metavar="N", help="number of workers (default 1)")
    ws.add_argument("-f", "--foreground", action="store_true",
                    help="run in the foreground until SIGTERM/Ctrl-C (twice: cold stop)")
    ws.add_argument("-b", "--burst", action="store_true",
                    help="run in the foreground until no job is due, then exit (for cron and CI)")
    ws.add_argument("--log-file", metavar="PATH", help="where detached workers log (default: next to the database)")
    ws.add_argument("--poll-interval", type=float, metavar="SECONDS", help=argparse.SUPPRESS)
    wst = add("stop", "stop this host's workers: finish running jobs, then exit", """\
  queuectl worker stop
  queuectl worker stop --timeout 300
  queuectl worker stop --force""", parent=wsub)
    wst.add_argument("--force", action="store_true",
                     help="stop now: kill running jobs' process trees and put the jobs back (no retry used)")
    wst.add_argument("--timeout", type=float, default=STOP_WAIT, metavar="SECONDS",
                     help="wait this long for running jobs before a cold stop (default %g)" % STOP_WAIT)
    wss = add("status", "show workers", "  queuectl worker status\n  queuectl worker status --json", parent=wsub)
    json_flag(wss)

    s = add("status", "show job counts by state, workers and the database in use",
            "  queuectl status\n  queuectl status --json")
    json_flag(s)

    ls = add("list", "list jobs, most recently updated last", """\
  queuectl list
  queuectl list --state pending
  queuectl list -s dead -l 10 --json""")
    ls.add_argument("-s", "--state", type=_state_arg, metavar="STATE", help="one of: " + ", ".join(STATES))
    ls.add_argument("-l", "--limit", type=_limit_arg, default=100, metavar="N", help="at most N jobs (default 100)")
    json_flag(ls)

    g = add("get", "show one job with its attempt history", "  queuectl get hello\n  queuectl get hello --json")
    g.add_argument("job_id", metavar="ID")
    json_flag(g)

    lg = add("logs", "print the captured output of a job's attempt", """\
  queuectl logs hello              # the latest attempt
  queuectl logs hello --attempt 1""")
    lg.add_argument("job_id", metavar="ID")
    lg.add_argument("-a", "--attempt", type=_positive_int, metavar="N", help="attempt number (default: the latest)")

    d = add("dlq", "the dead letter queue: jobs that used up their retries", """\
  queuectl dlq list
  queuectl dlq retry job1 --reset-attempts
  queuectl dlq clear""")
    dsub = d.add_subparsers(dest="dlq_command", metavar="ACTION")
    dsub.required = True
    dl = add("list", "list dead jobs", "  queuectl dlq list\n  queuectl dlq list --json", parent=dsub)
    dl.add_argument("-l", "--limit", type=_limit_arg, default=100, metavar="N", help="at most N jobs (default 100)")
    json_flag(dl)
    dr = add("retry", "run a dead job once more (its full budget with --reset-attempts)",
             "  queuectl dlq retry job1\n  queuectl dlq retry job1 -r", parent=dsub)
    dr.add_argument("job_id", metavar="ID")
    dr.add_argument("-r", "--reset-attempts", action="store_true", help="give the job its whole retry budget again")
    add("clear", "delete every dead job", "  queuectl dlq clear", parent=dsub)

    c = add("config", "show and change settings (running workers pick changes up within a second)", """\
  queuectl config show
  queuectl config get max-retries
  queuectl config set backoff-base 3""")
    csub = c.add_subparsers(dest="config_command", metavar="ACTION")
    csub.required = True
    cs = add("show", "show every setting", "  queuectl config show\n  queuectl config show --json", parent=csub)
    json_flag(cs)
    cg = add("get", "print one setting", "  queuectl config get job-timeout", parent=csub)
    cg.add_argument("key", metavar="KEY")
    cset = add("set", "change one setting", """\
  queuectl config set max-retries 5
  queuectl config set job-timeout 600
  queuectl config set worker-poll-interval 2.0""", parent=csub)
    cset.add_argument("key", metavar="KEY")
    cset.add_argument("value", metavar="VALUE")

    cl = add("clear", "delete jobs (all but running ones, or one state)", """\
  queuectl clear --state completed
  queuectl clear --yes              # everything but running jobs""")
    cl.add_argument("-s", "--state", type=_state_arg, metavar="STATE", help="only jobs in this state")
    cl.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    return p


def _state_arg(text):
    if text not in STATES:
        raise argparse.ArgumentTypeError("unknown state %s (choose from %s)" % (_short(text), ", ".join(STATES)))
    return text


def _limit_arg(text):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a whole number, got %s" % _short(text))
    if not 1 <= n <= 1000000:
        raise argparse.ArgumentTypeError("must be from 1 to 1000000, got %s" % n)
    return n


def _positive_int(text):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a whole number, got %s" % _short(text))
    if n < 1:
        raise argparse.ArgumentTypeError("must be 1 or more, got %s" % n)
    return n


# --- helpers -----------------------------------------------------------------------


def resolve_db(args):
    db = getattr(args, "db", None) or os.environ.get("QUEUECTL_DB")
    if db:
        return db
    path = default_db_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as e:
        raise DatabaseError("cannot create data directory %s: %s" % (os.path.dirname(path), e.strerror))
    return path


def confirm(question, args):
    if getattr(args, "yes", False):
        return True
    if not sys.stdin.isatty():
        raise InvalidInput("refusing to %s without confirmation: add --yes" % question)
    sys.stderr.write("%s? [y/N] " % question.capitalize())
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def parse_job_documents(text, source):
    """A JSON object, a JSON array of objects, or JSON Lines -> list of objects."""
    stripped = text.strip()
    if not stripped:
        raise InvalidInput("%s holds no job" % source)
    try:
        doc = json.loads(stripped)
    except ValueError:
        doc = None
        docs = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line))
            except ValueError as e:
                raise InvalidInput("%s line %d: invalid JSON: %s" % (source, number, e.msg)) from None
        return docs
    if isinstance(doc, list):
        if not doc:
            raise InvalidInput("%s holds an empty list" % source)
        return doc
    return [doc]


def _read_spec(spec):
    if spec == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise InvalidInput("'-' reads JSON Lines from stdin, but stdin is a terminal; pipe jobs in")
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
        return parse_job_documents(_decode(data, "stdin"), "stdin")
    if spec.startswith("@"):
        path = spec[1:]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise InvalidInput("cannot read %s: %s" % (path, e.strerror))
        return parse_job_documents(_decode(data, path), path)
    try:
        doc = json.loads(spec)
    except ValueError as e:
        if not spec.lstrip().startswith(("{", "[")):
            raise InvalidInput("JOB must be a JSON object; to queue a plain command use: queuectl enqueue -- COMMAND")
        raise InvalidInput("invalid JSON: %s (line %d column %d)" % (e.msg, e.lineno, e.colno)) from None
    return doc if isinstance(doc, list) and doc else [doc]


def _decode(data, source):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("%s is not UTF-8 text" % source)


def job_line(job):
    return [job.id, job.state, job.priority_name, "%d/%d" % (job.attempts, job.max_retries + 1),
            _one_line(job.command, 48), rfc3339(job.updated_at, precise=False)]


JOB_HEADERS = ["ID", "STATE", "PRIORITY", "ATTEMPTS", "COMMAND", "UPDATED"]


# --- commands ----------------------------------------------------------------------


def cmd_enqueue(args, store):
    now = time.time()
    cfg = store.config()
    if args.argv_command:
        if args.spec is not None:
            raise InvalidInput("give either a JSON job or a command after --, not both")
        words = args.argv_command
        docs = [{"command": words[0] if len(words) == 1 else shlex.join(words)}]
    elif args.spec is None:
        raise InvalidInput("nothing to enqueue: give a JSON job, @FILE, - or -- COMMAND (see queuectl enqueue --help)")
    else:
        docs = _read_spec(args.spec)
    overrides = {}
    if args.priority:
        overrides["priority"] = args.priority
    if args.timeout is not None:
        overrides["timeout"] = args.timeout
    if args.max_retries is not None:
        overrides["max_retries"] = args.max_retries
    if args.delay is not None:
        overrides["delay"] = args.delay
    if args.run_at is not None:
        overrides["run_at"] = args.run_at
    if args.cwd is not None:
        overrides["cwd"] = args.cwd
    if args.job_id is not None:
        if len(docs) > 1:
            raise InvalidInput("--id names one job, but %d were given" % len(docs))
        overrides["id"] = args.job_id
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            raise InvalidInput("--env wants NAME=VALUE, got %s" % _short(item))
        env[name] = value
    jobs = []
    seen = set()
    for index, doc in enumerate(docs, 1):
        where = "" if len(docs) == 1 else "job %d: " % index
        try:
            if isinstance(doc, dict):
                doc = dict(doc)
                if "delay" in overrides or "run_at" in overrides:
                    doc.pop("delay", None)
                    doc.pop("run_at", None)
                doc.update(overrides)
                if env:
                    doc["env"] = dict(doc.get("env") or {}, **env) if isinstance(doc.get("env") or {}, dict) else doc["env"]
            job = validate_job(doc, cfg, now)
        except InvalidInput as e:
            raise InvalidInput(where + str(e)) from None
        if job["id"] is not None:
            if job["id"] in seen:
                raise Conflict("%sjob id %s appears twice in the input" % (where, job["id"]))
            seen.add(job["id"])
        jobs.append(job)
    ids = store.enqueue(jobs, now)
    sys.stdout.write("".join(i + "\n" for i in ids))
    sys.stdout.flush()
    due = sum(1 for j in jobs if j["run_at"] <= now)
    if due:
        wake_workers(store, due)
    return EXIT_OK


def cmd_worker(args, store):
    return {"start": cmd_worker_start, "stop": cmd_worker_stop, "status": cmd_worker_status}[args.worker_command](args, store)


def cmd_worker_start(args, store):
    if not 1 <= args.count <= 256:
        raise InvalidInput("--count must be from 1 to 256, got %d" % args.count)
    db = os.path.abspath(args.db_path)
    if args.foreground or args.burst:
        store.close()
        return Supervisor(db, args.count, poll_interval=args.poll_interval, burst=args.burst).run()
    log_path = args.log_file or os.path.splitext(db)[0] + ".workers.log"
    try:
        logf = open(log_path, "ab")
    except OSError as e:
        raise QueuectlError("cannot open worker log %s: %s" % (log_path, e.strerror))
    argv = self_command() + ["--db", db, "worker", "start", "--foreground", "--count", str(args.count)]
    if args.poll_interval:
        argv += ["--poll-interval", str(args.poll_interval)]
    with logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True,
                                close_fds=True, cwd="/")
    deadline = time.monotonic() + 15
    mine = []
    while time.monotonic() < deadline:
        mine = [w for w in store.workers() if w["supervisor_pid"] == proc.pid]
        if len(mine) >= args.count:
            break
        if proc.poll() is not None:
            raise QueuectlError("workers failed to start (exit %s); see %s: %s"
                                % (proc.returncode, log_path, _tail(log_path)))
        time.sleep(0.02)
    else:
        raise QueuectlError("workers did not register within 15s; see %s" % log_path)
    sys.stdout.write("started %d worker(s) (supervisor pid %d); log: %s\n" % (len(mine), proc.pid, log_path))
    return EXIT_OK


def _tail(path, n=300):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - n))
            return _one_line(f.read().decode("utf-8", "replace"), n)
    except OSError:
        return ""


def cmd_worker_stop(args, store):
    groups = local_worker_groups(store)
    if not groups:
        sys.stdout.write("no workers running on %s\n" % HOST)
        return EXIT_OK
    n = sum(len(v) for v in groups.values())
    first = signal.SIGQUIT if args.force else signal.SIGTERM
    for pid in groups:
        with contextlib.suppress(OSError):
            os.kill(pid, first)
    if not args.force:
        sys.stderr.write("waiting for %d worker(s) to finish their current job (up to %gs)...\n" % (n, args.timeout))
    if not _wait_gone(groups, args.timeout if not args.force else 30):
        sys.stderr.write("workers still running; stopping them cold (jobs go back to the queue)\n")
        for pid in groups:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGQUIT)
        if not _wait_gone(groups, 15):
            for pid, members in groups.items():
                for w in members:
                    with contextlib.suppress(OSError):
                        os.kill(w["pid"], signal.SIGKILL)
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            _wait_gone(groups, 5)
            store.rescue(time.time(), HOST, pid_alive, kill_lost_group)
    sys.stdout.write("stopped %d worker(s)\n" % n)
    return EXIT_OK


def _wait_gone(groups, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(pid_alive(w["pid"], w["pid_started"]) for ws in groups.values() for w in ws) and \
                not any(pid_alive(pid) for pid in groups):
            return True
        time.sleep(0.05)
    return False


def worker_view(w, now):
    alive = pid_alive(w["pid"], w["pid_started"]) if w["host"] == HOST else now - w["heartbeat_at"] < 60
    return {
        "id": w["id"], "pid": w["pid"], "host": w["host"], "state": w["state"] if alive else "gone",
        "job_id": w["job_id"], "started_at": rfc3339(w["started_at"]), "heartbeat_at": rfc3339(w["heartbeat_at"]),
        "supervisor_pid": w["supervisor_pid"],
    }


def cmd_worker_status(args, store):
    now = time.time()
    workers = [worker_view(w, now) for w in store.workers()]
    if args.json:
        print_json({"workers": workers})
        return EXIT_OK
    if not workers:
        sys.stdout.write("no workers registered\n")
        return EXIT_OK
    rows = [[w["id"], str(w["pid"]), w["host"], w["state"], w["job_id"] or "-",
             ago(parse_rfc3339(w["started_at"]), now), ago(parse_rfc3339(w["heartbeat_at"]), now)] for w in workers]
    table(["WORKER", "PID", "HOST", "STATE", "JOB", "STARTED", "HEARTBEAT"], rows)
    return EXIT_OK


def cmd_status(args, store):
    now = time.time()
    counts = store.counts()
    workers = [worker_view(w, now) for w in store.workers()]
    live = [w for w in workers if w["state"] != "gone"]
    if args.json:
        print_json({"db": os.path.abspath(args.db_path), "version": __version__, "job_counts": counts,
                    "total": sum(counts.values()), "workers": {"running": len(live),
                    "busy": sum(1 for w in live if w["state"] == "busy")}})
        return EXIT_OK
    out = sys.stdout
    out.write("database: %s\n" % os.path.abspath(args.db_path))
    out.write("jobs:     %d total\n" % sum(counts.values()))
    for state in STATES:
        out.write("  %s %d\n" % (paint(state.ljust(11), state), counts[state]))
    out.write("workers:  %d running (%d busy)\n" % (len(live), sum(1 for w in live if w["state"] == "busy")))
    return EXIT_OK


def cmd_list(args, store, state=None):
    state = state or args.state
    jobs = store.list_jobs(state=state, limit=args.limit)
    if args.json:
        print_json([j.to_dict() for j in jobs])
        return EXIT_OK
    if not jobs:
        sys.stdout.write("no %sjobs\n" % (state + " " if state else ""))
        return EXIT_OK
    table(JOB_HEADERS, [job_line(j) for j in jobs])
    return EXIT_OK


def _get_job(store, job_id):
    job = store.get(job_id)
    if job is None:
        raise NotFound("no job with id %s" % _short(job_id))
    return job


def cmd_get(args, store):
    job = _get_job(store, args.job_id)
    attempts = store.attempts(job.id)
    if args.json:
        doc = job.to_dict()
        doc["attempt_history"] = [a.to_dict() for a in attempts]
        print_json(doc)
        return EXIT_OK
    now = time.time()
    fields = [
        ("id", job.id), ("command", job.command), ("state", paint(job.state, job.state)),
        ("priority", job.priority_name), ("attempts", "%d of %d (runs: %d, lost: %d)" % (
            job.attempts, job.max_retries + 1, job.runs, job.rescues)),
        ("max_retries", job.max_retries),
        ("timeout", ("%gs" % job.timeout) if job.timeout else "global job-timeout"),
        ("created_at", rfc3339(job.created_at, False)), ("updated_at", rfc3339(job.updated_at, False)),
    ]
    if job.state in ("pending", "failed"):
        fields.append(("next run" if job.state == "failed" else "run_at", "%s (%s)" % (
            rfc3339(job.run_at, False), ago(job.run_at, now))))
    if job.worker_id:
        fields.append(("worker", job.worker_id))
    if job.exit_code is not None:
        fields.append(("exit_code", job.exit_code))
    if job.last_error:
        fields.append(("last_error", job.last_error))
    fields.append(("cwd", job.cwd))
    if job.env:
        fields.append(("env", " ".join("%s=%s" % kv for kv in sorted(job.env.items()))))
    width = max(len(k) for k, _ in fields)
    for k, v in fields:
        sys.stdout.write("%s  %s\n" % (k.ljust(width), v if k == "state" else safe_text(v)))
    if attempts:
        sys.stdout.write("\nattempts:\n")
        table(["#", "STARTED", "DURATION", "OUTCOME", "EXIT", "WORKER", "ERROR"], [
            [str(a.n), rfc3339(a.started_at, False), human_duration(a.duration), a.outcome or "running",
             "-" if a.exit_code is None else str(a.exit_code), a.worker_id or "-", _one_line(a.error or "", 50)]
            for a in attempts])
    return EXIT_OK


def cmd_logs(args, store):
    job = _get_job(store, args.job_id)
    attempt = store.attempt(job.id, args.attempt)
    if attempt is None:
        if args.attempt:
            raise NotFound("job %s has no attempt %d (it has %d)" % (job.id, args.attempt, job.runs))
        sys.stderr.write("job %s has not run yet\n" % job.id)
        return EXIT_OK
    out = attempt.output or ""
    if hasattr(sys.stdout, "buffer"):
        sys.stdout.flush()
        sys.stdout.buffer.write(out.encode("utf-8", "replace"))
        sys.stdout.buffer.flush()
    else:
        sys.stdout.write(out)
    return EXIT_OK


def cmd_dlq(args, store):
    if args.dlq_command == "list":
        return cmd_list(args, store, state="dead")
    if args.dlq_command == "retry":
        validate_id(args.job_id)
        store.retry_dead(args.job_id, time.time(), reset_attempts=args.reset_attempts)
        sys.stdout.write("job %s moved back to pending%s\n" % (
            args.job_id, " with its attempts reset" if args.reset_attempts else " for one more run"))
        wake_workers(store, 1)
        return EXIT_OK
    n = store.delete_jobs("dead")
    sys.stdout.write("deleted %d dead job(s)\n" % n)
    return EXIT_OK


def cmd_config(args, store):
    action = args.config_command
    if action == "set":
        key, value = validate_config(args.key, args.value)
        store.set_config(key, value)
        sys.stdout.write("%s = %s\n" % (key, _fmt_value(value)))
        return EXIT_OK
    cfg = store.config()
    if action == "get":
        sys.stdout.write("%s\n" % _fmt_value(cfg[normalize_config_key(args.key)]))
        return EXIT_OK
    if args.json:
        print_json(cfg)
        return EXIT_OK
    rows = [[k, _fmt_value(cfg[k]), "" if cfg[k] == DEFAULTS[k] else "(default %s)" % _fmt_value(DEFAULTS[k]),
             CONFIG_RULES[k][4]] for k in DEFAULTS]
    table(["KEY", "VALUE", "", "MEANING"], rows)
    return EXIT_OK


def _fmt_value(v):
    if isinstance(v, float) and v.is_integer():
        return "%d" % v if abs(v) < 1e15 else repr(v)
    return str(v)


def cmd_clear(args, store):
    if args.state is None and not confirm("delete every job except running ones", args):
        sys.stderr.write("nothing deleted\n")
        return EXIT_ERROR
    n = store.delete_jobs(args.state)
    sys.stdout.write("deleted %d job(s)\n" % n)
    return EXIT_OK


COMMANDS = {
    "enqueue": cmd_enqueue, "worker": cmd_worker, "status": cmd_status, "list": cmd_list, "get": cmd_get,
    "logs": cmd_logs, "dlq": cmd_dlq, "config": cmd_config, "clear": cmd_clear,
}


def _split_command(argv):
    """Split ``enqueue ... -- COMMAND WORDS`` so the words reach no parser."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, None


def setup_logging(verbose):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    logging.Formatter.converter = time.gmtime
    root = logging.getLogger("queuectl")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def main(argv=None):
    """Run the CLI; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    head, words = _split_command(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(head)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if words is not None and args.command != "enqueue":
        return _fail("'--' followed by a command is only for enqueue", EXIT_USAGE)
    if words is not None and not words:
        return _fail("no command after --", EXIT_USAGE)
    args.argv_command = words
    setup_logging(args.verbose)
    store = None
    try:
        args.db_path = resolve_db(args)
        store = open_store(args.db_path)
        return COMMANDS[args.command](args, store)
    except QueuectlError as e:
        return _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BrokenPipeError:
        with contextlib.suppress(Exception):
            sys.stdout = open(os.devnull, "w")
        return EXIT_OK
    finally:
        if store is not None:
            store.close()


if __name__ == "__main__":
    sys.exit(main())
