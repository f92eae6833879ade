#!/usr/bin/env bash
# Make sure a PostgreSQL server we can use as a superuser is reachable, and print
# ONE line on stdout: a libpq URL for its `postgres` database. Everything else
# goes to stderr, so callers can do `dsn=$(scripts/ensure-postgres.sh)`.
#
# Tried in order (first that works wins):
#   a. $ROWSYNC_TEST_DSN or $DATABASE_URL, if it accepts a connection;
#   b. a server already on 127.0.0.1:5432 (user postgres, trust auth);
#   c. the distro's packaged cluster(s) in /etc/postgresql, started if needed;
#   d. a throwaway cluster of our own in $ROWSYNC_PG_DIR (default /tmp/rowsync-pg),
#      port $ROWSYNC_PG_PORT (default 54329), created/started if needed;
#   e. no PostgreSQL installed at all: apt-get install postgresql, then c/d again.
# ROWSYNC_PG_THROWAWAY=1 skips a-c and goes straight to d (handy for testing,
# or to get a server whose settings we control, e.g. wal_level=logical).
set -uo pipefail

PG_DIR=${ROWSYNC_PG_DIR:-/tmp/rowsync-pg}
PG_PORT=${ROWSYNC_PG_PORT:-54329}
PG_DATA=$PG_DIR/data

log() { echo "ensure-postgres: $*" >&2; }

# True if we can run a query as given by the DSN. PGCONNECT_TIMEOUT keeps a
# black-holed host from hanging us; psql -X ignores any ~/.psqlrc.
can_query() {
    PGCONNECT_TIMEOUT=5 psql -d "$1" -XAtq -c 'select 1' >/dev/null 2>&1
}

found() { echo "$1"; exit 0; }

local_dsn() { echo "postgresql://postgres@127.0.0.1:$1/postgres"; }

# --- e. installing PostgreSQL (only when something is missing) ---------------
installed_once=
install_postgres() {
    [[ -n $installed_once ]] && return 1
    installed_once=1
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        log "PostgreSQL is not installed and I can't apt-get install it (need root + apt)"
        return 1
    fi
    log "installing PostgreSQL with apt-get (output below)..."
    # Output to stderr: stdout is reserved for the DSN. No stdin in CI.
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -q &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql
    } </dev/null >&2
}

server_bindir() {
    local d
    d=$(pg_config --bindir 2>/dev/null)
    if [[ -x $d/initdb ]]; then echo "$d"; return 0; fi
    # pg_config may be missing (it lives in libpq-dev) or point at a client-only dir.
    d=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -1)
    [[ -n $d && -x $d/initdb ]] && echo "$d"
}

# --- a. an explicitly given DSN ------------------------------------------------
try_given_dsn() {
    local dsn=${ROWSYNC_TEST_DSN:-${DATABASE_URL:-}}
    [[ -n $dsn ]] || return 1
    # Accept SQLAlchemy spellings (postgresql+psycopg://...) too; libpq doesn't.
    dsn=$(sed -E 's#^postgres(ql)?\+[A-Za-z0-9_]+://#postgresql://#' <<<"$dsn")
    if can_query "$dsn"; then found "$dsn"; fi
    log "given DSN ($dsn) does not answer; looking for another server"
    return 1
}

# --- b. something already listening on the standard port -----------------------
try_default_port() {
    local dsn
    dsn=$(local_dsn 5432)
    if can_query "$dsn"; then found "$dsn"; fi
    return 1
}

# --- c. the distro's packaged cluster(s) ------------------------------------------
try_packaged() {
    command -v pg_ctlcluster >/dev/null || return 1
    local conf ver port dsn i
    for conf in /etc/postgresql/*/main; do
        [[ -d $conf ]] || continue
        ver=$(basename "$(dirname "$conf")")
        port=$(pg_lsclusters -h 2>/dev/null | awk -v v="$ver" '$1 == v && $2 == "main" { print $3 }')
        port=${port:-5432}
        dsn=$(local_dsn "$port")
        # b. already covered 5432, but the cluster may live on another port.
        if can_query "$dsn"; then found "$dsn"; fi
        log "starting packaged cluster $ver/main (port $port)"
        # --skip-systemctl-redirect: containers/CI usually have no systemd.
        pg_ctlcluster --skip-systemctl-redirect "$ver" main start </dev/null >&2 ||
            log "pg_ctlcluster $ver main start failed (maybe already running)"
        for ((i = 0; i < 30; i++)); do
            pg_isready -q -h 127.0.0.1 -p "$port" && break
            sleep 1
        done
        if can_query "$dsn"; then found "$dsn"; fi
        log "cluster $ver/main does not accept user postgres on 127.0.0.1:$port without a password"
    done
    return 1
}

# --- d. our own throwaway cluster ---------------------------------------------------
try_throwaway() {
    local bindir dsn
    dsn=$(local_dsn "$PG_PORT")
    if can_query "$dsn"; then found "$dsn"; fi  # already running: reuse it
    bindir=$(server_bindir) || return 1

    # initdb/postgres refuse to run as root, so run them as the postgres OS user.
    local as_pg=()
    if [[ $(id -u) -eq 0 ]]; then
        id postgres >/dev/null 2>&1 || useradd --system --user-group --no-create-home postgres
        as_pg=(runuser -u postgres --)
    fi
    # cd: the server user may not be allowed into the caller's working directory.
    cd "${TMPDIR:-/tmp}" || return 1
    mkdir -p "$PG_DIR" && chmod 700 "$PG_DIR"
    [[ ${#as_pg[@]} -eq 0 ]] || chown postgres: "$PG_DIR"

    if [[ ! -f $PG_DATA/PG_VERSION ]]; then
        log "creating throwaway cluster in $PG_DATA"
        "${as_pg[@]}" "$bindir/initdb" -D "$PG_DATA" -A trust -U postgres -E UTF8 >/dev/null || return 1
        # Settings rowsync's tests need (logical decoding, many connections).
        # fsync stays on: we want the real durability behaviour.
        cat >>"$PG_DATA/postgresql.conf" <<EOF

# --- added by rowsync scripts/ensure-postgres.sh ---
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$PG_DIR'
wal_level = logical
max_replication_slots = 40
max_wal_senders = 40
max_connections = 300
EOF
    fi
    log "starting throwaway cluster on 127.0.0.1:$PG_PORT (log: $PG_DIR/log)"
    # A stale postmaster.pid (e.g. after a crash) is handled by pg_ctl itself.
    "${as_pg[@]}" "$bindir/pg_ctl" -D "$PG_DATA" -l "$PG_DIR/log" -w -t 30 start >&2 ||
        log "pg_ctl start failed; see $PG_DIR/log"
    if can_query "$dsn"; then found "$dsn"; fi
    return 1
}

if ! command -v psql >/dev/null; then
    install_postgres || { log "no psql and could not install PostgreSQL"; exit 1; }
fi

if [[ -z ${ROWSYNC_PG_THROWAWAY:-} ]]; then
    try_given_dsn
    try_default_port
    try_packaged
fi
try_throwaway
# Nothing worked: if the server binaries are simply missing, install and retry.
if ! server_bindir >/dev/null && install_postgres; then
    [[ -n ${ROWSYNC_PG_THROWAWAY:-} ]] || try_packaged
    try_throwaway
fi
log "could not find or start a usable PostgreSQL server"
exit 1
