-- The change log, for durable mode (RowSync(durable=True): NOTIFY only wakes the listener up)
-- and for capture="stream" (no NOTIFY in the writer's transaction at all; the listener polls).
-- Triggers append one row per change; every listener reads the log from its own position.
--
-- Positions are snapshots, not ids: a sequence value is taken at insert, a row becomes
-- visible at commit, so a smaller id can appear after a larger one was read. A reader
-- that remembers the snapshot it last read under (pg_snapshot: xmin, xmax, in-progress
-- xids) next reads exactly the rows of transactions that were not visible then and are now:
-- xid >= xmax(previous), or xid among its in-progress xids. Nothing is skipped, nothing read
-- twice, and a long transaction delays only its own rows.
CREATE TABLE IF NOT EXISTS {schema}.log (
    id bigint GENERATED ALWAYS AS IDENTITY,
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    at timestamptz NOT NULL DEFAULT now(),
    payload text NOT NULL
);
CREATE INDEX IF NOT EXISTS log_xid ON {schema}.log (xid);
-- Appended in time order: a BRIN index serves pruning by age for a few pages of index.
CREATE INDEX IF NOT EXISTS log_at ON {schema}.log USING brin (at);
-- Payloads carry identifiers only, as NOTIFY payloads do (and any role may LISTEN).
-- Writers never touch the table themselves: log-mode trigger functions run as their owner.
GRANT SELECT ON {schema}.log TO PUBLIC;

-- Saved positions, so a process that restarts under the same consumer name resumes there.
CREATE TABLE IF NOT EXISTS {schema}.cursors (
    consumer text PRIMARY KEY,
    last_read pg_snapshot NOT NULL,
    saved_at timestamptz NOT NULL DEFAULT now()
);
GRANT SELECT ON {schema}.cursors TO PUBLIC;

CREATE OR REPLACE FUNCTION {schema}.save_cursor(consumer text, last_read pg_snapshot)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO {schema}.cursors AS c (consumer, last_read) VALUES ($1, $2)
    ON CONFLICT (consumer) DO UPDATE SET last_read = excluded.last_read, saved_at = now();
$$;
REVOKE ALL ON FUNCTION {schema}.save_cursor(text, pg_snapshot) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION {schema}.save_cursor(text, pg_snapshot) TO PUBLIC;

-- The newest xid pruned from the log: a reader whose position is older than it may have
-- lost rows, and must announce a gap.
CREATE TABLE IF NOT EXISTS {schema}.log_pruned (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    xid xid8 NOT NULL
);
GRANT SELECT ON {schema}.log_pruned TO PUBLIC;

-- Retention: rows older than keep go, a bounded batch at a time, by one pruner at a time
-- (every listener calls it now and then; the others skip).
CREATE OR REPLACE FUNCTION {schema}.prune_log(keep interval, batch integer DEFAULT 50000)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    newest xid8;
    removed bigint;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('rowsync prune ' || {schema_name})) THEN
        RETURN 0;
    END IF;
    WITH gone AS (
        DELETE FROM {schema}.log WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM {schema}.log WHERE at < now() - keep LIMIT batch))
        RETURNING xid
    )
    SELECT max(xid), count(*) INTO newest, removed FROM gone;
    IF newest IS NOT NULL THEN
        INSERT INTO {schema}.log_pruned AS p (xid) VALUES (newest)
        ON CONFLICT (only_row) DO UPDATE SET xid = greatest(p.xid, excluded.xid);
    END IF;
    RETURN removed;
END
$$;
REVOKE ALL ON FUNCTION {schema}.prune_log(interval, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION {schema}.prune_log(interval, integer) TO PUBLIC;
