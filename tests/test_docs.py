"""The examples a user copies from README.md and docs/*.md, run as written.

A ```console block is run when the line before its opening fence is one of

    <!-- runnable -->             a fresh HOME and working directory
    <!-- runnable: continued -->  goes on where the previous runnable block of the same
                                  page left off (same HOME, directory and database)

Each ``$ `` line (with its ``\\``-continued lines) runs in its own ``bash -c``, in order,
with stdout and stderr together, and ``queuectl`` (also ``python3 queuectl.py``) resolving
to the program under test (QUEUECTL_CMD, so the .pyz run checks the built file too). Its
output must equal the lines under it, after both sides are normalised: times, durations,
pids and worker ids become placeholders, this machine's host name reads ``vm``, the block's
working directory reads ``/tmp/demo`` and its HOME ``~``, runs of spaces are one space, and
an id the program generated is matched to the one in the document the first time it is
printed (then used in later commands). A line that is just ``...`` matches any lines.

``python3 tests/test_docs.py [FILE...]`` prints what the runnable blocks print now (paths
and host name made neutral as above), to paste into a page after a change.
"""

import contextlib
import dataclasses
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT, pid_exists, program, wait_until  # noqa: E402

pytestmark = pytest.mark.e2e

PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
MARKER = re.compile(r"^<!--\s*runnable(?::\s*(continued))?\s*-->\s*$")
WORK_NAME = "/tmp/demo"  # what the block's working directory reads as in the documents
DOC_HOST = "vm"  # the host name the documents show
#: Links to pages that are written elsewhere and may not exist on this branch yet.


# --- reading the pages ---------------------------------------------------------------------------

@dataclasses.dataclass
class Command:
    line: int  # 1-based line of the `$` in its page
    text: str  # the command, continuation lines joined as bash would see them
    expected: list  # the documented output lines


@dataclasses.dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    continued: bool
    commands: list

    @property
    def where(self):
        return "%s:%d" % (self.page.relative_to(ROOT), self.line)


@dataclasses.dataclass
class Chain:
    """Runnable blocks that share one HOME and directory: a fresh block and its continuations."""

    blocks: list

    @property
    def name(self):
        return self.blocks[0].where


FENCE = re.compile(r"^(`{3,})")


def fence_flags(lines):
    """For each line, whether it is inside a fenced block or is one of its fences."""
    flags, fence = [], None
    for line in lines:
        m = FENCE.match(line)
        if fence is None:
            if m:
                fence = m.group(1)
            flags.append(fence is not None)
        else:
            flags.append(True)
            if m and m.group(1).startswith(fence) and not line[len(m.group(1)):].strip():
                fence = None
    return flags


def parse_page(page):
    """(blocks, problems): the runnable console blocks of a page, and what is wrong with its markers.
    A marker inside a fenced block (an example of the convention) is text, not a marker."""
    lines = page.read_text(encoding="utf-8").split("\n")
    fenced = fence_flags(lines)
    blocks, problems = [], []
    rel = page.relative_to(ROOT)
    for i, line in enumerate(lines):
        m = None if fenced[i] else MARKER.match(line)
        if not m:
            continue
        fence = i + 1
        if fence >= len(lines) or lines[fence].strip() != "```console":
            problems.append("%s:%d: a runnable marker must be followed by a ```console fence" % (rel, i + 1))
            continue
        commands, j = [], fence + 1
        while j < len(lines) and not lines[j].startswith("```"):
            text = lines[j]
            if text.startswith("$ "):
                start, cmd = j, text[2:]
                while cmd.endswith("\\") and j + 1 < len(lines):
                    j += 1
                    cmd = cmd + "\n" + lines[j]
                commands.append(Command(start + 1, cmd, []))
            elif commands:
                commands[-1].expected.append(text)
            elif text.strip():
                problems.append("%s:%d: output before the first $ command" % (rel, j + 1))
            j += 1
        if j >= len(lines):
            problems.append("%s:%d: the console block is not closed" % (rel, fence + 1))
        if not commands:
            problems.append("%s:%d: a runnable block without a $ command" % (rel, fence + 1))
        blocks.append(Block(page, fence + 1, bool(m.group(1)), commands))
    return blocks, problems


def collect():
    chains, problems = [], []
    for page in PAGES:
        blocks, page_problems = parse_page(page)
        problems += page_problems
        last = None
        for block in blocks:
            if block.continued:
                if last is None:
                    problems.append("%s: 'continued', but no runnable block before it on the page" % block.where)
                    continue
                last.blocks.append(block)
            else:
                last = Chain([block])
                chains.append(last)
    return chains, problems


CHAINS, PROBLEMS = collect()


# --- normalising output --------------------------------------------------------------------------

TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d(?::\d\d(?:\.\d+)?)?(?:Z|[+-]\d\d:\d\d)?")
WORKER = re.compile(r"(?<![\w.-])[\w.-]+-\d+-[0-9a-f]{4}(?![\w.-])")
DURATION = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:ms|us|s|m|h|d|w)(?:\d+(?:\.\d+)?(?:ms|s|m|h))*(?!\w)")
PID = re.compile(r"\b(pid|supervisor) \d+\b")
WORKER_PID = re.compile(r"<worker>\s+\d+\b")
#: A job id the program generates: 10 letters of queuectl.ID_ALPHABET.
GENERATED_ID = re.compile(r"[0-9a-hjkmnp-tv-z]{10}")


#: A time as tables show it on a terminal: "3m ago", "just now", "in 2h" (queuectl.relative).
RELATIVE = re.compile(r"(?<![\w.])(?:\d+(?:mo|[smhdy]) ago|just now|in \d+(?:mo|[smhdy]))(?![\w.])")


def normalise(text):
    text = TIME.sub("<time>", text)
    text = RELATIVE.sub("<when>", text)
    text = WORKER.sub("<worker>", text)
    text = WORKER_PID.sub("<worker> <pid>", text)
    text = PID.sub(r"\1 <pid>", text)
    text = DURATION.sub("<dur>", text)
    lines = [re.sub(r"[ \t]+", " ", line).rstrip() for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def neutral(text, work, home):
    """The actual output as the documents show it: their directory, HOME and host name."""
    text = text.replace(str(work), WORK_NAME).replace(str(home), "~")
    host = os.uname().nodename
    if host != DOC_HOST:
        text = re.sub(r"(?<![\w.-])%s(?![\w.-])" % re.escape(host), DOC_HOST, text)
    return text


def lines_match(expected, actual):
    """Equal line by line, where an expected line ``...`` stands for any number of lines."""
    memo = {}

    def match(i, j):
        if (i, j) not in memo:
            if i == len(expected):
                memo[i, j] = j == len(actual)
            elif expected[i] == "...":
                memo[i, j] = any(match(i + 1, k) for k in range(j, len(actual) + 1))
            else:
                memo[i, j] = j < len(actual) and expected[i] == actual[j] and match(i + 1, j + 1)
        return memo[i, j]

    return match(0, 0)


def apply_ids(text, ids):
    for documented, real in ids.items():
        text = re.sub(r"\b%s\b" % re.escape(documented), real, text)
    return text


def learn_ids(expected, actual, ids):
    """Pair the generated ids of the documented run with this run's, where the lines differ only there.
    Returns whether any new pair was learnt."""
    if len(expected) != len(actual) or "..." in expected:
        return False
    learnt = {}
    for e, a in zip(expected, actual):
        if e == a:
            continue
        et, at = re.split(r"(\w+)", e), re.split(r"(\w+)", a)
        if len(et) != len(at):
            return False
        for x, y in zip(et, at):
            if x == y:
                continue
            if not (GENERATED_ID.fullmatch(x) and GENERATED_ID.fullmatch(y)):
                return False
            if learnt.get(x, y) != y or x in ids or y in ids.values():
                return False
            learnt[x] = y
    ids.update(learnt)
    return bool(learnt)


# --- running a chain -----------------------------------------------------------------------------

@dataclasses.dataclass
class Outcome:
    block: Block
    command: Command
    ran: str  # the command as run (this run's ids)
    raw: str  # its output, made neutral
    expected: list  # normalised
    actual: list  # normalised
    ok: bool


def make_env(root):
    home, work, bindir = root / "home", root / "demo", root / "bin"
    for d in (home, work, bindir):
        d.mkdir(parents=True, exist_ok=True)
    shim = bindir / "queuectl"
    shim.write_text("#!/bin/sh\nexec %s \"$@\"\n" % " ".join(shlex.quote(a) for a in program()))
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("QUEUECTL_", "XDG_")) and k not in ("NO_COLOR", "FORCE_COLOR")}
    env.update(HOME=str(home), PATH=str(bindir) + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
               PYTHONUNBUFFERED="1",  # stdout and stderr in the order written, as on a terminal
               SHIV_ROOT=str(ROOT / "build" / "shiv-root"))  # a .pyz unpacks once, not in every HOME
    return home, work, env


def processes_of(home):
    """Pids of the processes that run with this HOME: what the chain started (supervisors, workers,
    jobs, webhook senders), since every one inherits it."""
    mark = b"HOME=" + str(home).encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            with open("/proc/%s/environ" % entry, "rb") as f:
                if mark in f.read().split(b"\0"):
                    pids.append(int(entry))
    return pids


def kill_processes_of(home):
    pids = processes_of(home)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not any(pid_exists(p) for p in pids), 10, message="processes of %s survived" % home)


COLUMNS, ROWS = 80, 24  # the terminal the examples are shown in


def run_in_terminal(command, cwd, env, timeout=120):
    """What ``bash -c command`` writes to an 80x24 terminal (stdout and stderr both; stdin is not
    a terminal, as in a script, so nothing waits for an answer)."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    import time

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.ONLCR  # "\n" as written, not "\r\n"
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    try:
        proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=dict(env, TERM="xterm", NO_COLOR="1"),
                                stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, start_new_session=True)
    finally:
        os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer has closed the terminal
                    data = b""
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break  # (a detached process may keep the terminal open: its output is not the command's)
            if time.monotonic() > deadline:
                raise AssertionError("%r ran for more than %ds" % (command, timeout))
    finally:
        os.close(master)
        with contextlib.suppress(OSError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return b"".join(chunks).decode("utf-8", "replace")


#: Commands that print tables: on a terminal no row of theirs may wrap.  (Log lines and one-line
#: error messages may be longer: the terminal wraps them, as any tool's.)
TABLES = re.compile(r"^queuectl (list|get|status|dlq list|worker status|config|schedule list|queue list|stats)\b")


def fits(raw, command="queuectl list"):
    """No row of a table is wider than the terminal (it would wrap)."""
    return not TABLES.match(command) or all(len(line) <= COLUMNS for line in raw.split("\n"))


def run_chain(chain, root):
    """Run every command of the chain in order; one Outcome per command."""
    home, work, env = make_env(root)
    ids, outcomes = {}, []
    try:
        for block in chain.blocks:
            for command in block.commands:
                ran = apply_ids(command.text, ids).replace("python3 queuectl.py", "queuectl")
                raw = neutral(run_in_terminal(ran, work, env), work, home)
                actual = normalise(raw)
                expected = normalise(apply_ids("\n".join(command.expected), ids))
                ok = lines_match(expected, actual) and fits(raw, ran)
                if not ok and learn_ids(expected, actual, ids):
                    expected = normalise(apply_ids("\n".join(command.expected), ids))
                    ok = lines_match(expected, actual)
                outcomes.append(Outcome(block, command, ran, raw, expected, actual, ok))
    finally:
        kill_processes_of(home)
    return outcomes


def report(outcome):
    rel = outcome.block.page.relative_to(ROOT)
    return "\n".join(
        ["%s:%d: $ %s" % (rel, outcome.command.line, outcome.ran)]
        + ([] if fits(outcome.raw, outcome.ran) else ["--- a row is wider than %d columns" % COLUMNS])
        + ["--- documented (normalised)"]
        + outcome.expected + ["--- actual (normalised)"] + outcome.actual + ["--- actual"]
        + outcome.raw.rstrip("\n").split("\n"))


# --- tests ---------------------------------------------------------------------------------------

def test_runnable_markers_are_well_formed():
    assert PROBLEMS == []


@pytest.mark.parametrize("chain", CHAINS, ids=[c.name for c in CHAINS])
def test_runnable_example(chain, tmp_path):
    failures = [report(o) for o in run_chain(chain, tmp_path) if not o.ok]
    if failures:
        pytest.fail("documented output differs from the program's:\n\n" + "\n\n".join(failures), pytrace=False)


def _first_console_block_after(heading):
    lines = (ROOT / "README.md").read_text(encoding="utf-8").split("\n")
    start = lines.index(heading)
    return next(i + 1 for i in range(start, len(lines)) if lines[i] == "```console")


def test_readme_set_up_and_quick_start_run_in_sequence():
    """The README's set-up command and quick start are runnable, and the quick start goes on in the
    set-up's HOME: the two run one after the other on a fresh machine, as a newcomer runs them."""
    set_up = _first_console_block_after("## Set up in two commands")
    quick = _first_console_block_after("## Quick start")
    readme = [c for c in CHAINS if c.blocks[0].page.name == "README.md"]
    chain = next((c for c in readme if c.blocks[0].line == set_up), None)
    assert chain is not None, "the set-up command is not marked runnable"
    assert quick in [b.line for b in chain.blocks], "the quick start is not a runnable continuation of the set-up"


def test_readme_shows_the_test_command_in_set_up():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Set up in two commands", 1)[1].split("\n## ", 1)[0]
    assert "```console\n$ ./build.sh test\n```" in section


def _slug(heading):
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def prose(page):
    """The page's lines outside fenced blocks."""
    lines = page.read_text(encoding="utf-8").split("\n")
    return [line for line, fenced in zip(lines, fence_flags(lines)) if not fenced]


def anchors_of(page):
    anchors, seen = set(), {}
    for line in prose(page):
        m = re.match(r"^#{1,6} (.*)", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else "%s-%d" % (slug, n))
    return anchors


def test_internal_links_resolve():
    """Every relative link and image in README.md and docs/*.md names a file that exists, and every
    #anchor a heading of that file."""
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", "\n".join(prose(page))):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append("%s: %s (no such file)" % (page.relative_to(ROOT), target))
            elif anchor and anchor not in anchors_of(dest):
                broken.append("%s: %s (no such heading)" % (page.relative_to(ROOT), target))
    assert broken == []


# --- printing what the blocks print now ----------------------------------------------------------

def main(argv):
    wanted = {Path(a).resolve() for a in argv}
    for chain in CHAINS:
        if wanted and chain.blocks[0].page not in wanted:
            continue
        with tempfile.TemporaryDirectory(prefix="queuectl-docs-") as root:
            for o in run_chain(chain, Path(root)):
                print("%s:%d: %s" % (o.block.page.relative_to(ROOT), o.command.line, "ok" if o.ok else "DIFFERS"))
                print("$ " + o.ran)
                print(o.raw, end="" if o.raw.endswith("\n") or not o.raw else "\n")
            print()
    for problem in PROBLEMS:
        print(problem, file=sys.stderr)
    return 1 if PROBLEMS else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
