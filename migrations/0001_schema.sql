-- rowsync's own objects, in a schema of their own (named by the installer, default "rowsync").
-- {schema} is replaced with the quoted schema name by psycopg.sql; braces are doubled elsewhere.

CREATE SCHEMA IF NOT EXISTS {schema};

-- Orders the changes of one row: row locks make two writers of a row take their numbers in
-- commit order. NO CACHE: a per-backend cache would break that order.
CREATE SEQUENCE IF NOT EXISTS {schema}.ref_seq;
GRANT USAGE ON SCHEMA {schema} TO PUBLIC;
GRANT USAGE ON SEQUENCE {schema}.ref_seq TO PUBLIC;

-- Events too large for one NOTIFY (8000 bytes) wait here; the notification carries only the ref.
CREATE TABLE IF NOT EXISTS {schema}.overflow (
    ref bigint PRIMARY KEY,
    payload text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS overflow_created_at ON {schema}.overflow (created_at);
-- Listeners read parked events (identifiers only, as NOTIFY payloads are); writers park them
-- through {schema}.park() (migration 0002), never touching the table themselves.
GRANT SELECT ON {schema}.overflow TO PUBLIC;
