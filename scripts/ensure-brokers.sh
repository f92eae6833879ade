#!/usr/bin/env bash
# Make sure the message brokers of the fan-out tests answer on this machine: Redis on
# 127.0.0.1:6379 and NATS with JetStream on 127.0.0.1:4222. Starts whichever is silent,
# with Debian's redis-server and nats-server (installed with apt-get when missing, as
# root). Idempotent and quiet when both answer; any output goes to stderr. Exits non-zero
# if one cannot be had, saying why (the fan-out tests then fail, never skip).
set -uo pipefail

log() { echo "ensure-brokers: $*" >&2; }

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {
    for _ in $(seq 50); do
        listening "$1" && return 0
        sleep 0.2
    done
    return 1
}

# need BINARY PACKAGE: the binary, apt-get installing its package if missing.
need() {
    command -v "$1" >/dev/null && return 0
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        log "$1 is missing and I can't apt-get install it (need root + apt): install $2"
        return 1
    fi
    log "installing $2 with apt-get..."
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -q &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$2"
    } </dev/null >&2 && command -v "$1" >/dev/null
}

# A directory for a server's files: the packaged one when writable, else one in /tmp.
place() {
    if mkdir -p "$1" 2>/dev/null && [[ -w $1 ]]; then echo "$1"; else
        mkdir -p "$2" && echo "$2"
    fi
}

rc=0

if ! listening 6379; then
    if need redis-server redis-server; then
        dir=$(place /var/lib/redis /tmp/rowsync-redis)
        logs=$(place /var/log/redis /tmp/rowsync-redis)
        log "starting redis-server on 127.0.0.1:6379"
        redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
            --appendonly no --dir "$dir" --logfile "$logs/ci.log" >&2
        wait_for 6379 || { log "redis-server did not answer on 6379 (see $logs/ci.log)"; rc=1; }
    else
        rc=1
    fi
fi

if ! listening 4222; then
    if need nats-server nats-server; then
        server=$(command -v nats-server)
        store=$(place /var/lib/nats-server /tmp/rowsync-nats)
        logfile=$(place /var/log /tmp/rowsync-nats)/nats-server.log
        args=(-a 127.0.0.1 -p 4222 -js -sd "$store" -l "$logfile")
        log "starting nats-server (JetStream) on 127.0.0.1:4222"
        if command -v start-stop-daemon >/dev/null; then
            start-stop-daemon --start --oknodo --background --exec "$server" -- "${args[@]}" >&2
        else
            setsid nohup "$server" "${args[@]}" </dev/null >/dev/null 2>&1 &
        fi
        wait_for 4222 || { log "nats-server did not answer on 4222 (see $logfile)"; rc=1; }
    else
        rc=1
    fi
fi

exit $rc
