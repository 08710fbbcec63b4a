-- pgflow-sa run control: cancellations, retries and concurrency limits.
-- Idempotent (IF NOT EXISTS): run by every install and upgrade. These tables only
-- add to pgflow's: no foreign key, trigger or column touches pgflow's own tables, so a
-- TypeScript pgflow 0.8.1 worker on the same database works as before (it ignores them).
CREATE SCHEMA IF NOT EXISTS pgflow_sa;

-- a run that cancel_run ended (pgflow's run row says 'failed'; this row says why)
CREATE TABLE IF NOT EXISTS pgflow_sa.run_cancellations (
  run_id uuid NOT NULL,
  reason text,
  cancelled_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT run_cancellations_pkey PRIMARY KEY (run_id)
);
COMMENT ON TABLE pgflow_sa.run_cancellations IS 'pgflow-sa: v1 cancelled runs';

-- a run that retry_run started: the run it retries, and whether the tasks that
-- completed there are completed here with the same output instead of running again
CREATE TABLE IF NOT EXISTS pgflow_sa.run_retries (
  run_id uuid NOT NULL,
  retry_of uuid NOT NULL,
  reuse_outputs boolean NOT NULL DEFAULT false,
  created_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT run_retries_pkey PRIMARY KEY (run_id)
);
CREATE INDEX IF NOT EXISTS idx_run_retries_retry_of ON pgflow_sa.run_retries (retry_of);
COMMENT ON TABLE pgflow_sa.run_retries IS 'pgflow-sa: v1 runs started by retry_run';

-- the limits the workers of a flow hold across all processes: tasks of the flow
-- started at once, tasks of each step ({"step": n}), runs in progress
CREATE TABLE IF NOT EXISTS pgflow_sa.flow_limits (
  flow_slug text NOT NULL,
  max_concurrency integer,
  max_running_runs integer,
  step_limits jsonb NOT NULL DEFAULT '{}'::jsonb,
  updated_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT flow_limits_pkey PRIMARY KEY (flow_slug),
  CONSTRAINT flow_limits_max_concurrency_check CHECK (max_concurrency >= 1),
  CONSTRAINT flow_limits_max_running_runs_check CHECK (max_running_runs >= 1),
  CONSTRAINT flow_limits_step_limits_check CHECK (jsonb_typeof(step_limits) = 'object')
);
COMMENT ON TABLE pgflow_sa.flow_limits IS 'pgflow-sa: v1 concurrency limits (written by workers)';

-- runs of a flow with max_running_runs that a worker let start (their first task
-- claimed); rows of finished runs are removed by the next claim of the flow
CREATE TABLE IF NOT EXISTS pgflow_sa.admitted_runs (
  run_id uuid NOT NULL,
  flow_slug text NOT NULL,
  admitted_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT admitted_runs_pkey PRIMARY KEY (run_id)
);
CREATE INDEX IF NOT EXISTS idx_admitted_runs_flow_slug ON pgflow_sa.admitted_runs (flow_slug);
COMMENT ON TABLE pgflow_sa.admitted_runs IS 'pgflow-sa: v1 runs admitted under a run limit';
