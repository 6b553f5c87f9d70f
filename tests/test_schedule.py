"""Cron expressions and firing schedules, with time injected (nothing waits for a clock).

``Cron.next_after`` is a pure function of a timestamp and a time zone;
``SqliteStore.fire_schedules`` takes ``now``.  The end-to-end side (three
supervisors, the policies through the CLI) is in test_features.py.
"""

import datetime
import threading
import zoneinfo

import pytest

import queuectl
from queuectl import Cron, InvalidInput

UTC = datetime.timezone.utc


def at(*fields, tz=UTC):
    return datetime.datetime(*fields, tzinfo=tz).timestamp()


def ticks(expr, start, n, tz=None):
    """The first ``n`` ticks of ``expr`` strictly after ``start``."""
    cron, out, t = Cron.parse(expr), [], start
    for _ in range(n):
        t = cron.next_after(t, tz)
        out.append(t)
    return out


def local(ts, tz):
    return datetime.datetime.fromtimestamp(ts, tz)


# --- parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize("alias, expr", [
    ("@yearly", "0 0 1 1 *"), ("@annually", "0 0 1 1 *"), ("@monthly", "0 0 1 * *"), ("@weekly", "0 0 * * 0"),
    ("@daily", "0 0 * * *"), ("@midnight", "0 0 * * *"), ("@hourly", "0 * * * *"), ("@HOURLY", "0 * * * *"),
    (" @daily ", "0 0 * * *"),
])
def test_aliases_mean_their_five_fields(alias, expr):
    assert Cron.parse(alias) == Cron.parse(expr)


def test_alias_ticks():
    start = at(2031, 5, 14, 12, 7)  # a Wednesday
    assert ticks("@hourly", start, 2) == [at(2031, 5, 14, 13), at(2031, 5, 14, 14)]
    assert ticks("@daily", start, 1) == [at(2031, 5, 15)]
    assert ticks("@weekly", start, 1) == [at(2031, 5, 18)]  # Sunday
    assert ticks("@monthly", start, 1) == [at(2031, 6, 1)]
    assert ticks("@yearly", start, 1) == [at(2032, 1, 1)]


@pytest.mark.parametrize("expr", [
    "", "   ", "* * * *", "* * * * * *", "60 * * * *", "-1 * * * *", "* 24 * * *", "* * 0 * *", "* * 32 * *",
    "* * * 0 *", "* * * 13 *", "* * * * 8", "5-1 * * * *", "*/0 * * * *", "1-2-3 * * * *", "1,,2 * * * *",
    "a * * * *", "* * * foo *", "* * * * funday", "*/5/2 * * * *", "@reboot", "@every 5m", "@", None, 5,
])
def test_invalid_expressions_are_refused(expr):
    with pytest.raises(InvalidInput):
        Cron.parse(expr)


def test_an_expression_that_never_fires_is_refused():
    cron = Cron.parse("0 0 30 2 *")  # well formed, but February has no 30th
    with pytest.raises(InvalidInput, match="never"):
        cron.next_after(at(2031, 1, 1))


def test_lists_ranges_steps_and_names():
    c = Cron.parse("0,30 9-17/4 * jan-mar,dec mon-fri")
    assert c.minutes == {0, 30} and c.hours == {9, 13, 17}
    assert c.months == {1, 2, 3, 12} and c.weekdays == {1, 2, 3, 4, 5}
    assert Cron.parse("0 0 * * 7") == Cron.parse("0 0 * * 0") == Cron.parse("0 0 * * sun")
    assert Cron.parse("*/20 * * * *").minutes == {0, 20, 40}
    assert Cron.parse("10/20 * * * *").minutes == {10, 30, 50}


# --- next_after ----------------------------------------------------------------------------


def test_next_tick_is_strictly_after():
    assert ticks("*/15 * * * *", at(2031, 5, 14, 12, 7), 1) == [at(2031, 5, 14, 12, 15)]
    assert ticks("*/15 * * * *", at(2031, 5, 14, 12, 15), 1) == [at(2031, 5, 14, 12, 30)]  # on a tick: the next
    assert ticks("*/15 * * * *", at(2031, 5, 14, 12, 14, 59, 500000), 1) == [at(2031, 5, 14, 12, 15)]
    assert ticks("59 23 31 12 *", at(2031, 12, 31, 23, 59), 1) == [at(2032, 12, 31, 23, 59)]


def test_weekday_and_month_names():
    # 2031-03-29 is a Saturday: the next weekday in Jan-Mar is Monday the 31st, then 2032-01-01
    assert ticks("0 9 * jan-mar mon-fri", at(2031, 3, 29, 9), 2) == [at(2031, 3, 31, 9), at(2032, 1, 1, 9)]


def test_day_of_month_or_day_of_week_when_both_are_restricted():
    # "on the 1st, or on any Monday" (2031-06-01 is a Sunday, July 1st a Tuesday)
    got = ticks("0 0 1 * 1", at(2031, 6, 1), 7)
    assert got == [at(2031, 6, d) for d in (2, 9, 16, 23, 30)] + [at(2031, 7, 1), at(2031, 7, 7)]


def test_day_of_month_and_day_of_week_when_one_is_a_star():
    assert ticks("0 0 1 * *", at(2031, 6, 1), 2) == [at(2031, 7, 1), at(2031, 8, 1)]
    assert ticks("0 0 * * 1", at(2031, 6, 1), 2) == [at(2031, 6, 2), at(2031, 6, 9)]


def test_leap_day():
    assert ticks("0 0 29 2 *", at(2025, 3, 1), 2) == [at(2028, 2, 29), at(2032, 2, 29)]
    assert ticks("0 0 29 2 *", at(2024, 2, 29), 1) == [at(2028, 2, 29)]  # on the tick: four years on
    assert ticks("0 0 29 2 *", at(2024, 2, 28, 23, 59, 30), 1) == [at(2024, 2, 29)]
    assert ticks("0 12 28-29 2 *", at(2027, 3, 1), 3) == [at(2028, 2, 28, 12), at(2028, 2, 29, 12),
                                                          at(2029, 2, 28, 12)]


def test_a_time_zone_shifts_the_ticks():
    tokyo = zone("Asia/Tokyo")  # UTC+9, no DST
    assert ticks("0 9 * * *", at(2031, 5, 13, 23), 1, tokyo) == [at(2031, 5, 14, 0)]
    assert ticks("0 9 * * *", at(2031, 5, 13, 23), 1) == [at(2031, 5, 14, 9)]  # default: UTC


def zone(name):
    """An IANA zone; a machine without the time zone database fails these tests, never skips them."""
    try:
        return zoneinfo.ZoneInfo(name)
    except zoneinfo.ZoneInfoNotFoundError:  # pragma: no cover
        pytest.fail("the time zone tests need the IANA time zone database (tzdata)")


@pytest.fixture
def new_york():
    return zone("America/New_York")


def test_dst_spring_forward_a_skipped_time_still_fires_once(new_york):
    # 2021-03-14 02:00 EST -> 03:00 EDT: 02:30 does not exist that day
    got = ticks("30 2 * * *", at(2021, 3, 13, 12, tz=new_york), 3, new_york)
    days = [local(t, new_york).date() for t in got]
    assert days == [datetime.date(2021, 3, 14), datetime.date(2021, 3, 15), datetime.date(2021, 3, 16)]
    assert got[0] == at(2021, 3, 14, 7, 30)  # 03:30 EDT: shifted by the hour that was skipped (README)
    assert got[1] == at(2021, 3, 15, 2, 30, tz=new_york) and got[2] - got[1] == 86400


def test_dst_spring_forward_day_has_23_hourly_ticks(new_york):
    start, end = at(2021, 3, 14, tz=new_york), at(2021, 3, 15, tz=new_york)
    got = [t for t in ticks("0 * * * *", start - 1, 30, new_york) if t < end]
    assert len(got) == 23 and got[0] == start
    assert all(b - a == 3600 for a, b in zip(got, got[1:]))


def test_dst_fall_back_a_repeated_time_fires_once(new_york):
    # 2021-11-07 02:00 EDT -> 01:00 EST: 01:30 happens twice that night; a daily job runs once
    got = ticks("30 1 * * *", at(2021, 11, 6, 12, tz=new_york), 2, new_york)
    assert got[0] == at(2021, 11, 7, 5, 30)  # 01:30 EDT, the first one
    assert got[1] == at(2021, 11, 8, 6, 30) and got[1] - got[0] == 25 * 3600  # 01:30 EST the next day


def test_dst_fall_back_the_repeated_hour_runs_once(new_york):
    # the README's rule: 01:00-01:59 happens twice that night and is run once, the first time
    start, end = at(2021, 11, 7, tz=new_york), at(2021, 11, 8, tz=new_york)
    got = [t for t in ticks("0 * * * *", start - 1, 30, new_york) if t < end]
    assert [local(t, new_york).hour for t in got] == list(range(24))
    assert got[1] == at(2021, 11, 7, 5) and got[2] == at(2021, 11, 7, 7)  # 01:00 EDT, then 02:00 EST


def test_resolve_tz():
    assert queuectl.resolve_tz("UTC") is UTC and queuectl.resolve_tz(None) is UTC
    assert queuectl.resolve_tz("local") is not None
    for bad in ("Mars/Olympus_Mons", "../etc/passwd", "Not A Zone"):
        with pytest.raises(InvalidInput, match="time zone"):
            queuectl.resolve_tz(bad)


# --- fire_schedules with an injected clock ----------------------------------------------------

NOW = at(2031, 5, 14, 12, 0, 30)  # the ticks of */5 around it: 12:00, 12:05, 12:10


def add(store, name, expr="*/5 * * * *", next_run=None, missed="once", overlap="skip", tz="UTC", **job):
    spec = {"command": "echo %s" % name, "cwd": "/"}
    spec.update(job)
    nxt = next_run if next_run is not None else Cron.parse(expr).next_after(NOW)
    store.add_schedule(name, expr, tz, spec, missed, overlap, nxt, NOW - 3600)


def fire(store, now):
    return store.fire_schedules(now, queuectl.schedule_next_run, store.config())


def row(store, name):
    (s,) = [s for s in store.schedules() if s["name"] == name]
    return s


def complete(store, job_id, now):
    job = store.claim("w1", "host", now, 15.0)
    assert job is not None and job.id == job_id
    assert store.finish(job.id, job.runs, "w1", "completed", now, "completed", 0)


def test_nothing_fires_before_the_tick(store):
    add(store, "s")
    assert fire(store, NOW) == []
    assert fire(store, at(2031, 5, 14, 12, 4, 59)) == []
    assert store.counts()["pending"] == 0 and row(store, "s")["next_run"] == at(2031, 5, 14, 12, 5)


def test_a_due_tick_enqueues_one_job_with_the_schedules_options(store, tmp_path):
    add(store, "s", priority="high", queue="reports", timeout=60.0,
        max_retries=1, env={"A": "1"})
    now = at(2031, 5, 14, 12, 5, 10)
    (job_id,) = fire(store, now)
    assert job_id == "s.20310514T1205Z"
    job = store.get(job_id)
    assert (job.state, job.command, job.schedule, job.queue, job.priority_name) == \
        ("pending", "echo s", "s", "reports", "high")
    assert (job.timeout, job.max_retries, job.env, job.cwd) == (60.0, 1, {"A": "1"}, "/")
    assert job.run_at == now
    s = row(store, "s")
    assert s["next_run"] == at(2031, 5, 14, 12, 10) and s["last_run"] == at(2031, 5, 14, 12, 5)
    assert s["last_job"] == job_id and s["last_state"] == "pending"
    assert "reports" in [q["name"] for q in store.queues()]


def test_a_tick_fires_once_however_many_processes_ask(store, db):
    add(store, "s", overlap="allow")
    now = at(2031, 5, 14, 12, 5, 1)
    other = queuectl.SqliteStore(str(db))
    try:
        assert len(fire(store, now)) == 1
        assert fire(other, now) == [] and fire(store, now) == []
        assert fire(other, now + 30) == []
    finally:
        other.close()
    assert store.counts()["pending"] == 1


def test_a_tick_fires_once_when_two_processes_race_for_it(store, db):
    """The other process finds the tick due while this one is firing it, before this one commits:
    it must look again under the write lock, and find nothing left to do."""
    add(store, "s", overlap="allow")
    now = at(2031, 5, 14, 12, 5, 1)
    other = queuectl.SqliteStore(str(db))
    other_cfg = other.config()
    saw_it_due, results, threads = threading.Event(), {}, []
    real_read = other._read

    def spying_read(sql, *args, **kw):
        rows = real_read(sql, *args, **kw)
        if "next_run <= :now" in sql and rows:
            saw_it_due.set()
        return rows

    other._read = spying_read

    def next_run(schedule, after):  # called by this process inside its transaction
        thread = threading.Thread(target=lambda: results.update(
            other=other.fire_schedules(now, queuectl.schedule_next_run, other_cfg)))
        thread.start()
        threads.append(thread)
        assert saw_it_due.wait(10), "the other process never looked"
        return queuectl.schedule_next_run(schedule, after)

    try:
        created = store.fire_schedules(now, next_run, store.config())
        threads[0].join(30)
    finally:
        other.close()
    assert len(created) == 1 and results["other"] == []
    assert store.counts()["pending"] == 1


def test_missed_ticks_run_once_with_missed_once(store):
    add(store, "s", next_run=NOW - 3 * 3600 - 30, missed="once")  # 36 ticks missed while nothing ran
    created = fire(store, NOW)
    assert len(created) == 1
    assert row(store, "s")["next_run"] == at(2031, 5, 14, 12, 5)  # the next tick after now
    assert fire(store, NOW + 1) == []


def test_missed_ticks_are_dropped_with_missed_skip(store):
    add(store, "s", next_run=NOW - 3 * 3600 - 30, missed="skip")
    assert fire(store, NOW) == []
    s = row(store, "s")
    assert s["next_run"] == at(2031, 5, 14, 12, 5) and s["last_job"] is None and s["last_run"] is None
    assert store.counts()["pending"] == 0


@pytest.mark.parametrize("late, fires", [(0, True), (30, True), (60, True), (61, False), (299, False)])
def test_a_tick_up_to_a_minute_late_is_not_missed(store, late, fires):
    tick = at(2031, 5, 14, 12, 5)
    add(store, "s", next_run=tick, missed="skip")
    assert len(fire(store, tick + late)) == (1 if fires else 0)
    assert row(store, "s")["next_run"] > tick + late


def test_overlap_skip_waits_for_the_previous_run(store):
    add(store, "s", overlap="skip")
    t1, t2, t3 = at(2031, 5, 14, 12, 5), at(2031, 5, 14, 12, 10), at(2031, 5, 14, 12, 15)
    (first,) = fire(store, t1)
    assert fire(store, t2) == []  # the first run is still pending
    assert row(store, "s")["next_run"] == t3 and row(store, "s")["last_job"] == first
    complete(store, first, t2 + 1)
    assert len(fire(store, t3)) == 1


def test_overlap_skip_also_while_the_previous_run_is_running_or_failed(store):
    add(store, "s", overlap="skip", max_retries=2)
    (first,) = fire(store, at(2031, 5, 14, 12, 5))
    job = store.claim("w1", "host", at(2031, 5, 14, 12, 6), 15.0)
    assert job.id == first
    assert fire(store, at(2031, 5, 14, 12, 10)) == []  # processing
    store.finish(job.id, job.runs, "w1", "failed", at(2031, 5, 14, 12, 11), "failed", 1,
                 retry_at=at(2031, 5, 14, 13))
    assert fire(store, at(2031, 5, 14, 12, 15)) == []  # failed, awaiting its retry


def test_overlap_allow_fires_while_the_previous_run_is_unfinished(store):
    add(store, "s", overlap="allow")
    assert len(fire(store, at(2031, 5, 14, 12, 5))) == 1
    assert len(fire(store, at(2031, 5, 14, 12, 10))) == 1
    assert store.counts()["pending"] == 2


def test_a_paused_schedule_does_not_fire_and_resumes_from_its_next_tick(store):
    add(store, "s")
    store.pause_schedule("s", True)
    assert fire(store, at(2031, 5, 14, 13)) == []
    assert row(store, "s")["next_run"] == at(2031, 5, 14, 12, 5)  # untouched while paused
    resume_at = at(2031, 5, 14, 13, 2)
    store.pause_schedule("s", False, queuectl.schedule_next_run(row(store, "s"), resume_at))
    assert row(store, "s")["next_run"] == at(2031, 5, 14, 13, 5) and not row(store, "s")["paused"]
    assert fire(store, resume_at) == []  # the ticks missed while paused are not made up for
    assert len(fire(store, at(2031, 5, 14, 13, 5))) == 1


def test_a_unique_key_held_by_another_job_skips_the_tick(store):
    store.enqueue([queuectl.validate_job({"command": "true", "unique_key": "K"}, queuectl.DEFAULTS, NOW, cwd="/")],
                  NOW)
    add(store, "s", unique_key="K")
    assert fire(store, at(2031, 5, 14, 12, 5)) == []
    assert row(store, "s")["next_run"] == at(2031, 5, 14, 12, 10)


def test_a_taken_job_id_gets_a_suffix(store):
    store.enqueue([queuectl.validate_job({"id": "s.20310514T1205Z", "command": "true"}, queuectl.DEFAULTS, NOW,
                                         cwd="/")], NOW)
    add(store, "s")
    (job_id,) = fire(store, at(2031, 5, 14, 12, 5))
    assert job_id.startswith("s.20310514T1205Z.") and store.get(job_id).schedule == "s"
    suffix = job_id[len("s.20310514T1205Z."):]
    assert len(suffix) == 4 and queuectl.ID_RE.fullmatch(suffix)


def test_a_schedule_without_a_cwd_runs_its_jobs_in_the_root_directory(store, tmp_path, monkeypatch):
    """Not in the directory of whichever supervisor happens to fire it."""
    monkeypatch.chdir(tmp_path)
    store.add_schedule("nocwd", "*/5 * * * *", "UTC", {"command": "pwd"}, "once", "allow",
                       Cron.parse("*/5 * * * *").next_after(NOW), NOW)
    (job_id,) = fire(store, at(2031, 5, 14, 12, 5))
    assert store.get(job_id).cwd == "/"


def test_schedules_in_a_time_zone_advance_in_it(store):
    tokyo = zone("Asia/Tokyo")
    add(store, "t", expr="0 9 * * *", tz="Asia/Tokyo", next_run=at(2031, 5, 14, 9, tz=tokyo))
    assert len(fire(store, at(2031, 5, 14, 9, tz=tokyo))) == 1
    assert row(store, "t")["next_run"] == at(2031, 5, 15, 9, tz=tokyo)


def test_schedule_names_are_unique_and_removal_is_checked(store):
    add(store, "s")
    with pytest.raises(queuectl.Conflict):
        add(store, "s")
    store.remove_schedule("s")
    assert store.schedules() == []
    for call in (lambda: store.remove_schedule("s"), lambda: store.pause_schedule("s", True)):
        with pytest.raises(queuectl.NotFound):
            call()
