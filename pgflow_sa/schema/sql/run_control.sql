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

-- The output a retry that reuses outputs gives a task: the same task's, completed in
-- the run it retries or in the nearest run before it along a chain of reusing retries
-- (a retry that ended before its task was claimed hands the original's on); no row
-- when there is none. Its inputs are the same: every step it depends on completed in
-- that run too, and is reused in turn from there or a nearer run that reused it.
-- VOLATILE, so that it reads with a snapshot of its own: a claim's statement may start
-- a task created by a transaction that committed after the statement's snapshot (its
-- message is read by pgmq.read, which takes a new one), and the retry's row committed
-- with it. Primary-key lookups.
CREATE OR REPLACE FUNCTION pgflow_sa.reused_output(
  p_run_id uuid, p_step_slug text, p_task_index integer
) RETURNS TABLE (reused_output jsonb)
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $reused$
#variable_conflict use_column
BEGIN
  RETURN QUERY
  WITH RECURSIVE chain (run_id, depth) AS (
    SELECT rr.retry_of, 1 FROM pgflow_sa.run_retries rr
    WHERE rr.run_id = p_run_id AND rr.reuse_outputs
    UNION ALL
    SELECT rr.retry_of, chain.depth + 1 FROM chain
    JOIN pgflow_sa.run_retries rr ON rr.run_id = chain.run_id AND rr.reuse_outputs
    WHERE chain.depth < 100
  )
  SELECT o.output FROM chain
  JOIN pgflow.step_tasks o
    ON o.run_id = chain.run_id AND o.step_slug = p_step_slug
   AND o.task_index = p_task_index AND o.status = 'completed'
  ORDER BY chain.depth
  LIMIT 1;
END
$reused$;
COMMENT ON FUNCTION pgflow_sa.reused_output(uuid, text, integer) IS
  'pgflow-sa: v1 the output a reusing retry gives a task';
