"""The chaos suite (tests/chaos.py) in CI: a short run, and its checker on made-up rounds.

The long run is documented in docs/guarantees.md (20 rounds x 500 jobs, kill -9 every
1-2 s); here 3 rounds of 100 jobs: the first without kills (so duplicates
must be 0: exactly-once without crashes), the others with kill -9 of workers
and whole supervisor trees every 1-2 s.
"""

import os
import re
import subprocess
import sys

import pytest

import conftest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import chaos  # noqa: E402

ROUND = re.compile(
    r"^round (\d+)/\d+: jobs (\d+) .*?, completed (\d+), dead (\d+) \| kills (\d+) \(workers (\d+), supervisors (\d+)\), "
    r"runs lost (\d+) .*? \| lost (\d+), stuck (\d+), processing (\d+), duplicates (\d+), orphans (\d+), "
    r"integrity (\S+) \| [\d.]+s( \[no kills\])?$")


def run_short_chaos(db, tmp_path, rounds, jobs, seed, min_kills):
    """Run tests/chaos.py for a few rounds (the first without kills) and check every summary line."""
    env = dict(os.environ)
    env.setdefault("SHIV_ROOT", str(conftest.ROOT / "build" / "shiv-root"))
    cmd = [sys.executable, os.path.join(HERE, "chaos.py"), "--rounds", str(rounds), "--jobs", str(jobs),
           "--kill-every", "1-2", "--calm-rounds", "1", "--seed", str(seed), "--db", str(db)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path))
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.terminate()  # chaos.py then kills every process it started, by pid
        out, err = proc.communicate(timeout=120)
        pytest.fail("the short chaos run took more than 10 minutes:\n" + out + err)
    print(out)  # the summary lines, for the CI log
    assert proc.returncode == 0, out + err
    found = [ROUND.match(line) for line in out.splitlines() if line.startswith("round ")]
    assert len(found) == rounds and all(found), out
    for m in found:
        n, njobs, completed, dead, kills, workers_killed = (int(m.group(i)) for i in range(1, 7))
        lost, stuck, processing, duplicates, orphans = (int(m.group(i)) for i in range(9, 14))
        assert njobs == jobs and completed + dead == jobs
        assert (lost, stuck, processing, orphans) == (0, 0, 0, 0)
        assert m.group(14) == "ok"
        assert duplicates <= workers_killed
        if n == 1:
            assert m.group(15) and kills == 0 and duplicates == 0, "a round without kills must run each job once"
        else:
            assert not m.group(15) and kills >= min_kills and workers_killed >= kills, "the kills did not happen"
    total = r"^TOTAL %d round\(s\): %d jobs, %d acknowledged, .* \| PASS$" % (rounds, rounds * jobs, rounds * jobs)
    assert re.search(total, out, re.M), out


def test_short_chaos_run(tmp_path):
    run_short_chaos(tmp_path / "chaos.db", tmp_path, rounds=3, jobs=100, seed=7, min_kills=3)


# --- the checker itself: each violation is caught --------------------------------------------------------


def clean_facts():
    kinds = {"r-ok1": "ok", "r-ok2": "ok", "r-fail": "fail", "r-to": "timeout"}
    return {
        "kinds": kinds, "acked": list(kinds),
        "rows": {"r-ok1": ("completed", 1, 0), "r-ok2": ("completed", 2, 0), "r-fail": ("dead", 3, 0),
                 "r-to": ("dead", 1, 0)},
        "ledger": ["r-ok1", "r-ok2", "r-ok2"], "workers_killed": 1, "orphans": {}, "integrity": "ok",
        "counts_ok": True, "enqueue_errors": [], "stop_failures": [], "drained": True,
    }


def test_checker_passes_a_clean_round():
    numbers, violations = chaos.check_round(clean_facts())
    assert violations == []
    assert numbers["duplicates"] == 1 and numbers["completed"] == 2 and numbers["dead"] == 2


@pytest.mark.parametrize("spoil, words", [
    (lambda f: f["rows"].pop("r-ok1"), "missing from the database"),
    (lambda f: f["rows"].update({"r-fail": ("processing", 1, 1)}), "did not end"),
    (lambda f: f["rows"].update({"r-ok1": ("dead", 1, 0)}), "wrong state"),
    (lambda f: f["rows"].update({"r-to": ("dead", 1, 1)}), "attempt still open"),
    (lambda f: f.update(ledger=["r-ok2"]), "never wrote the ledger"),
    (lambda f: f.update(ledger=f["ledger"] + ["r-fail"]), "did not complete"),
    (lambda f: f.update(ledger=f["ledger"] + ["r-ok1", "r-ok1"]), "duplicate run(s) but only 1"),
    (lambda f: f.update(orphans={4242: (4242, "r-to")}), "survived"),
    (lambda f: f.update(integrity="*** in database main ***"), "integrity_check"),
    (lambda f: f.update(counts_ok=False), "counters"),
    (lambda f: f.update(drained=False), "did not drain"),
    (lambda f: f["rows"].update({"r-extra": ("completed", 1, 0)}), "not acknowledged"),
    (lambda f: f.update(stop_failures=["supervisor 1 did not stop"]), "did not stop"),
])
def test_checker_catches(spoil, words):
    facts = clean_facts()
    spoil(facts)
    _, violations = chaos.check_round(facts)
    assert any(words in v for v in violations), violations
