#!/usr/bin/env python3
"""Fill a database with an hour of realistic traffic, open the dashboard in
headless Chromium and save screenshots (docs/dashboard.png, and the job view
in docs/dashboard-job.png).

    .venv/bin/python tests/screenshot.py [--out docs] [--dark] [--keep DIR]

Uses the real program: `worker start --foreground` runs the jobs that are
shown running, `dashboard --port 0` serves the page.  Every process it starts
is killed by PID at the end.  Needs Debian's Chromium at /usr/bin/chromium and
Playwright for Python (never downloads a browser).
"""

import argparse
import contextlib
import math
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import queuectl  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

# (id prefix or None, command, typical run time in seconds, output)
KINDS = [
    ("thumb", "convert /srv/uploads/in/IMG_{n}.jpg -resize 1600x -quality 82 /srv/uploads/web/IMG_{n}.jpg", 0.8,
     "IMG_{n}.jpg 4032x3024 => 1600x1200 (412 KiB)\n"),
    ("invoice-pdf", "python3 -m billing.render_invoice --id {n} --out /srv/invoices/{n}.pdf", 2.4,
     "rendering invoice {n}\nwrote /srv/invoices/{n}.pdf (3 pages)\n"),
    ("mail", "python3 manage.py send_digest_emails --batch 500 --offset {n}", 6.5,
     "selected 500 recipients\nsent 497, bounced 3\n"),
    (None, "rsync -a --delete /srv/media/ backup01:/srv/media/", 14.0,
     "sending incremental file list\nsent 1,284,332 bytes  received 3,211 bytes  128,754.30 bytes/sec\n"),
    ("reindex-shard", "./bin/reindex --shard {s} --since 2026-11-29T00:00:00Z", 21.0,
     "shard {s}: 18,204 documents reindexed in 20.7s\n"),
    (None, "curl -fsS -X POST https://hooks.example.com/v1/sync -d @/var/spool/sync/{n}.json", 0.4, ""),
    ("transcode", "ffmpeg -loglevel error -i /srv/video/raw/talk-{s}.mov -c:v libx264 -crf 23 /srv/video/web/talk-{s}.mp4",
     48.0, "frame= 8127 fps=171 q=-1.0 Lsize=  104857kB time=00:04:31.00 bitrate=3164.7kbits/s\n"),
]
# What a failed run of each kind looks like: (exit code or None for a timeout, error, output)
ERRORS = {
    1: (1, "exit code 1", "rendering invoice\nTraceback (most recent call last):\n"
                          "  File \"billing/render_invoice.py\", line 88, in render\n    rate = customer.tax['vat_rate']\n"
                          "KeyError: 'vat_rate'\n"),
    3: (12, "exit code 12", "rsync: connection unexpectedly closed (0 bytes received so far) [sender]\n"
                            "rsync error: error in rsync protocol data stream (code 12) at io.c(231)\n"),
    5: (22, "exit code 22", "curl: (22) The requested URL returned error: 503\n"),
    6: (None, "timed out after 300s; process group killed", "frame= 2210 fps=7.4 q=28.0 size=   28160kB\n"),
}
GENERIC_ERROR = (1, "exit code 1", "error: upstream returned 502 Bad Gateway\n")


def fill(store, now, rng):
    """About an hour of traffic, simulated with injected time through the Store API."""
    cfg = store.config()
    store.conn.execute("PRAGMA synchronous = OFF")  # a throwaway database: fill it fast
    t = now - 3600
    n = 4800
    while t < now - 75:
        minute = (t - (now - 3600)) / 60.0
        rate = 16 + 9 * math.sin(minute / 9.0) + rng.uniform(-3, 3)  # jobs per minute
        outage = 37 <= minute <= 41  # an upstream API had a bad few minutes
        kind = rng.choices(range(len(KINDS)), weights=[26, 12, 6, 2, 3, 16, 1])[0]
        prefix, command, run, output = KINDS[kind]
        n += 1
        s = "%02d" % rng.randint(1, 24)
        job_id = "%s-%d" % (prefix, n) if prefix else None
        spec = {"command": command.format(n=n, s=s), "priority": rng.choices(["high", "medium", "low"], [2, 6, 2])[0],
                "max_retries": {1: 2, 5: 1}.get(kind, 3)}
        if job_id:
            spec["id"] = job_id
        if kind == 5:
            spec["queue"] = "webhooks"
        job = queuectl.validate_job(spec, cfg, t, cwd="/srv/app")
        store.enqueue([job], t)
        step = t + rng.uniform(0.05, 1.5)
        while True:  # run whatever is due by now: this job, and retries whose backoff has passed
            claimed = store.claim("vm-2201-a1f3", "vm", step, 15)
            if claimed is None:
                break
            k = next((i for i, kd in enumerate(KINDS) if claimed.command.startswith(kd[1].split("{")[0])), 0)
            duration = max(0.05, rng.gauss(KINDS[k][2], KINDS[k][2] * 0.25))
            fail = rng.random() < (0.7 if outage and k in (1, 5) else 0.035)
            end = step + duration
            if fail:
                code, error, out = ERRORS.get(k, GENERIC_ERROR)
                state, retry_at = queuectl.after_failure(claimed, cfg, end)
                outcome = "timeout" if code is None else "failed"
                store.finish(claimed.id, claimed.runs, "vm-2201-a1f3", state, end, outcome, code, error, out,
                             len(out), retry_at)
            else:
                out = KINDS[k][3].format(n=claimed.id.split("-")[-1], s=s)
                store.finish(claimed.id, claimed.runs, "vm-2201-a1f3", "completed", end, "completed", 0, None, out,
                             len(out))
            step += 0.01
        t += 60.0 / max(1.0, rate)
    # Nothing of the simulated past may be due when real workers start (they would run it):
    # run what is due now; a failure waits minutes for its retry.
    step = now - 2
    while True:
        claimed = store.claim("vm-2201-a1f3", "vm", step, 15)
        if claimed is None:
            break
        end = step + 0.3
        if rng.random() < 0.3:
            state, _ = queuectl.after_failure(claimed, cfg, end)
            store.finish(claimed.id, claimed.runs, "vm-2201-a1f3", state, end, "failed", 1, "exit code 1",
                         GENERIC_ERROR[2], len(GENERIC_ERROR[2]), end + rng.uniform(300, 900) if state == "failed" else None)
        else:
            store.finish(claimed.id, claimed.runs, "vm-2201-a1f3", "completed", end, "completed", 0, None, "", 0)
        step += 0.01


def wait_until(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("screenshot: timed out waiting")
        time.sleep(0.05)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs"), help="directory for the PNG files (default docs/)")
    ap.add_argument("--dark", action="store_true", help="prefers-color-scheme: dark (writes *-dark.png)")
    ap.add_argument("--width", type=int, default=1440)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--keep", metavar="DIR", help="use and keep this directory for the database")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    work = Path(args.keep or os.path.join(tempfile.gettempdir(), "queuectl-demo"))
    work.mkdir(parents=True, exist_ok=True)
    db = work / "queue.db"
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(db) + suffix)
    rng = random.Random(20261129)
    now = time.time()
    store = queuectl.SqliteStore(str(db))
    fill(store, now, rng)
    store.set_config("worker-poll-interval", 0.2)
    store.close()

    env = dict(os.environ, QUEUECTL_DB=str(db), NO_COLOR="1")
    cmd = [sys.executable, str(ROOT / "queuectl.py")]
    procs = []
    try:
        workers = subprocess.Popen(cmd + ["worker", "start", "--foreground", "-c", "4"], env=env, cwd=str(work),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        procs.append(workers)
        # The running jobs call stand-ins from work/bin that print a line and sleep: they look
        # like the real thing on the page and touch nothing.
        fake_bin = work / "bin"
        fake_bin.mkdir(exist_ok=True)
        for tool, line in (("pg_dump", "pg_dump: dumping contents of table \"public.events\""),
                           ("ffmpeg", "frame= 1184 fps= 38 q=28.0 size=   11264kB time=00:00:39.46 speed=1.27x"),
                           ("reindex", "shard 07: 4,112 of 18,204 documents"), ("rsync", "")):
            script = fake_bin / tool
            script.write_text("#!/bin/sh\necho '%s'\nexec sleep 900\n" % line.replace("'", ""))
            script.chmod(0o755)
        running = [
            ("backup-db-nightly", "high", "pg_dump -Fc app_production -f /var/backups/pg/app-nightly.dump"),
            ("transcode-talk-17", "medium",
             "ffmpeg -loglevel error -i /srv/video/raw/talk-17.mov -c:v libx264 -crf 23 /srv/video/web/talk-17.mp4"),
            ("reindex-shard-07", "medium", "./bin/reindex --shard 07 --since 2026-11-29T00:00:00Z"),
            (None, "low", "rsync -a --delete /srv/media/ backup01:/srv/media/"),
        ]
        store = queuectl.SqliteStore(str(db))
        cfg = store.config()
        t0 = time.time()
        for i, (jid, prio, command) in enumerate(running):
            spec = {"command": command, "priority": prio, "timeout": 3600,
                    "env": {"PATH": "%s:/usr/bin:/bin" % fake_bin}}
            if jid:
                spec["id"] = jid
            store.enqueue([queuectl.validate_job(spec, cfg, t0 - 40 * (i + 1), cwd=str(work))], t0 - 40 * (i + 1))
        wait_until(lambda: store.counts()["processing"] >= 4)
        # Work waiting behind the busy workers; the oldest has waited a while.
        later = time.time()
        for i in range(27):
            prefix, command, _, _ = KINDS[[0, 0, 1, 5, 5, 2][i % 6]]
            n = 9100 + i
            spec = {"command": command.format(n=n, s="03"), "priority": ["medium", "low", "high"][i % 3]}
            if prefix:
                spec["id"] = "%s-%d" % (prefix, n)
            store.enqueue([queuectl.validate_job(spec, cfg, later - 48 + i, cwd="/srv/app")], later - 48 + i)
        store.close()

        dash = subprocess.Popen(cmd + ["dashboard", "--port", "0"], env=env, cwd=str(work), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        procs.append(dash)
        line = dash.stdout.readline().decode()
        url = line.split()[-1]
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        suffix = "-dark" if args.dark else ""
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": args.width, "height": args.height},
                                    color_scheme="dark" if args.dark else "light", device_scale_factor=1)
            page.goto(url)
            page.wait_for_selector("#jobs tbody tr[data-id]")
            page.wait_for_selector("#chart svg rect.bar-ok")
            page.wait_for_selector("#workers tbody tr[data-worker]")
            page.wait_for_function("document.getElementById('live').dataset.mode === 'live'")
            page.mouse.move(5, 5)
            page.screenshot(path=str(out / ("dashboard%s.png" % suffix)))
            page.click(".stat.st-dead")
            page.wait_for_selector("#jobs tbody tr:has(.badge-dead)")
            page.click("#jobs tbody tr:has(.badge-dead)")
            page.wait_for_selector("#job-attempts tbody tr[data-attempt]")
            page.screenshot(path=str(out / ("dashboard-job%s.png" % suffix)))
            browser.close()
        print("wrote %s and %s" % (out / ("dashboard%s.png" % suffix), out / ("dashboard-job%s.png" % suffix)))
    finally:
        pids = set()
        with contextlib.suppress(sqlite3.Error):
            conn = sqlite3.connect(str(db))
            pids = {r[0] for r in conn.execute("SELECT pid FROM attempts WHERE pid IS NOT NULL AND ended_at IS NULL")}
            conn.close()
        for p in procs:
            with contextlib.suppress(OSError):
                os.kill(p.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                p.wait(10)
        with contextlib.suppress(sqlite3.Error):
            conn = sqlite3.connect(str(db))
            pids |= {r[0] for r in conn.execute("SELECT pid FROM workers")}
            conn.close()
        for pid in pids:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
