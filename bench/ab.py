#!/usr/bin/env python3
"""A/B drain of two source trees: `python3 bench/ab.py OLD_DIR NEW_DIR [--jobs N] [--workers 1,2] [--reps 3]`.

Each run imports queuectl from one tree, queues N `true` jobs in a fresh database and drains them
with W in-process workers (forked, `burst` mode, no supervisor), alternating the two trees so
that both see the same machine; prints jobs/s per run and the medians.  For a change to the
worker or the store, with `git worktree add /tmp/old HEAD~1` as OLD_DIR (docs/performance.md,
"What the measurements changed" figures were taken this way).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
import queuectl
db, n, workers = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
store = queuectl.SqliteStore(db)
now = time.time()
store.enqueue([queuectl.validate_job({"command": "true"}, store.config(), now) for _ in range(n)], now)
store.close()
r, w = os.pipe()
pids = []
for _ in range(workers):
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.read(r, 1)  # start together
        code = 0
        try:
            queuectl.Worker(db, burst=True).run()
        except BaseException:
            code = 1
        os._exit(code)
    pids.append(pid)
os.close(r)
t0 = time.monotonic()
os.write(w, b"x" * workers)
failed = 0
for pid in pids:
    failed += os.waitpid(pid, 0)[1] != 0
dt = time.monotonic() - t0
done = queuectl.SqliteStore(db).counts().get("completed", 0)
if failed or done != n:
    sys.exit("a worker failed or jobs are missing: %d of %d completed" % (done, n))
print(n / dt)
"""


def drain(tree, n, workers, tmp):
    db = os.path.join(tmp, "ab-%d.db" % os.getpid())
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.unlink(db + suffix)
    out = subprocess.run([sys.executable, "-c", CHILD, tree, db, str(n), str(workers)], capture_output=True,
                         text=True, check=True)
    return float(out.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--jobs", type=int, default=3000)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    trees = {"old": os.path.abspath(args.old), "new": os.path.abspath(args.new)}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in [int(w) for w in args.workers.split(",")]:
            rates = {"old": [], "new": []}
            for _ in range(args.reps):
                for name, tree in trees.items():
                    rates[name].append(drain(tree, args.jobs, workers, tmp))
            old, new = statistics.median(rates["old"]), statistics.median(rates["new"])
            print("%d worker(s), %d jobs: old %s -> new %s jobs/s; medians %.0f -> %.0f (%.2fx)" % (
                workers, args.jobs, ", ".join("%.0f" % r for r in rates["old"]),
                ", ".join("%.0f" % r for r in rates["new"]), old, new, new / old))


if __name__ == "__main__":
    main()
