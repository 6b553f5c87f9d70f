"""Contention: many processes on one database at once, as the real program runs.

- 8 enqueuer processes and 4 workers hammer the database together: no
  "database is locked" ever reaches a user (every enqueue exits 0; 75 would be
  the documented "busy, retry" code, and must not be needed under this load),
  and no job is lost or run twice.
- 8 processes enqueue the same id at the same instant: exactly one wins, the
  other seven exit 4 with one clear line, and the job exists once.
"""

import json
import os
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import conftest
from conftest import db_rows, program, wait_until

pytestmark = pytest.mark.e2e

ENQUEUERS = 8
PER_ENQUEUER = 6  # commands per enqueuer: 4 single jobs and 2 batches of 3


def test_8_enqueuers_and_4_workers_nothing_locked_nothing_lost(run, db, workers, tmp_path):
    ledger = tmp_path / "ledger"
    workers.start(2)
    workers.start(2)
    results = []
    lock = threading.Lock()

    def enqueuer(k):
        for i in range(PER_ENQUEUER):
            jid = "e%d-%02d" % (k, i)
            if i % 3 == 2:  # some batches from stdin, the rest one job per command
                batch = [jid + "-%d" % b for b in range(3)]
                stdin = "".join(json.dumps({"id": b, "command": "echo %s >> %s" % (b, ledger)}) + "\n"
                                for b in batch)
                r = run("enqueue", "-", stdin=stdin)
                ids = batch
            else:
                r = run("enqueue", json.dumps({"id": jid, "command": "echo %s >> %s" % (jid, ledger),
                                               "priority": ("high", "medium", "low")[i % 3]}))
                ids = [jid]
            with lock:
                results.append((ids, r))

    with ThreadPoolExecutor(ENQUEUERS) as pool:
        list(pool.map(enqueuer, range(ENQUEUERS)))

    acked = []
    for ids, r in results:
        assert "locked" not in r.err.lower() and "Traceback" not in r.err, r.err
        assert r.rc != 75, "busy (75) under a load this small: %s" % r.err
        assert r.rc == 0 and r.err == "", r
        assert r.out.split() == ids
        acked += ids
    batches = PER_ENQUEUER // 3
    assert len(acked) == ENQUEUERS * (PER_ENQUEUER - batches + 3 * batches)

    def all_completed():
        return db_rows(db, "SELECT count(*) FROM jobs WHERE state = 'completed'")[0][0] == len(acked)

    wait_until(all_completed, 60, message="not every acknowledged job completed")
    assert sorted(r[0] for r in db_rows(db, "SELECT id FROM jobs")) == sorted(acked)
    lines = ledger.read_text().split()
    assert sorted(lines) == sorted(acked), "a job was lost or ran twice"
    assert db_rows(db, "SELECT count(*) FROM attempts")[0][0] == len(acked)
    assert db_rows(db, "SELECT count(DISTINCT worker_id) FROM attempts")[0][0] >= 2
    for i in range(2):
        assert "Traceback" not in workers.log(i) and "locked" not in workers.log(i), workers.log(i)


def _open_fds_name(pid, path):
    try:
        return any(os.path.realpath(os.path.join("/proc/%d/fd" % pid, fd)) == str(path)
                   for fd in os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return False


def test_8_processes_enqueue_the_same_id_at_once_exactly_one_wins(db, tmp_path):
    """All 8 have opened the database and wait for their job on stdin; then they get it together."""
    doc = json.dumps({"id": "same", "command": "true"}) + "\n"
    procs = [subprocess.Popen(program() + ["enqueue", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=conftest.program_env(db), cwd=str(tmp_path))
             for _ in range(ENQUEUERS)]
    try:
        # the database exists once the first of them has created it; then each must have it open
        wait_until(lambda: db.exists() and all(_open_fds_name(p.pid, db) for p in procs), 30,
                   message="enqueuers did not all open the database")
        for p in procs:
            p.stdin.write(doc.encode())
        for p in procs:
            p.stdin.close()
            p.stdin = None  # written and closed: communicate() only collects the output
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0] + [4] * (ENQUEUERS - 1), (codes, [e for _, e in outs])
    for p, (out, err) in zip(procs, outs):
        err = err.decode()
        assert "Traceback" not in err
        if p.returncode == 0:
            assert out == b"same\n" and err == ""
        else:
            assert out == b""
            lines = err.splitlines()
            assert len(lines) == 1 and lines[0].startswith("queuectl: error: ") and "same" in lines[0] \
                and "already exists" in lines[0], err
    assert db_rows(db, "SELECT count(*) FROM jobs WHERE id = 'same'")[0][0] == 1
    assert db_rows(db, "SELECT count(*) FROM jobs")[0][0] == 1
