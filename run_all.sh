#!/usr/bin/env bash
# ehrxdiff: the study command and the test command.
#
#   ./run_all.sh                         run notebooks 01..NN on the demo profile (synthetic world, CPU)
#   ./run_all.sh --profile smoke|demo|paper|path/to/profile.yaml [-p KEY VALUE]... [--only 03] [--from 04]
#   ./run_all.sh --test [pytest args]    run the test suite (what .ci/run calls)
#   ./run_all.sh --lab [jupyter args]    open the notebooks in JupyterLab with this environment's kernel
#
# All three create .venv when missing and install the pinned dependencies and the package (editable) first.
# Executed notebooks land in <run_dir>/notebooks/ (runs/<profile>/ by default); a one-line summary per notebook is printed and the
# script stops with a non-zero exit at the first failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT=$(pwd)
VENV=${EHRXDIFF_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONHASHSEED=0
export MPLBACKEND=Agg
# this checkout's package wins over whatever ehrxdiff the environment has installed (a shared EHRXDIFF_VENV
# may hold another clone's editable install): the notebooks run the code they were checked out with
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

bootstrap() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    "$PY" -m venv "$VENV"
  fi
  # the stamp holds a hash of the pins, not a time: a fresh clone (new file times) of the same pins with a shared
  # EHRXDIFF_VENV installs nothing; a change of requirements.txt or pyproject.toml reinstalls
  local stamp="$VENV/.ehrxdiff-installed"
  local want
  want=$(cat requirements.txt pyproject.toml | "$VENV/bin/python" -c "import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())")
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "== installing pinned dependencies (first run: a few minutes)"
    # --no-cache-dir: torch's wheels are GBs; a cached copy beside the installed one has filled CI's disk
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir -r requirements.txt
    if [ -z "${EHRXDIFF_VENV:-}" ] || ! "$VENV/bin/python" -c "import ehrxdiff" >/dev/null 2>&1; then
      "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e .
    fi
    echo "$want" > "$stamp"
  fi
  if git rev-parse --git-dir >/dev/null 2>&1; then
    # nbstripout's filter is recorded per clone (.git/config): committed notebooks never carry outputs.
    "$VENV/bin/nbstripout" --install >/dev/null 2>&1 || true
  fi
}

PROFILE=demo
OVERRIDES=()
ONLY=""
FROM=""
MODE=study
PYTEST_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --test) MODE=test; shift; PYTEST_ARGS=("$@"); break ;;
    --lab) MODE=lab; shift; PYTEST_ARGS=("$@"); break ;;
    --profile) PROFILE="$2"; shift 2 ;;
    --profile=*) PROFILE="${1#*=}"; shift ;;
    -p|--param) OVERRIDES+=(-p "$2" "$3"); shift 3 ;;
    --only) ONLY="$2"; shift 2 ;;
    --from) FROM="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1' (see ./run_all.sh --help)" >&2; exit 2 ;;
  esac
done

bootstrap
PYBIN="$VENV/bin/python"

if [ "$MODE" = lab ]; then
  # the same environment variables as a scripted run (offline model loading, hash seed, this checkout first on
  # PYTHONPATH), and the environment's own Jupyter, so the "Python 3" kernel is this .venv's interpreter
  # (MPLBACKEND unset: the kernel's inline backend shows the figures; Agg is for the scripted runs)
  exec env -u MPLBACKEND "$VENV/bin/jupyter" lab --notebook-dir "$ROOT/notebooks" "${PYTEST_ARGS[@]}"
fi

if [ "$MODE" = test ]; then
  set +e
  "$PYBIN" -m pytest -q "${PYTEST_ARGS[@]}"
  rc=$?
  set -e
  # pytest exits 5 when nothing was collected: that is a failure of the suite, not a pass.
  exit $rc
fi

NAME=$(basename "$PROFILE" .yaml)
# Validate the profile and every -p override before any notebook starts (unknown keys are errors); the executed
# notebooks, parameters and timings go under the run's own folder (run_dir), so two runs never overwrite each other.
OUT=$("$PYBIN" -m ehrxdiff.config run-dir --profile "$PROFILE" "${OVERRIDES[@]}")
mkdir -p "$OUT/notebooks"
PARAMS="$OUT/parameters.yaml"
"$PYBIN" -m ehrxdiff.config resolve --profile "$PROFILE" "${OVERRIDES[@]}" --out "$PARAMS"

echo "== profile $NAME → $OUT/notebooks"
printf "notebook,status,seconds\n" > "$OUT/timings.csv"
total_start=$(date +%s)
for nb in notebooks/[0-9][0-9]_*.ipynb; do
  base=$(basename "$nb")
  num=${base:0:2}
  if [ -n "$ONLY" ] && [ "$num" != "$ONLY" ]; then continue; fi
  if [ -n "$FROM" ] && [ "$num" \< "$FROM" ]; then continue; fi
  start=$(date +%s)
  if "$PYBIN" -m papermill "$nb" "$OUT/notebooks/$base" -f "$PARAMS" -k python3 --cwd "$ROOT/notebooks" \
       --log-level WARNING --no-progress-bar --request-save-on-cell-execute > "$OUT/notebooks/${base%.ipynb}.log" 2>&1; then
    secs=$(( $(date +%s) - start ))
    printf "%-34s ok      %5ds\n" "$base" "$secs"
    printf "%s,ok,%d\n" "$base" "$secs" >> "$OUT/timings.csv"
  else
    secs=$(( $(date +%s) - start ))
    printf "%-34s FAILED  %5ds  (log: %s)\n" "$base" "$secs" "$OUT/notebooks/${base%.ipynb}.log"
    printf "%s,failed,%d\n" "$base" "$secs" >> "$OUT/timings.csv"
    tail -n 25 "$OUT/notebooks/${base%.ipynb}.log" >&2
    exit 1
  fi
done
echo "== done in $(( $(date +%s) - total_start ))s; timings in $OUT/timings.csv"
