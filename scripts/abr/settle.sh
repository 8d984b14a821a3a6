#!/usr/bin/env bash
# Runs one of tests/browser_abr.rs's ignored Chromium cases N times with the
# edge's ABR traces on, keeping each run's log and a summary:
#
#   scripts/abr/settle.sh TAG N [TEST]     (as root: network namespaces)
#
# TEST defaults to the settle case (abr_viewers_settle_on_the_rendition_that_fits);
# others: abr_viewer_climbs_when_the_limit_rises_and_drops_when_it_falls,
# abr_viewer_below_the_lowest_rendition_keeps_audio. Logs go to
# $OUT/st-TAG-i.log, the summary to $OUT/settle-TAG.sum (OUT defaults to
# /tmp). PROFILE=release measures a release build (built first). Read a log
# with scripts/abr/timeline.py. Run nothing else meanwhile: the case takes
# both cores of a 2-core machine (docs/quality.md, Measured with Chromium).
set -euo pipefail
cd "$(dirname "$0")/../.."
TAG=${1:?tag}; N=${2:?runs}; TEST=${3:-abr_viewers_settle_on_the_rendition_that_fits}
OUT=${OUT:-/tmp}
profile=()
[ "${PROFILE:-debug}" = release ] && profile=(--release)
BIN=$(cargo test "${profile[@]}" --test browser_abr --no-run 2>&1 |
  grep -o 'target/[^ )]*/deps/browser_abr-[0-9a-f]*' | tail -1)
[ -x "$BIN" ] || { echo "no test binary: $BIN" >&2; exit 1; }
SUM="$OUT/settle-$TAG.sum"
: > "$SUM"
met=0
for i in $(seq 1 "$N"); do
  log="$OUT/st-$TAG-$i.log"
  rc=0
  CASCADE_TEST_LOG="info,cascade_edge::viewer=trace,cascade_edge::abr=trace" \
    timeout 300 "$BIN" --ignored --exact "$TEST" --nocapture > "$log" 2>&1 || rc=$?
  [ "$rc" -eq 0 ] && met=$((met + 1))
  {
    echo "== run $i rc=$rc load $(cut -d' ' -f1 /proc/loadavg)"
    grep -E '^abr (settle|climb)|> 5 s|freeze of' "$log" | grep -v 'abr settle: renditions' | cut -c1-400 || true
  } >> "$SUM"
done
echo "met: $met of $N" >> "$SUM"
cat "$SUM"
