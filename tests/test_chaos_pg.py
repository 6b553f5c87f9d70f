"""The chaos suite (tests/chaos.py) on PostgreSQL: a short run in CI.

Two rounds of 80 jobs in a fresh schema: the first without kills (duplicates
must be 0), the second with kill -9 of workers and whole supervisor trees
every 1-2 s.  The same checks as tests/test_chaos.py: nothing lost, stuck or
left running, no orphan process, duplicates within the kills, and the
integrity check (amcheck over the schema's tables and indexes) ok.
Marked ``postgres``: needs the local server ($QUEUECTL_TEST_PG).
"""

import pytest

import test_chaos

pytestmark = pytest.mark.postgres


def test_short_chaos_run_on_postgresql(pg_url, tmp_path):
    test_chaos.run_short_chaos(pg_url, tmp_path, rounds=2, jobs=80, seed=11, min_kills=1)
