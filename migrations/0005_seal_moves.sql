-- Values before an update travel in its NOTIFY payload, and the listener routes by them (the
-- subscriptions the row leaves learn that it left). No read of the row can confirm them, and
-- anyone may NOTIFY: the trigger seals such an event, and a listener routes by the values
-- before only when the seal is genuine.
--
-- One seal for every message: a hash of the install secret and the message. A parked event's
-- message is its ref (digits), an update's is its payload (a JSON object): one can never be
-- taken for the other. Messages are text, which holds no NUL byte, and SHA-256's padding
-- always does: no sealed message extends another's seal.
CREATE FUNCTION {schema}.seal(message text) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT encode(sha256(convert_to(s.secret || ':' || $1, 'UTF8')), 'hex')
    FROM {schema}.settings AS s;
$$;
REVOKE ALL ON FUNCTION {schema}.seal(text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION {schema}.seal(ref bigint) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT {schema}.seal($1::text);
$$;

-- How a listener checks sealed events: whether each seal is the one of its message, in order.
CREATE FUNCTION {schema}.sealed(messages text[], seals text[]) RETURNS boolean[]
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(
        array_agg(m.seal IS NOT DISTINCT FROM {schema}.seal(m.message) ORDER BY m.i), '{{}}')
    FROM unnest($1, $2) WITH ORDINALITY AS m (message, seal, i);
$$;
REVOKE ALL ON FUNCTION {schema}.sealed(text[], text[]) FROM PUBLIC;

-- Whoever may read parked events back (the listener roles install was given) may check seals.
DO $$
DECLARE
    grantee regrole;
BEGIN
    FOR grantee IN
        SELECT DISTINCT a.grantee::regrole FROM pg_catalog.pg_proc AS p,
            pg_catalog.aclexplode(p.proacl) AS a
        WHERE p.oid = pg_catalog.format(
                '%I.parked(bigint[], text[], integer)', {schema_name})::regprocedure
            AND a.privilege_type = 'EXECUTE' AND a.grantee NOT IN (0, p.proowner)
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %s',
            pg_catalog.format('%I.sealed(text[], text[])', {schema_name})::regprocedure, grantee);
    END LOOP;
END
$$;
