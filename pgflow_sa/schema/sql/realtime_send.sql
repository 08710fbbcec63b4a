-- pgflow-sa's stand-in for Supabase Realtime's realtime.send on plain PostgreSQL.
-- It publishes each pgflow event with pg_notify on the "pgflow" channel as
-- {"topic": ..., "event": ..., "payload": ...}. NOTIFY payloads must stay under
-- 8000 bytes, so a larger event is replaced by a trimmed one carrying only its
-- identifiers and status ("trimmed": true); listeners read the rest from the
-- pgflow tables. Setting pgflow_sa.notify = 'off' (per session, role or
-- database) turns publishing off. It never raises on payload size.
CREATE SCHEMA IF NOT EXISTS realtime;

CREATE FUNCTION realtime.send(
    payload jsonb,
    event text,
    topic text,
    private boolean DEFAULT true
) RETURNS void
LANGUAGE plpgsql
SET search_path = ''
AS $function$
DECLARE
    message text;
    small jsonb;
BEGIN
    IF coalesce(current_setting('pgflow_sa.notify', true), '') = 'off' THEN
        RETURN;
    END IF;
    message := jsonb_build_object('topic', topic, 'event', event, 'payload', payload)::text;
    IF octet_length(message) > 7800 THEN
        small := jsonb_strip_nulls(jsonb_build_object(
            'event_type', payload -> 'event_type',
            'run_id', payload -> 'run_id',
            'flow_slug', payload -> 'flow_slug',
            'step_slug', payload -> 'step_slug',
            'status', payload -> 'status',
            'task_index', payload -> 'task_index',
            'remaining_steps', payload -> 'remaining_steps',
            'remaining_tasks', payload -> 'remaining_tasks',
            'started_at', payload -> 'started_at',
            'completed_at', payload -> 'completed_at',
            'failed_at', payload -> 'failed_at'
        )) || jsonb_build_object('trimmed', true);
        message := jsonb_build_object('topic', topic, 'event', event, 'payload', small)::text;
        IF octet_length(message) > 7800 THEN
            message := jsonb_build_object(
                'topic', left(topic, 200), 'event', left(event, 300),
                'payload', jsonb_build_object('trimmed', true)
            )::text;
        END IF;
    END IF;
    PERFORM pg_notify('pgflow', message);
END;
$function$;

COMMENT ON FUNCTION realtime.send(jsonb, text, text, boolean)
    IS 'pgflow-sa: publishes pgflow events with pg_notify on channel "pgflow"';
