-- Parking an oversized event: called by every writer's trigger, so it runs with the rights
-- of the installer (SECURITY DEFINER, fixed search_path) and writers need no privilege on
-- the overflow table. Parked events older than an hour (read by every listener long since)
-- are pruned on the way, skipping rows another writer is pruning: writers never wait.

CREATE OR REPLACE FUNCTION {schema}.park(ref bigint, payload text) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO {schema}.overflow (ref, payload) VALUES ($1, $2);
    DELETE FROM {schema}.overflow AS d WHERE d.ref IN (
        SELECT o.ref FROM {schema}.overflow AS o
        WHERE o.created_at < now() - interval '1 hour'
        FOR UPDATE SKIP LOCKED);
$$;
REVOKE ALL ON FUNCTION {schema}.park(bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION {schema}.park(bigint, text) TO PUBLIC;
