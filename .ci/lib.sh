# Sourced by .ci/run and .ci/core-only.sh: named, timed stages and the pytest calls every stage makes.
# Each stage's wall time goes to $CI_TIMES (one "name<TAB>seconds<TAB>status" line per stage); .ci/run prints them
# at the end of its output, with the slowest tests.

# Python may write bytecode: this machine's image sets PYTHONDONTWRITEBYTECODE, so every process (each `cxrbench run`,
# worker and pytest session) would compile cxrbench, the plugins and the tests again, and pytest would rewrite the
# assertions of every test module again in every session. __pycache__ is ignored by git.
unset PYTHONDONTWRITEBYTECODE

export ARTIFACTS="${ARTIFACTS:-$PWD/artifacts}"
export CI_TIMES="${CI_TIMES:-$ARTIFACTS/stage-times.tsv}"
#: pytest-xdist workers for the tests that may share the machine (CI's machine has 2 cores).
export CI_WORKERS="${CI_WORKERS:-2}"
mkdir -p "$ARTIFACTS/junit"

BACKGROUND_LOCK="$ARTIFACTS/.background.lock"
_stage_name=""
_stage_start=0

background() {  # background LOG COMMAND...: COMMAND in the background, output to LOG, its pid in $BACKGROUND_PID.
  # It holds $BACKGROUND_LOCK until it ends, so that serial tests (run_serial_tests) never share the machine with it.
  local log="$1"
  shift
  # The lock travels with the background subshell; COMMAND itself runs without it, so daemons it starts (Slurm's)
  # do not hold it for ever.
  exec 8>"$BACKGROUND_LOCK"
  flock 8
  { "$@" 8>&-; } >"$log" 2>&1 &
  BACKGROUND_PID=$!
  exec 8>&-
}

stage() {  # stage NAME: ends the running stage (if any) and starts NAME
  stage_end
  _stage_name="$1"
  _stage_start=$SECONDS
  echo "== $1"
}

stage_end() {  # stage_end [STATUS]: records the running stage's wall time (STATUS defaults to ok)
  if [[ -n "$_stage_name" ]]; then
    printf '%s\t%s\t%s\n' "$_stage_name" "$((SECONDS - _stage_start))" "${1:-ok}" >>"$CI_TIMES"
    _stage_name=""
  fi
}

run_parallel_tests() {  # run_parallel_tests NAME PYTHON PYTEST-ARGS...: run_tests, $CI_WORKERS tests at a time
  # (the benchmarks are serial: pytest-benchmark would only warn that xdist disables them)
  run_tests "$1" "$2" -n "$CI_WORKERS" --dist loadgroup --benchmark-disable "${@:3}"
}

run_serial_tests() {  # run_serial_tests NAME PYTHON PYTEST-ARGS...: run_tests once no background job runs
  flock "$BACKGROUND_LOCK" true
  run_tests "$@"
}

run_tests() {  # run_tests NAME PYTHON PYTEST-ARGS...: one pytest call, its JUnit XML at artifacts/junit/NAME.xml
  local name="$1" python="$2"
  shift 2
  local status=0
  "$python" -m pytest -p no:cacheprovider -rs --durations=30 --junitxml="$ARTIFACTS/junit/$name.xml" "$@" || status=$?
  if [[ $status -eq 5 ]]; then  # no test selected (e.g. no serial test needs this stage's backends): nothing failed
    echo "   ($name: no test selected)"
    return 0
  fi
  return "$status"
}
