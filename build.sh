#!/usr/bin/env bash
# build.sh - build, test and benchmark queuectl.
#
#   ./build.sh [--with-postgres]      build dist/queuectl.pyz (shiv zipapp)
#   ./build.sh test [pytest args...]  build, then run the suite on the source,
#                                     the e2e tests on dist/queuectl.pyz, and
#                                     the e2e tests on PostgreSQL
#   ./build.sh bench [--full]         run bench/run.py
#   ./build.sh mutate [AREA...]       mutation testing (cosmic-ray, tests/mutation.toml)
#   ./build.sh clean                  remove build/ and dist/
#   ./build.sh --help                 show this help
#
# Works from any cwd: everything is relative to this script's directory.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
STAGE="$ROOT/build/site"
OUT="$ROOT/dist/queuectl.pyz"
# shiv's own bootstrap code is copied into every zipapp, so the shiv version is
# part of the build input: pin it, or "same sources, same bytes" breaks the day
# a new shiv is released.
SHIV_SPEC="shiv==1.0.8"
# shiv sorts the site-packages it zips, but adds its own _bootstrap/*.py in
# directory-listing order, which depends on the filesystem (ext4 hash order
# differs between machines). Run shiv with that one listing sorted so the
# archive's bytes do not depend on where shiv was installed.
SHIV_SORTED='
import sys
import shiv.builder as b
_orig = getattr(b, "iter_package_files", None)
if _orig is not None:
    b.iter_package_files = lambda pkg: iter(sorted(_orig(pkg), key=lambda t: t[1]))
from shiv.cli import main
sys.exit(main(prog_name="shiv"))
'
# Fixed timestamp for all zip entries (shiv --reproducible honours it).
# 315554400 is shiv's own default (1980-01-01, the earliest zip date).
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-315554400}"

usage() {
    cat <<'EOF'
Usage: ./build.sh [COMMAND] [ARGS...]

Commands:
  (none)                  Build dist/queuectl.pyz with shiv (reproducible:
                          the same sources give the same bytes).
  --with-postgres         Build dist/queuectl.pyz with the psycopg[binary]
                          PostgreSQL driver inside (not reproducible; the
                          bundled driver is tied to this machine's Python
                          version and platform).
  test [PYTEST_ARGS...]   Ensure .venv has pytest, shiv, playwright and
                          psycopg, build the pyz, run the whole suite against
                          the source (python3 queuectl.py), then run the e2e
                          tests again against dist/queuectl.pyz (QUEUECTL_CMD),
                          also on every other supported Python found (3.8 to
                          3.13: python3.X on PATH, or a pyenv build), then
                          the end-to-end suites against the source on
                          PostgreSQL (QUEUECTL_TEST_BACKEND=postgres: a fresh
                          schema per test on $QUEUECTL_TEST_PG, default
                          postgresql://postgres@127.0.0.1:5432/test). Extra
                          args go to every pytest run. Fails if any run fails.
  bench [--full]          Run bench/run.py with .venv's Python.
  mutate [-j N] [AREA...] Mutation testing with cosmic-ray (installed into
                          .venv only) over the areas of tests/mutation.toml:
                          policy, store, executor, worker (queuectl.py) and
                          server (queuectl_web/server.py's security checks).
                          Each mutant runs against its area's fast tests in a
                          copy under build/mutate/ (the sources are never
                          touched). Prints per area the mutants, equivalent,
                          killed, survived, the kill ratio and every survivor;
                          also in build/mutate/report.txt. -j N: processes per
                          area (default 2). --list: the areas and their sizes.
                          Help: ./build.sh mutate --help.
  clean                   Remove build/ and dist/.
  -h, --help              Show this help.

Browser tests need Debian's Chromium at /usr/bin/chromium (installed by .ci/run,
never by this script).
EOF
}

# The Python versions queuectl supports (queuectl.py refuses older ones with one line).
SUPPORTED_PYTHONS="3.8 3.9 3.10 3.11 3.12 3.13"

die() { echo "build.sh: error: $*" >&2; exit 1; }

# find_python 3.X: a python3.X on PATH (outside .venv), else the newest pyenv build of 3.X.
find_python() {
    local v="$1" p cand=""
    local IFS=:
    for p in $PATH; do
        [ -n "$p" ] || continue
        case "$p" in "$VENV"/*|*/.pyenv/shims) continue ;; esac
        if [ -x "$p/python$v" ]; then cand="$p/python$v"; break; fi
    done
    if [ -z "$cand" ] && [ -d "${PYENV_ROOT:-$HOME/.pyenv}/versions" ]; then
        cand="$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}/versions/$v".[0-9]* 2>/dev/null | sort -V | tail -n 1)"
        [ -n "$cand" ] && cand="$cand/bin/python$v"
        [ -x "$cand" ] || cand=""
    fi
    echo "$cand"
}
log() { echo "==> $*"; }

# The python3 a user would run the pyz with: the first python3 on PATH outside
# this project's .venv, resolved to the real interpreter (skips pyenv shims).
system_python() {
    local p py=""
    local IFS=:
    for p in $PATH; do
        [ -n "$p" ] || continue
        case "$p" in "$VENV"/*) continue ;; esac
        if [ -x "$p/python3" ]; then py="$p/python3"; break; fi
    done
    [ -n "$py" ] || die "python3 not found on PATH"
    "$py" -c 'import sys; print(sys.executable)'
}

ensure_venv() {
    if [ ! -x "$VPY" ]; then
        log "creating virtualenv .venv"
        python3 -m venv "$VENV" || die "'python3 -m venv' failed (on Debian: apt-get install python3-venv)"
    fi
}

# pip_ensure MODULE PIP_SPEC [MODULE PIP_SPEC ...]: install what is missing.
pip_ensure() {
    local missing=()
    while [ $# -ge 2 ]; do
        if ! "$VPY" -c "import $1" >/dev/null 2>&1; then missing+=("$2"); fi
        shift 2
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "pip install ${missing[*]} into .venv"
        "$VPY" -m pip install -q --disable-pip-version-check "${missing[@]}"
    fi
}

ensure_shiv() {
    ensure_venv
    if [ ! -x "$VENV/bin/shiv" ] || [ "$("$VENV/bin/shiv" --version 2>/dev/null | awk '{print $NF}')" != "${SHIV_SPEC#shiv==}" ]; then
        log "pip install $SHIV_SPEC into .venv"
        "$VPY" -m pip install -q --disable-pip-version-check "$SHIV_SPEC"
    fi
    # shiv copies its bootstrap files' permission bits into the zip; make them
    # independent of the umask that was in force when pip installed shiv.
    "$VPY" -c 'import os, shiv.bootstrap as b
d = os.path.dirname(b.__file__)
for n in os.listdir(d):
    p = os.path.join(d, n)
    if os.path.isfile(p):
        os.chmod(p, 0o644)'
}

# Copy only the project's own files into a clean build/site.
stage() {
    [ -f queuectl.py ] || die "queuectl.py not found in $ROOT"
    rm -rf "$STAGE"
    mkdir -p "$STAGE"
    cp queuectl.py "$STAGE/queuectl.py"
    # The PostgreSQL store: imported only for postgresql:// URLs; its driver is
    # bundled by --with-postgres only.
    if [ -f queuectl_pg.py ]; then cp queuectl_pg.py "$STAGE/queuectl_pg.py"; fi
    if [ -d queuectl_web ]; then
        local f
        while IFS= read -r -d '' f; do
            mkdir -p "$STAGE/$(dirname "$f")"
            cp "$f" "$STAGE/$f"
        done < <(find queuectl_web \
                    \( -name __pycache__ -prune \) -o \
                    \( -type f \( -name '*.py' -o -path 'queuectl_web/static/*' \) \
                       ! -name '*.pyc' ! -name '.*' ! -name '*~' -print0 \) | LC_ALL=C sort -z)
    fi
}

# Normalise everything shiv reads from the staged files besides their bytes:
# permissions go into the zip's external_attr; mtimes are overridden by
# --reproducible anyway but are fixed too, for good measure.
normalise_stage() {
    find "$STAGE" -type d -exec chmod 0755 {} +
    find "$STAGE" -type f -exec chmod 0644 {} +
    find "$STAGE" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
}

build() {
    local with_pg="${1:-0}"
    ensure_shiv
    stage
    if [ "$with_pg" = 1 ]; then
        log "pip install psycopg[binary] into build/site"
        "$VPY" -m pip install -q --disable-pip-version-check --no-compile \
            --target "$STAGE" 'psycopg[binary]>=3.1'
        rm -rf "$STAGE/bin"
        find "$STAGE" -name __pycache__ -type d -prune -exec rm -rf {} +
    fi
    normalise_stage
    mkdir -p "$ROOT/dist"
    rm -f "$OUT"
    log "shiv -> dist/queuectl.pyz"
    # Archive names are relative to the staged dir, so the checkout's path
    # never ends up in the archive.
    "$VPY" -c "$SHIV_SORTED" \
        --site-packages "$STAGE" \
        -e queuectl:main \
        -o "$OUT" \
        -p '/usr/bin/env python3' \
        --reproducible \
        --compressed
    local sys_py sha
    sys_py="$(system_python)"
    # Smoke test with the plain system python3; shiv unpacks into SHIV_ROOT
    # (default ~/.shiv), kept inside build/ for this check.
    SHIV_ROOT="$ROOT/build/shiv-root" "$sys_py" "$OUT" --version >/dev/null \
        || die "built pyz does not run: $sys_py $OUT --version"
    sha="$(sha256sum "$OUT" | awk '{print $1}')"
    echo "built: $OUT"
    echo "sha256: $sha"
}

run_tests() {
    [ -d tests ] || die "no tests/ directory in $ROOT"
    if [ -z "$(find tests -name 'test_*.py' -o -name '*_test.py' | head -n 1)" ]; then
        die "tests/ contains no test files (test_*.py / *_test.py)"
    fi
    ensure_venv
    pip_ensure pytest 'pytest>=7' shiv "$SHIV_SPEC" playwright playwright psycopg 'psycopg[binary]>=3.1'
    ensure_shiv
    if [ ! -x /usr/bin/chromium ]; then
        echo "NOTE: /usr/bin/chromium is missing: browser tests will not be able to run." >&2
        echo "      Install it with: apt-get install -y --no-install-recommends chromium chromium-driver" >&2
        echo "      (.ci/run does this on CI)." >&2
    fi
    build 0

    local sys_py pyz_cmd rc1=0 rc2=0 rc3=0
    sys_py="$(system_python)"
    pyz_cmd="$("$sys_py" -c 'import shlex, sys; print(" ".join(shlex.quote(a) for a in sys.argv[1:]))' "$sys_py" "$OUT")"

    echo
    log "pytest (whole suite, against the source: python3 queuectl.py)"
    env -u QUEUECTL_CMD "$VPY" -m pytest -q "$@" || rc1=$?
    if [ "$rc1" -eq 5 ]; then
        echo "build.sh: pytest collected no tests" >&2
    fi

    echo
    log "pytest -m e2e (against the built file: QUEUECTL_CMD=$pyz_cmd)"
    QUEUECTL_CMD="$pyz_cmd" "$VPY" -m pytest -q -m e2e "$@" || rc2=$?
    if [ "$rc2" -eq 5 ]; then
        echo "NOTE: no e2e tests selected; the pyz run is not counted as a failure." >&2
        rc2=0
    fi

    # The .pyz on every other supported Python this machine has (servers run what their
    # distribution shipped): the end-to-end tests, browser ones left out.
    local ran=() missing=() failed=() v py sys_ver
    sys_ver="$("$sys_py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    for v in $SUPPORTED_PYTHONS; do
        py="$(find_python "$v")"
        if [ -z "$py" ]; then missing+=("$v"); continue; fi
        [ "$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$sys_ver" ] && continue  # (run above)
        echo
        log "pytest -m 'e2e and not browser' (the built file on Python $v: $py)"
        local rc=0
        QUEUECTL_CMD="$py $OUT" "$VPY" -m pytest -q -m "e2e and not browser" "$@" || rc=$?
        if [ "$rc" -eq 0 ]; then
            ran+=("$("$py" -c 'import platform; print(platform.python_version())')")
        elif [ "$rc" -ne 5 ]; then  # (5: the tests asked for hold no e2e test)
            failed+=("$v")
        fi
    done
    echo
    echo "Python versions: the .pyz's e2e tests ran on ${ran[*]:-none} besides $("$sys_py" -V 2>&1);" \
         "not found here: ${missing[*]:-none}${failed[*]:+; FAILED on: ${failed[*]}}"

    echo
    log "pytest e2e on PostgreSQL (QUEUECTL_TEST_BACKEND=postgres, against the source)"
    QUEUECTL_TEST_BACKEND=postgres env -u QUEUECTL_CMD "$VPY" -m pytest -q tests/test_e2e.py tests/test_features.py \
        "$@" || rc3=$?
    if [ "$rc3" -eq 5 ]; then
        echo "NOTE: no e2e tests selected for PostgreSQL; that run is not counted as a failure." >&2
        rc3=0
    fi

    # On success pytest's own summary stays the last line of the output.
    if [ "$rc1" -ne 0 ] || [ "$rc2" -ne 0 ] || [ "$rc3" -ne 0 ] || [ ${#failed[@]} -gt 0 ]; then
        echo
        echo "build.sh test: FAILED (source run: exit $rc1; pyz e2e run: exit $rc2;" \
             "PostgreSQL e2e run: exit $rc3; other Pythons failed: ${failed[*]:-none})" >&2
        exit 1
    fi
}

# Mutation testing: cosmic-ray is a test tool, never a runtime dependency.
COSMIC_RAY_SPEC="cosmic-ray==8.7.0"

run_mutate() {
    [ -f tests/mutation.py ] || die "tests/mutation.py not found"
    ensure_venv
    pip_ensure pytest 'pytest>=7' cosmic_ray "$COSMIC_RAY_SPEC"
    env -u QUEUECTL_CMD -u QUEUECTL_TEST_BACKEND "$VPY" tests/mutation.py "$@"
}

run_bench() {
    [ -f bench/run.py ] || die "bench/run.py not found: no benchmark to run"
    ensure_venv
    exec "$VPY" bench/run.py "$@"
}

cmd="${1:-build}"
[ $# -gt 0 ] && shift
case "$cmd" in
    build)           [ $# -eq 0 ] || die "unexpected arguments: $* (see --help)"; build 0 ;;
    --with-postgres) [ $# -eq 0 ] || die "unexpected arguments: $* (see --help)"; build 1 ;;
    test)            run_tests "$@" ;;
    bench)           run_bench "$@" ;;
    mutate)          run_mutate "$@" ;;
    clean)           rm -rf "$ROOT/build" "$ROOT/dist"; echo "removed build/ and dist/" ;;
    -h|--help|help)  usage ;;
    *)               usage >&2; echo >&2; die "unknown command: $cmd" ;;
esac
