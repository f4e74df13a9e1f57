#!/bin/bash
# measure.sh SHAPE N OP...: peak RSS of drsync operations on a tree of SHAPE (gen.py), built at N/4 and at
# N entries; prints both peaks, the per-entry slope and the linear estimate at 1,000,000 entries, and exits 1
# when a peak or an estimate exceeds 300 MiB (issue 17). OPs, in the order given: create, unchanged, diff,
# restore-empty, restore-same, verify, renamed (every path renamed, then create and diff), modeowner (a
# restore, every file's mode and owner changed, then restore --overwrite). DRSYNC names another binary.
set -u
SHAPE=$1 N=$2; shift 2
OPS=("$@")
HERE=$(cd "$(dirname "$0")" && pwd)
DR=${DRSYNC:-$HERE/../../.venv/bin/drsync}
W0=$(mktemp -d "${TMPDIR:-/tmp}/drsync-shape-XXXXXX")
trap 'rm -rf "$W0"' EXIT
declare -A PEAK
LABELS=()
run() {  # run LABEL cmd...
  local label=$1; shift
  /usr/bin/time -v "$@" >"$W/out" 2>"$W/time"; local rc=$?
  local mib=$(( $(awk '/Maximum resident/ {print $NF}' "$W/time") / 1024 ))
  echo "  $label N=$SIZE rc=$rc peak=${mib}MiB"
  [ "$rc" -ne 0 ] && tail -2 "$W/time"
  PEAK["$SIZE|$label"]=$mib
  [ "$SIZE" = "$N" ] || LABELS+=("$label")
}
body() {
  SIZE=$1; W=$W0/$SIZE; mkdir -p "$W"
  python3 "$HERE/gen.py" "$SHAPE" "$SIZE" "$W/src" || exit 2
  "$DR" init --repo "$W/repo" --cluster-id c1 --release r1 >/dev/null || exit 2
  local S=$W/src R=$W/repo
  for op in "${OPS[@]}"; do
    case $op in
      create) run "snapshot create (first)" "$DR" snapshot create --repo "$R" --source "$S" --name first ;;
      unchanged) run "snapshot create (unchanged)" "$DR" snapshot create --repo "$R" --source "$S" --name second ;;
      diff) run "snapshot diff" "$DR" snapshot diff first second --repo "$R" ;;
      restore-empty) run "snapshot restore (empty target)" "$DR" snapshot restore first --repo "$R" --target "$W/tgt" ;;
      restore-same) run "snapshot restore (same target)" "$DR" snapshot restore first --repo "$R" --target "$W/tgt" ;;
      verify) run "repo verify" "$DR" repo verify --repo "$R" ;;
      renamed)
        "$DR" snapshot create --repo "$R" --source "$S" --name first >/dev/null
        python3 "$HERE/gen.py" rename "$S"
        run "snapshot create (all renamed)" "$DR" snapshot create --repo "$R" --source "$S" --name second
        run "snapshot diff (all renamed)" "$DR" snapshot diff first second --repo "$R" --json ;;
      modeowner)
        "$DR" snapshot create --repo "$R" --source "$S" --name first >/dev/null
        "$DR" snapshot restore first --repo "$R" --target "$W/tgt" >/dev/null
        python3 "$HERE/gen.py" chmodown "$W/tgt"
        run "snapshot restore --overwrite (modes, owners)" "$DR" snapshot restore first --repo "$R" --target "$W/tgt" \
          --overwrite ;;
      *) echo "unknown operation $op"; exit 2 ;;
    esac
  done
  rm -rf "$W"
}
N1=$((N / 4))
body "$N1"
body "$N"
echo "--- estimate at 1,000,000 entries (linear between N=$N1 and N=$N)"
fail=0
for label in "${LABELS[@]}"; do
  a=${PEAK["$N1|$label"]} b=${PEAK["$N|$label"]}
  read -r slope est <<<"$(python3 -c "s=($b-$a)*1048576/($N-$N1); print(int(s), int($b+s*(1e6-$N)/1048576))")"
  v=ok; if [ "$b" -gt 300 ] || [ "$est" -gt 300 ]; then v=OVER; fail=1; fi
  echo "$label: ${a}MiB@$N1 ${b}MiB@$N slope=${slope}B/entry est@1M=${est}MiB $v"
done
exit $fail
