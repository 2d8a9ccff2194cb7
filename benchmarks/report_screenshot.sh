#!/bin/sh
# Screenshots of utune_fx HTML reports in a headless browser (Debian's chromium: apt-get install chromium).
# Not part of the tests: CI does not need a browser.
#
#   benchmarks/report_screenshot.sh REPORT.html OUT.png [WIDTHxHEIGHT] [expand]
#
# "expand" opens every module (the page's own #expand; the default shows two levels).
set -eu
report=$(realpath "$1")
out=$2
size=${3:-1400x1000}
anchor=""
[ "${4:-}" = expand ] && anchor="#expand"
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$browser" ] || { echo "error: no chromium on PATH; apt-get install chromium" >&2; exit 2; }
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --run-all-compositor-stages-before-draw \
  --virtual-time-budget=2000 --window-size="$(echo "$size" | tr x ,)" --screenshot="$out" \
  "file://$report$anchor" 2>/dev/null
echo "wrote $out"
