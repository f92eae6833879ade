#!/usr/bin/env bash
# Make sure Debian's Chromium is at /usr/bin/chromium, for the browser test
# (tests/test_browser.py drives it through Playwright's Python package; no
# browser download). Idempotent and quiet when it is already there; any output
# goes to stderr. Installs with apt-get only when run as root; otherwise it says
# what to run and fails, so the browser test is never silently skipped.
set -uo pipefail

CHROMIUM=/usr/bin/chromium

log() { echo "ensure-chromium: $*" >&2; }

[[ -x $CHROMIUM ]] && exit 0

if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    log "$CHROMIUM is missing and I can't apt-get install it (need root + apt);"
    log "install Debian's chromium package: sudo apt-get install chromium"
    exit 1
fi

log "installing chromium with apt-get (output below)..."
# No stdin in CI. `update` first: a fresh machine may have no package lists.
{
    DEBIAN_FRONTEND=noninteractive apt-get update -q &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium
} </dev/null >&2 || { log "apt-get install chromium failed"; exit 1; }

[[ -x $CHROMIUM ]] || { log "chromium installed, but $CHROMIUM is not there"; exit 1; }
