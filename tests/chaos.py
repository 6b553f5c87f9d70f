#!/usr/bin/env python3
"""Chaos suite: run queuectl under ``kill -9`` and check that nothing is lost.

One command::

    python3 tests/chaos.py --rounds 20 --jobs 500 --kill-every 1-2

Each round starts several worker supervisors (``worker start --foreground``),
enqueues ``--jobs`` jobs of mixed priority from concurrent ``enqueue``
processes while the workers run, and meanwhile ``kill -9``s a random worker
process, or a whole supervisor with its workers, every 1-2 s, starting new
ones in their place.  The jobs are of four kinds:

- ``ok``: append its id to a ledger file and succeed;
- ``fail``: exit 3 (retried, then dead);
- ``timeout``: sleep far past its timeout (some ignore SIGTERM, so only the
  SIGKILL after ``kill-grace`` stops them);
- ``tree``: start a background grandchild, then sleep past its timeout.

Every job process writes its pid to a file and carries a per-run marker in its
environment.  When every acknowledged job has ended, the workers are stopped
gracefully and the round is checked:

- no acknowledged job is missing, every job ended ``completed`` or ``dead``
  (its expected end: ``ok`` jobs completed and in the ledger, the others dead),
  none is left ``processing``, no attempt is left open;
- duplicate runs (ledger lines beyond the first) never exceed the number of
  worker processes killed, and are zero in a round without kills;
- no process of any job survives (timed out, lost with its worker, or
  started by a killed worker before its pid was recorded): checked in /proc;
- ``PRAGMA integrity_check`` is ok and the per-state counters match the rows;
- every supervisor stops on SIGTERM with exit status 0.

One summary line per round, a total line, exit status 1 on any violation.
``--program`` chooses the program (``queuectl.py`` or ``dist/queuectl.pyz``;
default: $QUEUECTL_CMD, else ../queuectl.py).  Linux only (/proc).
``--db postgresql://USER@HOST/DB?schema=NAME`` runs the same rounds on
PostgreSQL (needs psycopg); there the integrity check is amcheck's
(``verify_heapam`` and ``bt_index_check`` over the schema) instead of SQLite's.
"""

import argparse
import collections
import contextlib
import json
import os
import random
import shlex
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KINDS = ("ok", "fail", "timeout", "tree")
MIX = {"ok": 0.70, "fail": 0.10, "timeout": 0.10, "tree": 0.10}
FINAL = ("completed", "dead")
# Settings of the chaos database: short grace so ignored SIGTERMs cost little,
# minimal backoff, and enough rescues that an "ok" job never lands in the DLQ
# only because it was unlucky (it must complete).
CHAOS_CONFIG = {"kill-grace": "0.3", "backoff-base": "1", "max-rescues": "1000", "job-timeout": "120"}


###############################################################################
# /proc helpers
###############################################################################


def proc_stat(pid):
    """``(ppid, pgid, sid, state)`` of a live process, or None."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[1]), int(fields[2]), int(fields[3]), fields[0].decode()


def all_pids():
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def alive(pid):
    st = proc_stat(pid)
    return st is not None and st[3] not in ("Z", "X")


def environ(pid):
    try:
        with open("/proc/%d/environ" % pid, "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def children_of(parents):
    parents = set(parents)
    result = []
    for pid in all_pids():
        st = proc_stat(pid)
        if st and st[0] in parents and st[3] not in ("Z", "X"):
            result.append(pid)
    return result


def tagged_processes(tag):
    """Live processes whose environment carries ``CHAOS_TAG=tag``: ``{pid: (pgid, job id)}``."""
    needle = ("CHAOS_TAG=%s" % tag).encode()
    found = {}
    me = os.getpid()
    for pid in all_pids():
        if pid == me:
            continue
        st = proc_stat(pid)
        if st is None or st[3] in ("Z", "X"):
            continue
        env = environ(pid)
        if needle in env:
            job = next((e[len(b"QUEUECTL_JOB_ID="):].decode("utf-8", "replace") for e in env
                        if e.startswith(b"QUEUECTL_JOB_ID=")), "?")
            found[pid] = (st[1], job)
    return found


def kill(pid, sig=signal.SIGKILL):
    try:
        os.kill(pid, sig)
        return True
    except OSError:
        return False


###############################################################################
# Jobs
###############################################################################


def make_jobs(rng, prefix, n, tag, workdir):
    """``n`` job documents of mixed kind and priority: ``[(id, kind, doc)]``."""
    kinds = []
    for kind in KINDS:
        kinds += [kind] * int(round(MIX[kind] * n))
    while len(kinds) < n:
        kinds.append("ok")
    kinds = kinds[:n]
    rng.shuffle(kinds)
    jobs = []
    record = 'echo "$$ $QUEUECTL_JOB_ID $QUEUECTL_ATTEMPT" >> pids; '
    for i, kind in enumerate(kinds):
        jid = "%s%04d" % (prefix, i)
        doc = {"id": jid, "priority": rng.choice(["high", "medium", "low"]), "cwd": workdir,
               "env": {"CHAOS_TAG": tag}}
        if kind == "ok":
            doc["command"] = record + "sleep 0.%02d; echo \"$QUEUECTL_JOB_ID\" >> ledger" % rng.randint(1, 30)
            doc["max_retries"] = 0  # it never fails on its own: a retry would only hide a bug
        elif kind == "fail":
            doc["command"] = record + "exit 3"
            doc["max_retries"] = rng.randint(0, 2)
        elif kind == "timeout":
            trap = "trap '' TERM; " if rng.random() < 0.35 else ""
            doc["command"] = record + trap + "sleep 600"
            doc["timeout"] = round(rng.uniform(0.3, 1.0), 2)
            doc["max_retries"] = 0
        else:  # tree
            doc["command"] = record + 'sleep 600 & echo "$! $QUEUECTL_JOB_ID g" >> pids; sleep 600'
            doc["timeout"] = round(rng.uniform(0.3, 1.0), 2)
            doc["max_retries"] = rng.randint(0, 1)
        jobs.append((jid, kind, doc))
    return jobs


###############################################################################
# Checking a round (pure: facts in, summary and violations out)
###############################################################################


def check_round(facts):
    """Judge one round.

    ``facts`` holds: ``kinds`` {id: kind} of the jobs the round meant to
    enqueue; ``acked`` (ids whose enqueue printed them); ``rows``
    {id: (state, attempts rows, open attempts)} from the database;
    ``ledger`` [ids]; ``workers_killed``; ``orphans`` {pid: (pgid, job)};
    ``integrity`` (text); ``counts_ok`` (bool); ``enqueue_errors`` [text];
    ``stop_failures`` [text]; ``drained`` (bool).
    Returns ``(numbers, violations)``.
    """
    kinds, acked, rows = facts["kinds"], set(facts["acked"]), facts["rows"]
    v = []
    ledger = collections.Counter(facts["ledger"])
    lost = sorted(j for j in acked if j not in rows)
    if lost:
        v.append("%d acknowledged job(s) missing from the database: %s" % (len(lost), ", ".join(lost[:5])))
    phantom = sorted(j for j in rows if j not in acked)
    if phantom:
        v.append("%d job(s) in the database whose enqueue was not acknowledged: %s"
                 % (len(phantom), ", ".join(phantom[:5])))
    by_state = collections.Counter(state for state, _, _ in rows.values())
    stuck = sorted(j for j, (state, _, _) in rows.items() if state not in FINAL)
    if stuck:
        v.append("%d job(s) did not end (%s): %s" % (
            len(stuck), ", ".join("%s %d" % kv for kv in sorted(collections.Counter(rows[j][0] for j in stuck).items())),
            ", ".join(stuck[:5])))
    open_attempts = sorted(j for j, (state, _, n_open) in rows.items() if state in FINAL and n_open)
    if open_attempts:
        v.append("%d ended job(s) with an attempt still open: %s" % (len(open_attempts), ", ".join(open_attempts[:5])))
    wrong_end = []
    for j, (state, _, _) in rows.items():
        if state not in FINAL:
            continue
        want = "completed" if kinds.get(j) == "ok" else "dead"
        if state != want:
            wrong_end.append("%s (%s) ended %s" % (j, kinds.get(j), state))
    if wrong_end:
        v.append("%d job(s) ended in the wrong state: %s" % (len(wrong_end), "; ".join(wrong_end[:5])))
    not_in_ledger = sorted(j for j, (state, _, _) in rows.items() if state == "completed" and kinds.get(j) == "ok"
                           and ledger[j] == 0)
    if not_in_ledger:
        v.append("%d completed job(s) never wrote the ledger: %s" % (len(not_in_ledger), ", ".join(not_in_ledger[:5])))
    strangers = sorted(j for j in ledger if kinds.get(j) != "ok" or rows.get(j, ("?",))[0] != "completed")
    if strangers:
        v.append("ledger lines of job(s) that did not complete: %s" % ", ".join(strangers[:5]))
    duplicates = sum(n - 1 for n in ledger.values() if n > 1)
    if duplicates > facts["workers_killed"]:
        v.append("%d duplicate run(s) but only %d worker(s) killed" % (duplicates, facts["workers_killed"]))
    if facts["orphans"]:
        v.append("%d job process(es) survived: %s" % (len(facts["orphans"]), ", ".join(
            "pid %d (group %d, job %s)" % (pid, pg, job) for pid, (pg, job) in sorted(facts["orphans"].items())[:5])))
    if facts["integrity"] != "ok":
        v.append("PRAGMA integrity_check: %s" % facts["integrity"])
    if not facts["counts_ok"]:
        v.append("the per-state job counters do not match the jobs table")
    if not facts["drained"]:
        v.append("the queue did not drain in time")
    v.extend(facts["enqueue_errors"])
    v.extend(facts["stop_failures"])
    numbers = {
        "jobs": len(kinds), "acked": len(acked), "completed": by_state["completed"], "dead": by_state["dead"],
        "lost": len(lost), "stuck": len(stuck), "processing": by_state["processing"], "duplicates": duplicates,
        "orphans": len(facts["orphans"]), "integrity": facts["integrity"],
    }
    return numbers, v


###############################################################################
# A round
###############################################################################


class Round:
    def __init__(self, opts, number, prefix, tag, workdir, kills):
        self.opts = opts
        self.number = number
        self.prefix = prefix
        self.tag = tag
        self.workdir = workdir
        self.kills_enabled = kills
        self.rng = random.Random(opts.seed * 1000 + number)
        self.supervisors = []  # Popen
        self.known_workers = set()
        self.kill_events = 0
        self.supervisor_kills = 0
        self.workers_killed = 0
        self.kill_times = {}  # worker pid -> time.time() of its kill -9
        self.acked = []
        self.enqueue_errors = []
        self.enqueue_retries = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.log_index = 0

    # --- processes -----------------------------------------------------------------

    def run_cli(self, *args, stdin=None):
        proc = subprocess.run(self.opts.cmd + ["--db", self.opts.db] + list(args), input=stdin,
                              capture_output=True, timeout=120)
        return proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")

    def start_supervisor(self):
        self.log_index += 1
        log = open(os.path.join(self.workdir, "r%02d-sup%02d.log" % (self.number, self.log_index)), "wb")
        argv = self.opts.cmd + ["--db", self.opts.db, "worker", "start", "--foreground", "-c",
                                str(self.opts.workers), "--poll-interval", "0.1"]
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        log.close()
        with self.lock:
            self.supervisors.append(proc)
        return proc

    def live_supervisors(self):
        with self.lock:
            return [p for p in self.supervisors if p.poll() is None]

    def worker_pids(self, sup_pids=None):
        pids = children_of(sup_pids if sup_pids is not None else [p.pid for p in self.live_supervisors()])
        self.known_workers.update(pids)
        return pids

    def kill_one(self):
        """kill -9 one random worker process, or a whole supervisor tree (then start a new supervisor)."""
        sups = self.live_supervisors()
        if not sups:
            return
        if self.rng.random() < 0.25:
            sup = self.rng.choice(sups)
            members = self.worker_pids([sup.pid])
            now = time.time()  # before the kills: a rescue can follow within a millisecond
            kill(sup.pid)
            sup.wait()
            for pid in members + self.worker_pids([sup.pid]):
                if kill(pid):
                    self.workers_killed += 1
                    self.kill_times[pid] = now
            self.supervisor_kills += 1
            self.kill_events += 1
            self.start_supervisor()
            return
        pids = self.worker_pids([p.pid for p in sups])
        if not pids:
            return
        pid = self.rng.choice(pids)
        now = time.time()
        if kill(pid):
            self.kill_times[pid] = now
            self.workers_killed += 1
            self.kill_events += 1

    def killer(self):
        lo, hi = self.opts.kill_every
        while not self.stop.wait(self.rng.uniform(lo, hi)):
            self.kill_one()

    # --- enqueueing ------------------------------------------------------------------

    def enqueuer(self, batches):
        for batch in batches:
            stdin = "".join(json.dumps(doc) + "\n" for _, _, doc in batch).encode()
            for attempt in range(1, 21):
                rc, out, err = self.run_cli("enqueue", "-", stdin=stdin)
                if rc == 75:  # the documented "busy, retry" exit code: nothing was written
                    self.enqueue_retries += 1
                    continue
                break
            ids = out.split()
            want = [jid for jid, _, _ in batch]
            with self.lock:
                if rc == 0 and ids == want:
                    self.acked.extend(ids)
                elif rc == 4 and attempt > 1:
                    self.enqueue_errors.append("enqueue exited 75 but had written its jobs (%s)" % err.strip())
                else:
                    self.enqueue_errors.append("enqueue of %d job(s) failed: exit %d, stdout %r, stderr %r"
                                               % (len(batch), rc, out[:200], err.strip()[:300]))

    # --- the round -------------------------------------------------------------------

    def run(self):
        t0 = time.monotonic()
        jobs = make_jobs(self.rng, self.prefix, self.opts.jobs, self.tag, self.workdir)
        kinds = {jid: kind for jid, kind, _ in jobs}
        batches, i = [], 0
        while i < len(jobs):
            size = self.rng.randint(1, 25)
            batches.append(jobs[i:i + size])
            i += size
        for _ in range(self.opts.supervisors):
            self.start_supervisor()
        threads = [threading.Thread(target=self.enqueuer, args=(batches[k::2],), daemon=True) for k in range(2)]
        killer = threading.Thread(target=self.killer, daemon=True) if self.kills_enabled else None
        if killer:
            killer.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        drained = self.wait_drained(set(self.acked), self.opts.drain_timeout)
        self.stop.set()
        if killer:
            killer.join()
        stop_failures = self.stop_supervisors()
        orphans = self.wait_orphans_gone(5.0)
        facts = self.collect(kinds)
        facts.update(orphans=orphans, drained=drained, stop_failures=stop_failures,
                     workers_killed=self.workers_killed, enqueue_errors=list(self.enqueue_errors))
        numbers, violations = check_round(facts)
        numbers.update(kills=self.kill_events, workers_killed=self.workers_killed,
                       supervisor_kills=self.supervisor_kills, seconds=time.monotonic() - t0,
                       enqueue_retries=self.enqueue_retries, rescue_max=self.rescue_max(),
                       lost_runs=len(self.lost_attempts), lost_nopid=sum(1 for a in self.lost_attempts if a[2] is None),
                       kinds=collections.Counter(kinds.values()))
        return numbers, violations

    def wait_drained(self, acked, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                rows = db_query(self.opts.db, "SELECT count(*) FROM jobs WHERE id >= ? AND id < ? AND state IN "
                                "('completed', 'dead')", (self.prefix, self.prefix + "~"))
                if rows[0][0] >= len(acked):
                    return True
            except db_errors():
                pass
            if not self.live_supervisors():  # every supervisor died on its own: nothing will drain
                return False
            self.stop.wait(0.2)
        return False

    def stop_supervisors(self):
        failures = []
        sups = self.live_supervisors()
        # A supervisor started by the last kill may still be starting up (a SIGTERM before it has
        # installed its handlers simply ends it, with nothing to lose); stop them once they run.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(len(children_of([p.pid])) < self.opts.workers for p in sups
                                                   if p.poll() is None):
            self.stop.wait(0.05)
        workers = self.worker_pids([p.pid for p in sups])
        for p in sups:
            kill(p.pid, signal.SIGTERM)
        for p in sups:
            try:
                code = p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                failures.append("supervisor %d did not stop within 60s of SIGTERM" % p.pid)
                kill(p.pid)
                p.wait()
                continue
            if code != 0:
                failures.append("supervisor %d exited %s on SIGTERM" % (p.pid, code))
        deadline = time.monotonic() + 10
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            self.stop.wait(0.05)
        left = [w for w in workers if alive(w)]
        if left:
            failures.append("worker(s) %s still running after their supervisor stopped" % left)
            for w in left:
                kill(w)
        with self.lock:
            for p in self.supervisors:
                if p.poll() is None:
                    kill(p.pid)
                    p.wait()
        return failures

    def wait_orphans_gone(self, timeout):
        """Job processes still alive after the queue drained: ``{pid: (pgid, job)}``.

        A job process is one whose environment carries this round's marker; a
        SIGKILLed group gets ``timeout`` seconds to finish exiting.  Each is
        also checked against the pids the job shells wrote (a job's shell pid
        is its process group id) to say which run it belonged to.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = tagged_processes(self.tag)
            if not found or time.monotonic() > deadline:
                recorded = self.recorded_pids()
                return {pid: (pgid, "%s%s" % (job, "" if pgid in recorded else ", group not recorded"))
                        for pid, (pgid, job) in found.items()}
            self.stop.wait(0.1)

    def recorded_pids(self):
        """pid -> job id of every job shell of this round (a job's shell pid is its process group id)."""
        result = {}
        with contextlib.suppress(OSError):
            with open(os.path.join(self.workdir, "pids")) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 2 and parts[1].startswith(self.prefix):
                        with contextlib.suppress(ValueError):
                            result[int(parts[0])] = parts[1]
        return result

    def collect(self, kinds):
        db = DbReader(self.opts.db)
        try:
            rng = (self.prefix, self.prefix + "~")
            rows = {}
            for jid, state in db.rows("SELECT id, state FROM jobs WHERE id >= ? AND id < ?", rng):
                rows[jid] = [state, 0, 0]
            for jid, n, n_open in db.rows(
                    "SELECT job_id, count(*), sum(CASE WHEN outcome IS NULL THEN 1 ELSE 0 END) FROM attempts "
                    "WHERE job_id >= ? AND job_id < ? GROUP BY job_id", rng):
                if jid in rows:
                    rows[jid][1:] = [n, n_open]
            integrity = db.integrity()
            counted = db.counters()
            actual = dict(db.rows("SELECT state, count(*) FROM jobs GROUP BY state"))
            self.lost_attempts = db.rows(
                "SELECT worker_id, ended_at, pid FROM attempts WHERE job_id >= ? AND job_id < ? AND outcome = 'lost'",
                rng)
        finally:
            db.close()
        ledger = []
        with contextlib.suppress(OSError):
            with open(os.path.join(self.workdir, "ledger")) as f:
                ledger = [line.strip() for line in f if line.strip().startswith(self.prefix)]
        return {"kinds": kinds, "acked": list(self.acked), "rows": {k: tuple(v) for k, v in rows.items()},
                "ledger": ledger, "integrity": integrity, "counts_ok": counted == actual}

    def rescue_max(self):
        """Longest time from a kill -9 of a worker to its job being recorded as lost (the rescue delay)."""
        worst = None
        for worker_id, ended_at, _ in getattr(self, "lost_attempts", []):
            with contextlib.suppress(ValueError, IndexError, TypeError):
                pid = int(worker_id.rsplit("-", 2)[1])
                if pid in self.kill_times and ended_at:
                    delay = ended_at - self.kill_times[pid]
                    if delay >= 0 and (worst is None or delay > worst):
                        worst = delay
        return worst

    def cleanup(self):
        """Kill, by pid, everything this round started that is still alive."""
        self.stop.set()
        with self.lock:
            sups = list(self.supervisors)
        members = children_of([p.pid for p in sups])
        for p in sups:
            if p.poll() is None:
                kill(p.pid)
                with contextlib.suppress(Exception):
                    p.wait(5)
        for pid in set(members) | self.known_workers:
            st = proc_stat(pid)
            if st and st[0] in {p.pid for p in sups} | {1}:
                kill(pid)
        for pid, (pgid, _) in tagged_processes(self.tag).items():
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)
            kill(pid)


def db_query(path, sql, params=()):
    db = DbReader(path)
    try:
        return db.rows(sql, params)
    finally:
        db.close()


def is_pg(db):
    return db.startswith(("postgresql://", "postgres://"))


def db_errors():
    """What reading the database may raise while workers run (an SQLite file, or PostgreSQL)."""
    errors = (sqlite3.Error,)
    with contextlib.suppress(ImportError):
        import psycopg

        errors += (psycopg.Error,)
    return errors


class DbReader:
    """Reads the chaos database straight: an SQLite file (read-only), or a PostgreSQL schema
    (``--db postgresql://...?schema=NAME``).  ``?`` placeholders for both."""

    def __init__(self, db):
        self.pg = is_pg(db)
        if self.pg:
            import psycopg

            sys.path.insert(0, ROOT)
            import queuectl_pg

            conninfo, self.schema = queuectl_pg.parse_url(db)
            self.conn = psycopg.connect(conninfo, autocommit=True, connect_timeout=30)
            self.conn.execute('SET search_path TO "%s"' % self.schema)
            self.store = queuectl_pg.PostgresStore(db)
        else:
            self.conn = sqlite3.connect("file:%s?mode=ro" % db, uri=True, timeout=30)

    def rows(self, sql, params=()):
        if self.pg:
            cur = self.conn.execute(sql.replace("?", "%s"), tuple(params) or None)
            return [tuple(r) for r in cur.fetchall()]
        return self.conn.execute(sql, params).fetchall()

    def counters(self):
        """The store's maintained per-state counts (not counted from the rows), zeros left out."""
        if self.pg:
            return {s: n for s, n in self.store.counts().items() if n}
        return {s: n for s, n in self.conn.execute("SELECT state, n FROM job_counts") if n}

    def integrity(self):
        """SQLite: PRAGMA integrity_check.  PostgreSQL: amcheck's verify_heapam and bt_index_check
        over every table and B-tree index of the schema ("ok", or what is wrong)."""
        if not self.pg:
            return "; ".join(r[0] for r in self.conn.execute("PRAGMA integrity_check"))
        try:  # created in the chaos schema (dropped with it) unless the database has it already
            self.conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
            (ext,) = self.conn.execute(
                "SELECT quote_ident(extnamespace::regnamespace::text) FROM pg_extension WHERE extname = 'amcheck'"
            ).fetchone()
        except Exception as e:  # noqa: BLE001 - reported as the integrity result
            return "not checked: amcheck unavailable (%s)" % str(e).strip().splitlines()[0]
        problems = self.conn.execute(
            "SELECT c.relname, v.msg FROM pg_class c, %s.verify_heapam(c.oid) v "
            "WHERE c.relnamespace = %%s::regnamespace AND c.relkind = 'r'" % ext, ('"%s"' % self.schema,)).fetchall()
        for (index,) in self.conn.execute(
                "SELECT c.oid::regclass::text FROM pg_class c JOIN pg_am am ON am.oid = c.relam "
                "WHERE c.relnamespace = %s::regnamespace AND c.relkind = 'i' AND am.amname = 'btree'",
                ('"%s"' % self.schema,)).fetchall():
            try:
                self.conn.execute("SELECT %s.bt_index_check(%%s::regclass, true)" % ext, (index,))
            except Exception as e:  # noqa: BLE001 - a corrupt index is a finding
                problems.append((index, str(e).strip()))
        return "; ".join("%s: %s" % p for p in problems) or "ok"

    def close(self):
        self.conn.close()
        if self.pg:
            self.store.close()


###############################################################################
# Main
###############################################################################


def parse_range(text):
    if text in ("0", "none", "off"):
        return None
    lo, _, hi = text.partition("-")
    lo, hi = float(lo), float(hi or lo)
    if not 0 < lo <= hi:
        raise argparse.ArgumentTypeError("want SECONDS or MIN-MAX with 0 < MIN <= MAX, or 0 for no kills")
    return lo, hi


def summary_line(i, rounds, n):
    rescue = "-" if n["rescue_max"] is None else "%.1fs" % n["rescue_max"]
    return ("round %d/%d: jobs %d (ok %d, fail %d, timeout %d, tree %d), completed %d, dead %d | "
            "kills %d (workers %d, supervisors %d), runs lost %d (%d before their pid was recorded), "
            "rescue max %s | lost %d, stuck %d, processing %d, duplicates %d, orphans %d, integrity %s | %.1fs" % (
                i, rounds, n["jobs"], n["kinds"]["ok"], n["kinds"]["fail"], n["kinds"]["timeout"], n["kinds"]["tree"],
                n["completed"], n["dead"], n["kills"], n["workers_killed"], n["supervisor_kills"], n["lost_runs"],
                n["lost_nopid"], rescue,
                n["lost"], n["stuck"], n["processing"], n["duplicates"], n["orphans"], n["integrity"],
                n["seconds"]))


def main(argv=None):
    p = argparse.ArgumentParser(description="queuectl chaos suite: kill -9 workers while jobs run, then check "
                                            "that nothing was lost, stuck or left running.")
    p.add_argument("--rounds", type=int, default=20, help="rounds (default 20)")
    p.add_argument("--jobs", type=int, default=500, help="jobs per round (default 500)")
    p.add_argument("--kill-every", type=parse_range, default=(1.0, 2.0), metavar="MIN-MAX",
                   help="kill -9 a worker or a supervisor tree every MIN-MAX seconds (default 1-2; 0 = never)")
    p.add_argument("--calm-rounds", type=int, default=0, metavar="N",
                   help="the first N rounds run without kills (their duplicates must be 0)")
    p.add_argument("--supervisors", type=int, default=3, help="worker supervisors (default 3)")
    p.add_argument("--workers", type=int, default=2, help="workers per supervisor (default 2)")
    p.add_argument("--program", help="queuectl.py or queuectl.pyz (default: $QUEUECTL_CMD, else ../queuectl.py)")
    p.add_argument("--db", help="database file, or a postgresql://...?schema=NAME URL to run on PostgreSQL "
                                "(default: a file in a new temporary directory)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock; printed)")
    p.add_argument("--drain-timeout", type=float, default=300.0, help="seconds a round may take to drain")
    p.add_argument("--keep", action="store_true", help="keep the work directory (ledger, pid files, logs)")
    opts = p.parse_args(argv)

    def interrupted(signum, frame):  # SIGTERM (a CI timeout) cleans up like Ctrl-C: every process, by pid
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    if not os.path.isdir("/proc"):
        p.error("needs Linux /proc")
    if opts.program:
        opts.cmd = [sys.executable, os.path.abspath(opts.program)]
    elif os.environ.get("QUEUECTL_CMD"):
        opts.cmd = shlex.split(os.environ["QUEUECTL_CMD"])
    else:
        opts.cmd = [sys.executable, os.path.join(ROOT, "queuectl.py")]
    if opts.seed is None:
        opts.seed = int(time.time()) % 100000
    workdir = tempfile.mkdtemp(prefix="queuectl-chaos-")
    if not opts.db:
        opts.db = os.path.join(workdir, "chaos.db")
    elif not is_pg(opts.db):
        opts.db = os.path.abspath(opts.db)
    tag = "%d-%d" % (os.getpid(), opts.seed)
    run_id = "c%s" % tag.replace("-", "x")
    print("chaos: program %s, db %s, %d round(s) x %d jobs, %d supervisor(s) x %d worker(s), kill -9 every %s, "
          "seed %d" % (" ".join(opts.cmd), opts.db, opts.rounds, opts.jobs, opts.supervisors, opts.workers,
                       "%g-%gs" % opts.kill_every if opts.kill_every else "never", opts.seed), flush=True)
    for key, value in CHAOS_CONFIG.items():
        proc = subprocess.run(opts.cmd + ["--db", opts.db, "config", "set", key, value], capture_output=True)
        if proc.returncode != 0:
            print("chaos: cannot configure the database: %s" % proc.stderr.decode(errors="replace").strip())
            return 2
    totals = collections.Counter()
    all_violations = []
    integrity_ok = 0
    rescue_worst = None
    t0 = time.monotonic()
    current = None
    try:
        for i in range(1, opts.rounds + 1):
            kills = opts.kill_every is not None and i > opts.calm_rounds
            current = Round(opts, i, "%s-r%02d-" % (run_id, i), "%s-r%02d" % (tag, i), workdir,
                            kills)
            try:
                numbers, violations = current.run()
            finally:
                current.cleanup()
            print(summary_line(i, opts.rounds, numbers) + ("" if kills else " [no kills]"), flush=True)
            for text in violations:
                print("  VIOLATION: %s" % text, flush=True)
            all_violations += ["round %d: %s" % (i, t) for t in violations]
            if not kills and numbers["duplicates"]:
                all_violations.append("round %d: duplicates without kills" % i)
            for key in ("jobs", "acked", "completed", "dead", "lost", "stuck", "processing", "duplicates", "orphans",
                        "kills", "workers_killed", "supervisor_kills", "enqueue_retries", "lost_runs", "lost_nopid"):
                totals[key] += numbers[key]
            integrity_ok += numbers["integrity"] == "ok"
            if numbers["rescue_max"] is not None:
                rescue_worst = max(rescue_worst or 0.0, numbers["rescue_max"])
    except KeyboardInterrupt:
        print("chaos: interrupted", flush=True)
        all_violations.append("interrupted")
    finally:
        if current is not None:
            current.cleanup()
    verdict = "FAIL" if all_violations else "PASS"
    print("TOTAL %d round(s): %d jobs, %d acknowledged, %d completed, %d dead | kills %d (workers %d, supervisors %d),"
          " runs lost %d (%d before their pid was recorded), rescue max %s | lost %d, stuck %d, processing %d, "
          "duplicates %d, orphans %d, integrity ok %d/%d | enqueue busy retries %d | %.0fs | %s" % (
              opts.rounds, totals["jobs"], totals["acked"], totals["completed"], totals["dead"], totals["kills"],
              totals["workers_killed"], totals["supervisor_kills"], totals["lost_runs"], totals["lost_nopid"],
              "-" if rescue_worst is None else "%.1fs" % rescue_worst, totals["lost"], totals["stuck"],
              totals["processing"], totals["duplicates"], totals["orphans"], integrity_ok, opts.rounds,
              totals["enqueue_retries"], time.monotonic() - t0, verdict), flush=True)
    if all_violations or opts.keep:
        print("chaos: work directory kept: %s" % workdir, flush=True)
    else:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if all_violations else 0


if __name__ == "__main__":
    sys.exit(main())
