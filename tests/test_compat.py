"""The Pythons servers have: 3.8 to 3.13 run queuectl (`./build.sh test` runs the end-to-end
suite on each it finds); anything older is refused with one line before any work is done."""

import glob
import os
import subprocess
import tempfile

import pytest

from conftest import ROOT


def old_pythons():
    found = []
    for version in ("3.6", "3.7"):
        for pattern in ("/usr/bin/python%s" % version, "/usr/local/bin/python%s" % version,
                        os.path.expanduser("~/.pyenv/versions/%s.*/bin/python%s" % (version, version))):
            found += sorted(glob.glob(pattern))[-1:]
    return found


@pytest.mark.parametrize("python", old_pythons() or [pytest.param(None, marks=pytest.mark.skip(
    reason="no Python 3.6 or 3.7 on this machine to try"))])
def test_an_older_python_gets_one_line_and_does_nothing(python, tmp_path):
    db = tmp_path / "q.db"
    for args in (["--version"], ["--db", str(db), "enqueue", "--", "true"], ["--db", str(db), "worker", "start"]):
        r = subprocess.run([python, str(ROOT / "queuectl.py")] + args, capture_output=True, text=True, timeout=30,
                           cwd=tempfile.gettempdir())
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("queuectl: error: queuectl needs Python 3.8 or newer")
    assert not db.exists()


def test_exit_code_of_matches_the_standard_library():
    import queuectl

    for status in (0, 1 << 8, 3 << 8, 255 << 8, 9, 15, 15 | 0x80):  # exits, signals, a core dump
        assert queuectl.exit_code_of(status) == os.waitstatus_to_exitcode(status)


def test_shell_join_quotes_like_shlex_join():
    import shlex

    import queuectl

    for words in (["echo", "a b", "it's", "$HOME", ""], ["ls", "-la"]):
        assert queuectl.shell_join(words) == shlex.join(words)
