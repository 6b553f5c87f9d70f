"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright.

The dashboard is the real program (`queuectl dashboard --port 0`, from
QUEUECTL_CMD when set, so `./build.sh test` also runs these against
dist/queuectl.pyz); jobs come from the real CLI and real workers.  Waits are
Playwright's own (expect, wait_for_*) or wait_until: nothing sleeps.
"""

import contextlib
import json
import os
import signal
import subprocess

import pytest

import queuectl
from conftest import db_rows, program, wait_until
from conftest import program_env as program_env

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

# Missing Playwright or Chromium fails these tests, never skips them (.ci/run installs both).
from playwright import sync_api  # noqa: E402

expect = sync_api.expect

TIMEOUT = 15000  # ms, for Playwright's waits


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail("Debian's Chromium is not installed at %s (apt-get install chromium)" % CHROMIUM)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Dashboard:
    """`queuectl dashboard` processes; killed by PID at teardown."""

    def __init__(self, db, tmp_path):
        self.db, self.tmp_path, self.procs = db, tmp_path, []

    def start(self, *args):
        proc = subprocess.Popen(program() + ["dashboard", "--port", "0"] + list(args), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=program_env(self.db),
                                cwd=self.tmp_path, start_new_session=True)
        self.procs.append(proc)
        line = proc.stdout.readline().decode()
        assert line.startswith("dashboard: http://"), line
        return line.split()[-1]

    def kill_all(self):
        for p in self.procs:
            with contextlib.suppress(OSError):
                os.kill(p.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                p.wait(10)


@pytest.fixture
def dashboard(db, tmp_path, workers):
    d = Dashboard(db, tmp_path)
    yield d
    d.kill_all()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT)
    pg.dialogs = []
    pg.errors = []

    def on_dialog(dialog):
        pg.dialogs.append(dialog.message)
        dialog.dismiss()

    pg.on("dialog", on_dialog)
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
    yield pg
    context.close()


def open_dashboard(page, url):
    page.goto(url)
    expect(page.locator("#live")).to_have_attribute("data-mode", "live")
    page.evaluate("window.__loaded_once = true")  # gone if the page reloads


def assert_not_reloaded(page):
    assert page.evaluate("window.__loaded_once === true"), "the page was reloaded"


def count_of(page, state):
    return page.locator('[data-count="%s"]' % state)


def row(page, job_id):
    return page.locator('#jobs tbody tr[data-id="%s"]' % job_id)


def states_of(db):
    return dict(db_rows(db, "SELECT id, state FROM jobs"))


# --- the four browser tests ------------------------------------------------------------------


def test_page_loads_with_correct_counts(db, run, dashboard, page):
    for i in range(3):
        assert run("enqueue", "--id", "p%d" % i, "--delay", "1h", "--", "true").rc == 0
        assert run("enqueue", "--id", "c%d" % i, "--", "true").rc == 0
    assert run("enqueue", "--id", "d0", "-r", "0", "--", "false").rc == 0
    assert run("enqueue", "--id", "f0", "-r", "1", "--", "false").rc == 0  # failed, its retry waits
    assert run("worker", "start", "--burst").rc == 0
    assert sorted(states_of(db).values()) == ["completed"] * 3 + ["dead", "failed"] + ["pending"] * 3
    open_dashboard(page, dashboard.start())
    expect(count_of(page, "pending")).to_have_text("3")
    expect(count_of(page, "completed")).to_have_text("3")
    expect(count_of(page, "failed")).to_have_text("1")
    expect(count_of(page, "dead")).to_have_text("1")
    expect(count_of(page, "processing")).to_have_text("0")
    expect(page.locator("#jobs tbody tr[data-id]")).to_have_count(8)
    expect(page.locator('#state-tabs [data-filter=""] .count')).to_have_text("8")
    assert "8" in page.locator("#page-info").inner_text()
    assert page.errors == [] and page.dialogs == []


def test_job_enqueued_from_the_cli_appears_without_reload(run, dashboard, page):
    open_dashboard(page, dashboard.start())
    expect(count_of(page, "pending")).to_have_text("0")
    assert run("enqueue", "--id", "fresh-from-cli", "--", "echo hello").rc == 0
    expect(row(page, "fresh-from-cli")).to_be_visible(timeout=3000)  # a change shows within 1 s (+ slack)
    expect(count_of(page, "pending")).to_have_text("1")
    expect(row(page, "fresh-from-cli").locator(".cmd")).to_have_text("echo hello")
    assert_not_reloaded(page)
    assert page.errors == []


def test_retry_on_a_dead_job_changes_its_state(db, run, dashboard, page):
    assert run("enqueue", "--id", "broken", "-r", "0", "--", "echo failing; exit 3").rc == 0
    assert run("worker", "start", "--burst").rc == 0
    assert db_rows(db, "SELECT state FROM jobs WHERE id = 'broken'") == [("dead",)]
    open_dashboard(page, dashboard.start())
    page.click('#state-tabs [data-filter="dead"]')
    dead_row = row(page, "broken")
    expect(dead_row.locator(".badge")).to_have_text("dead")
    dead_row.locator('button[data-action="retry"]').click()
    wait_until(lambda: db_rows(db, "SELECT state FROM jobs WHERE id = 'broken'") == [("pending",)], 10,
               message="Retry did not move the job out of the dead letter queue")
    expect(dead_row).to_have_count(0)  # gone from the dead list, live
    expect(count_of(page, "dead")).to_have_text("0")
    expect(count_of(page, "pending")).to_have_text("1")
    page.click('#state-tabs [data-filter=""]')
    expect(row(page, "broken").locator(".badge")).to_have_text("pending")
    assert_not_reloaded(page)


def test_html_in_a_job_is_shown_as_text_and_never_runs(db, run, dashboard, page):
    evil = "<img src=x onerror=alert(1)>"
    assert run("enqueue", "--id", "xss", "-r", "0", "--", evil).rc == 0
    assert run("enqueue", "--id", "xss-output", "-r", "0", "--",
               "printf '%s\\n' '<script>alert(2)</script><b>bold</b><img src=y onerror=alert(3)>'").rc == 0
    assert run("worker", "start", "--burst").rc == 0
    open_dashboard(page, dashboard.start())
    cell = row(page, "xss").locator(".cmd")
    expect(cell).to_have_text(evil)
    assert page.locator("#jobs img, #jobs script, #jobs b").count() == 0
    row(page, "xss").click()
    expect(page.locator("#job-command")).to_have_text(evil)
    page.click("#job-close")
    row(page, "xss-output").click()
    expect(page.locator("#job-output")).to_contain_text("<script>alert(2)</script><b>bold</b>")
    assert page.locator("#drawer img, #drawer script, #drawer b").count() == 0
    assert page.dialogs == [], "a script from a job ran: %s" % page.dialogs
    assert page.evaluate("document.querySelectorAll('img[src=\"x\"], img[src=\"y\"]').length") == 0


def test_html_through_every_free_text_field_is_shown_as_text(db, run, dashboard, page, tmp_path):
    """Every job string a user controls (command, output, working directory, unique key, and the
    error that quotes the directory) reaches the page as text; env values and the webhook URL's
    path do not reach it at all (secrets are masked)."""
    evil = "<img src=x onerror=alert(%d)>"
    job = {"id": "fields", "command": "echo '%s'; exit 1" % (evil % 1), "max_retries": 0,
           "cwd": str(tmp_path / (evil % 2)),  # missing: the error quotes it
           "env": {"EVIL": evil % 3}, "unique_key": evil % 4,
           "webhook": "http://127.0.0.1:9/%s" % (evil % 5).replace(" ", "")}
    assert run("enqueue", json.dumps(job)).rc == 0
    assert run("worker", "start", "--burst").rc == 0
    assert db_rows(db, "SELECT state FROM jobs WHERE id = 'fields'") == [("dead",)]
    open_dashboard(page, dashboard.start())
    row(page, "fields").click()
    drawer = page.locator("#drawer")
    expect(page.locator("#job-command")).to_have_text(job["command"])
    for text in (job["cwd"], "EVIL=***", evil % 4, "http://127.0.0.1:9/***"):
        expect(drawer).to_contain_text(text)
    for secret in (evil % 3, evil % 5):
        assert secret not in drawer.inner_text()
    expect(page.locator("#job-attempts")).to_contain_text("does not exist")
    assert drawer.locator("img, script").count() == 0
    assert page.dialogs == [], "a script from a job field ran: %s" % page.dialogs
    assert page.evaluate("document.querySelectorAll('img[src=\"x\"]').length") == 0


# --- the seed README's manual Test 4, in the browser ------------------------------------------------


def test_seed_manual_test4_dashboard_and_monitoring(db, run, dashboard, workers, page):
    open_dashboard(page, dashboard.start())
    for i in range(1, 6):
        assert run("enqueue", "-p", "high", '{"id":"h%d","command":"sleep 1"}' % i).rc == 0
        assert run("enqueue", "-p", "low", '{"id":"l%d","command":"sleep 1"}' % i).rc == 0
    expect(count_of(page, "pending")).to_have_text("10")
    workers.start(3)
    expect(count_of(page, "processing")).to_have_text("3")  # watched live
    expect(page.locator("#workers tbody tr[data-worker]")).to_have_count(3)
    expect(page.locator("#workers .badge-busy")).to_have_count(3)
    busy_jobs = page.locator("#workers tbody .id-link").all_inner_texts()
    assert set(busy_jobs) <= {"h1", "h2", "h3", "h4", "h5"}, busy_jobs  # high priority first
    expect(count_of(page, "completed")).to_have_text("10", timeout=30000)
    expect(count_of(page, "pending")).to_have_text("0")
    expect(page.locator("#chart-stats .chart-stat").first.locator(".v")).to_have_text("10")
    expect(page.locator("#chart svg rect.bar-ok").first).to_be_attached()
    assert_not_reloaded(page)
    assert page.errors == []


# --- more of what a user does -----------------------------------------------------------------------


def test_enqueue_form_and_confirmed_dead_letter_clear(db, run, dashboard, page):
    open_dashboard(page, dashboard.start())
    page.click("#enqueue-open")
    page.fill('#enqueue-form textarea[name="command"]', "echo 'from the form' && exit 7")
    page.fill('#enqueue-form input[name="id"]', "form-job")
    page.select_option('#enqueue-form select[name="priority"]', "high")
    page.fill('#enqueue-form input[name="max_retries"]', "0")
    page.click("#enqueue-submit")
    expect(page.locator("#drawer")).to_be_visible()
    expect(page.locator("#job-title")).to_have_text("form-job")
    job = queuectl.open_store(str(db))
    try:
        got = job.get("form-job")
        assert (got.command, got.priority_name, got.max_retries) == ("echo 'from the form' && exit 7", "high", 0)
    finally:
        job.close()
    page.click("#job-close")
    page.click("#enqueue-open")  # a bad job is refused with the server's message
    page.fill('#enqueue-form textarea[name="command"]', "true")
    page.fill('#enqueue-form input[name="id"]', "form-job")
    page.click("#enqueue-submit")
    expect(page.locator("#enqueue-error")).to_contain_text("already exists")
    page.click("#enqueue-cancel")

    assert run("worker", "start", "--burst").rc == 0
    assert states_of(db) == {"form-job": "dead"}
    page.click('#state-tabs [data-filter="dead"]')
    expect(row(page, "form-job")).to_be_visible()
    page.click("#dlq-clear")
    expect(page.locator("#confirm-dialog")).to_be_visible()
    expect(page.locator("#confirm-text")).to_contain_text("1 job(s)")
    page.click("#confirm-no")  # cancelled: nothing deleted
    expect(page.locator("#confirm-dialog")).to_be_hidden()
    assert db_rows(db, "SELECT count(*) FROM jobs") == [(1,)]
    page.click("#dlq-clear")
    page.click("#confirm-yes")
    wait_until(lambda: db_rows(db, "SELECT count(*) FROM jobs") == [(0,)], 10)
    expect(count_of(page, "dead")).to_have_text("0")
    assert page.dialogs == []


def test_job_view_follows_a_running_jobs_output(db, run, dashboard, workers, page):
    open_dashboard(page, dashboard.start())
    workers.start(1)
    assert run("enqueue", "--id", "talker", "--",
               "for i in 1 2 3 4 5 6 7 8; do echo line$i; sleep 0.4; done").rc == 0
    expect(row(page, "talker")).to_be_visible()
    row(page, "talker").click()
    expect(page.locator("#job-state .badge")).to_have_text("processing")
    expect(page.locator("#job-output")).to_contain_text("line1")
    expect(page.locator("#output-live")).to_be_visible()
    assert "line8" not in page.locator("#job-output").inner_text()  # still running: output so far
    expect(page.locator("#job-output")).to_contain_text("line8", timeout=20000)
    expect(page.locator("#job-state .badge")).to_have_text("completed")
    expect(page.locator("#output-live")).to_be_hidden()
    assert_not_reloaded(page)


def test_falls_back_to_polling_without_server_sent_events(run, dashboard, page):
    page.route("**/api/events", lambda route: route.abort())
    page.goto(dashboard.start())
    expect(page.locator("#live")).to_have_attribute("data-mode", "polling")
    page.evaluate("window.__loaded_once = true")
    assert run("enqueue", "--id", "polled", "--", "true").rc == 0
    expect(row(page, "polled")).to_be_visible(timeout=6000)
    assert_not_reloaded(page)


HIDDEN_TAB = """
window.__hidden = false;
Object.defineProperty(document, 'hidden', {get: () => window.__hidden});
Object.defineProperty(document, 'visibilityState', {get: () => window.__hidden ? 'hidden' : 'visible'});
"""


def test_hidden_tab_stops_updates_and_resumes(run, dashboard, page):
    page.add_init_script(HIDDEN_TAB)
    url = dashboard.start()
    open_dashboard(page, url)
    health = url.split("?")[0] + "healthz"
    streams = lambda: page.request.get(health).json()["event_streams"]  # noqa: E731
    wait_until(lambda: streams() == 1, 10)
    page.evaluate("window.__hidden = true; document.dispatchEvent(new Event('visibilitychange'))")
    expect(page.locator("#live")).to_have_attribute("data-mode", "paused")
    wait_until(lambda: streams() == 0, 10, message="the hidden tab kept its event stream open")
    assert run("enqueue", "--id", "while-hidden", "--", "true").rc == 0
    page.evaluate("window.__hidden = false; document.dispatchEvent(new Event('visibilitychange'))")
    expect(row(page, "while-hidden")).to_be_visible()
    expect(page.locator("#live")).to_have_attribute("data-mode", "live")
    wait_until(lambda: streams() == 1, 10)
    assert_not_reloaded(page)


def test_read_only_dashboard_offers_no_changes(db, run, dashboard, page):
    assert run("enqueue", "--id", "dead-one", "-r", "0", "--", "false").rc == 0
    assert run("worker", "start", "--burst").rc == 0
    open_dashboard(page, dashboard.start("--read-only"))
    expect(page.locator("#read-only-badge")).to_be_visible()
    expect(page.locator("#enqueue-open")).to_be_hidden()
    page.click('#state-tabs [data-filter="dead"]')
    expect(row(page, "dead-one")).to_be_visible()
    assert row(page, "dead-one").locator("button").count() == 0
    expect(page.locator("#dlq-bar")).to_be_hidden()
    row(page, "dead-one").click()
    expect(page.locator("#job-title")).to_have_text("dead-one")
    expect(page.locator("#job-retry")).to_be_hidden()
