"""The chaos suite (tests/chaos.py) on PostgreSQL: a short run in CI.

Two rounds of 80 jobs in a fresh schema: the first without kills (duplicates
must be 0), the second with kill -9 of workers and whole supervisor trees
every 1-2 s.  The same checks as tests/test_chaos.py: nothing lost, stuck or
left running, no orphan process, duplicates within the kills, and the
integrity check (amcheck over the schema's tables and indexes) ok.
Marked ``postgres``: needs the local server ($QUEUECTL_TEST_PG).
"""

import os
import re
import subprocess
import sys

import pytest

import conftest
import test_chaos

pytestmark = pytest.mark.postgres

HERE = os.path.dirname(os.path.abspath(__file__))


def test_short_chaos_run_on_postgresql(pg_url, tmp_path):
    env = dict(os.environ)
    env.setdefault("SHIV_ROOT", str(conftest.ROOT / "build" / "shiv-root"))
    cmd = [sys.executable, os.path.join(HERE, "chaos.py"), "--rounds", "2", "--jobs", "80", "--kill-every", "1-2",
           "--calm-rounds", "1", "--seed", "11", "--db", pg_url]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path))
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.terminate()  # chaos.py then kills every process it started, by pid
        out, err = proc.communicate(timeout=120)
        pytest.fail("the short chaos run took more than 10 minutes:\n" + out + err)
    print(out)  # the summary lines, for the CI log
    assert proc.returncode == 0, out + err
    rounds = [test_chaos.ROUND.match(line) for line in out.splitlines() if line.startswith("round ")]
    assert len(rounds) == 2 and all(rounds), out
    for m in rounds:
        n, jobs, completed, dead, kills, workers_killed = (int(m.group(i)) for i in range(1, 7))
        lost, stuck, processing, duplicates, orphans = (int(m.group(i)) for i in range(9, 14))
        assert jobs == 80 and completed + dead == 80
        assert (lost, stuck, processing, orphans) == (0, 0, 0, 0)
        assert m.group(14) == "ok"
        assert duplicates <= workers_killed
        if n == 1:
            assert m.group(15) and kills == 0 and duplicates == 0, "a round without kills must run each job once"
        else:
            assert not m.group(15) and kills >= 1 and workers_killed >= kills, "the kills did not happen"
    assert re.search(r"^TOTAL 2 round\(s\): 160 jobs, 160 acknowledged, .* \| PASS$", out, re.M), out
