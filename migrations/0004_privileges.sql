-- Least privilege: nothing of rowsync's belongs to PUBLIC. Any role may LISTEN, but the log,
-- the parked events and the saved positions name rows that role may not be allowed to read,
-- and the functions move positions and history that listeners rely on. Install grants what
-- a listener needs to the roles it is given (rowsync.privileges); writers need nothing,
-- since the trigger functions run as their owner.
REVOKE ALL ON SCHEMA {schema} FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA {schema} FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA {schema} FROM PUBLIC;

-- Trigger functions installed earlier ran as the writer, who no longer may take a ref or
-- park: they run as their owner from now on, so no write fails before they are reinstalled.
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure FROM pg_catalog.pg_proc AS p
        JOIN pg_catalog.pg_namespace AS n ON n.oid = p.pronamespace
        WHERE n.nspname = {schema_name} AND p.prorettype = 'pg_catalog.trigger'::regtype
    LOOP
        EXECUTE pg_catalog.format('ALTER FUNCTION %s SECURITY DEFINER', f);
    END LOOP;
END
$$;

-- What install decides for every caller: the retention no prune may go below, and the key
-- that seals an overflow reference (only a stub whose seal matches its ref is honoured).
CREATE TABLE {schema}.settings (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    retention interval NOT NULL DEFAULT interval '1 hour',
    secret text NOT NULL DEFAULT gen_random_uuid()::text || gen_random_uuid()::text
);
INSERT INTO {schema}.settings DEFAULT VALUES;

CREATE FUNCTION {schema}.seal(ref bigint) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT encode(sha256(convert_to(s.secret || ':' || $1::text, 'UTF8')), 'hex')
    FROM {schema}.settings AS s;
$$;
REVOKE ALL ON FUNCTION {schema}.seal(bigint) FROM PUBLIC;

-- Parking returns the seal the notification carries. Only trigger functions (as the owner)
-- call it, with refs fresh from the sequence; a ref parked twice keeps its first payload
-- rather than fail the writer's transaction.
DROP FUNCTION {schema}.park(bigint, text);
CREATE FUNCTION {schema}.park(ref bigint, payload text) RETURNS text
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO {schema}.overflow (ref, payload) VALUES ($1, $2) ON CONFLICT (ref) DO NOTHING;
    DELETE FROM {schema}.overflow AS d WHERE d.ref IN (
        SELECT o.ref FROM {schema}.overflow AS o
        WHERE o.created_at < now() - interval '1 hour'
        FOR UPDATE SKIP LOCKED);
    SELECT {schema}.seal($1);
$$;
REVOKE ALL ON FUNCTION {schema}.park(bigint, text) FROM PUBLIC;

-- How a listener reads parked events back: each (ref, seal) of the notifications, whether
-- the seal is genuine, the payload's size, and the payload itself unless it is larger than
-- the listener will hold.
CREATE FUNCTION {schema}.parked(refs bigint[], seals text[], max_bytes integer)
RETURNS TABLE (ref bigint, sealed boolean, bytes integer, payload text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT r.ref, r.seal IS NOT DISTINCT FROM {schema}.seal(r.ref) AS sealed,
        octet_length(o.payload),
        CASE WHEN r.seal = {schema}.seal(r.ref) AND octet_length(o.payload) <= $3
            THEN o.payload END
    FROM unnest($1, $2) AS r (ref, seal)
    LEFT JOIN {schema}.overflow AS o ON o.ref = r.ref;
$$;
REVOKE ALL ON FUNCTION {schema}.parked(bigint[], text[], integer) FROM PUBLIC;

-- A saved position belongs to the role that first saved it: another role's save is refused
-- (false), so no one can move a consumer past what it has not read.
ALTER TABLE {schema}.cursors ADD COLUMN owner name NOT NULL DEFAULT session_user;
DROP FUNCTION {schema}.save_cursor(text, pg_snapshot);
CREATE FUNCTION {schema}.save_cursor(consumer text, last_read pg_snapshot) RETURNS boolean
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH saved AS (
        INSERT INTO {schema}.cursors AS c (consumer, last_read, owner)
        VALUES ($1, $2, session_user)
        ON CONFLICT (consumer) DO UPDATE SET last_read = excluded.last_read, saved_at = now()
        WHERE c.owner = excluded.owner
        RETURNING 1
    )
    SELECT EXISTS (SELECT FROM saved);
$$;
REVOKE ALL ON FUNCTION {schema}.save_cursor(text, pg_snapshot) FROM PUBLIC;

-- Each prune that removes rows is counted, and the range of xids it removed is kept: a
-- reader that saw no prune since its last read lost nothing; one that saw exactly one lost
-- rows only if an xid of that range was not visible to its position (past its xmax, or in
-- progress then); one that missed several compares the newest xid ever pruned (xid).
ALTER TABLE {schema}.log_pruned
    ADD COLUMN prunes bigint NOT NULL DEFAULT 1,
    ADD COLUMN low xid8,
    ADD COLUMN high xid8;

-- Pruning keeps at least the installed retention whatever the caller asks, and takes turns
-- through a row lock on the settings (SKIP LOCKED: the others skip), which only roles that
-- may update rowsync's settings can hold; an advisory lock could be held by anyone. A
-- listener passes its position (upto): it never prunes a row it has not read itself.
DROP FUNCTION {schema}.prune_log(interval, integer);
CREATE FUNCTION {schema}.prune_log(
    keep interval, batch integer DEFAULT 50000, upto pg_snapshot DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    floor interval;
    oldest xid8;
    newest xid8;
    removed bigint;
BEGIN
    SELECT s.retention INTO floor FROM {schema}.settings AS s FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    WITH gone AS (
        DELETE FROM {schema}.log WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM {schema}.log
            WHERE at < now() - greatest(keep, floor)
                AND (upto IS NULL OR pg_visible_in_snapshot(xid, upto))
            LIMIT batch))
        RETURNING xid
    )
    SELECT min(xid), max(xid), count(*) INTO oldest, newest, removed FROM gone;
    IF newest IS NOT NULL THEN
        INSERT INTO {schema}.log_pruned AS p (xid, low, high) VALUES (newest, oldest, newest)
        ON CONFLICT (only_row) DO UPDATE SET xid = greatest(p.xid, excluded.xid),
            prunes = p.prunes + 1, low = excluded.low, high = excluded.high;
    END IF;
    RETURN removed;
END
$$;
REVOKE ALL ON FUNCTION {schema}.prune_log(interval, integer, pg_snapshot) FROM PUBLIC;
