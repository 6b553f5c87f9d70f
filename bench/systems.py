"""The queues under test, behind one small interface.

Each system: ``setup()`` (False + ``why`` when it cannot run here),
``start_workers(n)`` (returns when n idle workers wait for work),
``enqueue(command)`` (one job, the system's normal way), ``done()`` (how many
jobs finished), ``stop_workers()`` and ``teardown()``.  Every process a system
starts is stopped by PID (or its own process group) in ``stop_workers``.

The peers are installed by the benchmark itself, never as project
dependencies: Python ones into their own virtualenv under build/bench-env,
task-spooler and nq with apt-get (when it runs as root).
"""

import contextlib
import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from lib import PY, ROOT, cli_env, kill_group, kill_pids, run_quiet, wait_for

sys.path.insert(0, str(ROOT))
import queuectl  # noqa: E402

PEER_ENV = ROOT / "build" / "bench-env"
PEER_PY = PEER_ENV / "bin" / "python"
PEER_PIP = ["huey", "rq", "redis"]
REDIS_URL = "redis://127.0.0.1:6379/0"


class System:
    name = "?"
    why = ""  # why it could not run
    notes = ""

    def __init__(self, workdir):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.procs = []

    def setup(self):
        return True

    def start_workers(self, n):
        raise NotImplementedError

    def enqueue(self, command):
        raise NotImplementedError

    def enqueue_many(self, commands):
        for c in commands:
            self.enqueue(c)

    def done(self):
        raise NotImplementedError

    def stop_workers(self):
        for p in self.procs:
            if p.poll() is None:
                kill_group(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            kill_group(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        self.procs = []

    def teardown(self):
        self.stop_workers()

    def _spawn(self, argv, env, log_name):
        log = open(self.dir / log_name, "ab")
        p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             cwd=str(self.dir), start_new_session=True)
        log.close()
        self.procs.append(p)
        return p


# --- queuectl ------------------------------------------------------------------------


class Queuectl(System):
    """queuectl with its default settings.  ``mode``: how jobs are enqueued --
    'api' (validate_job + SqliteStore.enqueue, which wakes a worker, what `enqueue` does, in
    this process) or 'cli' (one `queuectl enqueue -- CMD` process per job)."""

    def __init__(self, workdir, mode="api", db_name="q.db"):
        super().__init__(workdir)
        self.mode = mode
        self.name = "queuectl (%s)" % {"api": "Python call", "cli": "CLI, a process per job",
                                        "nowake": "Python call, no wake-up"}.get(mode, mode)
        self.db = str(self.dir / db_name)
        self.store = None
        self.supervisor = None
        self._reader = None

    def setup(self):
        self.store = queuectl.SqliteStore(self.db)
        if self.mode == "nowake":  # leave it to the workers' fallback poll: the store sends no wake-up
            self.store._send_wakeups = lambda: None
        self.cfg = self.store.config()
        self._reader = sqlite3.connect(self.db, timeout=10, isolation_level=None)
        return True

    def cli(self, *args):
        return [PY, str(ROOT / "queuectl.py"), "--db", self.db] + [str(a) for a in args]

    def start_workers(self, n, extra=()):
        self.supervisor = self._spawn(self.cli("worker", "start", "--foreground", "-c", n, *extra),
                                      cli_env(), "workers.log")
        sup = self.supervisor.pid
        wait_for(lambda: self.supervisor.poll() is not None or len(self.worker_pids()) >= n, 30, 0.01,
                 "%d queuectl workers registered" % n)
        if self.supervisor.poll() is not None:
            raise RuntimeError("queuectl workers failed to start: see %s" % (self.dir / "workers.log"))
        # registered workers claim once (nothing due) and then sleep on their wake-up socket
        wait_for(lambda: all(s == "idle" for s in self.worker_states()), 10, 0.01, "workers idle")
        time.sleep(0.2)
        return sup

    def worker_pids(self):
        if self.supervisor is None:
            return []
        return [r[0] for r in self._reader.execute("SELECT pid FROM workers WHERE supervisor_pid = ?",
                                                   (self.supervisor.pid,))]

    def worker_states(self):
        return [r[0] for r in self._reader.execute("SELECT state FROM workers")]

    def stop_workers(self):
        if self.supervisor is not None:
            pids = self.worker_pids()
            super().stop_workers()
            kill_pids(pids)
            self.supervisor = None

    def enqueue(self, command):
        if self.mode == "cli":
            r = run_quiet(self.cli("enqueue", "--", command), env=cli_env())
            if r.returncode != 0:
                raise RuntimeError("queuectl enqueue failed: %s" % r.stderr.decode(errors="replace"))
            return r.stdout.decode().strip()
        now = time.time()
        ids = self.store.enqueue([queuectl.validate_job({"command": command}, self.cfg, now)], now)
        return ids[0]

    def enqueue_many(self, commands):
        if self.mode == "bulk":
            now = time.time()
            jobs = [queuectl.validate_job({"command": c}, self.cfg, now) for c in commands]
            self.store.enqueue(jobs, now)  # (the store wakes the workers after its commit)
            return
        for c in commands:
            self.enqueue(c)

    def done(self):
        row = self._reader.execute("SELECT n FROM job_counts WHERE state = 'completed'").fetchone()
        return row[0] if row else 0

    def teardown(self):
        self.stop_workers()
        if self.store:
            self.store.close()
        if self._reader:
            self._reader.close()


# --- peers: installation --------------------------------------------------------------


def ensure_peer_venv(log):
    """Create build/bench-env and pip-install huey, rq and redis into it (once)."""
    if PEER_PY.exists():
        r = run_quiet([str(PEER_PY), "-c", "import huey, rq, redis"])
        if r.returncode == 0:
            return True, ""
    log("installing huey, rq, redis into %s (the benchmark's own environment)" % PEER_ENV.relative_to(ROOT))
    r = run_quiet([sys.executable, "-m", "venv", str(PEER_ENV)])
    if r.returncode != 0:
        return False, "python -m venv failed: %s" % r.stderr.decode(errors="replace").strip()[-200:]
    r = run_quiet([str(PEER_PY), "-m", "pip", "install", "-q", "--disable-pip-version-check"] + PEER_PIP,
                  timeout=600)
    if r.returncode != 0:
        return False, "pip install failed: %s" % r.stderr.decode(errors="replace").strip()[-200:]
    return True, ""


def ensure_apt(binary, package, log):
    if shutil.which(binary):
        return True, ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False, "%s is not installed and the benchmark cannot apt-get install %s (not root)" % (binary, package)
    log("installing %s with apt-get" % package)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = run_quiet(["apt-get", "install", "-y", "-qq", "--no-install-recommends", package], env=env, timeout=600)
    if r.returncode != 0:
        run_quiet(["apt-get", "update", "-qq"], env=env, timeout=600)
        r = run_quiet(["apt-get", "install", "-y", "-qq", "--no-install-recommends", package], env=env, timeout=600)
    if r.returncode != 0 or not shutil.which(binary):
        return False, "apt-get install %s failed: %s" % (package, r.stderr.decode(errors="replace").strip()[-200:])
    return True, ""


def peer_version(module):
    r = run_quiet([str(PEER_PY), "-c", "import importlib.metadata as m; print(m.version(%r))" % module])
    return r.stdout.decode().strip() if r.returncode == 0 else "?"


def deb_version(package):
    r = run_quiet(["dpkg-query", "-W", "-f=${Version}", package])
    return r.stdout.decode().strip() if r.returncode == 0 else "?"


class PeerProcess:
    """A long-lived helper in the peers' virtualenv that enqueues jobs on request
    (so enqueue timing is the peer library's, not a new interpreter's)."""

    def __init__(self, code, env, cwd):
        self.p = subprocess.Popen([str(PEER_PY), "-u", "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=env, cwd=cwd, start_new_session=True)
        line = self.p.stdout.readline()
        if line.strip() != b"ready":
            err = self.p.stderr.read().decode(errors="replace")
            raise RuntimeError("peer helper failed: %s" % err[-400:])

    def call(self, obj):
        self.p.stdin.write((json.dumps(obj) + "\n").encode())
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError("peer helper died: %s" % self.p.stderr.read().decode(errors="replace")[-400:])
        return json.loads(line)

    def close(self):
        with contextlib.suppress(Exception):
            self.p.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.p.wait(timeout=5)
        kill_group(self.p.pid)
        with contextlib.suppress(Exception):
            self.p.wait(timeout=5)


class InterpreterPeer(System):
    """Huey and RQ are Python libraries: jobs are enqueued from one long-lived
    interpreter (the helper), in-process as their users do.  Each job is
    ``subprocess.call(['/bin/sh', '-c', command])`` inside a task."""

    helper = None

    def enqueue(self, command):
        return self.helper.call({"op": "enqueue", "command": command})["id"]

    def enqueue_many(self, commands):
        self.helper.call({"op": "enqueue_many", "commands": list(commands)})

    def done(self):
        return self.helper.call({"op": "done"})["n"]

    def timed_enqueue_many(self, commands):
        """Seconds the helper spent enqueuing (without our pipe round trip)."""
        return self.helper.call({"op": "enqueue_many", "commands": list(commands)})["seconds"]

    def teardown(self):
        self.stop_workers()
        if self.helper:
            self.helper.close()


HUEY_TASKS = '''
import os, subprocess
from huey import SqliteHuey
huey = SqliteHuey(filename=os.environ["BENCH_HUEY_DB"])

@huey.task()
def sh(command):
    return subprocess.call(["/bin/sh", "-c", command])
'''

HELPER_LOOP = '''
import json, sys, time
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    op = req["op"]
    if op == "enqueue":
        out = {"id": ENQ(req["command"])}
    elif op == "enqueue_many":
        t = time.perf_counter()
        for c in req["commands"]:
            ENQ(c)
        out = {"seconds": time.perf_counter() - t}
    elif op == "done":
        out = {"n": DONE()}
    sys.stdout.write(json.dumps(out) + "\\n")
    sys.stdout.flush()
'''


class Huey(InterpreterPeer):
    name = "Huey (SqliteHuey)"

    def setup(self):
        (self.dir / "huey_tasks.py").write_text(HUEY_TASKS)
        self.env = cli_env(BENCH_HUEY_DB=str(self.dir / "huey.db"), PYTHONPATH=str(self.dir))
        code = ("import huey_tasks\n"
                "def ENQ(c): return huey_tasks.sh(c).id\n"
                "def DONE(): return huey_tasks.huey.result_count()\n" + HELPER_LOOP)
        self.helper = PeerProcess(code, self.env, str(self.dir))
        self.notes = ("huey %s; consumer `-k process -w N`, polling `-d 0.01 -m 0.1` (its defaults back off to "
                      "a 10 s poll when idle); a task runs `subprocess.call(['/bin/sh','-c',cmd])`" % peer_version("huey"))
        return True

    def start_workers(self, n):
        consumer = PEER_ENV / "bin" / "huey_consumer"
        if not consumer.exists():
            consumer = PEER_ENV / "bin" / "huey_consumer.py"
        argv = [str(PEER_PY), str(consumer), "huey_tasks.huey", "-k", "process", "-w", str(n),
                "-d", "0.01", "-m", "0.1", "-q"]
        p = self._spawn(argv, self.env, "huey.log")
        # ready when a probe task has run (the consumer has started its workers)
        before = self.done()
        self.enqueue("true")
        wait_for(lambda: p.poll() is not None or self.done() > before, 60, 0.01, "huey consumer ready")
        if p.poll() is not None:
            raise RuntimeError("huey consumer exited: see %s" % (self.dir / "huey.log"))
        time.sleep(0.3)


RQ_TASKS = '''
import subprocess

def sh(command):
    return subprocess.call(["/bin/sh", "-c", command])
'''


class RQ(InterpreterPeer):
    name = "RQ (local Redis)"

    def setup(self):
        r = run_quiet([str(PEER_PY), "-c", "import redis; redis.Redis.from_url(%r).ping()" % REDIS_URL])
        if r.returncode != 0:
            self.why = "no Redis server answers at 127.0.0.1:6379"
            return False
        (self.dir / "rq_tasks.py").write_text(RQ_TASKS)
        self.queue = "queuectl-bench-%d" % os.getpid()
        self.env = cli_env(PYTHONPATH=str(self.dir))
        code = ("import redis, rq\n"
                "conn = redis.Redis.from_url(%r)\n"
                "q = rq.Queue(%r, connection=conn)\n"
                "reg = rq.registry.FinishedJobRegistry(queue=q)\n"
                "def ENQ(c): return q.enqueue('rq_tasks.sh', c, result_ttl=3600).id\n"
                "def DONE(): return reg.count\n" % (REDIS_URL, self.queue)) + HELPER_LOOP
        self.helper = PeerProcess(code, self.env, str(self.dir))
        self.notes = ("rq %s, Redis %s; `rq worker` per worker (the default Worker forks a work horse per job); "
                      "a task runs `subprocess.call(['/bin/sh','-c',cmd])`" % (peer_version("rq"), _redis_version()))
        return True

    def start_workers(self, n):
        rq_bin = str(PEER_ENV / "bin" / "rq")
        for i in range(n):
            self._spawn([rq_bin, "worker", "--url", REDIS_URL, "--quiet", "--name",
                         "%s-%d-%d" % (self.queue, i, time.monotonic_ns()), self.queue], self.env, "rq.log")
        before = self.done()
        for _ in range(n):
            self.enqueue("true")
        wait_for(lambda: any(p.poll() is not None for p in self.procs) or self.done() >= before + n, 60, 0.01,
                 "rq workers ready")
        if any(p.poll() is not None for p in self.procs):
            raise RuntimeError("rq worker exited: see %s" % (self.dir / "rq.log"))
        time.sleep(0.3)

    def teardown(self):
        super().teardown()
        with contextlib.suppress(Exception):  # remove this run's keys from the shared Redis
            run_quiet([str(PEER_PY), "-c",
                       "import redis\nr = redis.Redis.from_url(%r)\n"
                       "ks = list(r.scan_iter('*%s*', count=1000))\n"
                       "[r.delete(*ks[i:i+500]) for i in range(0, len(ks), 500)]" % (REDIS_URL, self.queue)])


def _redis_version():
    r = run_quiet(["redis-cli", "-h", "127.0.0.1", "INFO", "server"])
    for line in r.stdout.decode(errors="replace").splitlines():
        if line.startswith("redis_version:"):
            return line.split(":", 1)[1].strip()
    return "?"


def _raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))


class TaskSpooler(System):
    name = "task-spooler (tsp)"
    # Each queued job is a waiting `tsp` client holding a connection to the server, and the
    # server takes at most 1,000 (a compile-time cap; TS_MAXCONN only lowers it): the 1,001st
    # enqueue blocks.  Drains queue at most this many jobs.
    max_queued = 1000

    def setup(self):
        self.bin = shutil.which("tsp") or shutil.which("ts")
        self.env = cli_env(TS_SOCKET=str(self.dir / "ts.sock"), TMPDIR=str(self.dir), TS_MAXCONN=5000,
                           TS_MAXFINISHED=100000, TS_SLOTS=1)
        self.notes = ("task-spooler %s (Debian); one `tsp CMD` process per job; slots = workers (`tsp -S N`); "
                      "it queues at most 1,000 jobs (a client process and a connection each), so its drains "
                      "queue 1,000 minus the blockers" % deb_version("task-spooler"))
        self.count = 0
        return True

    def tsp(self, *args):
        r = subprocess.run([self.bin] + [str(a) for a in args], env=self.env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_raise_nofile, timeout=600)
        if r.returncode != 0 and args[:1] != ("-K",):
            raise RuntimeError("tsp %s failed: %s" % (" ".join(map(str, args)), r.stderr.decode(errors="replace")))
        return r.stdout.decode()

    def start_workers(self, n):
        self.tsp("-S", n)  # starts the server if needed
        self.server_pid = None
        self.enqueue("true")
        wait_for(lambda: self.done() >= self.count, 30, 0.01, "tsp ready")

    def enqueue(self, command):
        jid = self.tsp("sh", "-c", command).strip()
        self.count += 1
        return jid

    def done(self):
        return sum(1 for line in self.tsp("-l").splitlines()[1:] if " finished " in line)

    def wait_all(self):
        # `tsp -w ID` blocks until that job ends; the last W ids start last
        out = self.tsp("-l").splitlines()[1:]
        ids = [line.split()[0] for line in out if " finished " not in line]
        for jid in ids:
            self.tsp("-w", jid)

    def stop_workers(self):
        self.tsp("-K")  # kills the server (and with it the queue)
        self.count = 0

    def teardown(self):
        with contextlib.suppress(Exception):
            self.stop_workers()


class Nq(System):
    name = "nq"

    def setup(self):
        self.bin = shutil.which("nq")
        self.qdir = self.dir / "nq"
        self.qdir.mkdir(exist_ok=True)
        self.env = cli_env(NQDIR=str(self.qdir))
        self.notes = ("nq %s (Debian); one `nq CMD` process per job; nq runs one job at a time by design, so "
                      "only 1 worker applies" % deb_version("nq"))
        return True

    def start_workers(self, n):
        if n != 1:
            raise NotImplementedError("nq runs one job at a time")

    def enqueue(self, command):
        r = subprocess.run([self.bin, "-q", "sh", "-c", command], env=self.env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
        if r.returncode != 0:
            raise RuntimeError("nq failed: %s" % r.stderr.decode(errors="replace"))

    def done(self):
        raise NotImplementedError

    def wait_all(self):
        subprocess.run([self.bin, "-w"], env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=3600)

    def stop_workers(self):
        self.wait_all()
        for f in self.qdir.iterdir():
            with contextlib.suppress(OSError):
                f.unlink()
