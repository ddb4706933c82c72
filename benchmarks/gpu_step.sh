# The step runner shared by benchmarks/gpu_checks.sh and benchmarks/gpu_igemm_step.sh
# (sourced, not run). The caller sets `out` (the folder for logs) and `steps`
# (space-separated names of the steps to run).
#
# step NAME SECONDS COMMAND...: runs COMMAND under `timeout SECONDS` when NAME is
# in $steps, teeing its output to $out/NAME.log and printing its exit status; a
# failing or timed-out step does not stop the caller.
step() {
  local name=$1 limit=$2
  shift 2
  case " $steps " in *" $name "*) ;; *) return 0 ;; esac
  echo "=== $name (limit ${limit}s, $(date -u +%T))"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  echo "=== $name rc=${PIPESTATUS[0]} ($(date -u +%T))"
}
