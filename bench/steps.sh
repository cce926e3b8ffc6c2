# Sourced by the multi-step bench scripts: `step NAME CMD...` runs CMD with its output in $R/NAME.log and
# prints when it started and how it ended, so a background job's log reads as a list of steps.
step() {
  local name=$1
  shift
  echo "== $name started $(date +%T)"
  "$@" > "$R/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc $(date +%T)"
  return $rc
}
