"""PostgreSQL backend for queuectl: workers on many machines share one queue.

``queuectl --db postgresql://USER@HOST/DB`` (or ``QUEUECTL_DB`` set to such a
URL) opens a ``PostgresStore``.  ``queuectl.py`` imports this module lazily, only
for such URLs, so the default path stays standard-library only; this module
needs psycopg 3 (``pip install 'queuectl[postgres]'``, or a ``.pyz`` built with
``./build.sh --with-postgres``).

Design (docs/postgresql.md has the user's view):

- **Same contract, same rules.**  ``PostgresStore`` implements every method of
  ``queuectl.Store`` and runs the same contract suite (tests/test_store.py,
  tests/test_store_pg.py).  The control flow both stores share (dependencies,
  unique keys, the end of a job, cancel, rescue, schedules, the dead letter
  queue, deleting) is ``queuectl.StoreRules``, written once in the core; this
  module supplies its queries (the methods at the end of ``PostgresStore``).
- **Own schema.**  Everything lives in one PostgreSQL schema, ``queuectl`` by
  default, ``?schema=NAME`` in the URL to choose another, so queuectl can share
  a database with an application (and tests use a fresh schema each).  The
  schema is created and migrated by queuectl itself: numbered migrations in
  ``PG_SCHEMA``, applied under an advisory lock, recorded in
  ``schema_migrations``.  A schema that holds tables but no queuectl
  migrations table is refused, never modified.
- **One clock: the database's.**  Machines' clocks differ, so leases,
  heartbeats and due times are read and written on the database clock
  (``extract(epoch from clock_timestamp())``), evaluated once per statement.
  The ``now`` the contract passes in is the caller's clock reading; the store
  uses it only as the reference point of the absolute times the caller
  computed from it: a job's ``run_at`` at enqueue and a failed run's
  ``retry_at`` are stored as *database now + (value - caller's now)*, so
  "in 60 seconds" means 60 seconds on the database clock whatever the
  worker's clock says.  (An absolute ``run_at`` is therefore read on the
  enqueuing machine's clock.)  Logic that runs here on a time (rescue's stale
  workers, firing schedules) reads the database clock first; a run's start
  handed to ``rescue``'s ``kill`` (compared with a local process's start) is
  translated to the caller's clock.  ``PostgresStore(url, clock="caller")``
  trusts the caller's ``now`` instead: the contract suite injects time that
  way, as it does for SQLite; nothing in the program uses it.
- **Claims** take the next due job with ``FOR UPDATE SKIP LOCKED``: workers
  never wait for each other and never get the same job.  A claim, its attempt
  record and the worker's state are one statement (one round trip).
- **Fencing.**  Heartbeat, finish and release only touch the row when it is
  still ``processing`` with the caller's worker id and run number; a worker
  whose lease expired and was rescued (by any machine) cannot overwrite the new
  owner's result.  Rescue locks the rows it gives back (``SKIP LOCKED``), so
  several machines rescuing at once never double-count a lost run.
- **Wake-up by LISTEN/NOTIFY.**  An enqueue of due jobs (and a DLQ retry, a
  release, a rescue) sends ``NOTIFY`` in its own transaction, so it is only
  delivered if the jobs are committed; a cancel of a running job sends one
  with the payload ``cancel`` (busy workers look at their job at once).  The
  LISTEN connection is a second connection, opened on first use of
  ``wait_fds()``, which gives its socket to ``select()`` on;
  ``consume_notifications()`` drains it.  One process per machine listens:
  the supervisor, which wakes its workers by datagram as an SQLite commit
  does (``queuectl.Supervisor._wait``); a worker without a supervisor listens
  itself.  If that connection breaks, workers fall back to their poll
  interval and it is re-opened at most every LISTEN_RETRY seconds.  It goes
  to ``QUEUECTL_LISTEN_URL`` when set (the server itself, when the store's
  URL is a pooler's: LISTEN does not work through transaction pooling).
- **No session state on the store's connection**, so it may go through
  PgBouncer in transaction mode: no ``SET`` (``lock_timeout`` is a startup
  option, or ``SET LOCAL`` in each transaction when a pooler refuses startup
  options), no LISTEN, only transaction-level advisory locks.  Named prepared
  statements (psycopg prepares a statement run 5 times) halve the CPU of a
  claim and a finish on a direct connection; through a pooler (it refused the
  startup option, or a prepared statement failed) there are none.  A prepared
  statement's plan is made once for all parameters, from each table's size at
  that time: one made while ``attempts`` or ``jobs`` was nearly empty reads
  the whole table for every job once the table has grown (seen: a worker's
  step took 0.94 ms instead of 0.17 ms at 20,000 attempts), and autovacuum's
  ANALYZE, which would renew it, may come a minute later.  So every
  REPLAN_EVERY uses of its connection (a statement or a transaction) the
  store has its plans made again (``DISCARD PLANS``): the planner sizes each
  table by its current number of pages.
- **Few round trips, few rows.**  An enqueue (of up to 5,000 jobs), a claim,
  a heartbeat and a release are one statement each.  A worker's usual step,
  closing its run and claiming the next job (``finish_and_claim``), is one
  statement too (SQL_FINISH_CLAIM) that writes the two job rows, the run's
  attempt rows and one event row, nothing else, durable when it commits; so
  the worker records the next run's pid (``started``) only a second into the
  run (``pid_delay``), and a shorter run's with its result: one round trip
  per job.  (SQLite does it the other way round: a finish-and-claim that does
  not wait for the disk, made durable by the ``started`` right after.)  A run
  whose end has more to do (webhooks, jobs waiting for it:
  ``jobs.followup``) or a queue that is paused or limited takes the general
  path: the end of a run as one pipelined transaction (two round trips), then
  a claim.  ``jobs`` has no index on ``lease_until``, so a heartbeat is an
  in-page (HOT) update.
- **Counts and statistics without a hot row.**  A counter row updated by every
  claim and finish would serialise all workers on its row lock.  Instead, a
  run's end appends one row to ``job_events`` (when, queue, outcome, times,
  and the count change), other state changes append theirs to
  ``job_count_deltas`` by trigger (inserts never conflict), and ``counts()``
  and the workers' periodic housekeeping fold both, set-based, into
  ``job_counts``, the per-minute statistics and the lifetime totals of
  ``/metrics`` (one folder at a time, under a try-lock).  Readers take the
  folded rows plus the rows not folded yet, in one snapshot: exact, and
  independent of the number of jobs.  Counts are kept per bucket: running
  jobs count under ``pending`` and are counted live on the state index (about
  one per worker), so a claim writes no count change at all.
- **Dependencies across machines.**  An enqueue locks the jobs it depends on
  (in id order) and marks them (``followup``), and the end of a job locks each
  dependent before releasing or cancelling it, so a dependency that ends while
  its dependent is being enqueued, or two dependencies that end at once, never
  leave a job waiting forever; a one-statement finish that meets the mark
  (it waited for the enqueue's lock, then re-read the row) leaves the end to
  the general path.  Queue limits lock the queue's row while its running jobs are
  counted, so all machines together respect them; schedules are fired by
  whichever supervisor locks them first (``SKIP LOCKED``): one job per tick.
"""

import contextlib
import hashlib
import json
import os
import re
import select
import time
import urllib.parse

import psycopg
from psycopg.rows import dict_row

import queuectl
from queuectl import (
    Attempt,
    Conflict,
    DatabaseBusy,
    DatabaseError,
    IdTaken,
    InvalidInput,
    Job,
    KeyHeld,
    NotFound,
    QueuectlError,
    StoreRules,
    new_job_id,
    short_json,
)

DEFAULT_SCHEMA = "queuectl"
SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,47}$")  # fits NOTIFY channel names (63 bytes)
CONNECT_TIMEOUT = 10  # seconds, unless the URL says otherwise
LISTEN_RETRY = 5.0  # seconds between attempts to re-open a broken LISTEN connection
PREPARE_THRESHOLD = 5  # a statement run this often on a direct connection is prepared (psycopg's default)
REPLAN_EVERY = 256  # uses of the connection (a statement or a transaction) between two DISCARD PLANS
LISTEN_URL_ENV = "QUEUECTL_LISTEN_URL"  # where to LISTEN when the store's URL is a pooler's (default: that URL)
ENQUEUE_CHUNK = 5000  # jobs per INSERT statement in a batch (one transaction in all)
PIPELINE = psycopg.Pipeline.is_supported()  # several statements per round trip (libpq 14 or newer)


def _lock_timeout_ms():
    """How long a statement waits for a row or DDL lock: the core's busy timeout, as SQLite's."""
    return int(queuectl.BUSY_TIMEOUT * 1000)


###############################################################################
# URLs
###############################################################################


def parse_url(url, schema=None):
    """``(conninfo for libpq, schema name)``: ``?schema=NAME`` is queuectl's, the rest libpq's."""
    parts = urllib.parse.urlsplit(url)
    rest = []
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if key == "schema":
            schema = schema or value
        else:
            rest.append((key, value))
    schema = schema or DEFAULT_SCHEMA
    if not SCHEMA_RE.match(schema):
        raise InvalidInput("invalid PostgreSQL schema name %r in %s: use 1-48 lower-case letters, digits and _ "
                           "(not starting with a digit)" % (schema, queuectl.redact_url(url)))
    conninfo = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(rest)))
    return conninfo, schema


def lock_key(text):
    """A stable 63-bit advisory lock key."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


###############################################################################
# Schema: numbered migrations; {s} is the quoted schema name
###############################################################################

#: Bucket of a run time ``d`` in the per-minute histogram of `queuectl stats` (queuectl.run_time_bucket).
_RUN_BUCKET = "CASE WHEN {d} <= %r THEN 0 ELSE least(%d, ceil(ln({d} / %r) / ln(%r) - 1e-9)::integer) END" % (
    queuectl.HIST_BASE, queuectl.HIST_TOP - 1, queuectl.HIST_BASE, queuectl.HIST_RATIO)
#: Bucket of a run's duration ``d`` for the histogram (queuectl.DURATION_BUCKETS; +Inf above).
_BUCKET = "CASE %s ELSE 'Infinity'::float8 END" % " ".join(
    "WHEN d <= %r THEN %r::float8" % (b, b) for b in queuectl.DURATION_BUCKETS)

PG_SCHEMA = [
    # 1: the initial schema: SQLite's row model (SCHEMA 1-3 in queuectl.py) in PostgreSQL types
    """
    CREATE TABLE {s}.jobs (
        seq bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        id text COLLATE "C" NOT NULL UNIQUE,
        command text NOT NULL,
        state text NOT NULL,
        priority integer NOT NULL,
        queue text NOT NULL DEFAULT 'default',
        timeout double precision,
        max_retries integer NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        runs integer NOT NULL DEFAULT 0,
        rescues integer NOT NULL DEFAULT 0,
        run_at double precision NOT NULL,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        started_at double precision,
        finished_at double precision,
        worker_id text,
        lease_until double precision,
        exit_code integer,
        last_error text,
        cwd text,
        env text,
        unique_key text,
        webhook text,
        schedule text,
        after_ids text,
        cancel_requested integer NOT NULL DEFAULT 0
    ) WITH (fillfactor = 85);
    -- Few indexes, none on lease_until: an UPDATE that changes an indexed column writes a new entry
    -- in every index, so a heartbeat (lease_until only) stays a cheap in-page (HOT) update, and a
    -- claim or a finish touches as few indexes as possible.  Running jobs (about one per worker)
    -- are found through jobs_state_updated: rescue, leases, running jobs per queue.
    CREATE INDEX jobs_ready ON {s}.jobs (priority, run_at, seq) WHERE state IN ('pending', 'failed');
    CREATE INDEX jobs_state_updated ON {s}.jobs (state, updated_at, seq);
    CREATE INDEX jobs_updated ON {s}.jobs (updated_at, seq);
    CREATE UNIQUE INDEX jobs_unique_key ON {s}.jobs (unique_key)
        WHERE unique_key IS NOT NULL AND state IN ('pending', 'processing', 'failed', 'waiting');
    CREATE TABLE {s}.attempts (
        job_id text NOT NULL,
        n integer NOT NULL,
        worker_id text,
        host text,
        pid integer,
        started_at double precision NOT NULL,
        ended_at double precision,
        exit_code integer,
        outcome text,
        error text,
        output text NOT NULL DEFAULT '',
        output_bytes bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (job_id, n)
    );
    CREATE TABLE {s}.workers (
        id text PRIMARY KEY,
        host text NOT NULL,
        pid integer NOT NULL,
        pid_started double precision,
        supervisor_pid integer,
        started_at double precision NOT NULL,
        heartbeat_at double precision NOT NULL,
        state text NOT NULL DEFAULT 'idle',
        job_id text,
        wake text
    );
    CREATE TABLE {s}.config (key text PRIMARY KEY, value text NOT NULL);
    CREATE TABLE {s}.queues (name text COLLATE "C" PRIMARY KEY, max_running integer, paused boolean NOT NULL DEFAULT false);
    CREATE TABLE {s}.job_deps (job_id text COLLATE "C" NOT NULL, depends_on text COLLATE "C" NOT NULL, PRIMARY KEY (job_id, depends_on));
    CREATE INDEX job_deps_reverse ON {s}.job_deps (depends_on);
    CREATE TABLE {s}.schedules (
        name text COLLATE "C" PRIMARY KEY,
        cron text NOT NULL,
        tz text NOT NULL,
        spec text NOT NULL,
        missed text NOT NULL,
        overlap text NOT NULL,
        paused boolean NOT NULL DEFAULT false,
        next_run double precision NOT NULL,
        last_run double precision,
        last_job text,
        created_at double precision NOT NULL
    );
    CREATE TABLE {s}.webhooks (
        id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        url text NOT NULL,
        payload text NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        next_at double precision NOT NULL,
        lease_until double precision,
        last_error text,
        created_at double precision NOT NULL,
        delivered_at double precision
    );
    CREATE INDEX webhooks_due ON {s}.webhooks (next_at) WHERE delivered_at IS NULL;
    -- Counters that every claim or finish would update are kept without a hot row: per-state counts
    -- as an append-only log of changes, folded now and then; per-minute statistics and lifetime
    -- totals spread over 16 rows ("shard": the server backend's pid mod 16), summed when read.
    -- (shard is the last column, so the other columns read as SQLite's tables do.)
    CREATE TABLE {s}.job_counts (state text PRIMARY KEY, n bigint NOT NULL);
    CREATE TABLE {s}.job_count_deltas (state text NOT NULL, n bigint NOT NULL);
    CREATE TABLE {s}.stats (
        minute bigint NOT NULL,
        queue text COLLATE "C" NOT NULL,
        outcome text COLLATE "C" NOT NULL,
        count bigint NOT NULL,
        run_sum double precision NOT NULL,
        wait_sum double precision NOT NULL,
        shard integer NOT NULL,
        PRIMARY KEY (minute, queue, outcome, shard)
    );
    CREATE TABLE {s}.stats_durations (
        minute bigint NOT NULL,
        queue text COLLATE "C" NOT NULL,
        bucket integer NOT NULL,
        count bigint NOT NULL,
        shard integer NOT NULL,
        PRIMARY KEY (minute, queue, bucket, shard)
    );
    CREATE TABLE {s}.attempt_totals (
        queue text COLLATE "C" NOT NULL,
        outcome text COLLATE "C" NOT NULL,
        count bigint NOT NULL,
        duration_sum double precision NOT NULL,
        shard integer NOT NULL,
        PRIMARY KEY (queue, outcome, shard)
    );
    CREATE TABLE {s}.attempt_durations (
        queue text COLLATE "C" NOT NULL,
        outcome text COLLATE "C" NOT NULL,
        le double precision NOT NULL,
        count bigint NOT NULL,
        shard integer NOT NULL,
        PRIMARY KEY (queue, outcome, le, shard)
    );
    CREATE FUNCTION {s}.jobs_count_ins() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO {s}.job_count_deltas (state, n) SELECT state, count(*) FROM new_rows GROUP BY state;
        RETURN NULL;
    END $$;
    CREATE FUNCTION {s}.jobs_count_del() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO {s}.job_count_deltas (state, n) SELECT state, -count(*) FROM old_rows GROUP BY state;
        RETURN NULL;
    END $$;
    CREATE FUNCTION {s}.jobs_count_upd() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO {s}.job_count_deltas (state, n) VALUES (OLD.state, -1), (NEW.state, 1);
        RETURN NULL;
    END $$;
    CREATE TRIGGER jobs_count_ins AFTER INSERT ON {s}.jobs REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION {s}.jobs_count_ins();
    CREATE TRIGGER jobs_count_del AFTER DELETE ON {s}.jobs REFERENCING OLD TABLE AS old_rows
        FOR EACH STATEMENT EXECUTE FUNCTION {s}.jobs_count_del();
    CREATE TRIGGER jobs_count_upd AFTER UPDATE OF state ON {s}.jobs
        FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION {s}.jobs_count_upd();
    CREATE FUNCTION {s}.attempts_totals() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        q text := coalesce((SELECT queue FROM {s}.jobs WHERE id = NEW.job_id), 'default');
        d double precision := greatest(0, coalesce(NEW.ended_at, NEW.started_at) - NEW.started_at);
    BEGIN
        INSERT INTO {s}.attempt_totals AS t (queue, outcome, shard, count, duration_sum)
        VALUES (q, NEW.outcome, mod(pg_backend_pid(), 16), 1, d)
        ON CONFLICT (queue, outcome, shard) DO UPDATE
        SET count = t.count + 1, duration_sum = t.duration_sum + excluded.duration_sum;
        INSERT INTO {s}.attempt_durations AS t (queue, outcome, le, shard, count)
        VALUES (q, NEW.outcome, {bucket}, mod(pg_backend_pid(), 16), 1)
        ON CONFLICT (queue, outcome, le, shard) DO UPDATE SET count = t.count + 1;
        RETURN NULL;
    END $$;
    CREATE TRIGGER attempts_totals AFTER UPDATE OF outcome ON {s}.attempts
        FOR EACH ROW WHEN (OLD.outcome IS NULL AND NEW.outcome IS NOT NULL) EXECUTE FUNCTION {s}.attempts_totals();
    """.replace("{bucket}", _BUCKET),
    # 2: a webhook delivery names its job (`get` shows how its deliveries went)
    """
    ALTER TABLE {s}.webhooks ADD COLUMN job_id text;
    UPDATE {s}.webhooks SET job_id = payload::json -> 'job' ->> 'id';
    CREATE INDEX webhooks_job ON {s}.webhooks (job_id);
    """,
    # 3: a job's end writes one event row (no statistics upserts, no trigger): the fold turns the
    # events into counts, per-minute statistics and lifetime totals.  Counts are kept per bucket
    # ('processing' counts under 'pending'; the running jobs are counted live), so a claim writes
    # no count change.  `followup`: the job's end has more to do than its own row (a webhook of its
    # own, or jobs that wait for it), so the one-statement finish-and-claim leaves it alone.
    """
    ALTER TABLE {s}.jobs ADD COLUMN followup boolean NOT NULL DEFAULT false;
    UPDATE {s}.jobs SET followup = true WHERE webhook IS NOT NULL OR id IN (SELECT depends_on FROM {s}.job_deps);
    CREATE TABLE {s}.job_events (
        at double precision NOT NULL,
        queue text COLLATE "C" NOT NULL,
        outcome text COLLATE "C" NOT NULL,
        duration double precision,
        run double precision,
        wait double precision,
        came text COLLATE "C",
        went text COLLATE "C"
    );
    DROP TRIGGER attempts_totals ON {s}.attempts;
    DROP FUNCTION {s}.attempts_totals();
    DROP TRIGGER jobs_count_upd ON {s}.jobs;
    CREATE OR REPLACE FUNCTION {s}.jobs_count_ins() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO {s}.job_count_deltas (state, n) SELECT {bucket_state}, count(*) FROM new_rows GROUP BY 1;
        RETURN NULL;
    END $$;
    CREATE OR REPLACE FUNCTION {s}.jobs_count_del() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO {s}.job_count_deltas (state, n) SELECT {bucket_state}, -count(*) FROM old_rows GROUP BY 1;
        RETURN NULL;
    END $$;
    CREATE OR REPLACE FUNCTION {s}.jobs_count_upd() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO {s}.job_count_deltas (state, n) VALUES (OLD.state, -1), ({bucket_new}, 1);
        RETURN NULL;
    END $$;
    -- A run's end (out of 'processing') is counted by the event its statement writes.
    CREATE TRIGGER jobs_count_upd AFTER UPDATE OF state ON {s}.jobs
        FOR EACH ROW WHEN (OLD.state <> 'processing' AND OLD.state IS DISTINCT FROM {bucket_new})
        EXECUTE FUNCTION {s}.jobs_count_upd();
    LOCK TABLE {s}.jobs IN SHARE ROW EXCLUSIVE MODE;
    DELETE FROM {s}.job_count_deltas;
    DELETE FROM {s}.job_counts;
    INSERT INTO {s}.job_counts (state, n) SELECT {bucket_state}, count(*) FROM {s}.jobs GROUP BY 1;
    """.replace("{bucket_state}", "CASE state WHEN 'processing' THEN 'pending' ELSE state END")
       .replace("{bucket_new}", "CASE NEW.state WHEN 'processing' THEN 'pending' ELSE NEW.state END"),
    # 4: two indexes less on jobs, whose claim and end each add an entry to every one of its
    # indexes: seq (the order of creation, the tie-break of the ordered indexes) has no index of
    # its own, a job is found by its id (unique, the replica identity); and the newest jobs of all
    # states are read from jobs_state_updated, one range per state, merged (_newest_first).
    """
    ALTER TABLE {s}.jobs DROP CONSTRAINT jobs_pkey;
    ALTER TABLE {s}.jobs REPLICA IDENTITY USING INDEX jobs_id_key;
    DROP INDEX {s}.jobs_updated;
    """,
]

SQL_MIGRATIONS_TABLE = """
CREATE TABLE {s}.schema_migrations (version integer PRIMARY KEY, applied_at double precision NOT NULL)
"""
SQL_SCHEMA_VERSION = "SELECT coalesce(max(version), 0) AS v FROM {s}.schema_migrations"
SQL_RECORD_MIGRATION = """
INSERT INTO {s}.schema_migrations (version, applied_at) VALUES (%(v)s, extract(epoch from clock_timestamp()))
"""

###############################################################################
# Statements: {s} is the schema, {clock} the time of the statement
###############################################################################

#: The time of a statement: the database clock, or the caller's ``now`` in clock="caller" mode.
CLOCK = "coalesce(%(now)s::float8, extract(epoch from clock_timestamp())::float8)"
ACTIVE = "(%s)" % ", ".join("'%s'" % s for s in queuectl.ACTIVE_STATES)  # the states that hold a unique key
FINAL = "(%s)" % ", ".join("'%s'" % s for s in queuectl.FINAL_STATES)

#: Job columns; a new column is added here and in a migration.
JOB_COLUMNS = (
    "seq", "id", "command", "state", "priority", "queue", "timeout", "max_retries", "attempts", "runs", "rescues",
    "run_at", "created_at", "updated_at", "started_at", "finished_at", "worker_id", "lease_until", "exit_code",
    "last_error", "cwd", "env", "unique_key", "webhook", "schedule", "after_ids", "cancel_requested",
)
#: What an enqueue stores of a validated job (queuectl.validate_job): (column, PostgreSQL type).
#: ``state`` and the times are added by the statements.
ENQUEUE_FIELDS = (
    ("id", "text"), ("command", "text"), ("priority", "integer"), ("queue", "text"), ("timeout", "float8"),
    ("max_retries", "integer"), ("cwd", "text"), ("env", "text"), ("unique_key", "text"), ("webhook", "text"),
    ("schedule", "text"), ("after_ids", "text"),
)


def _columns(alias=""):
    return ", ".join(alias + c for c in JOB_COLUMNS)


_FIELDS = ", ".join(f for f, _ in ENQUEUE_FIELDS)

# The bulk path (no dependencies, no unique keys): one statement per chunk of jobs, which also
# registers new queue names and, when jobs are due, notifies the workers (delivered at commit).
# A job id that exists already fails the statement (and its transaction): nothing is inserted.
SQL_INSERT_JOBS = """
WITH c AS MATERIALIZED (SELECT {clock} AS now),
new_queues AS (
    INSERT INTO {s}.queues (name) SELECT DISTINCT unnest(%(queue)s::text[]) ON CONFLICT (name) DO NOTHING
),
added AS (
    INSERT INTO {s}.jobs (""" + _FIELDS + """, state, run_at, created_at, updated_at, followup)
    SELECT """ + ", ".join("j." + f for f, _ in ENQUEUE_FIELDS) + """, 'pending',
           coalesce(j.run_at, c.now + j.run_in), c.now, c.now, j.webhook IS NOT NULL
    FROM c, unnest(""" + ", ".join("%%(%s)s::%s[]" % (f, t) for f, t in ENQUEUE_FIELDS) + """,
                   %(run_at)s::float8[], %(run_in)s::float8[])
         WITH ORDINALITY AS j(""" + _FIELDS + """, run_at, run_in, ord)
    ORDER BY j.ord
    RETURNING 1
),
wake AS (SELECT pg_notify(%(channel)s, '') WHERE %(due)s)
SELECT (SELECT count(*) FROM added) AS n, (SELECT count(*) FROM wake) AS woken
"""
# One job at a time (dependencies, unique keys, schedules), inside a savepoint.
SQL_INSERT_JOB = """
WITH c AS MATERIALIZED (SELECT {clock} AS now),
new_queue AS (INSERT INTO {s}.queues (name) VALUES (%(queue)s) ON CONFLICT (name) DO NOTHING)
INSERT INTO {s}.jobs (""" + _FIELDS + """, state, run_at, created_at, updated_at, followup)
SELECT """ + ", ".join("%%(%s)s::%s" % (f, t) for f, t in ENQUEUE_FIELDS) + """, %(state)s,
       coalesce(%(run_at)s::float8, c.now + %(run_in)s::float8), c.now, c.now, %(webhook)s::text IS NOT NULL
FROM c
"""
SQL_BY_UNIQUE_KEY = "SELECT id FROM {s}.jobs WHERE unique_key = %(key)s AND state IN " + ACTIVE
# The jobs an enqueue depends on: locked (in id order) until it commits, so none of them ends unseen,
# and marked (followup), so that their end takes the path that releases dependents.
SQL_LOCK_STATES = """
WITH locked AS (SELECT id, state FROM {s}.jobs WHERE id = ANY(%(ids)s::text[]) ORDER BY id FOR NO KEY UPDATE),
marked AS (
    UPDATE {s}.jobs j SET followup = true FROM locked
    WHERE j.id = locked.id AND NOT j.followup AND locked.state NOT IN """ + FINAL + """
)
SELECT id, state FROM locked
"""
SQL_INSERT_DEP = "INSERT INTO {s}.job_deps (job_id, depends_on) VALUES (%(id)s, %(dep)s) ON CONFLICT DO NOTHING"
# Notifications: payload '' says "jobs are due" (for idle workers), 'cancel' asks busy workers to
# look at their job now.
SQL_NOTIFY = "SELECT pg_notify(%(channel)s, '')"
SQL_NOTIFY_CANCEL = "SELECT pg_notify(%(channel)s, 'cancel')"

# A claim's CTEs, after a CTE ``c`` that has the time of the claim in column {at}: the job ({pick}:
# the next due one, or a given id), its new attempt, and the worker's state (when {when}).
_CLAIMED = """claimed AS (
    UPDATE {s}.jobs j
    SET state = 'processing', worker_id = %(worker)s, lease_until = c.{at} + %(lease)s::float8,
        attempts = j.attempts + 1, runs = j.runs + 1, started_at = c.{at}, updated_at = c.{at}, finished_at = NULL
    FROM c
    WHERE j.id = {pick}
    RETURNING """ + _columns("j.") + """, c.{at} AS clock
),
new_attempt AS (
    INSERT INTO {s}.attempts (job_id, n, worker_id, host, started_at)
    SELECT id, runs, %(worker)s, %(host)s, clock FROM claimed
),
worker AS (
    UPDATE {s}.workers w
    SET state = CASE WHEN EXISTS (SELECT 1 FROM claimed) THEN 'busy' ELSE 'idle' END,
        job_id = (SELECT id FROM claimed), heartbeat_at = greatest(w.heartbeat_at, c.{at})
    FROM c
    WHERE w.id = %(worker)s AND {when}
)"""
#: The next due job, when {go} (a boolean of ``c``).
_PICK_DUE = """(SELECT id FROM {s}.jobs
                   WHERE (SELECT {go} FROM c) AND state IN ('pending', 'failed') AND run_at <= (SELECT {at} FROM c)
                   ORDER BY priority, run_at, seq
                   LIMIT 1
                   FOR UPDATE SKIP LOCKED)"""
# Claims: the common case in one statement; paused queues or queues with a limit make it claim
# nothing (limited), and claim() takes the slower path, then claims a given id.
_CLAIM = """
WITH c AS MATERIALIZED (SELECT {clock} AS now, {limited} AS limited),
""" + _CLAIMED.replace("{at}", "now").replace("{when}", "NOT c.limited") + """
SELECT c.limited, claimed.* FROM c LEFT JOIN claimed ON true
"""
SQL_CLAIM = _CLAIM.replace("{limited}", "EXISTS (SELECT 1 FROM {s}.queues WHERE paused OR max_running IS NOT NULL)")\
    .replace("{pick}", _PICK_DUE.replace("{go}", "NOT limited").replace("{at}", "now"))
SQL_CLAIM_ID = _CLAIM.replace("{limited}", "false").replace("{pick}", "%(id)s")
SQL_LIMITED_QUEUES = "SELECT name, max_running, paused FROM {s}.queues WHERE paused OR max_running IS NOT NULL"
SQL_PICK = """
SELECT id, queue FROM {s}.jobs
WHERE state IN ('pending', 'failed') AND run_at <= %(at)s
  AND queue <> ALL(%(blocked)s::text[]) AND (%(only)s::text[] IS NULL OR queue = ANY(%(only)s::text[]))
ORDER BY priority, run_at, seq
LIMIT 1
FOR UPDATE SKIP LOCKED
"""
SQL_LOCK_QUEUE = "SELECT max_running FROM {s}.queues WHERE name = %(queue)s FOR UPDATE"
SQL_RUNNING_IN_QUEUE = "SELECT count(*) AS n FROM {s}.jobs WHERE state = 'processing' AND queue = %(queue)s"
SQL_WORKER_STATE = "UPDATE {s}.workers SET state = %(state)s, job_id = NULL, heartbeat_at = {clock} WHERE id = %(worker)s"

SQL_SET_PID = "UPDATE {s}.attempts SET pid = %(pid)s WHERE job_id = %(id)s AND n = %(n)s"
SQL_WORKER_HEARTBEAT = "UPDATE {s}.workers SET heartbeat_at = {clock} WHERE id = %(worker)s"
SQL_HEARTBEAT = """
WITH c AS MATERIALIZED (SELECT {clock} AS now),
worker AS (
    UPDATE {s}.workers w SET heartbeat_at = c.now FROM c WHERE w.id = %(worker)s
),
renewed AS (
    UPDATE {s}.jobs j SET lease_until = c.now + %(lease)s::float8
    FROM c
    WHERE j.id = %(id)s AND j.runs = %(n)s AND j.worker_id = %(worker)s AND j.state = 'processing'
    RETURNING j.id
),
output AS (
    UPDATE {s}.attempts a SET output = %(output)s::text, output_bytes = %(output_bytes)s::bigint
    FROM renewed
    WHERE a.job_id = %(id)s AND a.n = %(n)s AND %(output)s::text IS NOT NULL
)
SELECT count(*) AS n FROM renewed
"""
# A run's end as an event row, folded later (SQL_FOLD): statistics, attempt totals, and the count
# change (from 'pending', the bucket of running jobs, to the new state).
_RUN_EVENT = """
    INSERT INTO {s}.job_events (at, queue, outcome, duration, run, wait, came, went)
    SELECT at, queue, %(outcome)s, greatest(0, at - coalesce(started_at, at)), at - coalesce(started_at, at),
           greatest(0, coalesce(started_at, at) - due_at), 'pending', state
    FROM done
"""
# A run's end, after a CTE ``c`` with its time (now): the job row, fenced by owner and run number
# (and {fast}: more conditions), its attempt, and its event.  The UPDATE locks the row itself and
# checks its conditions again on the newest version if another transaction changed it meanwhile (a
# dependent's enqueue setting followup); the due time (for the event's wait) is read in the
# statement's snapshot: nothing changes run_at while a run holds the job.
_DONE = """done AS (
    UPDATE {s}.jobs j
    SET state = %(state)s, worker_id = NULL, lease_until = NULL, exit_code = %(exit_code)s::integer,
        last_error = %(error)s::text, run_at = coalesce(%(retry_at)s::float8, c.now + %(retry_in)s::float8, j.run_at),
        finished_at = c.now, updated_at = c.now
    FROM c
    WHERE j.id = %(id)s AND j.runs = %(n)s AND j.worker_id = %(worker)s AND j.state = 'processing'{fast}
    RETURNING """ + _columns("j.") + """, (SELECT o.run_at FROM {s}.jobs o WHERE o.id = j.id) AS due_at, c.now AS at
),
ended AS (
    UPDATE {s}.attempts a
    SET ended_at = done.at, exit_code = %(exit_code)s::integer, outcome = %(outcome)s, error = %(error)s::text,
        output = %(output)s, output_bytes = %(output_bytes)s, pid = coalesce(a.pid, %(pid)s::integer)
    FROM done
    WHERE a.job_id = %(id)s AND a.n = %(n)s
),
event AS (""" + _RUN_EVENT + """)"""
# Closing a run by the general path: its end (_DONE) and the worker's state in one statement; it
# returns the job (for webhooks) and the webhook-url setting.
SQL_FINISH = """
WITH c AS MATERIALIZED (SELECT {clock} AS now),
""" + _DONE.replace("{fast}", "") + """,
worker AS (
    UPDATE {s}.workers w
    SET state = 'busy', job_id = CASE WHEN w.job_id = %(id)s THEN NULL ELSE w.job_id END,
        heartbeat_at = greatest(w.heartbeat_at, done.at)
    FROM done WHERE w.id = %(worker)s
)
SELECT done.*, (SELECT value FROM {s}.config WHERE key = 'webhook-url') AS global_webhook FROM done
"""
# A worker's usual step, in one statement: close its run and claim the next due job.
# - The claim goes first (`claimed`, right after the statement's snapshot): a claim that looked at
#   the head of the queue later would more often meet a job another worker claimed since that
#   snapshot, lock it while checking it again, and keep it locked, so that the worker finishing
#   that job would wait for this statement to end.  It claims nothing (`claiming` false) when a
#   queue is paused or limited (the claim must count running jobs: claim()), or when jobs wait
#   for the run's job (`followup`: its end may release one, for this very claim).
# - The run's end (`done`) needs the run to be still this worker's and its end to have nothing
#   more to do: no webhook (the job's own, or the webhook-url setting), no job waiting for it
#   (`followup`, read again on the locked row: an enqueue of a dependent marks it).  Otherwise
#   done = 0 and the caller ends the run by the general path (finish).
# Durable when it commits, so a worker records the next run's pid only a second into the run
# (pid_delay), or with that run's result.
SQL_FINISH_CLAIM = """
WITH c AS MATERIALIZED (
    SELECT {clock} AS now, """ + CLOCK.replace("%(now)s", "%(claim_now)s") + """ AS claim_now,
           NOT EXISTS (SELECT 1 FROM {s}.queues WHERE paused OR max_running IS NOT NULL)
           AND NOT coalesce((SELECT followup FROM {s}.jobs WHERE id = %(id)s), false) AS claiming,
           EXISTS (SELECT 1 FROM {s}.config WHERE key = 'webhook-url' AND value NOT IN ('null', '""', '')) AS hooked
),
""" + _CLAIMED.replace("{at}", "claim_now").replace("{when}", "c.claiming").replace(
    "{pick}", _PICK_DUE.replace("{go}", "claiming").replace("{at}", "claim_now")) + """,
""" + _DONE.replace(
    "{fast}", " AND NOT j.followup AND c.claiming AND NOT c.hooked") + """
SELECT c.claiming, claimed.*, (SELECT count(*) FROM done) AS done
FROM c LEFT JOIN claimed ON true
"""
SQL_RELEASE = """
WITH c AS MATERIALIZED (SELECT {clock} AS now),
released AS (
    UPDATE {s}.jobs j
    SET state = 'pending', worker_id = NULL, lease_until = NULL, attempts = greatest(j.attempts - 1, 0),
        rescues = j.rescues + 1, last_error = %(error)s, run_at = c.now, updated_at = c.now, finished_at = NULL
    FROM c
    WHERE j.id = %(id)s AND j.runs = %(n)s AND j.worker_id = %(worker)s AND j.state = 'processing'
    RETURNING c.now AS at, j.queue, j.started_at
),
event AS (
    INSERT INTO {s}.job_events (at, queue, outcome, duration)
    SELECT at, queue, 'stopped', greatest(0, at - coalesce(started_at, at)) FROM released
),
attempt AS (
    UPDATE {s}.attempts a SET ended_at = released.at, outcome = 'stopped', error = %(error)s
    FROM released
    WHERE a.job_id = %(id)s AND a.n = %(n)s
),
worker AS (
    UPDATE {s}.workers w SET state = 'busy', job_id = NULL, heartbeat_at = released.at
    FROM released
    WHERE w.id = %(worker)s
),
wake AS (SELECT pg_notify(%(channel)s, '') FROM released)
SELECT (SELECT count(*) FROM released) AS n, (SELECT count(*) FROM wake) AS woken
"""
SQL_NOW = "SELECT {clock} AS now"
SQL_ANY_EXPIRED = "SELECT 1 FROM {s}.jobs WHERE state = 'processing' AND lease_until < %(at)s LIMIT 1"
# (attempts.job_id is in the database's default collation, jobs.id in "C": a join of the two names
# the default one, or it cannot use the attempts index and reads the whole table.)
SQL_LOST_JOBS = """
SELECT j.seq, j.id, j.runs, j.rescues, j.queue, j.worker_id, j.lease_until, a.host, a.pid, a.started_at
FROM {s}.jobs j LEFT JOIN {s}.attempts a ON a.job_id = j.id COLLATE "default" AND a.n = j.runs
WHERE j.state = 'processing' AND (j.lease_until < %(at)s OR j.worker_id = ANY(%(dead)s::text[]))
ORDER BY j.seq
FOR UPDATE OF j SKIP LOCKED
"""
SQL_LOSE_JOB = """
UPDATE {s}.jobs
SET state = %(state)s, worker_id = NULL, lease_until = NULL, attempts = greatest(attempts - 1, 0),
    rescues = rescues + 1, last_error = %(error)s, run_at = %(at)s, updated_at = %(at)s,
    finished_at = CASE WHEN %(state)s = 'dead' THEN %(at)s::float8 END
WHERE id = %(id)s AND runs = %(n)s AND state = 'processing'
"""
# (a lost run counts in the statistics with no run time; in the attempt totals when it has an attempt)
SQL_LOSE_ATTEMPT = """
WITH a AS (
    UPDATE {s}.attempts SET ended_at = %(at)s, outcome = 'lost', error = %(error)s
    WHERE job_id = %(id)s AND n = %(n)s
    RETURNING started_at
)
INSERT INTO {s}.job_events (at, queue, outcome, duration, run, wait, came, went)
SELECT %(at)s::float8, %(queue)s, 'lost', (SELECT greatest(0, %(at)s::float8 - started_at) FROM a), NULL, 0,
       'pending', %(state)s
"""
# Folding: one folder at a time (try-lock); rows committed meanwhile are left for the next fold.  The
# count changes and the run events go, set-based, into the counts, the per-minute statistics and
# histogram, and the lifetime attempt totals (shard 0; the older rows of other shards still count).
_FOLD = """
events AS (
    DELETE FROM {s}.job_events WHERE (SELECT pg_try_advisory_xact_lock(%(fold_lock)s)) RETURNING *
),
deltas AS (
    DELETE FROM {s}.job_count_deltas WHERE (SELECT pg_try_advisory_xact_lock(%(fold_lock)s)) RETURNING state, n
),
fold_counts AS (
    INSERT INTO {s}.job_counts AS t (state, n)
    SELECT state, sum(n) FROM (
        SELECT state, n FROM deltas
        UNION ALL SELECT came, -1 FROM events WHERE came IS NOT NULL
        UNION ALL SELECT went, 1 FROM events WHERE went IS NOT NULL
    ) x
    GROUP BY state ORDER BY state
    ON CONFLICT (state) DO UPDATE SET n = t.n + excluded.n
),
fold_stats AS (
    INSERT INTO {s}.stats AS t (minute, queue, outcome, shard, count, run_sum, wait_sum)
    SELECT floor(at / 60)::bigint, queue, outcome, 0, count(*), sum(coalesce(run, 0)), sum(wait)
    FROM events WHERE wait IS NOT NULL GROUP BY 1, 2, 3
    ON CONFLICT (minute, queue, outcome, shard) DO UPDATE
    SET count = t.count + excluded.count, run_sum = t.run_sum + excluded.run_sum, wait_sum = t.wait_sum + excluded.wait_sum
),
fold_hist AS (
    INSERT INTO {s}.stats_durations AS t (minute, queue, bucket, shard, count)
    SELECT floor(at / 60)::bigint, queue, """ + _RUN_BUCKET.replace("{d}", "run") + """, 0, count(*)
    FROM events WHERE run IS NOT NULL GROUP BY 1, 2, 3
    ON CONFLICT (minute, queue, bucket, shard) DO UPDATE SET count = t.count + excluded.count
),
fold_totals AS (
    INSERT INTO {s}.attempt_totals AS t (queue, outcome, shard, count, duration_sum)
    SELECT queue, outcome, 0, count(*), sum(duration) FROM events WHERE duration IS NOT NULL GROUP BY 1, 2
    ON CONFLICT (queue, outcome, shard) DO UPDATE
    SET count = t.count + excluded.count, duration_sum = t.duration_sum + excluded.duration_sum
),
fold_durations AS (
    INSERT INTO {s}.attempt_durations AS t (queue, outcome, le, shard, count)
    SELECT queue, outcome, """ + _BUCKET + """, 0, count(*)
    FROM (SELECT queue, outcome, duration AS d FROM events WHERE duration IS NOT NULL) e GROUP BY 1, 2, 3
    ON CONFLICT (queue, outcome, le, shard) DO UPDATE SET count = t.count + excluded.count
)
"""
SQL_FOLD = "WITH " + _FOLD + "SELECT (SELECT count(*) FROM events) AS events, (SELECT count(*) FROM deltas) AS deltas"
# Counts per bucket ('processing' under 'pending'), with the running jobs counted live (about one
# per worker, on the state index).  All sub-statements of one statement share its snapshot: the
# final SELECT sees the totals, deltas and events as they were before this statement folded them.
SQL_COUNTS = "WITH " + _FOLD + """,
live AS (SELECT count(*) AS running FROM {s}.jobs WHERE state = 'processing')
SELECT state, sum(n)::bigint AS n FROM (
    SELECT state, n FROM {s}.job_counts
    UNION ALL SELECT state, n FROM {s}.job_count_deltas
    UNION ALL SELECT came, -1 FROM {s}.job_events WHERE came IS NOT NULL
    UNION ALL SELECT went, 1 FROM {s}.job_events WHERE went IS NOT NULL
    UNION ALL SELECT 'processing', running FROM live
    UNION ALL SELECT 'pending', -running FROM live
) x
GROUP BY state
"""

SQL_GET_JOB = "SELECT " + _columns() + " FROM {s}.jobs WHERE id = %(id)s"
SQL_JOB_STATE = "SELECT state FROM {s}.jobs WHERE id = %(id)s"
SQL_STATES_OF = "SELECT id, state, exit_code FROM {s}.jobs WHERE id = ANY(%(ids)s::text[])"
SQL_ATTEMPTS = """
SELECT job_id, n, worker_id, host, pid, started_at, ended_at, exit_code, outcome, error, output_bytes
FROM {s}.attempts WHERE job_id = %(id)s ORDER BY n
"""
SQL_ATTEMPTS_OUTPUT = "SELECT * FROM {s}.attempts WHERE job_id = %(id)s ORDER BY n"
SQL_ATTEMPT_ONE = "SELECT * FROM {s}.attempts WHERE job_id = %(id)s AND n = %(n)s"
SQL_ATTEMPT_LAST = "SELECT * FROM {s}.attempts WHERE job_id = %(id)s ORDER BY n DESC LIMIT 1"
_AFTER = "(updated_at, seq) < (%(updated_at)s::float8, %(seq)s::bigint)"  # (a page's position)


def _newest_first(columns, limit, after="true", state="%(state)s"):
    """Jobs newest change first (after a position: ``after``), at most ``limit``: a range of
    jobs_state_updated.  For every state (``state`` None), one bounded range per state, merged in
    order: about ``limit`` rows read, not the table, and no index on updated_at alone for every
    claim and end to write to."""
    def one(st):
        return ("SELECT %s FROM {s}.jobs WHERE state = %s AND %s ORDER BY updated_at DESC, seq DESC LIMIT %s"
                % (columns, st, after, limit))
    if state is not None:
        return one(state)
    return ("SELECT * FROM (" + " UNION ALL ".join("(%s)" % one("'%s'" % st.value) for st in queuectl.JobState)
            + ") newest ORDER BY updated_at DESC, seq DESC LIMIT " + limit)


SQL_LIST_ALL = _newest_first(_columns(), "%(limit)s", state=None)
SQL_LIST_STATE = _newest_first(_columns(), "%(limit)s")
SQL_RETRY_DEAD = """
WITH c AS MATERIALIZED (SELECT {clock} AS now)
UPDATE {s}.jobs j
SET state = 'pending', run_at = c.now, updated_at = c.now, finished_at = NULL, cancel_requested = 0,
    attempts = CASE WHEN %(reset)s THEN 0 ELSE greatest(j.attempts, j.max_retries) END,
    rescues = CASE WHEN %(reset)s THEN 0 ELSE j.rescues END
FROM c
WHERE j.id = %(id)s AND j.state = ANY(%(states)s::text[])
RETURNING j.id
"""
SQL_DEAD_IDS = "SELECT id FROM {s}.jobs WHERE state = 'dead' ORDER BY updated_at, seq"
SQL_DELETE_JOBS = """
WITH gone AS (DELETE FROM {s}.jobs WHERE state = ANY(%(states)s::text[]) RETURNING id),
gone_attempts AS (DELETE FROM {s}.attempts a USING gone WHERE a.job_id = gone.id COLLATE "default")
SELECT id FROM gone
"""
SQL_WAITING_ON = """
SELECT DISTINCT job_id FROM {s}.job_deps WHERE depends_on = ANY(%(ids)s::text[]) ORDER BY job_id
"""
SQL_MISSING_DEP = """
SELECT depends_on FROM {s}.job_deps d
WHERE d.job_id = %(id)s AND NOT EXISTS (SELECT 1 FROM {s}.jobs j WHERE j.id = d.depends_on)
ORDER BY depends_on LIMIT 1
"""
SQL_DROP_ORPHAN_EDGES = """
DELETE FROM {s}.job_deps d WHERE d.job_id = ANY(%(ids)s::text[])
  AND NOT EXISTS (SELECT 1 FROM {s}.jobs j WHERE j.id = d.job_id)
"""
SQL_PURGE = """
WITH doomed AS (
    SELECT id FROM {s}.jobs WHERE state = %(state)s AND updated_at < %(before)s
    ORDER BY updated_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED
),
gone AS (DELETE FROM {s}.jobs j USING doomed WHERE j.id = doomed.id RETURNING j.id),
gone_attempts AS (DELETE FROM {s}.attempts a USING gone WHERE a.job_id = gone.id COLLATE "default")
SELECT count(*) AS n FROM gone
"""

# Dependencies, cancel and webhooks: what happens when a job reaches a final state.
SQL_LOCK_JOB = "SELECT state FROM {s}.jobs WHERE id = %(id)s FOR UPDATE"
# The edges to a job that ended are dropped, and the jobs still waiting on it returned, in a statement
# of its own: its snapshot is taken after the job's row was locked, so it sees every edge committed
# by an enqueue that held the job (FOR SHARE) meanwhile.
SQL_TAKE_DEPENDENTS = """
WITH edges AS (
    DELETE FROM {s}.job_deps WHERE depends_on = %(id)s
      AND EXISTS (SELECT 1 FROM {s}.jobs WHERE id = %(id)s AND state IN ('completed', 'dead', 'cancelled'))
    RETURNING job_id
)
SELECT DISTINCT e.job_id FROM edges e JOIN {s}.jobs j ON j.id = e.job_id WHERE j.state = 'waiting' ORDER BY e.job_id
"""
SQL_DROP_EDGES_FROM = "DELETE FROM {s}.job_deps WHERE job_id = %(id)s"
SQL_DROP_DONE_EDGES = """
DELETE FROM {s}.job_deps d WHERE d.job_id = %(id)s
  AND EXISTS (SELECT 1 FROM {s}.jobs j WHERE j.id = d.depends_on AND j.state = 'completed')
"""
SQL_RELEASE_IF_READY = """
UPDATE {s}.jobs SET state = 'pending', updated_at = %(at)s
WHERE id = %(id)s AND state = 'waiting' AND NOT EXISTS (SELECT 1 FROM {s}.job_deps WHERE job_id = %(id)s)
RETURNING id
"""
SQL_CANCEL_JOB = """
UPDATE {s}.jobs SET state = 'cancelled', last_error = %(error)s, finished_at = %(at)s, updated_at = %(at)s,
       worker_id = NULL, lease_until = NULL
WHERE id = %(id)s AND state IN ('pending', 'failed', 'waiting')
RETURNING id
"""
SQL_REQUEST_CANCEL = "UPDATE {s}.jobs SET cancel_requested = 1 WHERE id = %(id)s AND state = 'processing'"
SQL_CANCEL_REQUESTED = "SELECT cancel_requested FROM {s}.jobs WHERE id = %(id)s AND runs = %(n)s"
SQL_GLOBAL_WEBHOOK = "SELECT value FROM {s}.config WHERE key = 'webhook-url'"
SQL_WEBHOOK_INSERT = """
INSERT INTO {s}.webhooks (job_id, url, payload, next_at, created_at)
VALUES (%(job_id)s, %(url)s, %(payload)s, %(at)s, %(at)s)
"""
SQL_JOB_WEBHOOKS = """
SELECT url, attempts, next_at, last_error, created_at, delivered_at FROM {s}.webhooks WHERE job_id = %(id)s ORDER BY id
"""
SQL_WEBHOOK_ANY_DUE = """
SELECT 1 FROM {s}.webhooks WHERE delivered_at IS NULL AND next_at <= {clock} LIMIT 1
"""
SQL_CLAIM_WEBHOOKS = """
WITH c AS MATERIALIZED (SELECT {clock} AS now),
due AS (
    SELECT w.id FROM {s}.webhooks w, c
    WHERE w.delivered_at IS NULL AND w.next_at <= c.now AND (w.lease_until IS NULL OR w.lease_until < c.now)
    ORDER BY w.next_at
    LIMIT %(limit)s
    FOR UPDATE OF w SKIP LOCKED
)
UPDATE {s}.webhooks w SET lease_until = c.now + %(lease)s::float8
FROM due, c
WHERE w.id = due.id
RETURNING w.id, w.url, w.payload, w.attempts
"""
SQL_WEBHOOK_DONE = """
WITH c AS MATERIALIZED (SELECT {clock} AS now)
UPDATE {s}.webhooks w
SET attempts = w.attempts + 1, last_error = %(error)s::text, lease_until = NULL,
    next_at = coalesce(%(next_at)s::float8, c.now + %(next_in)s::float8, w.next_at),
    delivered_at = CASE WHEN %(error)s::text IS NULL THEN c.now WHEN %(give_up)s THEN -1 END
FROM c
WHERE w.id = %(id)s
"""

# Queues
SQL_ADD_QUEUE = "INSERT INTO {s}.queues (name) VALUES (%(queue)s) ON CONFLICT (name) DO NOTHING"
SQL_QUEUES = "SELECT name, max_running, paused FROM {s}.queues ORDER BY name"
SQL_QUEUE_COUNTS = """
SELECT queue, state, count(*) AS n FROM {s}.jobs WHERE state IN ('pending', 'processing', 'failed', 'waiting')
GROUP BY queue, state
"""
SQL_SET_QUEUE_LIMIT = "UPDATE {s}.queues SET max_running = %(m)s::integer WHERE name = %(queue)s"
SQL_SET_QUEUE_PAUSED = "UPDATE {s}.queues SET paused = %(p)s WHERE name = %(queue)s"

# Schedules
SQL_SCHEDULE_INSERT = """
INSERT INTO {s}.schedules (name, cron, tz, spec, missed, overlap, paused, next_run, created_at)
SELECT %(name)s, %(cron)s, %(tz)s, %(spec)s, %(missed)s, %(overlap)s, false, %(next_run)s, {clock}
"""
SQL_SCHEDULES = """
SELECT s.*, j.state AS last_state FROM {s}.schedules s LEFT JOIN {s}.jobs j ON j.id = s.last_job ORDER BY s.name
"""
SQL_SCHEDULE_DELETE = "DELETE FROM {s}.schedules WHERE name = %(name)s"
SQL_SCHEDULE_PAUSE = """
UPDATE {s}.schedules SET paused = %(p)s, next_run = coalesce(%(next_run)s::float8, next_run) WHERE name = %(name)s
"""
SQL_SCHEDULE_ANY_DUE = "SELECT 1 FROM {s}.schedules WHERE NOT paused AND next_run <= %(at)s LIMIT 1"
SQL_SCHEDULES_DUE = """
SELECT * FROM {s}.schedules WHERE NOT paused AND next_run <= %(at)s ORDER BY next_run FOR UPDATE SKIP LOCKED
"""
SQL_SCHEDULE_ADVANCE = """
UPDATE {s}.schedules
SET next_run = %(next_run)s, last_run = coalesce(%(last_run)s::float8, last_run), last_job = coalesce(%(job)s, last_job)
WHERE name = %(name)s
"""
SQL_JOB_EXISTS = "SELECT 1 FROM {s}.jobs WHERE id = %(id)s"

SQL_CONFIG_ALL = "SELECT key, value FROM {s}.config"
SQL_CONFIG_SET = """
INSERT INTO {s}.config (key, value) VALUES (%(key)s, %(value)s) ON CONFLICT (key) DO UPDATE SET value = excluded.value
"""
SQL_WORKER_UPSERT = """
INSERT INTO {s}.workers AS w (id, host, pid, pid_started, supervisor_pid, started_at, heartbeat_at, state, job_id, wake)
SELECT %(id)s, %(host)s, %(pid)s, %(pid_started)s::float8, %(supervisor_pid)s::integer, c.now, c.now, 'idle', NULL,
       %(wake)s::text
FROM (SELECT {clock} AS now) c
ON CONFLICT (id) DO UPDATE
SET host = excluded.host, pid = excluded.pid, pid_started = excluded.pid_started,
    supervisor_pid = excluded.supervisor_pid, started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at,
    state = 'idle', job_id = NULL, wake = excluded.wake
"""
SQL_WORKER_DELETE = "DELETE FROM {s}.workers WHERE id = %(worker)s"
SQL_WORKERS = "SELECT * FROM {s}.workers ORDER BY started_at, id"
SQL_WAKE = """
SELECT wake FROM {s}.workers WHERE host = %(host)s AND (state = 'idle' OR NOT %(idle)s) AND wake IS NOT NULL
AND (%(supervisor)s::integer IS NULL OR supervisor_pid = %(supervisor)s::integer) LIMIT %(n)s
"""

# Dashboard reads: keyset pages on (state, updated_at, seq) (_newest_first), id-prefix search on the
# id index.
SQL_PAGE_ALL = _newest_first(_columns(), "%(limit)s", _AFTER, state=None)
SQL_PAGE_STATE = _newest_first(_columns(), "%(limit)s", _AFTER)
SQL_PAGE_PREFIX = (  # ids sort bytewise (COLLATE "C"), as in SQLite: a prefix is a range of the id index
    "SELECT " + _columns() + " FROM {s}.jobs WHERE id >= %(start)s AND id < %(stop)s "
    "AND (%(state)s::text IS NULL OR state = %(state)s) ORDER BY id LIMIT %(limit)s"
)
SQL_OLDEST_DUE = """
SELECT min(run_at) AS run_at FROM (
    SELECT (SELECT run_at FROM {s}.jobs WHERE state IN ('pending', 'failed') AND priority = p AND run_at <= {clock}
            ORDER BY run_at LIMIT 1) AS run_at
    FROM unnest(%(priorities)s::integer[]) AS p
) x
"""
SQL_SCHEDULED_PAGE = (  # one priority at a time: a range of the jobs_ready index
    "SELECT " + _columns() + " FROM {s}.jobs WHERE state IN ('pending', 'failed') AND priority = %(priority)s "
    "AND run_at > {clock} AND (run_at, seq) > (%(run_at)s::float8, %(seq)s::bigint) AND state = 'pending' "
    "ORDER BY run_at, seq LIMIT %(limit)s"
)
# (a queue's page: the newest %(scan)s jobs, then those of the queue; is there a job after the
# first %(scan)s from the position on? (index only))
SQL_QUEUE_PAGE, SQL_QUEUE_PAGE_STATE = (
    "SELECT * FROM (" + _newest_first(_columns(), "%(scan)s", _AFTER, state)
    + ") x WHERE queue = %(queue)s LIMIT %(limit)s" for state in (None, "%(state)s"))
SQL_PAGE_NTH, SQL_PAGE_NTH_STATE = (
    "SELECT seq FROM (" + _newest_first("updated_at, seq", "%(scan)s + 1", _AFTER, state)
    + ") x ORDER BY updated_at DESC, seq DESC LIMIT 1 OFFSET %(scan)s" for state in (None, "%(state)s"))
# The statistics read the folded rows and the events not folded yet (a fold may run meanwhile: in
# one snapshot, a row is in one place or the other).
_STATS = """(
    SELECT minute, queue, outcome, count, run_sum, wait_sum FROM {s}.stats WHERE minute BETWEEN %(since)s AND %(until)s
    UNION ALL
    SELECT floor(at / 60)::bigint, queue, outcome, 1, coalesce(run, 0), wait FROM {s}.job_events
    WHERE wait IS NOT NULL AND floor(at / 60)::bigint BETWEEN %(since)s AND %(until)s
) s"""
SQL_STATS_RANGE = """
SELECT minute, outcome, sum(count)::bigint AS count, sum(run_sum) AS run_sum, sum(wait_sum) AS wait_sum
FROM """ + _STATS + """ GROUP BY minute, outcome ORDER BY minute, outcome
"""
SQL_DATA_VERSION = """
SELECT (SELECT max(updated_at) FROM (""" + _newest_first("updated_at, seq", "1", state=None) + """) x) AS updated,
       (SELECT count(*) FROM {s}.job_events) AS events,
       (SELECT max(lease_until) FROM {s}.jobs WHERE state = 'processing') AS leases,
       (SELECT count(*) FROM {s}.job_count_deltas) AS deltas,
       (SELECT coalesce(sum(n), 0) FROM {s}.job_counts) AS folded,
       (SELECT count(*) FROM {s}.workers) AS workers,
       (SELECT coalesce(sum(xmin::text::bigint), 0) FROM {s}.workers) AS workers_x,
       (SELECT coalesce(sum(xmin::text::bigint), 0) FROM {s}.config) AS config_x,
       (SELECT coalesce(sum(xmin::text::bigint), 0) FROM {s}.queues) AS queues_x,
       (SELECT coalesce(sum(xmin::text::bigint), 0) FROM {s}.schedules) AS schedules_x
"""
SQL_STATS_BY_QUEUE = """
SELECT queue, outcome, sum(count)::bigint AS count, sum(run_sum) AS run_sum, sum(wait_sum) AS wait_sum
FROM """ + _STATS + """ GROUP BY queue, outcome
"""
SQL_STATS_HIST_BY_QUEUE = """
SELECT queue, bucket, sum(count)::bigint AS count FROM (
    SELECT queue, bucket, count FROM {s}.stats_durations WHERE minute BETWEEN %(since)s AND %(until)s
    UNION ALL
    SELECT queue, """ + _RUN_BUCKET.replace("{d}", "run") + """, 1 FROM {s}.job_events
    WHERE run IS NOT NULL AND floor(at / 60)::bigint BETWEEN %(since)s AND %(until)s
) h GROUP BY queue, bucket
"""
SQL_ATTEMPT_TOTALS = """
SELECT queue, outcome, sum(count)::bigint AS count, sum(duration_sum) AS duration_sum FROM (
    SELECT queue, outcome, count, duration_sum FROM {s}.attempt_totals
    UNION ALL SELECT queue, outcome, 1, duration FROM {s}.job_events WHERE duration IS NOT NULL
) t GROUP BY queue, outcome ORDER BY queue, outcome
"""
SQL_ATTEMPT_DURATIONS = """
SELECT queue, outcome, le, sum(count)::bigint AS count FROM (
    SELECT queue, outcome, le, count FROM {s}.attempt_durations
    UNION ALL SELECT queue, outcome, """ + _BUCKET + """, 1 FROM (
        SELECT queue, outcome, duration AS d FROM {s}.job_events WHERE duration IS NOT NULL) e
) t GROUP BY queue, outcome, le ORDER BY queue, outcome, le
"""


class _Duplicate(Exception):
    """An INSERT met an existing job id (``id``: which one, read from the server's message)."""

    def __init__(self, error):
        super().__init__(str(error))
        hit = re.match(r"^Key \(id\)=\((.*)\) already exists", getattr(error.diag, "message_detail", None) or "")
        self.id = hit.group(1) if hit else None


class _Statements:
    """The SQL_* constants of this module with the schema and clock filled in (cached)."""

    def __init__(self, quoted_schema):
        self._schema = quoted_schema

    def __getattr__(self, name):
        text = globals()["SQL_" + name].replace("{s}", self._schema).replace("{clock}", CLOCK)
        setattr(self, name, text)
        return text


###############################################################################
# Errors
###############################################################################

# SQLSTATEs that mean "try again later": lock timeout, deadlock, serialization
# failure, server shutting down or starting, too many connections.
RETRYABLE = {"55P03", "40P01", "40001", "57P01", "57P02", "57P03", "53300", "08000", "08003", "08006", "08001"}


def _one_line(text):
    return " ".join(str(text).split())


###############################################################################
# The store
###############################################################################


class PostgresStore(StoreRules):
    """queuectl's store in a PostgreSQL schema (see the module docstring).

    One autocommit connection for the store's statements (each write is a
    single statement or an explicit transaction), and, in the process that
    waits for notifications (a supervisor), one more that LISTENs.  A broken
    connection is reported as DatabaseBusy (safe to retry) and re-opened on
    the next call.  ``listen_url``: where to LISTEN (default
    ``$QUEUECTL_LISTEN_URL``, else ``url``).
    """

    #: A claim is durable when it commits (SQL_FINISH_CLAIM included): a run's pid may wait a
    #: second, and a shorter run's goes with its result, one round trip less per job.
    pid_delay = 1.0

    def __init__(self, url, create=True, schema=None, clock="database", listen_url=None):
        if clock not in ("database", "caller"):
            raise ValueError("clock must be 'database' or 'caller'")
        self.url = url
        self.path = queuectl.redact_url(url)  # how messages name the database
        self.conninfo, self.schema = parse_url(url, schema)
        self.caller_clock = clock == "caller"
        self.channel = "queuectl:" + self.schema
        self.sql = _Statements('"%s"' % self.schema)
        self._fold_lock = lock_key("queuectl-fold:" + self.schema)
        self._migrate_lock = lock_key("queuectl-migrate:" + self.schema)
        self.conn = None
        self._cur = None  # the cursor of the transaction the queries run in (_in)
        self._listen = None
        self._listen_retry_at = 0.0
        self.listen_url = listen_url if listen_url is not None else os.environ.get(LISTEN_URL_ENV) or url
        self.listen_path = queuectl.redact_url(self.listen_url)
        # (?schema= in the LISTEN URL is ignored: the channel is this store's schema's)
        self.listen_conninfo = parse_url(self.listen_url, self.schema)[0]
        try:
            if not queuectl.is_db_url(self.listen_url):
                raise ValueError("not a postgresql:// URL")
            psycopg.conninfo.conninfo_to_dict(self.listen_conninfo)
        except (ValueError, psycopg.Error) as e:
            raise InvalidInput("invalid %s %s: %s (it names the PostgreSQL server to LISTEN on, directly, when "
                               "the queue's URL is a pooler's)" % (LISTEN_URL_ENV, self.listen_path, _one_line(e)))
        # Through a pooler in transaction mode (as far as can be told: it refused the startup option,
        # or a named prepared statement failed), the store's connection keeps no session state.
        self.pooled = False
        self._statements = 0  # uses of the connection since the last DISCARD PLANS (direct connections)
        self._listen_warned = False  # the LISTEN connection seemed to go through a pooler (said once)
        self.conn = self._connect()
        self._migrate(create)

    # --- connections -------------------------------------------------------------

    def _connect_kwargs(self, conninfo, prepare=False):
        given = psycopg.conninfo.conninfo_to_dict(conninfo)
        # Named prepared statements halve the CPU of a claim and a finish, but through a pooler in
        # transaction mode the next statement may reach another server session, where they do not
        # exist (or where another client's of the same name do).
        kwargs = {"autocommit": True, "row_factory": dict_row,
                  "prepare_threshold": PREPARE_THRESHOLD if prepare else None}
        if "connect_timeout" not in given:
            kwargs["connect_timeout"] = CONNECT_TIMEOUT
        if "application_name" not in given:
            kwargs["application_name"] = self.channel
        return kwargs, given

    def _connect(self):
        """The store's connection.  It holds no session state that a pooler in transaction mode
        would lose (no SET, LISTEN or session lock), so it may go through PgBouncer.  Waits on
        row or DDL locks end after BUSY_TIMEOUT, as SQLite's busy timeout does: ``lock_timeout``
        is a startup option.  A pooler that refuses startup options (PgBouncer) gets a
        connection without it, on which every transaction starts with ``SET LOCAL lock_timeout``
        and no statement is prepared (``pooled``); straight to the server, statements used
        often are prepared (psycopg's prepare_threshold)."""
        try:
            conn, refused = self._open(self.conninfo, not self.pooled)
            self.pooled = self.pooled or refused
            return conn
        except psycopg.Error as e:
            raise self._connect_error(e) from None
        except (ValueError, TypeError) as e:  # a malformed URL
            raise InvalidInput("invalid PostgreSQL URL %s: %s" % (self.path, _one_line(e))) from None

    def _open(self, conninfo, direct=True):
        """``(connection, refused)``.  ``direct``: ask for the lock_timeout startup option and
        prepare statements; ``refused`` says the other end refused startup options (a pooler:
        PgBouncer), so the connection was opened again without them and without preparing."""
        if direct:
            kwargs, given = self._connect_kwargs(conninfo, prepare=True)
            options = ("-c lock_timeout=%d " % _lock_timeout_ms() + given.get("options", "")).strip()
            try:
                return psycopg.connect(conninfo, options=options, **kwargs), False
            except psycopg.OperationalError as e:
                if "unsupported startup parameter" not in str(e) and "unsupported options" not in str(e):
                    raise
        return psycopg.connect(conninfo, **self._connect_kwargs(conninfo)[0]), direct

    def _begin(self, cur):
        """The first statement of every explicit transaction: nothing, or, through a pooler,
        this transaction's lock_timeout."""
        if self.pooled:
            cur.execute("SET LOCAL lock_timeout = %d" % _lock_timeout_ms())

    def _connect_error(self, e):
        text = _one_line(e)
        state = getattr(e, "sqlstate", None)
        if state in ("28P01", "28000", "3D000", "42501") or "authentication" in text or "does not exist" in text:
            return DatabaseError("cannot open PostgreSQL database %s: %s" % (self.path, text))
        return DatabaseBusy("cannot reach PostgreSQL at %s: %s; try again" % (self.path, text))

    def _error(self, e):
        """Translate a psycopg error into a QueuectlError with a clear one-line message."""
        if isinstance(e, UnicodeError):
            return InvalidInput("text that is not valid UTF-8 cannot be stored: %s" % _one_line(e))
        text = _one_line(getattr(getattr(e, "diag", None), "message_primary", None) or e)
        state = getattr(e, "sqlstate", None)
        if state in ("26000", "42P05") and not self.pooled:
            # A prepared statement missing, or another's of the same name: a pooler in transaction
            # mode that passed the startup option on.  The statement did not run: no more
            # preparing (nor relying on the startup option), and the caller tries again.
            self.pooled = True
            if self.conn is not None:
                self.conn.prepare_threshold = None
            return DatabaseBusy("PostgreSQL database %s: %s; a connection pooler in transaction mode? Statements "
                                "are no longer prepared on this connection; try again" % (self.path, text))
        broken = self.conn is not None and (self.conn.closed or getattr(self.conn, "broken", False))
        if broken:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None
        if state in RETRYABLE or broken or (state is None and isinstance(e, psycopg.OperationalError)):
            return DatabaseBusy("PostgreSQL database %s is busy or unreachable (%s); try again" % (self.path, text))
        if state in ("42P01", "42703", "3F000", "42883"):
            return DatabaseError("schema %s in %s is not a queuectl schema or was damaged (%s)"
                                 % (self.schema, self.path, text))
        if state == "25006":
            return DatabaseError("PostgreSQL database %s is read-only: %s" % (self.path, text))
        if state == "42501":
            return DatabaseError("permission denied in PostgreSQL database %s: %s" % (self.path, text))
        return DatabaseError("PostgreSQL database %s: %s" % (self.path, text))

    def _connection(self):
        if self.conn is None or self.conn.closed:
            self.conn = self._connect()
        return self.conn

    @contextlib.contextmanager
    def _cursor(self, transaction=False):
        """A cursor on the store's connection; with ``transaction``, inside BEGIN ... COMMIT.
        Any exception rolls the transaction back; psycopg errors are translated."""
        try:
            conn = self._connection()
            self._statements += 1
            if self._statements >= REPLAN_EVERY and not self.pooled:
                self._statements = 0
                conn.execute("DISCARD PLANS")
            if transaction:
                with conn.transaction(), conn.cursor() as cur:
                    self._begin(cur)
                    yield cur
            else:
                with conn.cursor() as cur:
                    yield cur
        except (psycopg.Error, UnicodeError) as e:
            raise self._error(e) from None

    def _one(self, sql, params=None):
        with self._cursor() as cur:
            return cur.execute(sql, params).fetchone()

    def _all(self, sql, params=None):
        with self._cursor() as cur:
            return cur.execute(sql, params).fetchall()

    # --- time ------------------------------------------------------------------------

    def _clock(self, now):
        """The ``%(now)s`` parameter: the caller's time in clock="caller" mode, else None (the database clock)."""
        return now if self.caller_clock else None

    def _at(self, value, now):
        """A time the caller computed from its ``now``: ``(absolute, relative)`` SQL parameters.  The
        store keeps the absolute value in clock="caller" mode, else rebases it on the database clock."""
        if value is None:
            return None, None
        if self.caller_clock or now is None:
            return float(value), None
        return None, float(value) - float(now)

    def _now(self, now, cur=None):
        """The time of an operation whose logic runs here (schedules, rescue): the database clock
        (or the caller's ``now`` in clock="caller" mode)."""
        if self.caller_clock and now is not None:
            return float(now)
        if cur is not None:
            return cur.execute(self.sql.NOW, {"now": None}).fetchone()["now"]
        return self._one(self.sql.NOW, {"now": None})["now"]

    # --- schema --------------------------------------------------------------------

    def _migrate(self, create):
        try:
            version = self._one(self.sql.SCHEMA_VERSION)["v"]
        except DatabaseError:
            version = None  # no schema, or no migrations table in it: looked at below, under the lock
        if version == len(PG_SCHEMA):
            return
        if version is not None and version > len(PG_SCHEMA):
            raise self._too_new(version)
        with self._cursor(transaction=True) as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%(k)s)", {"k": self._migrate_lock})
            exists = cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %(s)s", {"s": self.schema}).fetchone()
            has_table = exists and cur.execute("SELECT to_regclass(%(t)s) AS t",
                                               {"t": '"%s".schema_migrations' % self.schema}).fetchone()["t"]
            if not has_table and not create:
                raise queuectl.DatabaseMissing("PostgreSQL database %s has no queuectl schema %s: nothing was ever "
                                               "enqueued there (a typo?); `queuectl enqueue` creates it"
                                               % (self.path, self.schema))
            if not exists:
                cur.execute('CREATE SCHEMA "%s"' % self.schema)
            if not has_table:
                n = cur.execute("SELECT count(*) AS n FROM pg_class WHERE relnamespace = %(s)s::regnamespace",
                                {"s": '"%s"' % self.schema}).fetchone()["n"]
                if n:
                    raise DatabaseError("schema %s in PostgreSQL database %s holds tables but is not a queuectl "
                                        "schema; refusing to modify it (choose another with ?schema=NAME)"
                                        % (self.schema, self.path))
                cur.execute(self.sql.MIGRATIONS_TABLE)
            version = cur.execute(self.sql.SCHEMA_VERSION).fetchone()["v"]  # another process may have won
            if version > len(PG_SCHEMA):
                raise self._too_new(version)
            for number in range(version, len(PG_SCHEMA)):
                cur.execute(PG_SCHEMA[number].replace("{s}", '"%s"' % self.schema))
                cur.execute(self.sql.RECORD_MIGRATION, {"v": number + 1})

    def _too_new(self, version):
        return DatabaseError("schema %s in %s has version %d, newer than this queuectl %s understands (%d)"
                             % (self.schema, self.path, version, queuectl.__version__, len(PG_SCHEMA)))

    def drop_schema(self):
        """Drop this store's whole schema (tests and ``bench/``; not part of the Store contract)."""
        with self._cursor() as cur:
            cur.execute('DROP SCHEMA IF EXISTS "%s" CASCADE' % self.schema)

    # --- enqueue ---------------------------------------------------------------------

    def enqueue(self, jobs, now, existing=None):
        given = set()  # ids the caller chose: a clash with one of them is a Conflict
        for job in jobs:
            if job.get("id") is not None:
                if job["id"] in given:
                    raise Conflict(queuectl.ID_EXISTS % short_json(job["id"]))
                given.add(job["id"])
        due = any(job["run_at"] <= now for job in jobs)
        if not any(job.get("after") or job.get("unique_key") for job in jobs):
            taken = set(given)
            rows = [dict(queuectl.job_record(job), id=job.get("id") or self._fresh_id(taken)) for job in jobs]
            self._enqueue_bulk(rows, now, due, given, taken)
            return [r["id"] for r in rows]
        with self._transaction():
            ids = self._enqueue_each(jobs, now, existing)
            if due:
                self._wake(None)
        return ids

    @staticmethod
    def _fresh_id(taken):
        while True:
            job_id = new_job_id()
            if job_id not in taken:
                taken.add(job_id)
                return job_id

    def _enqueue_bulk(self, rows, now, due, given, taken):
        """One statement (one round trip, its own transaction) for up to ENQUEUE_CHUNK jobs; a
        transaction of such statements for more."""
        chunks = [rows[i:i + ENQUEUE_CHUNK] for i in range(0, len(rows), ENQUEUE_CHUNK)]
        for _ in range(20):
            try:
                with self._cursor(transaction=len(chunks) > 1) as cur:
                    for k, chunk in enumerate(chunks):
                        params = self._bulk_params(chunk, now)
                        params.update(channel=self.channel, due=due and k == len(chunks) - 1)
                        try:
                            cur.execute(self.sql.INSERT_JOBS, params)
                        except psycopg.errors.UniqueViolation as e:
                            raise _Duplicate(e) from None
                return
            except _Duplicate as d:
                if d.id is None or d.id in given:
                    raise Conflict(queuectl.ID_EXISTS % short_json(d.id or "(unknown)")) from None
                for r in rows:  # a generated id collided with an existing one: draw it again
                    if r["id"] == d.id:
                        r["id"] = self._fresh_id(taken)
        raise QueuectlError(queuectl.NO_FRESH_ID)  # pragma: no cover - 20 collisions

    def _bulk_params(self, rows, now):
        params = {"now": self._clock(now)}
        for field, kind in ENQUEUE_FIELDS:
            convert = float if kind == "float8" else int if kind == "integer" else str
            params[field] = [None if r.get(field) is None else convert(r[field]) for r in rows]
        at = [self._at(r["run_at"], now) for r in rows]
        params["run_at"] = [a for a, _ in at]
        params["run_in"] = [r for _, r in at]
        return params

    # --- claim and run ----------------------------------------------------------------

    def claim(self, worker_id, host, now, lease, queues=None):
        params = {"now": self._clock(now), "worker": worker_id, "host": host, "lease": float(lease)}
        if not queues:
            row = self._one(self.sql.CLAIM, params)  # the common case: one statement
            if not row["limited"]:
                return Job.from_row(row) if row["seq"] is not None else None
        with self._cursor(transaction=True) as cur:
            limited = cur.execute(self.sql.LIMITED_QUEUES).fetchall()
            job_id = self._pick(cur, self._now(now, cur), limited, queues)
            row = cur.execute(self.sql.CLAIM_ID, dict(params, id=job_id)).fetchone() if job_id is not None else None
            if row is None or row["seq"] is None:
                cur.execute(self.sql.WORKER_STATE, {"now": params["now"], "state": "idle", "worker": worker_id})
                return None
        return Job.from_row(row)

    def _pick(self, cur, at, limited, queues):
        """The next due job's id among the queues this worker may take from now: paused queues
        are left out, and a queue with a limit is locked while its running jobs are counted, so
        that workers on all machines together respect the limit."""
        blocked = [q["name"] for q in limited if q["paused"]]
        caps = {q["name"]: q["max_running"] for q in limited if not q["paused"] and q["max_running"] is not None}
        while True:
            hit = cur.execute(self.sql.PICK, {"at": at, "blocked": blocked, "only": list(queues) if queues else None})\
                .fetchone()
            if hit is None:
                return None
            if hit["queue"] not in caps:
                return hit["id"]
            lock = cur.execute(self.sql.LOCK_QUEUE, {"queue": hit["queue"]}).fetchone()
            cap = lock["max_running"] if lock else None
            running = cur.execute(self.sql.RUNNING_IN_QUEUE, {"queue": hit["queue"]}).fetchone()["n"]
            if cap is None or running < cap:
                return hit["id"]
            blocked.append(hit["queue"])

    def started(self, job_id, run, pid):
        with self._cursor() as cur:
            cur.execute(self.sql.SET_PID, {"pid": pid, "id": job_id, "n": run})

    def heartbeat(self, worker_id, job_id=None, run=None, now=None, lease=None, output=None):
        if job_id is None:
            with self._cursor() as cur:
                cur.execute(self.sql.WORKER_HEARTBEAT, {"now": self._clock(now), "worker": worker_id})
            return True
        text, size = output if output is not None else (None, None)
        row = self._one(self.sql.HEARTBEAT, {"now": self._clock(now), "worker": worker_id, "id": job_id, "n": run,
                                             "lease": float(lease), "output": text, "output_bytes": size})
        return row["n"] == 1

    def _finish_params(self, job_id, run, worker_id, state, now, outcome, exit_code=None, error=None,
                       output="", output_bytes=0, retry_at=None, pid=None):
        retry_abs, retry_in = self._at(retry_at, now)
        return {"now": self._clock(now), "id": job_id, "n": run, "worker": worker_id,
                "state": queuectl.finish_state(state).value, "exit_code": exit_code, "error": error,
                "retry_at": retry_abs, "retry_in": retry_in, "outcome": outcome, "output": output or "",
                "output_bytes": output_bytes or 0, "pid": pid}

    def finish(self, job_id, run, worker_id, state, now, outcome, exit_code=None, error=None,
               output="", output_bytes=0, retry_at=None, pid=None):
        params = self._finish_params(job_id, run, worker_id, state, now, outcome, exit_code, error, output,
                                     output_bytes, retry_at, pid)
        state = queuectl.JobState(params["state"])
        if state.value not in queuectl.FINAL_STATES:  # a retry ahead: one statement
            return self._one(self.sql.FINISH, params) is not None
        # The end of a job: the run's record and the jobs that wait for it, in one transaction.
        # Pipelined: BEGIN, the finish and the search for dependents go in one round trip.
        with self._cursor() as cur:
            conn = cur.connection
            pipeline = conn.pipeline() if PIPELINE else contextlib.nullcontext()  # libpq 14+
            with pipeline, conn.transaction(), self._in(cur):
                self._begin(cur)
                cur.execute(self.sql.FINISH, params)
                deps = conn.cursor()
                deps.execute(self.sql.TAKE_DEPENDENTS, {"id": job_id})
                row = cur.fetchone()
                dependents = [r["job_id"] for r in deps.fetchall()]
                if row is not None:
                    self._job_ended(job_id, state.value, row["at"], row, dependents)
        return row is not None

    def finish_and_claim(self, finished, claim):
        """One statement (SQL_FINISH_CLAIM) when it can; what it left undone by the general path:
        finish (a run that is no longer this worker's, or whose end has more to do), claim (a
        paused or limited queue, a run whose end may release a job, or nothing claimed while the
        finish was left to the general path)."""
        if claim.get("queues") or claim["worker_id"] != finished["worker_id"]:
            return self.finish(**finished), self.claim(**claim)
        params = dict(self._finish_params(**finished), claim_now=self._clock(claim["now"]), host=claim["host"],
                      lease=float(claim["lease"]))
        row = self._one(self.sql.FINISH_CLAIM, params)
        if row["seq"] is not None:
            return bool(row["done"]) or self.finish(**finished), Job.from_row(row)
        if row["done"] and row["claiming"]:
            return True, None  # nothing due
        return self.finish(**finished), self.claim(**claim)  # (the finish may release a job for this claim)

    def release(self, job_id, run, worker_id, now, reason):
        row = self._one(self.sql.RELEASE, {"now": self._clock(now), "id": job_id, "n": run, "worker": worker_id,
                                           "error": reason, "channel": self.channel})
        return row["n"] == 1

    # --- reading ---------------------------------------------------------------------

    def get(self, job_id):
        row = self._one(self.sql.GET_JOB, {"id": job_id})
        return Job.from_row(row) if row else None

    def states_of(self, job_ids):
        return {r["id"]: (r["state"], r["exit_code"]) for r in self._all(self.sql.STATES_OF, {"ids": list(job_ids)})}

    def attempts(self, job_id, with_output=False):
        sql = self.sql.ATTEMPTS_OUTPUT if with_output else self.sql.ATTEMPTS
        return [Attempt.from_row(r) for r in self._all(sql, {"id": job_id})]

    def attempt(self, job_id, n=None):
        if n is None:
            row = self._one(self.sql.ATTEMPT_LAST, {"id": job_id})
        else:
            row = self._one(self.sql.ATTEMPT_ONE, {"id": job_id, "n": n})
        return Attempt.from_row(row) if row else None

    def list_jobs(self, state=None, limit=100):
        if state:
            rows = self._all(self.sql.LIST_STATE, {"state": str(state), "limit": limit})
        else:
            rows = self._all(self.sql.LIST_ALL, {"limit": limit})
        return [Job.from_row(r) for r in reversed(rows)]

    def counts(self):
        return queuectl.counts_from_rows(self._all(self.sql.COUNTS, {"fold_lock": self._fold_lock}))

    def cancel_requested(self, job_id, run):
        row = self._one(self.sql.CANCEL_REQUESTED, {"id": job_id, "n": run})
        return bool(row and row["cancel_requested"])

    def queues(self):
        return queuectl.queue_list(self._all(self.sql.QUEUES), self._all(self.sql.QUEUE_COUNTS))

    def schedules(self):
        return [queuectl.schedule_from_row(r) for r in self._all(self.sql.SCHEDULES)]

    # --- webhooks --------------------------------------------------------------------

    def webhooks_due(self, now):
        return self._one(self.sql.WEBHOOK_ANY_DUE, {"now": self._clock(now)}) is not None

    def claim_webhooks(self, now, limit, lease):
        """Due deliveries for ``lease`` seconds; SKIP LOCKED and the lease keep senders on several
        machines from sending one twice."""
        if not self.webhooks_due(now):
            return []
        return [dict(r) for r in self._all(self.sql.CLAIM_WEBHOOKS, {"now": self._clock(now), "limit": limit,
                                                                     "lease": float(lease)})]

    def webhook_result(self, delivery_id, now, error=None, next_at=None):
        next_abs, next_in = self._at(next_at, now)
        with self._cursor() as cur:
            cur.execute(self.sql.WEBHOOK_DONE, {"now": self._clock(now), "id": delivery_id, "error": error,
                                                "next_at": next_abs, "next_in": next_in,
                                                "give_up": error is not None and next_at is None})

    # --- configuration ---------------------------------------------------------------

    def config(self):
        return queuectl.config_from_rows(self._all(self.sql.CONFIG_ALL))

    def set_config(self, key, value):
        with self._cursor() as cur:
            cur.execute(self.sql.CONFIG_SET, {"key": key, "value": json.dumps(value)})

    # --- workers ---------------------------------------------------------------------

    def register_worker(self, worker):
        params = {k: worker.get(k) for k in ("id", "host", "pid", "pid_started", "supervisor_pid", "wake")}
        params["now"] = self._clock(worker.get("now"))
        with self._cursor() as cur:
            cur.execute(self.sql.WORKER_UPSERT, params)

    def unregister_worker(self, worker_id):
        with self._cursor() as cur:
            cur.execute(self.sql.WORKER_DELETE, {"worker": worker_id})

    def workers(self):
        return [dict(r) for r in self._all(self.sql.WORKERS)]

    def wake_addresses(self, host, n, supervisor_pid=None, idle=True):
        return [r["wake"] for r in self._all(self.sql.WAKE, {"host": host, "n": None if n is None or n < 0 else n,
                                                             "supervisor": supervisor_pid, "idle": idle})]

    # --- dashboard and monitoring reads ------------------------------------------------

    def jobs_page(self, state=None, id_prefix=None, limit=50, after=None):
        p = {"limit": int(limit) + 1, "state": str(state) if state else None}
        if id_prefix:
            bounds = queuectl.id_prefix_range(id_prefix, after)
            if bounds is None:
                return [], False
            p["start"], p["stop"] = bounds
            rows = self._all(self.sql.PAGE_PREFIX, p)
        else:
            p["updated_at"], p["seq"] = after or queuectl.FIRST_PAGE
            rows = self._all(self.sql.PAGE_STATE if state else self.sql.PAGE_ALL, p)
        return queuectl.page_of(rows, limit)

    def oldest_due(self, now):
        row = self._one(self.sql.OLDEST_DUE, {"now": self._clock(now),
                                              "priorities": sorted(set(queuectl.PRIORITIES.values()))})
        return row["run_at"] if row else None

    def scheduled_page(self, now, limit=50, after=None):
        run_at, seq = after if after else (float("-inf"), 0)
        p = {"now": self._clock(now), "run_at": run_at, "seq": seq, "limit": int(limit) + 1}
        rows = [r for prio in sorted(set(queuectl.PRIORITIES.values()))
                for r in self._all(self.sql.SCHEDULED_PAGE, dict(p, priority=prio))]
        rows.sort(key=lambda r: (r["run_at"], r["seq"]))
        return [Job.from_row(r) for r in rows[:limit]], len(rows) > limit

    def queue_page(self, queue, state=None, limit=50, after=None, scan=2000):
        p = {"queue": queue, "state": str(state) if state else None, "limit": int(limit) + 1, "scan": int(scan)}
        p["updated_at"], p["seq"] = after if after else (float("inf"), 2 ** 63 - 1)
        rows = sorted(self._all(self.sql.QUEUE_PAGE_STATE if state else self.sql.QUEUE_PAGE, p),
                      key=lambda r: (r["updated_at"], r["seq"]), reverse=True)
        if len(rows) > limit:
            return [Job.from_row(r) for r in rows[:limit]], True, False
        cut = self._one(self.sql.PAGE_NTH_STATE if state else self.sql.PAGE_NTH, p) is not None
        return [Job.from_row(r) for r in rows], cut, cut

    def queue_settings(self):
        return {r["name"]: {"max_running": r["max_running"], "paused": bool(r["paused"])}
                for r in self._all(self.sql.QUEUES)}

    def stats_minutes(self, since, until):
        return [dict(r, count=int(r["count"])) for r in self._all(self.sql.STATS_RANGE,
                                                                   {"since": int(since), "until": int(until)})]

    def data_version(self):
        """A fingerprint of the schema that changes with every commit that changes the queue: the
        newest job update and the running jobs' leases (index-served), the count changes not yet
        folded and the folded totals, and the row versions of the small tables."""
        return tuple(self._one(self.sql.DATA_VERSION).values())

    def stats_by_queue(self, since, until):
        p = {"since": int(since), "until": int(until)}
        return queuectl.queue_stats(self._all(self.sql.STATS_BY_QUEUE, p), self._all(self.sql.STATS_HIST_BY_QUEUE, p))

    def attempt_totals(self):
        return queuectl.totals_with_buckets(self._all(self.sql.ATTEMPT_TOTALS), self._all(self.sql.ATTEMPT_DURATIONS))

    # --- wake-up by LISTEN/NOTIFY ------------------------------------------------------

    def wait_fds(self):
        """The LISTEN connection's socket (opened on first use; re-opened, at most every
        LISTEN_RETRY seconds, after it broke).  [] while it is unavailable: the worker polls."""
        if self._listen is None and time.monotonic() >= self._listen_retry_at:
            try:
                conn, pooler = self._open(self.listen_conninfo, not self._listen_warned)  # (prepares nothing)
                try:
                    conn.execute('LISTEN "%s"' % self.channel)
                except BaseException:
                    conn.close()
                    raise
                self._listen = conn
                if pooler:
                    self._listen_warned = True  # once: in session mode it works
                    queuectl.log.warning(
                        "%s looks like a connection pooler (it refuses startup options): through PgBouncer in "
                        "transaction mode LISTEN loses every notification and workers only poll; set %s to the "
                        "PostgreSQL server's own address", self.listen_path, LISTEN_URL_ENV)
            except psycopg.Error as e:
                self._listen_retry_at = time.monotonic() + LISTEN_RETRY
                queuectl.log.warning("cannot LISTEN on %s (%s); polling instead", self.listen_path, _one_line(e))
                return []
        return [self._listen.fileno()] if self._listen is not None else []

    def consume_notifications(self):
        """Read and discard what arrived on the LISTEN connection.  True when a cancel asked busy
        workers to look at their job (or the connection broke: look now, then poll until it is
        back); "jobs are due" notifications return False (see Store.consume_notifications)."""
        conn = self._listen
        if conn is None:
            return False
        got = False
        try:
            # A server that ends the session sends an error, then closes the socket: the socket stays
            # readable after everything was consumed only at end of file, and consume_input raises then.
            for _ in range(2):
                conn.pgconn.consume_input()
                while True:
                    note = conn.pgconn.notifies()
                    if note is None:
                        break
                    got = got or note.extra == b"cancel"
                if conn.pgconn.status != psycopg.pq.ConnStatus.OK:
                    raise psycopg.OperationalError("the server closed the connection")
                if not select.select([conn.fileno()], [], [], 0)[0]:
                    break
        except psycopg.Error as e:
            queuectl.log.warning("LISTEN connection to %s lost (%s); polling until it is back",
                                 self.listen_path, _one_line(e))
            self._close_listen()
            self._listen_retry_at = time.monotonic() + LISTEN_RETRY
            return True
        return got

    def _close_listen(self):
        if self._listen is not None:
            with contextlib.suppress(Exception):
                self._listen.close()
            self._listen = None

    def close(self):
        self._close_listen()
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None

    # --- the queries of StoreRules (run inside _transaction, on its cursor) -----------

    @contextlib.contextmanager
    def _transaction(self):
        with self._cursor(transaction=True) as cur, self._in(cur):
            yield

    @contextlib.contextmanager
    def _in(self, cur):
        """The queries below run on ``cur`` (a transaction's cursor) in this block."""
        self._cur = cur
        try:
            yield
        finally:
            self._cur = None

    def _time(self, now):
        return self._now(now, self._cur)

    def _wake(self, n):
        self._cur.execute(self.sql.NOTIFY, {"channel": self.channel})  # delivered at commit, to every listening worker

    def _tidy(self):
        """Fold the count changes and run events logged since the last fold."""
        with self._cursor() as cur:
            cur.execute(self.sql.FOLD, {"fold_lock": self._fold_lock})

    def _fetch_job(self, job_id):
        return self._cur.execute(self.sql.GET_JOB, {"id": job_id}).fetchone()

    def _state(self, job_id):
        row = self._cur.execute(self.sql.JOB_STATE, {"id": job_id}).fetchone()
        return row["state"] if row else None

    def _id_taken(self, job_id):
        return self._cur.execute(self.sql.JOB_EXISTS, {"id": job_id}).fetchone() is not None

    def _holder_of(self, key):
        row = self._cur.execute(self.sql.BY_UNIQUE_KEY, {"key": key}).fetchone()
        return row["id"] if row else None

    def _dependency_states(self, job_ids):
        """Locked (FOR SHARE) so that none of them can end unseen before this enqueue commits."""
        return {r["id"]: r["state"] for r in self._cur.execute(self.sql.LOCK_STATES, {"ids": sorted(job_ids)})}

    def _insert_job(self, job, job_id, state, now):
        row = queuectl.job_record(job)
        run_abs, run_in = self._at(row["run_at"], now)
        params = {f: row.get(f) for f, _ in ENQUEUE_FIELDS}
        params.update(id=job_id, now=self._clock(now), state=state, run_at=run_abs, run_in=run_in)
        try:
            with self._cur.connection.transaction():  # a savepoint: a failed insert leaves the rest
                self._cur.execute(self.sql.INSERT_JOB, params)
        except psycopg.errors.UniqueViolation as e:
            raise (KeyHeld if getattr(e.diag, "constraint_name", None) == "jobs_unique_key" else IdTaken)() from None

    def _wait_for(self, job_id, deps):
        for dep in deps:
            self._cur.execute(self.sql.INSERT_DEP, {"id": job_id, "dep": dep})
        self._cur.execute(self.sql.DROP_DONE_EDGES, {"id": job_id})

    def _stored_webhook_url(self, row):
        if "global_webhook" in row:  # (finish reads it with the job)
            return row["global_webhook"]
        found = self._cur.execute(self.sql.GLOBAL_WEBHOOK).fetchone()
        return found["value"] if found else None

    def _insert_webhook(self, job_id, url, payload, at):
        self._cur.execute(self.sql.WEBHOOK_INSERT, {"job_id": job_id, "url": url, "payload": payload, "at": at})

    def job_webhooks(self, job_id):
        return [queuectl.webhook_status(r) for r in self._all(self.sql.JOB_WEBHOOKS, {"id": job_id})]

    def _take_dependents(self, job_id):
        """In a statement of its own: its snapshot, taken after the job's row was locked, has every
        edge an enqueue committed while it held the job (FOR SHARE)."""
        return [r["job_id"] for r in self._cur.execute(self.sql.TAKE_DEPENDENTS, {"id": job_id})]

    def _release_if_ready(self, job_id, at):
        """The job is locked first, so two dependencies that end at once cannot both leave it waiting."""
        self._cur.execute(self.sql.LOCK_JOB, {"id": job_id})
        return self._cur.execute(self.sql.RELEASE_IF_READY, {"id": job_id, "at": at}).fetchone() is not None

    def _cancel_unstarted(self, job_id, at, error):
        self._cur.execute(self.sql.LOCK_JOB, {"id": job_id})
        if self._cur.execute(self.sql.CANCEL_JOB, {"id": job_id, "at": at, "error": error}).fetchone() is None:
            return False
        self._cur.execute(self.sql.DROP_EDGES_FROM, {"id": job_id})
        return True

    def _request_cancel(self, job_id):
        if not self._cur.execute(self.sql.REQUEST_CANCEL, {"id": job_id}).rowcount:
            return False
        self._cur.execute(self.sql.NOTIFY_CANCEL, {"channel": self.channel})  # its worker checks at once
        return True

    def _any_expired(self, at):
        return self._one(self.sql.ANY_EXPIRED, {"at": at}) is not None

    def _lost_runs(self, at, dead_workers):
        """Locked, skipping rows another rescuer holds: several machines rescuing at once never
        count a lost run twice."""
        return self._cur.execute(self.sql.LOST_JOBS, {"at": at, "dead": dead_workers}).fetchall()

    def _lose_run(self, row, at, state, why):
        p = {"id": row["id"], "n": row["runs"], "at": at, "state": state, "error": why,
             "queue": row["queue"]}
        if self._cur.execute(self.sql.LOSE_JOB, p).rowcount != 1:
            return False
        self._cur.execute(self.sql.LOSE_ATTEMPT, p)  # (and its event)
        return True

    def _delete_worker(self, worker_id):
        self._cur.execute(self.sql.WORKER_DELETE, {"worker": worker_id})

    def _retry(self, job_id, at, reset_attempts, states=("dead",)):
        try:
            with self._cur.connection.transaction():  # a savepoint
                p = {"now": at, "id": job_id, "reset": bool(reset_attempts), "states": list(states)}
                return self._cur.execute(self.sql.RETRY_DEAD, p).rowcount == 1
        except psycopg.errors.UniqueViolation:
            raise KeyHeld() from None

    def _dead_ids(self):
        return [r["id"] for r in self._cur.execute(self.sql.DEAD_IDS)]

    def _delete_jobs(self, states):
        gone = [r["id"] for r in self._cur.execute(self.sql.DELETE_JOBS, {"states": states})]
        if not gone:
            return 0, []
        self._cur.execute(self.sql.DROP_ORPHAN_EDGES, {"ids": gone})
        return len(gone), [r["job_id"] for r in self._cur.execute(self.sql.WAITING_ON, {"ids": gone})]

    def _missing_dependency(self, job_id):
        self._cur.execute(self.sql.LOCK_JOB, {"id": job_id})
        row = self._cur.execute(self.sql.MISSING_DEP, {"id": job_id}).fetchone()
        return row["depends_on"] if row else None

    def _purge_batch(self, state, before, limit):
        return self._cur.execute(self.sql.PURGE, {"state": state, "before": before, "limit": limit}).fetchone()["n"]

    def _add_queue(self, name):
        self._cur.execute(self.sql.ADD_QUEUE, {"queue": name})

    def _set_queue_limit(self, name, max_running):
        self._cur.execute(self.sql.SET_QUEUE_LIMIT, {"m": max_running, "queue": name})

    def _set_queue_paused(self, name, paused):
        self._cur.execute(self.sql.SET_QUEUE_PAUSED, {"p": paused, "queue": name})

    def _insert_schedule(self, row, now):
        with self._cursor() as cur:
            try:
                cur.execute(self.sql.SCHEDULE_INSERT, dict(row, now=self._clock(now)))
            except psycopg.errors.UniqueViolation:
                return False
        return True

    def _delete_schedule(self, name):
        with self._cursor() as cur:
            return cur.execute(self.sql.SCHEDULE_DELETE, {"name": name}).rowcount == 1

    def _pause_schedule(self, name, paused, next_run):
        with self._cursor() as cur:
            return cur.execute(self.sql.SCHEDULE_PAUSE, {"p": paused, "name": name, "next_run": next_run}).rowcount == 1

    def _schedules_due(self, at):
        return self._one(self.sql.SCHEDULE_ANY_DUE, {"at": at}) is not None

    def _due_schedules(self, at):
        """Locked, skipping those another process holds: one job per tick, however many
        supervisors on however many machines fire it."""
        return self._cur.execute(self.sql.SCHEDULES_DUE, {"at": at}).fetchall()

    def _advance_schedule(self, name, next_run, last_run, job_id):
        self._cur.execute(self.sql.SCHEDULE_ADVANCE, {"name": name, "next_run": next_run, "last_run": last_run,
                                                      "job": job_id})
