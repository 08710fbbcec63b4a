-- pgflow-sa's stand-in for Supabase Realtime's realtime.send on plain PostgreSQL.
-- It publishes each pgflow event with pg_notify on the "pgflow" channel as
-- {"topic": "pgflow:run:<run_id>", "event": ..., "payload": ...}.
--
-- Any role that can connect to the database can LISTEN on any channel: no grant
-- is needed and none can be revoked. So by default the payload is a hint that
-- carries only identifiers and status (event_type, run_id, flow_slug, step_slug,
-- status, task_index, where present), never run input, step output or error
-- messages; listeners read the rest from the pgflow tables, which need grants.
--
-- pgflow_sa.notify (per session, role or database, e.g.
-- ALTER DATABASE app SET pgflow_sa.notify = 'full') chooses what is published:
--   'off'   nothing;
--   'full'  the whole payload, readable by every role that can connect;
--   other   (unset, '', 'hints', anything else) the hint.
-- NOTIFY payloads must stay under 8000 bytes: a full payload that would not fit
-- is replaced by the hint with "trimmed": true, and a hint that would not fit by
-- the topic and event alone (both cut short) with "trimmed": true. It never
-- raises on what pgflow passes it.
--
-- Installed and replaced by pgflow-sa's installer with CREATE OR REPLACE; the
-- installer knows its own publisher by the COMMENT ("pgflow-sa: v<N> ...") and
-- replaces one with a lower version (or none: the first publisher had none).
CREATE SCHEMA IF NOT EXISTS realtime;

CREATE OR REPLACE FUNCTION realtime.send(
    payload jsonb,
    event text,
    topic text,
    private boolean DEFAULT true
) RETURNS void
LANGUAGE plpgsql
SET search_path = ''
AS $function$
DECLARE
    mode text := coalesce(current_setting('pgflow_sa.notify', true), '');
    hint jsonb;
    message text;
BEGIN
    IF mode = 'off' THEN
        RETURN;
    END IF;
    IF mode = 'full' THEN
        message := jsonb_build_object('topic', topic, 'event', event, 'payload', payload)::text;
        IF octet_length(message) <= 7800 THEN
            PERFORM pg_notify('pgflow', message);
            RETURN;
        END IF;
    END IF;
    -- only scalar identifiers and status: a key holding anything else is left out
    SELECT coalesce(jsonb_object_agg(field.key, field.value), '{}'::jsonb)
      INTO hint
      FROM jsonb_each(CASE WHEN jsonb_typeof(payload) = 'object' THEN payload END) AS field
     WHERE field.key IN ('event_type', 'run_id', 'flow_slug', 'step_slug', 'status', 'task_index')
       AND jsonb_typeof(field.value) IN ('string', 'number');
    IF mode = 'full' THEN
        hint := hint || jsonb_build_object('trimmed', true);
    END IF;
    message := jsonb_build_object('topic', topic, 'event', event, 'payload', hint)::text;
    IF octet_length(message) > 7800 THEN
        message := jsonb_build_object(
            'topic', left(topic, 200), 'event', left(event, 300),
            'payload', jsonb_build_object('trimmed', true)
        )::text;
    END IF;
    PERFORM pg_notify('pgflow', message);
END;
$function$;

COMMENT ON FUNCTION realtime.send(jsonb, text, text, boolean)
    IS 'pgflow-sa: v2 publishes pgflow event hints (ids and status; pgflow_sa.notify = full for whole payloads, off for none) with pg_notify on channel "pgflow"';
