-- pgflow-sa schedules: flows started at cron ticks by the running workers.
-- Idempotent (IF NOT EXISTS): run by every install and upgrade.
CREATE SCHEMA IF NOT EXISTS pgflow_sa;

CREATE TABLE IF NOT EXISTS pgflow_sa.schedules (
  name text NOT NULL,
  flow_slug text NOT NULL,
  cron text NOT NULL,
  timezone text NOT NULL DEFAULT 'UTC',
  input jsonb,
  input_function text,
  catch_up text NOT NULL DEFAULT 'latest',
  catch_up_limit integer NOT NULL DEFAULT 10,
  next_fire_at timestamptz,
  last_fired_tick timestamptz,
  paused boolean NOT NULL DEFAULT false,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT schedules_pkey PRIMARY KEY (name),
  CONSTRAINT schedules_catch_up_check CHECK (catch_up IN ('latest', 'skip', 'all')),
  CONSTRAINT schedules_catch_up_limit_check CHECK (catch_up_limit >= 1)
);
CREATE INDEX IF NOT EXISTS idx_schedules_flow_slug ON pgflow_sa.schedules (flow_slug);
COMMENT ON TABLE pgflow_sa.schedules IS
  'pgflow-sa: v1 schedules (next_fire_at NULL: computed by the next worker that looks)';

-- one row per tick that started (or tried to start) a run; the primary key is what
-- makes a tick start one run however many workers race for it
CREATE TABLE IF NOT EXISTS pgflow_sa.schedule_runs (
  schedule_name text NOT NULL,
  tick timestamptz NOT NULL,
  flow_slug text NOT NULL,
  run_id uuid,
  manual boolean NOT NULL DEFAULT false,
  error text,
  fired_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT schedule_runs_pkey PRIMARY KEY (schedule_name, tick)
);
CREATE INDEX IF NOT EXISTS idx_schedule_runs_run_id ON pgflow_sa.schedule_runs (run_id);
COMMENT ON TABLE pgflow_sa.schedule_runs IS 'pgflow-sa: v1 runs started by schedules';
