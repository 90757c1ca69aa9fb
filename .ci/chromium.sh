#!/usr/bin/env bash
# Chromium for the report's browser test (tests/test_results.py), from Debian's packages.
#
# Under CI=true it installs `chromium` with apt-get when it is missing, retrying a failed
# download (PACS_CI_APT_TRIES, default 4; PACS_CI_APT_WAIT seconds before the second try,
# growing linearly, default 10), and exits 1 when it cannot: under CI=true that test fails
# rather than skips without a browser, so CI stops here with the cause instead.  Elsewhere it
# installs nothing and prints one line; the test then skips.
set -euo pipefail

TRIES=${PACS_CI_APT_TRIES:-4}
WAIT=${PACS_CI_APT_WAIT:-10}

if command -v chromium >/dev/null 2>&1; then
    echo "chromium: $(command -v chromium) is installed"
    exit 0
fi
if [[ ${CI:-} != true ]]; then
    echo "chromium: not installed and CI is not true, so not installing it; the report's" \
        "browser test will skip (apt-get install chromium)"
    exit 0
fi
log=$(mktemp /tmp/chromium_apt.XXXXXX)
trap 'rm -f "$log"' EXIT
for ((try = 1; ; try++)); do
    if { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } \
        >"$log" 2>&1 && command -v chromium >/dev/null 2>&1; then
        echo "chromium: installed $(command -v chromium) (apt-get, try $try)"
        exit 0
    fi
    if ((try >= TRIES)); then
        echo "chromium: apt-get install chromium failed $try times under CI=true; its last" \
            "output:" >&2
        tail -n 5 "$log" >&2 || true
        exit 1
    fi
    echo "chromium: apt-get failed (try $try of $TRIES); retrying in $((WAIT * try)) s" >&2
    sleep $((WAIT * try))
done
