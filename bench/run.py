#!/usr/bin/env python3
"""queuectl benchmarks: `./build.sh bench` (quick, a few minutes) or `./build.sh bench --full`.

Measures, in one run on one machine, the anchors (what the machine does with no
queue: starting `sh -c true`, SQLite commits and batched inserts, a minimal
Python script that commits one row) and queuectl's figures for the six goals
of the performance issue, side by side with the peers (Huey on SQLite,
task-spooler, nq, RQ on the local Redis), which the benchmark installs into its
own environment.  Prints Markdown tables with medians, p99s and ratios, and
keeps the run under bench/results/<UTC time>-<quick|full>/ (report.md and
results.json).

Options: --full, --only SECTION[,SECTION] (anchors, pickup, drain, bulk,
scale, memory, peers), --no-peers.
"""

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import goals  # noqa: E402
import systems  # noqa: E402
from lib import (ROOT, load_average, machine_info, md_table, mib, ms, rate, ratio, us, verdict)  # noqa: E402

PROFILES = {
    "quick": {
        "latency_samples": 40, "spawn_n": 1000, "sh_loop_n": 1000, "commit_n": 2000, "batch_n": 200000,
        "pickup_samples": 40, "pickup_cli_samples": 15, "pickup_poll_samples": 8, "idle_seconds": 10, "drain_n": 1000, "drain_reps": 2, "drain_sleep_n": 200,
        "bulk_cli_n": 20000, "bulk_api_n": 20000, "startup_runs": 15,
        "scale_sizes": (10000, 100000), "scale_runs": 40, "memory_n": 5000,
        "peer_n": 200, "peer_pickup": 10, "peer_workers": (1, 2, 4), "peer_cli_enqueue_n": 20,
        "peer_cli_workers": (1,),
    },
    "full": {
        "latency_samples": 200, "spawn_n": 3000, "sh_loop_n": 3000, "commit_n": 10000, "batch_n": 1000000,
        "pickup_samples": 200, "pickup_cli_samples": 50, "pickup_poll_samples": 30, "idle_seconds": 60, "drain_n": 3000, "drain_reps": 3, "drain_sleep_n": 500,
        "bulk_cli_n": 100000, "bulk_api_n": 100000, "startup_runs": 40,
        "scale_sizes": (10000, 1000000), "scale_runs": 200, "memory_n": 100000,
        "peer_n": 1000, "peer_pickup": 50, "peer_workers": (1, 2, 4), "peer_cli_enqueue_n": 100,
        "peer_cli_workers": (1, 2, 4),
    },
}

SECTIONS = ("anchors", "pickup", "drain", "bulk", "scale", "memory", "peers")


def log(msg):
    sys.stderr.write("[bench %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


class Report:
    def __init__(self):
        self.parts = []

    def h(self, text):
        self.parts.append("\n### %s\n" % text)
        print("\n### %s\n" % text, flush=True)

    def p(self, text):
        self.parts.append(text + "\n")
        print(text, flush=True)

    def table(self, headers, rows):
        t = md_table(headers, rows)
        self.parts.append(t + "\n")
        print(t, flush=True)

    def text(self):
        return "\n".join(self.parts)


def med(values):
    v = sorted(values)
    return v[len(v) // 2] if v else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="the complete run (1,000,000-job scale test, ...)")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections: " + ", ".join(SECTIONS))
    ap.add_argument("--no-peers", action="store_true", help="skip the peers")
    args = ap.parse_args(argv)
    profile = "full" if args.full else "quick"
    P = PROFILES[profile]
    only = set(s.strip() for s in args.only.split(",") if s.strip())
    if args.no_peers:
        only.discard("peers")
    unknown = only - set(SECTIONS)
    if unknown:
        ap.error("unknown section(s): %s" % ", ".join(sorted(unknown)))

    started = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    outdir = ROOT / "bench" / "results" / ("%s-%s" % (stamp, profile))
    outdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="queuectl-bench-", dir=str(outdir)))
    R = Report()
    res = {"profile": profile, "machine": machine_info(), "params": P, "started": stamp,
           "load_before": load_average()}
    m = res["machine"]
    R.p("## queuectl benchmark (%s run, %s)\n" % (profile, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))))
    R.p("Machine: %s cores (nproc), %s, %s RAM, Linux %s, %s; Python %s; SQLite %s; %s. Load average at start: %s."
        % (m["nproc"], m["cpu"], m["memory"], m["kernel"], m["os"], m["python"], m["sqlite"], m["filesystem"],
           " ".join("%.2f" % x for x in res["load_before"])))
    failures = []

    def section(name, fn):
        if name not in only:
            return None
        log("%s ..." % name)
        t0 = time.monotonic()
        try:
            out = fn()
            res.setdefault("section_seconds", {})[name] = round(time.monotonic() - t0, 1)
            return out
        except Exception as e:  # keep going: one broken section must not hide the others
            failures.append((name, "%s: %s" % (type(e).__name__, e)))
            res.setdefault("errors", {})[name] = traceback.format_exc()
            log("%s FAILED: %s" % (name, e))
            traceback.print_exc()
            return None

    # ---------------------------------------------------------------- anchors
    A = {}

    def anchors():
        A["spawn_latency"] = goals.anchor_spawn_latency(work, P["latency_samples"])
        A["spawn_rate_1"] = goals.anchor_spawn_rate(P["spawn_n"], 1)
        A["spawn_rate_2"] = goals.anchor_spawn_rate(2 * P["spawn_n"], 2)
        A["sh_loop_rate"] = goals.anchor_sh_loop_rate(P["sh_loop_n"])
        A["commit_full"] = goals.anchor_commit_rate(work, "FULL", P["commit_n"])
        A["commit_normal"] = goals.anchor_commit_rate(work, "NORMAL", P["commit_n"])
        A["batch_insert"] = goals.anchor_batch_insert_rate(work, P["batch_n"])
        A["schema_insert"] = goals.anchor_schema_insert_rate(work, min(P["batch_n"], 100000))
        return A

    section("anchors", anchors)
    res["anchors"] = A
    if A:
        R.h("Anchors: the machine without a queue")
        R.table(["anchor", "figure"], [
            ["start `sh -c 'echo N > fifo'` with Popen, to the token arriving (p50 / p99)",
             "%s / %s" % (ms(A["spawn_latency"]["p50"], 2), ms(A["spawn_latency"]["p99"], 2))],
            ["`sh -c true` run and waited for by 1 Python process (subprocess.run)", rate(A["spawn_rate_1"])],
            ["... by 2 Python processes at once", rate(A["spawn_rate_2"])],
            ["... from a dash loop (fork+exec from a tiny process)", rate(A["sh_loop_rate"])],
            ["SQLite single-row commits, WAL, synchronous=FULL", rate(A["commit_full"])],
            ["SQLite single-row commits, WAL, synchronous=NORMAL", rate(A["commit_normal"])],
            ["SQLite batched insert, 1,000-row transactions, synchronous=FULL", rate(A["batch_insert"])],
            ["... the same into queuectl's jobs table (its indexes and counting trigger), no Python work",
             rate(A["schema_insert"])],
        ])

    # ---------------------------------------------------------------- goal 1
    G1 = {}

    def pickup():
        # enqueue by a Python call, by a `queuectl enqueue` process, and without the wake-up
        for key, mode, samples, gap in (("api", "api", "pickup_samples", 0.05),
                                        ("cli", "cli", "pickup_cli_samples", 0.05),
                                        ("poll", "nowake", "pickup_poll_samples", 0.3)):
            q = systems.Queuectl(work / ("pickup-" + key), mode)
            q.setup()
            try:
                q.start_workers(1)
                G1[key] = goals.pickup(q, 1, P[samples], work, idle_gap=gap)
            finally:
                q.teardown()
        G1["idle"] = goals.idle_cpu(work, 2, P["idle_seconds"])
        return G1

    section("pickup", pickup)
    res["goal1"] = G1
    if G1:
        R.h("Goal 1: pickup latency (idle worker woken by the enqueue) and idle CPU")
        base = A.get("spawn_latency")
        rows = []
        for key, label in (("api", "Python call (store.enqueue + wake)"), ("cli", "`queuectl enqueue -- CMD` process"),
                           ("poll", "Python call without the wake-up: the 1 s fallback poll finds it")):
            if key not in G1:
                continue
            s = G1[key]["after_return"]
            c = G1[key]["after_call"]
            over50 = s["p50"] - base["p50"] if base else None
            over99 = s["p99"] - base["p99"] if base else None
            rows.append([label, G1[key]["after_return"]["n"], "%s / %s" % (ms(s["p50"], 2), ms(s["p99"], 2)),
                         "%s / %s" % (ms(c["p50"], 2), ms(c["p99"], 2)),
                         "%s / %s" % (ms(over50, 2), ms(over99, 2)),
                         "- (design check)" if key == "poll" else
                         verdict(None if base is None else over50 <= 0.005 and over99 <= 0.025)])
        R.table(["enqueue by", "samples", "start after enqueue returned p50 / p99",
                 "start after enqueue called p50 / p99", "above process start p50 / p99 (goal <= 5 / 25 ms)",
                 "goal"], rows)
        idle = G1.get("idle")
        if idle:
            R.p("")
            R.table(["idle process (2 workers, %.0f s)" % idle["seconds"], "CPU, % of one core", "goal (< 1%)"], [
                ["busiest worker", "%.2f%%" % idle["worker_pct"], verdict(idle["worker_pct"] < 1.0)],
                ["supervisor", "%.2f%%" % idle["supervisor_pct"], "-"],
            ])

    # ---------------------------------------------------------------- goal 2
    G2 = {}

    def drain():
        for w in (1, 2):
            runs = []
            for rep in range(P["drain_reps"]):
                q = systems.Queuectl(work / ("drain-%d-%d" % (w, rep)), "bulk")
                q.setup()
                try:
                    runs.append(goals.drain(q, w, P["drain_n"], q.dir))
                finally:
                    q.teardown()
            G2[w] = {"rates": [r["drain_rate"] for r in runs], "rate": med([r["drain_rate"] for r in runs])}
        # the same with jobs that take 20 ms: where the single writer stops being the bottleneck
        for w in (1, 2):
            q = systems.Queuectl(work / ("drain-sleep-%d" % w), "bulk")
            q.setup()
            try:
                G2["sleep%d" % w] = goals.drain(q, w, P["drain_sleep_n"], q.dir, command="sleep 0.02")["drain_rate"]
            finally:
                q.teardown()
        return G2

    section("drain", drain)
    res["goal2"] = G2
    if G2:
        R.h("Goal 2: drain throughput of `true` jobs (%d jobs, median of %d runs)" % (P["drain_n"], P["drain_reps"]))
        rows = []
        for w in (1, 2):
            if w not in G2:
                continue
            raw = A.get("spawn_rate_%d" % w)
            rat = G2[w]["rate"] / raw if raw else None
            rows.append(["%d worker%s" % (w, "s" if w > 1 else ""), rate(G2[w]["rate"]),
                         ", ".join(rate(x) for x in G2[w]["rates"]), rate(raw), ratio(rat),
                         verdict(None if rat is None else rat >= 0.8), rate(A.get("commit_full"))])
        R.table(["workers", "drain (median)", "runs", "raw `sh -c true` rate, same parallelism",
                 "ratio (goal >= 0.80x)", "goal", "durable commits/s (1 per job: a ceiling for all workers)"], rows)
        if 1 in G2 and 2 in G2:
            sc = G2[2]["rate"] / G2[1]["rate"]
            R.p("\n2 workers / 1 worker: %s (goal >= 1.60x on 2 cores): %s; the raw anchor itself scales %s."
                % (ratio(sc), verdict(sc >= 1.6),
                   ratio(A["spawn_rate_2"] / A["spawn_rate_1"]) if "spawn_rate_2" in A else "-"))
        if "sleep1" in G2 and "sleep2" in G2:
            R.p("With jobs that take 20 ms (`sleep 0.02`, %d jobs): 1 worker %s, 2 workers %s: %s."
                % (P["drain_sleep_n"], rate(G2["sleep1"]), rate(G2["sleep2"]), ratio(G2["sleep2"] / G2["sleep1"])))

    # ---------------------------------------------------------------- goal 3
    G3 = {}

    def bulk():
        batch = A.get("batch_insert") or goals.anchor_batch_insert_rate(work, P["batch_n"])
        A.setdefault("batch_insert", batch)
        G3["bulk"] = goals.bulk_enqueue(work, P["bulk_cli_n"], P["bulk_api_n"], batch)
        G3["startup"] = goals.cli_startup(work, P["startup_runs"])
        return G3

    section("bulk", bulk)
    res["goal3"] = G3
    if G3:
        b = G3["bulk"]
        R.h("Goal 3: bulk enqueue and the cost of one `enqueue`")
        floor = A.get("schema_insert")
        R.table(["path", "jobs", "rate", "vs raw batched insert (goal >= 0.20x)", "vs the same insert into "
                 "queuectl's schema", "goal"], [
            ["`queuectl enqueue -` (JSON Lines on stdin, one process, one transaction)", b["n_cli"],
             rate(b["cli_rate"]), ratio(b["cli_ratio"]), ratio(b["cli_rate"] / floor) if floor else "-",
             verdict(b["cli_ratio"] >= 0.2)],
            ["Python call: validate_job + SqliteStore.enqueue, 1,000-job batches", b["n_api"], rate(b["api_rate"]),
             ratio(b["api_ratio"]), ratio(b["api_rate"] / floor) if floor else "-", verdict(b["api_ratio"] >= 0.2)],
            ["... SqliteStore.enqueue alone (jobs validated beforehand)", b["n_api"], rate(b["store_rate"]),
             ratio(b["store_rate"] / A["batch_insert"]), ratio(b["store_rate"] / floor) if floor else "-", "-"],
        ])
        s = G3["startup"]
        anchor = s["min_script"]

        def line(label, key, goal=True):
            wall, cpu = s[key]
            rw, rc = wall / anchor[0], cpu / anchor[1]
            return [label, ms(wall), ratio(rw), ms(cpu), ratio(rc), verdict(rw <= 1.5) if goal else "-"]

        rows = [line("`python3 -c pass`", "python_bare", False),
                line("minimal script that commits one row (the anchor)", "min_script", False)]
        if "installed" in s:
            rows.append(line("`queuectl enqueue -- true`, installed (console script, bytecode cached)", "installed"))
        rows.append(line("`python3 queuectl.py enqueue -- true` (source file; compiling its %d KB takes %s)"
                         % (s["source_bytes"] // 1024, ms(s["compile"])), "source"))
        if "pyz" in s:
            rows.append(line("`python3 queuectl.pyz enqueue -- true`", "pyz"))
        R.p("")
        R.table(["one invocation (median of %d)" % s["runs"], "wall", "vs anchor (goal <= 1.50x)", "CPU (user+sys)",
                 "CPU vs anchor", "goal"], rows)
        if "pyz" in s:
            d = s["pyz"][0] - s["source"][0]
            R.p("\n.pyz against the source file: %+.1f ms wall, %+.1f ms CPU (goal <= +25 ms): %s."
                % (d * 1000, (s["pyz"][1] - s["source"][1]) * 1000, verdict(d <= 0.025)))
        elif "pyz_error" in s:
            R.p("\n.pyz: could not be built: %s" % s["pyz_error"])
        R.p("`import queuectl` alone (bytecode cached): %s wall, %s CPU above `python3 -c pass`."
            % (ms(s["import"][0]), ms(s["import"][1])))

    # ---------------------------------------------------------------- goal 4
    G4 = {}

    def scale():
        G4.update(goals.scale(work, P["scale_sizes"], P["scale_runs"]))
        return G4

    section("scale", scale)
    res["goal4"] = {str(k): v for k, v in G4.items()}
    if len(G4) == 2:
        small, big = sorted(G4)
        S, B = G4[small], G4[big]
        R.h("Goal 4: cost at %s jobs against %s jobs (mostly finished)" % (format(big, ","), format(small, ",")))
        rows = []
        for key, label in (("claim_stmt", "claim statement (UPDATE ... RETURNING, in a transaction)"),
                           ("claim_txn", "claim, whole durable transaction"),
                           ("status", "`status` (in process)"), ("status --json", "`status --json` (in process)"),
                           ("list --limit 50", "`list --limit 50` (in process)"),
                           ("list --state completed --limit 50", "`list --state completed --limit 50`"),
                           ("api_status", "dashboard `GET /api/status`")):
            if S.get(key) is None or B.get(key) is None:
                rows.append([label, "-", "-", "-", S.get(key + "_why") or B.get(key + "_why") or "n/a"])
                continue
            r = B[key]["p50"] / S[key]["p50"]
            f = us if S[key]["p50"] < 0.001 else (lambda x: ms(x, 2))
            rows.append([label, "%s / %s" % (f(S[key]["p50"]), f(S[key]["p99"])),
                         "%s / %s" % (f(B[key]["p50"]), f(B[key]["p99"])), ratio(r), verdict(r <= 2.0)])
        R.table(["operation (p50 / p99)", "%s jobs" % format(small, ","), "%s jobs" % format(big, ","),
                 "ratio of medians (goal <= 2x)", "goal"], rows)
        R.p("")
        prow = []
        for name, plan in B["plans"].items():
            prow.append([name, "; ".join(plan["plan"]), verdict(None if plan["full_scan"] is None else not plan["full_scan"])])
        R.table(["query", "plan at %s jobs" % format(big, ","), "no full scan"], prow)
        R.p("\nDatabase size: %s for %s jobs, %.0f bytes per finished job (with its attempt record and a short "
            "output); retention setting present: %s." % (mib(B["db_bytes"]), format(big, ","), B["bytes_per_job"],
                                                          "yes (`config set retention`)" if "retention" in
                                                          systems.queuectl.DEFAULTS else "no"))

    # ---------------------------------------------------------------- goal 5
    G5 = {}

    def memory():
        G5.update(goals.memory(work, P["memory_n"]))
        return G5

    section("memory", memory)
    res["goal5"] = G5
    if G5:
        # the reference: once the allocator and SQLite's page cache (2 MiB) have met the
        # big outputs and a large database, i.e. after 10% of the jobs or 2,000 jobs
        ref_at = max(G5["n"] // 10, min(2000, G5["n"] // 2))
        at10 = [r for d, r in G5["samples"] if d >= ref_at]
        ref = at10[0] if at10 else G5["warm_rss"]
        G5["ref_at"], G5["ref_rss"] = ref_at, ref
        growth = (G5["end_rss"] - ref) / ref
        G5["growth_after_10pct"] = growth
        R.h("Goal 5: worker memory over %s jobs printing 0 B to 3 MB" % format(G5["n"], ","))
        R.table(["at start (idle)", "after %s jobs" % format(ref_at, ","), "at the end", "peak (VmHWM)",
                 "growth since",
                 "flat (goal: < 5% growth)", "drain rate", "database"], [[
                     mib(G5["start_rss"]), mib(ref), mib(G5["end_rss"]), mib(G5["peak_rss"]),
                     "%+.1f%%" % (100 * growth), verdict(growth < 0.05), rate(G5["rate"]), mib(G5["db_bytes"])]])
        if G5.get("start_anon") and G5.get("end_anon"):
            R.p("\nOf the resident memory, the process's own (anonymous) pages: %s at start, %s at the end; the rest is "
                "shared libraries and SQLite's mapped WAL index." % (mib(G5["start_anon"]), mib(G5["end_anon"])))

    # ---------------------------------------------------------------- goal 6
    G6 = {"rows": [], "unavailable": [], "notes": []}

    def peers():
        ok, why = systems.ensure_peer_venv(log)
        candidates = []
        candidates.append(("queuectl", lambda d: systems.Queuectl(d, "api")))
        if ok:
            candidates.append(("huey", lambda d: systems.Huey(d)))
            candidates.append(("rq", lambda d: systems.RQ(d)))
        else:
            G6["unavailable"].append(("Huey (SqliteHuey)", why))
            G6["unavailable"].append(("RQ (local Redis)", why))
        t_ok, t_why = systems.ensure_apt("tsp", "task-spooler", log)
        if t_ok:
            candidates.append(("tsp", lambda d: systems.TaskSpooler(d)))
        else:
            G6["unavailable"].append(("task-spooler (tsp)", t_why))
        n_ok, n_why = systems.ensure_apt("nq", "nq", log)
        if n_ok:
            candidates.append(("nq", lambda d: systems.Nq(d)))
        else:
            G6["unavailable"].append(("nq", n_why))
        for key, make in candidates:
            for w in P["peer_workers"]:
                if key == "nq" and w != 1:
                    continue
                d = work / ("peer-%s-%d" % (key, w))
                sysm = make(d)
                try:
                    if not sysm.setup():
                        G6["unavailable"].append((sysm.name, sysm.why))
                        break
                    note = "%s: %s" % (sysm.name, sysm.notes)
                    if sysm.notes and note not in G6["notes"]:
                        G6["notes"].append(note)
                    log("peers: %s, %d worker(s)" % (sysm.name, w))
                    dr = goals.drain(sysm, w, P["peer_n"], d)
                    sysm.start_workers(w)
                    try:
                        pk = goals.pickup(sysm, w, P["peer_pickup"], d)
                    finally:
                        sysm.stop_workers()
                    G6["rows"].append({"system": sysm.name, "key": key, "workers": w, "enqueue_rate": dr["enqueue_rate"],
                                       "drain_rate": dr["drain_rate"], "pickup": pk, "jobs": dr["jobs"]})
                except Exception as e:
                    G6["rows"].append({"system": sysm.name, "key": key, "workers": w, "error": "%s: %s" % (
                        type(e).__name__, str(e)[:200])})
                    log("peers: %s failed: %s" % (sysm.name, e))
                    traceback.print_exc()
                finally:
                    with contextlib.suppress(Exception):
                        sysm.teardown()
            if key == "queuectl":  # the CLI, a process per job: enqueue rate and pickup with 1 worker
                d = work / "peer-queuectl-cli"
                q = systems.Queuectl(d, "cli")
                q.setup()
                try:
                    t0 = time.perf_counter()
                    for _ in range(P["peer_cli_enqueue_n"]):
                        q.enqueue("true")
                    er = P["peer_cli_enqueue_n"] / (time.perf_counter() - t0)
                    for w in P["peer_cli_workers"]:
                        q.start_workers(w)
                        try:
                            pk = goals.pickup(q, w, P["peer_pickup"], d)
                        finally:
                            q.stop_workers()
                        G6["rows"].append({"system": q.name, "key": "queuectl-cli", "workers": w, "enqueue_rate": er,
                                           "drain_rate": None, "pickup": pk})
                finally:
                    q.teardown()
        return G6

    section("peers", peers)
    res["goal6"] = G6
    if G6["rows"] or G6["unavailable"]:
        R.h("Goal 6: against the peers (%d `true` jobs per drain, %d pickup samples, same machine, same run)"
            % (P["peer_n"], P["peer_pickup"]))
        rows = []
        for r in G6["rows"]:
            if "error" in r:
                rows.append([r["system"], r["workers"], "failed: " + r["error"], "", "", "", ""])
                continue
            raw = A.get("spawn_rate_%d" % min(r["workers"], 2))
            pr, pc = r["pickup"]["after_return"], r["pickup"]["after_call"]
            rows.append([r["system"], r["workers"], rate(r["enqueue_rate"]),
                         "(same workers as the row above)" if r["drain_rate"] is None else rate(r["drain_rate"]) + (
                             "" if r.get("jobs", P["peer_n"]) == P["peer_n"] else " (%d jobs)" % r["jobs"]),
                         "-" if r["drain_rate"] is None or not raw else ratio(r["drain_rate"] / raw),
                         "%s / %s" % (ms(pr["p50"], 2), ms(pr["p99"], 2)),
                         "%s / %s" % (ms(pc["p50"], 2), ms(pc["p99"], 2))])
        for name, why in G6["unavailable"]:
            rows.append([name, "-", "not available: %s" % why, "", "", "", ""])
        R.table(["system", "workers", "enqueue, one job per call", "drain", "drain vs raw spawn rate",
                 "pickup after enqueue returned p50 / p99", "pickup after enqueue called p50 / p99"], rows)
        # who is ahead, per worker count
        R.p("")
        verdicts = []
        mine = {r["workers"]: r for r in G6["rows"] if r.get("key") == "queuectl" and "error" not in r}
        for r in G6["rows"]:
            if r.get("key") in ("queuectl", "queuectl-cli") or "error" in r or r["workers"] not in mine:
                continue
            q = mine[r["workers"]]
            d_ok = q["drain_rate"] >= r["drain_rate"]
            p_ok = q["pickup"]["after_call"]["p50"] <= r["pickup"]["after_call"]["p50"]
            verdicts.append([r["system"], r["workers"], ratio(q["drain_rate"] / r["drain_rate"]),
                             ratio(r["pickup"]["after_call"]["p50"] / q["pickup"]["after_call"]["p50"]),
                             "ahead" if d_ok and p_ok else "behind on " + " and ".join(
                                 x for x, ok in (("drain", d_ok), ("pickup", p_ok)) if not ok)])
        if verdicts:
            R.table(["peer", "workers", "queuectl drain / peer drain", "peer pickup p50 / queuectl pickup p50 "
                     "(from enqueue called, Python call)", "queuectl is"], verdicts)
        for note in G6["notes"]:
            R.p("\n- " + note)

    # ---------------------------------------------------------------- summary
    S = []  # goal, queuectl, anchor or target, ratio, verdict
    if G1.get("api") and A.get("spawn_latency"):
        s, base = G1["api"]["after_return"], A["spawn_latency"]
        S.append(["1. pickup p50 above starting the process (idle worker, woken)", ms(s["p50"] - base["p50"], 2),
                  "<= 5 ms", "-", verdict(s["p50"] - base["p50"] <= 0.005)])
        S.append(["1. pickup p99 above starting the process", ms(s["p99"] - base["p99"], 2), "<= 25 ms", "-",
                  verdict(s["p99"] - base["p99"] <= 0.025)])
    if G1.get("poll") and G1.get("api"):
        S.append(["1. (design) pickup p50 without the wake-up, by the 1 s fallback poll",
                  ms(G1["poll"]["after_return"]["p50"], 0), "with the wake-up: %s" % ms(G1["api"]["after_return"]["p50"], 2),
                  ratio(G1["poll"]["after_return"]["p50"] / G1["api"]["after_return"]["p50"], 0), "-"])
    if G1.get("idle"):
        S.append(["1. idle worker CPU", "%.2f%% of a core" % G1["idle"]["worker_pct"], "< 1%", "-",
                  verdict(G1["idle"]["worker_pct"] < 1.0)])
    for w in (1, 2):
        if w in G2 and A.get("spawn_rate_%d" % w):
            r = G2[w]["rate"] / A["spawn_rate_%d" % w]
            S.append(["2. drain, %d worker%s, vs `sh -c true` run directly" % (w, "s" if w > 1 else ""),
                      rate(G2[w]["rate"]), rate(A["spawn_rate_%d" % w]), ratio(r), verdict(r >= 0.8)])
    if 1 in G2 and 2 in G2:
        r = G2[2]["rate"] / G2[1]["rate"]
        S.append(["2. drain, 2 workers vs 1", rate(G2[2]["rate"]), rate(G2[1]["rate"]), ratio(r), verdict(r >= 1.6)])
    if "sleep1" in G2 and "sleep2" in G2:
        r = G2["sleep2"] / G2["sleep1"]
        S.append(["2. (explains) 2 workers vs 1 with 20 ms jobs", rate(G2["sleep2"]), rate(G2["sleep1"]), ratio(r), "-"])
    if G3.get("bulk"):
        b = G3["bulk"]
        S.append(["3. `enqueue -` (JSON Lines) vs raw batched insert", rate(b["cli_rate"]), rate(A["batch_insert"]),
                  ratio(b["cli_ratio"]), verdict(b["cli_ratio"] >= 0.2)])
        S.append(["3. Python call vs raw batched insert", rate(b["api_rate"]), rate(A["batch_insert"]),
                  ratio(b["api_ratio"]), verdict(b["api_ratio"] >= 0.2)])
    if G3.get("startup"):
        s = G3["startup"]
        for key, label in (("installed", "installed `queuectl`"), ("source", "`python3 queuectl.py`"),
                           ("pyz", "`queuectl.pyz`")):
            if key in s:
                r = s[key][0] / s["min_script"][0]
                S.append(["3. one `enqueue`, %s, vs a script committing one row (wall; CPU)" % label,
                          "%s; %s" % (ms(s[key][0]), ms(s[key][1])),
                          "%s; %s" % (ms(s["min_script"][0]), ms(s["min_script"][1])),
                          "%s; %s" % (ratio(r), ratio(s[key][1] / s["min_script"][1])), verdict(r <= 1.5)])
        if "pyz" in s:
            d = s["pyz"][0] - s["source"][0]
            S.append(["3. `.pyz` over `queuectl.py`", "%+.1f ms" % (d * 1000), "<= +25 ms", "-", verdict(d <= 0.025)])
    if len(G4) == 2:
        small, big = sorted(G4)
        for key, label in (("claim_stmt", "claim statement"), ("claim_txn", "claim transaction"), ("status", "`status`"),
                           ("list --limit 50", "`list --limit 50`"), ("api_status", "`GET /api/status`")):
            if G4[small].get(key) and G4[big].get(key):
                r = G4[big][key]["p50"] / G4[small][key]["p50"]
                S.append(["4. %s at %s jobs vs %s" % (label, format(big, ","), format(small, ",")),
                          ms(G4[big][key]["p50"], 2), ms(G4[small][key]["p50"], 2), ratio(r), verdict(r <= 2.0)])
        scans = [n for n, p in G4[big]["plans"].items() if p["full_scan"]]
        S.append(["4. full scans in the plans of claim, status, list", ", ".join(scans) or "none", "none", "-",
                  verdict(not scans)])
        S.append(["4. database per finished job (retention: `config set retention`)",
                  "%.0f bytes" % G4[big]["bytes_per_job"], "-", "-", "-"])
    if G5.get("growth_after_10pct") is not None:
        S.append(["5. worker RSS over %s jobs" % format(G5["n"], ","), "%s -> %s" % (mib(G5["start_rss"]), mib(G5["end_rss"])),
                  "after %s jobs: %s" % (format(G5["ref_at"], ","), mib(G5["ref_rss"])),
                  "%+.1f%%" % (100 * G5["growth_after_10pct"]), verdict(G5["growth_after_10pct"] < 0.05)])
    mine = {r["workers"]: r for r in G6["rows"] if r.get("key") == "queuectl" and "error" not in r}
    for r in G6["rows"]:
        if r.get("key") in ("queuectl", "queuectl-cli") or "error" in r or r["workers"] not in mine:
            continue
        q = mine[r["workers"]]
        d_ok = q["drain_rate"] >= r["drain_rate"]
        p_ok = q["pickup"]["after_call"]["p50"] <= r["pickup"]["after_call"]["p50"]
        S.append(["6. vs %s, %d worker%s: drain; pickup p50" % (r["system"], r["workers"], "s" if r["workers"] > 1 else ""),
                  "%s; %s" % (rate(q["drain_rate"]), ms(q["pickup"]["after_call"]["p50"], 1)),
                  "%s; %s" % (rate(r["drain_rate"]), ms(r["pickup"]["after_call"]["p50"], 1)),
                  "%s; %s" % (ratio(q["drain_rate"] / r["drain_rate"]),
                              ratio(r["pickup"]["after_call"]["p50"] / q["pickup"]["after_call"]["p50"])),
                  verdict(d_ok and p_ok)])
    if S:
        R.h("Summary: the goals")
        R.table(["goal", "queuectl", "anchor / target", "ratio", "verdict"], S)
    res["summary"] = S

    # ---------------------------------------------------------------- wrap up
    res["load_after"] = load_average()
    res["seconds"] = round(time.time() - started, 1)
    if failures:
        R.h("Sections that failed")
        for name, err in failures:
            R.p("- %s: %s" % (name, err))
    R.p("\nRun took %.0f s; load average at the end: %s. Results: %s"
        % (res["seconds"], " ".join("%.2f" % x for x in res["load_after"]), outdir.relative_to(ROOT)))
    (outdir / "report.md").write_text(R.text())
    (outdir / "results.json").write_text(json.dumps(res, indent=2, default=str))
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
