#!/usr/bin/env python3
"""queuectl: a background job queue for shell commands, in one file.

Queue shell commands, run them with background workers, and trust that every
job runs: priorities, per-job and global timeouts that kill the whole process
tree, retries with exponential backoff, a dead letter queue, leases that rescue
the jobs of crashed workers, graceful shutdown, captured output and a live
dashboard.  The core uses the Python standard library only; SQLite is the
embedded store.

Sections, lower layers first: start-up shims -> constants -> errors -> model ->
storage (the store contract and the rules both stores share; the SQLite schema
and SQL; SqliteStore and open_store) -> executor -> worker and supervisor ->
output formatting -> CLI.
"""

__version__ = "0.1.0"

import sys

if sys.version_info < (3, 8):  # before anything else: one line, not a traceback from some later call
    sys.stderr.write("queuectl: error: queuectl needs Python 3.8 or newer; this is Python %s (%s)\n"
                     % (sys.version.split()[0], sys.executable))
    sys.exit(1)

import argparse
import contextlib
import enum
import errno
import json
import os
import re
import select
import signal
import sqlite3
import stat
import time


###############################################################################
# Start-up shims: what keeps each command's start-up short (bench/ measures it)
###############################################################################


class _LazyModule:
    """A standard-library module imported on first use, not at start-up.

    Every CLI command pays for what ``import queuectl`` imports; the modules
    only some commands need (subprocess and socket for workers, ...) are bound
    to this stand-in and imported the first time an attribute is read (bench/
    measures the start-up cost; see docs/performance.md).
    """

    def __init__(self, name):
        self.__dict__["_name"] = name

    def _module(self):
        module = __import__(self._name)
        globals()[self._name] = module  # later look-ups skip the stand-in
        return module

    def __getattr__(self, attr):
        return getattr(self._module(), attr)

    def __setattr__(self, attr, value):  # monkeypatching in tests reaches the real module
        setattr(self._module(), attr, value)

    def __repr__(self):
        return "<lazily imported module %r>" % self._name


def shell_join(words):
    """``shlex.join`` (Python 3.8 has no shlex.join)."""
    return " ".join(shlex.quote(w) for w in words)


def exit_code_of(status):
    """``os.waitstatus_to_exitcode`` (new in 3.9): the exit code, or -N for death by signal N."""
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _load_lazy_modules(*names):
    """Import lazily bound modules now (a supervisor does, before it forks its workers)."""
    for name in names:
        module = globals()[name]
        if isinstance(module, _LazyModule):
            module._module()


dataclasses = _LazyModule("dataclasses")  # the records below use _record instead
datetime = _LazyModule("datetime")
secrets = _LazyModule("secrets")
shlex = _LazyModule("shlex")
socket = _LazyModule("socket")
subprocess = _LazyModule("subprocess")
logging = _LazyModule("logging")


class _LazyLogger:
    """The "queuectl" logger, with the logging module (3 ms of start-up with what it imports)
    imported at the first message: most commands log nothing."""

    def __getattr__(self, attr):
        return getattr(_logger(), attr)


#: What setup_logging was asked for (None: never; queuectl used as a library leaves logging alone),
#: applied at the first message.
_LOG_SETTINGS = {"verbose": None, "quiet": False, "stream": None}


def _logger():
    global log
    if isinstance(log, _LazyLogger):
        log = logging.getLogger("queuectl")
        if _LOG_SETTINGS["verbose"] is not None:
            _configure_logging()
    return log


log = _LazyLogger()


def _record(cls=None, frozen=False):
    """``@dataclasses.dataclass`` for the plain records below, without importing
    dataclasses: that import (through inspect) and the decoration cost a
    quarter of every command's start-up (bench/).  Fields are the annotated
    class attributes in order, a value is the default; the class gets
    ``__init__`` (same signature), ``__repr__``, ``__eq__``, ``_fields`` and,
    when ``frozen``, immutability and ``__hash__``.  The ``__init__`` is
    compiled when the first record of the class is made (compiling it costs
    tens of microseconds a class: a command that makes none does not pay)."""

    def wrap(cls):
        names = tuple(cls.__dict__.get("__annotations__", {}))
        defaults = {n: cls.__dict__[n] for n in names if n in cls.__dict__}

        def compiled_init():
            params = ", ".join(n if n not in defaults else "%s=_default_%s" % (n, n) for n in names)
            body = "".join("\n    _set(self, %r, %s)" % (n, n) for n in names) or "\n    pass"
            namespace = {"_set": object.__setattr__}
            namespace.update(("_default_" + n, v) for n, v in defaults.items())
            exec("def __init__(self, %s):%s" % (params, body), namespace)
            namespace["__init__"].__qualname__ = cls.__qualname__ + ".__init__"
            return namespace["__init__"]

        def __init__(self, *args, **kwargs):  # the first record: compile the real one, use it from now on
            cls.__init__ = compiled_init()
            cls.__init__(self, *args, **kwargs)

        cls.__init__ = __init__
        cls._fields = names

        def __repr__(self):
            return "%s(%s)" % (type(self).__qualname__, ", ".join("%s=%r" % (n, getattr(self, n)) for n in names))

        def __eq__(self, other):
            if other.__class__ is not self.__class__:
                return NotImplemented
            return all(getattr(self, n) == getattr(other, n) for n in names)

        cls.__repr__, cls.__eq__ = __repr__, __eq__
        if frozen:
            def __setattr__(self, name, *value):
                raise AttributeError("cannot assign to field %r of a frozen %s" % (name, type(self).__name__))

            cls.__setattr__ = cls.__delattr__ = __setattr__
            cls.__hash__ = lambda self: hash(tuple(getattr(self, n) for n in names))
        else:
            cls.__hash__ = None  # mutable and compared by value, as a dataclass
        return cls

    return wrap if cls is None else wrap(cls)


@contextlib.contextmanager
def _memoized_gettext():
    """Build the parser with argparse's gettext look-ups memoised.

    argparse asks gettext for a translation of each of its messages, about
    a hundred per subcommand, and each look-up searches the locale
    directories on disk: half the time of building the parser, on every
    command (bench/).  The answers cannot change within a process."""
    import functools

    saved = argparse._, argparse.ngettext
    argparse._ = functools.lru_cache(maxsize=None)(saved[0])
    argparse.ngettext = functools.lru_cache(maxsize=None)(saved[1])
    try:
        yield
    finally:
        argparse._, argparse.ngettext = saved


###############################################################################
# Constants and defaults
###############################################################################


class Setting:
    """One setting: what `queuectl config set NAME VALUE` takes, what it is when never set, what it
    means.  (A plain class: SETTINGS is built at every start, and a _record compiles its __init__.)

    ``kind`` is int, float or str (a URL); a number lies from ``lo`` (excluded when ``lo_open``) to
    ``hi``.  ``unit`` is "s" (a duration: 90s, 15m, 7d are taken and shown), "bytes" (64K, 1M) or
    None (a plain number); ``zero`` is the word for 0 when 0 means "no limit" (taken and shown)."""

    __slots__ = ("name", "kind", "default", "lo", "hi", "lo_open", "help", "unit", "zero")

    def __init__(self, name, kind, default, lo=None, hi=None, lo_open=False, help="", unit=None, zero=None):
        self.name, self.kind, self.default, self.help = name, kind, default, help
        self.lo, self.hi, self.lo_open, self.unit, self.zero = lo, hi, lo_open, unit, zero

    def show(self, value):
        """A value as `config show` prints it: "300s", "1M", "none"."""
        if self.kind is str:
            return value or "none"
        if value == 0 and self.zero:
            return self.zero
        if self.unit == "s":
            return format_seconds(value)
        if self.unit == "bytes":
            return format_size(value)
        return _fmt_value(value)

    def __repr__(self):
        return "Setting(%r, %s, %r)" % (self.name, self.kind.__name__, self.default)


#: Every setting, in the order `config show` lists them: the one table that defines them.  DEFAULTS,
#: validate_config, `config show`, `config set --help` and the README's listing come from it.
SETTINGS = (
    Setting("max-retries", int, 3, 0, 1000, False,
            "retries after the first run (a job runs at most max-retries + 1 times)"),
    Setting("backoff-base", float, 2.0, 1, 1000, False, "after the n-th failed run wait backoff-base ** n seconds"),
    Setting("backoff-max", float, 3600.0, 0, 366 * 86400, True, "longest wait between retries", unit="s"),
    Setting("worker-poll-interval", float, 1.0, 0, 3600, True, "idle workers look for due jobs this often",
            unit="s"),
    Setting("job-timeout", float, 300.0, 0, 366 * 86400, False,
            "timeout for jobs without their own (0 or none: no limit)", unit="s", zero="none"),
    Setting("lease-seconds", float, 15.0, 1, 3600, False,
            "a job is rescued when its worker stops renewing its lease this long", unit="s"),
    Setting("output-limit", int, 1048576, 1024, 64 * 1048576, False,
            "output kept per attempt (the end is kept)", unit="bytes"),
    Setting("max-rescues", int, 5, 0, 1000, False,
            "rescues from dead workers a job may have; one more sends it to the DLQ"),
    Setting("kill-grace", float, 2.0, 0, 600, False, "between SIGTERM and SIGKILL when a job is killed", unit="s"),
    Setting("retention", float, 0.0, 0, 10 * 366 * 86400, False,
            "completed and cancelled jobs older than this are purged automatically (0 or forever: kept)",
            unit="s", zero="forever"),
    Setting("webhook-url", str, "", help="URL that gets a JSON POST when any job ends (empty = none)"),
)
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}
QUEUE_LIMIT = Setting("queue limit", int, None, 1, 100000, zero="none")  # (`queue set-limit`; not a config key)
#: Every setting's default, by name (what a store's config() returns for settings never set).
DEFAULTS = {s.name: s.default for s in SETTINGS}

DEFAULT_QUEUE = "default"  # the queue of a job that names none (the schemas' column default says it too)
PRIORITIES = {"high": 1, "medium": 2, "low": 3}
PRIORITY_NAMES = {v: k for k, v in PRIORITIES.items()}

#: This machine's identity in worker records and attempts: its host name (QUEUECTL_HOST overrides
#: it).  Only workers of the same host are judged by pid (and its start time); pids of other hosts
#: mean nothing here (tests/test_multihost.py runs machines in PID namespaces of their own).
HOST = os.environ.get("QUEUECTL_HOST") or os.uname().nodename  # = socket.gethostname(), without importing socket
BUSY_TIMEOUT = 5.0  # seconds a command waits for a locked database
HOUSEKEEPING_INTERVAL = 2.0  # how often idle workers and supervisors rescue lost jobs
REOPEN_GRACE = 10.0  # seconds a supervisor keeps trying to open a new database after the old one was deleted
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)  # what workers and supervisors stop on
STOP_WAIT = 60.0  # how long `worker stop` waits for running jobs before a cold stop
SHARED_ENV = "QUEUECTL_SHARED"  # "group": the queue's files are shared with the owner's group
TOKEN_ENV = "QUEUECTL_DASHBOARD_TOKEN"  # the dashboard's token; never passed on to jobs
SAFE_DIRECTORY_ENV = "QUEUECTL_SAFE_DIRECTORY"  # directories (":"-separated, or "*") trusted whoever owns them
DASHBOARD_HOST = "127.0.0.1"  # `dashboard` and `up` listen here unless told otherwise
DASHBOARD_PORT = 5000
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
EXIT_TIMEOUT = 124  # `wait --timeout` ran out (as timeout(1) does)

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


class DatabaseGone(DatabaseError):
    """The database file was deleted or replaced while in use (see ``SqliteStore.check``)."""


class DatabaseCorrupt(DatabaseError):
    """The file is not (or no longer) a usable SQLite database: nothing will make it work again."""


class DatabaseMissing(DatabaseError):
    """A command that only reads or changes jobs named a database that does not exist (a typo?)."""


class UntrustedFile(DatabaseError):
    """A file or directory queuectl would use was planted or can be changed by another account."""


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
    WAITING = "waiting"  # waits for the jobs it depends on (--after)
    CANCELLED = "cancelled"  # cancelled by a user, or a job it depended on failed for good

    def __str__(self):
        return self.value


STATES = [s.value for s in JobState]
#: States a job never leaves by itself.
FINAL_STATES = ("completed", "dead", "cancelled")
#: States in which a job still holds its unique key.
ACTIVE_STATES = ("pending", "processing", "failed", "waiting")

#: Allowed state transitions; the store refuses anything else.
TRANSITIONS = {
    JobState.WAITING: {JobState.PENDING, JobState.CANCELLED},
    JobState.PENDING: {JobState.PROCESSING, JobState.CANCELLED},
    JobState.FAILED: {JobState.PROCESSING, JobState.CANCELLED},
    JobState.PROCESSING: {JobState.COMPLETED, JobState.FAILED, JobState.DEAD, JobState.PENDING, JobState.CANCELLED},
    JobState.DEAD: {JobState.PENDING},
    JobState.COMPLETED: set(),
    JobState.CANCELLED: set(),
}


def can_transition(old, new):
    return JobState(new) in TRANSITIONS[JobState(old)]


#: Job fields a user may give at enqueue time, with their JSON types.
JOB_FIELDS = ("id", "command", "priority", "timeout", "max_retries", "run_at", "delay", "cwd", "env", "queue",
              "after", "unique_key", "webhook")


@_record
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
    queue: str = DEFAULT_QUEUE
    seq: int = None
    unique_key: str = None
    webhook: str = None
    schedule: str = None  # the schedule that enqueued it
    cancel_requested: int = 0
    after: list = None  # ids of the jobs it depends on (filled in by Store.get)

    @classmethod
    def from_row(cls, row):
        data = dict(row)
        data["env"] = json.loads(data["env"]) if data.get("env") else None
        data["after"] = json.loads(data["after_ids"]) if data.get("after_ids") else None
        names = cls._fields
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
            "unique_key": self.unique_key,
            "webhook": self.webhook,
            "schedule": self.schedule,
            "after": self.after or [],
        }


@_record
class Attempt:
    job_id: str
    n: int
    started_at: float
    worker_id: str = None
    host: str = None
    pid: int = None
    ended_at: float = None
    exit_code: int = None
    outcome: str = None  # completed | failed | timeout | error | lost | stopped | cancelled
    error: str = None
    output: str = ""
    output_bytes: int = 0  # bytes the attempt wrote in all (output keeps the end)

    @classmethod
    def from_row(cls, row):
        names = cls._fields
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
    """The per-job timeout wins over the global ``job-timeout``: seconds, or None for no limit.
    A job's own timeout of 0 means no limit for it; no timeout of its own (None) means the
    global one, whose 0 means no limit."""
    return timeout_of(job, cfg)[0]


def timeout_of(job, cfg):
    """``(seconds or None, where it comes from)``: "job" (its own) or "job-timeout" (the global one)."""
    if job.timeout is not None:
        return float(job.timeout) or None, "job"
    return float(cfg["job-timeout"]) or None, "job-timeout"


def describe_timeout(job, cfg):
    """The effective limit as people read it: "300s, from job-timeout", "none (the job's own)"."""
    seconds, origin = timeout_of(job, cfg)
    limit = "%gs" % seconds if seconds else "none"
    return "%s (the job's own)" % limit if origin == "job" else "%s, from %s" % (limit, origin)


# --- cron ----------------------------------------------------------------------------

CRON_ALIASES = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}
CRON_FIELDS = (  # name, low, high, names
    ("minute", 0, 59, None),
    ("hour", 0, 23, None),
    ("day of month", 1, 31, None),
    ("month", 1, 12, ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]),
    ("day of week", 0, 7, ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]),
)


@_record(frozen=True)
class Cron:
    """A parsed five-field cron expression (Vixie cron semantics)."""

    minutes: frozenset
    hours: frozenset
    days: frozenset
    months: frozenset
    weekdays: frozenset  # 0 = Sunday
    any_day: bool  # day-of-month field was *
    any_weekday: bool  # day-of-week field was *

    @classmethod
    def parse(cls, text):
        if not isinstance(text, str):
            raise InvalidInput("cron expression must be a string")
        expr = CRON_ALIASES.get(text.strip().lower(), text.strip())
        if expr.startswith("@"):
            raise InvalidInput("unknown cron alias %s (known: %s)" % (short_json(text), ", ".join(CRON_ALIASES)))
        parts = expr.split()
        if len(parts) != 5:
            raise InvalidInput("cron expression %s must have 5 fields (minute hour day month weekday)"
                               % short_json(text))
        sets = [_cron_field(p, *spec) for p, spec in zip(parts, CRON_FIELDS)]
        weekdays = frozenset(d % 7 for d in sets[4])
        return cls(sets[0], sets[1], sets[2], sets[3], weekdays, parts[2] == "*", parts[4] == "*")

    def day_matches(self, d):
        dom = d.day in self.days
        dow = (d.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return dom and dow
        return dom or dow  # both restricted: either one matches, as in Vixie cron

    def next_after(self, ts, tz=None):
        """The first tick strictly after epoch ``ts``, evaluated in time zone ``tz`` (default UTC)."""
        tz = tz or datetime.timezone.utc
        t = datetime.datetime.fromtimestamp(ts, tz).replace(tzinfo=None, second=0, microsecond=0)
        t += datetime.timedelta(minutes=1)
        limit = t + datetime.timedelta(days=366 * 8)
        while t < limit:
            if t.month not in self.months:
                t = (t.replace(day=1) + datetime.timedelta(days=32)).replace(day=1, hour=0, minute=0)
            elif not self.day_matches(t):
                t = (t + datetime.timedelta(days=1)).replace(hour=0, minute=0)
            elif t.hour not in self.hours:
                t = (t + datetime.timedelta(hours=1)).replace(minute=0)
            elif t.minute not in self.minutes:
                t += datetime.timedelta(minutes=1)
            else:
                when = t.replace(tzinfo=tz).timestamp()
                if when > ts:
                    return when
                t += datetime.timedelta(minutes=1)  # a repeated wall-clock hour (DST) maps to the past
        raise InvalidInput("cron expression never fires")


def _cron_field(text, name, lo, hi, names):
    values = set()
    for item in text.lower().split(","):
        m = re.match(r"^(\*|[a-z0-9]+(?:-[a-z0-9]+)?)(?:/(\d+))?$", item)
        if not m:
            raise InvalidInput("bad cron %s field %s" % (name, short_json(text)))
        span, step = m.group(1), int(m.group(2) or 1)
        if step < 1:
            raise InvalidInput("bad cron %s step in %s" % (name, short_json(text)))
        if span == "*":
            a, b = lo, hi if name != "day of week" else 6
        else:
            bounds = [_cron_value(v, name, lo, hi, names) for v in span.split("-")]
            a, b = bounds[0], bounds[-1]
            if m.group(2) and len(bounds) == 1:
                b = hi
            if a > b:
                raise InvalidInput("bad cron %s range %s" % (name, short_json(span)))
        values.update(range(a, b + 1, step))
    return frozenset(values)


def _cron_value(text, name, lo, hi, names):
    if names and text[:3] in names and not text.isdigit():
        return names.index(text[:3]) + (1 if name == "month" else 0)
    if not text.isdigit() or not lo <= int(text) <= hi:
        raise InvalidInput("cron %s value %s is out of range %d-%d" % (name, short_json(text), lo, hi))
    return int(text)


def resolve_tz(name):
    """'UTC', 'local' or an IANA name (needs the system's time zone database)."""
    if name in (None, "", "UTC", "utc", "Z"):
        return datetime.timezone.utc
    if name == "local":
        return datetime.datetime.now().astimezone().tzinfo
    try:
        import zoneinfo
    except ImportError:  # Python 3.8
        raise InvalidInput("time zone %s needs Python 3.9 or newer (its zoneinfo module); on Python %s use UTC "
                           "or local" % (short_json(name), sys.version.split()[0]))
    try:
        return zoneinfo.ZoneInfo(name)
    except Exception:
        raise InvalidInput("unknown time zone %s (use UTC, local, or a name like Europe/Berlin)" % short_json(name))


def schedule_next_run(schedule, after):
    """Next tick of a stored schedule (a dict with cron and tz) strictly after ``after``."""
    return Cron.parse(schedule["cron"]).next_after(after, resolve_tz(schedule["tz"]))


#: Maps each random byte to a letter of ID_ALPHABET: 256 is a multiple of 32, so every letter is equally likely.
_ID_TABLE = bytes(ord(ID_ALPHABET[b % len(ID_ALPHABET)]) for b in range(256))


# --- statistics -------------------------------------------------------------------

HIST_BASE, HIST_RATIO, HIST_TOP = 0.001, 1.25, 120  # run-time buckets: 1 ms * 1.25**n, n < 120


def run_time_bucket(seconds):
    """The histogram bucket of a run time: bucket n holds times up to 1 ms * 1.25**n (+-12%)."""
    if seconds <= HIST_BASE:
        return 0
    import math

    return min(HIST_TOP - 1, int(math.ceil(math.log(seconds / HIST_BASE, HIST_RATIO) - 1e-9)))


def bucket_percentile(buckets, q):
    """The ``q`` quantile (0..1) from ``{bucket: count}``: the upper bound of the bucket
    holding it (so at most 25% above the true value), or None without data."""
    total = sum(buckets.values())
    if not total:
        return None
    rank, seen = q * total, 0
    for bucket in sorted(buckets):
        seen += buckets[bucket]
        if seen >= rank:
            return HIST_BASE * HIST_RATIO ** bucket
    return HIST_BASE * HIST_RATIO ** max(buckets)


#: Outcomes of a run that count as "failed" in statistics (the run ended badly).
FAILED_OUTCOMES = ("failed", "timeout", "error")


def summarize_stats(rows, hist, seconds):
    """Per-queue statistics from ``stats_by_queue`` rows: throughput per minute,
    success rate, mean and p95 run time, mean wait before the run started."""
    queues = {}
    for r in rows:
        q = queues.setdefault(r["queue"], {"finished": 0, "completed": 0, "failed": 0, "cancelled": 0, "lost": 0,
                                           "run_sum": 0.0, "wait_sum": 0.0, "ran": 0})
        outcome = r["outcome"]
        key = "failed" if outcome in FAILED_OUTCOMES else outcome
        if key in q:
            q[key] += r["count"]
        if outcome != "lost":
            q["finished"] += r["count"]
            q["ran"] += r["count"]
            q["run_sum"] += r["run_sum"]
            q["wait_sum"] += r["wait_sum"]
    out = {}
    for name, q in sorted(queues.items()):
        ran = q.pop("ran")
        run_sum, wait_sum = q.pop("run_sum"), q.pop("wait_sum")
        done = q["completed"] + q["failed"]
        out[name] = dict(q,
                         per_minute=round(q["finished"] / (seconds / 60.0), 3) if seconds else None,
                         success_rate=round(q["completed"] / done, 4) if done else None,
                         mean_run=round(run_sum / ran, 6) if ran else None,
                         p95_run=bucket_percentile(hist.get(name, {}), 0.95),
                         mean_wait=round(wait_sum / ran, 6) if ran else None)
    return out


def new_job_id():
    """10 random letters of ID_ALPHABET (50 bits) from os.urandom: ~50x cheaper than
    secrets.choice per letter, which dominated bulk enqueue (bench/)."""
    return os.urandom(10).translate(_ID_TABLE).decode("ascii")


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
    for name, value in spec.items():
        _check_strings(value, name)
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
    if isinstance(prio, int) and not isinstance(prio, bool) and prio in PRIORITY_NAMES:
        prio = PRIORITY_NAMES[prio]  # the seed's stored form: 1 = high, 2 = medium, 3 = low
    if isinstance(prio, str) and prio.strip() in ("1", "2", "3"):
        prio = PRIORITY_NAMES[int(prio)]
    if not isinstance(prio, str) or prio.lower() not in PRIORITIES:
        raise InvalidInput("field 'priority' must be one of high, medium, low (or 1, 2, 3), got %s" % short_json(prio))
    job["priority"] = PRIORITIES[prio.lower()]
    timeout = spec.get("timeout")
    if isinstance(timeout, str) and timeout.strip().lower() == "none":
        timeout = 0
    if timeout is not None:
        if not _is_number(timeout) or timeout < 0 or timeout > 366 * 86400:
            raise InvalidInput("field 'timeout' must be a number of seconds from 0 (no limit) to a year, or \"none\", "
                               "got %s" % short_json(timeout))
        timeout = float(timeout)
    job["timeout"] = timeout  # None: the global job-timeout; 0: no limit
    retries = spec.get("max_retries", cfg["max-retries"])
    if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries <= 1000:
        raise InvalidInput("field 'max_retries' must be an integer from 0 to 1000, got %s" % short_json(retries))
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
            raise InvalidInput("field 'delay' must be a number of seconds >= 0, got %s" % short_json(delay))
        run_at = now + delay
    job["run_at"] = run_at
    jcwd = spec.get("cwd")
    if jcwd is not None and (not isinstance(jcwd, str) or not jcwd or "\x00" in jcwd):
        raise InvalidInput("field 'cwd' must be a non-empty path string")
    if jcwd is None or not os.path.isabs(jcwd):
        jcwd = os.path.join(cwd or current_directory(), jcwd or "")
    job["cwd"] = os.path.normpath(jcwd)
    env = spec.get("env")
    if env is not None:
        if not isinstance(env, dict):
            raise InvalidInput("field 'env' must be an object of strings, got %s" % _json_type(env))
        for k, v in env.items():
            if not ENV_NAME_RE.fullmatch(k):
                raise InvalidInput("field 'env' has an invalid variable name %s" % short_json(k))
            if not isinstance(v, str) or "\x00" in v:
                raise InvalidInput("field 'env' value of %s must be a string without NUL bytes" % k)
    job["env"] = env or None
    queue = spec.get("queue")
    job["queue"] = DEFAULT_QUEUE if queue is None else validate_name(queue, "queue")
    job["after"] = validate_after(spec.get("after"))
    key = spec.get("unique_key")
    if key is not None and (not isinstance(key, str) or not key or len(key) > 200 or "\x00" in key):
        raise InvalidInput("field 'unique_key' must be a string of 1-200 characters without NUL bytes")
    job["unique_key"] = key
    job["webhook"] = None if spec.get("webhook") is None else validate_url(spec["webhook"], "field 'webhook'")
    return job


def current_directory():
    try:
        return os.getcwd()
    except FileNotFoundError:
        raise InvalidInput("the current directory was deleted: cd to one that exists, or give the job's "
                           "directory (--cwd DIR, or \"cwd\" in the job)") from None


def _is_utf8(text):
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _check_strings(value, field):
    """Every string in a job field must be valid UTF-8 (JSON can smuggle in lone surrogates)."""
    if isinstance(value, str):
        if not _is_utf8(value):
            raise InvalidInput("field '%s' is not valid UTF-8 text" % field)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k, field)
            _check_strings(v, field)
    elif isinstance(value, list):
        for v in value:
            _check_strings(v, field)


def validate_id(value, what="job id", field="id"):
    if not isinstance(value, str):
        raise InvalidInput("field '%s' must be a string, got %s" % (field, _json_type(value)))
    if not value or len(value) > MAX_ID_LENGTH or not ID_RE.fullmatch(value):
        raise InvalidInput(
            "invalid %s %s: use 1-%d letters, digits and _.:@+- (not starting with one of .:@+-)"
            % (what, short_json(value), MAX_ID_LENGTH)
        )
    return value


def validate_name(value, what):
    """Queue and schedule names follow the job id rules, at most 64 characters."""
    validate_id(value, what + " name", field=what)
    if len(value) > 64:
        raise InvalidInput("%s name %s is longer than 64 characters" % (what, short_json(value)))
    return value


def validate_after(value):
    """``after``: job ids as a list or a comma-separated string -> list of unique ids."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        raise InvalidInput("field 'after' must be a list of job ids or a comma-separated string")
    if len(value) > 100:
        raise InvalidInput("field 'after' names more than 100 jobs")
    ids = []
    for v in value:
        validate_id(v, "job id in 'after'", field="after")
        if v not in ids:
            ids.append(v)
    return ids


def validate_url(value, what):
    from urllib.parse import urlsplit

    if not isinstance(value, str) or len(value) > 2000 or any(c.isspace() or ord(c) < 32 for c in value):
        raise InvalidInput("%s must be an http:// or https:// URL" % what)
    try:
        parts = urlsplit(value)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidInput("%s must be an http:// or https:// URL, got %s" % (what, short_json(value)))
    return value


def dependency_order(jobs):
    """Order a batch so each job comes after the batch jobs it depends on.

    Raises InvalidInput on a cycle (a job that would wait for itself)."""
    if not any(j.get("after") for j in jobs):
        return list(jobs)
    by_id = {j["id"]: j for j in jobs if j.get("id")}
    order, done, active = [], set(), set()
    for root in jobs:
        stack = [(root, iter(root.get("after") or []))]
        if id(root) in done:
            continue
        active.add(id(root))
        while stack:
            job, deps = stack[-1]
            dep = next(deps, None)
            if dep is None:
                stack.pop()
                active.discard(id(job))
                if id(job) not in done:
                    done.add(id(job))
                    order.append(job)
                continue
            child = by_id.get(dep)
            if child is None or id(child) in done:
                continue
            if id(child) in active:
                raise InvalidInput("dependency cycle in 'after' involving job %s" % dep)
            active.add(id(child))
            stack.append((child, iter(child.get("after") or [])))
    return order


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1048576, "mb": 1048576, "mib": 1048576,
              "g": 1073741824, "gb": 1073741824, "gib": 1073741824}


def parse_size(text):
    """'1048576', '64K', '1M', '1MiB' -> bytes (binary units); ValueError otherwise."""
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", str(text).lower())
    if not m or m.group(2) not in SIZE_UNITS:
        raise ValueError("not a size such as 65536, 64K, 1M")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2)])


def format_size(n):
    for unit, size in (("G", 1073741824), ("M", 1048576), ("K", 1024)):
        if n >= size and n % size == 0:
            return "%d%s" % (n // size, unit)
    return "%d" % n


def format_seconds(seconds):
    """300 -> "300s", 3600 -> "1h", 604800 -> "7d" (whole hours and days read as such), 0.5 -> "0.5s"."""
    for unit, size in (("d", 86400), ("h", 3600)):
        if seconds >= size and seconds % size == 0:
            return "%d%s" % (seconds // size, unit)
    return "%gs" % seconds


def parse_duration(text):
    """'90', '1.5', '90s', '15m', '12h', '7d', '2w' -> seconds (float); ValueError otherwise."""
    m = re.match(r"^\s*(-?)\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhdw]?)\s*$", str(text).lower())
    if not m:
        raise ValueError("not a duration such as 30, 90s, 15m, 12h, 7d")
    if m.group(1):
        raise ValueError("a duration cannot be negative")
    return float(m.group(2)) * DURATION_UNITS.get(m.group(3) or "s", 1)


def _json_type(v):
    if v is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array", dict: "an object"}.get(
        type(v), type(v).__name__
    )


def short_json(v, n=40):
    """A value as messages quote what a user gave: JSON text (so "" and " x" show), ASCII only,
    cut to ``n`` characters."""
    text = json.dumps(v, ensure_ascii=True, default=str)
    return text if len(text) <= n else text[: n - 3] + "..."


def _validate_number(setting, text, value=None):
    """A setting's number from ``text`` (or ``value``, already parsed from it), or InvalidInput that
    says what it takes."""
    kind, lo, hi = setting.kind, setting.lo, setting.hi
    if value is None:
        try:
            value = int(text) if kind is int else parse_duration(text)
        except (TypeError, ValueError):
            value = None
    if value is None or value < lo or (setting.lo_open and value == lo) or value > hi:
        raise InvalidInput("%s must be %s" % (setting.name if setting is QUEUE_LIMIT else "config " + setting.name,
                                              setting_range(setting))
                           + ", got %s" % short_json(text))
    return value


def setting_range(setting):
    """What a number setting takes, as `config set` and its help say it."""
    what = {"s": "a duration", "bytes": "a size"}.get(setting.unit, "a whole number" if setting.kind is int
                                                      else "a number")
    lo = setting.show(setting.lo) if setting.lo else "0"
    span = ("above %s, up to %s" if setting.lo_open else "from %s to %s") % (lo, setting.show(setting.hi))
    return "%s %s%s" % (what, span, ", or %s" % setting.zero if setting.zero else "")


def normalize_config_key(key):
    k = str(key).strip().lower().replace("_", "-")
    if k not in SETTINGS_BY_NAME:
        raise InvalidInput("unknown config key %s (known: %s)" % (short_json(key), ", ".join(SETTINGS_BY_NAME)))
    return k


def validate_config(key, value):
    """Return ``(key, value)`` normalised, or raise InvalidInput; nothing is written."""
    k = normalize_config_key(key)
    setting = SETTINGS_BY_NAME[k]
    if setting.kind is str:
        return k, "" if str(value).strip() in ("", "none") else validate_url(str(value), "config " + k)
    text = str(value).strip().lower()
    if setting.zero and text in (setting.zero, "none", "0"):
        return k, setting.kind(0)
    parsed = None
    if setting.unit == "bytes":
        with contextlib.suppress(ValueError):  # (else _validate_number says what it takes)
            parsed = parse_size(text)
    return k, _validate_number(setting, value, parsed)


###############################################################################
# Storage: the store contract and the rules both stores share
###############################################################################


class Store:
    """The contract every backend implements.  Times are epoch seconds (floats).

    Every read-modify-write is one atomic transaction.  Methods raise
    DatabaseBusy when the database stays locked past the busy timeout and
    DatabaseError when it is unusable; they never leave a half-written change.

    Waking workers is the store's job: a method whose commit makes jobs due
    (enqueue, a finish that releases the jobs waiting for it, release, rescue,
    retry_dead, retry_all_dead, set_queue, fire_schedules) wakes idle workers
    once it has committed, and a cancel of a running job wakes its worker.
    Callers never wake workers themselves.
    """

    #: True when this store can only read (SQLite: a file this user may not write); every
    #: method that writes then raises DatabaseError.
    readonly = False

    #: Seconds a worker may let a run go before recording its pid (``started``).  0: at once,
    #: because ``started`` is also what makes the claim durable (SQLite's finish_and_claim
    #: commits without waiting for the disk).  A store whose claims are durable when they
    #: commit lets a short run skip that write: its pid is recorded with its result (``finish``),
    #: and a run lost before either is found by its environment (kill_lost_group).
    pid_delay = 0.0

    # --- jobs ---------------------------------------------------------------------------

    def enqueue(self, jobs, now, existing=None):
        """Insert validated jobs (dicts from ``validate_job``) in one transaction.

        A job without id gets a generated one.  A duplicate id refuses the whole
        batch with Conflict naming the id.  A job with ``after`` waits (state
        waiting) until every job it names has completed; it is pending at once when
        they all have, and refused when one does not exist (NotFound) or ended dead
        or cancelled (Conflict).  A job whose ``unique_key`` an unfinished job holds
        (pending, processing, failed or waiting; earlier in the batch included) is
        not added: that job's id stands in its place, and is also appended to the
        list ``existing`` when one is given.  Returns the ids in order.  Durable
        on return.
        """
        raise NotImplementedError

    def claim(self, worker_id, host, now, lease, queues=None):
        """Atomically take the next due job (state pending or failed with
        ``run_at <= now``) by priority, then run_at, then enqueue order; mark it
        processing, owned by ``worker_id`` with a lease until ``now + lease``,
        count the attempt and open its attempt record.  Returns the Job (with
        ``runs`` numbering this attempt) or None.  Two workers never get the
        same job.  Jobs of a paused queue, and of a queue with ``max_running``
        jobs running already, are left where they are; with ``queues`` (a list
        of names) only jobs of those queues are taken.  When nothing is due the
        worker is marked idle in the same transaction, so an enqueue that
        commits afterwards sees it and wakes it.
        """
        raise NotImplementedError

    def started(self, job_id, run, pid):
        """Record the process id of a running attempt (for killing its group on rescue).  Durable:
        it makes the claim before it, and a result recorded with that claim, durable too.  A
        worker calls it at once, or ``pid_delay`` seconds into the run."""
        raise NotImplementedError

    def finish_and_claim(self, finished, claim):
        """``finish(**finished)``, then ``claim(**claim)``: a worker closes its last run and takes
        its next job.  Returns ``(what finish returned, the claimed job or None)``.  A backend may
        do both in one transaction, one that is durable only with the next ``started`` (or at
        once when nothing was claimed) when its ``pid_delay`` is 0; this one makes two calls."""
        return self.finish(**finished), self.claim(**claim)

    def heartbeat(self, worker_id, job_id=None, run=None, now=None, lease=None, output=None):
        """Renew the worker's heartbeat and, with ``job_id``, the job's lease (and
        store the output so far).  Returns False when the worker no longer owns
        that run (it was rescued): the caller must stop the job and must not
        report a result.
        """
        raise NotImplementedError

    def finish(self, job_id, run, worker_id, state, now, outcome, exit_code=None, error=None,
               output="", output_bytes=0, retry_at=None, pid=None):
        """Close a run: move the job from processing to ``state`` (completed,
        failed with ``retry_at``, dead, or cancelled), record exit code, error,
        output, the run's ``pid`` when one is given and none is recorded, and statistics.  A job that reaches a final state releases or
        cancels the jobs waiting for it and queues its webhook deliveries.  Only
        the owner of ``run`` may finish it: returns False and changes nothing
        otherwise (fencing).
        """
        raise NotImplementedError

    def release(self, job_id, run, worker_id, now, reason):
        """Put an owned running job back to pending without using up a retry
        (forced stop).  Returns False when the caller no longer owns it."""
        raise NotImplementedError

    def rescue(self, now, host, alive, kill):
        """Give back jobs whose owner is gone: leases past ``lease_until``, and
        jobs of workers that ``worker_alive`` says are gone (on ``host``: their
        process, asked with ``alive(pid, started_at)``; elsewhere: their
        heartbeat).  Each lost run is recorded as outcome ``lost``; the job
        goes back to pending without using up a retry, or to the DLQ after
        ``max-rescues`` lost runs.  ``kill(pid, started_at)`` is called for the
        process group of each lost run that ran on ``host``; for one whose pid was
        never recorded, ``kill(None, started_at, (job_id, run, worker_id))``.  Stale worker
        records are removed.  Returns the rescued job ids.
        """
        raise NotImplementedError

    def get(self, job_id):
        """The Job with that id, or None."""
        raise NotImplementedError

    def states_of(self, job_ids):
        """``{job_id: (state, exit_code)}`` of those of ``job_ids`` that exist."""
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
        with ``reset_attempts``).  NotFound / Conflict when it is not dead, and
        Conflict when another unfinished job holds its unique key."""
        raise NotImplementedError

    def restart(self, job_id, now):
        """Queue a finished job (completed, cancelled or dead) again, as pueue's restart does: pending
        now, with its whole retry budget, its history kept (its next run is numbered on).  NotFound;
        Conflict when it has not finished, or another unfinished job holds its unique key."""
        raise NotImplementedError

    def delete_jobs(self, state=None):
        """Delete jobs of ``state`` (all but processing ones when None) and their
        attempts; running jobs are never deleted (Conflict).  Jobs that waited for a
        deleted job are cancelled, saying so.  Returns the number deleted."""
        raise NotImplementedError

    def purge(self, states, before, batch=1000):
        """Delete jobs in ``states`` (final states only: InvalidInput otherwise) last updated
        before ``before``, with their attempts, ``batch`` jobs per transaction so that workers
        are never held up long.  Statistics are kept.  Returns the number deleted."""
        raise NotImplementedError

    # --- cancel --------------------------------------------------------------------------

    def cancel(self, job_id, now):
        """Cancel a job: a waiting, pending or failed one at once (returns 'cancelled'); a
        running one is flagged for its worker, which is woken to kill the process tree and
        record the job as cancelled (returns 'requested').  Jobs waiting for a cancelled job
        are cancelled too.  NotFound / Conflict (already finished) otherwise."""
        raise NotImplementedError

    def cancel_requested(self, job_id, run):
        """True when a user asked to cancel run ``run`` of the job."""
        raise NotImplementedError

    # --- queues --------------------------------------------------------------------------

    def queues(self):
        """Every known queue, by name: dicts with name, max_running (None = no limit), paused
        and counts (``{state: n}`` of its pending, processing, failed and waiting jobs)."""
        raise NotImplementedError

    def set_queue(self, name, max_running=False, paused=None):
        """Create or change a queue: ``max_running`` (None = no limit; False = leave as is),
        ``paused`` (None = leave as is).  Running jobs are never affected."""
        raise NotImplementedError

    # --- schedules -----------------------------------------------------------------------

    def add_schedule(self, name, cron, tz, spec, missed, overlap, next_run, now):
        """Store a recurring schedule: a cron expression evaluated in time zone ``tz``, the job
        ``spec`` to enqueue at each tick, the policies ``missed`` (once | skip) and ``overlap``
        (skip | allow), and the first tick ``next_run``.  Conflict if the name is taken."""
        raise NotImplementedError

    def schedules(self):
        """Every schedule as a dict (by name; spec decoded, paused a bool), with ``last_state``,
        the state of the last job it enqueued."""
        raise NotImplementedError

    def remove_schedule(self, name):
        """Delete a schedule (the jobs it enqueued stay); NotFound if there is none."""
        raise NotImplementedError

    def pause_schedule(self, name, paused, next_run=None):
        """Pause or resume a schedule; resuming sets its next tick ``next_run``, so the ticks
        missed while paused are not 'missed'.  NotFound if there is none."""
        raise NotImplementedError

    def fire_schedules(self, now, next_run, cfg):
        """Enqueue one job for each due schedule tick (``schedule_tick``), exactly once however
        many processes call this, then advance each schedule with ``next_run(schedule, after)``.
        A tick whose job's unique key is held enqueues nothing.  Returns the new job ids."""
        raise NotImplementedError

    # --- webhooks ------------------------------------------------------------------------

    def webhooks_due(self, now):
        """True when a webhook delivery is due."""
        raise NotImplementedError

    def claim_webhooks(self, now, limit, lease):
        """Take up to ``limit`` due webhook deliveries (dicts with id, url, payload and
        attempts, oldest first) for ``lease`` seconds: no other sender gets them meanwhile."""
        raise NotImplementedError

    def job_webhooks(self, job_id):
        """How the webhook deliveries of a job went, oldest first: dicts with url, state ("pending",
        "failing": it will be tried again, "delivered" or "failed": given up), attempts, last_error,
        next_at (None unless it will be tried), delivered_at and created_at."""
        raise NotImplementedError

    def webhook_result(self, delivery_id, now, error=None, next_at=None):
        """Record a delivery attempt: delivered (no ``error``), to be retried at ``next_at``, or
        given up (an error and no ``next_at``: the delivery is kept, never sent again)."""
        raise NotImplementedError

    # --- configuration -------------------------------------------------------------------

    def config(self):
        """The effective configuration: DEFAULTS overlaid with stored values."""
        raise NotImplementedError

    def set_config(self, key, value):
        """Store one validated configuration value."""
        raise NotImplementedError

    # --- workers ---------------------------------------------------------------------------

    def register_worker(self, worker):
        """Insert or replace a worker record (a dict with id, host, pid, pid_started,
        supervisor_pid, now and wake: its wake-up address, or None)."""
        raise NotImplementedError

    def unregister_worker(self, worker_id):
        """Remove a worker record."""
        raise NotImplementedError

    def workers(self):
        """All worker records (dicts), oldest first."""
        raise NotImplementedError

    def wake_addresses(self, host, n, supervisor_pid=None, idle=True):
        """Wake-up addresses of up to ``n`` (None or -1: all) idle workers on ``host``; only those
        of the supervisor ``supervisor_pid`` if given; busy ones too unless ``idle``."""
        raise NotImplementedError

    def poll_for_locks(self):
        """Called once by a worker on its own store: wait for locks in the way that suits a process
        that meets the others at the lock many times a second (SQLite: poll instead of sleeping
        in the busy handler).  Nothing to do for a database server."""

    def wait_fds(self):
        """File descriptors an idle worker also waits on: readable when work may
        have arrived (PostgreSQL: the LISTEN connection).  [] when the backend
        has no notifications of its own (SQLite: workers are woken by datagram)."""
        return []

    def consume_notifications(self):
        """Read and discard what made ``wait_fds`` readable.  True when it asks busy workers to
        look at their job now (a cancel), as a wake-up datagram does; "jobs are due" is for idle
        workers, which look for work whenever they wake, and returns False."""
        return False

    # --- dashboard and monitoring reads (bounded cost at any number of jobs) ---------

    def jobs_page(self, state=None, id_prefix=None, limit=50, after=None):
        """One page of jobs, for browsing a queue of any size.

        Without ``id_prefix``: jobs (of ``state`` if given) newest first, by
        ``(updated_at, seq)`` descending; ``after`` is the ``(updated_at, seq)``
        of the last job of the previous page (keyset pagination: no OFFSET).
        With ``id_prefix``: jobs whose id starts with it (case-sensitive), in
        id order, served by the id index; ``after`` is the last id of the
        previous page.  Returns ``(jobs, more)``: at most ``limit`` Jobs and
        whether another page follows.  The cost depends on ``limit`` (and on
        how many ids share the prefix), never on the total number of jobs.
        """
        raise NotImplementedError

    def oldest_due(self, now):
        """``run_at`` of the job that has waited longest among those due at
        ``now`` (pending, or failed and awaiting its retry), or None.  ``now -
        oldest_due(now)`` is the queue latency.  Index-served."""
        raise NotImplementedError

    def scheduled_page(self, now, limit=50, after=None):
        """One page of the jobs that wait for a time to come: pending jobs whose ``run_at`` is
        after ``now`` (enqueued with a delay or a run time), soonest first, by ``(run_at, seq)``;
        ``after`` is the ``(run_at, seq)`` of the last job of the previous page.  Failed jobs
        waiting for their retry are not among them (they are listed as failed).  Returns
        ``(jobs, more)`` as ``jobs_page`` does.  Served by the index of due jobs, one range per
        priority: the cost depends on ``limit`` (and on how many failed jobs of the same
        priority wait for a retry), never on the total number of jobs."""
        raise NotImplementedError

    def queue_page(self, queue, state=None, limit=50, after=None, scan=2000):
        """One page of the jobs of one queue (of ``state`` if given), newest first, from
        ``after`` on, as ``jobs_page``.  No index leads with the queue, so at most ``scan`` jobs
        (of ``state``) are looked at: the cost depends on ``scan``, never on the total number of
        jobs.  Returns ``(jobs, more, cut)``: at most ``limit`` jobs; whether more may follow;
        and whether the look stopped at ``scan`` jobs before it found more than ``limit``."""
        raise NotImplementedError

    def queue_settings(self):
        """``{name: {"max_running": n or None, "paused": bool}}`` for every known queue.  Unlike
        ``queues()`` it counts no jobs: it reads the queues' own records only, at a cost that
        does not grow with the number of jobs."""
        raise NotImplementedError

    def stats_minutes(self, since, until):
        """Per-minute outcome totals of finished attempts for epoch minutes
        ``since..until`` (inclusive; a minute is ``int(epoch_seconds // 60)``),
        summed over queues: dicts with ``minute``, ``outcome``, ``count``,
        ``run_sum`` and ``wait_sum`` (seconds), ordered by minute.  Minutes
        without finished attempts are absent."""
        raise NotImplementedError

    def stats_by_queue(self, since, until):
        """Statistics of attempts that ended in epoch minutes ``since..until``: ``(rows,
        hist)`` where rows are dicts with queue, outcome, count, run_sum and wait_sum, and
        hist is ``{queue: {run_time_bucket: count}}``.  Purging jobs does not change them."""
        raise NotImplementedError

    def attempt_totals(self):
        """Lifetime totals of finished attempts, one dict per (queue, outcome):
        ``queue``, ``outcome``, ``count``, ``duration_sum`` (seconds) and
        ``buckets``, a list of ``(upper_bound, cumulative_count)`` over
        DURATION_BUCKETS ending with ``(inf, count)``.  Counters: deleting or
        purging jobs never makes them go down."""
        raise NotImplementedError

    def retry_all_dead(self, now, reset_attempts=False):
        """Move every dead job back to pending, as ``retry_dead`` does for one,
        in one transaction.  A job that cannot move (another active job holds
        its unique key) stays dead.  Returns ``(retried, skipped)`` counts."""
        raise NotImplementedError

    def data_version(self):
        """An opaque value that changes whenever any process commits a change
        to the database (after a commit by this store, it may or may not).
        Cheap enough to call several times a second; the dashboard calls it on
        a store it uses for nothing else, to push live updates."""
        raise NotImplementedError

    def check(self):
        """Raise DatabaseGone when the database this store opened was deleted or replaced
        since (workers call it before every claim); nothing to do for a database server."""

    def close(self):
        """Close the store's connections (a store is not used after this)."""
        raise NotImplementedError


# --- the rules both stores share ----------------------------------------------------------
#
# Pure functions (time passed in, no I/O), and StoreRules: the control flow of the contract's
# methods, written once over the queries each store supplies.

# What a store says when it refuses something (one text each, whichever store says it).
NO_SUCH_JOB = "no job with id %s"
ID_EXISTS = "a job with id %s already exists"
KEY_TAKEN = "unique key %s is taken"
NO_FRESH_ID = "could not generate a unique job id"
NO_SUCH_DEPENDENCY = "job %s depends on %s, which does not exist"
BAD_DEPENDENCY = "job %s depends on %s, which is %s"
DEPENDENCY_ENDED = "dependency %s ended %s"
DEPENDENCY_DELETED = "dependency %s was deleted"
CANCELLED_BY_USER = "cancelled by a user"
ALREADY_FINISHED = "job %s is already %s"
NOT_DEAD = "job %s is %s, not dead: only jobs in the dead letter queue can be retried"
NOT_FINISHED = "job %s is %s: only a completed, cancelled or dead job can be restarted"
RETRY_KEY_HELD = "job %s cannot be retried: another active job holds its unique key"
RUNNING_NOT_CLEARED = "running jobs cannot be cleared; stop the workers first"
ONLY_FINISHED_PURGED = "only finished jobs can be purged (%s), not %s"
SCHEDULE_EXISTS = "a schedule named %s already exists"
NO_SUCH_SCHEDULE = "no schedule named %s"


class IdTaken(Exception):
    """A store's insert met a job with that id already (StoreRules draws another, or refuses)."""


class KeyHeld(Exception):
    """A store's write met the unique-key index: an unfinished job holds the key."""


def job_record(job):
    """The columns a store writes for a validated job (``validate_job``): env and after as JSON
    text, the queue DEFAULT_QUEUE when none is named, the optional fields as None."""
    row = dict(job, env=json.dumps(job["env"]) if job.get("env") else None,
               after_ids=json.dumps(job["after"]) if job.get("after") else None)
    row.setdefault("queue", DEFAULT_QUEUE)
    for name in ("unique_key", "webhook", "schedule"):
        row.setdefault(name, None)
    return row


def initial_state(job, states):
    """The state a new job starts in: 'waiting' while a job it depends on (``after``) has not
    completed, else 'pending'.  ``states`` maps each of them to its state (absent: no such job).
    A dependency that does not exist is NotFound; one that ended dead or cancelled, Conflict: the
    job could never run."""
    state = "pending"
    for dep in job.get("after") or []:
        dep_state = states.get(dep)
        if dep_state is None:
            raise NotFound(NO_SUCH_DEPENDENCY % (job.get("id") or "to enqueue", short_json(dep)))
        if dep_state in ("dead", "cancelled"):
            raise Conflict(BAD_DEPENDENCY % (job.get("id") or "to enqueue", dep, dep_state))
        if dep_state != "completed":
            state = "waiting"
    return state


def webhook_status(row):
    """A stored webhook delivery as ``Store.job_webhooks`` returns it (delivered_at -1: given up)."""
    d = dict(row)
    given_up = d["delivered_at"] == -1
    d["state"] = ("failed" if given_up else "delivered" if d["delivered_at"] is not None else
                  "failing" if d["attempts"] else "pending")
    if given_up:
        d["delivered_at"] = None
    if d["state"] in ("delivered", "failed"):
        d["next_at"] = None
    return {k: d[k] for k in ("url", "state", "attempts", "last_error", "next_at", "delivered_at", "created_at")}


def webhook_deliveries(row, stored_url):
    """The webhook deliveries of a job that reached a final state (its stored row): ``(urls,
    payload)``.  The URLs are the job's own webhook and the ``webhook-url`` setting (as stored:
    JSON text, or None), once each; the payload, the JSON document each one gets: the event
    ("job." + state), the job without its env (it may hold secrets), and who sent it."""
    urls = [row["webhook"], json.loads(stored_url) if stored_url else None]
    urls = [u for i, u in enumerate(urls) if u and u not in urls[:i]]
    if not urls:
        return [], None
    job = Job.from_row(row)
    doc = job.to_dict()
    doc.pop("env", None)
    return urls, json.dumps({"event": "job." + job.state, "job": doc, "sent_by": "queuectl " + __version__})


#: A worker on another machine is judged by its heartbeat: it is gone once that is older than
#: WORKER_SILENCE_LEASES leases, and never sooner than WORKER_SILENCE_MIN seconds.
WORKER_SILENCE_LEASES = 4
WORKER_SILENCE_MIN = 60.0


def worker_alive(w, now, host, lease, alive):
    """The one rule for "is this worker still there" (rescue, `worker status`, the dashboard,
    `worker stop`), for a worker record ``w`` at ``now`` seen from machine ``host``.

    A worker of this machine is alive while its process is: ``alive(pid, pid_started)`` checks
    the pid and the process's start time, so a pid the kernel gave to another process since
    does not count.  A worker of another machine cannot be asked: it is alive while its
    heartbeat is at most max(4 x ``lease``, 60 s) old.  A live worker renews it every lease/3
    seconds, idle or busy, so that is twelve missed beats; the minute covers a short lease, a
    clock step and a database that was busy for a while."""
    if w["host"] == host:
        return bool(alive(w["pid"], w["pid_started"]))
    return w["heartbeat_at"] >= now - max(WORKER_SILENCE_LEASES * float(lease), WORKER_SILENCE_MIN)


def finish_state(state):
    """The state a run may end in (completed, failed, dead or cancelled) as a JobState; ValueError
    otherwise (a worker's bug, never a user's input)."""
    state = JobState(state)
    if not can_transition(JobState.PROCESSING, state) or state is JobState.PENDING:
        raise ValueError("cannot finish a run into state %s" % state)
    return state


def deletable_states(state):
    """The states ``delete_jobs(state)`` deletes: that one, or every one but processing (None).
    Running jobs are never deleted: Conflict."""
    states = [str(state)] if state else [s for s in STATES if s != "processing"]
    if "processing" in states:
        raise Conflict(RUNNING_NOT_CLEARED)
    return states


def check_purgeable(states):
    """Only jobs in a final state may be purged: InvalidInput naming the first other state."""
    for state in states:
        if state not in FINAL_STATES:
            raise InvalidInput(ONLY_FINISHED_PURGED % (", ".join(FINAL_STATES), state))


def counts_from_rows(rows):
    """``{state: n}`` for every state, zeros included, from rows with state and n."""
    result = {s: 0 for s in STATES}
    for r in rows:
        result[r["state"]] = int(r["n"])
    return result


def queue_list(queue_rows, count_rows):
    """``Store.queues()`` from the queue rows (name, max_running, paused) and the rows (queue,
    state, n) that count the unfinished jobs."""
    counts = {}
    for r in count_rows:
        counts.setdefault(r["queue"], {})[r["state"]] = int(r["n"])
    return [{"name": r["name"], "max_running": r["max_running"], "paused": bool(r["paused"]),
             "counts": counts.get(r["name"], {})} for r in queue_rows]


#: ``jobs_page``'s first page starts after this (updated_at, seq): after every job.
FIRST_PAGE = (float("inf"), 2 ** 63 - 1)


def id_prefix_range(prefix, after=None):
    """The ids a prefix search covers, ``(start, stop)``: from ``prefix`` (or just after ``after``,
    the last id of the previous page) to the first string past every id that starts with it.
    None when no job id can start with ``prefix``."""
    if not re.match(r"^[A-Za-z0-9_.:@+-]{1,%d}$" % MAX_ID_LENGTH, prefix):
        return None
    start = max(prefix, after + "\x01") if after else prefix  # (ids have no character below "+")
    return start, prefix[:-1] + chr(ord(prefix[-1]) + 1)


def page_of(rows, limit):
    """``(jobs, more)`` from up to ``limit + 1`` job rows: the page, and whether another follows."""
    return [Job.from_row(r) for r in rows[:limit]], len(rows) > limit


def queue_stats(rows, bucket_rows):
    """``Store.stats_by_queue()`` from the per-(queue, outcome) rows and the (queue, bucket, count)
    rows of the run-time histogram."""
    hist = {}
    for r in bucket_rows:
        hist.setdefault(r["queue"], {})[r["bucket"]] = int(r["count"])
    return [dict(r, count=int(r["count"])) for r in rows], hist


#: Upper bounds, in seconds, of the job duration histogram (``/metrics``); +Inf is implied.
DURATION_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)


def totals_with_buckets(total_rows, bucket_rows):
    """``Store.attempt_totals()`` from the per-(queue, outcome) totals and the (queue, outcome, le,
    count) rows of the duration histogram: the buckets made cumulative, ending with +Inf."""
    buckets = {}
    for r in bucket_rows:
        buckets.setdefault((r["queue"], r["outcome"]), {})[r["le"]] = int(r["count"])
    out = []
    for r in total_rows:
        per_bucket = buckets.get((r["queue"], r["outcome"]), {})
        cumulative, running = [], 0
        for le in DURATION_BUCKETS:
            running += per_bucket.get(le, 0)
            cumulative.append((le, running))
        cumulative.append((float("inf"), int(r["count"])))
        out.append({"queue": r["queue"], "outcome": r["outcome"], "count": int(r["count"]),
                    "duration_sum": r["duration_sum"], "buckets": cumulative})
    return out


def judge_lost_run(row, now, host, max_rescues, kill, started_at):
    """What a rescue does with one lost run (a row with id, runs, worker_id, host, pid,
    lease_until, rescues): kill its processes when it ran on ``host`` (by pid, or by its
    environment when the worker died before recording the pid), then decide the job's new
    state.  Returns ``(state, reason)``: back to pending, or dead after max_rescues."""
    if row["host"] == host and row["pid"]:
        kill(row["pid"], started_at)
    elif row["host"] == host and row["worker_id"]:
        kill(None, started_at, (row["id"], row["runs"], row["worker_id"]))
    expired = row["lease_until"] < now
    why = ("lease of worker %s expired" if expired else "worker %s died") % row["worker_id"]
    if row["rescues"] + 1 > max_rescues:
        return "dead", why + "; lost %d times, moved to the dead letter queue" % (row["rescues"] + 1)
    return "pending", why


def config_from_rows(rows):
    """DEFAULTS overlaid with stored (key, JSON value) rows; unknown keys and bad values are ignored."""
    cfg = dict(DEFAULTS)
    for row in rows:
        if row["key"] in cfg:
            with contextlib.suppress(ValueError):
                cfg[row["key"]] = json.loads(row["value"])
    return cfg


def schedule_from_row(row):
    """A stored schedule row as a dict, its job spec decoded."""
    d = dict(row)
    d["spec"] = json.loads(d["spec"])
    d["paused"] = bool(d["paused"])
    return d


def schedule_tick(s, now, next_run, cfg, state_of, id_taken):
    """What firing one due schedule row ``s`` does, for every store: ``(job, upcoming)``, the
    validated job to enqueue (None when the tick is dropped) and the schedule's next run.

    The missed-tick policy: a tick over 60 s late is dropped with 'skip' ('once' runs one job for
    all missed ticks).  The overlap policy: 'skip' enqueues nothing while the previous job is
    unfinished (``state_of(job_id)``, None for a job that is gone).  The job id is the schedule's
    name and tick, with a random suffix when ``id_taken`` (a job kept under that id)."""
    tick = s["next_run"]
    upcoming = next_run(dict(s), now)
    if s["overlap"] == "skip" and s["last_job"] and state_of(s["last_job"]) in ACTIVE_STATES:
        return None, upcoming
    if now - tick > 60 and s["missed"] == "skip":
        return None, upcoming
    spec = dict(json.loads(s["spec"]))
    spec["id"] = "%s.%s" % (s["name"], time.strftime("%Y%m%dT%H%MZ", time.gmtime(tick)))
    if id_taken(spec["id"]):
        spec["id"] += "." + new_job_id()[:4]
    job = validate_job(spec, cfg, now, cwd=spec.get("cwd") or "/")
    job["schedule"] = s["name"]
    return job, upcoming


class StoreRules(Store):
    """The contract's control flow, written once: every store derives from this and supplies the
    queries (the methods under "queries", below), each a statement or two of its own SQL.

    Every query runs inside the transaction of the method that calls it (``_transaction``) unless
    it says otherwise.  Times handed to the queries are the operation's time ``_time(now)``: the
    caller's ``now`` for SQLite, the database clock for PostgreSQL.
    """

    # --- enqueue, job by job -------------------------------------------------------------

    def _enqueue_each(self, jobs, now, existing):
        """``enqueue`` for a batch with dependencies or unique keys, inside the caller's
        transaction: in dependency order (a job after the batch jobs it depends on), a job whose
        unique key an unfinished job holds stands for that job; the others are inserted in the
        state their dependencies give them, a waiting one with an edge to each.  Returns the ids
        in the order of ``jobs``."""
        ids, batch, keys = {}, {}, {}  # batch: id -> state, keys: unique key -> id, of this batch
        for job in dependency_order(jobs):
            key = job.get("unique_key")
            holder = key is not None and (keys.get(key) or self._holder_of(key))
            if not holder:
                deps = job.get("after") or []
                outside = [d for d in deps if d not in batch]
                states = dict(self._dependency_states(outside) if outside else {})
                states.update((d, batch[d]) for d in deps if d in batch)
                state = initial_state(job, states)
                job_id, holder = self._insert_new(job, state, now)
            if holder:
                ids[id(job)] = holder
                if existing is not None:
                    existing.append(holder)
                continue
            if state == "waiting":
                self._wait_for(job_id, deps)
            batch[job_id] = state
            if key is not None:
                keys[key] = job_id
            ids[id(job)] = job_id
        return [ids[id(job)] for job in jobs]

    def _insert_new(self, job, state, now):
        """Insert one validated job: under its own id (Conflict if that is taken), or a generated
        one (drawn again if taken).  Returns ``(job_id, None)``, or ``(None, holder)`` when an
        unfinished job holds its unique key (another process's enqueue committed it first)."""
        for _ in range(20):
            job_id = job.get("id") or new_job_id()
            try:
                self._insert_job(job, job_id, state, now)
                return job_id, None
            except KeyHeld:
                holder = self._holder_of(job["unique_key"])
                if holder:
                    return None, holder
                raise Conflict(KEY_TAKEN % short_json(job["unique_key"])) from None
            except IdTaken:
                if job.get("id"):
                    raise Conflict(ID_EXISTS % short_json(job_id)) from None
        raise QueuectlError(NO_FRESH_ID)  # pragma: no cover - 20 collisions of 50-bit random ids

    # --- the end of a job ----------------------------------------------------------------

    def _job_ended(self, job_id, state, at, row=None, dependents=None):
        """A job reached a final state (in the transaction that moved it there): queue its webhook
        deliveries, then release the jobs that waited for it (it completed) or cancel them, and
        theirs in turn (it ended dead or cancelled), saying why.  ``row``: the job's row, when the
        caller has it; ``dependents``: the result of ``_take_dependents``, when the caller has
        it."""
        row = self._fetch_job(job_id) if row is None else row
        if row is not None:
            urls, payload = webhook_deliveries(row, self._stored_webhook_url(row))
            for url in urls:
                self._insert_webhook(job_id, url, payload, at)
        released = 0
        for dep in self._take_dependents(job_id) if dependents is None else dependents:
            if state == "completed":
                released += bool(self._release_if_ready(dep, at))
            elif self._cancel_unstarted(dep, at, DEPENDENCY_ENDED % (job_id, state)):
                self._job_ended(dep, "cancelled", at)
        if released:
            self._wake(released)

    # --- the contract's methods ----------------------------------------------------------

    def rescue(self, now, host, alive, kill):
        cfg = self.config()
        at = self._time(now)
        to_local = float(now) - at if now is not None else 0.0  # a run's start, on the caller's clock
        dead = [w["id"] for w in self.workers() if not worker_alive(w, at, host, cfg["lease-seconds"], alive)]
        self._tidy()
        if not dead and not self._any_expired(at):
            return []  # the common case: reads only, no write lock taken
        rescued, back = [], 0
        with self._transaction():
            for row in self._lost_runs(at, dead):
                started = None if row["started_at"] is None else row["started_at"] + to_local
                state, why = judge_lost_run(row, at, host, int(cfg["max-rescues"]), kill, started)
                if not self._lose_run(row, at, state, why):
                    continue
                if state == "dead":
                    self._job_ended(row["id"], state, at)
                rescued.append(row["id"])
                back += state == "pending"
            for worker_id in dead:
                self._delete_worker(worker_id)
            if back:
                self._wake(back)
        return rescued

    def retry_dead(self, job_id, now, reset_attempts=False):
        return self._requeue(job_id, now, reset_attempts, ("dead",), NOT_DEAD)

    def restart(self, job_id, now):
        return self._requeue(job_id, now, True, FINAL_STATES, NOT_FINISHED)

    def _requeue(self, job_id, now, reset_attempts, states, not_in_states):
        with self._transaction():
            try:
                if self._retry(job_id, self._time(now), reset_attempts, states):
                    self._wake(1)
                    return True
            except KeyHeld:
                raise Conflict(RETRY_KEY_HELD % job_id) from None
            state = self._state(job_id)
        if state is None:
            raise NotFound(NO_SUCH_JOB % short_json(job_id))
        raise Conflict(not_in_states % (job_id, state))

    def retry_all_dead(self, now, reset_attempts=False):
        retried = skipped = 0
        with self._transaction():
            at = self._time(now)
            for job_id in self._dead_ids():
                try:
                    retried += bool(self._retry(job_id, at, reset_attempts))
                except KeyHeld:
                    skipped += 1
            if retried:
                self._wake(retried)
        return retried, skipped

    def delete_jobs(self, state=None):
        states = deletable_states(state)
        with self._transaction():
            deleted, waiting = self._delete_jobs(states)
            at = self._time(None) if waiting else None
            for job_id in waiting:  # jobs that waited for a deleted job can never run
                gone = self._missing_dependency(job_id)
                if gone and self._cancel_unstarted(job_id, at, DEPENDENCY_DELETED % gone):
                    self._job_ended(job_id, "cancelled", at)
        return deleted

    def purge(self, states, before, batch=1000):
        check_purgeable(states)
        total = 0
        for state in states:
            while True:
                with self._transaction():
                    n = self._purge_batch(state, before, batch)
                total += n
                if n < batch:
                    break
        return total

    def cancel(self, job_id, now):
        with self._transaction():
            at = self._time(now)
            if self._cancel_unstarted(job_id, at, CANCELLED_BY_USER):
                self._job_ended(job_id, "cancelled", at)
                return "cancelled"
            if self._request_cancel(job_id):
                return "requested"
            state = self._state(job_id)
        if state is None:
            raise NotFound(NO_SUCH_JOB % short_json(job_id))
        raise Conflict(ALREADY_FINISHED % (job_id, state))

    def set_queue(self, name, max_running=False, paused=None):
        with self._transaction():
            self._add_queue(name)
            if max_running is not False:
                self._set_queue_limit(name, max_running)
            if paused is not None:
                self._set_queue_paused(name, bool(paused))
            if paused is False or max_running is not False:
                self._wake(None)  # its jobs may be claimable now

    def add_schedule(self, name, cron, tz, spec, missed, overlap, next_run, now):
        row = {"name": name, "cron": cron, "tz": tz, "spec": json.dumps(spec), "missed": missed,
               "overlap": overlap, "next_run": next_run}
        if not self._insert_schedule(row, now):
            raise Conflict(SCHEDULE_EXISTS % short_json(name))

    def remove_schedule(self, name):
        if not self._delete_schedule(name):
            raise NotFound(NO_SUCH_SCHEDULE % short_json(name))

    def pause_schedule(self, name, paused, next_run=None):
        if not self._pause_schedule(name, bool(paused), next_run):
            raise NotFound(NO_SUCH_SCHEDULE % short_json(name))

    def fire_schedules(self, now, next_run, cfg):
        created = []
        at = self._time(now)
        if not self._schedules_due(at):
            return created
        with self._transaction():
            for s in self._due_schedules(at):
                job, upcoming = schedule_tick(s, at, next_run, cfg, self._state, self._id_taken)
                job_id = None
                if job is not None and not (job["unique_key"] and self._holder_of(job["unique_key"])):
                    job_id, _ = self._insert_new(job, "pending", at)
                if job_id:
                    created.append(job_id)
                self._advance_schedule(s["name"], upcoming, s["next_run"] if job_id else None, job_id)
            if created:
                self._wake(len(created))
        return created

    # --- queries: each store supplies these ----------------------------------------------
    # (in the transaction of ``_transaction`` unless they say otherwise; ``at`` is ``_time(now)``)

    def _transaction(self):
        """A context manager: one write transaction, committed when the block ends, rolled back if
        it raises."""
        raise NotImplementedError

    def _time(self, now):
        """The time of an operation whose logic runs here: for the caller's ``now`` (None: now)."""
        raise NotImplementedError

    def _wake(self, n):
        """``n`` jobs (None: some) became due: idle workers should look for work after the commit."""
        raise NotImplementedError

    def _tidy(self):
        """The store's own periodic housekeeping, outside a transaction (rescue calls it)."""

    def _fetch_job(self, job_id):
        """The job's row (every job column), or None."""
        raise NotImplementedError

    def _state(self, job_id):
        """The job's state, or None when there is no such job."""
        raise NotImplementedError

    def _id_taken(self, job_id):
        """Is there a job with this id?"""
        raise NotImplementedError

    def _holder_of(self, key):
        """The id of the unfinished job that holds unique key ``key``, or None."""
        raise NotImplementedError

    def _dependency_states(self, job_ids):
        """``{id: state}`` of the jobs a new job depends on; none may end before the commit."""
        raise NotImplementedError

    def _insert_job(self, job, job_id, state, now):
        """Insert a job in ``state`` (its times computed from ``now``) and its queue's name; IdTaken
        when the id exists, KeyHeld when its unique key is held: then nothing is written."""
        raise NotImplementedError

    def _wait_for(self, job_id, deps):
        """Record what a waiting job waits for: ``deps``, those that completed already left out."""
        raise NotImplementedError

    def _stored_webhook_url(self, row):
        """The ``webhook-url`` setting as stored (JSON text), or None (``row``: the job's row)."""
        raise NotImplementedError

    def _insert_webhook(self, job_id, url, payload, at):
        """Queue a webhook delivery for job ``job_id``, due at once."""
        raise NotImplementedError

    def _take_dependents(self, job_id):
        """The waiting jobs that depended on a job that ended; the edges to it are dropped."""
        raise NotImplementedError

    def _release_if_ready(self, job_id, at):
        """Move a waiting job that waits for nothing any more to pending; True if it moved."""
        raise NotImplementedError

    def _cancel_unstarted(self, job_id, at, error):
        """Cancel a waiting, pending or failed job (saying ``error``) and drop its edges; True if it
        was one."""
        raise NotImplementedError

    def _request_cancel(self, job_id):
        """Flag a running job for cancellation and ask its worker to look now; True if it runs."""
        raise NotImplementedError

    def _any_expired(self, at):
        """Has a running job's lease run out?  (Outside a transaction.)"""
        raise NotImplementedError

    def _lost_runs(self, at, dead_workers):
        """The running jobs whose lease ran out or whose worker is in ``dead_workers``, each once:
        rows with seq, id, runs, rescues, queue, worker_id, lease_until, host, pid, started_at."""
        raise NotImplementedError

    def _lose_run(self, row, at, state, why):
        """Record a lost run: the job to ``state`` without using up a retry, the attempt 'lost', the
        statistics; False when the run is not running any more."""
        raise NotImplementedError

    def _delete_worker(self, worker_id):
        raise NotImplementedError

    def _retry(self, job_id, at, reset_attempts, states=("dead",)):
        """Move a job in ``states`` (dead, or any finished state for a restart) back to pending;
        True if it was in one.  KeyHeld, with nothing changed, when an unfinished job holds its
        unique key."""
        raise NotImplementedError

    def _dead_ids(self):
        """The ids of the dead jobs, oldest first."""
        raise NotImplementedError

    def _delete_jobs(self, states):
        """Delete the jobs in ``states`` with their attempts and edges: ``(how many, the ids of the
        jobs that waited for one of them)``."""
        raise NotImplementedError

    def _missing_dependency(self, job_id):
        """The first job ``job_id`` depends on that does not exist any more, or None."""
        raise NotImplementedError

    def _purge_batch(self, state, before, limit):
        """Delete up to ``limit`` jobs in ``state`` last updated before ``before``, oldest first, with
        their attempts; returns how many."""
        raise NotImplementedError

    def _add_queue(self, name):
        raise NotImplementedError

    def _set_queue_limit(self, name, max_running):
        raise NotImplementedError

    def _set_queue_paused(self, name, paused):
        raise NotImplementedError

    def _insert_schedule(self, row, now):
        """Store a schedule, in a transaction of its own; False when the name is taken."""
        raise NotImplementedError

    def _delete_schedule(self, name):
        """Delete a schedule, in a transaction of its own; False when there is none."""
        raise NotImplementedError

    def _pause_schedule(self, name, paused, next_run):
        """Pause or resume a schedule (and set its next run, if given), in a transaction of its own;
        False when there is none."""
        raise NotImplementedError

    def _schedules_due(self, at):
        """Is a schedule due?  (Outside a transaction.)"""
        raise NotImplementedError

    def _due_schedules(self, at):
        """The due schedules' rows, locked where other processes could fire them at the same time."""
        raise NotImplementedError

    def _advance_schedule(self, name, next_run, last_run, job_id):
        """Set a schedule's next run, and its last run and job when it enqueued one."""
        raise NotImplementedError


###############################################################################
# Storage: the SQLite schema and its SQL (named parameters, each statement once)
###############################################################################

_DURATION = "MAX(0.0, COALESCE(NEW.ended_at, NEW.started_at) - NEW.started_at)"
_BUCKET = "CASE %s ELSE 1e999 END" % " ".join("WHEN {d} <= %r THEN %r" % (b, b) for b in DURATION_BUCKETS)

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
    # 2: named queues with limits, dependencies, unique keys, cancel, webhooks, schedules
    """
    ALTER TABLE jobs ADD COLUMN unique_key TEXT;
    ALTER TABLE jobs ADD COLUMN webhook TEXT;
    ALTER TABLE jobs ADD COLUMN schedule TEXT;
    ALTER TABLE jobs ADD COLUMN after_ids TEXT;
    ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
    CREATE UNIQUE INDEX jobs_unique_key ON jobs(unique_key)
        WHERE unique_key IS NOT NULL AND state IN ('pending', 'processing', 'failed', 'waiting');
    CREATE INDEX jobs_queue_ready ON jobs(queue, priority, run_at, seq) WHERE state IN ('pending', 'failed');
    CREATE INDEX jobs_running ON jobs(queue) WHERE state = 'processing';
    CREATE TABLE queues (
        name TEXT PRIMARY KEY,
        max_running INTEGER,
        paused INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO queues (name) SELECT DISTINCT queue FROM jobs;
    CREATE TABLE job_deps (
        job_id TEXT NOT NULL,
        depends_on TEXT NOT NULL,
        PRIMARY KEY (job_id, depends_on)
    ) WITHOUT ROWID;
    CREATE INDEX job_deps_reverse ON job_deps(depends_on);
    CREATE TABLE schedules (
        name TEXT PRIMARY KEY,
        cron TEXT NOT NULL,
        tz TEXT NOT NULL,
        spec TEXT NOT NULL,
        missed TEXT NOT NULL,
        overlap TEXT NOT NULL,
        paused INTEGER NOT NULL DEFAULT 0,
        next_run REAL NOT NULL,
        last_run REAL,
        last_job TEXT,
        created_at REAL NOT NULL
    );
    CREATE TABLE webhooks (
        id INTEGER PRIMARY KEY,
        url TEXT NOT NULL,
        payload TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL NOT NULL,
        lease_until REAL,
        last_error TEXT,
        created_at REAL NOT NULL,
        delivered_at REAL
    );
    CREATE INDEX webhooks_due ON webhooks(next_at) WHERE delivered_at IS NULL;
    """,
    # 3: lifetime attempt totals and a duration histogram (/metrics); deleting jobs never lowers them
    """
    CREATE TABLE attempt_totals (
        queue TEXT NOT NULL,
        outcome TEXT NOT NULL,
        count INTEGER NOT NULL,
        duration_sum REAL NOT NULL,
        PRIMARY KEY (queue, outcome)
    ) WITHOUT ROWID;
    CREATE TABLE attempt_durations (
        queue TEXT NOT NULL,
        outcome TEXT NOT NULL,
        le REAL NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (queue, outcome, le)
    ) WITHOUT ROWID;
    INSERT INTO attempt_totals (queue, outcome, count, duration_sum)
        SELECT COALESCE(j.queue, 'default'), a.outcome, count(*), SUM({old_duration})
        FROM attempts a LEFT JOIN jobs j ON j.id = a.job_id WHERE a.outcome IS NOT NULL GROUP BY 1, 2;
    INSERT INTO attempt_durations (queue, outcome, le, count)
        SELECT q, outcome, le, count(*) FROM (
            SELECT COALESCE(j.queue, 'default') AS q, a.outcome AS outcome, {old_bucket} AS le
            FROM attempts a LEFT JOIN jobs j ON j.id = a.job_id WHERE a.outcome IS NOT NULL
        ) GROUP BY q, outcome, le;
    CREATE TRIGGER attempts_totals AFTER UPDATE OF outcome ON attempts
    WHEN OLD.outcome IS NULL AND NEW.outcome IS NOT NULL BEGIN
        INSERT INTO attempt_totals (queue, outcome, count, duration_sum)
            VALUES (COALESCE((SELECT queue FROM jobs WHERE id = NEW.job_id), 'default'), NEW.outcome, 1, {duration})
            ON CONFLICT(queue, outcome) DO UPDATE SET count = count + 1,
                duration_sum = duration_sum + excluded.duration_sum;
        INSERT INTO attempt_durations (queue, outcome, le, count)
            VALUES (COALESCE((SELECT queue FROM jobs WHERE id = NEW.job_id), 'default'), NEW.outcome, {bucket}, 1)
            ON CONFLICT(queue, outcome, le) DO UPDATE SET count = count + 1;
    END;
    """.format(duration=_DURATION, bucket=_BUCKET.format(d=_DURATION),
               old_duration=_DURATION.replace("NEW.", "a."),
               old_bucket=_BUCKET.format(d=_DURATION.replace("NEW.", "a."))),
    # 4: per-minute run-time histogram, for percentiles in `queuectl stats`
    """
    CREATE TABLE stats_durations (
        minute INTEGER NOT NULL,
        queue TEXT NOT NULL,
        bucket INTEGER NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (minute, queue, bucket)
    ) WITHOUT ROWID;
    """,
    # 5: a webhook delivery names its job, so `get` can show how its deliveries went
    """
    ALTER TABLE webhooks ADD COLUMN job_id TEXT;
    UPDATE webhooks SET job_id = json_extract(payload, '$.job.id');
    CREATE INDEX webhooks_job ON webhooks(job_id);
    """,
]

JOB_COLUMNS = (
    "seq, id, command, state, priority, queue, timeout, max_retries, attempts, runs, rescues, run_at, "
    "created_at, updated_at, started_at, finished_at, worker_id, lease_until, exit_code, last_error, cwd, env, "
    "unique_key, webhook, schedule, after_ids, cancel_requested"
)

SQL_INSERT_JOB = """
INSERT INTO jobs (id, command, state, priority, queue, timeout, max_retries, run_at, created_at, updated_at, cwd, env,
                  unique_key, webhook, schedule, after_ids)
VALUES (:id, :command, :state, :priority, :queue, :timeout, :max_retries, :run_at, :now, :now, :cwd, :env,
        :unique_key, :webhook, :schedule, :after_ids)
"""
SQL_ADD_QUEUE = "INSERT INTO queues (name) VALUES (:queue) ON CONFLICT(name) DO NOTHING"
SQL_INSERT_DEP = "INSERT OR IGNORE INTO job_deps (job_id, depends_on) VALUES (:id, :dep)"
SQL_STATES_OF = "SELECT id, state, exit_code FROM jobs WHERE id IN (SELECT value FROM json_each(:ids))"
SQL_BY_UNIQUE_KEY = """
SELECT id FROM jobs WHERE unique_key = :key AND state IN ('pending', 'processing', 'failed', 'waiting')
"""
SQL_LIMITED_QUEUES = "SELECT name, max_running, paused FROM queues WHERE paused = 1 OR max_running IS NOT NULL"
SQL_RUNNING_BY_QUEUE = "SELECT queue, count(*) FROM jobs WHERE state = 'processing' GROUP BY queue"
SQL_QUEUE_NAMES = "SELECT name FROM queues"
SQL_CLAIM_SELECT_QUEUE = """
SELECT seq, priority, run_at FROM jobs INDEXED BY jobs_queue_ready
WHERE state IN ('pending', 'failed') AND queue = :queue AND run_at <= :now
ORDER BY priority, run_at, seq LIMIT 1
"""
SQL_CLAIM = """
UPDATE jobs SET state = 'processing', worker_id = :worker, lease_until = :lease_until,
       attempts = attempts + 1, runs = runs + 1, started_at = :now, updated_at = :now, finished_at = NULL
WHERE seq = (SELECT seq FROM jobs INDEXED BY jobs_ready WHERE state IN ('pending', 'failed') AND run_at <= :now
             ORDER BY priority, run_at, seq LIMIT 1)
RETURNING """ + JOB_COLUMNS
SQL_CLAIM_SELECT = """
SELECT seq FROM jobs INDEXED BY jobs_ready WHERE state IN ('pending', 'failed') AND run_at <= :now
ORDER BY priority, run_at, seq LIMIT 1
"""
SQL_CLAIM_UPDATE = """
UPDATE jobs SET state = 'processing', worker_id = :worker, lease_until = :lease_until,
       attempts = attempts + 1, runs = runs + 1, started_at = :now, updated_at = :now, finished_at = NULL
WHERE seq = :seq
"""
SQL_JOB_BY_SEQ = "SELECT " + JOB_COLUMNS + " FROM jobs WHERE seq = :seq"
SQL_DEPENDENTS_WAITING = """
SELECT d.job_id FROM job_deps d JOIN jobs j ON j.id = d.job_id WHERE d.depends_on = :id AND j.state = 'waiting'
"""
SQL_DROP_EDGES_TO = "DELETE FROM job_deps WHERE depends_on = :id"
SQL_DROP_EDGES_FROM = "DELETE FROM job_deps WHERE job_id = :id"
SQL_RELEASE_IF_READY = """
UPDATE jobs SET state = 'pending', updated_at = :now
WHERE id = :id AND state = 'waiting' AND NOT EXISTS (SELECT 1 FROM job_deps WHERE job_id = :id)
"""
SQL_CANCEL_JOB = """
UPDATE jobs SET state = 'cancelled', last_error = :error, finished_at = :now, updated_at = :now,
       worker_id = NULL, lease_until = NULL
WHERE id = :id AND state IN ('pending', 'failed', 'waiting')
"""
SQL_REQUEST_CANCEL = "UPDATE jobs SET cancel_requested = 1 WHERE id = :id AND state = 'processing'"
SQL_CANCEL_REQUESTED = "SELECT cancel_requested FROM jobs WHERE id = :id AND runs = :n"
SQL_WEBHOOK_INSERT = """
INSERT INTO webhooks (job_id, url, payload, next_at, created_at) VALUES (:job_id, :url, :payload, :now, :now)
"""
SQL_JOB_WEBHOOKS = """
SELECT url, attempts, next_at, last_error, created_at, delivered_at FROM webhooks WHERE job_id = :id ORDER BY id
"""
SQL_WEBHOOKS_DUE = """
SELECT id, url, payload, attempts FROM webhooks
WHERE delivered_at IS NULL AND next_at <= :now AND (lease_until IS NULL OR lease_until < :now)
ORDER BY next_at LIMIT :limit
"""
SQL_WEBHOOK_LEASE = "UPDATE webhooks SET lease_until = :lease_until WHERE id = :id"
SQL_WEBHOOK_DONE = """
UPDATE webhooks SET attempts = attempts + 1, delivered_at = :delivered, last_error = :error,
       next_at = COALESCE(:next_at, next_at), lease_until = NULL
WHERE id = :id
"""
SQL_WEBHOOK_ANY_DUE = "SELECT 1 FROM webhooks WHERE delivered_at IS NULL AND next_at <= :now LIMIT 1"
SQL_SCHEDULE_INSERT = """
INSERT INTO schedules (name, cron, tz, spec, missed, overlap, paused, next_run, created_at)
VALUES (:name, :cron, :tz, :spec, :missed, :overlap, 0, :next_run, :now)
"""
SQL_SCHEDULES = """
SELECT s.*, j.state AS last_state FROM schedules s LEFT JOIN jobs j ON j.id = s.last_job ORDER BY s.name
"""
SQL_SCHEDULES_DUE = "SELECT * FROM schedules WHERE paused = 0 AND next_run <= :now ORDER BY next_run"
SQL_SCHEDULE_ADVANCE = """
UPDATE schedules SET next_run = :next_run, last_run = COALESCE(:last_run, last_run), last_job = COALESCE(:job, last_job)
WHERE name = :name
"""
SQL_PURGE_IDS = """
SELECT id FROM jobs WHERE state = :state AND updated_at < :before ORDER BY updated_at LIMIT :limit
"""
SQL_INSERT_ATTEMPT = """
INSERT INTO attempts (job_id, n, worker_id, host, started_at) VALUES (:id, :n, :worker, :host, :now)
"""
SQL_WORKER_STATE = "UPDATE workers SET state = :state, job_id = :job, heartbeat_at = :now WHERE id = :worker"
# A run closed: its worker is no longer on it, unless it has moved on to its next job already.
SQL_WORKER_RUN_DONE = """
UPDATE workers SET state = 'busy', job_id = CASE WHEN job_id = :id THEN NULL ELSE job_id END,
       heartbeat_at = max(heartbeat_at, :now)
WHERE id = :worker
"""
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
       output = :output, output_bytes = :output_bytes, pid = COALESCE(pid, :pid)
WHERE job_id = :id AND n = :n
"""
SQL_STATS = """
INSERT INTO stats (minute, queue, outcome, count, run_sum, wait_sum)
VALUES (:minute, :queue, :outcome, 1, :run, :wait)
ON CONFLICT(minute, queue, outcome) DO UPDATE SET count = count + 1, run_sum = run_sum + :run, wait_sum = wait_sum + :wait
"""
SQL_STATS_HIST = """
INSERT INTO stats_durations (minute, queue, bucket, count) VALUES (:minute, :queue, :bucket, 1)
ON CONFLICT(minute, queue, bucket) DO UPDATE SET count = count + 1
"""
SQL_STATS_BY_QUEUE = """
SELECT queue, outcome, SUM(count) AS count, SUM(run_sum) AS run_sum, SUM(wait_sum) AS wait_sum
FROM stats WHERE minute BETWEEN :since AND :until GROUP BY queue, outcome
"""
SQL_STATS_HIST_BY_QUEUE = """
SELECT queue, bucket, SUM(count) AS count FROM stats_durations
WHERE minute BETWEEN :since AND :until GROUP BY queue, bucket
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
UPDATE jobs SET state = 'pending', run_at = :now, updated_at = :now, finished_at = NULL, cancel_requested = 0,
       attempts = CASE WHEN :reset THEN 0 ELSE MAX(attempts, max_retries) END,
       rescues = CASE WHEN :reset THEN 0 ELSE rescues END
WHERE id = :id AND state IN (SELECT value FROM json_each(:states))
"""
SQL_WAITING_ON_STATES = """
SELECT DISTINCT d.job_id FROM job_deps d JOIN jobs p ON p.id = d.depends_on
WHERE p.state IN (SELECT value FROM json_each(:states)) ORDER BY d.job_id
"""
SQL_DELETE_ATTEMPTS_STATES = """
DELETE FROM attempts WHERE job_id IN (SELECT id FROM jobs WHERE state IN (SELECT value FROM json_each(:states)))
"""
SQL_DELETE_JOBS_STATES = "DELETE FROM jobs WHERE state IN (SELECT value FROM json_each(:states))"
SQL_DROP_EDGES_OF_DELETED = "DELETE FROM job_deps WHERE job_id NOT IN (SELECT id FROM jobs)"
SQL_MISSING_DEP = """
SELECT depends_on FROM job_deps WHERE job_id = :id AND depends_on NOT IN (SELECT id FROM jobs)
ORDER BY depends_on LIMIT 1
"""
SQL_DELETE_ATTEMPTS_OF = "DELETE FROM attempts WHERE job_id IN (SELECT value FROM json_each(:ids))"
SQL_DELETE_JOBS_OF = "DELETE FROM jobs WHERE id IN (SELECT value FROM json_each(:ids))"
SQL_CONFIG_ALL = "SELECT key, value FROM config"
SQL_CONFIG_SET = "INSERT INTO config (key, value) VALUES (:key, :value) ON CONFLICT(key) DO UPDATE SET value = :value"
SQL_WORKER_UPSERT = """
INSERT OR REPLACE INTO workers (id, host, pid, pid_started, supervisor_pid, started_at, heartbeat_at, state, job_id, wake)
VALUES (:id, :host, :pid, :pid_started, :supervisor_pid, :now, :now, 'idle', NULL, :wake)
"""
SQL_WORKER_DELETE = "DELETE FROM workers WHERE id = :worker"
SQL_WORKERS = "SELECT * FROM workers ORDER BY started_at, id"
SQL_WORKER_HEARTBEAT = "UPDATE workers SET heartbeat_at = :now WHERE id = :worker"
SQL_WAKE = (
    "SELECT wake FROM workers WHERE host = :host AND (state = 'idle' OR NOT :idle) AND wake IS NOT NULL "
    "AND (:supervisor IS NULL OR supervisor_pid = :supervisor) LIMIT :n"
)
# Dashboard reads: keyset pages on the (updated_at, seq) indexes, id-prefix search on the id index.
SQL_PAGE_ALL = (
    "SELECT " + JOB_COLUMNS + " FROM jobs WHERE (updated_at, seq) < (:updated_at, :seq) "
    "ORDER BY updated_at DESC, seq DESC LIMIT :limit"
)
SQL_PAGE_STATE = (
    "SELECT " + JOB_COLUMNS + " FROM jobs WHERE state = :state AND (updated_at, seq) < (:updated_at, :seq) "
    "ORDER BY updated_at DESC, seq DESC LIMIT :limit"
)
SQL_PAGE_PREFIX = (
    "SELECT " + JOB_COLUMNS + " FROM jobs WHERE id >= :start AND id < :stop ORDER BY id LIMIT :limit"
)
SQL_PAGE_PREFIX_STATE = (  # +state: walk the id index, never the state index
    "SELECT " + JOB_COLUMNS + " FROM jobs WHERE id >= :start AND id < :stop AND +state = :state "
    "ORDER BY id LIMIT :limit"
)
SQL_OLDEST_DUE = """
SELECT run_at FROM jobs WHERE state IN ('pending', 'failed') AND priority = :priority AND run_at <= :now
ORDER BY run_at LIMIT 1
"""
SQL_SCHEDULED_PAGE = (  # one priority at a time: a range of the jobs_ready index
    "SELECT " + JOB_COLUMNS + " FROM jobs WHERE state IN ('pending', 'failed') AND priority = :priority "
    "AND (run_at, seq) > (:run_at, :seq) AND +state = 'pending' ORDER BY run_at, seq LIMIT :limit"
)
SQL_QUEUE_SETTINGS = "SELECT name, max_running, paused FROM queues ORDER BY name"
SQL_QUEUE_PAGE = (  # the newest :scan jobs (on the jobs_updated index), then those of the queue
    "SELECT * FROM (SELECT " + JOB_COLUMNS + " FROM jobs WHERE (updated_at, seq) < (:updated_at, :seq) "
    "ORDER BY updated_at DESC, seq DESC LIMIT :scan) WHERE queue = :queue LIMIT :limit"
)
SQL_QUEUE_PAGE_STATE = (
    "SELECT * FROM (SELECT " + JOB_COLUMNS + " FROM jobs WHERE state = :state AND (updated_at, seq) < "
    "(:updated_at, :seq) ORDER BY updated_at DESC, seq DESC LIMIT :scan) WHERE queue = :queue LIMIT :limit"
)
SQL_PAGE_NTH = (  # is there a job after the first :scan from the position on?  (index only)
    "SELECT seq FROM jobs WHERE (updated_at, seq) < (:updated_at, :seq) ORDER BY updated_at DESC, seq DESC "
    "LIMIT 1 OFFSET :scan"
)
SQL_PAGE_NTH_STATE = (
    "SELECT seq FROM jobs WHERE state = :state AND (updated_at, seq) < (:updated_at, :seq) "
    "ORDER BY updated_at DESC, seq DESC LIMIT 1 OFFSET :scan"
)
SQL_STATS_RANGE = """
SELECT minute, outcome, SUM(count) AS count, SUM(run_sum) AS run_sum, SUM(wait_sum) AS wait_sum
FROM stats WHERE minute BETWEEN :since AND :until GROUP BY minute, outcome ORDER BY minute, outcome
"""
SQL_ATTEMPT_TOTALS = "SELECT queue, outcome, count, duration_sum FROM attempt_totals ORDER BY queue, outcome"
SQL_ATTEMPT_DURATIONS = "SELECT queue, outcome, le, count FROM attempt_durations ORDER BY queue, outcome, le"
SQL_DEAD_IDS = "SELECT id FROM jobs WHERE state = 'dead' ORDER BY updated_at, seq"
SQL_DATA_VERSION = "PRAGMA data_version"  # changes when another connection commits
SQL_JOB_STATE = "SELECT state FROM jobs WHERE id = :id"
SQL_JOB_EXISTS = "SELECT 1 FROM jobs WHERE id = :id"
SQL_OWNED_RUN = """
SELECT queue, created_at, run_at, started_at FROM jobs
WHERE id = :id AND runs = :n AND worker_id = :worker AND state = 'processing'
"""
SQL_DROP_DONE_EDGES = """
DELETE FROM job_deps WHERE job_id = :id AND depends_on IN (SELECT id FROM jobs WHERE state = 'completed')
"""
SQL_WEBHOOK_URL = "SELECT value FROM config WHERE key = 'webhook-url'"
SQL_WEBHOOK_GIVE_UP = "UPDATE webhooks SET delivered_at = -1 WHERE id = :id"
SQL_QUEUES = "SELECT name, max_running, paused FROM queues ORDER BY name"
SQL_QUEUE_COUNTS = """
SELECT queue, state, count(*) AS n FROM jobs WHERE state IN ('pending', 'processing', 'failed', 'waiting')
GROUP BY queue, state
"""
SQL_SET_QUEUE_LIMIT = "UPDATE queues SET max_running = :m WHERE name = :queue"
SQL_SET_QUEUE_PAUSED = "UPDATE queues SET paused = :p WHERE name = :queue"
SQL_SCHEDULE_DELETE = "DELETE FROM schedules WHERE name = :name"
SQL_SCHEDULE_PAUSE = "UPDATE schedules SET paused = :p, next_run = COALESCE(:next_run, next_run) WHERE name = :name"
SQL_SCHEDULE_ANY_DUE = "SELECT 1 FROM schedules WHERE paused = 0 AND next_run <= :now LIMIT 1"
# Connections, transactions and migrations.
SQL_BEGIN = "BEGIN IMMEDIATE"  # takes the write lock at once: no deadlock on a lock upgrade
SQL_SAVEPOINT = "SAVEPOINT enqueue_plain"
SQL_ROLLBACK_TO_SAVEPOINT = "ROLLBACK TO enqueue_plain"
SQL_RELEASE_SAVEPOINT = "RELEASE enqueue_plain"
SQL_BUSY_TIMEOUT = "PRAGMA busy_timeout = %d"  # milliseconds
SQL_SYNC_NORMAL = "PRAGMA synchronous = NORMAL"
SQL_SYNC_FULL = "PRAGMA synchronous = FULL"
SQL_JOURNAL_WAL = "PRAGMA journal_mode = WAL"
SQL_USER_VERSION = "PRAGMA user_version"  # the schema version: how many SCHEMA scripts ran
SQL_SET_USER_VERSION = "PRAGMA user_version = %d"
SQL_COUNT_TABLES = "SELECT count(*) FROM sqlite_master"


###############################################################################
# Storage: SqliteStore, the files it trusts, and open_store
###############################################################################


def default_db_path():
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "queuectl", "queuectl.db")


# --- files other accounts must not read or plant (docs/security.md) ---------------------


def group_shared():
    """Does the owner share this queue's files with their group (QUEUECTL_SHARED=group)?"""
    value = os.environ.get(SHARED_ENV, "").strip().lower()
    if value in ("", "0", "no", "none", "private"):
        return False
    if value == "group":
        return True
    raise InvalidInput("%s must be 'group' (share the queue's files with your group) or empty, got %s"
                       % (SHARED_ENV, short_json(value)))


def private_mode(directory=False):
    """Mode of what queuectl creates: owner only, or owner and group with QUEUECTL_SHARED=group."""
    mode = 0o770 if group_shared() else 0o700
    return mode if directory else mode & 0o666


def make_private_dir(path):
    """Create directory ``path`` (and its parents) for queuectl's files: 0700 (0770 shared) whatever
    the umask.  A directory that exists already is left as it is (check_trusted judges it)."""
    if os.path.isdir(path):
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, private_mode(directory=True))
        os.chmod(path, private_mode(directory=True))  # (mkdir's mode passes through the umask)


def _trusted_dirs():
    return [d for d in os.environ.get(SAFE_DIRECTORY_ENV, "").split(":") if d]


def _is_trusted_dir(directory):
    trusted = _trusted_dirs()
    return "*" in trusted or any(os.path.realpath(d) == directory for d in trusted)


def _foreign(st):
    """Why a file with stat ``st`` cannot be trusted, or None: owned by another account (root and,
    with QUEUECTL_SHARED=group, a group of ours excepted), or writable by every account."""
    uid = os.geteuid()
    if st.st_uid not in (uid, 0) and not (group_shared() and st.st_gid in os.getgroups() + [os.getegid()]):
        return "is owned by another user (uid %d)" % st.st_uid
    if st.st_mode & 0o002:
        return "is writable by every user (mode %04o)" % stat.S_IMODE(st.st_mode)
    return None


def check_trusted(path):
    """Refuse (UntrustedFile, exit 74) a database that another account planted or can change: the
    file, its -wal/-shm or its directory owned by another user, or writable by everyone (git's
    safe.directory rule).  QUEUECTL_SAFE_DIRECTORY lists directories trusted anyway."""
    real = os.path.realpath(path)
    directory = os.path.dirname(real)
    if _is_trusted_dir(directory):
        return
    hint = ("keep the queue in a directory of your own (the default is %s), not a shared one such as /tmp; "
            "or, if you trust whoever can write there, allow it with %s=%s"
            % (os.path.dirname(default_db_path()), SAFE_DIRECTORY_ENV, directory))
    for name, what in ((directory, "directory"), (real, "file"), (real + "-wal", "file"), (real + "-shm", "file")):
        try:
            st = os.lstat(name)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise DatabaseError("cannot open database %s: %s: %s" % (path, name, e.strerror))
        if what == "file" and name != real and stat.S_ISLNK(st.st_mode):
            reason = "is a symbolic link"
        else:
            reason = _foreign(st)
        if reason:
            raise UntrustedFile("refusing database %s: %s %s %s; %s" % (path, what, name, reason, hint))


def tighten_private(path):
    """Take away what others may do with the database and its -wal/-shm if they are ours (files of an
    older queuectl were created under the umask, often world-readable).  Returns the old mode when
    it changed it, else None."""
    keep = private_mode()
    old = None
    for name in (path, path + "-wal", path + "-shm"):
        try:
            st = os.stat(name)
        except OSError:
            continue
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid == os.geteuid() and mode & ~keep & 0o077:
            with contextlib.suppress(OSError):
                os.chmod(name, mode & (keep | 0o700))
                old = mode if name == path else (old or mode)
    return old


def create_private_file(path):
    """Create an empty file at ``path`` with the private mode (not following a symlink), unless one exists.
    SQLite then opens it, and gives its -wal and -shm the same mode."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_CLOEXEC", 0), private_mode())
    except FileExistsError:
        return
    try:
        os.fchmod(fd, private_mode())  # (the umask may have taken the group's bits)
    finally:
        os.close(fd)


def read_token_file(path):
    """A secret kept in a file, as OpenSSH takes a key: a regular file of ours (or root's), not a
    symlink, that no one else may read or write."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise InvalidInput("cannot read token file %s: %s" % (path, "it is a symbolic link" if e.errno == errno.ELOOP
                                                               else e.strerror))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        reason = "is not a regular file" if not stat.S_ISREG(st.st_mode) else _foreign(st)
        if not reason and st.st_mode & 0o077:
            reason = "may be read by other users (mode %04o; chmod 600 it)" % stat.S_IMODE(st.st_mode)
        if reason:
            raise UntrustedFile("refusing token file %s: it %s" % (path, reason))
        text = f.read(4096).decode("utf-8", "replace").strip()
    if not text:
        raise InvalidInput("token file %s is empty" % path)
    return text


def open_private_log(path):
    """Open a log for appending, created private; refuse a symlink or a file another user owns or
    everyone may write (something planted to make us write into another file)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOCTTY | getattr(os, "O_NOFOLLOW", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, private_mode())
    except OSError as e:
        # (ELOOP; some kernels answer EACCES for a symlink in a sticky directory)
        if e.errno == errno.ELOOP or os.path.islink(path):
            raise UntrustedFile("refusing log %s: it is a symbolic link (another user may have planted it)" % path)
        raise QueuectlError("cannot open log %s: %s" % (path, e.strerror))
    try:
        st = os.fstat(fd)
        reason = "is not a regular file" if not stat.S_ISREG(st.st_mode) else _foreign(st)
        if reason:
            raise UntrustedFile("refusing log %s: it %s" % (path, reason))
        if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & ~private_mode():
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & private_mode())
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "ab")


def _write_failure_hint(path):
    """Why a write may have failed, as far as we can tell: a full disk, or a file size limit (ulimit -f)."""
    hints = []
    with contextlib.suppress(OSError, ValueError):
        st = os.statvfs(os.path.dirname(os.path.abspath(path)) or ".")
        free = st.f_bavail * st.f_frsize
        if free < 64 * 1048576:
            hints.append("the disk is full: %d bytes free" % free)
    with contextlib.suppress(ImportError, OSError, ValueError):
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if soft != resource.RLIM_INFINITY:
            hints.append("this process has a file size limit (ulimit -f) of %d bytes" % soft)
    return "; ".join(hints)


def _is_busy(exc):
    """Is this sqlite3 error "database is locked" (another connection holds the lock)?"""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF == sqlite3.SQLITE_BUSY
    return "locked" in str(exc)


def _db_error(exc, path):
    """Translate a sqlite3 exception into a QueuectlError with a clear message."""
    text = str(exc)
    low = text.lower()
    if "locked" in low or "busy" in low:
        return DatabaseBusy("database %s is locked by another process (busy for more than %gs); try again" % (path, BUSY_TIMEOUT))
    if "readonly" in low or "read-only" in low:
        return DatabaseError("database %s is read-only: %s" % (path, text))
    if "not a database" in low or "malformed" in low or "corrupt" in low:
        return DatabaseCorrupt("database %s is not a usable queuectl database (%s)" % (path, text))
    if "disk is full" in low or "disk i/o" in low or "full" in low:
        hint = _write_failure_hint(path)
        return DatabaseError("cannot write database %s: %s%s; nothing was written" % (path, text, hint and " (%s)" % hint))
    if "unable to open" in low:
        return DatabaseError("cannot open database %s (%s)" % (path, text))
    if "no such table" in low or "no such column" in low:
        return DatabaseError("database %s is not a queuectl database or was damaged (%s)" % (path, text))
    return DatabaseError("database %s: %s" % (path, text))


def send_wakeups(addresses):
    """Send a wake-up datagram to each of these worker addresses (``wake_address``), without
    waiting: one that is not there any more, or whose queue is full, is skipped."""
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


class SqliteStore(StoreRules):
    """The embedded store: one SQLite file in WAL mode.

    Each process opens its own connection.  Writes use ``BEGIN IMMEDIATE`` so
    they queue for the lock instead of failing on a lock upgrade (_begin);
    readers never block writers.  A returned enqueue is on disk
    (``synchronous=FULL``, see _tx).
    """

    _wal_fd = None
    _polling = False
    _wake_idle = 0  # idle workers to wake after this transaction commits (None: all of them)
    _wake_jobs = ()  # ... and the workers running these jobs

    def __init__(self, path, create=True):
        self.path = path
        if path != ":memory:":
            directory = os.path.dirname(os.path.abspath(path)) or "."
            if not os.path.isdir(directory):
                raise DatabaseError("cannot create database %s: directory %s does not exist" % (path, directory))
            check_trusted(path)
            if not os.path.exists(path):
                if not create:
                    raise DatabaseMissing("no database at %s: nothing was ever enqueued there (a typo in --db or "
                                          "QUEUECTL_DB?); `queuectl enqueue` creates it" % path)
                if not os.access(directory, os.W_OK):
                    raise DatabaseError("cannot create database %s: directory %s is not writable" % (path, directory))
                if _locked(path + "-shm", 128) and not os.path.exists(path):  # (exists: another process
                    # just created it, the file before its -shm)
                    # A new file here would share the old one's -wal/-shm with the processes still using it.
                    raise DatabaseGone("database %s was deleted while in use: processes still have the deleted file "
                                       "open (running workers notice within seconds and start on a new database); "
                                       "nothing was written, try again" % path)
                create_private_file(path)
            elif os.path.isdir(path):
                raise DatabaseError("cannot open database %s: it is a directory" % path)
            elif _wal_of_another_file(path):
                # Processes still use the -wal/-shm of a file that was renamed over: opening this one
                # would pair it with their write-ahead log (SQLite would apply it to this file).
                raise DatabaseGone("database %s was replaced by another file while in use: processes still use "
                                   "the write-ahead log of the file it replaced (running workers stop by "
                                   "themselves within seconds); nothing was done" % path)
        try:
            self.conn = self._connect()
            self._migrate()
        except sqlite3.Error as e:
            raise _db_error(e, path) from None
        if path != ":memory:" and not self.readonly:
            old_mode = tighten_private(path)  # a database of an older queuectl, created under the umask
            if old_mode is not None:
                log.warning("database %s was open to other users (mode %04o): made it private (%04o); "
                            "set %s=group to share it with your group", path, old_mode, private_mode(), SHARED_ENV)
        self._has_returning = sqlite3.sqlite_version_info >= (3, 35, 0)
        self._identity = None if path == ":memory:" else _file_identity(path)
        # SQLite names the WAL after the database's real path (it follows symlinks)
        self._wal_path = os.path.realpath(path) + "-wal"
        self._wal_fd = None

    def check(self):
        """Raise DatabaseGone when the file at ``path`` is not the database this store opened any
        more: deleted, or another file renamed over it.  Cheap (one stat): workers call it before
        every claim, so they never keep working on a file nobody else can see."""
        if self._identity is None:
            return
        now = _file_identity(self.path)
        if now is None:
            raise DatabaseGone("database %s was deleted while in use" % self.path)
        if now != self._identity:
            raise DatabaseGone("database %s was replaced by another file while in use" % self.path)

    def _connect(self):
        path = self.path
        if path != ":memory:" and os.path.exists(path) and not os.access(path, os.W_OK):
            self.readonly = True
            uri = "file:%s?mode=ro" % _uri_path(path)
            conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
        else:
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(SQL_BUSY_TIMEOUT % int(BUSY_TIMEOUT * 1000))
        if not self.readonly:  # FULL for each durable transaction (_tx)
            conn.execute(SQL_SYNC_NORMAL)
        return conn

    def _migrate(self):
        version = self.conn.execute(SQL_USER_VERSION).fetchone()[0]
        if version > len(SCHEMA):
            raise DatabaseError(
                "database %s has schema version %d, newer than this queuectl %s understands (%d)"
                % (self.path, version, __version__, len(SCHEMA))
            )
        if version == len(SCHEMA):
            return
        if self.readonly:
            raise DatabaseError("database %s is read-only and needs a schema upgrade" % self.path)
        if version == 0 and self.conn.execute(SQL_COUNT_TABLES).fetchone()[0] and \
                self.conn.execute(SQL_USER_VERSION).fetchone()[0] == 0:  # (not another process that
            # created it since the first look: its tables and version are committed together)
            raise DatabaseError("%s is an SQLite database but not a queuectl one; refusing to modify it" % self.path)
        if version == 0 and self.path != ":memory:":
            with contextlib.suppress(sqlite3.OperationalError):  # another process may be creating it
                self.conn.execute(SQL_JOURNAL_WAL)
        self.conn.execute(SQL_BEGIN)
        try:
            version = self.conn.execute(SQL_USER_VERSION).fetchone()[0]  # another process may have won
            if version == 0 and self.conn.execute(SQL_COUNT_TABLES).fetchone()[0]:
                # A file that has tables but no queuectl schema is not ours: refuse to touch it.
                raise DatabaseError("%s is an SQLite database but not a queuectl one; refusing to modify it" % self.path)
            for number in range(version, len(SCHEMA)):
                for statement in _split_sql(SCHEMA[number]):
                    self.conn.execute(statement)
                self.conn.execute(SQL_SET_USER_VERSION % (number + 1))
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    # --- transactions -----------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self, durable=True):
        """One write transaction (BEGIN IMMEDIATE ... COMMIT); errors are translated.

        ``durable`` (every user action) commits with ``synchronous=FULL``: it returns once
        the WAL is on disk, and a failed flush fails the transaction.  ``durable=False``
        commits with the connection's ``synchronous=NORMAL``, without waiting for the disk:
        for a worker's own bookkeeping.  Such a commit is visible to every process at once
        and survives a crash of any process; a power loss or kernel crash can undo it until
        the next flush of the WAL (the WAL is flushed in order, so any later durable commit
        or ``_sync`` makes it durable too).  The worker flushes its claims and results with
        ``_sync`` outside the write lock (finish_and_claim, started); lease renewals and
        idle marking are never flushed by themselves.

        After the commit, the workers the transaction asked for (``_wake``, ``_request_cancel``)
        are woken: what PostgreSQL's NOTIFY does at its commit."""
        if self.readonly:
            raise DatabaseError("database %s is read-only: this command needs to write" % self.path)
        if durable:
            self.conn.execute(SQL_SYNC_FULL)
        self._wake_idle, self._wake_jobs = 0, ()
        try:
            self._begin()
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except sqlite3.Error as e:
                self._rollback()
                raise _db_error(e, self.path) from None
            except BaseException:
                self._rollback()
                raise
        finally:
            if durable:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute(SQL_SYNC_NORMAL)
        if self._wake_idle != 0 or self._wake_jobs:
            self._send_wakeups()

    def poll_for_locks(self):
        """Wait for a lock by trying again every 0.05 ms, growing to 2 ms, instead of through
        SQLite's busy handler, which sleeps 1, 2, 5, 10 ms... between tries: two workers meet at
        the write lock many times a second with short jobs, and would lose milliseconds to a lock
        held for a tenth of one.  For workers; a command keeps the busy handler, which also waits
        out the moments when another process closes the database as its last user."""
        self.conn.execute(SQL_BUSY_TIMEOUT % 0)
        self._polling = True

    def _polled(self, statement, params=()):
        """conn.execute(statement, params), tried again while the database is locked, for up to
        BUSY_TIMEOUT (poll_for_locks)."""
        deadline = None
        delay = 0.00005
        while True:
            try:
                return self.conn.execute(statement, params)
            except sqlite3.OperationalError as e:
                if not _is_busy(e):
                    raise
                now = time.monotonic()
                deadline = deadline or now + BUSY_TIMEOUT
                if now >= deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 1.5, 0.002)

    def _begin(self):
        try:
            if self._polling:
                self._polled(SQL_BEGIN)
            else:
                self.conn.execute(SQL_BEGIN)
        except sqlite3.Error as e:
            raise _db_error(e, self.path) from None

    def _rollback(self):
        try:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def _read(self, sql, params=(), one=False):
        try:
            cur = self._polled(sql, params) if self._polling else self.conn.execute(sql, params)
            return cur.fetchone() if one else cur.fetchall()
        except sqlite3.Error as e:
            raise _db_error(e, self.path) from None

    # --- jobs ---------------------------------------------------------------------

    def enqueue(self, jobs, now, existing=None):
        with self._tx():
            ids = self._insert_plain(jobs, now)
            if ids is None:
                ids = self._enqueue_each(jobs, now, existing)
            due = sum(1 for job in jobs if job["run_at"] <= now)
            if due:
                self._wake(due)
        return ids

    @staticmethod
    def _job_row(job, now, state):
        """The SQL_INSERT_JOB parameters of a validated job (but its id)."""
        return dict(job_record(job), now=now, state=state)

    def _insert_plain(self, jobs, now):
        """Bulk path of enqueue: a batch without unique keys or dependencies goes in with
        one executemany, twice the rate of a statement per job (bench/).  Returns the ids, or
        None, having written nothing, when the batch needs the job-by-job path (which also
        reports a duplicate id and draws a new id after a collision)."""
        if len(jobs) < 2 or any(j.get("unique_key") is not None or j.get("after") for j in jobs):
            return None
        rows = [dict(self._job_row(job, now, "pending"), id=job.get("id") or new_job_id()) for job in jobs]
        conn = self.conn
        conn.execute(SQL_SAVEPOINT)
        try:
            conn.executemany(SQL_INSERT_JOB, rows)
            for name in {row["queue"] for row in rows}:
                conn.execute(SQL_ADD_QUEUE, {"queue": name})
        except sqlite3.IntegrityError:  # a duplicate id: the job-by-job path names it
            # (any other error - disk full, I/O - may have rolled the whole transaction back
            # already, savepoint included: it goes up to _tx, which reports it as it is)
            conn.execute(SQL_ROLLBACK_TO_SAVEPOINT)
            conn.execute(SQL_RELEASE_SAVEPOINT)
            return None
        conn.execute(SQL_RELEASE_SAVEPOINT)
        return [row["id"] for row in rows]

    def claim(self, worker_id, host, now, lease, queues=None):
        with self._tx(durable=False) as conn:  # durable with the run's pid (started)
            return self._claim_in(conn, worker_id, host, now, lease, queues)

    def _claim_in(self, conn, worker_id, host, now, lease, queues=None):
        params = {"worker": worker_id, "now": now, "lease_until": now + lease, "host": host}
        limited = conn.execute(SQL_LIMITED_QUEUES).fetchall()
        if not limited and not queues and self._has_returning:
            rows = conn.execute(SQL_CLAIM, params).fetchall()  # the common case: one statement
            row = rows[0] if rows else None
        else:
            seq = self._pick(conn, params, limited, queues)
            row = None
            if seq is not None:
                conn.execute(SQL_CLAIM_UPDATE, dict(params, seq=seq))
                row = conn.execute(SQL_JOB_BY_SEQ, {"seq": seq}).fetchone()
        if row is None:
            conn.execute(SQL_WORKER_STATE, {"state": "idle", "job": None, "now": now, "worker": worker_id})
            return None
        job = Job.from_row(row)
        conn.execute(SQL_INSERT_ATTEMPT, {"id": job.id, "n": job.runs, "worker": worker_id, "host": host, "now": now})
        conn.execute(SQL_WORKER_STATE, {"state": "busy", "job": job.id, "now": now, "worker": worker_id})
        return job

    @staticmethod
    def _pick(conn, params, limited, queues):
        """The next due job's seq among the queues this worker may take from now (paused and
        full queues left out), using the per-queue index: one lookup per queue."""
        running = dict(conn.execute(SQL_RUNNING_BY_QUEUE).fetchall()) if limited else {}
        blocked = {name for name, cap, paused in limited if paused or (cap is not None and running.get(name, 0) >= cap)}
        if not blocked and not queues:
            hit = conn.execute(SQL_CLAIM_SELECT, params).fetchone()
            return hit[0] if hit else None
        names = queues or [r[0] for r in conn.execute(SQL_QUEUE_NAMES)]
        best = None
        for name in names:
            if name in blocked:
                continue
            hit = conn.execute(SQL_CLAIM_SELECT_QUEUE, dict(params, queue=name)).fetchone()
            if hit and (best is None or (hit[1], hit[2], hit[0]) < (best[1], best[2], best[0])):
                best = hit
        return best[0] if best else None

    def started(self, job_id, run, pid):
        with self._tx(durable=False) as conn:
            conn.execute(SQL_SET_PID, {"pid": pid, "id": job_id, "n": run})
        self._sync()  # durable: the claim, and the result committed with it (finish_and_claim)

    def finish_and_claim(self, finished, claim):
        """One transaction: the pages both write are written to the WAL once (18 pages a job,
        the pid's commit included, instead of 25; bench/).  It commits without waiting for the disk: the worker's
        ``started`` right after the spawn makes it durable, with an fsync that overlaps the
        process start.  With nothing claimed there is no such call to come: it syncs now."""
        with self._tx(durable=False) as conn:
            ok = self._finish_in(conn, **finished)
            job = self._claim_in(conn, **claim)
        if job is None:
            self._sync()
        return ok, job

    def _sync(self):
        """Make every commit so far durable, the way ``synchronous=FULL`` does at a commit: one
        fdatasync of the WAL file, but after the write lock is released, so that the other
        processes' transactions go on meanwhile and one flush often covers theirs as well (a
        group commit).  A commit in the WAL is durable once its frames are on disk; if a
        checkpoint restarted the WAL since, it had copied them into the database and synced it
        first.  Without a WAL file of its own to sync (an in-memory database, or the file
        changed under it), a durable empty-ish commit does the same under the lock."""
        fd = self._wal_handle()
        if fd is None:
            if self.path != ":memory:":
                with self._tx() as conn:
                    conn.execute(SQL_SET_USER_VERSION % len(SCHEMA))  # a write that changes nothing
            return
        try:
            (os.fdatasync if hasattr(os, "fdatasync") else os.fsync)(fd)
        except OSError as e:
            raise DatabaseError("cannot sync %s-wal: %s" % (self.path, e.strerror or e)) from None

    def _wal_handle(self):
        """A read-only descriptor of this database's WAL file (kept open: closing a descriptor of
        a file drops the process's POSIX locks on it, and SQLite locks the database and -shm
        files, never the WAL), checked to be the file at that path now; None when there is none."""
        if self.path == ":memory:" or self.readonly:
            return None
        path = self._wal_path
        fd = self._wal_fd
        now = _file_identity(path)
        if fd is not None and now is not None and _file_identity(fd) == now:
            return fd
        if fd is not None:
            os.close(fd)
            self._wal_fd = None
        if now is None:
            return None
        try:
            self._wal_fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return None
        return self._wal_fd if _file_identity(self._wal_fd) == now else None

    def heartbeat(self, worker_id, job_id=None, run=None, now=None, lease=None, output=None):
        now = time.time() if now is None else now
        with self._tx(durable=False) as conn:  # leases and partial output only matter while the machine is up
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
               output="", output_bytes=0, retry_at=None, pid=None):
        with self._tx() as conn:
            return self._finish_in(conn, job_id, run, worker_id, state, now, outcome, exit_code, error,
                                   output, output_bytes, retry_at, pid)

    def _finish_in(self, conn, job_id, run, worker_id, state, now, outcome, exit_code=None, error=None,
                   output="", output_bytes=0, retry_at=None, pid=None):
        state = finish_state(state)
        p = {"id": job_id, "n": run, "worker": worker_id, "state": state.value, "now": now, "exit_code": exit_code,
             "error": error, "retry_at": retry_at, "outcome": outcome, "output": output or "", "output_bytes": output_bytes,
             "pid": pid}
        row = conn.execute(SQL_OWNED_RUN, p).fetchone()
        if row is None:
            return False
        conn.execute(SQL_FINISH_JOB, p)
        conn.execute(SQL_FINISH_ATTEMPT, p)
        conn.execute(SQL_WORKER_RUN_DONE, p)
        started = row["started_at"] or now
        conn.execute(SQL_STATS, {"minute": int(now // 60), "queue": row["queue"], "outcome": outcome,
                                 "run": now - started, "wait": max(0.0, started - row["run_at"])})
        conn.execute(SQL_STATS_HIST, {"minute": int(now // 60), "queue": row["queue"],
                                      "bucket": run_time_bucket(now - started)})
        if state.value in FINAL_STATES:
            self._job_ended(job_id, state.value, now)
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
            self._wake(1)
        return True

    # --- reading ---------------------------------------------------------------------

    def get(self, job_id):
        row = self._read(SQL_GET_JOB, {"id": job_id}, one=True)
        return Job.from_row(row) if row else None

    def states_of(self, job_ids):
        return {r[0]: (r[1], r[2]) for r in self._read(SQL_STATES_OF, {"ids": json.dumps(list(job_ids))})}

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
        return counts_from_rows(self._read(SQL_COUNTS))

    def cancel_requested(self, job_id, run):
        row = self._read(SQL_CANCEL_REQUESTED, {"id": job_id, "n": run}, one=True)
        return bool(row and row[0])

    def queues(self):
        return queue_list(self._read(SQL_QUEUES), self._read(SQL_QUEUE_COUNTS))

    def schedules(self):
        return [schedule_from_row(r) for r in self._read(SQL_SCHEDULES)]

    # --- webhooks --------------------------------------------------------------------

    def webhooks_due(self, now):
        return self._read(SQL_WEBHOOK_ANY_DUE, {"now": now}, one=True) is not None

    def claim_webhooks(self, now, limit, lease):
        if not self.webhooks_due(now):
            return []
        with self._tx() as conn:
            rows = [dict(r) for r in conn.execute(SQL_WEBHOOKS_DUE, {"now": now, "limit": limit})]
            for r in rows:
                conn.execute(SQL_WEBHOOK_LEASE, {"id": r["id"], "lease_until": now + lease})
        return rows

    def webhook_result(self, delivery_id, now, error=None, next_at=None):
        with self._tx() as conn:
            conn.execute(SQL_WEBHOOK_DONE, {"id": delivery_id, "error": error, "next_at": next_at,
                                            "delivered": now if error is None else None})
            if error is not None and next_at is None:  # given up: keep the row, stop retrying
                conn.execute(SQL_WEBHOOK_GIVE_UP, {"id": delivery_id})

    # --- configuration ---------------------------------------------------------------

    def config(self):
        return config_from_rows(self._read(SQL_CONFIG_ALL))

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

    def wake_addresses(self, host, n, supervisor_pid=None, idle=True):
        p = {"host": host, "n": -1 if n is None else n, "supervisor": supervisor_pid, "idle": bool(idle)}
        return [r[0] for r in self._read(SQL_WAKE, p)]

    # --- dashboard and monitoring reads ---------------------------------------------

    def jobs_page(self, state=None, id_prefix=None, limit=50, after=None):
        p = {"limit": int(limit) + 1, "state": str(state) if state else None}
        if id_prefix:
            bounds = id_prefix_range(id_prefix, after)
            if bounds is None:
                return [], False
            p["start"], p["stop"] = bounds
            rows = self._read(SQL_PAGE_PREFIX_STATE if state else SQL_PAGE_PREFIX, p)
        else:
            p["updated_at"], p["seq"] = after or FIRST_PAGE
            rows = self._read(SQL_PAGE_STATE if state else SQL_PAGE_ALL, p)
        return page_of(rows, limit)

    def oldest_due(self, now):
        found = [r[0] for r in (self._read(SQL_OLDEST_DUE, {"priority": prio, "now": now}, one=True)
                                for prio in sorted(set(PRIORITIES.values()))) if r]
        return min(found) if found else None

    def scheduled_page(self, now, limit=50, after=None):
        start = max(tuple(after), (now, 2 ** 63 - 1)) if after else (now, 2 ** 63 - 1)
        p = {"run_at": start[0], "seq": start[1], "limit": int(limit) + 1}
        rows = [r for prio in sorted(set(PRIORITIES.values()))
                for r in self._read(SQL_SCHEDULED_PAGE, dict(p, priority=prio))]
        rows.sort(key=lambda r: (r["run_at"], r["seq"]))
        return [Job.from_row(r) for r in rows[:limit]], len(rows) > limit

    def queue_page(self, queue, state=None, limit=50, after=None, scan=2000):
        p = {"queue": queue, "state": str(state) if state else None, "limit": int(limit) + 1, "scan": int(scan)}
        p["updated_at"], p["seq"] = after if after else (float("inf"), 2 ** 63 - 1)
        rows = sorted(self._read(SQL_QUEUE_PAGE_STATE if state else SQL_QUEUE_PAGE, p),
                      key=lambda r: (r["updated_at"], r["seq"]), reverse=True)
        if len(rows) > limit:
            return [Job.from_row(r) for r in rows[:limit]], True, False
        cut = self._read(SQL_PAGE_NTH_STATE if state else SQL_PAGE_NTH, p, one=True) is not None
        return [Job.from_row(r) for r in rows], cut, cut

    def queue_settings(self):
        return {r["name"]: {"max_running": r["max_running"], "paused": bool(r["paused"])}
                for r in self._read(SQL_QUEUE_SETTINGS)}

    def stats_minutes(self, since, until):
        return [dict(r) for r in self._read(SQL_STATS_RANGE, {"since": int(since), "until": int(until)})]

    def stats_by_queue(self, since, until):
        p = {"since": int(since), "until": int(until)}
        return queue_stats(self._read(SQL_STATS_BY_QUEUE, p), self._read(SQL_STATS_HIST_BY_QUEUE, p))

    def attempt_totals(self):
        return totals_with_buckets(self._read(SQL_ATTEMPT_TOTALS), self._read(SQL_ATTEMPT_DURATIONS))

    def data_version(self):
        return self._read(SQL_DATA_VERSION, one=True)[0]

    def close(self):
        with contextlib.suppress(Exception):
            self.conn.close()
        if self._wal_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._wal_fd)
            self._wal_fd = None

    # --- the queries of StoreRules (run inside _transaction: the connection's transaction) ---

    def _transaction(self):
        return self._tx()

    def _time(self, now):
        return time.time() if now is None else now

    def _wake(self, n):
        self._wake_idle = None if n is None or self._wake_idle is None else self._wake_idle + n

    def _send_wakeups(self):
        """Wake the workers of this host the transaction that just committed asked for: up to
        ``_wake_idle`` idle ones, and those running ``_wake_jobs``.  Never raises: a worker that
        misses its datagram looks at its next poll."""
        idle, jobs = self._wake_idle, self._wake_jobs
        self._wake_idle, self._wake_jobs = 0, ()
        addresses = []
        with contextlib.suppress(QueuectlError):
            if idle != 0:
                addresses += self.wake_addresses(HOST, -1 if idle is None else idle)  # (LIMIT -1: no limit)
            if jobs:
                addresses += [w["wake"] for w in self.workers()
                              if w["job_id"] in jobs and w["host"] == HOST and w["wake"]]
        send_wakeups(addresses)

    def _fetch_job(self, job_id):
        return self.conn.execute(SQL_GET_JOB, {"id": job_id}).fetchone()

    def _state(self, job_id):
        row = self.conn.execute(SQL_JOB_STATE, {"id": job_id}).fetchone()
        return row[0] if row else None

    def _id_taken(self, job_id):
        return self.conn.execute(SQL_JOB_EXISTS, {"id": job_id}).fetchone() is not None

    def _holder_of(self, key):
        row = self.conn.execute(SQL_BY_UNIQUE_KEY, {"key": key}).fetchone()
        return row[0] if row else None

    def _dependency_states(self, job_ids):
        return {r[0]: r[1] for r in self.conn.execute(SQL_STATES_OF, {"ids": json.dumps(list(job_ids))})}

    def _insert_job(self, job, job_id, state, now):
        row = dict(self._job_row(job, now, state), id=job_id)
        try:
            self.conn.execute(SQL_INSERT_JOB, row)
        except sqlite3.IntegrityError as e:
            raise (KeyHeld if "unique_key" in str(e) else IdTaken)() from None
        self.conn.execute(SQL_ADD_QUEUE, row)

    def _wait_for(self, job_id, deps):
        for dep in deps:
            self.conn.execute(SQL_INSERT_DEP, {"id": job_id, "dep": dep})
        self.conn.execute(SQL_DROP_DONE_EDGES, {"id": job_id})

    def _stored_webhook_url(self, row):
        found = self.conn.execute(SQL_WEBHOOK_URL).fetchone()
        return found[0] if found else None

    def _insert_webhook(self, job_id, url, payload, at):
        self.conn.execute(SQL_WEBHOOK_INSERT, {"job_id": job_id, "url": url, "payload": payload, "now": at})

    def job_webhooks(self, job_id):
        return [webhook_status(r) for r in self._read(SQL_JOB_WEBHOOKS, {"id": job_id})]

    def _take_dependents(self, job_id):
        dependents = [r[0] for r in self.conn.execute(SQL_DEPENDENTS_WAITING, {"id": job_id})]
        self.conn.execute(SQL_DROP_EDGES_TO, {"id": job_id})
        return dependents

    def _release_if_ready(self, job_id, at):
        return self.conn.execute(SQL_RELEASE_IF_READY, {"id": job_id, "now": at}).rowcount == 1

    def _cancel_unstarted(self, job_id, at, error):
        if not self.conn.execute(SQL_CANCEL_JOB, {"id": job_id, "now": at, "error": error}).rowcount:
            return False
        self.conn.execute(SQL_DROP_EDGES_FROM, {"id": job_id})
        return True

    def _request_cancel(self, job_id):
        if self.conn.execute(SQL_REQUEST_CANCEL, {"id": job_id}).rowcount != 1:
            return False
        self._wake_jobs += (job_id,)  # its worker looks at once (JobMonitor.tick)
        return True

    def _any_expired(self, at):
        return self._read(SQL_ANY_EXPIRED, {"now": at}, one=True) is not None

    def _lost_runs(self, at, dead_workers):
        rows = self.conn.execute(SQL_LOST_JOBS, {"now": at}).fetchall()
        for worker_id in dead_workers:
            rows += self.conn.execute(SQL_JOBS_OF_WORKER, {"worker": worker_id}).fetchall()
        seen = set()
        return [r for r in rows if not (r["id"] in seen or seen.add(r["id"]))]

    def _lose_run(self, row, at, state, why):
        p = {"id": row["id"], "n": row["runs"], "now": at, "state": state, "lost": 1, "error": why, "outcome": "lost"}
        self.conn.execute(SQL_LOSE_JOB, p)
        self.conn.execute(SQL_LOSE_ATTEMPT, p)
        self.conn.execute(SQL_STATS, {"minute": int(at // 60), "queue": row["queue"], "outcome": "lost",
                                      "run": 0.0, "wait": 0.0})
        return True

    def _delete_worker(self, worker_id):
        self.conn.execute(SQL_WORKER_DELETE, {"worker": worker_id})

    def _retry(self, job_id, at, reset_attempts, states=("dead",)):
        try:
            return self.conn.execute(SQL_RETRY_DEAD, {"id": job_id, "now": at, "reset": bool(reset_attempts),
                                                      "states": json.dumps(list(states))}).rowcount == 1
        except sqlite3.IntegrityError:  # its unique key is held by an active job
            raise KeyHeld() from None

    def _dead_ids(self):
        return [r[0] for r in self.conn.execute(SQL_DEAD_IDS)]

    def _delete_jobs(self, states):
        p = {"states": json.dumps(states)}
        waiting = [r[0] for r in self.conn.execute(SQL_WAITING_ON_STATES, p)]
        self.conn.execute(SQL_DELETE_ATTEMPTS_STATES, p)
        deleted = self.conn.execute(SQL_DELETE_JOBS_STATES, p).rowcount
        self.conn.execute(SQL_DROP_EDGES_OF_DELETED)
        return deleted, waiting

    def _missing_dependency(self, job_id):
        row = self.conn.execute(SQL_MISSING_DEP, {"id": job_id}).fetchone()
        return row[0] if row else None

    def _purge_batch(self, state, before, limit):
        ids = [r[0] for r in self.conn.execute(SQL_PURGE_IDS, {"state": state, "before": before, "limit": limit})]
        if ids:
            doc = json.dumps(ids)
            self.conn.execute(SQL_DELETE_ATTEMPTS_OF, {"ids": doc})
            self.conn.execute(SQL_DELETE_JOBS_OF, {"ids": doc})
        return len(ids)

    def _add_queue(self, name):
        self.conn.execute(SQL_ADD_QUEUE, {"queue": name})

    def _set_queue_limit(self, name, max_running):
        self.conn.execute(SQL_SET_QUEUE_LIMIT, {"m": max_running, "queue": name})

    def _set_queue_paused(self, name, paused):
        self.conn.execute(SQL_SET_QUEUE_PAUSED, {"p": int(paused), "queue": name})

    def _insert_schedule(self, row, now):
        with self._tx() as conn:
            try:
                conn.execute(SQL_SCHEDULE_INSERT, dict(row, now=now))
            except sqlite3.IntegrityError:
                return False
        return True

    def _delete_schedule(self, name):
        with self._tx() as conn:
            return conn.execute(SQL_SCHEDULE_DELETE, {"name": name}).rowcount == 1

    def _pause_schedule(self, name, paused, next_run):
        with self._tx() as conn:
            p = {"p": int(paused), "name": name, "next_run": next_run}
            return conn.execute(SQL_SCHEDULE_PAUSE, p).rowcount == 1

    def _schedules_due(self, at):
        return self._read(SQL_SCHEDULE_ANY_DUE, {"now": at}, one=True) is not None

    def _due_schedules(self, at):
        return self.conn.execute(SQL_SCHEDULES_DUE, {"now": at}).fetchall()

    def _advance_schedule(self, name, next_run, last_run, job_id):
        self.conn.execute(SQL_SCHEDULE_ADVANCE, {"name": name, "next_run": next_run, "last_run": last_run,
                                                 "job": job_id})


def _file_identity(path_or_fd):
    """(device, inode) of a file, or None when it does not exist."""
    try:
        st = os.fstat(path_or_fd) if isinstance(path_or_fd, int) else os.stat(path_or_fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _lock_table():
    """The lines of /proc/locks ([] where there is none)."""
    try:
        with open("/proc/locks") as f:
            return f.read().splitlines()
    except OSError:
        return []


def _wal_of_another_file(path):
    """Do processes hold the -shm of ``path`` but none the file itself, as when another file was
    renamed over the one they use?  Judged from ONE reading of /proc/locks: SQLite locks the
    database file before its -shm and unlocks it after, so a process that opens or closes the
    database meanwhile never looks like this, but two readings can catch it in between (and
    refuse a perfectly good database to concurrent commands)."""
    if not os.path.exists(path + "-shm"):
        return False  # (the usual case for a command run while no worker is: no reading of /proc/locks)
    table = _lock_table()
    return _locked(path + "-shm", 128, table) and not _locked(path, table=table)


def _locked(path, byte=None, table=None):
    """Does any process hold a POSIX lock on file ``path`` (on ``byte`` if given)?  Read from
    /proc/locks (Linux; False elsewhere), or from ``table``, lines of it read before, so no
    descriptor of the file is opened: closing one would drop this process's own SQLite locks
    on it.  Every open SQLite connection in WAL mode holds a read lock on the database file
    and on byte 128 of its ``-shm`` file."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    lines = _lock_table() if table is None else table
    ident = "%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in lines:
        fields = line.replace(" -> ", " ").split()  # "1: POSIX ADVISORY READ 4242 fe:00:1234 128 128"
        if len(fields) < 8 or fields[5] != ident:
            continue
        if byte is None:
            return True
        with contextlib.suppress(ValueError):
            if int(fields[6]) <= byte and (fields[7] == "EOF" or byte <= int(fields[7])):
                return True
    return False


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


def is_db_url(db):
    """Is ``db`` a PostgreSQL URL (postgresql://... or postgres://...) rather than an SQLite file?"""
    return bool(re.match(r"^postgres(ql)?://", str(db or "")))


def db_location(db):
    """A database as processes pass it on: a file's absolute path, or the URL unchanged."""
    return str(db) if is_db_url(db) else os.path.abspath(db)


def db_label(db):
    """A database as it is shown: a file's absolute path, or the URL without its password."""
    return redact_url(db) if is_db_url(db) else os.path.abspath(db)


def redact_url(url):
    """``url`` without the password of its user part or of a ``password=`` parameter."""
    url = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@?#]*):[^@/?#]*@", r"\1:***@", str(url))
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", url)


def split_userinfo(url):
    """``http://user:pw@host/p`` -> (``http://host/p``, ``"user:pw"``); (url, None) without a user part."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=hostport)), "%s:%s" % (unquote(user), unquote(password))


def open_store(db, create=True):
    """Open the store named by a path (SQLite) or a postgresql:// URL (queuectl_pg, imported only then)."""
    if is_db_url(db):
        if __name__ != "queuectl":  # run as a script: let queuectl_pg's `import queuectl` find this module
            sys.modules.setdefault("queuectl", sys.modules[__name__])
        try:
            import queuectl_pg
        except ImportError as e:
            if getattr(e, "name", None) == "queuectl_pg":
                raise QueuectlError("this queuectl has no PostgreSQL support (queuectl_pg.py is missing)") from None
            raise QueuectlError("PostgreSQL needs the psycopg driver (%s): pip install 'queuectl[postgres]', "
                                "or build the .pyz with ./build.sh --with-postgres" % e) from None
        return queuectl_pg.PostgresStore(db, create=create)
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


def run_processes(job_id, run, worker_id):
    """Pids of the live processes of one run, found by the variables every job process
    inherits (QUEUECTL_JOB_ID, QUEUECTL_ATTEMPT, QUEUECTL_WORKER_ID) in /proc; [] elsewhere."""
    want = {("QUEUECTL_JOB_ID=%s" % job_id).encode(), ("QUEUECTL_ATTEMPT=%d" % run).encode(),
            ("QUEUECTL_WORKER_ID=%s" % worker_id).encode()}
    found = []
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open("/proc/%s/environ" % name, "rb") as f:
                    if want <= set(f.read().split(b"\0")):
                        found.append(int(name))
            except OSError:
                continue
    return found


LOST_RUN_SWEEP = 30.0  # seconds to keep looking for the processes of a lost run without a pid
_LOST_RUNS = {}  # (job id, attempt, worker id) -> monotonic time until which to look again


def _kill_run(run):
    for member in run_processes(*run):
        with contextlib.suppress(OSError):
            kill_group(os.getpgid(member), signal.SIGKILL)
            os.kill(member, signal.SIGKILL)


def sweep_lost_runs():
    """Kill processes of recently lost runs that had no pid on record (see kill_lost_group);
    called at each housekeeping and when a worker or supervisor exits.  Nothing to do, and no
    /proc scan, in the usual case."""
    now = time.monotonic()
    for run, until in list(_LOST_RUNS.items()):
        if until < now:
            del _LOST_RUNS[run]
        else:
            _kill_run(run)


def kill_lost_group(pid, started_at, run=None):
    """Kill the process group of a lost run, unless its leader pid now belongs to someone else.

    A run whose pid was never recorded (its worker died between starting the command and
    recording the pid) is found by ``run`` = (job id, attempt, worker id) instead, now and
    again at each housekeeping for a while (``sweep_lost_runs``): a child still between fork
    and exec when its worker died carries the run's variables only once it has started.
    """
    if not pid:
        if run and run[2]:
            _LOST_RUNS[tuple(run)] = time.monotonic() + LOST_RUN_SWEEP
            _kill_run(run)
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
            text = TRUNCATED % (self.total - len(data)) + text
        return text.replace("\x00", "\ufffd")


TRUNCATED = "[... %d earlier bytes not kept ...]\n"  # heads an attempt's stored output when its start was dropped
_TRUNCATED_RE = re.compile(r"^\[\.\.\. (\d+) earlier bytes not kept \.\.\.\]\n")


def split_truncation(text, total_bytes):
    """(the note that output was cut, or None; the job's own output): the note belongs on stderr."""
    m = _TRUNCATED_RE.match(text or "")
    if m and total_bytes > len(text[m.end():].encode("utf-8", "replace")):
        return m.group(0).rstrip("\n"), text[m.end():]
    return None, text or ""


@_record
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
    ``on_start(pid)``, ``tick(now, output_buffer) -> None | 'stopped' | 'lost' | 'cancelled'``
    (called on wake-ups and at least every ``events.interval`` seconds).  A
    timeout, a stop or a lost lease kills the whole group: SIGTERM, then
    SIGKILL after ``kill_grace`` seconds.
    """
    marks = {"QUEUECTL_JOB_ID": job.id, "QUEUECTL_ATTEMPT": str(job.runs)}
    if getattr(events, "worker_id", None):  # with the two above, marks the run's processes (run_processes)
        marks["QUEUECTL_WORKER_ID"] = events.worker_id
    buf = OutputBuffer(output_limit)
    try:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", job.command], cwd=job.cwd or None, env=_job_environment(job.env, marks),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            close_fds=True,
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
            if verdict in VERDICTS:
                _terminate(proc, kill_grace)
                result = RunResult(verdict, proc.returncode, VERDICTS[verdict])
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


_TOKEN_ENV_BYTES = TOKEN_ENV.encode()


def _job_environment(extra, marks):
    """The ``env`` for Popen: the worker's environment, the job's own variables, the run's marks.

    As bytes (``os.environb``): Popen encodes a str environment variable by variable in Python,
    which cost a third of a worker's CPU per `true` job (bench/); bytes it passes through.
    (Setting the marks in the worker's own environment with putenv and passing none would be
    cheaper still, but glibc never frees a value set that way: a new job id per job leaks.)"""
    env = dict(os.environb)
    env.pop(_TOKEN_ENV_BYTES, None)  # a secret given to queuectl, not to its jobs
    fsencode = os.fsencode
    for key, value in (extra or {}).items():
        env[fsencode(key)] = fsencode(value)
    for key, value in marks.items():
        env[fsencode(key)] = fsencode(value)
    return env


#: What a monitor may ask of a running job -> the error recorded for it.
VERDICTS = {
    "stopped": "stopped by a forced worker stop",
    "lost": "lease lost",
    "cancelled": "cancelled by a user; process group killed",
}


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

def wake_address(db_path, worker_id):
    """Abstract-namespace unix socket name of a worker (Linux); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import hashlib

    digest = hashlib.sha1(os.path.realpath(db_path).encode()).hexdigest()[:12]
    return "queuectl/%s/%s" % (digest, worker_id)


def drain_fd(fd):
    """Read a non-blocking wake-up pipe or socket empty; True if it held anything."""
    woken = False
    with contextlib.suppress(OSError):
        while os.read(fd, 4096):
            woken = True
    return woken


def wait_on_pipe(fd, timeout):
    """Sleep until a signal handler writes to ``fd`` (set_wakeup_fd) or ``timeout`` passes."""
    with contextlib.suppress(InterruptedError):
        select.select([fd], [], [], timeout)
    drain_fd(fd)


@_record
class PendingResult:
    """The result of a worker's last run, waiting to be recorded with its next claim (Worker.execute)."""

    job: Job
    state: JobState  # what the run leads to (after_failure)
    result: RunResult
    finish: dict  # the arguments of Store.finish


class Worker:
    """One worker process: claims jobs one at a time and runs them.

    Signals only set flags: the first SIGTERM/SIGINT asks for a graceful stop
    (finish the current job, claim nothing new), a second one or SIGQUIT asks
    for a cold stop (kill the job's process group, give the job back).
    """

    def __init__(self, db_path, store=None, supervisor_pid=None, poll_interval=None, burst=False, queues=None):
        self.db_path = db_path
        self.burst = burst
        self.queues = queues or None  # serve only these queues (None = all)
        self.store = store or open_store(db_path)
        self.store.poll_for_locks()
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
        # Whether this worker waits on the store's notifications itself (PostgreSQL: its own LISTEN
        # connection).  Under a supervisor it does not: the supervisor listens for its machine and
        # wakes its workers by datagram (Supervisor._wait); see register().
        self._listens = supervisor_pid is None
        self.jobs_done = 0
        self._unrecorded = None  # the last run's result, recorded with the next run's pid (execute)

    def _on_signal(self, signum, frame):
        self.stop_level = 2 if signum == signal.SIGQUIT else self.stop_level + 1

    def _install_signals(self):
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        # A stop sent while the supervisor forked us was held until now (Supervisor._spawn): take it.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def wake_fds(self):
        return self._local_wake_fds() + (self.store.wait_fds() if self._listens else [])

    def _local_wake_fds(self):
        return [self._wake_r] + ([self._sock.fileno()] if self._sock else [])

    def drain_wakeups(self):
        """Empty the wake-up pipe and socket, and the store's notifications; True if anything woke us."""
        woken = False
        for fd in self._local_wake_fds():
            woken = drain_fd(fd) or woken
        return (self._listens and self.store.consume_notifications()) or woken

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
        # Under a supervisor, a worker is woken by datagram: by the store that committed (SQLite) or
        # by the supervisor, which listens to the store's notifications for all its workers
        # (PostgreSQL: one LISTEN connection per machine, not one per worker).  A worker on its own,
        # or one that cannot bind its socket, waits on the store's notifications itself: a store
        # with its own (LISTEN/NOTIFY) starts listening here, before the first claim.
        if self.supervisor_pid is None and self.store.wait_fds():
            wake = None
        else:
            wake = self._open_wake_socket()
            self._listens = self._listens or wake is None
        self.store.register_worker({
            "id": self.id, "host": HOST, "pid": self.pid, "pid_started": process_started_at(self.pid),
            "supervisor_pid": self.supervisor_pid, "now": time.time(), "wake": wake,
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
            try:
                self.record_result()
            except QueuectlError as e:  # the run stays processing until a rescue runs it again
                log.warning("worker %s: could not record the last result: %s", self.id, e)
            with contextlib.suppress(QueuectlError):
                self.store.unregister_worker(self.id)
            if self._sock:
                self._sock.close()
            sweep_lost_runs()
            log.info("worker %s stopped after %d job(s)", self.id, self.jobs_done)
        return 0

    def step(self, now=None):
        """Housekeeping, then claim and run at most one job.  True if a job ran."""
        now = time.time() if now is None else now
        try:
            self.store.check()  # deleted or replaced: stop here (DatabaseGone) instead of working unseen
            cfg = self.config()
            lease = float(cfg["lease-seconds"])
            if now - self._rescued_at >= HOUSEKEEPING_INTERVAL:
                self._rescued_at = now
                self.store.rescue(now, HOST, pid_alive, kill_lost_group)
                sweep_lost_runs()
            if now - self._beat_at >= lease / 3.0:
                self._beat_at = now
                self.store.heartbeat(self.id, now=now)
            claim = {"worker_id": self.id, "host": HOST, "now": now, "lease": lease, "queues": self.queues}
            pending = self._unrecorded
            if pending is None:
                job = self.store.claim(**claim)
            else:  # the last run's result first: it may free a queue slot or release a dependent job
                ok, job = self.store.finish_and_claim(pending.finish, claim)
                self._unrecorded = None
                self._log_result(pending, ok)
        except DatabaseBusy as e:
            log.warning("worker %s: %s", self.id, e)
            self.record_result()  # retried until it lands (or the lease runs out)
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
        """Run a claimed job to its end.  Its result is recorded (fenced by run number) in the
        transaction that claims the next job, or on its own when there is none.

        On SQLite that transaction commits without waiting for the disk, and the next run's pid,
        recorded durably right after its process starts, makes it durable: per job one
        transaction less and one fsync that overlaps the next process's start (bench/).  A crash
        before the result lands, or a power cut before that fsync, leaves the job processing, to
        be rescued and run again, as a crash between the end of a process and its result always
        did.  On PostgreSQL it is one statement, durable when it commits, and the pid is recorded
        a second into the run (``Store.pid_delay``), or with the result of a shorter run."""
        log.info("job %s run %d started: %s", job.id, job.runs, _one_line(job.command, 80))
        monitor = JobMonitor(self, job, float(cfg["lease-seconds"]))
        timeout, origin = timeout_of(job, cfg)
        result = run_command(job, timeout, cfg["output-limit"], float(cfg["kill-grace"]), monitor)
        now = time.time()
        if result.outcome == "timeout" and origin == "job-timeout":  # say which limit, and how to lift it
            result.error = ("timed out after %gs (job-timeout, for jobs without their own: lift it with -t 0 or "
                            "config set job-timeout 0); process group killed" % timeout)
        if result.outcome == "lost":
            log.warning("job %s run %d: lease lost to another worker; result discarded", job.id, job.runs)
            return
        if result.outcome == "stopped":
            self._retrying(lambda: self.store.release(job.id, job.runs, self.id, now, "stopped by a forced worker stop"))
            log.info("job %s run %d stopped and put back in the queue", job.id, job.runs)
            return
        if result.outcome == "completed":
            state, retry_at = JobState.COMPLETED, None
        elif result.outcome == "cancelled":
            state, retry_at = JobState.CANCELLED, None
        else:
            state, retry_at = after_failure(job, cfg, now)
        self._unrecorded = PendingResult(job, state, result, dict(
            job_id=job.id, run=job.runs, worker_id=self.id, state=state, now=now, outcome=result.outcome,
            exit_code=result.exit_code, error=result.error, output=result.output, output_bytes=result.output_bytes,
            retry_at=retry_at, pid=monitor.pid))
        if self.stop_level:
            self.record_result()  # no next job to record it with

    def record_result(self):
        """Record the last run's result now, if it is still waiting; True if there was one."""
        pending = self._unrecorded
        if pending is None:
            return False
        ok = self._retrying(lambda: self.store.finish(**pending.finish))
        self._unrecorded = None
        self._log_result(pending, ok)
        return True

    @staticmethod
    def _log_result(pending, ok):
        job, state, result = pending.job, pending.state, pending.result
        if not ok:
            log.warning("job %s run %d: no longer owned by this worker; result discarded", job.id, job.runs)
        elif state is JobState.FAILED:
            log.info("job %s run %d %s (%s); retry at %s", job.id, job.runs, result.outcome, result.error,
                     rfc3339(pending.finish["retry_at"], precise=False))
        else:
            log.info("job %s run %d %s%s", job.id, job.runs, state.value,
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
        self.worker_id = worker.id  # run_command puts it in the job's environment (QUEUECTL_WORKER_ID)
        self.interval = max(0.05, min(lease / 3.0, 1.0))
        self.pid = None
        self.recorded = False  # the pid (and the previous result) are in the database
        self.record_at = None  # when to record the pid (the store's pid_delay into the run)
        self.next_beat = time.time() + lease / 3.0
        self.flushed_at = time.time()
        self.checked_at = time.time()

    def poll_fds(self):
        return self.worker.wake_fds()

    def on_start(self, pid):
        self.pid = pid
        delay = self.worker.store.pid_delay
        if delay > 0:
            self.record_at = time.time() + delay  # (on the clock of tick's now)
        else:
            self.record_at = float("-inf")
            self._record_pid()

    def _record_pid(self):
        try:
            self.worker.store.started(self.job.id, self.job.runs, self.pid)
            self.recorded = True
        except QueuectlError as e:  # busy: the next tick tries again
            log.debug("worker %s: recording pid %d: %s", self.worker.id, self.pid, e)

    def tick(self, now, buf):
        """Called on every wake-up; returns None, 'stopped' (cold stop), 'lost' (lease gone)
        or 'cancelled' (a user cancelled the job; the store's cancel also wakes us)."""
        woken = self.worker.drain_wakeups()
        if self.worker.stop_level >= 2:
            return "stopped"
        if not self.recorded and self.pid is not None and now >= self.record_at:
            self._record_pid()
        if woken or now - self.checked_at >= 1.0:
            self.checked_at = now
            with contextlib.suppress(DatabaseBusy):
                if self.worker.store.cancel_requested(self.job.id, self.job.runs):
                    return "cancelled"
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
    their jobs at once, and passes stop requests on to them.  It also does the
    housekeeping no single worker should block on: firing schedules, purging
    old jobs (``retention``), and starting a webhook sender when deliveries are due."""

    def __init__(self, db_path, count, poll_interval=None, burst=False, queues=None):
        self.db_path = db_path
        self.burst = burst
        self.count = count
        self.poll_interval = poll_interval
        self.queues = queues
        self.children = {}  # pid -> (started (monotonic), role: "worker" | "webhooks")
        self.stop_level = 0
        self.pid = os.getpid()
        self._failures = 0
        self._purged_at = float("-inf")
        self._reopen = False  # the database file was deleted or replaced: restart the workers on the new one
        self._reopen_since = 0.0
        self.db_failure = None  # the database became unusable: stop, then exit 74 with this error
        self._listen_key = None  # (store, its notification sockets) while listening (_listening)

    def _on_signal(self, signum, frame):
        if signum == signal.SIGQUIT:
            self.stop_level = 2
        else:
            self.stop_level += 1
        for pid in list(self.children):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGQUIT if self.stop_level >= 2 else signal.SIGTERM)

    def _spawn(self, role="worker"):
        for stream in (sys.stdout, sys.stderr):  # or the child would write the parent's buffered text again
            with contextlib.suppress(Exception):
                stream.flush()
        # A stop signal that arrives while we fork must reach the new child too: it is held (blocked)
        # here until the child is in self.children, and in the child until its own handlers are in
        # place (Worker._install_signals); otherwise a graceful stop could wait forever for a worker
        # that never heard of it.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            raise
        if pid == 0:  # child
            code = 1
            try:
                os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the supervisor only, which passes it on once
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                signal.set_wakeup_fd(-1)
                if role == "webhooks":
                    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)  # a stop before its handlers: it just ends
                    code = WebhookSender(self.db_path, self.pid).run()
                else:
                    code = Worker(self.db_path, supervisor_pid=self.pid, poll_interval=self.poll_interval,
                                  burst=self.burst, queues=self.queues).run()
            except QueuectlError as e:
                log.error("%s: %s", role, e)
                code = e.exit_code  # 74: the supervisor checks the database before restarting it
            except BaseException:  # pragma: no cover - logged, then the supervisor restarts us
                log.exception("%s crashed", role)
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = (time.monotonic(), role)
        if self.stop_level:  # a stop that came before this child existed (say, between two spawns)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGQUIT if self.stop_level >= 2 else signal.SIGTERM)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)  # a held stop signal is handled now, child included
        return pid

    def workers_running(self):
        return sum(1 for _, role in self.children.values() if role == "worker")

    def run(self):
        _load_lazy_modules("secrets", "socket", "subprocess", "logging")  # before forking: workers start with them
        _logger()
        store = open_store(self.db_path)
        try:
            if store.readonly:  # or every worker would fail at once, forever
                raise DatabaseError("database %s is read-only: workers need to write to it" % self.db_path)
            need_sender = self.housekeeping(store, time.time())  # also creates/migrates the database
        finally:
            store.close()  # children open their own connections
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGCHLD, lambda s, f: None)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        for _ in range(self.count):
            self._spawn()  # no connection is open here (see _spawn_without_connection)
        if need_sender:
            self._spawn("webhooks")
        log.info("supervisor %d: started %d worker(s) on %s", self.pid, self.count, db_label(self.db_path))
        store = self._open_after_spawn(store)
        last_housekeeping = time.time()
        restart_at = None
        announced = 0
        try:
            while self.children or (self.stop_level == 0 and not self.burst):
                if self.stop_level != announced:
                    announced = self.stop_level
                    log.info("supervisor %d: %s stop requested", self.pid, "cold" if announced >= 2 else "graceful")
                self._reap(store)
                store = self._watch_database(store)
                now = time.time()
                if self.burst and not self.workers_running():
                    self._stop_webhook_sender()  # deliveries still waiting for a retry go out next time
                if self.stop_level == 0 and not self.burst and not self._reopen:
                    missing = self.count - self.workers_running()
                    if missing > 0:
                        if restart_at is None:
                            restart_at = time.monotonic() + min(30.0, 0.1 * 2 ** min(self._failures, 8))
                        if time.monotonic() >= restart_at:
                            store = self._spawn_without_connection(store, ["worker"] * missing)
                            restart_at = None
                if self.stop_level == 0 and not self._reopen and now - last_housekeeping >= HOUSEKEEPING_INTERVAL:
                    last_housekeeping = now
                    if self.housekeeping(store, now):
                        store = self._spawn_without_connection(store, ["webhooks"])
                self._wait(store, r, 0.5)
        finally:
            store.close()
        sweep_lost_runs()
        log.info("supervisor %d: all workers stopped", self.pid)
        if self.db_failure is not None:
            raise self.db_failure
        return 0

    def _wait(self, store, r, timeout):
        """Sleep until a signal (``r``: the wake-up fd of the signal handlers) or ``timeout``, and
        relay the store's notifications to this supervisor's workers meanwhile.

        On PostgreSQL the supervisor is the one process of its machine that LISTENs (workers
        need one connection each, not two): a notification that jobs are due wakes its idle
        workers by datagram, as an SQLite commit does; a cancel (busy workers look at their
        job) or a LISTEN connection that broke wakes them all.  SQLite has no notifications:
        its commits wake the workers themselves."""
        fds = self._listening(store)
        ready = []
        with contextlib.suppress(InterruptedError):
            ready = select.select([r] + fds, [], [], timeout)[0]
        drain_fd(r)
        if any(fd in ready for fd in fds):
            self._wake(store, everyone=store.consume_notifications())

    def _listening(self, store):
        """The store's notification fds, opened on first use (PostgreSQL: the LISTEN connection).
        Whenever listening starts (at start-up, after a broken connection came back, and after
        the store was re-opened around a fork, _spawn_without_connection), notifications may have
        been missed meanwhile: every worker is woken once to look."""
        fds = store.wait_fds()
        # a socket opened anew may get the number of the one that broke, never its inode
        key = (store, tuple((fd, os.fstat(fd).st_ino) for fd in fds)) if fds else None
        if key is not None and key != self._listen_key:
            self._wake(store, everyone=True)
        self._listen_key = key
        return fds

    def _wake(self, store, everyone):
        """Wake this supervisor's idle workers (all of them with ``everyone``) by datagram."""
        with contextlib.suppress(QueuectlError):
            send_wakeups(store.wake_addresses(HOST, None, supervisor_pid=self.pid, idle=not everyone))

    def _watch_database(self, store):
        """Notice the database file deleted, replaced or overwritten under the workers.

        Deleted: stop the workers gracefully, then start them again on a new database at the
        path, so new jobs are not enqueued into a file no worker reads.  Replaced by another file,
        or unusable (corrupt, or the new file is not a queuectl database): stop them and exit 74,
        saying what to do.  Returns the store to use from now on.
        """
        if self.db_failure is not None or self.stop_level:
            return store
        if not self._reopen:
            try:
                store.check()
                return store
            except DatabaseGone as e:
                if os.path.exists(self.db_path):
                    # Another file was renamed over it: the old file's -wal/-shm are still next to it, and
                    # SQLite would apply them to the new file.  Only the operator can say what is right.
                    return self._fail(store, DatabaseGone(
                        "%s; if the new file is the database you want, remove %s-wal and %s-shm (they belong to "
                        "the file it replaced) before starting workers on it" % (e, self.db_path, self.db_path)))
                if self.burst:
                    return self._fail(store, e)
                log.error("supervisor %d: %s; stopping the workers to start them again on a new database at that "
                          "path (the results of jobs running on the old file are lost with it)", self.pid, e)
                self._reopen = True
                self._reopen_since = time.monotonic()
                for pid in list(self.children):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGTERM)
            except DatabaseError as e:
                return self._fail(store, e)
        if self.children:
            return store  # they finish their current job and close the old file first
        store.close()
        try:
            store = open_store(self.db_path)
        except DatabaseGone:
            return store  # other processes still have the deleted file open: try again in a moment
        except DatabaseCorrupt as e:
            return self._fail(store, e)
        except DatabaseError as e:
            # The last process to close the deleted file removes its -wal and -shm as it goes; a
            # command that creates the new file in that moment can make the first open fail with
            # an I/O error.  Try again for a while before giving up.
            if time.monotonic() - self._reopen_since < REOPEN_GRACE:
                log.warning("supervisor %d: %s; trying again", self.pid, e)
                return store
            return self._fail(store, e)
        self._reopen = False
        log.warning("supervisor %d: starting the workers again on %s", self.pid, self.db_path)
        return store

    def _fail(self, store, error):
        log.error("supervisor %d: %s; stopping the workers", self.pid, error)
        self.db_failure = error
        self.stop_level = max(self.stop_level, 1)
        for pid in list(self.children):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        return store

    def _stop_webhook_sender(self):
        for pid, (_, role) in list(self.children.items()):
            if role == "webhooks":
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)

    def _open_after_spawn(self, closed):
        """The supervisor's connection, opened once its workers run.  They may already have run
        jobs, and the file may have been deleted, replaced or overwritten meanwhile: then the
        store that was open before the fork (``closed``, whose check() still compares the file
        with the one it opened) goes to the loop, which deals with that as at any other time."""
        try:
            return open_store(self.db_path)
        except DatabaseGone:
            return closed  # _watch_database sees which (deleted: start again on a new file; replaced: stop)
        except QueuectlError as e:
            return self._fail(closed, e)

    def _spawn_without_connection(self, store, roles):
        """Fork children with no SQLite connection open in this process: SQLite keeps
        per-process lock state for each open file, and a child forked while a connection is
        open inherits it and can lose its writes.  Returns the reopened store."""
        store.close()
        for role in roles:
            self._spawn(role)
        try:
            return open_store(self.db_path)
        except QueuectlError as e:  # unusable now: stop (calls on the closed store fail as DatabaseError)
            return self._fail(store, e)

    def housekeeping(self, store, now):
        """Rescue lost jobs, fire due schedules, purge old jobs.  Returns True when webhook
        deliveries are due and no sender runs (the caller starts one)."""
        try:
            store.rescue(now, HOST, pid_alive, kill_lost_group)
            sweep_lost_runs()
            cfg = store.config()
            created = store.fire_schedules(now, schedule_next_run, cfg)
            if created:
                log.info("schedules enqueued %s", ", ".join(created))
            retention = float(cfg.get("retention") or 0)
            if retention and now - self._purged_at >= 60:
                self._purged_at = now
                n = store.purge(("completed", "cancelled"), now - retention)
                if n:
                    log.info("retention: purged %d job(s) finished more than %s ago", n, human_duration(retention))
            return "webhooks" not in [role for _, role in self.children.values()] and store.webhooks_due(now)
        except DatabaseCorrupt as e:  # overwritten or damaged: restarting workers on it cannot help
            self._fail(store, e)
        except QueuectlError as e:
            log.warning("supervisor: housekeeping: %s", e)
        return False

    def _reap(self, store):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            started, role = self.children.pop(pid, (None, None))
            if started is None or role != "worker":
                continue
            code = exit_code_of(status)
            if code != 0 or (self.stop_level == 0 and not self.burst):
                log.warning("supervisor: worker pid %d exited (%s)", pid, describe_exit(code))
                self._failures = self._failures + 1 if time.monotonic() - started < 5 else 0
                with contextlib.suppress(QueuectlError):
                    store.rescue(time.time(), HOST, pid_alive, kill_lost_group)


def _delivery_job(delivery):
    try:
        return json.loads(delivery["payload"])["job"]["id"]
    except (ValueError, KeyError, TypeError):
        return "?"


def _no_redirects():
    import urllib.request

    class NoRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            return None  # urllib then raises HTTPError with the 3xx

    return NoRedirects


class WebhookSender:
    """Delivers queued webhook events (a JSON POST per finished job) from its own
    process, so a slow or dead endpoint never holds up a worker.  Each delivery has
    a short timeout and is retried with exponential backoff; the sender exits when
    nothing has been due for a while (its supervisor starts a new one when needed)."""

    TIMEOUT = 5.0
    MAX_ATTEMPTS = 8
    IDLE_EXIT = 30.0

    def __init__(self, db_path, supervisor_pid):
        self.store = open_store(db_path)
        self.supervisor_pid = supervisor_pid
        self.stop = False

    def run(self):
        import concurrent.futures

        signal.signal(signal.SIGTERM, lambda s, f: setattr(self, "stop", True))
        signal.signal(signal.SIGQUIT, lambda s, f: setattr(self, "stop", True))
        idle_since = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            while not self.stop and os.getppid() == self.supervisor_pid:
                batch = self.store.claim_webhooks(time.time(), 16, self.TIMEOUT * 3)
                if not batch:
                    if time.monotonic() - idle_since > self.IDLE_EXIT:
                        break
                    time.sleep(0.5)
                    continue
                idle_since = time.monotonic()
                for delivery, error in zip(batch, pool.map(self.post, batch)):
                    now = time.time()
                    attempt = delivery["attempts"] + 1
                    if error is None:
                        self.store.webhook_result(delivery["id"], now)
                    elif attempt >= self.MAX_ATTEMPTS:
                        log.warning("webhook of job %s to %s: giving up after %d attempts: %s",
                                    _delivery_job(delivery), redact_url(delivery["url"]), attempt, error)
                        self.store.webhook_result(delivery["id"], now, error=error)
                    else:
                        log.warning("webhook of job %s to %s failed (attempt %d of %d): %s; next try in %gs",
                                    _delivery_job(delivery), redact_url(delivery["url"]), attempt, self.MAX_ATTEMPTS,
                                    error, 2.0 ** attempt)
                        self.store.webhook_result(delivery["id"], now, error=error, next_at=now + 2.0 ** attempt)
        self.store.close()
        return 0

    def post(self, delivery):
        """POST one event; None on a 2xx answer, else the error text.  A redirect is not followed
        (it could send the event, and its credentials, anywhere); a URL's user part is sent as
        HTTP Basic authentication."""
        import base64
        import urllib.error
        import urllib.request

        url, userinfo = split_userinfo(delivery["url"])
        headers = {"Content-Type": "application/json", "User-Agent": "queuectl/" + __version__}
        if userinfo is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(userinfo.encode()).decode("ascii")
        request = urllib.request.Request(url, data=delivery["payload"].encode(), method="POST", headers=headers)
        try:
            with urllib.request.build_opener(_no_redirects()).open(request, timeout=self.TIMEOUT) as response:
                response.read(65536)
                return None
        except urllib.error.HTTPError as e:
            if 300 <= e.code < 400:
                location = redact_url(e.headers.get("Location", "?"))
                return "HTTP %d: redirect to %s not followed" % (e.code, short_json(location, 200))
            return "HTTP %d" % e.code
        except Exception as e:  # noqa: BLE001 - any network failure is retried
            return str(getattr(e, "reason", e)) or type(e).__name__


def self_command():
    """argv that starts this program again (source file, installed module or inside the .pyz)."""
    return [sys.executable, os.path.abspath(__file__)]


def _anything_due(store, now):
    """Is a job due, or a schedule's tick (what a burst run would do)?"""
    return store.oldest_due(now) is not None or any(
        not sch["paused"] and sch["next_run"] <= now for sch in store.schedules())


def local_worker_groups(store):
    """Live supervisors and stray workers of this database on this host: ``{pid: [worker records]}``
    (alive by ``worker_alive``; a supervisor by its pid)."""
    groups = {}
    now, lease = time.time(), store.config()["lease-seconds"]
    for w in store.workers():
        if w["host"] != HOST or not worker_alive(w, now, HOST, lease, pid_alive):
            continue
        sup = w["supervisor_pid"]
        target = sup if sup and pid_alive(sup) else w["pid"]
        groups.setdefault(target, []).append(w)
    return groups


###############################################################################
# Output formatting
###############################################################################


COLOR = ["auto"]  # --color, set by main: auto, always or never


def use_color(stream, mode=None):
    """Colour for ``stream``: --color (``mode``, else the command line's) always/never; auto: FORCE_COLOR
    forces it, NO_COLOR (https://no-color.org) or a dumb terminal turns it off, a terminal turns it on."""
    mode = mode or COLOR[0]
    if mode != "auto":
        return mode == "always"
    if os.environ.get("FORCE_COLOR"):
        return True
    return not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb" and stream.isatty()


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


def terminal_width(stream):
    """Columns of the terminal ``stream`` writes to ($COLUMNS wins), or None when it is not a
    terminal: piped output is never cut to a width, so scripts see the same at any size."""
    try:
        if not stream.isatty():
            return None
        columns = os.environ.get("COLUMNS", "")
        return int(columns) if columns.isdigit() and int(columns) > 0 else os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return None


def _ellipsis(stream):
    return "\u2026" if "utf" in (getattr(stream, "encoding", None) or "").lower() else "~"


def cut(text, width, stream=None):
    """``text`` in at most ``width`` characters, its end replaced by an ellipsis when cut."""
    if len(text) <= width:
        return text
    return text[:max(0, width - 1)] + _ellipsis(stream or sys.stdout) if width > 0 else ""


def table(headers, rows, stream=None, fit=(), wrap=(), drop=(), width=None):
    """Print an aligned table.  On a terminal it fits the width: the columns named in ``drop`` are
    left out while every value in them is 0, those in ``fit`` are cut with an ellipsis (in that
    order, as far as needed), those in ``wrap`` continue on the next lines; piped, every cell is
    printed whole."""
    stream = stream or sys.stdout
    width = width or terminal_width(stream)
    for name in drop:
        i = headers.index(name)
        wide = sum(max(len(h), *(len(str(r[j])) for r in rows)) + 2 for j, h in enumerate(headers)) - 2
        if width and wide > width and all(str(r[i]) == "0" for r in rows):
            headers = headers[:i] + headers[i + 1:]
            rows = [r[:i] + r[i + 1:] for r in rows]
    cells = [[safe_text(c).replace("\n", " ") for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    if width:
        excess = sum(widths) + 2 * (len(widths) - 1) - width
        # First each column down to what still reads well (a name in ``fit`` may come with that
        # width: ("COMMAND", 24)), then, if need be, down to its header's width.
        shrink = [(n, 30) for n in wrap] + [(f, 0) if isinstance(f, str) else f for f in fit]
        for floor_of in (lambda soft, i: max(soft, len(headers[i]), 6), lambda soft, i: max(len(headers[i]), 6)):
            for name, soft in shrink:
                if excess <= 0:
                    break
                i = headers.index(name)
                give = min(excess, widths[i] - floor_of(soft, i))
                if give > 0:
                    widths[i] -= give
                    excess -= give
    wrapped = [headers.index(n) for n in wrap]
    out = ["  ".join(h.ljust(widths[i]) for i, h in enumerate(headers)).rstrip()]
    for row in cells:
        parts = [[c] for c in row]
        for i in wrapped:
            if len(row[i]) > widths[i]:
                import textwrap

                parts[i] = textwrap.wrap(row[i], widths[i]) or [""]
        for n in range(max(len(p) for p in parts)):
            line = []
            for i, p in enumerate(parts):
                text = cut(p[n] if n < len(p) else "", widths[i], stream).ljust(widths[i])
                if headers[i] == "STATE" and n == 0:
                    text = paint(text, text.strip(), stream)
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


def worker_view(w, now, lease):
    """A worker record as `worker status --json` and the dashboard show it: its state, or "gone"
    when ``worker_alive`` says it is (rescue removes it soon)."""
    alive = worker_alive(w, now, HOST, lease, pid_alive)
    return {
        "id": w["id"], "pid": w["pid"], "host": w["host"], "state": w["state"] if alive else "gone",
        "job_id": w["job_id"], "started_at": rfc3339(w["started_at"]), "heartbeat_at": rfc3339(w["heartbeat_at"]),
        "supervisor_pid": w["supervisor_pid"],
    }


def worker_views(store, now):
    """``worker_view`` of every worker record, oldest first."""
    lease = store.config()["lease-seconds"]
    return [worker_view(w, now, lease) for w in store.workers()]


def _prom_labels(**labels):
    def esc(v):
        return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return "{" + ",".join('%s="%s"' % (k, esc(v)) for k, v in labels.items()) + "}"


def _prom_number(v):
    if v == float("inf"):
        return "+Inf"
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return "%d" % v
    return repr(v) if isinstance(v, float) else str(v)


def metrics_text(store, now):
    """The Prometheus text exposition (format 0.0.4): `queuectl metrics` and the dashboard's /metrics."""
    out = []

    def family(name, kind, help_text):
        out.append("# HELP %s %s" % (name, help_text))
        out.append("# TYPE %s %s" % (name, kind))

    family("queuectl_jobs", "gauge", "Jobs in the database by state.")
    for state, n in store.counts().items():
        out.append("queuectl_jobs%s %d" % (_prom_labels(state=state), n))
    totals = store.attempt_totals()
    family("queuectl_attempts_total", "counter", "Finished attempts by queue and outcome, ever (never decreases).")
    for t in totals:
        out.append("queuectl_attempts_total%s %d" % (_prom_labels(queue=t["queue"], outcome=t["outcome"]), t["count"]))
    family("queuectl_job_duration_seconds", "histogram", "Run time of finished attempts, by queue and outcome.")
    for t in totals:
        for le, count in t["buckets"]:
            labels = _prom_labels(queue=t["queue"], outcome=t["outcome"], le=_prom_number(float(le)))
            out.append("queuectl_job_duration_seconds_bucket%s %d" % (labels, count))
        labels = _prom_labels(queue=t["queue"], outcome=t["outcome"])
        out.append("queuectl_job_duration_seconds_sum%s %s" % (labels, _prom_number(float(t["duration_sum"]))))
        out.append("queuectl_job_duration_seconds_count%s %d" % (labels, t["count"]))
    oldest = store.oldest_due(now)
    family("queuectl_oldest_pending_job_age_seconds", "gauge",
           "How long the longest-waiting due job (pending, or failed and due for retry) has waited; 0 if none.")
    out.append("queuectl_oldest_pending_job_age_seconds %s" % _prom_number(
        round(max(0.0, now - oldest), 3) if oldest is not None else 0))
    states = {"busy": 0, "idle": 0}
    for view in worker_views(store, now):
        if view["state"] in states:
            states[view["state"]] += 1
    family("queuectl_workers", "gauge", "Live workers by state.")
    for state, n in states.items():
        out.append("queuectl_workers%s %d" % (_prom_labels(state=state), n))
    family("queuectl_info", "gauge", "queuectl version.")
    out.append("queuectl_info%s 1" % _prom_labels(version=__version__))
    return "\n".join(out) + "\n"
def relative(ts, now):
    """A time as a person glances at it: "just now", "3m ago", "5h ago", "12d ago", "in 2h"."""
    delta = now - ts
    span = abs(delta)
    if span < 1:
        return "just now"
    for unit, seconds in (("y", 365.25 * 86400), ("mo", 30.44 * 86400), ("d", 86400), ("h", 3600), ("m", 60),
                          ("s", 1)):
        if span >= seconds and (unit != "mo" or span >= 60 * 86400) and (unit != "y" or span >= 2 * 365.25 * 86400):
            text = "%d%s" % (span // seconds, unit)
            break
    return "%s ago" % text if delta > 0 else "in %s" % text


def when(ts, now, utc):
    """A time in a table: a UTC stamp (piped, --utc), else relative to now."""
    return rfc3339(ts, precise=False) if utc else relative(ts, now)


###############################################################################
# Terminal view (top)
###############################################################################

#: The jobs list's filters, in the order of their keys 1 to 9.
TOP_FILTERS = ("all", "pending", "processing", "failed", "dead", "scheduled", "waiting", "completed", "cancelled")
TOP_MIN_SIZE = (80, 24)  # columns, lines
TOP_STALE = 10.0  # seconds: read again at least this often, changed or not (delayed jobs fall due)
TOP_QUEUE_SCAN = 2000  # --queue: jobs looked at per read of the list, at most (no index has the queue first)
TOP_OUTPUT_TAIL = 65536  # characters of an attempt's output the job view makes lines of
TOP_MINUTES = 60  # minutes of throughput read for the sparklines
TOP_WORKER_JOBS = 32  # busy workers whose job (command, start) is read, at most
TOP_STATUS_SECONDS = 8.0  # how long a result stays on the status line
_CONTROL_SEQUENCE = []  # the compiled pattern of terminal control sequences, made at first use


class _TopRecord:
    """A record whose fields and defaults are its class attributes (a plain class: nothing to
    build at start-up, unlike ``_record``, for code that only `top` runs)."""

    def __init__(self, **fields):
        unknown = [name for name in fields if name.startswith("_") or not hasattr(type(self), name)]
        if unknown:
            raise TypeError("%s has no field %s" % (type(self).__name__, unknown[0]))
        self.__dict__.update(fields)


class TopSnapshot(_TopRecord):
    """What one frame of `top` shows, as read from the store by ``top_snapshot``."""

    now = 0.0
    db = ""
    queue = None  # --queue
    counts = None  # {state: n}
    oldest_due = None
    workers = None  # dicts: id, host, pid, heartbeat_at, state (busy, idle, gone), job_id, job_started_at, command
    minutes = None  # (processed, failed) per minute, oldest first, the current minute last
    queues = None  # queue_settings()
    filter = "all"
    jobs = None  # the jobs list from the top of the window (None in the job view)
    more = False  # jobs follow the ones read
    offset = 0  # jobs above the window
    truncated = False  # --queue: the list was cut at TOP_QUEUE_SCAN jobs looked at
    job_id = None  # the job view's job ...
    job = None  # ... a Job, None when it no longer exists
    attempts = None
    attempt = None  # the chosen Attempt, with its output


class TopView(_TopRecord):
    """What the user chose: screen, selection, status line."""

    mode = "list"  # list | job
    help = False
    selected = 0  # row of the jobs list; -1: none
    attempt = None  # the job view's attempt; None: the latest
    scroll = 0  # output lines scrolled back from the end; 0: following the output
    status = ""
    status_style = "info"  # info | ok | error | ask
    interval = 1.0
    once = False  # a plain-text frame: no selection, no status line


def _strip_control(text):
    """``text`` without terminal control sequences (colours, cursor moves, titles)."""
    if not _CONTROL_SEQUENCE:
        _CONTROL_SEQUENCE.append(re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])"))
    return _CONTROL_SEQUENCE[0].sub("", text)


def top_change_marker(store):
    """A value that changes whenever the database changes (``data_version``); a store that
    cannot tell gets a fingerprint of counts, newest job and workers instead, as the
    dashboard's change watcher does."""
    try:
        return store.data_version()
    except NotImplementedError:
        newest, _ = store.jobs_page(limit=1)
        return (tuple(sorted(store.counts().items())), (newest[0].updated_at, newest[0].seq) if newest else None,
                tuple((w["id"], w["heartbeat_at"], w["state"], w["job_id"]) for w in store.workers()))


def _top_key(job, filt):
    """The keyset position of a job in the list ``filt`` (see ``jobs_page``, ``scheduled_page``)."""
    return (job.run_at, job.seq) if filt == "scheduled" else (job.updated_at, job.seq)


def _top_jobs(store, now, filt, queue, limit, after):
    """(jobs, more, cut): one window of the jobs list, newest first (scheduled: soonest first).
    With ``queue`` at most TOP_QUEUE_SCAN jobs are looked at; ``cut`` says the look stopped there."""
    state = None if filt in ("all", "scheduled") else filt
    if filt != "scheduled":
        if queue is not None:
            return store.queue_page(queue, state=state, limit=limit, after=after, scan=TOP_QUEUE_SCAN)
        jobs, more = store.jobs_page(state=state, limit=limit, after=after)
        return jobs, more, False
    found, looked = [], 0
    while True:  # the scheduled jobs, few as a rule; of one queue: filtered here, within the same bound
        batch, more = store.scheduled_page(now, limit=limit + 1 if queue is None else 100, after=after)
        looked += len(batch)
        found += [j for j in batch if queue is None or j.queue == queue]
        if len(found) > limit:
            return found[:limit], True, False
        if not more:
            return found, False, False
        if looked >= TOP_QUEUE_SCAN:
            return found, True, True
        after = _top_key(batch[-1], filt)


def top_snapshot(store, now, db="", queue=None, filt="all", limit=20, after=None, offset=0, job_id=None,
                 attempt=None):
    """Read what one frame shows.  Each read is served by an index or a small table, so the
    cost does not grow with the number of jobs: counts (maintained counters), the oldest due
    job, queue settings, per-minute totals, the workers (and the jobs of the busy ones shown),
    then one window of the jobs list, or the job view's job, attempts and chosen attempt."""
    snap = TopSnapshot(now=now, db=db, queue=queue, filter=filt, offset=offset, job_id=job_id)
    snap.counts = store.counts()
    snap.oldest_due = store.oldest_due(now)
    snap.queues = store.queue_settings()
    until = int(now // 60)
    since = until - TOP_MINUTES + 1
    minutes = {m: [0, 0] for m in range(since, until + 1)}
    for r in store.stats_minutes(since, until):
        bucket = minutes.get(r["minute"])
        if bucket is not None and (r["outcome"] == "completed" or r["outcome"] in FAILED_OUTCOMES):
            bucket[0] += r["count"]
            if r["outcome"] in FAILED_OUTCOMES:
                bucket[1] += r["count"]
    snap.minutes = [tuple(minutes[m]) for m in range(since, until + 1)]
    snap.workers, looked_up = [], 0
    lease = store.config()["lease-seconds"]
    for w in store.workers():
        alive = worker_alive(w, now, HOST, lease, pid_alive)
        view = {"id": w["id"], "host": w["host"], "pid": w["pid"], "heartbeat_at": w["heartbeat_at"],
                "state": w["state"] if alive else "gone", "job_id": w["job_id"], "job_started_at": None,
                "command": None}
        if alive and w["job_id"] and looked_up < TOP_WORKER_JOBS:
            looked_up += 1
            job = store.get(w["job_id"])
            if job is not None and job.state == "processing":
                view["job_started_at"], view["command"] = job.started_at, job.command
        snap.workers.append(view)
    if job_id is None:
        snap.jobs, snap.more, snap.truncated = _top_jobs(store, now, filt, queue, limit, after)
    else:
        snap.job = store.get(job_id)
        if snap.job is not None:
            snap.attempts = store.attempts(job_id)
            snap.attempt = store.attempt(job_id, attempt)
    return snap


# --- text that fits ------------------------------------------------------------------------------


def _char_cells(ch):
    if ch < "\u0300":
        return 1
    import unicodedata

    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in "WF" else 1


def _cells(text):
    """Terminal columns ``text`` takes."""
    return len(text) if text.isascii() else sum(_char_cells(ch) for ch in text)


def _clean(text):
    """One line of a user's text for the screen: control sequences gone, white space one blank."""
    return " ".join(safe_text(_strip_control(str(text))).split())


def _clip(text, width, pad=False, keep_end=False):
    """``text`` cut to ``width`` columns with an ellipsis (the start cut instead with
    ``keep_end``), padded with blanks to ``width`` with ``pad``."""
    if width <= 0:
        return ""
    used = _cells(text)
    if used > width:
        mark = "\u2026"
        out, used = [], 1
        for ch in (reversed(text) if keep_end else text):
            w = _char_cells(ch)
            if used + w > width:
                break
            out.append(ch)
            used += w
        text = mark + "".join(reversed(out)) if keep_end else "".join(out) + mark
    return text + " " * (width - used) if pad else text


def _wrap(text, width):
    """Split one line of text into pieces of at most ``width`` columns."""
    if _cells(text) <= width:
        return [text]
    pieces, piece, used = [], [], 0
    for ch in text:
        w = _char_cells(ch)
        if used + w > width and piece:
            pieces.append("".join(piece))
            piece, used = [], 0
        piece.append(ch)
        used += w
    pieces.append("".join(piece))
    return pieces


def _fit_line(spans, width, fill=None):
    """A line (a list of (text, style) spans) cut to ``width`` columns; padded to it, in style
    ``fill``, unless ``fill`` is None."""
    out, used = [], 0
    for text, style in spans:
        if not text:
            continue
        room = width - used
        if room <= 0:
            break
        cells = _cells(text)
        if cells > room:
            text = _clip(text, room)
            cells = _cells(text)
        out.append((text, style))
        used += cells
    if fill is not None and used < width:
        out.append((" " * (width - used), fill))
    return out


def _pack(items, width, gap=3):
    """Lay out items (each a list of spans) in lines of at most ``width`` columns, in order."""
    lines, line, used = [], [], 0
    for item in items:
        w = sum(_cells(t) for t, _ in item)
        if line and used + gap + w > width:
            lines.append(line)
            line, used = [], 0
        if line:
            line.append((" " * gap, ""))
            used += gap
        line.extend(item)
        used += w
    if line:
        lines.append(line)
    return lines


def _top_number(n):
    """A count in at most 6 columns: 99999, 123.4k, 12.35M."""
    if n < 100000:
        return "%d" % n
    if n < 999950:
        return "%.1fk" % (n / 1000.0)
    return "%.2fM" % (n / 1000000.0)


_TOP_PRIORITY = {"medium": "med"}
_SPARKS = "\u2581\u2582\u2583\u2584\u2585\u2586\u2587\u2588"
_ASCII_FALLBACK = str.maketrans(dict(zip(_SPARKS + "\u2026", ".:-=+*#@~")))


def _sparkline(values):
    """One character per value, its height relative to the largest; blank for zero."""
    top = max(values) if values else 0
    return "".join(" " if not v else _SPARKS[min(7, (v * 8 - 1) // top)] for v in values)


def _row(cells, widths, style=""):
    """A table row: each cell (text, style) clipped and padded to its width, two blanks between;
    the last width None takes the rest of the line."""
    spans = []
    for i, ((text, cell_style), width) in enumerate(zip(cells, widths)):
        if i:
            spans.append(("  ", style))
        text = _clip(text, width, pad=i < len(cells) - 1) if width is not None else text
        spans.append((text, (cell_style + " " + style).strip()))
    return spans


# --- the frame ---------------------------------------------------------------------------------------

_TOP_HELP = [
    ("Jobs list", None),
    ("Up Down j k", "move the selection"),
    ("PgUp PgDn", "a page down or up"),
    ("Home g  End G", "the newest jobs, live  /  the last row on screen"),
    ("1-9  Tab", "filter: 1 all  2 pending  3 processing  4 failed"),
    ("", "5 dead  6 scheduled  7 waiting  8 completed  9 cancelled"),
    ("Enter", "open the selected job"),
    ("Job view", None),
    ("Left Right [ ]", "an earlier or a later run"),
    ("Up Down PgUp PgDn", "scroll the run's output"),
    ("End f", "follow the output live again"),
    ("Esc Backspace", "back to the list"),
    ("Actions: each asks for y first", None),
    ("r  R", "retry a dead job: one more run / attempts reset"),
    ("c", "cancel a job; a running one's process tree is killed"),
    ("e", "enqueue a finished job again, as a new job"),
    ("p", "pause or resume the job's queue (or --queue's)"),
    ("Anywhere", None),
    ("?", "this help; any key closes it"),
    ("q  Ctrl-C", "leave"),
]


def _top_title(snap, view, width):
    left = [(" queuectl top  ", "title"), (_clip(snap.db, max(10, width // 2 - 10), keep_end=True), "title")]
    if snap.queue:
        left.append(("  queue %s" % _clean(snap.queue), "title"))
    clock = time.strftime("%H:%M:%S UTC", time.gmtime(snap.now))
    right = clock + " " if view.once else "every %gs  %s  ? help " % (view.interval, clock)
    room = width - _cells(right)
    line = _fit_line(left, room, fill="title")
    line.append((right, "title"))
    return _fit_line(line, width, fill="title")


def _top_header(snap, view, width, sparkline=True):
    counts = snap.counts or {}
    items = [[(state, "state:" + state), (" " + _top_number(counts.get(state, 0)), "num")]
             for state in ("pending", "processing", "waiting", "failed", "dead", "completed", "cancelled")]
    live = [w for w in snap.workers or [] if w["state"] != "gone"]
    busy = sum(1 for w in live if w["state"] == "busy")
    latency = None if snap.oldest_due is None else max(0.0, snap.now - snap.oldest_due)
    items.append([("latency ", "label"), (human_duration(latency), "num")])
    items.append([("workers ", "label"), ("%d" % len(live), "num"), (" (%d busy)" % busy, "label")])
    queues = snap.queues or {}
    if snap.queue:
        q = queues.get(snap.queue, {"paused": False, "max_running": None})
        item = [("queue ", "label"), (_clean(snap.queue), "num"),
                (" paused" if q["paused"] else " active", "error" if q["paused"] else "label")]
        if q["max_running"] is not None:
            item.append((" limit %d" % q["max_running"], "label"))
        items.append(item)
    else:
        paused = [name for name, q in sorted(queues.items()) if q["paused"]]
        if paused:
            names = ", ".join(_clean(n) for n in paused[:3]) + (" +%d" % (len(paused) - 3) if len(paused) > 3 else "")
            items.append([("paused ", "error"), (names, "num")])
    lines = [_fit_line([(" ", "")] + line, width) for line in _pack(items, width - 1)]
    if sparkline:
        minutes = snap.minutes or []
        done, failed = _per_minute(minutes, snap.now)
        fixed = len(" processed  %s/min   failed  %s/min   last 60m" % (_top_number(done), _top_number(failed)))
        n = max(4, min(TOP_MINUTES, (width - fixed) // 2))
        line = [(" processed ", "label"), (_sparkline([m[0] for m in minutes[-n:]]), "spark:ok"),
                (" %s/min" % _top_number(done), "num"), ("   failed ", "label"),
                (_sparkline([m[1] for m in minutes[-n:]]), "spark:failed"),
                (" %s/min" % _top_number(failed), "num"), ("   last %dm" % n, "label")]
        lines.append(_fit_line(line, width))
    return lines


def _per_minute(minutes, now):
    """(processed, failed) in the last 60 seconds, from per-minute totals: this minute's so far,
    and the share of the last minute that is within 60 seconds (assuming it was even)."""
    if not minutes:
        return 0, 0
    share = 1.0 - (now % 60) / 60.0
    last = minutes[-2] if len(minutes) >= 2 else (0, 0)
    return tuple(int(round(minutes[-1][i] + last[i] * share)) for i in (0, 1))


def _top_workers(snap, width, rows):
    workers = snap.workers or []
    live = [w for w in workers if w["state"] != "gone"]
    title = [(" WORKERS", "head"), ("  %d running, %d busy" % (len(live), sum(1 for w in live if w["state"] == "busy")),
                                    "label")]
    lines = [_fit_line(title, width)]
    widths = [14, 7, 5, 12, 8, 10, None]
    lines.append(_fit_line([(" ", "")] + _row([(h, "") for h in ("HOST", "PID", "STATE", "JOB", "RUNTIME", "HEARTBEAT",
                                                                "COMMAND")], widths, "colhead"), width, fill="colhead"))
    if not workers:
        lines.append([(" no workers: start some with  queuectl worker start", "label")])
        return lines
    shown = workers if len(workers) <= rows else workers[:rows - 1]
    for w in shown:
        runtime = human_duration(snap.now - w["job_started_at"]) if w["job_started_at"] else "-"
        style = "dim" if w["state"] == "gone" else ""
        cells = [(_clean(w["host"]), ""), (str(w["pid"]), ""),
                 (w["state"], "state:processing" if w["state"] == "busy" else ""),
                 (_clean(w["job_id"]) if w["job_id"] else "-", ""), (runtime, ""),
                 (ago(w["heartbeat_at"], snap.now), ""), (_clean(w["command"] or ""), "")]
        lines.append(_fit_line([(" ", "")] + _row(cells, widths, style), width))
    if len(shown) < len(workers):
        lines.append([(" +%d more workers" % (len(workers) - len(shown)), "label")])
    return lines


def _top_jobs_pane(snap, view, width, rows):
    tabs = [(" JOBS ", "head")]
    shown = [f for i, f in enumerate(TOP_FILTERS) if i < 6 or width >= 120 or f == snap.filter]
    for f in shown:
        tabs.append((" %d %s " % (TOP_FILTERS.index(f) + 1, f), "tab-on" if f == snap.filter else "tab"))
    jobs = snap.jobs or []
    visible = jobs[:rows]
    if visible:
        total = {"all": sum((snap.counts or {}).values())}.get(snap.filter, (snap.counts or {}).get(snap.filter))
        where = "%d-%d" % (snap.offset + 1, snap.offset + len(visible))
        if total is not None and not snap.queue:
            where += " of %s" % _top_number(max(total, snap.offset + len(visible)))
        elif snap.more or len(jobs) > rows:
            where += " and more"
        right = " " + where + " "
        if sum(_cells(t) for t, _ in tabs) + _cells(right) > width:
            tabs = tabs[1:]  # the tabs say what the list is
        line = _fit_line(tabs, width - _cells(right), fill="")
        lines = [line + [(right, "label")]]
    else:
        lines = [_fit_line(tabs, width)]
    wide = width >= 110
    id_width = max([6] + [_cells(_clean(j.id)) for j in visible])
    id_width = min(id_width, 12 if width < 120 else 24)
    when = "RUNS" if snap.filter == "scheduled" else "UPDATED"
    heads = ["ID", "STATE", "PRI", "ATTEMPTS", when] + (["QUEUE"] if wide else []) + ["COMMAND"]
    widths = [id_width, 10, 4, 8, 10] + ([12] if wide else []) + [None]
    lines.append(_fit_line([(" ", "")] + _row([(h, "") for h in heads], widths, "colhead"), width, fill="colhead"))
    for i, job in enumerate(visible):
        when = job.run_at if snap.filter == "scheduled" else job.updated_at
        cells = [(_clean(job.id), ""), (job.state, "state:" + job.state), (_TOP_PRIORITY.get(job.priority_name,
                                                                                              job.priority_name), ""),
                 ("%d/%d" % (job.attempts, job.max_retries + 1), ""), (ago(when, snap.now), "")]
        if wide:
            cells.append((_clean(job.queue), ""))
        cells.append((_clean(job.command), ""))
        selected = i == view.selected and not view.once
        style = "sel" if selected else ""
        lines.append(_fit_line([(">" if selected else " ", style)] + _row(cells, widths, style), width,
                               fill=style if selected else None))
    if not visible:
        if snap.truncated:
            text = "no %s jobs of queue %s among the %d newest" % (
                "" if snap.filter == "all" else snap.filter, _clean(snap.queue), TOP_QUEUE_SCAN)
        else:
            text = "no %sjobs%s" % ("" if snap.filter == "all" else snap.filter + " ",
                                    " in queue " + _clean(snap.queue) if snap.queue else "")
        lines.append([("   " + " ".join(text.split()), "label")])
    elif snap.truncated and len(visible) < rows:
        lines.append([("   (looked at the %d newest jobs only: --queue has no index)" % TOP_QUEUE_SCAN, "label")])
    return lines


def _output_lines(attempt, width):
    text = attempt.output or ""
    cut = len(text) > TOP_OUTPUT_TAIL
    if cut:
        text = text[-TOP_OUTPUT_TAIL:]
    raw = text.split("\n")
    if cut:
        raw = raw[1:]  # the first line is a piece
    if raw and raw[-1] == "":
        raw.pop()
    lines = []
    for line in raw:
        line = line.rstrip("\r")
        if "\r" in line:  # a progress bar redrawn: what the terminal would show
            line = line.rsplit("\r", 1)[1]
        line = safe_text(_strip_control(line).expandtabs(8)).replace("\t", " ")
        lines.extend(_wrap(line, width))
    return lines


def _top_job_view(snap, view, width, height):
    """The job view's lines (``height`` of them at most), the largest output scroll and the
    number of output lines shown."""
    job = snap.job
    if job is None:
        return [[(" job %s no longer exists (deleted or purged)" % _clean(snap.job_id), "error")],
                [(" Esc: back to the list", "label")]], 0, 0
    now = snap.now
    title = [(" JOB ", "head"), (_clean(job.id), "num"), ("  ", ""), (job.state, "state:" + job.state)]
    if job.cancel_requested and job.state == "processing":
        title.append(("  (cancel requested)", "error"))
    lines = [_fit_line(title, width)]
    command = _wrap(_clean(job.command), width - 10)
    if len(command) > 2:
        command = command[:1] + [_clip(command[1] + "\u2026", width - 10)]
    for i, piece in enumerate(command):
        lines.append([(" command " if i == 0 else "         ", "label"), (piece, "")])
    queue = job.queue + (" (paused)" if (snap.queues or {}).get(job.queue, {}).get("paused") else "")
    fields = [("priority", job.priority_name), ("queue", queue),
              ("attempts", "%d of %d" % (job.attempts, job.max_retries + 1)),
              ("runs", "%d (lost %d)" % (job.runs, job.rescues)),
              ("timeout", "job-timeout" if job.timeout is None else "%gs" % job.timeout if job.timeout else "none"),
              ("created", ago(job.created_at, now)), ("updated", ago(job.updated_at, now))]
    if job.state in ("pending", "failed"):
        fields.append(("next run" if job.state == "failed" else "run at", "due" if job.run_at <= now
                       else ago(job.run_at, now)))
    if job.state == "processing" and job.started_at:
        fields.append(("running for", human_duration(now - job.started_at)))
    elif job.finished_at and job.state in FINAL_STATES:
        fields.append(("finished", ago(job.finished_at, now)))
    if job.worker_id:
        fields.append(("worker", job.worker_id))
    if job.exit_code is not None:
        fields.append(("exit code", str(job.exit_code)))
    if job.after:
        fields.append(("after", ", ".join(job.after)))
    if job.schedule:
        fields.append(("schedule", job.schedule))
    if job.unique_key:
        fields.append(("unique key", job.unique_key))
    fields.append(("cwd", job.cwd or "-"))
    if job.env:
        fields.append(("env", " ".join(sorted(job.env))))  # names only: values may be secrets
    if job.webhook:
        fields.append(("webhook", "set"))
    lines += [_fit_line([(" ", "")] + line, width) for line in _pack(
        [[(name + " ", "label"), (_clean(value), "")] for name, value in fields], width - 1, gap=3)]
    if job.last_error:
        lines.append(_fit_line([(" last error ", "label"), (_clean(job.last_error), "error")], width))
    attempts = snap.attempts or []
    chosen = snap.attempt.n if snap.attempt is not None else None
    lines.append(_fit_line([(" RUNS", "head"), ("  %d  (Left/Right: choose)" % len(attempts) if attempts else
                                                    "  none yet", "label")], width))
    rows_left = height - len(lines) - 2  # the output's title and one line of it
    if attempts:
        widths = [3, 10, 9, 9, 4, 14, None]
        lines.append(_fit_line([(" ", "")] + _row([(h, "") for h in ("#", "STARTED", "DURATION", "OUTCOME", "EXIT",
                                                                    "WORKER", "ERROR")], widths, "colhead"),
                               width, fill="colhead"))
        room = max(1, min(len(attempts), 3, rows_left - 4))
        numbers = [a.n for a in attempts]
        index = numbers.index(chosen) if chosen in numbers else len(attempts) - 1
        first = min(len(attempts) - room, index)  # the latest ones, and the chosen one
        for a in attempts[first:first + room]:
            duration = a.duration if a.ended_at is not None else now - a.started_at
            cells = [(str(a.n), ""), (ago(a.started_at, now), ""), (human_duration(duration), ""),
                     (a.outcome or "running", "state:" + {"completed": "completed", None: "processing"}.get(
                         a.outcome, "failed" if a.outcome in FAILED_OUTCOMES else "cancelled")),
                     ("-" if a.exit_code is None else str(a.exit_code), ""), (_clean(a.worker_id or "-"), ""),
                     (_clean(a.error or ""), "")]
            style = "sel" if a.n == chosen else ""
            lines.append(_fit_line([(">" if a.n == chosen else " ", style)] + _row(cells, widths, style), width,
                                   fill=style or None))
    if snap.attempt is None:
        return lines[:height], 0, 0
    a = snap.attempt
    out = _output_lines(a, width - 1)
    room = max(1, height - len(lines) - 1)
    max_scroll = max(0, len(out) - room)
    scroll = min(view.scroll, max_scroll)
    live = a.outcome is None and job.state == "processing"
    if scroll:
        state = "scrolled back %d lines (End: follow)" % scroll
    else:
        state = "following live" if live else "end of output"
    title = [(" OUTPUT", "head"), ("  run %d  %s bytes  %s" % (a.n, _top_number(a.output_bytes), state), "label")]
    lines.append(_fit_line(title, width))
    start = max(0, len(out) - room - scroll)
    lines += [[(" " + text, "")] for text in out[start:start + room]]
    if not out:
        lines.append([("  (no output%s)" % (" yet" if live else ""), "label")])
    return lines[:height], max_scroll, room


def _top_help(width):
    lines = []
    for key, text in _TOP_HELP:
        if text is None:
            lines.append([(" " + key, "head")])
        else:
            lines.append(_fit_line([("   " + key.ljust(19), "key"), (text, "")], width))
    return lines


def _top_hints(view, width):
    """The status line's key reminders: as many as fit, "? help" and "q quit" always."""
    if view.mode == "job":
        keys = [("Esc", "back"), ("[ ]", "run"), ("Up/Down", "scroll"), ("End", "follow"), ("r", "retry"),
                ("c", "cancel")]
    else:
        keys = [("Enter", "open"), ("1-9", "filter"), ("r", "retry"), ("c", "cancel"), ("e", "again"),
                ("p", "pause")]
    last = [("?", "help"), ("q", "quit")]
    while keys and sum(len(k) + len(w) + 3 for k, w in keys + last) > width:
        keys.pop()
    spans = []
    for key, what in keys + last:
        spans += [(" " + key, "key"), (" " + what + " ", "label")]
    return _fit_line(spans, width)


def render_top(snap, view, width, height, uni=True):
    """One frame of `top`: ``height`` lines of (text, style) spans, each at most ``width``
    columns, from a snapshot and the view alone (``--once`` and the tests render without
    curses).  Returns ``(lines, layout)``; layout has ``rows``, the jobs list rows on
    screen, and ``max_scroll``, how far the job view's output can scroll back."""
    layout = {"rows": 0, "max_scroll": 0, "output_rows": 0}
    min_width, min_height = TOP_MIN_SIZE
    if not view.once and (width < min_width or height < min_height):
        import textwrap

        text = textwrap.wrap("queuectl top needs a terminal of at least %dx%d; this one is %dx%d. Enlarge it, "
                             "or press q to leave." % (TOP_MIN_SIZE + (width, height)), max(10, min(50, width - 2)))
        top = max(0, (height - len(text)) // 2)
        lines = [[] for _ in range(height)]
        for i, t in enumerate(text):
            if 0 <= top + i < height:
                t = _clip(t, width)
                lines[top + i] = [(" " * max(0, (width - _cells(t)) // 2) + t, "error" if i == 0 else "")]
        return lines, layout
    body = height - (0 if view.once else 1)  # the status line
    lines = [_top_title(snap, view, width)]
    if view.help:
        lines += _top_help(width)
        return _top_finish(lines, view, width, height, uni), layout
    lines += _top_header(snap, view, width, sparkline=view.mode != "job")
    if view.mode == "job":
        job_lines, layout["max_scroll"], layout["output_rows"] = _top_job_view(snap, view, width, body - len(lines))
        lines += job_lines
    else:
        room = body - len(lines)
        n = len(snap.workers or [])
        worker_rows = max(1, min(n, 8, (room - 8) // 2)) if n else 1
        lines += _top_workers(snap, width, worker_rows)
        rows = max(1, body - len(lines) - 2)
        layout["rows"] = rows
        lines += _top_jobs_pane(snap, view, width, rows)
    return _top_finish(lines, view, width, height, uni), layout


def _top_finish(lines, view, width, height, uni):
    """The frame's lines cut or filled to ``height``, with the status line."""
    body = height - (0 if view.once else 1)
    lines = [_fit_line(line, width) for line in lines[:body]]
    lines += [[] for _ in range(body - len(lines))]
    if not view.once:
        if view.status:
            lines.append(_fit_line([(" " + _clean(view.status), view.status_style)], width, fill=view.status_style))
        else:
            lines.append(_top_hints(view, width))
    if not uni:  # a terminal that is not UTF-8: sparkline and ellipsis in ASCII, the rest replaced
        lines = [[(t.translate(_ASCII_FALLBACK).encode("ascii", "replace").decode("ascii"), s) for t, s in line]
                 for line in lines]
    return lines


# --- the application -----------------------------------------------------------------------------


def enqueue_again(store, job, now):
    """Enqueue a copy of ``job`` as a new job, as `enqueue` would with the same command and
    options (validated again).  Returns the new job's id."""
    doc = {"command": job.command, "priority": job.priority_name, "max_retries": job.max_retries,
           "queue": job.queue, "cwd": job.cwd or "/"}
    for name in ("timeout", "env", "webhook"):
        if getattr(job, name):
            doc[name] = getattr(job, name)
    [job_id] = store.enqueue([validate_job(doc, store.config(), now)], now)
    return job_id


class TopApp:
    """A running `top`: what the user chose, the last snapshot, and what each key does.

    Keys arrive as names ("up", "enter", "q", ...), so this class knows nothing of curses.
    Reads go through ``top_snapshot`` when the database changed (``top_change_marker``);
    actions call the same functions as the CLI's commands."""

    def __init__(self, store, db, queue=None, filt="all", interval=1.0, uni=True):
        self.store = store
        self.db = db
        self.queue = queue
        self.filter = filt
        self.uni = uni
        self.view = TopView(interval=interval)
        self.job_id = None  # the job view's job
        self.anchors = []  # the keyset position of every job above the window, in order
        self.selected_id = None  # the job the user moved the selection to: followed while it is on screen
        self.snap = None
        self.layout = {"rows": 10, "max_scroll": 0, "output_rows": 10}
        self.rows = 10  # jobs list rows of the last frame that showed the list
        self.limit = 24  # jobs read per window: the screen's height, enough for the rows it has
        self.marker = None
        self.read_at = None
        self.asked = None  # (question, action) waiting for its "y"
        self.status_until = None

    # --- reading ---------------------------------------------------------------------

    def refresh(self, force=False):
        """Read again if the database changed, ``force``, or TOP_STALE passed.  True when read."""
        mono = time.monotonic()
        self.store.check()  # a database deleted or replaced: leave with the error, not a frozen screen
        try:
            marker = top_change_marker(self.store)
            if not force and self.snap is not None and marker == self.marker and mono - self.read_at < TOP_STALE:
                return False
            snap = top_snapshot(self.store, time.time(), self.db, self.queue, self.filter, self.limit,
                                self.anchors[-1] if self.anchors else None, len(self.anchors), self.job_id,
                                self.view.attempt)
        except DatabaseBusy as e:
            self.say("%s (retrying)" % e, "error")
            return False
        self.marker, self.read_at = marker, mono
        self.snap = snap
        if snap.jobs is not None:
            ids = [j.id for j in snap.jobs[:self.rows]]
            if self.selected_id in ids:
                self.view.selected = ids.index(self.selected_id)
            else:  # (not chosen, or gone from the screen: the same row, as on a live list)
                self.view.selected = max(0, min(self.view.selected, len(ids) - 1))
        if snap.job is not None and self.view.attempt is not None and snap.attempt is None:
            self.view.attempt = None  # (that attempt is gone: back to the latest)
        return True

    def frame(self, width, height):
        """Render the current snapshot at this size (and remember its layout)."""
        if self.status_until is not None and time.monotonic() > self.status_until and self.asked is None:
            self.view.status, self.status_until = "", None
        self.limit = max(self.limit, height)
        lines, self.layout = render_top(self.snap, self.view, width, height, self.uni)
        self.rows = self.layout["rows"] or self.rows
        self.view.scroll = min(self.view.scroll, self.layout["max_scroll"])
        return lines

    def say(self, text, style="info"):
        self.view.status, self.view.status_style = text, style
        self.status_until = None if style == "ask" else time.monotonic() + TOP_STATUS_SECONDS

    # --- keys ----------------------------------------------------------------------------

    def key(self, name):
        """Do what the key ``name`` asks.  Returns None to leave, else whether to read again now."""
        view = self.view
        if self.asked is not None:
            question, action = self.asked
            self.asked = None
            if name in ("y", "Y"):
                return self._act(action)
            self.say("nothing done", "info")
            return False
        if view.help:
            view.help = False
            return False
        if name in ("q", "Q"):
            return None
        if name == "?":
            view.help = True
            return False
        if name in ("r", "R", "c", "e", "p"):
            self._ask(name)
            return False
        if view.mode == "job":
            return self._job_key(name)
        return self._list_key(name)

    def _list_key(self, name):
        view = self.view
        jobs = (self.snap.jobs if self.snap else None) or []
        rows = max(1, self.rows)
        shown = jobs[:rows]
        beyond = len(jobs) > rows or (self.snap is not None and self.snap.more)
        if name in ("up", "k"):
            if view.selected > 0:
                self._select(view.selected - 1)
            elif self.anchors:
                self.anchors.pop()
                self.selected_id = None
                return True
        elif name in ("down", "j"):
            if view.selected < len(shown) - 1:
                self._select(view.selected + 1)
            elif beyond and shown:
                self.anchors.append(_top_key(shown[0], self.filter))
                self.selected_id = None
                return True
        elif name == "pgdown":
            if beyond and shown:
                self.anchors.extend(_top_key(j, self.filter) for j in shown)
                self.selected_id = None
                return True
            self._select(len(shown) - 1)
        elif name == "pgup":
            if self.anchors:
                del self.anchors[-rows:]
                self.selected_id = None
                return True
            self._select(0)
        elif name in ("home", "g"):
            self.anchors = []
            self.view.selected, self.selected_id = 0, None
            return True
        elif name in ("end", "G"):
            self._select(len(shown) - 1)
        elif name in ("tab", "btab") or (len(name) == 1 and name in "123456789"):
            if len(name) == 1:
                self.filter = TOP_FILTERS[int(name) - 1]
            else:
                step = 1 if name == "tab" else -1
                self.filter = TOP_FILTERS[(TOP_FILTERS.index(self.filter) + step) % len(TOP_FILTERS)]
            self.anchors = []
            self.view.selected, self.selected_id = 0, None
            return True
        elif name == "enter":
            if 0 <= view.selected < len(shown):
                self.job_id = shown[view.selected].id
                view.mode, view.attempt, view.scroll = "job", None, 0
                return True
        return False

    def _select(self, index):
        jobs = (self.snap.jobs if self.snap else None) or []
        self.view.selected = max(0, index)
        self.selected_id = jobs[self.view.selected].id if self.view.selected < len(jobs) else None

    def _job_key(self, name):
        view = self.view
        snap = self.snap
        numbers = [a.n for a in (snap.attempts or [])] if snap else []
        page = max(1, self.layout.get("output_rows", 10))
        if name in ("esc", "backspace", "h"):
            view.mode, self.job_id, view.attempt, view.scroll = "list", None, None, 0
            return True
        if name in ("left", "[", "right", "]") and numbers:
            current = snap.attempt.n if snap.attempt is not None else numbers[-1]
            i = numbers.index(current) if current in numbers else len(numbers) - 1
            i = max(0, i - 1) if name in ("left", "[") else min(len(numbers) - 1, i + 1)
            view.attempt = None if i == len(numbers) - 1 else numbers[i]
            view.scroll = 0
            return True
        if name in ("up", "k"):
            view.scroll += 1
        elif name in ("down", "j"):
            view.scroll = max(0, view.scroll - 1)
        elif name == "pgup":
            view.scroll += page
        elif name == "pgdown":
            view.scroll = max(0, view.scroll - page)
        elif name in ("home", "g"):
            view.scroll = self.layout["max_scroll"]
        elif name in ("end", "G", "f"):
            view.scroll = 0
        view.scroll = min(view.scroll, self.layout["max_scroll"])
        return False

    # --- actions --------------------------------------------------------------------------

    def _target(self):
        if self.snap is None:
            return None
        if self.view.mode == "job":
            return self.snap.job
        jobs = self.snap.jobs or []
        return jobs[self.view.selected] if 0 <= self.view.selected < min(len(jobs), self.rows) else None

    def _ask(self, name):
        job = self._target()
        if name == "p":
            queue = self.queue or (job.queue if job is not None else None)
            if queue is None:
                return self.say("select a job first: p pauses or resumes its queue", "error")
            paused = (self.snap.queues or {}).get(queue, {}).get("paused", False)
            if paused:
                question = "Resume queue %s?" % queue
            else:
                question = "Pause queue %s (running jobs finish, nothing new starts)?" % queue
            self.asked = (question, lambda now: self._pause(queue, not paused))
        elif job is None:
            return self.say("no job selected", "error")
        elif name in ("r", "R"):
            if job.state != "dead":
                return self.say("job %s is %s: only a dead job can be retried" % (job.id, job.state), "error")
            reset = name == "R"
            question = "Retry dead job %s %s?" % (job.id, "with its attempts reset" if reset else "for one more run")
            self.asked = (question, lambda now: self._retry(job.id, now, reset))
        elif name == "c":
            if job.state not in ACTIVE_STATES:
                return self.say("job %s is already %s" % (job.id, job.state), "error")
            what = "kill its process tree" if job.state == "processing" else "it will not run"
            self.asked = ("Cancel job %s (%s)?" % (job.id, what), lambda now: self._cancel(job.id, now))
        elif name == "e":
            if job.state not in FINAL_STATES:
                return self.say("job %s is %s: only a finished job is enqueued again" % (job.id, job.state), "error")
            self.asked = ("Enqueue job %s again, as a new job?" % job.id, lambda now: self._again(job.id, now))
        self.say(self.asked[0] + "  y: yes, any other key: no", "ask")

    def _act(self, action):
        try:
            self.say(action(time.time()), "ok")
        except QueuectlError as e:
            self.say("error: %s" % e, "error")
        return True

    def _retry(self, job_id, now, reset):
        self.store.retry_dead(job_id, now, reset_attempts=reset)
        return "job %s moved back to pending%s" % (job_id, " with its attempts reset" if reset else " for one more run")

    def _cancel(self, job_id, now):
        if self.store.cancel(job_id, now) == "requested":
            return "cancel requested: the worker of job %s kills its process tree" % job_id
        return "job %s cancelled" % job_id

    def _again(self, job_id, now):
        job = _get_job(self.store, job_id)
        return "job %s enqueued again as job %s" % (job_id, enqueue_again(self.store, job, now))

    def _pause(self, queue, paused):
        self.store.set_queue(queue, paused=paused)
        return "queue %s %s" % (queue, "paused" if paused else "resumed")


class _TopSignal(BaseException):
    """SIGTERM or SIGHUP reached `top`, or its terminal went away: leave as after q.  (Not an
    Exception, so that no ``except Exception`` on the way swallows it, as KeyboardInterrupt.)"""


_TOP_KEYS = {10: "enter", 13: "enter", 27: "esc", 9: "tab", 127: "backspace", 8: "backspace"}


def _top_key_name(code, curses):
    names = {curses.KEY_UP: "up", curses.KEY_DOWN: "down", curses.KEY_LEFT: "left", curses.KEY_RIGHT: "right",
             curses.KEY_PPAGE: "pgup", curses.KEY_NPAGE: "pgdown", curses.KEY_HOME: "home", curses.KEY_END: "end",
             curses.KEY_ENTER: "enter", curses.KEY_BACKSPACE: "backspace", curses.KEY_BTAB: "btab",
             curses.KEY_RESIZE: "resize"}
    if code in names:
        return names[code]
    if code in _TOP_KEYS:
        return _TOP_KEYS[code]
    return chr(code) if 32 <= code < 127 else ""


class _TopPalette:
    """Styles (space-separated words such as "state:dead sel") -> curses attributes: colours
    when wanted and available, else plain attributes (bold, reverse, underline, dim)."""

    COLORS = {"state:pending": "YELLOW", "state:processing": "CYAN", "state:completed": "GREEN",
              "state:failed": "MAGENTA", "state:dead": "RED", "state:waiting": "BLUE", "spark:ok": "GREEN",
              "spark:failed": "RED", "error": "RED", "ok": "GREEN"}
    PLAIN = {"state:dead": "A_BOLD", "state:failed": "A_BOLD", "state:cancelled": "A_DIM", "error": "A_BOLD",
             "ok": "A_BOLD"}
    ATTRS = {"title": "A_REVERSE", "head": "A_BOLD", "colhead": "A_UNDERLINE", "sel": "A_REVERSE",
             "tab-on": "A_REVERSE", "key": "A_BOLD", "num": "A_BOLD", "dim": "A_DIM", "ask": "A_REVERSE",
             "label": "A_NORMAL"}

    def __init__(self, curses, color):
        self.curses = curses
        self.pairs = {}
        self.cache = {}
        if color and curses.has_colors():
            curses.start_color()
            background = -1
            try:
                curses.use_default_colors()
            except curses.error:
                background = curses.COLOR_BLACK
            for i, name in enumerate(sorted(set(self.COLORS.values())), 1):
                curses.init_pair(i, getattr(curses, "COLOR_" + name), background)
                self.pairs[name] = curses.color_pair(i)

    def attr(self, style):
        found = self.cache.get(style)
        if found is None:
            found = 0
            for word in style.split():
                if word in self.ATTRS:
                    found |= getattr(self.curses, self.ATTRS[word])
                if self.pairs and word in self.COLORS:
                    found |= self.pairs[self.COLORS[word]]
                elif not self.pairs and word in self.PLAIN:
                    found |= getattr(self.curses, self.PLAIN[word])
            self.cache[style] = found
        return found


def _top_draw(screen, curses, lines, palette):
    screen.erase()
    for y, spans in enumerate(lines):
        x = 0
        for text, style in spans:
            if text:
                try:
                    screen.addstr(y, x, text, palette.attr(style))
                except curses.error:  # the bottom right cell: written, but the cursor cannot move on
                    pass
                x += _cells(text)
    screen.noutrefresh()
    curses.doupdate()


def _top_plain(spans, color):
    """A frame's line as text for ``--once``: ANSI colours for the states with ``color``."""
    if not color:
        return "".join(t for t, _ in spans).rstrip()
    out = []
    for text, style in spans:
        words = style.split()
        code = next((STATE_COLORS[w[6:]] for w in words if w.startswith("state:") and w[6:] in STATE_COLORS), None)
        if "head" in words or "title" in words:
            code = "1" if code is None else code + ";1"
        out.append("\x1b[%sm%s\x1b[0m" % (code, text) if code and text.strip() else text)
    return "".join(out).rstrip()


def _top_unicode(stream):
    return (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "") == "utf8"


def top_once(store, args):
    """`top --once`: one frame as plain text on stdout, the terminal's size or 80x24."""
    import shutil

    columns, lines = shutil.get_terminal_size((TOP_MIN_SIZE[0], TOP_MIN_SIZE[1]))
    width, height = max(TOP_MIN_SIZE[0], columns), max(TOP_MIN_SIZE[1], lines)
    view = TopView(selected=-1, once=True, interval=args.interval)
    snap = top_snapshot(store, time.time(), db_label(args.db_path), args.queue, args.state, limit=height)
    frame, _ = render_top(snap, view, width, height, _top_unicode(sys.stdout))
    while frame and not frame[-1]:
        frame.pop()
    color = use_color(sys.stdout)
    sys.stdout.write("".join(_top_plain(line, color) + "\n" for line in frame))
    return EXIT_OK


def run_top(store, args):
    """The live view: curses, imported here only; the terminal is given back whatever happens
    (q, Ctrl-C, SIGTERM, SIGHUP, an error)."""
    import locale

    try:
        import curses
    except ImportError:
        raise QueuectlError("this Python has no curses module: use queuectl top --once") from None
    locale.setlocale(locale.LC_ALL, "")
    os.environ.setdefault("ESCDELAY", "25")  # Esc goes back at once, not after a second
    uni = locale.nl_langinfo(locale.CODESET).lower().replace("-", "") == "utf8"  # what curses writes in
    app = TopApp(store, db_label(args.db_path), args.queue, args.state, args.interval, uni)
    app.limit = max(TOP_MIN_SIZE[1], os.get_terminal_size(sys.stdout.fileno()).lines)
    app.refresh(force=True)  # a database error shows before the screen is taken
    if app.snap is None:
        raise DatabaseBusy(app.view.status)

    def on_signal(signum, frame):
        raise _TopSignal()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    screen = None
    try:
        try:
            screen = curses.initscr()
        except curses.error as e:
            raise QueuectlError("cannot use this terminal (TERM=%s: %s): use queuectl top --once"
                                % (os.environ.get("TERM", ""), e)) from None
        curses.noecho()
        curses.cbreak()
        screen.keypad(True)
        with contextlib.suppress(curses.error):
            curses.curs_set(0)
        palette = _TopPalette(curses, use_color(sys.stdout))
        next_look = time.monotonic() + args.interval
        early = 0  # getch() answering "no key" long before its time: the terminal is gone (no SIGHUP came)
        while True:
            height, width = screen.getmaxyx()
            _top_draw(screen, curses, app.frame(width, height), palette)
            wait = max(0, int((next_look - time.monotonic()) * 1000))
            screen.timeout(wait)
            asked = time.monotonic()
            code = screen.getch()
            early = early + 1 if code == -1 and wait >= 100 and time.monotonic() - asked < wait / 2000.0 else 0
            if early > 50:
                raise _TopSignal()
            if code != -1:
                name = _top_key_name(code, curses)
                if name == "resize":
                    curses.update_lines_cols()
                    screen.clear()
                    app.limit = max(app.limit, screen.getmaxyx()[0])
                    app.refresh(force=True)
                    continue
                answer = app.key(name)
                if answer is None:
                    break
                if answer:
                    app.refresh(force=True)
            if time.monotonic() >= next_look:
                app.refresh()
                next_look = time.monotonic() + args.interval
    except (KeyboardInterrupt, _TopSignal):
        pass
    finally:
        if screen is not None:
            with contextlib.suppress(Exception):
                screen.keypad(False)
                curses.nocbreak()
                curses.echo()
            with contextlib.suppress(Exception):  # (a terminal that went away cannot be restored)
                curses.endwin()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return EXIT_OK


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
    """argparse makes a formatter for every argument it adds (to check its
    metavar), and each one asks the terminal for its width: ask once."""

    _columns = (None, None)  # ($COLUMNS, width) of the last ask

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        if width is None:
            env = os.environ.get("COLUMNS")
            if _Formatter._columns[1] is None or _Formatter._columns[0] != env:
                import shutil

                _Formatter._columns = (env, shutil.get_terminal_size().columns - 2)
            width = _Formatter._columns[1]
        super().__init__(prog, indent_increment, max_help_position, width)


class ArgParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # "-1d", "-1e3", "-5" are values (no option of ours starts with a digit), so the option that
        # takes them can say what is wrong with them instead of "expected one argument".
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message):
        self.print_usage(sys.stderr)
        if len(message) > 300:  # argparse quotes the offending value whole, however long
            message = message[:297] + "..."
        raise SystemExit(_fail("%s" % message, EXIT_USAGE))


def _fail(message, code):
    sys.stderr.write("queuectl: error: %s\n" % safe_text(message).replace("\n", " "))
    return code


class _LeftOut:
    """Stands in for a subcommand's parser that build_parser(only=...) does not build: every
    method call on it, and on what those return, does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: self


def command_word(argv):
    """The subcommand named in ``argv`` (global options skipped), or None."""
    args = iter(argv)
    for arg in args:
        if arg in ("--db", "--color"):
            next(args, None)
        elif arg.startswith(("--db=", "--color=")) or arg in ("-v", "--verbose"):
            continue
        else:
            return None if arg.startswith("-") else arg
    return None


def build_parser(only=None):
    """The CLI's parser.  With ``only``, the name of a subcommand, the other subcommands are
    left out: argparse builds each of the thirty parsers, with every option and help text, in
    about 0.1 ms, and one command needs one (bench/: CLI start-up).  An unknown name builds all
    of them, so that the error lists the choices."""
    if only is not None:
        parser = _build_parser(only)
        if parser is not None:
            return parser
    return _build_parser(None)


def _build_parser(only):
    built = []
    common = ArgParser(add_help=False)
    common.add_argument("--db", default=argparse.SUPPRESS, metavar="PATH",
                        help="database file, or a postgresql://USER@HOST/DB[?schema=NAME] URL "
                             "(default: $QUEUECTL_DB, else the per-user data directory)")
    common.add_argument("--color", default=argparse.SUPPRESS, choices=("auto", "always", "never"), metavar="WHEN",
                        help="colour states: auto (default: on a terminal, unless NO_COLOR is set; FORCE_COLOR "
                             "forces it), always or never")
    p = ArgParser(prog="queuectl", description="A background job queue for shell commands.",
                  epilog=EPILOG_MAIN, formatter_class=_Formatter, parents=[common])
    p.add_argument("--version", action="version", version="queuectl " + __version__)
    p.add_argument("-v", "--verbose", action="store_true", help="log more (to stderr)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name, help, epilog, parent=sub, **kw):
        if parent is sub:
            if only is not None and name != only:
                return _LeftOut()
            built.append(name)
        return parent.add_parser(name, help=help, description=help, epilog="examples:\n" + epilog,
                                 formatter_class=_Formatter, parents=[common], **kw)

    def utc_flag(sp):
        sp.add_argument("--utc", action="store_true", help="times as UTC stamps (as when piped), not '3m ago'")

    def json_flag(sp):
        sp.add_argument("--json", action="store_true", help="print one JSON document and nothing else")

    e = add("enqueue", "add a job (JSON, @file, - for JSON Lines on stdin, or -- COMMAND)", """\
  queuectl enqueue '{"id":"backup","command":"tar czf /tmp/etc.tgz /etc","timeout":600}'
  queuectl enqueue -p high -- tar czf /backup/etc.tgz /etc
  queuectl enqueue --delay 60 -- 'make -C /srv/app report'
  queuectl enqueue @jobs.json
  printf '%s\\n' '{"command":"true"}' '{"command":"false"}' | queuectl enqueue -

  queuectl enqueue -q reports --after build1,build2 -- ./make-report.sh
  queuectl enqueue --unique-key nightly-sync -- rsync -a /srv/ backup:/srv/

Prints the id of each job added, one per line (for a --unique-key already
queued: the id of the job that holds it).  Job fields: id, command, priority
(high|medium|low), timeout, max_retries, run_at (RFC 3339), delay (seconds),
cwd, env, queue, after, unique_key, webhook.  Options override the same fields
in the JSON.  Durations take s/m/h/d/w suffixes (90, 90s, 15m, 2h).""")
    e.add_argument("spec", nargs="?", metavar="JOB",
                   help="a JSON object, @FILE (a JSON object, array or JSON Lines), or - (JSON Lines on stdin)")
    add_job_options(e)
    e.add_argument("--id", dest="job_id", help="job id (default: generated)")
    e.add_argument("--delay", type=_duration_arg, metavar="DURATION", help="start no earlier than this from now")
    e.add_argument("--run-at", metavar="TIME", help="start no earlier than this RFC 3339 time")
    e.add_argument("-a", "--after", metavar="ID[,ID...]",
                   help="wait until these jobs completed (cancelled if one ends dead or cancelled)")

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
    ws.add_argument("--queue", metavar="NAME[,NAME...]", help="serve only these queues (default: all)")
    ws.add_argument("-b", "--burst", action="store_true",
                    help="run in the foreground until no job is due, then exit (for cron and CI); "
                         "says nothing when nothing is due")
    ws.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    ws.add_argument("--log-file", metavar="PATH",
                    help="log here (default: stderr in the foreground, next to the database when detached)")
    ws.add_argument("--poll-interval", type=float, metavar="SECONDS", help=argparse.SUPPRESS)
    wst = add("stop", "stop this host's workers: finish running jobs, then exit", """\
  queuectl worker stop
  queuectl worker stop --timeout 5m
  queuectl worker stop --force""", parent=wsub)
    wst.add_argument("--force", action="store_true",
                     help="stop now: kill running jobs' process trees and put the jobs back (no retry used)")
    wst.add_argument("--timeout", type=_duration_arg, default=STOP_WAIT, metavar="DURATION",
                     help="wait this long for running jobs before a cold stop (default %gs)" % STOP_WAIT)
    wss = add("status", "show workers", "  queuectl worker status\n  queuectl worker status --json", parent=wsub)
    json_flag(wss)

    s = add("status", "show job counts by state, workers and the database in use",
            "  queuectl status\n  queuectl status --json")
    json_flag(s)

    ls = add("list", "list jobs, most recently updated last", """\
  queuectl list
  queuectl list --state pending
  queuectl list -s pending,failed --queue reports
  queuectl list -s dead -l 10 --json""")
    ls.add_argument("-s", "--state", type=_states_arg, action="extend", metavar="STATE[,STATE...]",
                    help="only these states (repeatable): " + ", ".join(STATES))
    ls.add_argument("--queue", metavar="NAME", help="only this queue's jobs")
    ls.add_argument("-l", "--limit", type=_limit_arg, default=100, metavar="N", help="at most N jobs (default 100)")
    utc_flag(ls)
    json_flag(ls)

    g = add("get", "show one job with its attempt history", "  queuectl get hello\n  queuectl get hello --json")
    g.add_argument("job_id", metavar="ID")
    utc_flag(g)
    json_flag(g)

    lg = add("logs", "print the captured output of a job's run", """\
  queuectl logs hello              # the latest run
  queuectl logs hello --run 1
  queuectl logs build1 --follow""")
    lg.add_argument("job_id", metavar="ID")
    lg.add_argument("-n", "--run", "-a", "--attempt", dest="attempt", type=_positive_int, metavar="N",
                    help="run number, as in `get` (default: the latest)")
    lg.add_argument("-f", "--follow", action="store_true",
                    help="stream the output as it is written, across retries, until the job ends "
                         "(exit status as for wait)")

    d = add("dlq", "the dead letter queue: jobs that used up their retries", """\
  queuectl dlq list
  queuectl dlq retry job1 --reset-attempts
  queuectl dlq clear""")
    dsub = d.add_subparsers(dest="dlq_command", metavar="ACTION")
    dsub.required = True
    dl = add("list", "list dead jobs", "  queuectl dlq list\n  queuectl dlq list --json", parent=dsub)
    dl.add_argument("-l", "--limit", type=_limit_arg, default=100, metavar="N", help="at most N jobs (default 100)")
    utc_flag(dl)
    json_flag(dl)
    dr = add("retry", "run dead jobs once more (their full budget with --reset-attempts)",
             "  queuectl dlq retry job1\n  queuectl dlq retry job1 job2 -r\n  queuectl dlq retry --all", parent=dsub)
    dr.add_argument("job_ids", nargs="*", metavar="ID")
    dr.add_argument("--all", action="store_true", help="every job in the dead letter queue")
    dr.add_argument("-r", "--reset-attempts", action="store_true", help="give the jobs their whole retry budget again")
    dc = add("clear", "delete every dead job", "  queuectl dlq clear\n  queuectl dlq clear --yes   # from a script",
             parent=dsub)
    dc.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")

    c = add("config", "show and change settings (running workers apply changes from their next job)", """\
  queuectl config show
  queuectl config get max-retries
  queuectl config set backoff-base 3""")
    csub = c.add_subparsers(dest="config_command", metavar="ACTION")
    cs = add("show", "show every setting (also: `config list`, or `config` alone)",
             "  queuectl config show\n  queuectl config show --json", parent=csub, aliases=["list"])
    json_flag(cs)
    cg = add("get", "print one setting", "  queuectl config get job-timeout", parent=csub)
    cg.add_argument("key", metavar="KEY")
    cset = add("set", "change one setting", """\
  queuectl config set max-retries 5
  queuectl config set job-timeout 600
  queuectl config set worker-poll-interval 2.0

""" + settings_help(), parent=csub)
    cset.add_argument("key", metavar="KEY")
    cset.add_argument("value", metavar="VALUE")

    cl = add("clear", "delete jobs (all but running ones, or one state)", """\
  queuectl clear --state completed
  queuectl clear --yes              # everything but running jobs""")
    cl.add_argument("-s", "--state", type=_state_arg, metavar="STATE", help="only jobs in this state")
    cl.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")

    for name, text, epilog in (
            ("dashboard", "serve the live dashboard and HTTP API (http://127.0.0.1:5000/ by default)", """\
  queuectl dashboard                        # open the http://127.0.0.1:5000/?token=... it prints
  queuectl dashboard --port 8080 --read-only
  queuectl dashboard --host 0.0.0.0 --token-file ~/.config/queuectl/token

Runs in the foreground until Ctrl-C or SIGTERM; prints its URL on stdout.
Every request needs the token (other users of this machine can reach
loopback too): open the printed URL once, or send Authorization: Bearer."""),
            ("up", "run workers and the dashboard together in the foreground", """\
  queuectl up                               # 1 worker, dashboard on http://127.0.0.1:5000/
  queuectl up --count 4 --port 8080

Ctrl-C or SIGTERM: running jobs finish, then everything exits (a second one
stops the jobs now and puts them back in the queue).""")):
        dp = add(name, text, epilog)
        if name == "up":
            dp.add_argument("-c", "--count", type=int, default=1, metavar="N", help="number of workers (default 1)")
            dp.add_argument("--poll-interval", type=float, metavar="SECONDS", help=argparse.SUPPRESS)
        dp.add_argument("--host", default=DASHBOARD_HOST,
                        help="address to listen on (default %s; any other needs a token)" % DASHBOARD_HOST)
        dp.add_argument("--port", type=_port_arg, default=DASHBOARD_PORT,
                        help="port to listen on (default %d; 0 = any free port)" % DASHBOARD_PORT)
        dp.add_argument("--read-only", action="store_true", help="refuse every change (enqueue, retry, clear)")
        tok = dp.add_mutually_exclusive_group()
        tok.add_argument("--token", metavar="TOKEN",
                         help="the token every request needs (default $%s, else a new random one "
                              "in the printed URL)" % TOKEN_ENV)
        tok.add_argument("--token-file", metavar="PATH",
                         help="read the token from this file (yours, not readable by others)")
        dp.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="also answer to this host name, e.g. behind a reverse proxy (repeatable)")

    st = add("stats", "throughput, success rate and run times per queue", """\
  queuectl stats
  queuectl stats --since 24h --json

FAILED counts failed runs (non-zero exit, timeout, could not start), each
retry included; SUCCESS is completed / (completed + failed).  P95 RUN comes from
a histogram with 25% wide buckets and is an upper bound.""")
    st.add_argument("--since", type=_duration_arg, default=3600.0, metavar="DURATION",
                    help="the period to cover (default 1h)")
    json_flag(st)
    add("metrics", "print the Prometheus metrics (the same as the dashboard's /metrics)",
        "  queuectl metrics | grep queuectl_jobs")
    cp = add("completion", "print a shell completion script (bash, zsh or fish)", """\
  queuectl completion bash > ~/.local/share/bash-completion/completions/queuectl
  queuectl completion zsh > ~/.zfunc/_queuectl     # with fpath+=(~/.zfunc) in ~/.zshrc
  queuectl completion fish > ~/.config/fish/completions/queuectl.fish""")
    cp.add_argument("shell", choices=("bash", "zsh", "fish"), metavar="SHELL", help="bash, zsh or fish")

    tp = add("top", "a live view of the queue in the terminal: counts, workers, jobs, output", """\
  queuectl top
  queuectl top --queue reports --interval 2
  queuectl top --once --state dead        # one frame as plain text, for scripts

Keys: 1-9 filter the jobs (all, pending, processing, failed, dead, scheduled,
waiting, completed, cancelled), Enter opens a job with its attempts and live
output, r retries a dead job, c cancels, e enqueues a finished job again,
p pauses or resumes its queue (each asks for y first), ? shows every key,
q or Ctrl-C leaves.  Needs a terminal of 80x24 or more.""")
    tp.add_argument("-q", "--queue", metavar="NAME", help="list only this queue's jobs")
    tp.add_argument("-n", "--interval", type=_interval_arg, default=1.0, metavar="SECONDS",
                    help="look for changes this often (default 1; 0.1 to 3600)")
    tp.add_argument("-s", "--state", choices=TOP_FILTERS, default="all", metavar="FILTER",
                    help="the jobs list's first filter: " + ", ".join(TOP_FILTERS) + " (default all)")
    tp.add_argument("--once", action="store_true", help="print one frame as plain text and exit")

    rs = add("restart", "queue finished jobs (completed, cancelled or dead) again, keeping their history", """\
  queuectl restart build-42
  queuectl rerun nightly-1 nightly-2      # the same

Each job goes back to pending with its whole retry budget; its runs so far
stay in `get`, and the next one is numbered on.  Pending, waiting and running
jobs are refused (cancel a running one first).""", aliases=["rerun"])
    rs.add_argument("job_ids", nargs="+", metavar="ID")

    cn = add("cancel", "cancel jobs: waiting ones at once, running ones by killing their process tree", """\
  queuectl cancel backup-42
  queuectl cancel job1 job2 job3""")
    cn.add_argument("job_ids", nargs="+", metavar="ID")

    wt = add("wait", "block until jobs finish (completed, dead or cancelled)", """\
  queuectl wait build1 && echo built
  queuectl wait job1 job2 --timeout 10m

Exit status: for one job its own exit code (0 when completed, 1 when it was
cancelled or killed); for several, 0 if all completed, else 1; 124 on timeout.""")
    wt.add_argument("job_ids", nargs="+", metavar="ID")
    wt.add_argument("--timeout", type=_duration_arg, metavar="DURATION", help="give up after this long (exit 124)")
    wt.add_argument("--quiet", action="store_true", help="print nothing")

    pg = add("purge", "delete finished jobs older than a given age (statistics are kept)", """\
  queuectl purge --state completed --older-than 7d
  queuectl purge --older-than 30d          # completed, dead and cancelled
  queuectl config set retention 7d         # purge completed/cancelled automatically""")
    pg.add_argument("-s", "--state", action="append", choices=list(FINAL_STATES), metavar="STATE",
                    help="completed, dead or cancelled (repeatable; default: all three)")
    pg.add_argument("--older-than", type=_duration_arg, required=True, metavar="DURATION",
                    help="finished at least this long ago, e.g. 12h, 7d")

    qu = add("queue", "named queues: concurrency limits and pausing", """\
  queuectl queue list
  queuectl queue set-limit reports 2      # at most 2 running at once, across all workers
  queuectl queue set-limit reports none
  queuectl queue pause reports            # running jobs finish; nothing new starts
  queuectl queue resume reports""")
    qsub = qu.add_subparsers(dest="queue_command", metavar="ACTION")
    qsub.required = True
    ql = add("list", "queues with their limit, state and job counts", "  queuectl queue list --json", parent=qsub)
    json_flag(ql)
    qs = add("set-limit", "set how many jobs of a queue may run at once (none = no limit)",
             "  queuectl queue set-limit reports 2", parent=qsub)
    qs.add_argument("name", metavar="NAME")
    qs.add_argument("limit", metavar="N|none")
    qs.add_argument("--create", action="store_true", help="the queue is new: no job has used it yet")
    for action, text in (("pause", "stop starting jobs from a queue"), ("resume", "start jobs from a queue again")):
        qa = add(action, text, "  queuectl queue %s reports" % action, parent=qsub)
        qa.add_argument("name", metavar="NAME")
        qa.add_argument("--create", action="store_true", help="the queue is new: no job has used it yet")

    sc = add("schedule", "recurring jobs from cron expressions", """\
  queuectl schedule add nightly '0 3 * * *' -p high -t 1h -- /usr/local/bin/backup.sh
  queuectl schedule add report @hourly --tz Europe/Berlin -- make -C /srv report
  queuectl schedule list
  queuectl schedule pause nightly""")
    ssub = sc.add_subparsers(dest="schedule_command", metavar="ACTION")
    ssub.required = True
    sa = add("add", "add a schedule: NAME 'CRON' [job options] -- COMMAND", """\
  queuectl schedule add nightly '0 3 * * *' -- /usr/local/bin/backup.sh
  queuectl schedule add sync '*/15 * * * *' --overlap allow --missed skip -- ./sync.sh

CRON is five fields (minute hour day-of-month month day-of-week) with *, lists,
ranges, steps and names (jan, mon), or @yearly, @monthly, @weekly, @daily,
@hourly.  Evaluated in UTC unless --tz says otherwise.""", parent=ssub)
    sa.add_argument("name", metavar="NAME")
    sa.add_argument("cron", metavar="CRON")
    add_job_options(sa)
    sa.add_argument("--tz", default="UTC", metavar="ZONE", help="UTC (default), local, or a name like Europe/Berlin")
    sa.add_argument("--missed", choices=["once", "skip"], default="once",
                    help="ticks missed while nothing ran: run once (default) or skip")
    sa.add_argument("--overlap", choices=["skip", "allow"], default="skip",
                    help="when the previous run is unfinished: skip this tick (default) or allow")
    sl = add("list", "list schedules with their next run", "  queuectl schedule list --json", parent=ssub)
    utc_flag(sl)
    json_flag(sl)
    for action, text in (("remove", "delete a schedule (its jobs stay)"), ("pause", "stop firing a schedule"),
                         ("resume", "fire a schedule again, from its next tick")):
        sx = add(action, text, "  queuectl schedule %s nightly" % action, parent=ssub)
        sx.add_argument("name", metavar="NAME")
    return p if built or only is None else None


def add_job_options(parser):
    """Options that describe a job, shared by `enqueue` and `schedule add`."""
    parser.add_argument("-p", "--priority", choices=list(PRIORITIES), help="high, medium (default) or low")
    parser.add_argument("-t", "--timeout", type=_timeout_arg, metavar="DURATION",
                        help="kill the job after this long; 0 or none: no limit (default: job-timeout, 300s)")
    parser.add_argument("-r", "--max-retries", type=int, metavar="N", help="retries after the first run")
    parser.add_argument("-q", "--queue", metavar="NAME", help="named queue (default: %s)" % DEFAULT_QUEUE)
    parser.add_argument("--unique-key", metavar="KEY",
                        help="while a job with this key is unfinished, add nothing and print that job's id")
    parser.add_argument("--webhook", metavar="URL", help="POST a JSON event here when the job ends")
    parser.add_argument("--cwd", metavar="DIR", help="working directory (default: the current one)")
    parser.add_argument("-e", "--env", action="append", metavar="NAME=VALUE", default=[],
                        help="extra environment variable (repeatable)")


def job_overrides(args):
    """The job fields given as options (they override the same fields of a JSON job)."""
    fields = {"priority": args.priority, "timeout": args.timeout, "max_retries": args.max_retries,
              "queue": args.queue, "unique_key": args.unique_key, "webhook": args.webhook, "cwd": args.cwd}
    for name in ("delay", "run_at", "after"):
        fields[name] = getattr(args, name, None)
    if getattr(args, "job_id", None) is not None:
        fields["id"] = args.job_id
    overrides = {k: v for k, v in fields.items() if v is not None}
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            raise InvalidInput("--env wants NAME=VALUE, got %s" % short_json(item))
        env[name] = value
    if env:
        overrides["env"] = env
    return overrides


def _duration_arg(text):
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError("%s: got %s" % (e, short_json(text)))


def _timeout_arg(text):
    return 0.0 if str(text).strip().lower() == "none" else _duration_arg(text)


def _int_arg(lo, hi, what="a whole number"):
    """An argparse type: an integer from ``lo`` to ``hi``."""
    def parse(text):
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("must be %s, got %s" % (what, short_json(text)))
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError("must be from %d to %d, got %d" % (lo, hi, n))
        return n
    return parse


def _interval_arg(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a number of seconds, got %s" % short_json(text))
    if not 0.1 <= value <= 3600:  # (NaN fails this too)
        raise argparse.ArgumentTypeError("must be from 0.1 to 3600 seconds, got %s" % short_json(text))
    return value


_port_arg = _int_arg(0, 65535, "a port number")
_limit_arg = _int_arg(1, 1000000)
_positive_int = _int_arg(1, 2 ** 31)


def _states_arg(text):
    """-s STATE[,STATE...] (repeatable: the lists add up)."""
    return [_state_arg(t.strip()) for t in text.split(",") if t.strip()] or [_state_arg(text)]


def _state_arg(text):
    if text not in STATES:
        raise argparse.ArgumentTypeError("unknown state %s (choose from %s)" % (short_json(text), ", ".join(STATES)))
    return text


# --- helpers -----------------------------------------------------------------------


def resolve_db(args):
    db = getattr(args, "db", None) or os.environ.get("QUEUECTL_DB")
    if db:
        return db
    path = default_db_path()
    directory = os.path.dirname(path)
    try:
        make_private_dir(directory)
        st = os.stat(directory)
        if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & ~private_mode(directory=True):
            os.chmod(directory, stat.S_IMODE(st.st_mode) & private_mode(directory=True))  # an older queuectl's 0755
    except OSError as e:
        raise DatabaseError("cannot create data directory %s: %s" % (directory, e.strerror))
    return path


def confirm(question, args):
    if getattr(args, "yes", False):
        return True
    if not sys.stdin.isatty():
        raise InvalidInput("refusing to %s without confirmation: add --yes" % question)
    sys.stderr.write("%s? [y/N] " % question.capitalize())
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


class JobDocuments(list):
    """Job objects read from one input, with a label for each ("line 3") for error messages."""

    def __init__(self, docs, labels):
        super().__init__(docs)
        self.labels = labels


def parse_json(text, where):
    """json.loads with a one-line InvalidInput for any malformed input (including absurd nesting)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidInput("%sinvalid JSON: %s (line %d column %d)" % (where, e.msg, e.lineno, e.colno)) from None
    except ValueError as e:  # not a JSONDecodeError: a number too long to convert (Python's digit limit)
        raise InvalidInput("%sinvalid JSON: %s" % (where, str(e).split(";")[0])) from None
    except RecursionError:
        raise InvalidInput("%sinvalid JSON: nested too deeply" % where) from None


def parse_job_documents(text, source):
    """A JSON object, a JSON array of objects, or JSON Lines -> JobDocuments."""
    stripped = text.strip()
    if not stripped:
        raise InvalidInput("%s holds no job" % source)
    try:
        doc = parse_json(stripped, "")
    except InvalidInput:
        docs, labels = [], []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            docs.append(parse_json(line, "%s line %d: " % (source, number)))
            labels.append("%s line %d" % (source, number))
        return JobDocuments(docs, labels)
    if isinstance(doc, list):
        if not doc:
            raise InvalidInput("%s holds an empty list" % source)
        return JobDocuments(doc, ["%s job %d" % (source, i) for i in range(1, len(doc) + 1)])
    return JobDocuments([doc], [source])


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
    if not spec.lstrip().startswith(("{", "[")):
        raise InvalidInput("JOB must be a JSON object; to queue a plain command use: queuectl enqueue -- COMMAND")
    doc = parse_json(spec, "")
    if isinstance(doc, list) and doc:
        return JobDocuments(doc, ["job %d" % i for i in range(1, len(doc) + 1)])
    return JobDocuments([doc], [""])


def _decode(data, source):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("%s is not UTF-8 text" % source)


def job_table(jobs, utc, stream=None):
    """Jobs as a table: on a terminal fitted to its width with relative times (a QUEUE column when
    jobs of a named queue are listed), piped with UTC stamps, commands up to 48 characters and the
    same columns whatever the jobs.  A job that is not due yet says when it is ("due in 2h")."""
    stream = stream or sys.stdout
    now = time.time()
    queues = utc or any(j.queue != DEFAULT_QUEUE for j in jobs)  # (piped: always, so scripts see one layout)
    headers = ["ID", "STATE", "PRIORITY" if utc else "PRIO", "ATTEMPTS"] + (["QUEUE"] if queues else []) \
        + ["COMMAND", "UPDATED"]
    rows = []
    for j in jobs:
        if j.state in ("pending", "failed", "waiting") and j.run_at > now + 1:
            updated = "due " + (rfc3339(j.run_at, precise=False) if utc else relative(j.run_at, now))
        else:
            updated = when(j.updated_at, now, utc)
        rows.append([j.id, j.state, j.priority_name, attempts_text(j)] + ([j.queue] if queues else [])
                    + [_one_line(j.command, 48) if utc else j.command, updated])
    table(headers, rows, stream, fit=(("COMMAND", 24), ("ID", 16), ("QUEUE", 8)))


def attempts_text(job):
    """Attempts used of those allowed: "2/4" (runs a lost worker had do not count)."""
    return "%d/%d" % (job.attempts, job.max_retries + 1)


def wants_utc(args, stream=None):
    """UTC stamps instead of relative times: asked for with --utc, or output that is not a terminal."""
    return getattr(args, "utc", False) or not (stream or sys.stdout).isatty()


# --- commands ----------------------------------------------------------------------


def cmd_enqueue(args, store):
    now = time.time()
    cfg = store.config()
    if args.argv_command:
        if args.spec is not None:
            raise InvalidInput("give either a JSON job or a command after --, not both")
        words = args.argv_command
        docs = [{"command": words[0] if len(words) == 1 else shell_join(words)}]
    elif args.spec is None:
        raise InvalidInput("nothing to enqueue: give a JSON job, @FILE, - or -- COMMAND (see queuectl enqueue --help)")
    else:
        docs = _read_spec(args.spec)
    overrides = job_overrides(args)
    env = overrides.pop("env", None)
    if "id" in overrides and len(docs) > 1:
        raise InvalidInput("--id names one job, but %d were given" % len(docs))
    jobs = []
    seen = set()
    for index, doc in enumerate(docs, 1):
        label = docs.labels[index - 1] if isinstance(docs, JobDocuments) else ""
        where = label + ": " if label else ""
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
    existing = []
    ids = store.enqueue(jobs, now, existing=existing)
    sys.stdout.write("".join(i + "\n" for i in ids))
    sys.stdout.flush()
    for jid in existing:
        sys.stderr.write("queuectl: unique key already queued: job %s\n" % jid)
    return EXIT_OK


def cmd_worker(args, store):
    return {"start": cmd_worker_start, "stop": cmd_worker_stop, "status": cmd_worker_status}[args.worker_command](args, store)


def cmd_worker_start(args, store):
    if not 1 <= args.count <= 256:
        raise InvalidInput("--count must be from 1 to 256, got %d" % args.count)
    if store.readonly:
        raise DatabaseError("database %s is read-only: workers need to write to it" % args.db_path)
    db = db_location(args.db_path)
    if args.quiet:
        setup_logging(quiet=True)  # warnings and errors still reach stderr (cron mails them)
    if args.foreground or args.burst:
        if args.burst and not _anything_due(store, time.time()):
            return EXIT_OK  # nothing to do: say nothing (cron would mail every line)
        if args.log_file:
            log_to(open_private_log(args.log_file))
        running = sum(len(ws) for ws in local_worker_groups(store).values())
        if running and not args.burst:
            log.warning("%d worker(s) already run on this database on this host; these %d join them",
                        running, args.count)
        store.close()
        return Supervisor(db, args.count, poll_interval=args.poll_interval, burst=args.burst,
                          queues=_queue_list(args.queue)).run()
    running = sum(len(ws) for ws in local_worker_groups(store).values())
    if running and not args.quiet:
        sys.stderr.write("queuectl: note: %d worker(s) already run on this database on this host; starting %d more "
                         "(`queuectl worker status` lists them)\n" % (running, args.count))
    log_path = args.log_file or os.path.splitext(db)[0] + ".workers.log"
    if is_db_url(db) and not args.log_file:  # a URL has no directory: log to the per-user data directory
        import hashlib

        log_dir = os.path.dirname(default_db_path())
        with contextlib.suppress(OSError):
            make_private_dir(log_dir)
        log_path = os.path.join(log_dir, "workers-%s.log" % hashlib.sha1(db.encode()).hexdigest()[:12])
    logf = open_private_log(log_path)
    # A URL may hold a password: hand it over in the environment, not on the command line `ps` shows.
    env = dict(os.environ, QUEUECTL_DB=db) if is_db_url(db) else None
    argv = self_command() + ([] if env else ["--db", db]) + ["worker", "start", "--foreground", "--count",
                                                             str(args.count)]
    if args.poll_interval:
        argv += ["--poll-interval", str(args.poll_interval)]
    if args.queue:
        argv += ["--queue", ",".join(_queue_list(args.queue))]
    with logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True,
                                close_fds=True, cwd="/", env=env)
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
    sys.stdout.write("started %d worker(s) (supervisor pid %d)\nlog: %s\n" % (len(mine), proc.pid, log_path))
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
    # Workers that died on the way (kill -9, OOM) with their supervisor left their jobs processing:
    # give them back now rather than at the next worker start.
    with contextlib.suppress(DatabaseBusy):
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


def cmd_worker_status(args, store):
    now = time.time()
    workers = worker_views(store, now)
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
    workers = worker_views(store, now)
    live = [w for w in workers if w["state"] != "gone"]
    if args.json:
        print_json({"db": db_label(args.db_path), "version": __version__, "job_counts": counts,
                    "total": sum(counts.values()), "workers": {"running": len(live),
                    "busy": sum(1 for w in live if w["state"] == "busy")}})
        return EXIT_OK
    out = sys.stdout
    out.write("database: %s\n" % db_label(args.db_path))
    out.write("jobs:     %d total\n" % sum(counts.values()))
    for state in STATES:
        out.write("  %s %d\n" % (paint(state.ljust(11), state), counts[state]))
    out.write("workers:  %d running (%d busy)\n" % (len(live), sum(1 for w in live if w["state"] == "busy")))
    return EXIT_OK


def cmd_list(args, store, state=None):
    states = [state] if state else getattr(args, "state", None) or []
    queue = getattr(args, "queue", None)
    if queue is not None:
        queue = validate_name(queue, "queue")
        known = known_queues(store)
        if queue not in known:
            raise NotFound("no queue named %s (known: %s)" % (short_json(queue), ", ".join(sorted(known))))
    jobs, cut = select_jobs(store, states, queue, args.limit)
    if cut:
        sys.stderr.write("queuectl: note: looked at the newest %d jobs only: queue %s may have older ones "
                         "(there is no index by queue)\n" % (LIST_QUEUE_SCAN, queue))
    if args.json:
        print_json([j.to_dict() for j in jobs])
        return EXIT_OK
    if not jobs:
        sys.stdout.write("no %sjobs%s\n" % ("".join(s + " " for s in states[:1]) if len(states) == 1 else "",
                                           " in queue %s" % queue if queue else ""))
        return EXIT_OK
    job_table(jobs, wants_utc(args))
    return EXIT_OK


LIST_QUEUE_SCAN = 100000  # jobs `list --queue` looks at, newest first, before it gives up


def select_jobs(store, states, queue, limit):
    """The ``limit`` most recently updated jobs of these states (all when none) and queue, oldest
    first, and whether the look at one queue stopped short (``Store.queue_page``).  Each state is
    read on its own index and the pages merged: the cost follows ``limit``, not the number of jobs."""
    pages, cut = [], False
    for state in states or [None]:
        if queue is None:
            pages.append(store.list_jobs(state=state, limit=limit))
        else:
            jobs, _, short = store.queue_page(queue, state=state, limit=limit, scan=LIST_QUEUE_SCAN)
            pages.append(jobs)
            cut = cut or short
    newest = sorted((j for page in pages for j in page), key=lambda j: (j.updated_at, j.seq))[-limit:]
    return newest, cut


def _get_job(store, job_id):
    job = store.get(job_id)
    if job is None:
        raise NotFound("no job with id %s" % short_json(job_id))
    return job


def cmd_get(args, store):
    job = _get_job(store, args.job_id)
    attempts = store.attempts(job.id)
    cfg = store.config()
    if args.json:
        doc = job.to_dict()
        seconds, origin = timeout_of(job, cfg)
        doc["effective_timeout"], doc["timeout_from"] = seconds, origin
        doc["webhook_deliveries"] = [dict(d, next_at=rfc3339(d["next_at"]), delivered_at=rfc3339(d["delivered_at"]),
                                          created_at=rfc3339(d["created_at"])) for d in store.job_webhooks(job.id)]
        doc["attempt_history"] = [a.to_dict() for a in attempts]
        print_json(doc)
        return EXIT_OK
    now = time.time()

    def stamp(ts):
        return "%s (%s)" % (rfc3339(ts, False), relative(ts, now))

    fields = [("id", job.id), ("command", job.command), ("state", paint(job.state, job.state)),
              ("queue", job.queue), ("priority", job.priority_name),
              ("attempts", "%d of %d" % (job.attempts, job.max_retries + 1)), ("max_retries", job.max_retries)]
    if job.runs != job.attempts or job.rescues:
        fields.append(("runs", "%d%s" % (job.runs, " (%d lost with a worker)" % job.rescues if job.rescues else "")))
    fields += [("timeout", describe_timeout(job, cfg)), ("created_at", stamp(job.created_at)),
               ("updated_at", stamp(job.updated_at))]
    if job.state in ("pending", "failed", "waiting"):
        fields.append(("next run" if job.state == "failed" else "run_at", stamp(job.run_at)))
    for name, value in (("started_at", job.started_at), ("finished_at", job.finished_at)):
        if value is not None:
            fields.append((name, stamp(value)))
    if job.worker_id:
        fields.append(("worker", job.worker_id))
    if job.exit_code is not None:
        fields.append(("exit_code", job.exit_code))
    if job.last_error:
        fields.append(("last_error", job.last_error))
    fields.append(("cwd", job.cwd))
    if job.env:
        fields.append(("env", " ".join("%s=%s" % kv for kv in sorted(job.env.items()))))
    if job.after:
        states = store.states_of(job.after)
        fields.append(("after", ", ".join("%s (%s)" % (d, states.get(d, ("deleted",))[0]) for d in job.after)))
    for name in ("unique_key", "webhook", "schedule"):
        if getattr(job, name):
            fields.append((name, getattr(job, name)))
    width = max(len(k) for k, _ in fields)
    for k, v in fields:
        sys.stdout.write("%s  %s\n" % (k.ljust(width), v if k == "state" else safe_text(v)))
    utc = wants_utc(args)
    deliveries = store.job_webhooks(job.id)
    if deliveries:
        sys.stdout.write("\nwebhook deliveries:\n")
        table(["URL", "STATE", "TRIES", "NEXT TRY", "ERROR"], [
            [redact_url(d["url"]), d["state"], str(d["attempts"]),
             when(d["next_at"], now, utc) if d["next_at"] is not None else "-", d["last_error"] or ""]
            for d in deliveries], fit=("URL", "ERROR"))
    if attempts:
        sys.stdout.write("\nruns:\n")
        table(["RUN", "STARTED", "DURATION", "OUTCOME", "EXIT", "WORKER", "ERROR"], [
            [str(a.n), when(a.started_at, now, utc), human_duration(a.duration), a.outcome or "running",
             "-" if a.exit_code is None else str(a.exit_code), a.worker_id or "-",
             _one_line(a.error or "", 50) if utc else (a.error or "")]
            for a in attempts], fit=("ERROR", "WORKER"))
    return EXIT_OK


def cmd_logs(args, store):
    job = _get_job(store, args.job_id)
    if args.follow:
        if args.attempt:
            raise InvalidInput("--follow streams the latest attempt; leave out --attempt")
        return follow_output(store, job.id)
    attempt = store.attempt(job.id, args.attempt)
    if attempt is None:
        if args.attempt:
            raise NotFound("job %s has no run %d (it has %d)" % (job.id, args.attempt, job.runs))
        sys.stderr.write("job %s has not run yet\n" % job.id)
        return EXIT_OK
    note, out = split_truncation(attempt.output, attempt.output_bytes)
    if note:
        sys.stderr.write("queuectl: %s (output-limit)\n" % note.strip("[]. "))
    _write_bytes(out.encode("utf-8", "replace"))
    return EXIT_OK


def _write_bytes(data):
    if hasattr(sys.stdout, "buffer"):
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        sys.stdout.write(data.decode("utf-8", "replace"))
        sys.stdout.flush()


def follow_output(store, job_id, poll=0.2):
    """Print a job's output as it is written (workers store it every second), attempt
    after attempt, until the job is completed, dead or cancelled.  Returns the exit status
    `wait` would give."""
    current, printed = None, 0
    while True:
        job = store.get(job_id)
        attempt = store.attempt(job_id) if job else None
        if attempt is not None:
            # A newer attempt started: first the end of the one followed so far (and of any in
            # between), written after the last poll; the retry may start within one poll.
            earlier = [] if current is None else [store.attempt(job_id, n) for n in range(current, attempt.n)]
            for shown in [a for a in earlier if a is not None] + [attempt]:
                if shown.n != current:
                    if current is not None:
                        sys.stderr.write("queuectl: --- run %d ---\n" % shown.n)
                    current, printed = shown.n, 0
                note, text = split_truncation(shown.output, shown.output_bytes)
                data = text.encode("utf-8", "replace")
                new = shown.output_bytes - printed
                if new > 0:
                    if new > len(data):  # more was written than is kept: say so, print what is kept
                        sys.stderr.write("queuectl: %d bytes of output not kept (output-limit)\n" % (new - len(data)))
                        _write_bytes(data)
                    else:
                        _write_bytes(data[-new:])
                    printed = shown.output_bytes
        if job is None:
            sys.stderr.write("queuectl: job %s was deleted\n" % job_id)
            return EXIT_ERROR
        if job.state in FINAL_STATES:
            return wait_exit_status(job.state, job.exit_code)
        time.sleep(poll)


def cmd_dlq(args, store):
    if args.dlq_command == "list":
        return cmd_list(args, store, state="dead")
    if args.dlq_command == "retry":
        return dlq_retry(args, store)
    if not confirm("delete every dead job", args):
        sys.stderr.write("nothing deleted\n")
        return EXIT_ERROR
    n = store.delete_jobs("dead")
    sys.stdout.write("deleted %d dead job(s)\n" % n)
    return EXIT_OK


def dlq_retry(args, store):
    """`dlq retry ID...` (each one reported; the first failure's exit code) or `--all`."""
    if args.all == bool(args.job_ids):
        raise InvalidInput("give the ids of dead jobs, or --all (not both)" if args.all else
                           "give the id of a dead job to retry, or --all for every one")
    how = " with its attempts reset" if args.reset_attempts else " for one more run"
    if args.all:
        retried, skipped = store.retry_all_dead(time.time(), reset_attempts=args.reset_attempts)
        sys.stdout.write("moved %d dead job(s) back to pending%s\n" % (retried, how.replace("its", "their")))
        if skipped:
            sys.stdout.write("%d stayed dead: another unfinished job holds their unique key\n" % skipped)
        return EXIT_OK
    return for_each_job(args.job_ids, lambda job_id: store.retry_dead(job_id, time.time(),
                                                                       reset_attempts=args.reset_attempts),
                        "job %s moved back to pending" + how)


def for_each_job(job_ids, action, done):
    """``action(id)`` for each id, reported one line each (``done % id``, or the error on stderr);
    the exit code of the first failure."""
    code = EXIT_OK
    for job_id in job_ids:
        try:
            validate_id(job_id)
            action(job_id)
        except (InvalidInput, NotFound, Conflict) as e:
            sys.stderr.write("queuectl: error: %s\n" % e)
            code = code or e.exit_code
            continue
        sys.stdout.write(done % job_id + "\n")
    return code


def cmd_restart(args, store):
    return for_each_job(args.job_ids, lambda job_id: store.restart(job_id, time.time()),
                        "job %s queued again, with its whole retry budget (its history is kept)")


def cmd_config(args, store):
    action = args.config_command or "show"
    if action == "set":
        key, value = validate_config(args.key, args.value)
        store.set_config(key, value)
        sys.stdout.write("%s = %s\n" % (key, SETTINGS_BY_NAME[key].show(value)))
        return EXIT_OK
    cfg = store.config()
    if action == "get":
        sys.stdout.write("%s\n" % _fmt_value(cfg[normalize_config_key(args.key)]))
        return EXIT_OK
    if getattr(args, "json", False):
        print_json(cfg)
        return EXIT_OK
    rows = [[s.name, s.show(cfg[s.name]),
             "" if cfg[s.name] == s.default else "(default %s)" % s.show(s.default), s.help] for s in SETTINGS]
    table(["KEY", "VALUE", "", "MEANING"], rows, wrap=("MEANING",))
    return EXIT_OK


def settings_help():
    """What `config set --help` says about every setting: the values it takes, its default and its
    meaning (from SETTINGS)."""
    width = max(len(s.name) for s in SETTINGS) + 2
    lines = ["settings (durations take s/m/h/d/w: 90s, 15m, 7d; sizes K/M/G: 64K, 1M):"]
    for s in SETTINGS:
        if s.kind is str:
            values = "an http:// or https:// URL, or none (default none)"
        else:
            values = "%s (default %s)" % (setting_range(s), s.show(s.default))
        lines += ["  %s%s" % (s.name.ljust(width), values), "  %s%s" % (" " * width, s.help)]
    return "\n".join(lines)


def _fmt_value(v):
    if isinstance(v, float) and v.is_integer():
        return "%d" % v if abs(v) < 1e15 else repr(v)
    return str(v)


def _queue_list(text):
    if not text:
        return None
    return [validate_name(q.strip(), "queue") for q in text.split(",") if q.strip()] or None


def cmd_cancel(args, store):
    now = time.time()
    requested = []
    for job_id in args.job_ids:
        validate_id(job_id)
        if store.cancel(job_id, now) == "requested":
            requested.append(job_id)
        else:
            sys.stdout.write("job %s cancelled\n" % job_id)
    if requested:
        deadline = time.monotonic() + 30
        while requested and time.monotonic() < deadline:
            states = store.states_of(requested)
            for job_id in [j for j in requested if states.get(j, ("?",))[0] != "processing"]:
                requested.remove(job_id)
                state = states.get(job_id, ("deleted",))[0]
                sys.stdout.write("job %s %s\n" % (job_id, "cancelled (its process tree was killed)"
                                                   if state == "cancelled" else "ended %s before it could be cancelled" % state))
            time.sleep(0.05)
        for job_id in requested:
            sys.stdout.write("job %s: cancel requested; its worker will stop it at its next check\n" % job_id)
    return EXIT_OK


WAIT_HINT_AFTER = 3.0  # seconds `wait` waits before it says why nothing runs, if it can tell


def why_not_running(store, job_ids, now):
    """Why these waiting jobs may never start, as lines for a person: no live worker, or a paused queue."""
    if not job_ids:
        return []
    live = [w for w in worker_views(store, now) if w["state"] != "gone"]
    if not live:
        return ["no worker is running on this database, so %s will not start: run `queuectl worker start`"
                % ", ".join(job_ids)]
    paused = {q["name"] for q in store.queues() if q["paused"]}
    lines = []
    for job_id in job_ids:
        job = store.get(job_id)
        if job is not None and job.queue in paused:
            lines.append("job %s is in queue %s, which is paused: `queuectl queue resume %s`"
                         % (job_id, job.queue, job.queue))
    return lines


def wait_exit_status(state, exit_code):
    """Exit status of `wait` for one finished job."""
    if state == "completed":
        return 0
    if state == "dead" and exit_code and 0 < exit_code < 256:
        return exit_code
    return 1


def cmd_wait(args, store):
    for job_id in args.job_ids:
        validate_id(job_id)
    missing = [j for j in args.job_ids if j not in store.states_of(args.job_ids)]
    if missing:
        raise NotFound("no job with id %s" % short_json(missing[0]))
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    hint_at = time.monotonic() + WAIT_HINT_AFTER
    while True:
        states = store.states_of(args.job_ids)
        if all(states.get(j, ("deleted",))[0] in FINAL_STATES + ("deleted",) for j in args.job_ids):
            break
        if hint_at is not None and time.monotonic() >= hint_at:
            hint_at = None
            for line in why_not_running(store, [j for j in args.job_ids if states.get(j, ("",))[0] in
                                                ("pending", "failed", "waiting")], time.time()):
                sys.stderr.write("queuectl: warning: %s\n" % line)
        if deadline is not None and time.monotonic() >= deadline:
            if not args.quiet:
                sys.stderr.write("queuectl: timed out waiting for %s\n" % ", ".join(
                    j for j in args.job_ids if states.get(j, ("",))[0] not in FINAL_STATES))
            return EXIT_TIMEOUT
        time.sleep(0.1)
    if not args.quiet:
        for j in args.job_ids:
            state, code = states.get(j, ("deleted", None))
            why = None if code is None else describe_exit(code)
            if state in ("dead", "cancelled"):
                job = store.get(j)
                why = job.last_error if job is not None and job.last_error else why
            sys.stdout.write("%s %s%s\n" % (j, state, "" if why is None else " (%s)" % _one_line(why, 100)))
    if len(args.job_ids) == 1:
        return wait_exit_status(*states.get(args.job_ids[0], ("deleted", None)))
    return 0 if all(states.get(j, ("",))[0] == "completed" for j in args.job_ids) else 1


def cmd_purge(args, store):
    states = args.state or list(FINAL_STATES)
    n = store.purge(states, time.time() - args.older_than)
    sys.stdout.write("purged %d job(s)\n" % n)
    return EXIT_OK


def cmd_queue(args, store):
    action = args.queue_command
    if action == "list":
        queues = store.queues()
        if args.json:
            print_json(queues)
            return EXIT_OK
        if not queues:
            sys.stdout.write("no queues yet\n")
            return EXIT_OK
        table(["QUEUE", "LIMIT", "STATE", "PENDING", "RUNNING", "WAITING", "FAILED"], [
            [q["name"], "-" if q["max_running"] is None else str(q["max_running"]),
             "paused" if q["paused"] else "active", str(q["counts"].get("pending", 0)),
             str(q["counts"].get("processing", 0)), str(q["counts"].get("waiting", 0)),
             str(q["counts"].get("failed", 0))] for q in queues])
        return EXIT_OK
    name = validate_name(args.name, "queue")
    if action == "set-limit":
        limit = None if args.limit.lower() in ("none", "0", "unlimited") else \
            _validate_number(QUEUE_LIMIT, args.limit)
    known = known_queues(store)
    if name not in known and not args.create:  # a typo would make a queue no job ever uses
        raise NotFound("no queue named %s (known: %s); to set up a new queue before its first job, add --create"
                       % (short_json(name), ", ".join(sorted(known))))
    if action == "set-limit":
        store.set_queue(name, max_running=limit)
        sys.stdout.write("queue %s: %s\n" % (name, "no limit" if limit is None else "at most %d running" % limit))
    else:
        store.set_queue(name, paused=(action == "pause"))
        sys.stdout.write("queue %s %s\n" % (name, "paused" if action == "pause" else "resumed"))
    return EXIT_OK


def known_queues(store):
    """Names of the queues a job, a limit, a pause or a schedule has used."""
    names = {q["name"] for q in store.queues()} | {DEFAULT_QUEUE}
    return names | {sch["spec"].get("queue") or DEFAULT_QUEUE for sch in store.schedules()}


def cmd_schedule(args, store):
    action = args.schedule_command
    now = time.time()
    if action == "add":
        name = validate_name(args.name, "schedule")
        cron = Cron.parse(args.cron)
        tz = resolve_tz(args.tz)
        if not args.argv_command:
            raise InvalidInput("give the command after --: queuectl schedule add NAME 'CRON' -- COMMAND")
        words = args.argv_command
        spec = {"command": words[0] if len(words) == 1 else shell_join(words)}
        spec.update(job_overrides(args))
        job = validate_job(dict(spec, id="check"), store.config(), now)  # refuse a bad job now, not at 3 a.m.
        spec["cwd"] = job["cwd"]
        next_run = cron.next_after(now, tz)
        store.add_schedule(name, args.cron.strip(), args.tz, spec, args.missed, args.overlap, next_run, now)
        sys.stdout.write("schedule %s added; next run %s\n" % (name, rfc3339(next_run, precise=False)))
        return EXIT_OK
    if action == "list":
        rows = store.schedules()
        if args.json:
            print_json([dict(r, next_run=rfc3339(r["next_run"]), last_run=rfc3339(r["last_run"]),
                             created_at=rfc3339(r["created_at"])) for r in rows])
            return EXIT_OK
        if not rows:
            sys.stdout.write("no schedules\n")
            return EXIT_OK
        utc, now = wants_utc(args), time.time()
        table(["NAME", "CRON", "TZ", "NEXT RUN", "LAST JOB", "STATE", "COMMAND"], [
            [r["name"], r["cron"], r["tz"], "paused" if r["paused"] else when(r["next_run"], now, utc),
             r["last_job"] or "-", r["last_state"] or "-", _one_line(r["spec"]["command"], 40) if utc
             else r["spec"]["command"]] for r in rows], fit=("COMMAND", "LAST JOB", "NAME", "CRON"))
        return EXIT_OK
    name = validate_name(args.name, "schedule")
    if action == "remove":
        store.remove_schedule(name)
        sys.stdout.write("schedule %s removed\n" % name)
    elif action == "pause":
        store.pause_schedule(name, True)
        sys.stdout.write("schedule %s paused\n" % name)
    else:
        found = [s for s in store.schedules() if s["name"] == name]
        if not found:
            raise NotFound("no schedule named %s" % short_json(name))
        next_run = schedule_next_run(found[0], now)
        store.pause_schedule(name, False, next_run)
        sys.stdout.write("schedule %s resumed; next run %s\n" % (name, rfc3339(next_run, precise=False)))
    return EXIT_OK


def cmd_clear(args, store):
    if args.state is None and not confirm("delete every job except running ones", args):
        sys.stderr.write("nothing deleted\n")
        return EXIT_ERROR
    n = store.delete_jobs(args.state)
    sys.stdout.write("deleted %d job(s)\n" % n)
    return EXIT_OK


def cmd_stats(args, store):
    now = time.time()
    until = int(now // 60)
    since = int((now - args.since) // 60)
    rows, hist = store.stats_by_queue(since, until)
    queues = summarize_stats(rows, hist, (until - since + 1) * 60.0)
    if args.json:
        print_json({"since": rfc3339(since * 60), "until": rfc3339(now), "queues": queues})
        return EXIT_OK
    sys.stdout.write("attempts that ended since %s (%s):\n" % (rfc3339(since * 60, precise=False),
                                                            human_duration(now - since * 60)))
    if not queues:
        sys.stdout.write("none\n")
        return EXIT_OK
    table(["QUEUE", "ENDED", "COMPLETED", "FAILED", "CANCELLED", "LOST", "SUCCESS", "/MIN", "MEAN RUN",
           "P95 RUN", "MEAN WAIT"], drop=("LOST", "CANCELLED"), fit=("QUEUE",), rows=[
        [name, str(q["finished"]), str(q["completed"]), str(q["failed"]), str(q["cancelled"]), str(q["lost"]),
         "-" if q["success_rate"] is None else "%.1f%%" % (100 * q["success_rate"]), "%.2f" % q["per_minute"],
         human_duration(q["mean_run"]), ("<= " + human_duration(q["p95_run"])) if q["p95_run"] else "-",
         human_duration(q["mean_wait"])] for name, q in queues.items()])
    return EXIT_OK


def cmd_completion(args, store=None):
    sys.stdout.write(completion_script(args.shell, build_parser()))
    return EXIT_OK


def _completion_tree(parser):
    """{command path ("" for the top, "worker start"...): (options, subcommands, choices by option)}
    read from the argparse parser itself, so completion never drifts from the CLI."""
    tree = {}

    def walk(p, path):
        options, subs, choices = [], [], {}
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    subs.append(name)
                    walk(child, (path + " " + name).strip())
            elif action.option_strings and action.help is not argparse.SUPPRESS:
                options += [o for o in action.option_strings if o.startswith("--")] or action.option_strings[:1]
                if action.choices:
                    for o in action.option_strings:
                        choices[o] = [str(c) for c in action.choices]
                elif action.type in (_state_arg, _states_arg):
                    for o in action.option_strings:
                        choices[o] = list(STATES)
                elif action.metavar in ("PATH", "DIR"):
                    for o in action.option_strings:
                        choices[o] = ["<file>"]
            elif not action.option_strings and action.choices and not isinstance(action.choices, dict):
                subs += [str(c) for c in action.choices]
        tree[path] = (sorted(set(options)), subs, choices)

    walk(parser, "")
    return tree


def completion_script(shell, parser):
    tree = _completion_tree(parser)
    if shell == "fish":
        lines = ["# queuectl completion for fish (queuectl completion fish)", "complete -c queuectl -f"]
        for path, (options, subs, choices) in sorted(tree.items()):
            words = path.split()
            if not words:
                cond = "__fish_use_subcommand"
            else:
                cond = " and ".join(["__fish_seen_subcommand_from %s" % w for w in words])
                if len(words) == 1 and subs:
                    cond += " and not __fish_seen_subcommand_from %s" % " ".join(subs)
            for name in subs:
                lines.append("complete -c queuectl -n %s -a %s" % (shlex.quote(cond), shlex.quote(name)))
            for option in options:
                values = choices.get(option)
                extra = " -r -F" if values == ["<file>"] else (" -x -a %s" % shlex.quote(" ".join(values))
                                                               if values else "")
                flag = "-l %s" % option[2:] if option.startswith("--") else "-s %s" % option[1:]
                lines.append("complete -c queuectl -n %s %s%s" % (shlex.quote(cond), flag, extra))
        return "\n".join(lines) + "\n"
    cases, values = [], []
    for path, (options, subs, choices) in sorted(tree.items()):
        cases.append("        %s) echo %s ;;" % (shlex.quote(path or "-"), shlex.quote(" ".join(subs + options))))
        for option, vals in sorted(choices.items()):
            key = shlex.quote("%s %s" % (path or "-", option))
            values.append("        %s) %s ;;" % (key, "compopt -o default 2>/dev/null; COMPREPLY=(); return"
                                                   if vals == ["<file>"] else "words=%s" % shlex.quote(" ".join(vals))))
    script = _BASH_COMPLETION % {"cases": "\n".join(cases), "values": "\n".join(values)}
    if shell == "zsh":
        return "#compdef queuectl\n# queuectl completion for zsh (queuectl completion zsh)\n" \
               "autoload -U +X bashcompinit && bashcompinit\n" + script
    return "# queuectl completion for bash (queuectl completion bash)\n" + script


_BASH_COMPLETION = r"""_queuectl_words() {
    case "$1" in
%(cases)s
    esac
}
_queuectl() {
    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}" path="" word i
    local words="$(_queuectl_words -)"
    for ((i = 1; i < COMP_CWORD; i++)); do
        word="${COMP_WORDS[i]}"
        case "$word" in
            --db|--color|--cwd|--log-file|--token-file|--state|--queue|--priority|-s|-p|-q) ((i++)) ;;
            -*) ;;
            *) case " $words " in
                   *" $word "*) path="${path:+$path }$word"; words="$(_queuectl_words "$path")" ;;
               esac ;;
        esac
    done
    case "${path:--} $prev" in
%(values)s
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}
complete -F _queuectl queuectl
"""


def cmd_top(args, store):
    if args.queue is not None:
        validate_name(args.queue, "queue")
    if args.once:
        return top_once(store, args)
    for name, stream in (("stdin", sys.stdin), ("stdout", sys.stdout)):
        if stream is None or not stream.isatty():
            raise InvalidInput("top needs a terminal, and %s is not one: for one frame as plain text use "
                               "queuectl top --once" % name)
    return run_top(store, args)


def cmd_metrics(args, store):
    sys.stdout.write(metrics_text(store, time.time()))
    return EXIT_OK


def _web():
    """The dashboard package, imported only by `dashboard` and `up` (the core needs nothing else)."""
    if __name__ == "__main__":  # run as a script: let `import queuectl` find this module, not a second copy
        sys.modules.setdefault("queuectl", sys.modules[__name__])
    _logger()  # its "queuectl.web" messages go through the "queuectl" logger's handler
    try:
        from queuectl_web import server
    except ImportError as e:
        raise QueuectlError("the dashboard needs the queuectl_web package next to queuectl.py (%s)" % e)
    return server


def _dashboard_server(args):
    """A bound (not yet serving) dashboard server for `dashboard` and `up`."""
    # Popped: nothing this process starts later (up's workers and their jobs) inherits the secret.
    env_token = os.environ.pop(TOKEN_ENV, None)
    token = args.token or (read_token_file(args.token_file) if args.token_file else env_token) or None
    return _web().make_server(db_location(args.db_path), host=args.host, port=args.port, token=token,
                              read_only=args.read_only, allow_hosts=args.allow_host)


def _serve_in_foreground(server, supervisor_pid=None):
    """Serve until SIGINT/SIGTERM, or, with ``supervisor_pid``, until that process exits.

    Signals are passed on to the supervisor: the first as SIGTERM (finish the
    running jobs), later ones as SIGQUIT (cold stop).  Returns the
    supervisor's exit status (None without one).
    """
    r, w = os.pipe()
    for fd in (r, w):
        os.set_blocking(fd, False)
    received = []

    def on_signal(signum, frame):
        received.append(signum)
        if supervisor_pid:
            if len(received) == 1:
                log.info("stopping: running jobs finish first (Ctrl-C again to stop them now)")
            with contextlib.suppress(OSError):
                os.kill(supervisor_pid, signal.SIGTERM if len(received) == 1 else signal.SIGQUIT)

    old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    status = None
    try:
        server.start()
        sys.stdout.write("dashboard: %s\n" % server.login_url)
        sys.stdout.flush()
        while True:
            if supervisor_pid:
                pid, raw = os.waitpid(supervisor_pid, os.WNOHANG)
                if pid:
                    status = exit_code_of(raw)
                    break
            elif received:
                break
            wait_on_pipe(r, 0.5)
    finally:
        server.stop()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(old_fd)
        os.close(r)
        os.close(w)
    return status


def cmd_dashboard(args, store):
    store.close()
    server = _dashboard_server(args)
    _serve_in_foreground(server)
    return EXIT_OK


def cmd_up(args, store):
    if not 1 <= args.count <= 256:
        raise InvalidInput("--count must be from 1 to 256, got %d" % args.count)
    store.close()
    db = db_location(args.db_path)
    server = _dashboard_server(args)  # bind first: a busy port fails before any worker starts
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    pid = os.fork()  # before any thread exists: the server starts its threads after this
    if pid == 0:
        code = 1
        try:
            os.setpgid(0, 0)  # a terminal's Ctrl-C reaches `up` only, which passes it on once
            server.socket.close()
            code = Supervisor(db, args.count, poll_interval=args.poll_interval).run()
        except BaseException:  # pragma: no cover - logged; `up` notices the exit
            log.exception("supervisor crashed")
        finally:
            logging.shutdown()
            os._exit(code)
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)
    status = _serve_in_foreground(server, supervisor_pid=pid)
    if status != 0:
        raise QueuectlError("the workers' supervisor exited unexpectedly (%s)" % describe_exit(status))
    return EXIT_OK


COMMANDS = {
    "enqueue": cmd_enqueue, "worker": cmd_worker, "status": cmd_status, "list": cmd_list, "get": cmd_get,
    "logs": cmd_logs, "dlq": cmd_dlq, "config": cmd_config, "clear": cmd_clear, "cancel": cmd_cancel,
    "wait": cmd_wait, "purge": cmd_purge, "queue": cmd_queue, "schedule": cmd_schedule,
    "dashboard": cmd_dashboard, "up": cmd_up, "stats": cmd_stats, "metrics": cmd_metrics, "top": cmd_top,
    "restart": cmd_restart, "rerun": cmd_restart,
}


def creates_database(args):
    """Only a command that adds something (a job, a worker, a setting, a schedule, a queue) creates a
    missing database named with --db or QUEUECTL_DB; one that reads says there is none (a typo?)
    instead of showing an empty queue.  The default database is created by any command."""
    if not (getattr(args, "db", None) or os.environ.get("QUEUECTL_DB")):
        return True
    sub = next((getattr(args, a) for a in ("worker_command", "config_command", "queue_command",
                                            "schedule_command") if getattr(args, a, None)), None)
    return (args.command, sub) in (("enqueue", None), ("worker", "start"), ("config", "set"), ("schedule", "add"),
                                   ("queue", "set-limit"), ("queue", "pause"), ("queue", "resume"),
                                   ("up", None), ("dashboard", None))


def _split_command(argv):
    """Split ``enqueue ... -- COMMAND WORDS`` so the words reach no parser."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, None


def setup_logging(verbose=None, quiet=None, stream=None):
    """Log to stderr (or ``stream``) at INFO, DEBUG with ``verbose``, WARNING with ``quiet``, from the
    first message on.  Arguments left None keep what an earlier call said."""
    for key, value in (("verbose", verbose), ("quiet", quiet), ("stream", stream)):
        if value is not None:
            _LOG_SETTINGS[key] = value
    _LOG_SETTINGS["verbose"] = bool(_LOG_SETTINGS["verbose"])
    if not isinstance(log, _LazyLogger):
        _configure_logging()


def log_to(stream):
    """Send log lines to ``stream`` (a file opened by open_private_log) instead of stderr."""
    setup_logging(stream=io_text(stream))


def io_text(binary):
    import io

    return io.TextIOWrapper(binary, encoding="utf-8", errors="replace", line_buffering=True)


def _configure_logging():
    handler = logging.StreamHandler(_LOG_SETTINGS["stream"] or sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    logging.Formatter.converter = time.gmtime
    root = logging.getLogger("queuectl")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if _LOG_SETTINGS["verbose"] else
                  logging.WARNING if _LOG_SETTINGS["quiet"] else logging.INFO)
    root.propagate = False


def main(argv=None):
    """Run the CLI; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for arg in argv:
        if not _is_utf8(arg):
            return _fail("argument %s is not valid UTF-8 text" % ascii(arg), EXIT_USAGE)
    head, words = _split_command(argv)
    with _memoized_gettext():
        parser = build_parser(only=command_word(head))
    try:
        args, extra = parser.parse_known_args(head)
        if extra and args.command in ("enqueue", "schedule") and words is None:
            command = shell_join(([args.spec] if getattr(args, "spec", None) else []) + extra)
            return _fail("unrecognized arguments: %s; to queue a command with options, put it after --: "
                         "queuectl %s ... -- %s" % (shell_join(extra), args.command, command), EXIT_USAGE)
        if extra:
            parser.error("unrecognized arguments: %s" % " ".join(extra))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if words is not None and args.command not in ("enqueue", "schedule"):
        return _fail("'--' followed by a command is only for enqueue and schedule add", EXIT_USAGE)
    if words is not None and not words:
        return _fail("no command after --", EXIT_USAGE)
    args.argv_command = words
    setup_logging(verbose=args.verbose)
    COLOR[0] = getattr(args, "color", "auto")
    store = None
    try:
        if args.command == "completion":  # (needs no database)
            return cmd_completion(args)
        args.db_path = resolve_db(args)
        store = open_store(args.db_path, create=creates_database(args))
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
