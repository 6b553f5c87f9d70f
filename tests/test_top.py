"""`queuectl top`: the frame renderer (pure: a snapshot and a size), the keys' logic on a
real store, `--once`, the refusals, and the real program driven in tmux.

The tmux tests start `top` in an 80x24 pane of a tmux server of their own (its own
socket), change the queue from other processes, read the screen with ``capture-pane``,
press keys with ``send-keys`` and check the database; the server and every process are
killed at teardown.  Tests that take a database run on SQLite and on PostgreSQL; the
tmux ones on SQLite are ``e2e`` (so they also run against the .pyz), on PostgreSQL
``postgres`` only (the plain .pyz has no PostgreSQL driver).
"""

import contextlib
import os
import re
import secrets
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

import queuectl
from conftest import db_rows, pg_schema_of, pid_exists, program, program_env, wait_state, wait_until
from queuectl import Attempt, Job, TopSnapshot, TopView, render_top

NOW = 1_700_000_000.0


def pytest_generate_tests(metafunc):
    """``backend``: every test with a database runs on both stores; the tmux ones (they use
    ``pane``) are e2e on SQLite."""
    if "backend" in metafunc.fixturenames:
        live = "pane" in metafunc.fixturenames
        metafunc.parametrize("backend", [pytest.param("sqlite", marks=[pytest.mark.e2e] if live else []),
                                         pytest.param("postgres", marks=[pytest.mark.postgres])])


@pytest.fixture
def db(backend, tmp_path, monkeypatch, request):
    """conftest's ``db``, on the backend of this test run."""
    if backend == "postgres":
        path = request.getfixturevalue("pg_url")
        monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    else:
        path = tmp_path / "q.db"
    monkeypatch.setenv("QUEUECTL_DB", str(path))
    monkeypatch.chdir(tmp_path)
    queuectl.open_store(str(path)).close()  # (top only reads: it does not create a missing database)
    return path


# --- the frame, from a made-up snapshot --------------------------------------------------------------


def make_job(i, **fields):
    doc = dict(id="job-%03d" % i, command="echo %d" % i, state="completed", priority=2, max_retries=3,
               run_at=NOW - 100, created_at=NOW - 100, updated_at=NOW - i, attempts=1, runs=1, seq=1000 - i,
               queue="default", cwd="/srv")
    doc.update(fields)
    return Job(**doc)


LONG = "tar czf /backup/etc-%s.tgz /etc " % ("x" * 30) + "--exclude=/etc/ssl " * 12
ODD = "echo \x1b[31mred\x1b[0m \u65e5\u672c\u8a9e\u306e\u30b3\u30de\u30f3\u30c9 and\nnewline\tand tab"


def busy_snapshot(now=NOW):
    jobs = [make_job(0, id="sleeper", state="processing", command="sleep 600", queue="reports", updated_at=now - 1),
            make_job(1, id="long-" + "i" * 40, command=LONG, state="pending", attempts=0, runs=0),
            make_job(2, id="odd", command=ODD, state="dead", attempts=4, exit_code=3, last_error="exit code 3"),
            make_job(3, id="later", state="pending", run_at=now + 3600, attempts=0)]
    jobs += [make_job(i) for i in range(4, 40)]
    workers = [{"id": "w1", "host": "build-host-1", "pid": 4242, "heartbeat_at": now - 2, "state": "busy",
                "job_id": "sleeper", "job_started_at": now - 65, "command": "sleep 600"},
               {"id": "w2", "host": "build-host-1", "pid": 4243, "heartbeat_at": now - 1, "state": "idle",
                "job_id": None, "job_started_at": None, "command": None},
               {"id": "w3", "host": "old-host", "pid": 99, "heartbeat_at": now - 900, "state": "gone",
                "job_id": None, "job_started_at": None, "command": None}]
    minutes = [(0, 0)] * 50 + [(10, 1), (20, 0), (40, 2), (80, 5), (60, 0), (30, 1), (50, 0), (70, 0), (90, 3), (45, 1)]
    return TopSnapshot(now=now, db="/var/lib/queuectl/queuectl.db",
                       counts={"pending": 12, "processing": 1, "completed": 1234567, "failed": 2, "dead": 3,
                               "waiting": 0, "cancelled": 4},
                       oldest_due=now - 5, workers=workers, minutes=minutes, filter="all", jobs=jobs, more=True,
                       queues={"default": {"paused": False, "max_running": None},
                               "reports": {"paused": True, "max_running": 2}})


def text_of(lines):
    return ["".join(t for t, _ in line) for line in lines]


def check_fits(lines, width, height):
    assert len(lines) == height
    for line in lines:
        assert queuectl._cells("".join(t for t, _ in line)) <= width, line
        for text, _ in line:
            assert not any(ord(ch) < 32 or 0x7f <= ord(ch) < 0xa0 for ch in text), repr(text)


@pytest.mark.parametrize("width", [80, 120, 200])
def test_the_frame_fits_every_width_with_header_workers_and_jobs(width):
    lines, layout = render_top(busy_snapshot(), TopView(selected=1), width, 24)
    check_fits(lines, width, 24)
    text = text_of(lines)
    screen = "\n".join(text)
    assert text[0].startswith(" queuectl top  /var/lib/queuectl/queuectl.db") and "? help" in text[0]
    for state, n in (("pending", "12"), ("processing", "1"), ("completed", "1.23M"), ("dead", "3"),
                     ("cancelled", "4")):
        assert re.search(r"\b%s %s\b" % (state, re.escape(n)), screen), state
    assert "latency 5.0s" in screen and "workers 2 (1 busy)" in screen and "paused reports" in screen
    spark = next(line for line in text if line.startswith(" processed "))
    assert "\u2581" in spark and "\u2588" in spark and "failed " in spark
    # The workers pane: host, pid, current job, its runtime, last heartbeat.
    busy = next(line for line in text if " 4242 " in line)
    assert busy.split()[:6] == ["build-host-1", "4242", "busy", "sleeper", "1m05s", "2.0s"]
    assert any(" 99 " in line and "gone" in line for line in text)
    # The jobs list: newest first, the selected row marked, long commands cut with an ellipsis.
    rows = [line for line in text if line[:1] in " >" and line[1:].startswith(("sleeper", "long-", "odd", "later",
                                                                                  "job-"))]
    assert rows[0].startswith(" sleeper") and rows[1].startswith(">long-")
    assert len(rows) == layout["rows"] and layout["rows"] >= 8
    assert rows[1].endswith("\u2026") and len(rows[1]) == width
    assert "ID" in screen and "COMMAND" in screen
    assert ("QUEUE" in screen) == (width >= 110)
    odd = next(line for line in rows if line[1:].startswith("odd"))
    assert "red \u65e5\u672c\u8a9e" in odd and "\x1b" not in odd  # control sequences gone, wide characters kept
    assert "of 1.23M" in screen  # where the window is in the list
    assert text[-1].lstrip().startswith("Enter open")


def test_wider_frames_show_more_of_each_command():
    widths = {}
    for width in (80, 120, 200):
        rows = [line for line in text_of(render_top(busy_snapshot(), TopView(), width, 24)[0]) if "tar czf" in line]
        widths[width] = len(rows[0].split("tar czf", 1)[1])
    assert widths[80] < widths[120] < widths[200]


def test_a_terminal_smaller_than_80x24_gets_a_message():
    for width, height in ((79, 24), (80, 23), (40, 10), (20, 3)):
        lines, layout = render_top(busy_snapshot(), TopView(), width, height)
        check_fits(lines, width, height)
        screen = " ".join(" ".join(text_of(lines)).split())
        assert layout["rows"] == 0
        if height >= 3 and width >= 40:
            assert "needs a terminal of at least 80x24" in screen and "this one is %dx%d" % (width, height) in screen


def test_a_tall_terminal_shows_more_rows_and_workers():
    small = render_top(busy_snapshot(), TopView(), 80, 24)[1]["rows"]
    tall = render_top(busy_snapshot(), TopView(), 80, 50)[1]["rows"]
    assert tall > small + 20


def test_once_frames_have_no_selection_or_status_line():
    lines, _ = render_top(busy_snapshot(), TopView(selected=-1, once=True), 80, 24)
    text = text_of(lines)
    assert not any(line.startswith(">") for line in text)
    assert "? help" not in text[0] and "Enter open" not in "\n".join(text)


def test_an_ascii_terminal_gets_ascii():
    snap = busy_snapshot()
    lines, _ = render_top(snap, TopView(), 80, 24, uni=False)
    check_fits(lines, 80, 24)
    screen = "\n".join(text_of(lines))
    assert screen.isascii()
    assert "~" in screen  # the ellipsis
    assert re.search(r"processed [ .:=+*#@-]+ ", screen)


def test_the_help_lists_the_keys():
    lines, _ = render_top(busy_snapshot(), TopView(help=True), 80, 24)
    check_fits(lines, 80, 24)
    screen = "\n".join(text_of(lines))
    for key in ("Enter", "1-9", "r  R", "Esc", "q  Ctrl-C", "scheduled"):
        assert key in screen
    assert all(not line.endswith("\u2026") for line in text_of(lines)[1:-1])  # nothing cut at 80 columns


def job_view_snapshot(output, outcome=None, state="processing"):
    snap = busy_snapshot()
    job = make_job(0, id="build-7", command="make -j8 all", state=state, attempts=2, runs=2,
                   started_at=NOW - 30, worker_id="w1", env={"TOKEN": "s3cret"}, last_error="exit code 2")
    attempts = [Attempt(job_id="build-7", n=1, started_at=NOW - 300, ended_at=NOW - 290, exit_code=2,
                        outcome="failed", error="exit code 2", worker_id="w1", output="first run\n"),
                Attempt(job_id="build-7", n=2, started_at=NOW - 30, worker_id="w1", outcome=outcome, output=output,
                        output_bytes=len(output))]
    snap.jobs, snap.job_id, snap.job, snap.attempts, snap.attempt = None, "build-7", job, attempts, attempts[1]
    return snap


def test_the_job_view_shows_fields_attempts_and_the_end_of_the_output():
    output = "".join("line %d\n" % i for i in range(1, 101)) + "\x1b[32mgreen\x1b[0m\n" + "10%\r50%\r100% done\n"
    snap = job_view_snapshot(output)
    lines, layout = render_top(snap, TopView(mode="job"), 80, 24)
    check_fits(lines, 80, 24)
    text = text_of(lines)
    screen = "\n".join(text)
    assert " JOB build-7  processing" in screen and "command make -j8 all" in screen
    assert "attempts 2 of 4" in screen and "running for 30.0s" in screen
    assert "env TOKEN" in screen and "s3cret" not in screen  # names only: values may be secrets
    chosen = next(line for line in text if line.startswith(">2 "))
    assert "running" in chosen
    assert any(line.startswith(" 1 ") and "failed" in line for line in text)
    assert "following live" in screen
    assert text[-2] == " 100% done" and text[-3] == " green"  # a redrawn progress line as a terminal shows it
    assert layout["max_scroll"] == 102 - layout["output_rows"]
    # Scrolled back: earlier lines, and the title says how to follow again.
    lines, _ = render_top(snap, TopView(mode="job", scroll=10), 80, 24)
    text = text_of(lines)
    assert "scrolled back 10 lines" in "\n".join(text)
    assert text[-2] == " line %d" % (100 - 10 + 2)


def test_the_job_view_of_an_earlier_attempt_and_of_a_deleted_job():
    snap = job_view_snapshot("", outcome=None)
    snap.attempt = snap.attempts[0]
    text = text_of(render_top(snap, TopView(mode="job", attempt=1), 80, 24)[0])
    assert any(line.startswith(">1 ") for line in text) and " first run" in text
    assert "end of output" in "\n".join(text)
    snap.job, snap.attempts, snap.attempt = None, None, None
    text = text_of(render_top(snap, TopView(mode="job"), 80, 24)[0])
    assert "job build-7 no longer exists" in "\n".join(text)


# --- the keys, on a real store ---------------------------------------------------------------------------


def spec(**fields):
    doc = {"command": "true"}
    doc.update(fields)
    return queuectl.validate_job(doc, queuectl.DEFAULTS, time.time(), cwd="/")


def app_on(store, db, **kw):
    app = queuectl.TopApp(store, str(db), **kw)
    app.refresh(force=True)
    app.frame(80, 24)
    return app


def screen_of(app, width=80, height=24):
    return "\n".join(text_of(app.frame(width, height)))


def list_ids(app):
    return [j.id for j in app.snap.jobs[:app.rows]]


def test_filters_scroll_and_selection(store, db):
    now = time.time()
    store.enqueue([spec(id="p%02d" % i) for i in range(30)], now)
    store.enqueue([spec(id="later", delay=600)], now)
    app = app_on(store, db)
    rows = app.layout["rows"]
    assert list_ids(app)[0] == "later" and len(list_ids(app)) == rows
    first = list_ids(app)
    app.key("pgdown") and app.refresh(force=True)
    app.frame(80, 24)
    second = list_ids(app)
    assert second[0] == "p%02d" % (29 - rows + 1) and not set(first) & set(second)
    assert "%d-%d of 31" % (rows + 1, 2 * rows) in screen_of(app)
    app.key("pgup") and app.refresh(force=True)
    assert list_ids(app) == first
    for _ in range(rows - 1):
        assert app.key("down") is False  # moves within the window
    assert app.view.selected == rows - 1
    assert app.key("down") is True  # scrolls by one row
    app.refresh(force=True)
    assert list_ids(app) == first[1:] + [second[0]] and app.view.selected == rows - 1
    assert app.key("home") is True
    app.refresh(force=True)
    assert list_ids(app) == first and app.view.selected == 0
    app.key("6")  # scheduled: the delayed job only
    app.refresh(force=True)
    assert list_ids(app) == ["later"] and " 6 scheduled " in screen_of(app)
    assert "RUNS" in screen_of(app) and "in 9m" in screen_of(app)
    app.key("5")
    app.refresh(force=True)
    assert list_ids(app) == [] and "no dead jobs" in screen_of(app)
    app.key("tab")
    app.refresh(force=True)
    assert app.filter == "scheduled"


def test_one_queue_is_listed_within_a_bound(store, db, monkeypatch):
    now = time.time()
    store.enqueue([spec(id="r%d" % i, queue="reports") for i in range(3)], now)
    store.enqueue([spec(id="d%02d" % i) for i in range(30)], now + 1)  # newer, in the default queue
    app = app_on(store, db, queue="reports")
    assert list_ids(app) == ["r2", "r1", "r0"] and not app.snap.truncated
    assert "queue reports active" in screen_of(app)
    monkeypatch.setattr(queuectl, "TOP_QUEUE_SCAN", 20)  # looks at the 20 newest jobs only: none of reports
    app.refresh(force=True)
    assert list_ids(app) == [] and app.snap.truncated
    assert "no jobs of queue reports among the 20 newest" in screen_of(app)
    app.key("p")
    assert "Pause queue reports" in app.view.status  # --queue: p acts on that queue, with no job selected


def test_the_selection_follows_its_job_when_the_list_changes(store, db):
    now = time.time()
    store.enqueue([spec(id="a"), spec(id="b"), spec(id="c")], now)
    app = app_on(store, db)
    app.key("down")
    assert list_ids(app) == ["c", "b", "a"] and app.view.selected == 1
    store.enqueue([spec(id="d")], now + 1)
    app.refresh(force=True)
    assert list_ids(app)[0] == "d" and app.view.selected == 2  # still on b


def test_actions_ask_first_and_call_the_store(store, db):
    now = time.time()
    store.enqueue([spec(id="dead1", max_retries=0), spec(id="keep")], now)
    store.register_worker({"id": "w", "host": queuectl.HOST, "pid": os.getpid(), "pid_started": None,
                           "supervisor_pid": None, "now": now, "wake": None})
    job = store.claim("w", queuectl.HOST, now + 1, 60.0)
    assert job.id == "dead1"
    store.finish(job.id, job.runs, "w", "dead", now, "failed", exit_code=1, error="exit code 1")
    app = app_on(store, db, filt="dead")
    assert list_ids(app) == ["dead1"]
    app.key("r")
    assert "Retry dead job dead1 for one more run?" in app.view.status and app.view.status_style == "ask"
    assert app.key("n") is False and store.get("dead1").state == "dead"  # any other key: nothing done
    assert app.view.status == "nothing done"
    app.key("r")
    assert app.key("y") is True
    assert store.get("dead1").state == "pending"
    assert app.view.status == "job dead1 moved back to pending for one more run"
    app.key("1")
    app.refresh(force=True)
    app.key("c")
    assert app.key("y") is True and store.get("dead1").state == "cancelled"  # the selected (newest) job
    app.refresh(force=True)
    app.key("r")  # not dead: refused without asking, nothing changes
    assert app.view.status_style == "error" and "only a dead job can be retried" in app.view.status
    app.key("e")
    assert app.key("y") is True
    new_id = re.search(r"enqueued again as job (\S+)", app.view.status).group(1)
    again = store.get(new_id)
    assert (again.state, again.command, again.queue) == ("pending", "true", "default")
    app.refresh(force=True)
    app.key("p")
    assert "Pause queue default" in app.view.status
    app.key("y")
    assert store.queue_settings()["default"]["paused"] is True
    app.refresh(force=True)
    assert "paused default" in screen_of(app)
    app.key("p")
    assert "Resume queue default?" in app.view.status
    app.key("y")
    assert store.queue_settings()["default"]["paused"] is False


def test_a_store_error_of_an_action_shows_on_the_status_line(store, db):
    now = time.time()
    store.enqueue([spec(id="x", max_retries=0)], now)
    app = app_on(store, db)
    store.cancel("x", now)  # changed behind the screen's back: the screen still shows it pending
    app.key("c")
    app.key("y")
    assert app.view.status_style == "error" and "job x is already cancelled" in app.view.status


def test_the_job_view_reads_the_job_and_switches_attempts(store, db):
    now = time.time()
    store.enqueue([spec(id="j", max_retries=2)], now)
    store.register_worker({"id": "w", "host": queuectl.HOST, "pid": os.getpid(), "pid_started": None,
                           "supervisor_pid": None, "now": now, "wake": None})
    for n, (state, out) in enumerate((("failed", "one\n"), ("completed", "two\n")), 1):
        job = store.claim("w", queuectl.HOST, now + n * 10, 60.0)
        assert job is not None
        store.finish("j", job.runs, "w", state, now + n * 10 + 1, "failed" if state == "failed" else "completed",
                     exit_code=0 if state == "completed" else 1, output=out, output_bytes=len(out),
                     retry_at=now + n * 10 + 5 if state == "failed" else None)
    app = app_on(store, db)
    assert app.key("enter") is True
    app.refresh(force=True)
    screen = screen_of(app)
    assert " JOB j  completed" in screen and "OUTPUT  run 2" in screen and "\n two" in screen
    assert app.key("left") is True
    app.refresh(force=True)
    screen = screen_of(app)
    assert "OUTPUT  run 1" in screen and "\n one" in screen
    app.key("right")
    app.refresh(force=True)
    assert app.view.attempt is None and "OUTPUT  run 2" in screen_of(app)
    assert app.key("esc") is True
    app.refresh(force=True)
    assert app.view.mode == "list" and "\n>j " in screen_of(app)


def test_a_refresh_reads_only_when_the_database_changed(store, db, backend):
    store.enqueue([spec(id="a")], time.time())
    app = app_on(store, db)
    if backend == "postgres":
        app.refresh()  # (reading the counts folds their logged changes: a change of its own, once)
    assert app.refresh() is False  # nothing changed
    other = queuectl.open_store(str(db))
    try:
        other.enqueue([spec(id="b")], time.time())
    finally:
        other.close()
    wait_until(lambda: app.refresh(), 5)
    assert list_ids(app) == ["b", "a"]


# --- the command ---------------------------------------------------------------------------------------------


def test_once_prints_one_plain_frame(cli, backend):
    cli("enqueue", "--id", "hello", "--", "echo hello")
    cli("enqueue", "--id", "later", "--delay", "1h", "--", "echo later")
    r = cli("top", "--once")
    assert r.rc == 0 and r.err == ""
    lines = r.out.splitlines()
    assert lines[0].startswith(" queuectl top ") and len(lines) <= 24
    assert all(len(line) <= 80 for line in lines)
    assert "pending 2" in r.out and "hello" in r.out and "later" in r.out and "\x1b" not in r.out
    r = cli("top", "--once", "--state", "scheduled")
    assert "later" in r.out and "hello" not in r.out
    r = cli("top", "--once", "--queue", "nosuch")
    assert r.rc == 0 and "no jobs in queue nosuch" in r.out


def test_once_colours_only_when_asked(cli, monkeypatch):
    cli("enqueue", "--id", "hello", "--", "echo hello")
    assert "\x1b[" not in cli("top", "--once").out  # not a terminal
    out = cli("top", "--once", "--color", "always").out
    assert "\x1b[33mpending\x1b[0m" in out
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\x1b[33mpending" in cli("top", "--once", "--color", "always").out  # the option wins
    assert queuectl.use_color(sys.stdout, "auto") is False
    assert queuectl.use_color(sys.stdout, "never") is False


def test_bad_options_are_one_line_errors(cli):
    cli("enqueue", "--id", "seed", "--", "true")  # (a read command on a missing database says so first)
    for args, message in ((["--interval", "0"], "must be from 0.1 to 3600 seconds"),
                          (["--interval", "nan"], "must be from 0.1 to 3600 seconds"),
                          (["--interval", "x"], "must be a number of seconds"),
                          (["--state", "nope"], "invalid choice"),
                          (["--color", "sometimes"], "invalid choice"),
                          (["--queue", "bad name", "--once"], "queue name")):
        r = cli("top", *args)
        assert r.rc == 2 and "Traceback" not in r.err, args
        assert r.err.strip().splitlines()[-1].startswith("queuectl: error:") and message in r.err, r.err


@pytest.mark.e2e
def test_stdin_not_a_terminal_points_to_once(tmp_path):
    queuectl.SqliteStore(str(tmp_path / "q.db")).close()
    env = program_env(tmp_path / "q.db")
    proc = subprocess.run(program() + ["top"], stdin=subprocess.DEVNULL, capture_output=True, env=env,
                          cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and proc.stdout == b""
    assert proc.stderr.decode() == ("queuectl: error: top needs a terminal, and stdin is not one: for one frame "
                                    "as plain text use queuectl top --once\n")


def test_other_commands_do_not_import_curses(tmp_path):
    """`top` imports curses (and unicodedata) itself: the other commands' start-up is unchanged."""
    queuectl.SqliteStore(str(tmp_path / "q.db")).close()
    code = ("import sys; sys.path.insert(0, sys.argv[2]); import queuectl; queuectl.main(['--db', sys.argv[1], "
            "'status']); print('curses' in sys.modules, 'unicodedata' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "q.db"), os.path.dirname(queuectl.__file__)],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "False False", out.stderr


# --- the real program in tmux ---------------------------------------------------------------------------


class Pane:
    """`top` in a pane of a tmux server of its own; ``close()`` kills the program by PID and the server."""

    def __init__(self, tmp_path, env):
        if shutil.which("tmux") is None:
            raise RuntimeError("the top tests need tmux: apt-get install tmux (.ci/run installs it)")
        self.socket = "queuectl-top-%d-%s" % (os.getpid(), secrets.token_hex(4))
        self.env = dict(env, LC_ALL="C.UTF-8", LANG="C.UTF-8")
        self.env.pop("TMUX", None)
        self.conf = tmp_path / "tmux.conf"
        # No status line (the pane is the whole window), a terminal type every ncurses knows, and
        # a pane that stays after its program exits, to read how it exited.
        self.conf.write_text("set -g status off\nset -g default-terminal screen\nset -g remain-on-exit on\n"
                             "set -g history-limit 1000\n")
        self.status = tmp_path / "top.status"
        self.pid = self.shell = self.socket_path = None

    def tmux(self, *args, check=True):
        proc = subprocess.run(["tmux", "-L", self.socket, "-f", str(self.conf)] + list(args), capture_output=True,
                              text=True, env=self.env, timeout=30)
        if check and proc.returncode != 0:
            raise AssertionError("tmux %s: %s" % (" ".join(args), proc.stderr))
        return proc.stdout

    def start(self, args, width=80, height=24, locale="C.UTF-8"):
        # A shell runs the program and writes down its exit status (tmux's own can come late); its
        # trap keeps a Ctrl-C from ending it too (the program gets the default handling).
        argv = ["sh", "-c", 'trap : INT; "$@"; echo $? > %s' % shlex.quote(str(self.status)), "sh", "env",
                "LC_ALL=" + locale] + program() + list(args)
        self.tmux("new-session", "-d", "-s", "top", "-x", str(width), "-y", str(height), shlex.join(argv))
        self.shell, self.socket_path = self.tmux("display-message", "-p", "-t", "top",
                                                 "#{pane_pid} #{socket_path}").strip().split(" ", 1)
        self.shell = int(self.shell)
        self.pid = wait_until(lambda: child_of(self.shell), 10, message="the program did not start")
        return self

    def screen(self):
        return self.tmux("capture-pane", "-p", "-t", "top")

    def lines(self):
        text = self.screen()
        return (text[:-1] if text.endswith("\n") else text).split("\n")

    def wait_for(self, what, timeout=20):
        """Wait until the screen shows ``what`` (a string, or a predicate of the screen's text)."""
        test = what if callable(what) else (lambda text: what in text)
        try:
            return wait_until(lambda: test(self.screen()), timeout, interval=0.05)
        except AssertionError:
            raise AssertionError("the screen never showed %r; it shows:\n%s" % (
                what if not callable(what) else what.__doc__ or what, self.screen())) from None

    def keys(self, *keys):
        self.tmux("send-keys", "-t", "top", *keys)

    def info(self, fmt):
        return self.tmux("display-message", "-p", "-t", "top", fmt).strip()

    def exited(self):
        """(exit status, alternate screen still on) once the program exited, else None."""
        with contextlib.suppress(FileNotFoundError):
            status = self.status.read_text()
            if status.endswith("\n"):
                return int(status), self.info("#{alternate_on}") == "1"
        return None

    def resize(self, width, height):
        self.tmux("resize-window", "-t", "top", "-x", str(width), "-y", str(height))

    def close(self):
        for pid in (self.pid, self.shell):
            if pid and pid_exists(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        self.tmux("kill-server", check=False)
        if self.socket_path:
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)  # (tmux leaves it behind)


def child_of(pid):
    """The pid of a child process of ``pid``, or None."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open("/proc/%s/stat" % entry, "rb") as f:
                    stat = f.read()
                if int(stat[stat.rindex(b")") + 2:].split()[1]) == pid:
                    return int(entry)
    return None


@pytest.fixture
def pane(db, tmp_path):
    p = Pane(tmp_path, program_env(db))
    yield p
    p.close()


def jobs_rows(pane):
    """The rows of the jobs list on the screen: (id, state)."""
    lines = pane.lines()
    start = next(i for i, line in enumerate(lines) if line.startswith(" ID ")) + 1
    return [tuple(line[1:].split()[:2]) for line in lines[start:-1] if line[1:].strip() and line[:1] in " >"]


def test_live_top_follows_the_queue_and_acts_on_jobs(pane, run, workers, db):
    pane.start(["top", "--interval", "0.2"])
    pane.wait_for("no workers")
    screen = pane.screen()
    assert screen.startswith(" queuectl top  ") and "pending 0" in screen and "no jobs" in screen
    assert len(pane.lines()) == 24 and all(len(line) <= 80 for line in pane.lines())

    # Jobs enqueued by another process show up: counts and the list.
    for job_id in ("a1", "a2", "a3"):
        assert run("enqueue", "--id", job_id, "--", "true").rc == 0
    pane.wait_for("pending 3")
    assert [r[0] for r in jobs_rows(pane)] == ["a3", "a2", "a1"]
    assert run("enqueue", "--id", "doomed", "-r", "0", "--", "echo doomed; exit 3").rc == 0
    assert run("enqueue", "--id", "sleeper", "--", "echo started; sleep 60").rc == 0

    # Workers run them: the workers pane shows the busy one and its job, the counts move.
    workers.start(count=2)

    def worker_on_sleeper(text):
        """a busy worker on sleeper, and the rest done"""
        return any(" busy " in line and " sleeper " in line for line in text.split("\n")) and \
            "completed 3" in text and "dead 1" in text
    pane.wait_for(worker_on_sleeper)
    assert "workers 2 (1 busy)" in pane.screen()
    assert ("sleeper", "processing") in jobs_rows(pane) and ("doomed", "dead") in jobs_rows(pane)

    # Filter: dead jobs only; open the job; retry it (asks first).
    pane.keys("5")
    pane.wait_for(lambda text: jobs_rows(pane) == [("doomed", "dead")])
    pane.keys("Enter")
    pane.wait_for(" JOB doomed  dead")
    pane.wait_for("exit code 3")
    assert "\n doomed" in pane.screen()  # its output
    pane.keys("r")
    pane.wait_for("Retry dead job doomed for one more run?")
    assert db_rows(db, "SELECT runs FROM jobs WHERE id = 'doomed'") == [(1,)]
    pane.keys("y")
    wait_until(lambda: db_rows(db, "SELECT runs, state FROM jobs WHERE id = 'doomed'") == [(2, "dead")], 20)
    pane.wait_for("RUNS  2")

    # Back to the list; the running job: cancel it, and its worker kills it.
    pane.keys("Escape")
    pane.wait_for(" 5 dead ")
    pane.keys("3")
    pane.wait_for(lambda text: jobs_rows(pane) == [("sleeper", "processing")])
    pane.keys("c")
    pane.wait_for("Cancel job sleeper (kill its process tree)?")
    pane.keys("y")
    wait_state(db, "sleeper", "cancelled")
    pane.wait_for("cancelled 1")
    pane.wait_for("no processing jobs")

    # A resize redraws at the new size; too small gets a message; back again.
    pane.resize(120, 30)
    pane.wait_for(lambda text: " QUEUE " in text and len(pane.lines()) == 30)
    assert max(len(line) for line in pane.lines()) > 80
    pane.resize(70, 20)
    pane.wait_for("needs a terminal of at least 80x24")
    pane.wait_for("this one is 70x20")
    pane.resize(80, 24)
    pane.wait_for(" JOBS ")

    # q leaves: exit 0, the terminal back to the normal screen with its cursor.
    pane.keys("q")
    wait_until(pane.exited, 10, interval=0.05)
    assert pane.exited() == (0, False)


def test_live_top_leaves_cleanly_on_sigterm(pane, run):
    assert run("enqueue", "--id", "one", "--", "true").rc == 0
    pane.start(["top"])
    pane.wait_for("pending 1")
    assert pane.info("#{alternate_on}") == "1"  # full screen while it runs
    os.kill(pane.pid, signal.SIGTERM)
    wait_until(pane.exited, 10, interval=0.05)
    assert pane.exited() == (0, False)


def test_live_top_leaves_cleanly_on_ctrl_c_from_the_help(pane):
    pane.start(["top"])
    pane.wait_for("no jobs")
    pane.keys("?")
    pane.wait_for("Actions: each asks for y first")
    pane.keys("C-c")
    wait_until(pane.exited, 10, interval=0.05)
    assert pane.exited() == (0, False)


def test_live_top_on_a_terminal_that_is_not_utf8(pane, run):
    assert run("enqueue", "--id", "wide", "--", "echo " + "long words " * 10).rc == 0
    pane.start(["top"], locale="C")
    pane.wait_for("wide ")
    screen = pane.screen()
    assert screen.isascii() and "echo long words long words" in screen
    row = next(line for line in pane.lines() if line.startswith(">wide "))
    assert row.endswith("~") and len(row) == 80  # cut, with an ASCII ellipsis
    pane.keys("q")
    wait_until(pane.exited, 10, interval=0.05)
    assert pane.exited() == (0, False)


def test_live_top_leaves_on_an_error_with_the_terminal_restored(pane, run, db, backend):
    assert run("enqueue", "--id", "one", "--", "true").rc == 0
    pane.start(["top", "--interval", "0.2"])
    pane.wait_for("pending 1")
    if backend == "postgres":  # the schema dropped under it: the next read fails for good
        db_rows(db, 'DROP SCHEMA "%s" CASCADE' % pg_schema_of(str(db)))
        message = "is not a queuectl schema"
    else:  # the file deleted: a store checks that it still reads the file the name leads to
        os.unlink(str(db))
        message = "was deleted while in use"
    wait_until(pane.exited, 20, interval=0.05)
    assert pane.exited() == (74, False)
    screen = pane.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "top")  # (with what scrolled off, lines joined)
    assert "queuectl: error: " in screen and message in screen and "Traceback" not in screen


@pytest.mark.e2e
def test_top_leaves_when_its_terminal_goes_away(tmp_path):
    """A pseudo-terminal closed under `top` with no SIGHUP (not its controlling terminal): it
    notices that reading keys fails at once, and exits, instead of spinning on the CPU."""
    import fcntl
    import struct
    import termios

    queuectl.SqliteStore(str(tmp_path / "q.db")).close()
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = dict(program_env(tmp_path / "q.db"), TERM="xterm", LC_ALL="C.UTF-8")
    proc = subprocess.Popen(program() + ["top"], stdin=slave, stdout=slave, stderr=slave, env=env, cwd=tmp_path,
                            start_new_session=True)
    os.close(slave)
    try:
        seen = []

        def frame_drawn():
            if select.select([master], [], [], 0.05)[0]:
                seen.append(os.read(master, 65536))
            return b"no workers" in b"".join(seen)

        wait_until(frame_drawn, 20, interval=0)
        os.close(master)
        master = None
        assert proc.wait(timeout=20) == 0
    finally:
        if master is not None:
            os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
