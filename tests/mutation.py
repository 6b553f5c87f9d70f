#!/usr/bin/env python3
"""Mutation testing of queuectl with cosmic-ray: ``./build.sh mutate [AREA...]``.

Each *area* (tests/mutation.toml) names the functions and methods of one module
that it mutates and the fast test files that must catch the mutants.  For each
area this script:

1. copies the project into ``build/mutate/<area>-<shard>/`` (the work tree is
   never modified: cosmic-ray rewrites the module on disk for every mutant);
2. writes a cosmic-ray configuration there and runs ``cosmic-ray init``;
3. keeps only the mutants inside the area's functions, drops the operators
   the configuration excludes, and marks the equivalent mutants listed in
   tests/mutation.toml as skipped (with their reason);
4. runs the area's tests once on the unmutated code (they must pass);
5. runs ``cosmic-ray exec`` (one process per shard: ``--jobs N``);
6. prints per area: mutants, equivalent, killed, survived, the kill ratio
   killed / (mutants - equivalent), and every survivor with its diff.

``python3 tests/mutation.py --help`` for the options.  Linux, needs cosmic-ray
in the running interpreter (build.sh installs it into .venv).
"""

import argparse
import ast
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

try:
    import tomllib
except ImportError:  # Python < 3.11: cosmic-ray depends on the toml package
    tomllib = None
    import toml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "mutation.toml")
WORK = os.path.join(ROOT, "build", "mutate")
#: What a scratch copy of the project holds (the tests import queuectl from the copy,
#: and the end-to-end ones run the copy's queuectl.py).
COPY = ["queuectl.py", "queuectl_pg.py", "queuectl_web", "tests", "pyproject.toml"]


def load_config(path=CONFIG):
    with open(path, "rb") as f:
        data = f.read()
    return tomllib.loads(data.decode()) if tomllib else toml.loads(data.decode())


# --- which mutants belong to an area --------------------------------------------------


def definitions(source):
    """``[(qualname, first line, last line)]`` of every function and class of a module
    (decorators included), outermost first."""
    out = []

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                out.append((name, first, child.end_lineno))
                walk(child, name + ".")
            else:  # a def inside a with, if, loop...
                walk(child, prefix)

    walk(ast.parse(source), "")
    return out


def innermost(defs, line):
    """The qualname of the innermost definition holding ``line`` (None: module level)."""
    best = None
    for name, first, last in defs:
        if first <= line <= last and (best is None or first >= best[1]):
            best = (name, first, last)
    return best[0] if best else None


def in_area(qualname, area):
    """Is a mutant in ``qualname`` part of the area?  An entry names a function, a class
    (all of its methods) or a method (``Class.method``); ``exclude`` wins over ``include``."""
    if qualname is None:
        return False

    def hit(names):
        return any(qualname == n or qualname.startswith(n + ".") for n in names)

    return hit(area.get("include", [])) and not hit(area.get("exclude", []))


def equivalent_reason(mutant, equivalents):
    """The reason of the equivalence entry matching this mutant, or None.  An entry matches the
    mutants of its operator (a regular expression) on a line reading ``code`` in ``function`` (or,
    for a class, in any of its methods); with ``which``, only the which-th (from 0) such line of
    the function (for a line like ``break`` that appears more than once);
    with ``nth``, only the nth (from 0) of them on that line (left to right)."""
    for e in equivalents:
        if (in_area(mutant["function"], {"include": [e["function"]]}) and re.fullmatch(e["operator"], mutant["operator"])
                and e["code"].strip() == mutant["code"] and e.get("nth", mutant["nth"]) == mutant["nth"]):
            if e.get("which", mutant["which"]) != mutant["which"]:
                continue
            e["_matched"] = e.get("_matched", 0) + 1
            return e["reason"]
    return None


# --- running ----------------------------------------------------------------------------


def make_copy(dest):
    if os.path.exists(dest):
        shutil.rmtree(dest)
    os.makedirs(dest)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in COPY:
        src = os.path.join(ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, name), ignore=ignore)
        elif os.path.exists(src):
            shutil.copy2(src, os.path.join(dest, name))


def test_command(area, basetemp):
    return " ".join(shlex.quote(a) for a in [
        sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--basetemp=" + basetemp,
        "-o", "addopts="] + area["tests"] + area.get("pytest-args", []))


def cosmic_config(cfg, area, module, command, timeout):
    """The cosmic-ray configuration of one shard, as TOML text."""
    def q(s):
        return json.dumps(s)

    return "\n".join([
        "[cosmic-ray]",
        "module-path = %s" % q(module),
        "timeout = %s" % float(timeout),
        "excluded-modules = []",
        "test-command = %s" % q(command),
        "",
        "[cosmic-ray.distributor]",
        'name = "local"',
        "",
    ])


def scratch_tmp(name):
    """pytest's --basetemp for one shard: on tmpfs when there is one (the store tests
    create a database per test; on a disk, fsync dominates their run time)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else WORK
    return os.path.join(base, "queuectl-mutate-%d-%s" % (os.getpid(), name))


def clean_env():
    env = dict(os.environ)
    for var in ("QUEUECTL_CMD", "QUEUECTL_TEST_BACKEND", "QUEUECTL_DB", "PYTEST_ADDOPTS"):
        env.pop(var, None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a stale .pyc of a same-size mutant would hide it
    return env


_INIT = {}  # (module, source) -> a session with every mutant of that source, made once per run


def init_session(directory, module, source):
    """``cosmic-ray init`` of a module (10 s for queuectl.py), shared by the areas of a run."""
    key = (module, source)
    if key not in _INIT:
        path = os.path.join(WORK, "init-%d-%d.sqlite" % (os.getpid(), len(_INIT)))
        config = os.path.join(directory, "cosmic-ray.toml")
        with open(config, "w") as f:
            f.write(cosmic_config(None, None, module, "true", 60))
        subprocess.run([sys.executable, "-m", "cosmic_ray.cli", "init", config, path], cwd=directory, check=True,
                       env=clean_env())
        _INIT[key] = path
    return _INIT[key]


def prepare(cfg, name, jobs, only=None):
    """Copy, init and filter the shards of one area; returns their directories and
    the area's mutant list (dicts)."""
    area = cfg["areas"][name]
    module = area["module"]
    equivalents = cfg.get("equivalent", [])
    exclude_ops = [re.compile(p) for p in cfg.get("exclude-operators", [])]
    dirs = []
    first = os.path.join(WORK, "%s-0" % name)
    make_copy(first)
    with open(os.path.join(first, module), encoding="utf-8") as f:
        source = f.read()
    lines = source.splitlines()
    defs = definitions(source)
    session = os.path.join(first, "session.sqlite")
    shutil.copy(init_session(first, module, source), session)
    conn = sqlite3.connect(session)
    rows = conn.execute("SELECT job_id, operator_name, occurrence, start_pos_row, start_pos_col, end_pos_row "
                        "FROM mutation_specs ORDER BY start_pos_row, start_pos_col, operator_name, occurrence").fetchall()
    keep, drop, mutants, seen = [], [], [], {}
    for job_id, op, occ, line, col, end_line in rows:
        qualname = innermost(defs, line)
        if (not in_area(qualname, area) or any(p.search(op) for p in exclude_ops)
                or (only and not in_area(qualname, {"include": only}))):
            drop.append(job_id)
            continue
        m = {"job_id": job_id, "operator": op, "line": line, "col": col, "function": qualname,
             "code": lines[line - 1].strip()}
        same = (qualname, op, line)
        m["nth"] = seen[same] = seen.get(same, -1) + 1  # rows come left to right
        twin = (qualname, op, m["code"], m["nth"])  # the same code on several lines: top to bottom
        m["which"] = seen[twin] = seen.get(twin, -1) + 1
        m["equivalent"] = equivalent_reason(m, equivalents)
        mutants.append(m)
        keep.append(job_id)
    with conn:
        conn.executemany("DELETE FROM mutation_specs WHERE job_id = ?", [(j,) for j in drop])
        conn.executemany("DELETE FROM work_items WHERE job_id = ?", [(j,) for j in drop])
        for m in mutants:
            if m["equivalent"]:
                conn.execute("INSERT INTO work_results (worker_outcome, output, test_outcome, diff, job_id) "
                             "VALUES ('skipped', ?, NULL, NULL, ?)", ("equivalent: " + m["equivalent"], m["job_id"]))
    conn.close()
    todo = [m for m in mutants if not m["equivalent"]]
    # shards: each its own copy and session holding every jobs-th mutant
    template = os.path.join(WORK, "%s.sqlite" % name)
    shutil.copy(session, template)
    for i in range(jobs):
        d = os.path.join(WORK, "%s-%d" % (name, i))
        if i:
            make_copy(d)
        shutil.copy(template, os.path.join(d, "session.sqlite"))
        mine = {m["job_id"] for n, m in enumerate(todo) if n % jobs == i}
        conn = sqlite3.connect(os.path.join(d, "session.sqlite"))
        with conn:
            others = [(m["job_id"],) for m in todo if m["job_id"] not in mine]
            conn.executemany("DELETE FROM mutation_specs WHERE job_id = ?", others)
            conn.executemany("DELETE FROM work_items WHERE job_id = ?", others)
            if i:  # the equivalent ones are counted once, in shard 0
                eq = [(m["job_id"],) for m in mutants if m["equivalent"]]
                conn.executemany("DELETE FROM work_results WHERE job_id = ?", eq)
                conn.executemany("DELETE FROM mutation_specs WHERE job_id = ?", eq)
                conn.executemany("DELETE FROM work_items WHERE job_id = ?", eq)
        conn.close()
        dirs.append(d)
    os.unlink(template)
    return dirs, mutants


def baseline(cfg, name, directory):
    """Run the area's tests on the unmutated copy; returns the seconds they took."""
    area = cfg["areas"][name]
    tmp = scratch_tmp(name + "-baseline")
    command = test_command(area, tmp)
    start = time.monotonic()
    proc = subprocess.run(shlex.split(command), cwd=directory, env=clean_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    took = time.monotonic() - start
    shutil.rmtree(tmp, ignore_errors=True)
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout.decode("utf-8", "replace")[-4000:])
        raise SystemExit("mutation: the %s area's tests fail on the unmutated code (%s); fix them first"
                         % (name, command))
    return took


def execute(cfg, name, dirs, timeout):
    area = cfg["areas"][name]
    procs = []
    for i, d in enumerate(dirs):
        tmp = scratch_tmp("%s-%d" % (name, i))
        with open(os.path.join(d, "cosmic-ray.toml"), "w") as f:
            f.write(cosmic_config(cfg, area, area["module"], test_command(area, tmp), timeout))
        log = open(os.path.join(d, "exec.log"), "wb")
        procs.append((subprocess.Popen([sys.executable, "-m", "cosmic_ray.cli", "exec", "cosmic-ray.toml",
                                        "session.sqlite"], cwd=d, env=clean_env(), stdout=log,
                                       stderr=subprocess.STDOUT), tmp, log))
    failed = False
    try:
        for proc, tmp, log in procs:
            failed |= proc.wait() != 0
    finally:  # interrupted (Ctrl-C, SIGTERM): stop the shards too
        for proc, tmp, log in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
            log.close()
            shutil.rmtree(tmp, ignore_errors=True)
    if failed:
        raise SystemExit("mutation: cosmic-ray exec failed for the %s area (see %s/*/exec.log)" % (name, WORK))


# --- the report ---------------------------------------------------------------------------


def results(dirs):
    """{job_id: (test_outcome, worker_outcome, output, diff)} over every shard of an area."""
    out = {}
    for d in dirs:
        conn = sqlite3.connect(os.path.join(d, "session.sqlite"))
        for job_id, worker, test, output, diff in conn.execute(
                "SELECT job_id, worker_outcome, test_outcome, output, diff FROM work_results"):
            out[job_id] = ((test or "").lower(), (worker or "").lower(), output, diff)
        conn.close()
    return out


def short_diff(diff):
    return [line for line in (diff or "").splitlines()
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def report(name, mutants, res, seconds, out):
    killed, survived, equivalent, other = [], [], [], []
    for m in mutants:
        test, worker, output, diff = res.get(m["job_id"], (None, None, None, None))
        m["diff"] = diff
        if m["equivalent"]:
            equivalent.append(m)
        elif test == "survived":
            survived.append(m)
        elif test in ("killed", "incompetent"):
            killed.append(m)
        else:
            other.append(m)
    judged = len(mutants) - len(equivalent)
    ratio = 100.0 * len(killed) / judged if judged else 100.0
    out("== %s: %d mutants, %d equivalent, %d killed, %d survived%s; kill ratio %.1f%% (%s)" % (
        name, len(mutants), len(equivalent), len(killed), len(survived),
        ", %d not run" % len(other) if other else "", ratio, "%dm%02ds" % divmod(int(seconds), 60)))
    for m in survived:
        out("  survived: %s:%d %s %s (nth %d)" % (m["module"], m["line"], m["function"], m["operator"], m["nth"]))
        for line in short_diff(m["diff"]):
            out("      " + line[0] + " " + line[1:].strip())
    for m in other:
        out("  not run: %s:%d %s %s" % (m["module"], m["line"], m["function"], m["operator"]))
    return {"area": name, "mutants": len(mutants), "equivalent": len(equivalent), "killed": len(killed),
            "survived": len(survived), "not_run": len(other), "ratio": ratio, "seconds": seconds}


def main(argv=None):
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # runs the cleanups
    cfg = load_config()
    parser = argparse.ArgumentParser(prog="./build.sh mutate", description=(
        "Mutation testing with cosmic-ray over the areas of tests/mutation.toml; prints the kill "
        "ratio and every surviving mutant."))
    parser.add_argument("areas", nargs="*", metavar="AREA",
                        help="areas to run (default: every area): %s" % ", ".join(cfg["areas"]))
    parser.add_argument("-j", "--jobs", type=int, default=2, help="parallel cosmic-ray processes per area (default 2)")
    parser.add_argument("--list", action="store_true", help="list the areas and their mutant counts, run nothing")
    parser.add_argument("--report", action="store_true", help="print the report of the last run of these areas again")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="only the mutants in this function, class or method (e.g. SqliteStore._pick); repeatable")
    args = parser.parse_args(argv)
    unknown = [a for a in args.areas if a not in cfg["areas"]]
    if unknown:
        parser.error("unknown area %s (known: %s)" % (", ".join(unknown), ", ".join(cfg["areas"])))
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    areas = args.areas or list(cfg["areas"])
    os.makedirs(WORK, exist_ok=True)
    report_path = os.path.join(WORK, "report.txt")
    lines = []

    def out(text):
        print(text, flush=True)
        lines.append(text)

    summaries = []
    started = time.monotonic()
    for name in areas:
        area = cfg["areas"][name]
        t0 = time.monotonic()
        if args.report:
            with open(os.path.join(WORK, "%s.json" % name)) as f:
                last = json.load(f)
            summaries.append(report(name, last["mutants"], results(last["dirs"]), 0, out))
            continue
        dirs, mutants = prepare(cfg, name, 1 if args.list else args.jobs, args.only)
        for m in mutants:
            m["module"] = area["module"]
        with open(os.path.join(WORK, "%s.json" % name), "w") as f:
            json.dump({"dirs": dirs, "mutants": mutants}, f)
        todo = sum(1 for m in mutants if not m["equivalent"])
        if args.list:
            out("%-10s %-28s %4d mutants (%d equivalent) tests: %s" % (
                name, area["module"], len(mutants), len(mutants) - todo, " ".join(area["tests"])))
            continue
        took = baseline(cfg, name, dirs[0])
        timeout = max(20.0, 3 * took + 10)
        print("-- %s: %d mutants to run (%d equivalent), tests take %.1fs unmutated, %d process(es)" % (
            name, todo, len(mutants) - todo, took, len(dirs)), flush=True)
        execute(cfg, name, dirs, timeout)
        summaries.append(report(name, mutants, results(dirs), time.monotonic() - t0, out))
    for path in _INIT.values():
        os.unlink(path)
    stale = [e for e in cfg.get("equivalent", []) if not e.get("_matched") and not args.only and not args.report
             and any(in_area(e["function"], cfg["areas"][a]) for a in areas)]
    for e in stale:
        out("  stale equivalent entry (matches no mutant; the code changed?): %s %s %r" % (
            e["function"], e["operator"], e["code"]))
    if summaries:
        killed = sum(s["killed"] for s in summaries)
        judged = sum(s["mutants"] - s["equivalent"] for s in summaries)
        out("== total: %d mutants, %d equivalent, %d killed, %d survived; kill ratio %.1f%% in %dm%02ds" % (
            sum(s["mutants"] for s in summaries), sum(s["equivalent"] for s in summaries), killed,
            sum(s["survived"] for s in summaries), 100.0 * killed / judged if judged else 100.0,
            *divmod(int(time.monotonic() - started), 60)))
        with open(report_path, "w") as f:
            f.write("\n".join(lines) + "\n")
        print("(report: %s)" % os.path.relpath(report_path, os.getcwd()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
