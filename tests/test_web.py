"""The dashboard's HTTP API and server, without a browser.

In-process servers on port 0 (each in a thread, stopped at teardown) for the
API and every safety rule; the real program as a subprocess (marked e2e, so
`./build.sh test` runs them again on dist/queuectl.pyz) for `dashboard`, `up`
and the seed README's manual Test 4.
"""

import base64
import http.client
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import time
import types
from pathlib import Path

import pytest

import queuectl
from conftest import db_rows, program, sqlite_at_version, wait_until
from conftest import program_env as program_env
from queuectl_web import server as web

NOW = 1_800_000_000.0
STATIC_DIR = Path(web.__file__).parent / "static"


# --- helpers --------------------------------------------------------------------------------


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def text(self):
        return self.body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.body)

    def header(self, name):
        return self.headers.get(name.lower())


class Client:
    """Raw HTTP against one server, with full control of Host, Origin and body."""

    def __init__(self, port, token=None):
        self.port = port
        self.token = token

    @property
    def host(self):
        return "127.0.0.1:%d" % self.port

    def request(self, method, path, body=None, headers=None, auth=True):
        """``auth``: send the server's token as a bearer (an API client), as every request must."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        hdrs = {"Host": self.host}
        if auth and self.token:
            hdrs["Authorization"] = "Bearer " + self.token
        hdrs.update(headers or {})
        hdrs = {k: v for k, v in hdrs.items() if v is not None}
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def get(self, path, auth=True, **headers):
        return self.request("GET", path, headers=headers, auth=auth)

    def get_json(self, path):
        r = self.get(path)
        assert r.status == 200, (r.status, r.text)
        return r.json()

    def post(self, path, doc=None, token="default", headers=None):
        """With the server's token as a bearer; ``token=T`` sends T in the token header instead,
        ``token=None`` no token at all."""
        hdrs = {"Content-Type": "application/json"}
        if token not in ("default", None):
            hdrs[web.TOKEN_HEADER] = token
        hdrs.update(headers or {})
        return self.request("POST", path, body=json.dumps(doc if doc is not None else {}).encode(), headers=hdrs,
                            auth=token == "default")


def raw_exchange(port, data, timeout=5):
    """Send raw bytes, return everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def serve(db):
    """serve(**options) -> (server, client): a dashboard in this process on a free port."""
    servers = []

    def start(**options):
        options.setdefault("port", 0)
        srv = web.make_server(str(db), **options)
        srv.start()
        servers.append(srv)
        return srv, Client(srv.server_address[1], srv.token)

    yield start
    for srv in servers:
        srv.stop()


@pytest.fixture
def api(serve):
    return serve()[1]


def add_jobs(store, specs, now=NOW):
    cfg = store.config()
    return store.enqueue([queuectl.validate_job(dict(s), cfg, now, cwd="/tmp") for s in specs], now)


def run_once(store, job_id, outcome="completed", now=NOW, duration=0.5, output="", worker="w1"):
    """Claim ``job_id`` (it must be the next due job) and finish it with ``outcome``."""
    job = store.claim(worker, "test-host", now, 30)
    assert job is not None and job.id == job_id, job
    end = now + duration
    if outcome == "completed":
        state, retry = queuectl.JobState.COMPLETED, None
    elif outcome == "dead":
        state, retry, outcome = queuectl.JobState.DEAD, None, "failed"
    else:
        state, retry = queuectl.after_failure(job, store.config(), end)
    assert store.finish(job.id, job.runs, worker, state, end, outcome, 0 if outcome == "completed" else 1,
                        None if outcome == "completed" else "exit code 1", output, len(output.encode()), retry)


def set_state(db, job_id, state, updated_at=None):
    conn = sqlite3.connect(str(db))
    try:
        conn.execute("UPDATE jobs SET state = ?, updated_at = COALESCE(?, updated_at) WHERE id = ?",
                     (state, updated_at, job_id))
        conn.commit()
    finally:
        conn.close()


def metric_lines(text):
    """Prometheus text -> {series (name{labels}): value}; checks every line parses."""
    series = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-z_]+ .+$", line) or not line, line
            continue
        m = re.match(r'^([a-z_]+)(\{(?:[a-z_]+="(?:[^"\\]|\\.)*",?)*\})? (\S+)$', line)
        assert m, "not Prometheus text: %r" % line
        series[m.group(1) + (m.group(2) or "")] = float(m.group(3).replace("+Inf", "inf"))
    return series


# --- the security checks' pure parts, without a server ---------------------------------------


@pytest.mark.parametrize("host, loopback", [
    ("localhost", True), ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True),
    ("localhost.example", False), ("10.0.0.1", False), ("0.0.0.0", False), ("::", False),
    ("example.com", False), ("", False), ("LOCALHOST", False),  # split_host lower-cases first
])
def test_is_loopback(host, loopback):
    assert web.is_loopback(host) is loopback
    assert web.is_loopback("".join(list(host))) is loopback  # as split_host makes it: a new string


@pytest.mark.parametrize("value, host", [
    ("127.0.0.1:5000", "127.0.0.1"), ("Example.COM", "example.com"), ("example.com.", "example.com"),
    ("example.com.:80", "example.com"), ("[::1]:5000", "::1"), ("[::1]", "::1"), ("[::1", ""),
    ("  localhost:1  ", "localhost"), ("::1", "::1"), ("", ""), (None, ""),
])
def test_split_host(value, host):
    assert web.split_host(value) == host


@pytest.mark.parametrize("host, ip", [("10.1.2.3", True), ("::1", True), ("example.com", False), ("", False),
                                      ("10.1.2", False)])
def test_is_ip(host, ip):
    assert web._is_ip(host) is ip


@pytest.mark.parametrize("url, shown", [
    ("https://hooks.example/T000/B000/secret", "https://hooks.example/***"),
    ("https://user:pw@hooks.example:8443/x?token=1", "https://***@hooks.example:8443/***"),
    ("http://hooks.example", "http://hooks.example/"),
    ("http://hooks.example/", "http://hooks.example/"),
    ("http://hooks.example/?k=v", "http://hooks.example/***"),
    ("http://hooks.example/#frag", "http://hooks.example/***"),
    ("http://[::1]:8080/hook", "http://[::1]:8080/***"),
    ("http://u@[::1]:9/", "http://***@[::1]:9/"),
    ("http://hooks.example:99999/", "***"),  # a port out of range: nothing of it is shown
])
def test_mask_url_keeps_only_scheme_host_and_port(url, shown):
    assert web.mask_url(url) == shown


def test_a_cursor_comes_back_as_it_was_given_and_anything_else_is_400():
    job = types.SimpleNamespace(id="a" * queuectl.MAX_ID_LENGTH, updated_at=NOW, seq=7)
    assert web.decode_cursor(web.encode_cursor(job, True), True) == job.id
    assert web.decode_cursor(web.encode_cursor(job, False), False) == (NOW, 7)
    job.seq = 2 ** 63 - 1
    assert web.decode_cursor(web.encode_cursor(job, False), False) == (NOW, 2 ** 63 - 1)
    job.updated_at = -(10 ** 12) + 1
    assert web.decode_cursor(web.encode_cursor(job, False), False)[0] == -(10 ** 12) + 1

    def enc(doc):
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")

    bad = [
        (enc(["t", NOW, 7]), True), (enc(["i", "x"]), False),  # the other kind of page
        (enc(["i", "a" * (queuectl.MAX_ID_LENGTH + 1)]), True), (enc(["i", 5]), True),
        (enc(["t", True, 7]), False), (enc(["t", "1", 7]), False), (enc(["t", 1e12, 7]), False),
        (enc(["t", -1e12, 7]), False), (enc(["t", NOW, 2 ** 63]), False), (enc(["t", NOW, -1]), False),
        (enc(["t", NOW, 7.0]), False), (enc(["t", NOW]), False), (enc({"t": 1}), False), (enc([]), True),
        ("!!!", True), ("", False), (enc("[" * 2000), True),
        ("A" * (web.MAX_CURSOR + 1), True),
        (base64.urlsafe_b64encode(('["i",%s"x"]' % (" " * 400)).encode()).decode(), True),  # valid, too long
        (enc(["j", "x"]), True), (enc(["s", NOW, 7]), False), (enc(["u", NOW, 7]), False),  # forged tags
        (enc(["t", 5e12, 7]), False), (enc(["t", NOW, 2 ** 64]), False),
    ]
    for text, by_id in bad:
        with pytest.raises(web.HTTPError) as e:
            web.decode_cursor(text, by_id)
        assert e.value.status == 400, text
    assert web.decode_cursor(enc(["t", NOW, 0]), False) == (NOW, 0)
    longest = base64.urlsafe_b64encode(('["i",%s"x"]' % (" " * 375)).encode()).decode().rstrip("=")
    assert len(longest) == web.MAX_CURSOR and web.decode_cursor(longest, True) == "x"  # the limit itself is fine


def test_query_numbers_are_ascii_digits_within_their_range():
    assert web.query_int({}, "limit", 50, 1, 500) == 50
    assert web.query_int({"limit": [""]}, "limit", 50, 1, 500) == 50
    assert web.query_int({"limit": ["1"], "x": ["9"]}, "limit", 50, 1, 500) == 1
    assert web.query_int({"limit": ["500", "2"]}, "limit", 50, 1, 500) == 500
    assert web.query_int({"limit": ["0500"]}, "limit", 50, 1, 500) == 500
    assert web.query_int({"n": ["9999999999"]}, "n", 0, 0, 10 ** 10) == 9999999999
    for text in ("0", "501", "-1", "1.5", " 5", "5 ", "\u00b2", "\u0665", "12345678901", "1e2", "0x10"):
        with pytest.raises(web.HTTPError) as e:
            web.query_int({"limit": [text]}, "limit", 50, 1, 500)
        assert e.value.status == 400 and "limit must be a whole number from 1 to 500" in str(e.value.args), text


def test_a_request_head_is_read_within_its_byte_budget_and_its_deadline():
    a, b = socket.socketpair()
    try:
        reader = web.BoundedSocketReader(a, idle_timeout=5.0)
        assert reader.readable()
        b.sendall(b"x" * 100)
        reader.expect(10.0, budget=60)
        buf = bytearray(1000)
        assert reader.readinto(buf) == 60 and reader.budget == 0  # never past the budget
        with pytest.raises(web.HeadTooLarge):
            reader.readinto(buf)
        reader.done()
        assert reader.budget is None and reader.deadline is None and a.gettimeout() == 5.0
        reader.expect(10.0, budget=1)
        assert reader.readinto(buf) == 1  # the last byte of a budget is read
        reader.done()
        assert reader.readinto(buf) == 39  # no budget once the head is read
        reader.expect(0.3)
        started = time.monotonic()
        with pytest.raises(socket.timeout):
            reader.readinto(buf)  # nothing comes: the deadline, not the 5 s idle timeout, ends it
        assert time.monotonic() - started < 0.8
        started = time.monotonic()
        with pytest.raises(socket.timeout):
            reader.readinto(buf)  # past the deadline: at once
        assert time.monotonic() - started < 1.0
        b.sendall(b"yz")
        reader.done()
        assert reader.readinto(buf) == 2 and bytes(buf[:2]) == b"yz"
    finally:
        a.close()
        b.close()


# --- SQLite specifics of the dashboard reads (what they return is in test_store.py's contract) ------


@pytest.mark.parametrize("name, params", [
    ("SQL_PAGE_ALL", {}),
    ("SQL_PAGE_STATE", {"state": "dead"}),
    ("SQL_PAGE_PREFIX", {}),
    ("SQL_PAGE_PREFIX_STATE", {"state": "dead"}),
    ("SQL_OLDEST_DUE", {}),
])
def test_dashboard_queries_are_served_by_an_index(store, name, params):
    """What keeps a page fast at 1,000,000 jobs: an index search, no scan, no sort."""
    p = {"updated_at": NOW, "seq": 10, "limit": 51, "start": "ab", "stop": "ac", "priority": 2, "now": NOW}
    p.update(params)
    plan = " | ".join(r[3] for r in store.conn.execute("EXPLAIN QUERY PLAN " + getattr(queuectl, name), p))
    assert plan.startswith("SEARCH jobs USING"), plan
    assert "SCAN" not in plan and "TEMP B-TREE" not in plan, plan
    if "PREFIX" in name:
        assert "sqlite_autoindex_jobs" in plan, plan  # the id index


def test_migration_backfills_totals_from_existing_attempts(tmp_path):
    number = next(i for i, s in enumerate(queuectl.SCHEMA) if "attempt_totals" in s)
    path = tmp_path / "old.db"
    conn = sqlite_at_version(path, number)
    conn.execute("INSERT INTO jobs (id, command, state, priority, max_retries, run_at, created_at, updated_at) "
                 "VALUES ('old', 'true', 'completed', 2, 3, 0, 0, 0)")
    conn.execute("INSERT INTO attempts (job_id, n, started_at, ended_at, outcome) VALUES ('old', 1, 10, 12.5, 'completed')")
    conn.execute("INSERT INTO attempts (job_id, n, started_at) VALUES ('old', 2, 20)")  # still running: not counted
    conn.close()
    store = queuectl.SqliteStore(str(path))
    try:
        [total] = store.attempt_totals()
        assert (total["outcome"], total["count"], total["duration_sum"]) == ("completed", 1, 2.5)
        assert dict(total["buckets"])[1.0] == 0 and dict(total["buckets"])[5.0] == 1
    finally:
        store.close()


# --- the API ------------------------------------------------------------------------------------


def test_page_is_served_with_its_csrf_value_and_security_headers(serve):
    srv, client = serve()
    r = client.get("/")
    assert r.status == 200 and r.header("content-type") == "text/html; charset=utf-8"
    assert '<meta name="queuectl-csrf" content="%s">' % srv.csrf in r.text
    assert srv.token not in r.text
    assert '<meta name="queuectl-read-only" content="false">' in r.text
    csp = r.header("content-security-policy")
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert r.header("x-content-type-options") == "nosniff"
    assert r.header("cache-control") == "no-store"
    for path, (name, ctype) in web.STATIC.items():
        r = client.get(path)
        assert r.status == 200 and r.header("content-type") == ctype
        if path != "/":
            assert r.body == (STATIC_DIR / name).read_bytes()


def test_status_keeps_the_seed_shape_with_counts_workers_and_latency(store, api):
    add_jobs(store, [{"id": "p%d" % i, "command": "true"} for i in range(3)], now=time.time() - 30)
    add_jobs(store, [{"id": "done", "command": "true"}], now=time.time() - 60)
    store.register_worker({"id": "w-me", "host": queuectl.HOST, "pid": os.getpid(),
                           "pid_started": queuectl.process_started_at(os.getpid()), "supervisor_pid": None,
                           "now": time.time(), "wake": None})
    doc = api.get_json("/api/status")
    assert doc["success"] is True
    assert set(doc["job_counts"]) == set(queuectl.STATES)
    assert doc["job_counts"]["pending"] == 4 and doc["total"] == 4
    assert [j["id"] for j in doc["jobs"]][:1] == ["p2"] and len(doc["jobs"]) == 4
    assert doc["workers"][0]["id"] == "w-me" and doc["workers"][0]["state"] == "idle"
    assert doc["workers_summary"] == {"total": 1, "busy": 0, "idle": 1}
    assert 59 < doc["queue_latency"] < 120


def test_jobs_endpoint_pages_filters_and_searches(store, db, api):
    add_jobs(store, [{"id": "job-%03d" % i, "command": "echo %d" % i} for i in range(120)])
    for i in range(0, 120, 10):
        set_state(db, "job-%03d" % i, "dead", NOW + i)
    ids, cursor = [], None
    while True:
        doc = api.get_json("/api/jobs?limit=50" + ("&cursor=" + cursor if cursor else ""))
        ids += [j["id"] for j in doc["jobs"]]
        cursor = doc["next"]
        if cursor is None:
            break
    assert len(ids) == 120 and len(set(ids)) == 120
    dead = api.get_json("/api/jobs?state=dead&limit=5")
    assert [j["id"] for j in dead["jobs"]] == ["job-110", "job-100", "job-090", "job-080", "job-070"]
    assert all(j["state"] == "dead" for j in dead["jobs"]) and dead["next"]
    found = api.get_json("/api/jobs?q=job-11")
    assert [j["id"] for j in found["jobs"]] == ["job-11%d" % i for i in range(10)] and found["order"] == "id"
    found = api.get_json("/api/jobs?q=job-0&limit=3")
    more = api.get_json("/api/jobs?q=job-0&limit=3&cursor=" + found["next"])
    assert [j["id"] for j in more["jobs"]] == ["job-003", "job-004", "job-005"]
    job = found["jobs"][0]
    assert job["command"] == "echo 0" and "env" not in job
    for bad in ("/api/jobs?state=sleeping", "/api/jobs?limit=0", "/api/jobs?limit=201", "/api/jobs?limit=x",
                "/api/jobs?cursor=garbage", "/api/jobs?q=job&cursor=" + dead["next"]):
        r = api.get(bad)
        assert r.status == 400 and r.json()["error"], bad


def test_job_endpoint_has_fields_attempts_and_output_tail(store, api):
    add_jobs(store, [{"id": "with:odd@id+1", "command": "make all", "env": {"A": "1"}}])
    run_once(store, "with:odd@id+1", "failed", output="first run\n")
    job = store.get("with:odd@id+1")
    big = "x" * (web.OUTPUT_TAIL + 100) + "THE END\n"
    run_once(store, job.id, now=job.run_at + 1, output=big)
    doc = api.get_json("/api/jobs/with%3Aodd%40id%2B1")
    assert doc["job"]["id"] == "with:odd@id+1" and doc["job"]["env"] == {"A": "***"}  # (values masked)
    assert [a["outcome"] for a in doc["attempts"]] == ["failed", "completed"]
    out = doc["output"]
    assert out["attempt"] == 2 and out["truncated"] and out["text"].endswith("THE END\n")
    assert len(out["text"]) == web.OUTPUT_TAIL and out["bytes"] == len(big) and not out["running"]
    first = api.get_json("/api/jobs/with:odd@id+1?attempt=1")["output"]
    assert first == {"attempt": 1, "text": "first run\n", "truncated": False, "bytes": 10, "running": False}
    assert api.get("/api/jobs/with:odd@id+1?attempt=9").status == 404
    assert api.get("/api/jobs/with:odd@id+1?attempt=x").status == 400
    r = api.get("/api/jobs/nope")
    assert r.status == 404 and r.json() == {"success": False, "error": 'no job with id "nope"'}


def test_job_strings_come_back_verbatim_as_json_never_html(store, api):
    evil = "<img src=x onerror=alert(1)>"
    add_jobs(store, [{"id": "xss", "command": evil}])
    run_once(store, "xss", "dead", output="<script>alert(2)</script>\n")
    r = api.get("/api/jobs/xss")
    assert r.header("content-type") == "application/json; charset=utf-8" and r.header("x-content-type-options") == "nosniff"
    doc = r.json()
    assert doc["job"]["command"] == evil and doc["output"]["text"] == "<script>alert(2)</script>\n"


def test_workers_endpoint_shows_the_running_job(store, api):
    add_jobs(store, [{"id": "long", "command": "sleep 100"}], now=time.time())
    store.register_worker({"id": "w-me", "host": queuectl.HOST, "pid": os.getpid(),
                           "pid_started": queuectl.process_started_at(os.getpid()), "supervisor_pid": None,
                           "now": time.time(), "wake": None})
    assert store.claim("w-me", queuectl.HOST, time.time(), 30).id == "long"
    [w] = api.get_json("/api/workers")["workers"]
    assert (w["pid"], w["host"], w["state"], w["job_id"], w["job_command"]) == (
        os.getpid(), queuectl.HOST, "busy", "long", "sleep 100")
    assert w["job_started_at"] and w["heartbeat_at"]


def test_stats_endpoint_gives_the_last_hour_per_minute(store, api):
    now = time.time()
    add_jobs(store, [{"id": "c", "command": "true"}], now=now - 7300)
    run_once(store, "c", now=now - 7200, duration=1)  # older than an hour: not shown
    add_jobs(store, [{"id": "a", "command": "true"}, {"id": "b", "command": "false"}], now=now - 600)
    run_once(store, "a", now=now - 300, duration=2)
    run_once(store, "b", "dead", now=now - 299, duration=1)
    doc = api.get_json("/api/stats")
    assert len(doc["minutes"]) == 60
    assert doc["minutes"][-1]["minute"] == queuectl.rfc3339(int(now // 60) * 60, precise=False)
    busy = [m for m in doc["minutes"] if m["processed"]]
    assert sum(m["completed"] for m in busy) == 1 and sum(m["failed"] for m in busy) == 1
    assert doc["totals"]["processed"] == 2 and doc["totals"]["failed"] == 1
    assert doc["totals"]["mean_run"] == pytest.approx(1.5)
    assert doc["totals"]["mean_wait"] == pytest.approx(300.5)


def test_metrics_are_prometheus_text_and_counters_survive_clear(store, api):
    add_jobs(store, [{"id": "a", "command": "true"}, {"id": "b", "command": "false"}], now=time.time() - 5)
    run_once(store, "a", now=time.time() - 4, duration=0.3)
    run_once(store, "b", "dead", now=time.time() - 3, duration=7)
    add_jobs(store, [{"id": "waiting", "command": "true"}], now=time.time() - 90)
    r = api.get("/metrics")
    assert r.status == 200 and r.header("content-type") == "text/plain; version=0.0.4; charset=utf-8"
    m = metric_lines(r.text)
    assert m['queuectl_jobs{state="completed"}'] == 1 and m['queuectl_jobs{state="dead"}'] == 1
    assert m['queuectl_attempts_total{queue="default",outcome="completed"}'] == 1
    assert m['queuectl_attempts_total{queue="default",outcome="failed"}'] == 1
    b = 'queuectl_job_duration_seconds_bucket{queue="default",outcome="completed",le="%s"}'
    assert m[b % "0.1"] == 0 and m[b % "0.5"] == 1 and m[b % "+Inf"] == 1
    assert m['queuectl_job_duration_seconds_count{queue="default",outcome="failed"}'] == 1
    assert m['queuectl_job_duration_seconds_sum{queue="default",outcome="failed"}'] == pytest.approx(7)
    assert 89 < m["queuectl_oldest_pending_job_age_seconds"] < 150
    assert m['queuectl_workers{state="busy"}'] == 0
    assert "# TYPE queuectl_job_duration_seconds histogram" in r.text
    store.delete_jobs()
    after = metric_lines(api.get("/metrics").text)
    counters = [k for k in m if "_total" in k or "_bucket" in k or "_sum" in k or "_count" in k]
    assert counters and all(after[k] == m[k] for k in counters)
    assert after['queuectl_jobs{state="completed"}'] == 0


def test_healthz(api):
    r = api.get("/healthz")
    assert r.status == 200 and r.json()["status"] == "ok"


def read_event(sock_file, deadline):
    """The next SSE event as (name, data); None at the deadline."""
    name, data = None, None
    while time.monotonic() < deadline:
        try:
            line = sock_file.readline()
        except socket.timeout:
            return None
        if not line:
            return None
        line = line.decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
        elif line == "" and name:
            return name, data
    return None


def open_events(port, origin=None, token=None):
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
    s.sendall(("GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept: text/event-stream\r\n%s%s\r\n"
               % (port, "Origin: %s\r\n" % origin if origin else "",
                  "Authorization: Bearer %s\r\n" % token if token else "")).encode())
    f = s.makefile("rb")
    status = f.readline()
    while f.readline() not in (b"\r\n", b""):
        pass
    return s, f, status


def test_events_stream_announces_a_change_within_a_second(store, serve):
    srv, client = serve()
    s, f, status = open_events(srv.server_address[1], token=srv.token)
    try:
        assert b"200" in status
        assert read_event(f, time.monotonic() + 2)[0] == "hello"
        assert client.get_json("/healthz")["event_streams"] == 1
        start = time.monotonic()
        add_jobs(store, [{"id": "new", "command": "true"}])  # another connection commits
        event = read_event(f, start + 1.0)
        assert event and event[0] == "change", event
    finally:
        f.close()
        s.close()
    wait_until(lambda: client.get_json("/healthz")["event_streams"] == 0, 5,
               message="the stream of a client that went away was not closed")


def test_events_streams_end_when_the_server_stops(serve):
    srv, client = serve()
    s, f, _ = open_events(srv.server_address[1], token=srv.token)
    try:
        assert read_event(f, time.monotonic() + 2)[0] == "hello"
        srv.stop()
        s.settimeout(5)
        assert f.read() == b""  # the server closed the stream
    finally:
        f.close()
        s.close()


def test_mutations_enqueue_retry_and_clear(store, db, api):
    r = api.post("/api/jobs", {"command": "echo from the api", "priority": "high", "id": "web1", "max_retries": 0})
    assert r.status == 201 and r.json() == {"success": True, "id": "web1"}
    job = store.get("web1")
    assert (job.command, job.priority_name, job.state, job.max_retries) == ("echo from the api", "high", "pending", 0)
    r = api.post("/api/jobs", {"command": "x", "priority": "urgent"})
    assert r.status == 400 and "priority" in r.json()["error"]
    assert api.post("/api/jobs", {"command": "x", "id": "web1"}).status == 409
    assert api.post("/api/jobs/web1/retry").status == 409  # not dead
    assert api.post("/api/jobs/nope/retry").status == 404
    add_jobs(store, [{"id": "d1", "command": "false"}, {"id": "d2", "command": "false"}])
    for j in ("web1", "d1", "d2"):
        set_state(db, j, "dead")
    r = api.post("/api/jobs/web1/retry", {"reset_attempts": True})
    assert r.status == 200 and store.get("web1").state == "pending"
    assert api.post("/api/dlq/retry").json() == {"success": True, "retried": 2, "skipped": 0}
    set_state(db, "d1", "dead")
    assert api.post("/api/dlq/clear").json() == {"success": True, "deleted": 1}
    assert store.get("d1") is None and store.get("d2").state == "pending"


def test_cancel_through_the_api(store, api):
    add_jobs(store, [{"id": "c1", "command": "true"}])
    r = api.post("/api/jobs/c1/cancel")
    assert r.status == 200 and r.json()["result"] == "cancelled" and store.get("c1").state == "cancelled"
    assert api.post("/api/jobs/c1/cancel").status == 409


# --- safety rules: each test fails if its rule is broken --------------------------------------------


MUTATIONS = ["/api/jobs", "/api/jobs/d/retry", "/api/jobs/d/cancel", "/api/dlq/retry", "/api/dlq/clear"]


def snapshot(db):
    return db_rows(db, "SELECT id, state FROM jobs ORDER BY id")


def login_cookie(client):
    """Open the token URL as a browser does: the cookie it sets ("name=value")."""
    r = client.get("/?token=" + client.token, auth=False)
    assert r.status == 303 and r.header("location") == "/"
    return r.header("set-cookie").split(";")[0]


def test_mutations_need_the_token(store, db, api):
    add_jobs(store, [{"id": "d", "command": "false"}])
    set_state(db, "d", "dead")
    before = snapshot(db)
    cookie = login_cookie(api)
    for path in MUTATIONS:
        for token in (None, "", "wrong-token-wrong-token", api.token + "x", api.token.upper()):
            r = api.post(path, {"command": "echo pwned"}, token=token)
            assert r.status == 401, (path, token, r.status)
        r = api.request("POST", path + "?token=" + api.token, body=b"{}", headers={"Content-Type": "application/json"},
                        auth=False)
        assert r.status == 401  # a token in the URL does not count for changes
        # A browser's cookie alone is not enough: the page's CSRF value must come with it.
        for csrf in (None, "", api.token, "0" * 64):
            r = api.post(path, {"command": "echo pwned"}, token=None, headers={"Cookie": cookie, web.CSRF_HEADER: csrf})
            assert r.status == 403, (path, csrf, r.status)
    assert snapshot(db) == before
    assert api.post("/api/jobs", {"command": "echo ok", "id": "ok"}).status == 201
    assert api.post("/api/jobs", {"command": "echo ok", "id": "ok2"}, token=api.token).status == 201
    page = api.get("/", auth=False, Cookie=cookie).text
    csrf = re.search(r'name="queuectl-csrf" content="([0-9a-f]+)"', page).group(1)
    r = api.post("/api/jobs", {"command": "echo ok", "id": "ok3"}, token=None,
                 headers={"Cookie": cookie, web.CSRF_HEADER: csrf})
    assert r.status == 201


def test_mutations_are_post_only(store, db, api):
    add_jobs(store, [{"id": "d", "command": "false"}])
    set_state(db, "d", "dead")
    before = snapshot(db)
    for path in MUTATIONS:
        for method in ("GET", "PUT", "DELETE", "PATCH"):
            r = api.request(method, path, body=b"{}", headers={web.TOKEN_HEADER: api.token,
                                                                "Content-Type": "application/json"})
            if method == "GET" and path == "/api/jobs":
                assert r.status == 200  # the jobs list
                continue
            assert r.status == 405, (method, path, r.status)
            assert "POST" in r.header("allow")
    assert snapshot(db) == before


def test_foreign_origin_is_refused(store, db, api):
    for origin in ("http://evil.example", "null", "http://127.0.0.1:1", "https://127.0.0.1:%d.evil" % api.port,
                   "http://localhost:%d" % api.port):
        r = api.post("/api/jobs", {"command": "echo pwned"}, headers={"Origin": origin})
        assert r.status == 403, origin
        assert api.get("/api/status", Origin=origin).status == 403
    assert snapshot(db) == []
    r = api.post("/api/jobs", {"command": "echo ok"}, headers={"Origin": "http://" + api.host})
    assert r.status == 201
    assert api.get("/api/status", Origin="http://" + api.host).status == 200


def test_cross_site_subresource_requests_are_refused(api):
    r = api.get("/api/status", **{"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"})
    assert r.status == 403
    # A link from another site to the dashboard itself still opens it.
    assert api.get("/", **{"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}).status == 200


def test_unexpected_host_is_refused(api):
    for host in ("evil.example:%d" % api.port, "evil.example", "127.0.0.1.nip.io:%d" % api.port,
                 "localhost.evil.example", ""):
        for path in ("/", "/api/status", "/api/events", "/metrics"):
            r = api.get(path, Host=host)
            assert r.status == 403, (host, path, r.status)
            assert b"queuectl-csrf" not in r.body
    for host in ("127.0.0.1:%d" % api.port, "localhost:%d" % api.port, "LOCALHOST:%d" % api.port, "[::1]:%d" % api.port):
        assert api.get("/", Host=host).status == 200, host
    answer = raw_exchange(api.port, b"GET / HTTP/1.0\r\nAuthorization: Bearer %s\r\n\r\n" % api.token.encode())
    assert answer.startswith(b"HTTP/1.1 403") and b"queuectl-csrf" not in answer  # (no Host at all)


def test_allow_host_adds_a_name(serve):
    _, client = serve(allow_hosts=["queue.internal.example"])
    assert client.get("/", Host="queue.internal.example").status == 200
    assert client.get("/", Host="other.internal.example").status == 403


def test_no_cors_headers_so_other_sites_cannot_read_the_token(api):
    for method, path in (("OPTIONS", "/api/jobs"), ("OPTIONS", "/"), ("GET", "/"), ("GET", "/api/status")):
        r = api.request(method, path, headers={"Origin": "http://" + api.host,
                                               "Access-Control-Request-Method": "POST"})
        assert not [h for h in r.headers if h.startswith("access-control-")], (method, path, r.headers)
    assert api.request("OPTIONS", "/api/jobs").status == 405


def test_token_is_per_server_and_never_sent_back(store, serve):
    add_jobs(store, [{"id": "j", "command": "true"}])
    srv1, c1 = serve()
    srv2, c2 = serve()
    assert srv1.token != srv2.token and len(srv1.token) >= 32
    assert srv1.csrf != srv2.csrf and srv1.session != srv2.session
    for path in ("/", "/api/status", "/api/jobs", "/api/jobs/j", "/api/workers", "/api/stats", "/metrics", "/healthz",
                 "/app.js"):
        body = c1.get(path).body
        assert srv1.token.encode() not in body and srv1.session.encode() not in body, path
        assert (srv1.csrf.encode() in body) == (path == "/"), path  # the CSRF value: in the page only
    assert c1.post("/api/jobs", {"command": "true"}, token=srv2.token).status == 401
    assert c1.get("/api/status", auth=False, Authorization="Bearer " + srv2.token).status == 401


def test_other_binds_need_a_chosen_token(db, run):
    for host in ("0.0.0.0", "::", "192.0.2.10", "example.com"):
        with pytest.raises(queuectl.InvalidInput, match="token"):
            web.make_server(str(db), host=host, port=0)
    with pytest.raises(queuectl.InvalidInput, match="16-256"):
        web.make_server(str(db), host="0.0.0.0", port=0, token="short")
    r = run("dashboard", "--host", "0.0.0.0", "--port", "0", timeout=20)
    assert r.rc == 2 and "queuectl: error: listening on 0.0.0.0 exposes the dashboard" in r.err
    assert r.out == "" and "Traceback" not in r.err


@pytest.mark.parametrize("options", [{}, {"host": "0.0.0.0", "token": "s3cret-token-for-the-network"}],
                         ids=["default", "network"])
def test_every_request_needs_the_token(store, serve, options):
    """On loopback too: other accounts of this machine can connect to 127.0.0.1."""
    srv, client = serve(**options)
    token = srv.token
    for path in ("/", "/app.js", "/app.css", "/favicon.svg", "/api/status", "/api/jobs", "/api/events", "/metrics",
                 "/api/workers", "/api/stats"):
        for method in ("GET", "HEAD"):
            r = client.request(method, path, auth=False)
            assert r.status == 401, (method, path)
            assert token.encode() not in r.body and srv.csrf.encode() not in r.body
            assert b"queuectl-csrf" not in r.body
    assert client.get("/healthz", auth=False).status == 200  # for load balancers; tells nothing
    assert client.get("/api/status", auth=False, Authorization="Bearer " + token).status == 200
    assert client.get("/api/status", auth=False, **{web.TOKEN_HEADER: token}).status == 200
    assert client.get("/metrics", auth=False, Authorization="Bearer wrong" + token).status == 401
    assert client.get("/?token=wrong", auth=False).status == 401
    assert client.get("/?token=", auth=False).status == 401
    assert client.get("/api/status?token=" + token, auth=False).status == 401  # the URL logs in the page only
    jar = login_cookie(client)
    assert "HttpOnly" in client.get("/?token=" + token, auth=False).header("set-cookie")
    assert "SameSite=Strict" in client.get("/?token=" + token, auth=False).header("set-cookie")
    assert token not in jar  # the cookie holds a value derived from the token, not the token
    page = client.get("/", auth=False, Cookie=jar)
    assert page.status == 200 and 'content="%s"' % srv.csrf in page.text and token not in page.text
    assert client.get("/api/status", auth=False, Cookie=jar).status == 200
    name, value = jar.split("=", 1)
    tampered = value[:-1] + ("1" if value.endswith("0") else "0")  # (a value ending in 0 must change too)
    assert client.get("/api/status", auth=False, Cookie="%s=%s" % (name, tampered)).status == 401
    assert client.get("/api/status", auth=False, Cookie="%s=%s" % (name, token)).status == 401
    assert client.post("/api/jobs", {"command": "true"}, token=token).status == 201


def test_without_a_credential_the_page_points_to_the_printed_url_and_the_api_asks_for_a_bearer(api):
    page = api.get("/", auth=False)
    assert page.status == 401 and "?token=" in page.json()["error"] and page.header("www-authenticate") is None
    r = api.get("/api/status", auth=False)
    assert r.status == 401 and r.header("www-authenticate") == 'Bearer realm="queuectl"'


def test_an_over_long_request_line_is_431(api):
    answer = raw_exchange(api.port, b"GET /" + b"a" * (web.MAX_HEAD_BYTES + 10) + b" HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431")


def test_content_length_below_zero_is_400_and_zero_is_an_empty_body(db, api):
    answer = raw_exchange(api.port, ("POST /api/dlq/retry HTTP/1.1\r\nHost: %s\r\n%s: %s\r\n"
                                     "Content-Length: -1\r\n\r\n" % (api.host, web.TOKEN_HEADER, api.token)).encode())
    assert answer.startswith(b"HTTP/1.1 400") and b"bad Content-Length" in answer
    r = api.request("POST", "/api/dlq/retry", body=b"", headers={web.TOKEN_HEADER: api.token})
    assert r.status == 200, r.text


def test_a_dashboard_whose_database_was_deleted_does_not_make_a_new_one(db, api):
    assert api.get("/api/status").status == 200
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(str(db) + suffix):
            os.unlink(str(db) + suffix)
    r = api.get("/api/status")
    assert r.status in (404, 503) and "error" in r.json(), (r.status, r.text)
    assert not os.path.exists(str(db))


def test_a_token_in_the_url_logs_in_the_page_only(api):
    r = api.get("/app.js?token=" + api.token, auth=False)
    assert r.status == 401 and r.header("set-cookie") is None


def test_a_method_a_route_does_not_take_is_405_with_the_methods_it_does(api):
    r = api.request("DELETE", "/api/status")
    assert r.status == 405 and r.header("allow") == "GET, HEAD"
    r = api.request("PUT", "/api/dlq/retry")
    assert r.status == 405 and r.header("allow") == "POST"


def test_a_cross_site_request_that_is_not_a_navigation_is_refused(api):
    for mode in ("cors", "no-cors", "same-origin", "websocket"):
        r = api.get("/api/status", **{"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": mode})
        assert r.status == 403, mode


def test_routes_answer_their_own_methods_only(api):
    r = api.request("POST", "/api/status", body=b"{}", headers={"Content-Type": "application/json"})
    assert r.status == 405 and r.header("allow") == "GET, HEAD"
    r = api.request("HEAD", "/api/dlq/retry")
    assert r.status == 405 and r.header("allow") == "POST"


def test_a_body_shorter_than_its_content_length_is_400(api):
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as c:
        c.sendall(("POST /api/jobs HTTP/1.1\r\nHost: %s\r\n%s: %s\r\nContent-Type: application/json\r\n"
                   "Content-Length: 100\r\n\r\n{}" % (api.host, web.TOKEN_HEADER, api.token)).encode())
        c.shutdown(socket.SHUT_WR)  # the client is done: 2 bytes of the 100
        answer = b""
        while True:
            chunk = c.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400") and b"incomplete request body" in answer


def test_a_content_length_that_is_not_a_number_is_400(api):
    answer = raw_exchange(api.port, ("POST /api/dlq/retry HTTP/1.1\r\nHost: %s\r\n%s: %s\r\n"
                                     "Content-Length: ten\r\n\r\n" % (api.host, web.TOKEN_HEADER, api.token)).encode())
    assert answer.startswith(b"HTTP/1.1 400") and b"bad Content-Length" in answer


def test_a_body_of_exactly_the_limit_is_taken_with_its_charset(api):
    body = b'{"command": "true"}'
    body += b" " * (web.MAX_BODY - len(body))
    r = api.request("POST", "/api/jobs", body=body,
                    headers={web.TOKEN_HEADER: api.token, "Content-Type": "application/json; charset=utf-8"})
    assert r.status == 201, r.text


def test_a_body_that_is_not_declared_json_is_415(api):
    for ctype in (None, "application/csv", "text/plain"):
        r = api.request("POST", "/api/jobs", body=b'{"command": "true"}',
                        headers={web.TOKEN_HEADER: api.token, "Content-Type": ctype})
        assert r.status == 415, ctype


def test_a_refused_body_that_was_read_keeps_the_connection_open(api):
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    try:
        hdrs = {"Host": api.host, web.TOKEN_HEADER: api.token}
        conn.request("POST", "/api/jobs", body=b"command=x", headers=dict(hdrs, **{"Content-Type": "text/plain"}))
        first = conn.getresponse()
        assert first.status == 415 and not first.will_close
        first.read()
        conn.request("GET", "/api/status", headers=hdrs)  # the same connection
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def test_a_connection_whose_thread_cannot_start_gives_its_slot_back(db, monkeypatch):
    import socketserver

    srv = web.make_server(str(db), port=0)
    try:
        def no_thread(self, request, client_address):
            raise RuntimeError("can't start new thread")

        monkeypatch.setattr(socketserver.ThreadingMixIn, "process_request", no_thread)
        a, b = socket.socketpair()
        try:
            with pytest.raises(RuntimeError):
                srv.process_request(a, ("127.0.0.1", 1))
            assert srv.connections == 0
        finally:
            a.close()
            b.close()
    finally:
        srv.server_close()


def test_static_files_come_from_the_explicit_list_only(api):
    for path in ("/server.py", "/__init__.py", "/static/app.js", "/index.html", "/../queuectl.py",
                 "/%2e%2e/queuectl.py", "/app.js/../server.py", "/..%2fserver.py", "//etc/passwd",
                 "/static/../server.py", "/app.js%00.css", "/APP.JS", "/app.js/"):
        r = api.get(path)
        assert r.status == 404, (path, r.status)
        assert b"import" not in r.body
    assert set(web.STATIC) == {"/", "/app.js", "/app.css", "/favicon.svg"}
    assert len(web.load_static()) == len(web.STATIC)


def test_request_bodies_have_a_size_limit(db, api):
    # Refused on the header alone: the server does not wait for (or read) the body.
    answer = raw_exchange(api.port, ("POST /api/jobs HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                                     "%s: %s\r\nContent-Length: 999999999\r\n\r\n" % (api.host, web.TOKEN_HEADER,
                                                                                    api.token)).encode())
    assert answer.startswith(b"HTTP/1.1 413")
    answer = raw_exchange(api.port, ("POST /api/jobs HTTP/1.1\r\nHost: %s\r\n%s: %s\r\nTransfer-Encoding: chunked\r\n"
                                     "Content-Type: application/json\r\n\r\n5\r\n{}   \r\n0\r\n\r\n"
                                     % (api.host, web.TOKEN_HEADER, api.token)).encode())
    assert answer.startswith(b"HTTP/1.1 411")
    r = api.request("POST", "/api/jobs", body=b"command=x", headers={web.TOKEN_HEADER: api.token,
                                                                    "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 415
    r = api.request("POST", "/api/jobs", body=b"{not json", headers={web.TOKEN_HEADER: api.token,
                                                                    "Content-Type": "application/json"})
    assert r.status == 400
    assert api.post("/api/jobs", ["a list"]).status == 400
    assert snapshot(db) == []
    small = {"command": "x" * 100000}
    assert api.post("/api/jobs", small).status == 201


def test_read_only_refuses_every_mutation(store, db, serve):
    srv, client = serve(read_only=True)
    add_jobs(store, [{"id": "d", "command": "false"}])
    set_state(db, "d", "dead")
    before = snapshot(db)
    for path in MUTATIONS:
        r = client.post(path, {"command": "echo pwned"})
        assert r.status == 403 and "read-only" in r.json()["error"], path
    assert snapshot(db) == before
    assert '<meta name="queuectl-read-only" content="true">' in client.get("/").text
    assert client.get_json("/api/status")["read_only"] is True


def test_no_traceback_ever_reaches_a_client(store, api, monkeypatch):
    def broken(self):
        raise RuntimeError("secret detail /etc/shadow")

    monkeypatch.setattr(queuectl.SqliteStore, "counts", broken)
    for path in ("/api/status", "/metrics", "/healthz"):
        r = api.get(path)
        assert r.status == 500 and r.json() == {"success": False,
                                                 "error": "internal error (details are in the dashboard's log)"}
        assert b"Traceback" not in r.body and b"secret" not in r.body
    for garbage in (b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
                    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X: " + b"y" * 70000 + b"\r\n\r\n",
                    b"GET /api/jobs?limit=%ff%fe HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"):
        answer = raw_exchange(api.port, garbage)
        # (http.server answers a request line it cannot parse as HTTP/0.9: a body without status line)
        assert re.match(rb"^(HTTP/1\.[01] )?[45]\d\d ", answer), answer[:80]
        assert b"Traceback" not in answer and b"File \"" not in answer and b"aaaa" not in answer


def test_the_page_never_inserts_strings_as_html():
    """The page's code has no HTML sink; only the h() helper, textContent and text nodes."""
    js = (STATIC_DIR / "app.js").read_text()
    code = re.sub(r"/\*.*?\*/", "", js, flags=re.S)
    code = "\n".join(line for line in code.splitlines() if not line.strip().startswith("//"))
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "createContextualFragment", "DOMParser", "srcdoc", "javascript:"):
        assert sink not in code, sink
    html_page = (STATIC_DIR / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html_page), "inline script"
    assert not re.search(r"\son[a-z]+=", html_page), "inline event handler"
    assert "style=" not in html_page


# --- the real program: dashboard, up, and the seed README's Test 4 ------------------------------------------


class Program:
    """A long-running queuectl process (dashboard or up), killed by PID at teardown."""

    def __init__(self, db, tmp_path):
        self.db, self.tmp_path, self.procs = db, tmp_path, []

    def start(self, *args, env=None):
        err = open(self.tmp_path / ("program-%d.err" % len(self.procs)), "wb")
        proc = subprocess.Popen(program() + [str(a) for a in args], stdout=subprocess.PIPE, stderr=err,
                                stdin=subprocess.DEVNULL, env=env or program_env(self.db), cwd=self.tmp_path,
                                start_new_session=True)
        err.close()
        self.procs.append(proc)
        line = proc.stdout.readline().decode()
        assert line.startswith("dashboard: http://"), (line, self.stderr(proc))
        proc.url = line.split()[-1]
        m = re.match(r"^http://127\.0\.0\.1:(\d+)/\?token=([A-Za-z0-9_-]{32,})$", proc.url)
        assert m, proc.url
        proc.port, proc.token = int(m.group(1)), m.group(2)
        return proc

    def stderr(self, proc):
        return (self.tmp_path / ("program-%d.err" % self.procs.index(proc))).read_text(errors="replace")

    def kill_all(self):
        for p in self.procs:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                p.wait(10)
            except Exception:
                pass


@pytest.fixture
def programs(db, tmp_path, workers):
    p = Program(db, tmp_path)
    yield p
    p.kill_all()  # the workers fixture then kills every worker and job recorded in the database


def port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.e2e
def test_dashboard_command_serves_the_page_and_stops_on_sigterm(programs, run):
    proc = programs.start("dashboard", "--port", "0")
    client = Client(proc.port, proc.token)
    assert client.get("/", auth=False).status == 401
    cookie = login_cookie(client)
    page = client.get("/", auth=False, Cookie=cookie)
    assert page.status == 200 and "queuectl-csrf" in page.text
    csrf = re.search(r'name="queuectl-csrf" content="([^"]+)"', page.text).group(1)
    for path in ("/app.js", "/app.css", "/favicon.svg"):
        assert client.get(path, auth=False, Cookie=cookie).status == 200
    r = client.post("/api/jobs", {"command": "echo hi", "id": "from-web"}, token=None,
                    headers={"Cookie": cookie, web.CSRF_HEADER: csrf})
    assert r.status == 201
    assert run("get", "from-web", "--json").rc == 0
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert not port_open(proc.port)


@pytest.mark.e2e
def test_dashboard_command_reports_a_busy_port(programs, run):
    proc = programs.start("dashboard", "--port", "0")
    r = run("dashboard", "--port", proc.port, timeout=20)
    assert r.rc == 1 and "queuectl: error: cannot listen on 127.0.0.1 port %d" % proc.port in r.err


@pytest.mark.e2e
def test_up_runs_workers_and_dashboard_and_stops_gracefully(db, programs, run):
    proc = programs.start("up", "--count", "2", "--port", "0", "--poll-interval", "0.05")
    client = Client(proc.port, proc.token)
    wait_until(lambda: client.get_json("/api/status")["workers_summary"]["total"] == 2, 20,
               message="workers of `up` did not register")
    for i in range(3):
        assert run("enqueue", "--id", "u%d" % i, "--", "echo", i).rc == 0
    wait_until(lambda: client.get_json("/api/status")["job_counts"]["completed"] == 3, 20)
    assert run("enqueue", "--id", "slow", "--", "sleep 1; echo finished").rc == 0
    wait_until(lambda: db_rows(db, "SELECT state FROM jobs WHERE id = 'slow'") == [("processing",)], 20)
    proc.send_signal(signal.SIGTERM)  # graceful: the running job finishes first
    assert proc.wait(30) == 0, programs.stderr(proc)
    assert db_rows(db, "SELECT state FROM jobs WHERE id = 'slow'") == [("completed",)]
    assert run("logs", "slow").out == "finished\n", (run("get", "slow", "--json").out, programs.stderr(proc))
    assert db_rows(db, "SELECT count(*) FROM workers") == [(0,)]
    assert not port_open(proc.port)


@pytest.mark.e2e
def test_up_second_signal_stops_running_jobs_now(db, programs, run):
    proc = programs.start("up", "--port", "0", "--poll-interval", "0.05")
    assert run("enqueue", "--id", "long", "--", "sleep 60").rc == 0
    wait_until(lambda: db_rows(db, "SELECT state FROM jobs WHERE id = 'long'") == [("processing",)], 20)
    proc.send_signal(signal.SIGINT)
    wait_until(lambda: "running jobs finish first" in programs.stderr(proc), 10)
    proc.send_signal(signal.SIGINT)  # the second one: a cold stop, the job goes back to the queue
    assert proc.wait(30) == 0, programs.stderr(proc)
    assert db_rows(db, "SELECT state FROM jobs WHERE id = 'long'") == [("pending",)]


@pytest.mark.e2e
def test_seed_manual_test4_dashboard_and_monitoring(db, programs, run, workers):
    """The seed README's Test 4: 5 high and 5 low `sleep` jobs, 3 workers, watched live on the dashboard."""
    proc = programs.start("dashboard", "--port", "0")
    client = Client(proc.port, proc.token)
    s, f, status = open_events(proc.port, token=proc.token)
    try:
        assert b"200" in status and read_event(f, time.monotonic() + 5)[0] == "hello"
        for i in range(1, 6):
            assert run("enqueue", "-p", "high", '{"id":"h%d","command":"sleep 1"}' % i).rc == 0
            assert run("enqueue", "-p", "low", '{"id":"l%d","command":"sleep 1"}' % i).rc == 0
        assert read_event(f, time.monotonic() + 5)[0] == "change"
        assert client.get_json("/api/status")["job_counts"]["pending"] == 10
        workers.start(3)
        seen_running = set()
        changes = 0

        def watch():
            nonlocal changes
            event = read_event(f, time.monotonic() + 5)
            assert event, "no live update for 5 s while jobs run"
            changes += 1
            st = client.get_json("/api/status")
            seen_running.add(st["job_counts"]["processing"])
            return st["job_counts"]["completed"] == 10

        wait_until(watch, 60, interval=0)
        assert 3 in seen_running and changes >= 4
        st = client.get_json("/api/status")
        assert st["workers_summary"]["total"] == 3
    finally:
        f.close()
        s.close()
    first = [job for job, _ in db_rows(db, "SELECT job_id, started_at FROM attempts ORDER BY started_at LIMIT 3")]
    assert sorted(first) == ["h1", "h2", "h3"], first  # high priority first
    stats = client.get_json("/api/stats")["totals"]
    assert stats["completed"] == 10 and 0.9 < stats["mean_run"] < 5


def test_stalled_clients_do_not_block_others(serve, monkeypatch):
    """Clients that send half a request and then nothing (or half a body) tie up only their own
    connection; everyone else is served at once, and the stalled ones are cut off after the
    request timeout."""
    monkeypatch.setattr(web.Handler, "timeout", 1.0)
    srv, client = serve()
    stalled = []
    try:
        for i in range(20):
            s = socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=10)
            if i % 2:
                s.sendall(b"GET /api/status HTTP/1.1\r\nHost: " + client.host.encode() + b"\r\n")  # no blank line
            else:
                s.sendall(b"POST /api/jobs HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 1000\r\n\r\n{\"comm" % client.host.encode())  # a tenth of the body
            stalled.append(s)
        started = time.monotonic()
        for _ in range(5):
            assert client.get("/healthz").status == 200
        assert client.get_json("/api/status")["success"] is True
        assert time.monotonic() - started < 3, "stalled clients held up the others"
        for s in stalled:  # each stalled connection is closed by the server after REQUEST_TIMEOUT
            s.settimeout(10)
            try:
                while s.recv(65536):
                    pass
            except ConnectionResetError:
                pass
    finally:
        for s in stalled:
            s.close()

