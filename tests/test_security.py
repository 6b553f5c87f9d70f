"""Safe on a shared server: another local account cannot read the queue, get the dashboard's
token, or make the owner run a command.

The attacks are real: they run as a second account (``nobody``, through ``runuser``), which
needs root (as in CI).  Each test also checks that the owner's normal use still works.  The
server bounds (header bytes, request deadline, connections) and bad query input are tested
on in-process servers and on the real program.
"""

import base64
import contextlib
import http.server
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import queuectl
from conftest import ROOT, db_rows, pids_of_database, program, program_env, wait_until
from queuectl_web import server as web
from test_web import Client, login_cookie, raw_exchange, serve  # noqa: F401 (serve: a fixture)

OTHER = "nobody"
#: The other account's Python: the system's, which it can run (the test's own may live under /root).
OTHER_PYTHON = "/usr/bin/python3"
RUNUSER = shutil.which("runuser") or "runuser"

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("runuser") or not os.access(OTHER_PYTHON, os.X_OK),
    reason="acting as a second account needs root, runuser and %s (CI runs as root)" % OTHER_PYTHON)


def as_other(argv, env=None, timeout=30):
    """Run ``argv`` as the other account; a CompletedProcess with text output."""
    return subprocess.run([RUNUSER, "-u", OTHER, "--"] + [str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, cwd="/", env=env or {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"},
                          stdin=subprocess.DEVNULL)


def other_python(code, *args, env=None):
    return as_other([OTHER_PYTHON, "-I", "-c", code] + list(args), env=env)


def directory_in_tmp(name, mode):
    path = Path(tempfile.mkdtemp(prefix="queuectl-%s-" % name, dir="/tmp"))
    path.chmod(mode)
    return path


@pytest.fixture
def shared_dir():
    """A directory every account may write to, like /tmp (mode 1777); removed afterwards."""
    path = directory_in_tmp("shared", 0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def open_dir():
    """A directory of the owner's that other accounts can enter (0755, like a home directory)."""
    path = directory_in_tmp("open", 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_as_owner(*args, env=None, umask=0o022, timeout=60, cwd=None):
    """The real program as the owner, under ``umask`` (022: what a new user has)."""
    env = dict(env or os.environ)
    env.setdefault("SHIV_ROOT", str(ROOT / "build" / "shiv-root"))
    proc = subprocess.run(program() + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd or "/", stdin=subprocess.DEVNULL,
                          preexec_fn=lambda: os.umask(umask))
    return proc


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def kill_workers_of(db):
    for pid in pids_of_database(db):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(sqlite3.Error):
        for (pgid,) in db_rows(db, "SELECT pid FROM attempts WHERE pid IS NOT NULL"):
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)


class Dashboards:
    """`queuectl dashboard`/`up` processes started by a test; killed by PID at teardown."""

    def __init__(self):
        self.procs = []

    def start(self, *args, env, umask=0o022):
        proc = subprocess.Popen(program() + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, env=env, cwd="/", start_new_session=True,
                                preexec_fn=lambda: os.umask(umask))
        proc.db = env.get("QUEUECTL_DB")
        self.procs.append(proc)
        line = proc.stdout.readline().decode()
        assert line.startswith("dashboard: http://"), (line, proc.poll())
        proc.url = line.split()[-1]
        proc.port = int(proc.url.split(":")[2].split("/")[0])
        proc.token = proc.url.partition("?token=")[2] or None
        return proc

    def stop_all(self):
        for p in self.procs:
            with contextlib.suppress(OSError):
                os.killpg(p.pid, signal.SIGKILL)
            if p.db and os.path.exists(p.db):  # `up`'s supervisor has a process group of its own
                kill_workers_of(p.db)
            with contextlib.suppress(Exception):
                p.wait(10)
            for f in (p.stdout, p.stderr):
                f.close()


@pytest.fixture
def dashboards():
    d = Dashboards()
    yield d
    d.stop_all()


def owner_env(home, **extra):
    env = dict(os.environ, HOME=str(home), SHIV_ROOT=str(ROOT / "build" / "shiv-root"))
    for key in ("QUEUECTL_DB", "XDG_DATA_HOME", queuectl.TOKEN_ENV, queuectl.SHARED_ENV,
                queuectl.SAFE_DIRECTORY_ENV):
        env.pop(key, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


# --- 1. the dashboard hands nothing to a client without the token -----------------------------

ATTACK = r"""
import http.client, json, sys
port = int(sys.argv[1])
def ask(method, path, body=None, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    h = {"Host": "127.0.0.1:%d" % port, "Content-Type": "application/json"}
    h.update(headers or {})
    c.request(method, path, body=body, headers=h)
    r = c.getresponse()
    return r.status, r.read().decode("utf-8", "replace")
out = {}
out["page"] = ask("GET", "/")
out["app"] = ask("GET", "/app.js")
out["status"] = ask("GET", "/api/status")
out["job"] = ask("GET", "/api/jobs/secret-job")
out["metrics"] = ask("GET", "/metrics")
for name, headers in (("none", {}), ("empty", {"X-Queuectl-Token": ""}), ("csrf", {"X-Queuectl-CSRF": "x"})):
    out["post_" + name] = ask("POST", "/api/jobs", json.dumps({"id": "pwned", "command": "id > /tmp/pwned"}), headers)
print(json.dumps(out))
"""


@needs_root
@pytest.mark.e2e
def test_another_user_gets_nothing_from_the_default_dashboard(open_dir, dashboards):
    db = open_dir / "q.db"
    env = owner_env(open_dir, QUEUECTL_DB=db)
    assert run_as_owner("enqueue", '{"id":"secret-job","command":"true","env":{"API_KEY":"k3y"}}', env=env).returncode == 0
    proc = dashboards.start("dashboard", "--port", "0", env=env)
    assert proc.token and len(proc.token) >= 32  # the printed URL carries a fresh token
    result = other_python(ATTACK, str(proc.port))
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    for name, (status, body) in answers.items():
        assert status == 401, (name, status, body)
        assert proc.token not in body and "queuectl-csrf" not in body and "k3y" not in body, name
    # The token is in no place the other account can read: not on the command line, not in the environment.
    with open("/proc/%d/cmdline" % proc.pid, "rb") as f:
        assert proc.token.encode() not in f.read()
    assert other_python("print(open('/proc/%d/environ').read())" % proc.pid).returncode != 0
    assert db_rows(db, "SELECT id FROM jobs") == [("secret-job",)]
    # The owner's way in: the printed URL, then the page's own requests.
    owner = Client(proc.port, proc.token)
    cookie = login_cookie(owner)
    page = owner.get("/", auth=False, Cookie=cookie)
    assert page.status == 200
    csrf = page.text.split('name="queuectl-csrf" content="')[1].split('"')[0]
    r = owner.post("/api/jobs", {"id": "mine", "command": "true"}, token=None,
                   headers={"Cookie": cookie, web.CSRF_HEADER: csrf})
    assert r.status == 201
    assert sorted(db_rows(db, "SELECT id FROM jobs")) == [("mine",), ("secret-job",)]


@needs_root
@pytest.mark.e2e
def test_a_chosen_token_from_a_private_file(open_dir, dashboards, tmp_path):
    db = open_dir / "q.db"
    token_file = tmp_path / "token"
    token_file.write_text("a-token-chosen-by-the-owner-1234\n")
    token_file.chmod(0o644)
    env = owner_env(open_dir, QUEUECTL_DB=db)
    r = run_as_owner("dashboard", "--port", "0", "--token-file", token_file, env=env)
    assert r.returncode == 74 and r.stderr.count("\n") == 1 and "readable by other users" in r.stderr.replace(
        "may be read by other users", "readable by other users"), r.stderr
    link = tmp_path / "link"
    link.symlink_to(token_file)
    token_file.chmod(0o600)
    r = run_as_owner("dashboard", "--port", "0", "--token-file", link, env=env)
    assert r.returncode == 2 and "symbolic link" in r.stderr, r.stderr
    proc = dashboards.start("dashboard", "--port", "0", "--token-file", token_file, env=env)
    assert proc.token is None  # a chosen token is not printed (it would end up in logs)
    client = Client(proc.port, "a-token-chosen-by-the-owner-1234")
    assert client.get("/api/status").status == 200
    assert client.get("/api/status", auth=False).status == 401


# --- 2. secrets in jobs are masked in the API and the page -------------------------------------


def test_env_values_and_url_credentials_are_masked(db, run, serve):
    hook = "https://hookuser:hookpass@hooks.example.com/services/T0/B0/XXSECRETXX?sig=s1g"
    assert run("enqueue", json.dumps({"id": "s", "command": "true", "env": {"API_KEY": "k3y", "DB_PW": "pw0rd"},
                                      "webhook": hook})).rc == 0
    srv, client = serve()
    for path in ("/api/jobs/s", "/api/jobs", "/api/status"):
        body = client.get(path).text
        for secret in ("k3y", "pw0rd", "hookpass", "XXSECRETXX", "s1g", "hookuser"):
            assert secret not in body, (path, secret)
    job = client.get_json("/api/jobs/s")["job"]
    assert job["env"] == {"API_KEY": web.MASK, "DB_PW": web.MASK}  # names visible, values not
    assert job["webhook"] == "https://***@hooks.example.com/***"
    doc = json.loads(run("get", "s", "--json").out)  # the owner's CLI shows everything
    assert doc["env"] == {"API_KEY": "k3y", "DB_PW": "pw0rd"} and doc["webhook"] == hook


# --- 3. private files, whatever the umask ------------------------------------------------------


@needs_root
@pytest.mark.e2e
def test_files_are_private_and_other_users_cannot_read_the_queue(open_dir):
    home = open_dir / "home"
    home.mkdir(mode=0o755)
    env = owner_env(home)
    r = run_as_owner("enqueue", '{"id":"j","command":"sleep 30","env":{"API_KEY":"k3y"}}', env=env)
    assert r.returncode == 0, r.stderr
    data = home / ".local" / "share" / "queuectl"
    db = data / "queuectl.db"
    assert mode(data) == 0o700 and mode(db) == 0o600
    r = run_as_owner("worker", "start", env=env)  # detached: its log, -wal and -shm exist while it runs
    try:
        assert r.returncode == 0, r.stderr
        wait_until(lambda: db_rows(db, "SELECT state FROM jobs") == [("processing",)], 20)
        for name in ("queuectl.db", "queuectl.db-wal", "queuectl.db-shm", "queuectl.workers.log"):
            assert mode(data / name) == 0o600, name
        # Even with the directory opened up (by mistake, or an older queuectl), the files stay closed.
        data.chmod(0o755)
        attack = other_python("import sqlite3, sys\n"
                              "c = sqlite3.connect('file:%s?mode=ro' % sys.argv[1], uri=True)\n"
                              "print(c.execute('SELECT env FROM jobs').fetchall())", db)
        assert attack.returncode != 0 and "k3y" not in attack.stdout
        assert "unable to open" in attack.stderr or "Permission denied" in attack.stderr, attack.stderr
        assert other_python("open(%r).read()" % str(data / "queuectl.workers.log")).returncode != 0
    finally:
        kill_workers_of(db)
    # The next command puts the default directory back to private.
    assert run_as_owner("status", env=env).returncode == 0
    assert mode(data) == 0o700


@needs_root
@pytest.mark.e2e
def test_an_explicit_path_is_private_too_and_an_old_open_database_is_closed(open_dir):
    db = open_dir / "q.db"
    env = owner_env(open_dir, QUEUECTL_DB=db)
    assert run_as_owner("enqueue", "--", "true", env=env, umask=0).returncode == 0
    assert mode(db) == 0o600
    assert other_python("open(%r, 'rb').read()" % str(db)).returncode != 0
    db.chmod(0o644)  # as an older queuectl left it
    r = run_as_owner("status", env=env)
    assert r.returncode == 0 and mode(db) == 0o600
    assert "was open to other users (mode 0644): made it private" in r.stderr


@needs_root
@pytest.mark.e2e
def test_a_group_shared_queue_is_said_explicitly(open_dir):
    db = open_dir / "shared" / "q.db"
    home = open_dir / "home"
    home.mkdir()
    env = owner_env(home, QUEUECTL_SHARED="group")
    r = run_as_owner("enqueue", "--", "true", env=env)
    assert r.returncode == 0, r.stderr
    data = home / ".local" / "share" / "queuectl"
    assert mode(data) == 0o770 and mode(data / "queuectl.db") == 0o660
    db.parent.mkdir()
    assert run_as_owner("--db", db, "enqueue", "--", "true", env=env).returncode == 0
    assert mode(db) == 0o660
    r = run_as_owner("--db", db, "status", env=owner_env(home, QUEUECTL_SHARED="world"))
    assert r.returncode == 2 and "QUEUECTL_SHARED must be 'group'" in r.stderr


# --- 4. logs: no planted symlink or foreign file is written to ----------------------------------


@needs_root
@pytest.mark.e2e
def test_a_planted_log_symlink_is_refused(shared_dir, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("root's own file\n")
    victim.chmod(0o600)
    tmp_path.chmod(0o711)  # the other account may name the victim, not read it
    assert as_other(["ln", "-s", victim, shared_dir / "a.workers.log"]).returncode == 0
    env = owner_env(tmp_path, QUEUECTL_SAFE_DIRECTORY=shared_dir)  # the database itself allowed explicitly
    db = shared_dir / "a.db"
    r = run_as_owner("--db", db, "worker", "start", env=env)
    try:
        assert r.returncode == 74, (r.returncode, r.stderr)
        assert r.stderr.strip().count("\n") == 0 and "symbolic link" in r.stderr
    finally:
        kill_workers_of(db)
    assert victim.read_text() == "root's own file\n"
    # A regular file the other account owns (and lets everyone write) is refused as well.
    planted = shared_dir / "planted.log"
    assert as_other(["sh", "-c", "echo planted > %s && chmod 666 %s" % (planted, planted)]).returncode == 0
    r = run_as_owner("--db", db, "worker", "start", "--log-file", planted, env=env)
    try:
        assert r.returncode == 74 and "owned by another user" in r.stderr, r.stderr
    finally:
        kill_workers_of(db)
    assert planted.read_text() == "planted\n"


def test_log_is_created_private_and_appended(tmp_path):
    log = tmp_path / "w.log"
    old = os.umask(0)
    try:
        with queuectl.open_private_log(str(log)) as f:
            f.write(b"one\n")
        with queuectl.open_private_log(str(log)) as f:
            f.write(b"two\n")
    finally:
        os.umask(old)
    assert log.read_bytes() == b"one\ntwo\n" and mode(log) == 0o600
    (tmp_path / "link.log").symlink_to(log)
    with pytest.raises(queuectl.UntrustedFile, match="symbolic link"):
        queuectl.open_private_log(str(tmp_path / "link.log"))
    log.chmod(0o666)
    with pytest.raises(queuectl.UntrustedFile, match="writable by every user"):
        queuectl.open_private_log(str(log))


# --- 5. a database another user planted is refused ---------------------------------------------


@needs_root
@pytest.mark.e2e
def test_a_database_planted_by_another_user_never_runs_its_jobs(shared_dir, tmp_path):
    db = shared_dir / "b.db"
    pwned = shared_dir / "pwned"
    # The other account makes a database with a job in it, open to all (with queuectl itself).
    other_env = {"PATH": "/usr/bin:/bin", "HOME": str(shared_dir), "QUEUECTL_SAFE_DIRECTORY": str(shared_dir)}
    made = as_other([OTHER_PYTHON, ROOT / "queuectl.py", "--db", db, "enqueue", "--", "id > %s" % pwned],
                    env=other_env)
    assert made.returncode == 0, made.stderr
    db.chmod(0o666)
    env = owner_env(tmp_path)
    for args in (["worker", "start", "--burst"], ["status"], ["list"], ["enqueue", "--", "true"]):
        r = run_as_owner("--db", db, *args, env=env)
        assert r.returncode == 74, (args, r.returncode, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("queuectl: error: refusing database"), r.stderr
        assert "Traceback" not in r.stderr and "QUEUECTL_SAFE_DIRECTORY" in r.stderr
    assert not pwned.exists()
    # In a directory of the owner's, a file another account owns is refused all the same.
    own = tmp_path / "own"
    own.mkdir(mode=0o700)
    shutil.copy(db, own / "c.db")
    os.chown(own / "c.db", 65534, 65534)
    os.chmod(own / "c.db", 0o600)
    r = run_as_owner("--db", own / "c.db", "worker", "start", "--burst", env=env)
    assert r.returncode == 74 and "is owned by another user (uid 65534)" in r.stderr, r.stderr
    assert not pwned.exists()
    # Allowed explicitly (git's safe.directory): then it is the owner's decision.
    r = run_as_owner("--db", own / "c.db", "status", "--json", env=owner_env(tmp_path, QUEUECTL_SAFE_DIRECTORY=own))
    assert r.returncode == 0 and json.loads(r.stdout)["job_counts"]["pending"] == 1, r.stderr


def test_trust_rules(tmp_path, monkeypatch):
    monkeypatch.delenv(queuectl.SAFE_DIRECTORY_ENV, raising=False)
    monkeypatch.delenv(queuectl.SHARED_ENV, raising=False)
    private = tmp_path / "p"
    private.mkdir(mode=0o700)
    queuectl.check_trusted(str(private / "q.db"))  # nothing there yet: fine
    (private / "q.db").write_bytes(b"")
    queuectl.check_trusted(str(private / "q.db"))
    (private / "q.db-wal").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(queuectl.UntrustedFile, match="-wal is a symbolic link"):
        queuectl.check_trusted(str(private / "q.db"))
    (private / "q.db-wal").unlink()
    private.chmod(0o777)
    with pytest.raises(queuectl.UntrustedFile, match="directory .* is writable by every user"):
        queuectl.check_trusted(str(private / "q.db"))
    monkeypatch.setenv(queuectl.SAFE_DIRECTORY_ENV, "/nonexistent:" + str(private))
    queuectl.check_trusted(str(private / "q.db"))
    monkeypatch.setenv(queuectl.SAFE_DIRECTORY_ENV, "*")
    queuectl.check_trusted(str(private / "q.db"))


# --- 6. the dashboard token never reaches a job --------------------------------------------------


@pytest.mark.e2e
def test_up_keeps_its_token_from_jobs(tmp_path, dashboards):
    db = tmp_path / "q.db"
    token = "the-dashboard-token-1234567890"
    env = owner_env(tmp_path, QUEUECTL_DB=db, **{queuectl.TOKEN_ENV: token})
    assert run_as_owner("enqueue", "--id", "e", "--", "env", env=env).returncode == 0
    proc = dashboards.start("up", "--port", "0", "--poll-interval", "0.05", env=env)
    wait_until(lambda: db_rows(db, "SELECT state FROM jobs") == [("completed",)], 30)
    output = run_as_owner("logs", "e", env=env).stdout
    assert "PATH=" in output and token not in output and queuectl.TOKEN_ENV not in output
    assert Client(proc.port, token).get("/api/status").status == 200  # the dashboard still has it
    # `worker start` run from a shell that exports it: its jobs do not get it either.
    assert run_as_owner("enqueue", "--id", "f", "--", "env", env=env).returncode == 0
    r = run_as_owner("worker", "start", "--burst", env=env)
    assert r.returncode == 0, r.stderr
    assert token not in run_as_owner("logs", "f", env=env).stdout


# --- 7. what an unauthenticated client can cost the server is bounded ---------------------------


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


def test_the_dashboard_takes_its_token_out_of_the_environment_before_anything_forks(db, monkeypatch):
    monkeypatch.setenv(queuectl.TOKEN_ENV, "a-token-for-the-dashboard-only")
    args = queuectl.build_parser().parse_args(["up", "--port", "0"])
    args.db_path = str(db)
    server = queuectl._dashboard_server(args)
    try:
        assert server.token == "a-token-for-the-dashboard-only"
        assert queuectl.TOKEN_ENV not in os.environ  # what `up` forks next (its supervisor) inherits
    finally:
        server.server_close()


def test_job_environment_leaves_the_dashboard_token_out(monkeypatch):
    monkeypatch.setenv(queuectl.TOKEN_ENV, "a-token-for-the-dashboard-only")
    monkeypatch.setenv("OTHER_SETTING", "kept")
    env = queuectl._job_environment({"OWN": "1"}, {"QUEUECTL_JOB_ID": "j"})
    assert queuectl.TOKEN_ENV.encode() not in env
    assert env[b"OTHER_SETTING"] == b"kept" and env[b"OWN"] == b"1" and env[b"QUEUECTL_JOB_ID"] == b"j"


@pytest.mark.e2e
def test_a_header_flood_costs_the_dashboard_almost_no_memory(tmp_path, dashboards):
    env = owner_env(tmp_path, QUEUECTL_DB=tmp_path / "q.db")
    proc = dashboards.start("dashboard", "--port", "0", env=env)
    client = Client(proc.port, proc.token)
    for _ in range(5):  # warm up: threads, the page, a store
        assert client.get("/api/status").status == 200
    before = rss_kib(proc.pid)
    line = b"X-Filler: " + b"a" * 1000 + b"\r\n"
    answers = []

    def flood():
        with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as s:
            sent = 0
            try:
                s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                while sent < 6 * 1024 * 1024:
                    s.sendall(line * 64)
                    sent += len(line) * 64
            except OSError:
                pass  # the server hung up: what it should do
            with contextlib.suppress(OSError):
                answers.append(s.recv(100))

    threads = [threading.Thread(target=flood) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    grown = rss_kib(proc.pid) - before
    assert grown < 4096, "the dashboard grew by %d KiB under 5 x 6 MB of headers" % grown
    assert any(a.startswith(b"HTTP/1.1 431") for a in answers), answers
    assert client.get("/api/status").status == 200  # and it still serves


def test_a_trickling_client_is_cut_at_the_deadline(serve, monkeypatch):
    monkeypatch.setattr(web.Handler, "head_timeout", 1.0)
    srv, client = serve()
    request = b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200
    with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=10) as s:
        started = time.monotonic()
        closed_after = None
        for byte in request:  # one byte every 50 ms: never idle for long, never done
            try:
                s.sendall(bytes([byte]))
            except OSError:
                closed_after = time.monotonic() - started
                break
            s.settimeout(0.05)
            try:
                if s.recv(1) == b"":
                    closed_after = time.monotonic() - started
                    break
            except socket.timeout:
                pass
    assert closed_after is not None, "the server kept a trickling client for %.1fs" % (time.monotonic() - started)
    assert 0.9 < closed_after < 3.0, closed_after
    # Half a head and then silence: cut at the same deadline, not after the 30 s idle timeout.
    with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=10) as s:
        started = time.monotonic()
        s.sendall(request)
        assert s.recv(100) == b""
        assert time.monotonic() - started < 3.0
    assert client.get("/api/status").status == 200


def test_connections_are_capped_event_streams_included(serve, monkeypatch):
    monkeypatch.setattr(web, "MAX_CONNECTIONS", 4)
    srv, client = serve()
    port = srv.server_address[1]
    held = []
    try:
        stream = socket.create_connection(("127.0.0.1", port), timeout=10)  # an event stream: one of the four
        stream.sendall(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n\r\n"
                       % srv.token.encode())
        held.append(stream)
        assert stream.recv(12) == b"HTTP/1.1 200"
        for _ in range(3):  # idle, unauthenticated
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        wait_until(lambda: srv.connections == 4, 5)
        answer = raw_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 5" in answer
        held.pop().close()
        wait_until(lambda: srv.connections == 3, 5)
        assert client.get("/api/status").status == 200
    finally:
        for s in held:
            s.close()
    wait_until(lambda: srv.connections == 0, 10)


# --- 8. bad query numbers and bodies are a 400, never a 500 ---------------------------------------


@pytest.mark.parametrize("path", [
    "/api/jobs/j?attempt=99999999999999999999",
    "/api/jobs/j?attempt=%C2%B2",  # a superscript two: a digit to str.isdigit, not to int()
    "/api/jobs/j?attempt=0",
    "/api/jobs/j?attempt=-1",
    "/api/jobs/j?attempt=1e3",
    "/api/jobs?limit=%D9%A3",  # an Arabic-Indic three
    "/api/jobs?limit=99999999999999999999",
    "/api/jobs?cursor=" + "A" * 600,
    "/api/jobs?cursor=" + base64.urlsafe_b64encode(b'["t", 1e308, 99999999999999999999999]').decode(),
    "/api/jobs?cursor=" + base64.urlsafe_b64encode(b"[" * 400 + b"]" * 400).decode(),
    "/api/jobs?q=j&cursor=" + base64.urlsafe_b64encode(json.dumps(["i", "x" * 300]).encode()).decode(),
])
def test_bad_query_values_are_400(db, run, serve, caplog, path):
    assert run("enqueue", "--id", "j", "--", "true").rc == 0
    srv, client = serve()
    with caplog.at_level(logging.ERROR, logger="queuectl"):
        r = client.get(path)
    assert r.status == 400, (r.status, r.text)
    assert "internal error" not in caplog.text


def test_deeply_nested_json_body_is_400(db, serve, caplog):
    srv, client = serve()
    with caplog.at_level(logging.ERROR, logger="queuectl"):
        r = client.request("POST", "/api/jobs", body=b"[" * 100000 + b"]" * 100000,
                           headers={"Content-Type": "application/json"})
    assert r.status == 400 and "nested too deeply" in r.json()["error"]
    assert "internal error" not in caplog.text


# --- 9. webhooks, logs, HEAD ------------------------------------------------------------------------


class Recorder(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.server.seen.append((self.path, self.headers.get("Authorization"),
                                 self.rfile.read(int(self.headers.get("Content-Length") or 0))))
        if self.server.redirect:
            self.send_response(302)  # (urllib would follow it, as a GET)
            self.send_header("Location", self.server.redirect)
        else:
            self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST

    def log_message(self, *args):
        pass


@pytest.fixture
def recorders():
    servers = []

    def start(redirect=None):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
        srv.seen, srv.redirect = [], redirect
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_webhooks_follow_no_redirect_and_send_userinfo_as_basic_auth(tmp_path, recorders):
    sender = queuectl.WebhookSender(str(tmp_path / "q.db"), os.getppid())
    try:
        elsewhere = recorders()
        hop = recorders(redirect="http://127.0.0.1:%d/stolen" % elsewhere.server_address[1])
        error = sender.post({"url": "http://127.0.0.1:%d/hook" % hop.server_address[1], "payload": "{}"})
        assert error is not None and "302" in error and "not followed" in error
        assert len(hop.seen) == 1 and elsewhere.seen == []
        plain = recorders()
        url = "http://us%%40er:p%%3Ass@127.0.0.1:%d/hook?x=1" % plain.server_address[1]
        assert sender.post({"url": url, "payload": '{"a": 1}'}) is None
        [(path, auth, body)] = plain.seen
        assert path == "/hook?x=1" and body == b'{"a": 1}'
        assert auth == "Basic " + base64.b64encode(b"us@er:p:ss").decode()
    finally:
        sender.store.close()


def test_token_never_reaches_the_log(serve, caplog):
    srv, client = serve()
    with caplog.at_level(logging.DEBUG, logger="queuectl.web"):
        assert client.get("/?token=" + srv.token, auth=False).status == 303
        assert client.get("/?a=1&token=wrong-" + srv.token, auth=False).status == 401
        wait_until(lambda: caplog.text.count("token=***") >= 2, 5)
    assert srv.token not in caplog.text


def test_head_of_the_event_stream_has_no_body(serve):
    srv, client = serve()
    started = time.monotonic()
    answer = raw_exchange(srv.server_address[1], b"HEAD /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                                  b"Authorization: Bearer %s\r\n\r\n" % srv.token.encode())
    assert time.monotonic() - started < 2, "HEAD streamed"
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\n"), answer
    assert b"event:" not in answer
