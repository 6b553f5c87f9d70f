"""The dashboard and HTTP API: a small ``http.server`` app with a route table.

Everything a client can reach is in ``ROUTES`` (API, SSE, metrics, health)
and ``STATIC`` (the page's files); nothing else is served.

Security model (docs/security.md says the same for users).  Other accounts on
this machine can reach loopback, browsers run pages of any site, and a bound
address may face a network, so:

* Every request but ``/healthz`` needs the server's secret token, on loopback
  too: ``Authorization: Bearer``, the ``X-Queuectl-Token`` header, or the
  session cookie set by opening ``/?token=...`` once (HttpOnly,
  SameSite=Strict; the printed URL carries a fresh random token unless one is
  given).  Nothing is served to a client that has not presented it.
* A change is a POST with a JSON body.  Made with the cookie (a browser), it
  must also carry the page's CSRF value in ``X-Queuectl-CSRF``; the page gets
  that value only inside its HTML, which only an authenticated client sees.
  The cookie and the CSRF value are derived from the token, never the token.
* A request with a foreign ``Origin`` (or a cross-site ``Sec-Fetch-Site`` on
  anything but a navigation), or with a ``Host`` that is neither an IP
  address nor a known name of this server, is refused (DNS rebinding).
* Before a client is authenticated it can cost only a bounded amount: the
  request head is at most ``MAX_HEAD_BYTES`` and must arrive within
  ``HEAD_TIMEOUT`` seconds, a body within ``BODY_TIMEOUT``; at most
  ``MAX_CONNECTIONS`` connections (event streams included) are served at once.
* Secrets in jobs (env values, webhook URLs) are masked in every answer.
* ``--read-only`` refuses every POST.  Errors never carry a traceback; bad
  input (a query number out of range, JSON nested too deep) is a 400.
* The page inserts job strings as text only; CSP forbids inline script.
"""

import base64
import contextlib
import hmac
import hashlib
import html
import http.client
import http.server
import io
import ipaddress
import json
import logging
import pkgutil
import re
import secrets
import select
import socket
import threading
import time
import urllib.parse

import queuectl
from queuectl import QueuectlError, InvalidInput, NotFound, Conflict, DatabaseBusy, rfc3339

log = logging.getLogger("queuectl.web")

MAX_BODY = 256 * 1024  # bytes; a job's command may be 128 KiB
PAGE_LIMIT_DEFAULT = 50
PAGE_LIMIT_MAX = 200
RECENT_JOBS = 20  # jobs in /api/status (the seed dashboard's "jobs")
OUTPUT_TAIL = 64 * 1024  # characters of an attempt's output sent to the page
STATS_MINUTES = 60
SSE_POLL_INTERVAL = 0.2  # seconds between PRAGMA data_version checks
SSE_KEEPALIVE = 15.0  # seconds between comment lines on an idle event stream
SSE_MAX_CLIENTS = 32
REQUEST_TIMEOUT = 30.0  # seconds a connection may wait for a client's next bytes
HEAD_TIMEOUT = 10.0  # seconds from waiting for a request to having its whole head (also ends idle keep-alives)
BODY_TIMEOUT = 30.0  # seconds to receive a request body (at most MAX_BODY bytes)
MAX_HEAD_BYTES = 32 * 1024  # request line and headers together
MAX_CONNECTIONS = 64  # served at once, event streams included; more get a 503 at once
MAX_QUERY_INT = 2 ** 31 - 1
MAX_CURSOR = 512  # characters
TOKEN_HEADER = "X-Queuectl-Token"
CSRF_HEADER = "X-Queuectl-CSRF"
TOKEN_RE = re.compile(r"^[A-Za-z0-9._~+/=-]{16,256}$")
TOKEN_IN_URL = re.compile(r"([?&]token=)[^&\s#]*")
MASK = "***"
FAILED_OUTCOMES = queuectl.FAILED_OUTCOMES
LOST_OUTCOMES = ("lost", "stopped")

#: URL path -> (file in queuectl_web/static, content type).  The only files served.
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}

ERRORS = {InvalidInput: 400, NotFound: 404, Conflict: 409, DatabaseBusy: 503}


class HTTPError(Exception):
    """A response with an error status and a one-line message for the client."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def load_static():
    """Read the static files named in STATIC (from the package, also inside a .pyz)."""
    return {path: (pkgutil.get_data(__package__, "static/" + name), ctype) for path, (name, ctype) in STATIC.items()}


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host(value):
    """'Host' header value -> lower-case host name without port (IPv6 without brackets)."""
    value = (value or "").strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else ""
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


# --- change detection -----------------------------------------------------------------


class ChangeWatcher:
    """Notices commits to the database by any process, cheaply.

    One thread asks its own store for ``data_version()`` (SQLite: ``PRAGMA
    data_version``) every ``interval`` seconds while at least one event stream
    is open, and bumps ``version`` when it changes.  Event streams wait on the
    condition.  A backend without ``data_version`` is watched through a
    fingerprint of counts, the newest job and worker heartbeats instead.
    """

    def __init__(self, db_path, interval=SSE_POLL_INTERVAL):
        self.db_path = db_path
        self.interval = interval
        self.version = 0
        self.clients = 0
        self.stopped = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="queuectl-web-watcher", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        with self.cond:
            self.stopped = True
            self.cond.notify_all()

    def subscribe(self):
        with self.cond:
            if self.clients >= SSE_MAX_CLIENTS:
                return False
            self.clients += 1
            self.cond.notify_all()
            return True

    def unsubscribe(self):
        with self.cond:
            self.clients -= 1

    def wait(self, version, timeout):
        """Block until ``version`` is out of date, the watcher stops or ``timeout`` passes."""
        with self.cond:
            self.cond.wait_for(lambda: self.version != version or self.stopped, timeout)
            return self.version

    @staticmethod
    def _fingerprint(store):
        try:
            return store.data_version()
        except NotImplementedError:
            newest = store.list_jobs(limit=1)
            return (tuple(sorted(store.counts().items())),
                    (newest[0].updated_at, newest[0].seq) if newest else None,
                    tuple((w["id"], w["heartbeat_at"], w["state"], w["job_id"]) for w in store.workers()))

    def _run(self):
        store, last = None, None
        while True:
            with self.cond:
                while self.clients <= 0 and not self.stopped:
                    self.cond.wait()
                if self.stopped:
                    break
            try:
                if store is None:
                    store = queuectl.open_store(self.db_path, create=False)
                current = self._fingerprint(store)
            except Exception as e:  # a busy or vanished database: try again with a new store
                log.debug("change watcher: %s", e)
                if store is not None:
                    store.close()
                store, current = None, None
            if current is not None:
                if last is not None and current != last:
                    with self.cond:
                        self.version += 1
                        self.cond.notify_all()
                last = current
            with self.cond:
                self.cond.wait_for(lambda: self.stopped, self.interval)
        if store is not None:
            store.close()


# --- views: JSON documents built from the store ----------------------------------------


def mask_url(url):
    """A URL as the dashboard shows it: scheme and host only.  Credentials may sit in the user
    part, the path (a Slack-style hook) or the query; the owner sees them with `queuectl get`."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return MASK
    if ":" in host:
        host = "[%s]" % host
    userinfo = MASK + "@" if "@" in parts.netloc else ""
    rest = "/" + MASK if parts.path.strip("/") or parts.query or parts.fragment else "/"
    return "%s://%s%s%s%s" % (parts.scheme, userinfo, host, ":%d" % port if port else "", rest)


def job_view(job, cfg):
    """Every field of a job, its secrets masked (env values, webhook URL), with the timeout
    that applies to it and where that comes from."""
    d = job.to_dict()
    d["effective_timeout"], d["timeout_from"] = queuectl.timeout_of(job, cfg)
    d["timeout_text"] = queuectl.describe_timeout(job, cfg)
    d["env"] = {name: MASK for name in d.get("env") or {}}
    if d.get("webhook"):
        d["webhook"] = mask_url(d["webhook"])
    return d


def job_brief(job):
    """The fields a jobs table shows."""
    d = job.to_dict()
    keep = ("id", "command", "state", "priority", "queue", "attempts", "max_retries", "runs", "created_at",
            "updated_at", "run_at", "started_at", "finished_at", "exit_code", "last_error", "worker_id")
    return {k: d.get(k) for k in keep}


def workers_view(store, now):
    workers = []
    for view in queuectl.worker_views(store, now):
        view["job_command"] = None
        view["job_started_at"] = None
        if view["job_id"]:
            job = store.get(view["job_id"])
            if job is not None and job.state == "processing":
                view["job_command"] = job.command
                view["job_started_at"] = rfc3339(job.started_at)
        workers.append(view)
    return workers


def stats_view(store, now, minutes=STATS_MINUTES):
    until = int(now // 60)
    since = until - minutes + 1
    table = {m: {"completed": 0, "failed": 0, "lost": 0, "other": 0, "run_sum": 0.0, "wait_sum": 0.0, "ran": 0}
             for m in range(since, until + 1)}
    for r in store.stats_minutes(since, until):
        b = table.get(r["minute"])
        if b is None:
            continue
        outcome, count = r["outcome"], r["count"]
        if outcome == "completed":
            b["completed"] += count
        elif outcome in FAILED_OUTCOMES:
            b["failed"] += count
        elif outcome in LOST_OUTCOMES:
            b["lost"] += count
        else:
            b["other"] += count
        if outcome == "completed" or outcome in FAILED_OUTCOMES:
            b["ran"] += count
            b["run_sum"] += r["run_sum"]
            b["wait_sum"] += r["wait_sum"]
    rows, total = [], {"completed": 0, "failed": 0, "lost": 0, "ran": 0, "run_sum": 0.0, "wait_sum": 0.0}
    for m in range(since, until + 1):
        b = table[m]
        for k in total:
            total[k] += b[k]
        rows.append({
            "minute": rfc3339(m * 60, precise=False), "processed": b["completed"] + b["failed"],
            "completed": b["completed"], "failed": b["failed"], "lost": b["lost"],
            "mean_run": round(b["run_sum"] / b["ran"], 6) if b["ran"] else None,
            "mean_wait": round(b["wait_sum"] / b["ran"], 6) if b["ran"] else None,
        })
    return {
        "now": rfc3339(now), "minutes": rows,
        "totals": {"processed": total["completed"] + total["failed"], "completed": total["completed"],
                   "failed": total["failed"], "lost": total["lost"],
                   "mean_run": round(total["run_sum"] / total["ran"], 6) if total["ran"] else None,
                   "mean_wait": round(total["wait_sum"] / total["ran"], 6) if total["ran"] else None},
    }


def encode_cursor(job, by_id):
    doc = ["i", job.id] if by_id else ["t", job.updated_at, job.seq]
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")


def decode_cursor(text, by_id):
    if len(text) > MAX_CURSOR:
        raise HTTPError(400, "invalid cursor (take it from a previous page's 'next')")
    try:
        doc = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode())
        if by_id and doc[0] == "i" and isinstance(doc[1], str) and len(doc[1]) <= queuectl.MAX_ID_LENGTH:
            return doc[1]
        if not by_id and doc[0] == "t" and isinstance(doc[1], (int, float)) and not isinstance(doc[1], bool) \
                and abs(doc[1]) < 1e12 and isinstance(doc[2], int) and 0 <= doc[2] < 2 ** 63:
            return float(doc[1]), doc[2]
    except (ValueError, TypeError, IndexError, KeyError, RecursionError):
        pass
    raise HTTPError(400, "invalid cursor (take it from a previous page's 'next')")


# --- the server --------------------------------------------------------------------------


class DashboardServer(http.server.ThreadingHTTPServer):
    """The dashboard's HTTP server.  ``start()`` serves in a thread; ``stop()`` ends everything."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, db_path, host="127.0.0.1", port=5000, token=None, read_only=False, allow_hosts=()):
        if token is not None and not TOKEN_RE.match(token):
            raise InvalidInput("the dashboard token must be 16-256 characters of A-Z a-z 0-9 . _ ~ + / = - "
                               "(make one with: python3 -c 'import secrets; print(secrets.token_urlsafe())')")
        if not is_loopback(host) and not token:
            raise InvalidInput("listening on %s exposes the dashboard to the network: choose its token with --token, "
                               "--token-file or QUEUECTL_DASHBOARD_TOKEN (or keep the default --host 127.0.0.1)"
                               % (host or "all addresses"))
        store = queuectl.open_store(db_path)  # create or migrate now, so errors show before serving
        store.close()
        self.db_path = db_path
        self.read_only = read_only
        self.token_given = token is not None
        self.token = token or secrets.token_urlsafe(32)
        # What a browser holds (the cookie) and what the page holds (the CSRF value) are derived from
        # the token: neither gives the token itself away (for the API, Prometheus, other sessions).
        self.session = self._derive("session")
        self.csrf = self._derive("csrf")
        self.connections = 0
        self._connections_lock = threading.Lock()
        self.static = load_static()
        self.watcher = ChangeWatcher(db_path)
        self.stopping = False
        self._thread = None
        names = {"localhost"} | {h.lower().rstrip(".") for h in allow_hosts}
        if host and not _is_ip(host):
            names.add(host.lower())
        if not is_loopback(host):
            names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        self.allowed_names = names
        if ":" in (host or ""):
            self.address_family = socket.AF_INET6
        try:
            super().__init__((host, port), Handler)
        except OSError as e:
            raise QueuectlError("cannot listen on %s port %s: %s" % (host, port, e.strerror or e))
        self.cookie_name = "queuectl_token_%d" % self.server_address[1]

    def _derive(self, purpose):
        return hmac.new(self.token.encode(), b"queuectl-dashboard-" + purpose.encode(), hashlib.sha256).hexdigest()

    @property
    def url(self):
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1" if host != "::" else "::1"
        if ":" in host:
            host = "[%s]" % host
        return "http://%s:%d/" % (host, port)

    @property
    def login_url(self):
        """The URL to print: with the token when this server made it up (Jupyter's way), else plain
        (the owner chose the token and knows it; it stays out of logs)."""
        return self.url if self.token_given else self.url + "?token=" + self.token

    # --- connections: a bounded number, refused before any thread is started for them ----

    def process_request(self, request, client_address):
        with self._connections_lock:
            full = self.connections >= MAX_CONNECTIONS
            if not full:
                self.connections += 1
        if full:
            body = b"503 too many connections\n"
            with contextlib.suppress(OSError):
                request.setblocking(False)
                request.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
                             b"Content-Length: %d\r\nRetry-After: 5\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connection_done()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connection_done()

    def _connection_done(self):
        with self._connections_lock:
            self.connections -= 1

    def start(self):
        """Serve in a background thread (call after any fork)."""
        self.watcher.start()
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="queuectl-web", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stop serving: end event streams, close the socket."""
        self.stopping = True
        self.watcher.stop()
        if self._thread is not None:
            self.shutdown()
            self._thread.join(5)
        self.server_close()

    def handle_error(self, request, client_address):
        log.debug("connection from %s failed", client_address[0], exc_info=True)


def _is_ip(host):
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def make_server(db_path, host="127.0.0.1", port=5000, token=None, read_only=False, allow_hosts=()):
    """A DashboardServer bound to ``host:port`` (0 = any free port), not yet serving."""
    return DashboardServer(db_path, host, port, token=token, read_only=read_only, allow_hosts=allow_hosts)


class HeadTooLarge(http.client.HTTPException):
    """A request head over MAX_HEAD_BYTES (http.server answers 431 to an HTTPException in the headers)."""


class BoundedSocketReader(io.RawIOBase):
    """The socket as a handler reads it, with an absolute deadline for a request's head or body
    (a client trickling a byte at a time cannot hold a connection past it) and a byte budget
    for the head (nothing unauthenticated makes the server keep megabytes of headers)."""

    def __init__(self, sock, idle_timeout):
        self.sock = sock
        self.idle_timeout = idle_timeout
        self.deadline = None
        self.budget = None

    def readable(self):
        return True

    def expect(self, seconds, budget=None):
        """From now on reads end ``seconds`` from now, and at most ``budget`` bytes may be read."""
        self.deadline = time.monotonic() + seconds
        self.budget = budget

    def done(self):
        """A request is read: no deadline or budget; writes get the idle timeout again."""
        self.deadline = self.budget = None
        self.sock.settimeout(self.idle_timeout)

    def readinto(self, buffer):
        view = memoryview(buffer)
        if self.budget is not None:
            if self.budget <= 0:
                raise HeadTooLarge("request head larger than %d bytes" % MAX_HEAD_BYTES)
            view = view[:self.budget]
        timeout = self.idle_timeout
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("request not received in time")
            timeout = min(timeout, left)
        self.sock.settimeout(timeout)
        n = self.sock.recv_into(view)
        if self.budget is not None:
            self.budget -= n
        return n


def query_int(query, name, default, lo, hi):
    """A whole number from the query string: ASCII digits only, from ``lo`` to ``hi``, else 400."""
    text = (query.get(name) or [""])[0]
    if text == "":
        return default
    if not re.match(r"^[0-9]{1,10}$", text) or not lo <= int(text) <= hi:
        raise HTTPError(400, "%s must be a whole number from %d to %d" % (name, lo, hi))
    return int(text)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "queuectl"
    timeout = REQUEST_TIMEOUT
    head_timeout = HEAD_TIMEOUT
    body_timeout = BODY_TIMEOUT
    error_content_type = "text/plain; charset=utf-8"
    error_message_format = "%(code)d %(message)s\n"

    # Route table: (method, path pattern, handler name, needs a store).
    ROUTES = [
        ("GET", re.compile(r"^/api/status$"), "get_status"),
        ("GET", re.compile(r"^/api/jobs$"), "get_jobs"),
        ("GET", re.compile(r"^/api/jobs/(?P<job_id>[^/]+)$"), "get_job"),
        ("GET", re.compile(r"^/api/workers$"), "get_workers"),
        ("GET", re.compile(r"^/api/stats$"), "get_stats"),
        ("GET", re.compile(r"^/api/events$"), "get_events"),
        ("GET", re.compile(r"^/metrics$"), "get_metrics"),
        ("GET", re.compile(r"^/healthz$"), "get_healthz"),
        ("POST", re.compile(r"^/api/jobs$"), "post_enqueue"),
        ("POST", re.compile(r"^/api/jobs/(?P<job_id>[^/]+)/retry$"), "post_retry"),
        ("POST", re.compile(r"^/api/jobs/(?P<job_id>[^/]+)/cancel$"), "post_cancel"),
        ("POST", re.compile(r"^/api/dlq/retry$"), "post_dlq_retry"),
        ("POST", re.compile(r"^/api/dlq/clear$"), "post_dlq_clear"),
    ]
    OPEN = ("get_healthz",)  # reachable without the token even when one is required

    # --- plumbing ---------------------------------------------------------------------

    def setup(self):
        super().setup()
        self.rfile.close()  # (the plain file setup() made: reads go through the bounded reader)
        self.reader = BoundedSocketReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self):
        self.reader.expect(self.head_timeout, MAX_HEAD_BYTES)
        try:
            super().handle_one_request()
        except HeadTooLarge:  # in the request line (in headers, http.server itself answers 431)
            self.requestline, self.request_version, self.command = "", "", ""  # (as http.server does for a 414)
            self.send_error(431)
        except socket.timeout:  # (Python 3.9: http.server catches only its own socket.timeout)
            self.close_connection = True

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_HEAD(self):
        self._handle("HEAD")

    def do_PUT(self):
        self._handle("PUT")

    def do_DELETE(self):
        self._handle("DELETE")

    def do_PATCH(self):
        self._handle("PATCH")

    def do_OPTIONS(self):
        self._handle("OPTIONS")

    def version_string(self):
        return "queuectl"

    def log_message(self, fmt, *args):
        log.debug("%s %s", self.address_string(), TOKEN_IN_URL.sub(r"\1" + MASK, fmt % args))

    def send_error(self, code, message=None, explain=None):
        """Errors found by http.server itself (bad request line, ...): a short text, no details."""
        try:
            short = http.server.BaseHTTPRequestHandler.responses.get(code, ("Error",))[0]
        except Exception:  # pragma: no cover
            short = "Error"
        body = ("%d %s\n" % (code, short)).encode()
        self.close_connection = True
        try:
            self.send_response(code)
            self._common_headers()
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD" and code >= 200 and code not in (204, 304):
                self.wfile.write(body)
        except OSError:
            pass

    def _common_headers(self):
        for k, v in SECURITY_HEADERS.items():
            self.send_header(k, v)

    def _send(self, status, body, ctype, headers=None):
        if isinstance(body, str):
            body = body.encode("utf-8")
        self.send_response(status)
        self._common_headers()
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._responded = True

    def _json(self, status, doc, headers=None):
        self._send(status, json.dumps(doc, ensure_ascii=False, separators=(",", ":")),
                   "application/json; charset=utf-8", headers)

    def _error(self, status, message, headers=None):
        self._json(status, {"success": False, "error": message}, headers)

    def _handle(self, method):
        self._responded = False
        self._body_pending = bool(self.headers.get("Transfer-Encoding")) or self.headers.get("Content-Length",
                                                                                           "0").strip() not in ("", "0")
        if self._body_pending:
            self.reader.expect(self.body_timeout)  # the head is in: the body has this long to arrive
        else:
            self.reader.done()
        try:
            self._dispatch(method)
        except HTTPError as e:
            self._reply_error(e.status, str(e), e.headers)
        except QueuectlError as e:
            status = next((s for cls, s in ERRORS.items() if isinstance(e, cls)), 503)
            self._reply_error(status, str(e), {"Retry-After": "1"} if status == 503 else None)
        except (ConnectionError, socket.timeout):
            self.close_connection = True
        except Exception:
            log.exception("dashboard: internal error on %s %s", method, self.path.split("?")[0])
            self._reply_error(500, "internal error (details are in the dashboard's log)")

    def _reply_error(self, status, message, headers=None):
        if self._body_pending:  # an unread body would be taken for the next request
            self.close_connection = True
        if self._responded:  # headers are out: all we can do is drop the connection
            self.close_connection = True
            return
        try:
            self._error(status, message, headers)
        except OSError:
            self.close_connection = True

    # --- the checks every request passes ---------------------------------------------------

    def _check_host_and_origin(self, route_name):
        host_header = self.headers.get("Host")
        host = split_host(host_header)
        if not host or not (_is_ip(host) or host in self.server.allowed_names):
            raise HTTPError(403, "unexpected Host header: this server answers to its own address only")
        origin = self.headers.get("Origin")
        if origin is not None and origin not in ("http://" + host_header.strip(), "https://" + host_header.strip()):
            raise HTTPError(403, "cross-origin request refused")
        site = self.headers.get("Sec-Fetch-Site")
        if site == "cross-site" and self.headers.get("Sec-Fetch-Mode") != "navigate":
            raise HTTPError(403, "cross-site request refused")

    def _credential(self):
        """How this request authenticates: "token" (bearer or token header: an API client),
        "cookie" (a browser that opened the token URL), or None."""
        token = self.server.token.encode()
        auth = self.headers.get("Authorization", "")
        for given in (auth[7:].strip() if auth[:7].lower() == "bearer " else "", self.headers.get(TOKEN_HEADER, "")):
            if given and hmac.compare_digest(given.encode("utf-8", "replace"), token):
                return "token"
        session = self.server.session.encode()
        for part in self.headers.get("Cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == self.server.cookie_name and hmac.compare_digest(value.encode("utf-8", "replace"), session):
                return "cookie"
        return None

    def _dispatch(self, method):
        url = urllib.parse.urlsplit(self.path)
        path = url.path
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        route, params, allowed = None, {}, []
        for m, pattern, name in self.ROUTES:
            match = pattern.match(path)
            if match:
                allowed.append(m)
                if m == method or (method == "HEAD" and m == "GET"):
                    route, params = name, {k: urllib.parse.unquote(v) for k, v in match.groupdict().items()}
        self._check_host_and_origin(route)
        if route is None and path in self.server.static:
            allowed = ["GET"]
            if method in ("GET", "HEAD"):
                route = "static"
        if route is None:
            if allowed:
                methods = set(allowed) | ({"HEAD"} if "GET" in allowed else set())
                raise HTTPError(405, "method not allowed", {"Allow": ", ".join(sorted(methods))})
            raise HTTPError(404, "not found")
        credential = None
        if route not in self.OPEN:
            if route == "static" and path == "/" and "token" in query:
                given = query["token"][0]
                if hmac.compare_digest(given.encode("utf-8", "replace"), self.server.token.encode()):
                    cookie = "%s=%s; Path=/; HttpOnly; SameSite=Strict" % (self.server.cookie_name,
                                                                           self.server.session)
                    self._send(303, "", "text/plain; charset=utf-8", {"Location": "/", "Set-Cookie": cookie})
                    return
            credential = self._credential()
            if credential is None:
                if route == "static":
                    raise HTTPError(401, "this dashboard needs its token: open the URL that `queuectl dashboard` "
                                         "printed (it ends in ?token=...)")
                raise HTTPError(401, "this dashboard needs its token (Authorization: Bearer TOKEN)",
                                {"WWW-Authenticate": 'Bearer realm="queuectl"'})
        if method == "POST":
            if self.server.read_only:
                raise HTTPError(403, "the dashboard is read-only (--read-only)")
            if credential == "cookie":  # a browser: the page's own CSRF value proves the page sent it
                given = self.headers.get(CSRF_HEADER, "")
                if not given or not hmac.compare_digest(given.encode("utf-8", "replace"), self.server.csrf.encode()):
                    raise HTTPError(403, "missing or wrong %s header" % CSRF_HEADER)
            params["body"] = self._read_body()
        if route == "static":
            return self._static(path)
        if route == "get_events":
            return self.get_events()
        store = queuectl.open_store(self.server.db_path, create=False)
        try:
            getattr(self, route)(store, query, **params)
        finally:
            store.close()

    def _read_body(self):
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise HTTPError(411, "send the body with a Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            length = "0"
        try:
            n = int(length)
        except ValueError:
            self.close_connection = True
            raise HTTPError(400, "bad Content-Length")
        if n < 0:
            self.close_connection = True
            raise HTTPError(400, "bad Content-Length")
        if n > MAX_BODY:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            raise HTTPError(413, "request body larger than %d bytes" % MAX_BODY)
        data = self.rfile.read(n) if n else b""
        self._body_pending = False
        self.reader.done()
        if len(data) != n:
            self.close_connection = True
            raise HTTPError(400, "incomplete request body")
        if not data.strip():
            return {}
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise HTTPError(415, "send JSON (Content-Type: application/json)")
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise HTTPError(400, "the request body is not valid JSON")
        except RecursionError:
            raise HTTPError(400, "the request body is nested too deeply")
        if not isinstance(doc, dict):
            raise HTTPError(400, "the request body must be a JSON object")
        return doc

    def _static(self, path):
        body, ctype = self.server.static[path]
        if path == "/":  # (only an authenticated client gets here)
            body = (body.replace(b"__QUEUECTL_CSRF__", html.escape(self.server.csrf).encode())
                    .replace(b"__QUEUECTL_READ_ONLY__", b"true" if self.server.read_only else b"false"))
        self._send(200, body, ctype)

    # --- GET ---------------------------------------------------------------------------

    def get_status(self, store, query):
        now = time.time()
        counts = store.counts()
        recent = list(reversed(store.list_jobs(limit=RECENT_JOBS)))
        workers = workers_view(store, now)
        live = [w for w in workers if w["state"] != "gone"]
        oldest = store.oldest_due(now)
        head = recent[0] if recent else None
        self._json(200, {
            "success": True,
            "version": queuectl.__version__,
            "now": rfc3339(now),
            "db": queuectl.db_label(self.server.db_path),
            "read_only": self.server.read_only,
            "states": list(queuectl.STATES),
            "job_counts": counts,
            "total": sum(counts.values()),
            "jobs": [job_brief(j) for j in recent],
            "workers": workers,
            "workers_summary": {"total": len(live), "busy": sum(1 for w in live if w["state"] == "busy"),
                                "idle": sum(1 for w in live if w["state"] == "idle")},
            "queue_latency": round(max(0.0, now - oldest), 3) if oldest is not None else 0.0,
            "oldest_due_at": rfc3339(oldest),
            "jobs_version": "%s:%s:%s" % (head.updated_at if head else 0, head.seq if head else 0,
                                          ",".join(str(counts[s]) for s in sorted(counts))),
        })

    def get_jobs(self, store, query):
        state = (query.get("state") or [""])[0] or None
        if state is not None and state not in queuectl.STATES:
            raise HTTPError(400, "unknown state %r (one of: %s)" % (state[:40], ", ".join(queuectl.STATES)))
        q = (query.get("q") or [""])[0].strip() or None
        if q is not None and len(q) > queuectl.MAX_ID_LENGTH:
            raise HTTPError(400, "search text longer than %d characters" % queuectl.MAX_ID_LENGTH)
        limit = query_int(query, "limit", PAGE_LIMIT_DEFAULT, 1, PAGE_LIMIT_MAX)
        cursor = (query.get("cursor") or [""])[0]
        after = decode_cursor(cursor, by_id=q is not None) if cursor else None
        jobs, more = store.jobs_page(state=state, id_prefix=q, limit=limit, after=after)
        self._json(200, {
            "jobs": [job_brief(j) for j in jobs],
            "next": encode_cursor(jobs[-1], by_id=q is not None) if more and jobs else None,
            "state": state, "q": q, "limit": limit, "order": "id" if q else "updated_at desc",
        })

    def get_job(self, store, query, job_id):
        job = store.get(job_id)
        if job is None:
            raise HTTPError(404, "no job with id %s" % queuectl.short_json(job_id))
        attempts = store.attempts(job.id)
        number = query_int(query, "run", None, 1, MAX_QUERY_INT)  # ("attempt": its older name)
        if number is None:
            number = query_int(query, "attempt", None, 1, MAX_QUERY_INT)
        if number is not None:
            attempt = store.attempt(job.id, number)
            if attempt is None:
                raise HTTPError(404, "job %s has no run %d" % (job.id, number))
        else:
            attempt = store.attempt(job.id)
        output = None
        if attempt is not None:
            text = attempt.output or ""
            output = {"attempt": attempt.n, "text": text[-OUTPUT_TAIL:], "truncated": len(text) > OUTPUT_TAIL,
                      "bytes": attempt.output_bytes, "running": attempt.outcome is None}
        self._json(200, {"job": job_view(job, store.config()), "attempts": [a.to_dict() for a in attempts], "output": output})

    def get_workers(self, store, query):
        now = time.time()
        self._json(200, {"now": rfc3339(now), "workers": workers_view(store, now)})

    def get_stats(self, store, query):
        self._json(200, stats_view(store, time.time()))

    def get_metrics(self, store, query):
        self._send(200, queuectl.metrics_text(store, time.time()), "text/plain; version=0.0.4; charset=utf-8")

    def get_healthz(self, store, query):
        store.counts()  # the database answers
        self._json(200, {"status": "ok", "version": queuectl.__version__, "event_streams": self.server.watcher.clients})

    def get_events(self):
        """Server-Sent Events: 'hello' at once, then 'change' whenever the database changes."""
        watcher = self.server.watcher
        if not watcher.subscribe():
            raise HTTPError(503, "too many open event streams", {"Retry-After": "5"})
        try:
            self.close_connection = True
            self.send_response(200)
            self._common_headers()
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Accel-Buffering", "no")
            self.send_header("Connection", "close")
            self.end_headers()
            self._responded = True
            if self.command == "HEAD":  # the headers only: no stream
                return
            version = watcher.version
            self.wfile.write(b"retry: 2000\nevent: hello\ndata: {\"version\": %d}\n\n" % version)
            quiet_since = time.monotonic()
            while not self.server.stopping and not self._client_gone():
                current = watcher.wait(version, 1.0)
                if self.server.stopping:
                    break
                if current != version:
                    version = current
                    self.wfile.write(b"event: change\ndata: {\"version\": %d}\n\n" % version)
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since >= SSE_KEEPALIVE:
                    self.wfile.write(b": keep-alive\n\n")
                    quiet_since = time.monotonic()
        except (OSError, ValueError):
            pass  # the client went away
        finally:
            watcher.unsubscribe()

    def _client_gone(self):
        """An event-stream client sends nothing after its request: readable means it hung up."""
        try:
            ready, _, _ = select.select([self.connection], [], [], 0)
            return bool(ready) and not self.connection.recv(1, socket.MSG_PEEK)
        except (OSError, ValueError):
            return True

    # --- POST --------------------------------------------------------------------------

    def post_enqueue(self, store, query, body):
        now = time.time()
        job = queuectl.validate_job(body, store.config(), now)
        [job_id] = store.enqueue([job], now)
        self._json(201, {"success": True, "id": job_id})

    def post_retry(self, store, query, job_id, body):
        store.retry_dead(job_id, time.time(), reset_attempts=bool(body.get("reset_attempts")))
        self._json(200, {"success": True, "id": job_id, "state": "pending"})

    def post_cancel(self, store, query, job_id, body):
        result = store.cancel(job_id, time.time())
        self._json(200, {"success": True, "id": job_id, "result": result})

    def post_dlq_retry(self, store, query, body):
        retried, skipped = store.retry_all_dead(time.time(), reset_attempts=bool(body.get("reset_attempts")))
        self._json(200, {"success": True, "retried": retried, "skipped": skipped})

    def post_dlq_clear(self, store, query, body):
        self._json(200, {"success": True, "deleted": store.delete_jobs("dead")})
