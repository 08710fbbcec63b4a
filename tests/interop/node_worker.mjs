// A TypeScript-side pgflow worker for the interop tests, built on PgflowSqlClient
// from @pgflow/core 0.8.1. Usage:
//   node node_worker.mjs start <flow> <count>   start runs, print their ids (JSON)
//   node node_worker.mjs work <flow>            run tasks until SIGTERM, then print
//                                               the tasks it completed (JSON lines)
import { randomUUID } from 'node:crypto';
import postgres from 'postgres';
import { PgflowSqlClient } from '@pgflow/core';

function connect(url) {
  // a socket URL has no host part ("postgresql://user@/db?host=/dir"); URL wants one
  const parsed = new URL(url.replace('@/', '@localhost/'));
  const socketDir = parsed.searchParams.get('host');
  if (socketDir && socketDir.startsWith('/')) {
    const port = parsed.port || '5432';
    return postgres({
      path: `${socketDir}/.s.PGSQL.${port}`,
      user: decodeURIComponent(parsed.username) || 'postgres',
      password: decodeURIComponent(parsed.password) || undefined,
      database: parsed.pathname.slice(1),
      max: 2,
      onnotice: () => {},
    });
  }
  return postgres(url, { max: 2, onnotice: () => {} });
}

// The same handlers as tests/test_interop.py's Python flow.
const handlers = {
  double: (input) => ({ value: input.run.i * 2, by: 'node' }),
  label: (input) => ({ text: `n${input.double.value}`, by: 'node' }),
};

const [mode, flow, count] = process.argv.slice(2);
const sql = connect(process.env.DATABASE_URL);
const client = new PgflowSqlClient(sql);

if (mode === 'start') {
  const ids = [];
  for (let i = 0; i < Number(count); i++) {
    const run = await client.startFlow(flow, { i, source: 'node' });
    ids.push(run.run_id);
  }
  console.log(JSON.stringify(ids));
  await sql.end();
} else if (mode === 'work') {
  const workerId = randomUUID();
  await sql`INSERT INTO pgflow.workers (worker_id, queue_name, function_name)
            VALUES (${workerId}, ${flow}, 'node-interop')`;
  let stopping = false;
  process.on('SIGTERM', () => { stopping = true; });
  const done = [];
  console.error(`node worker ${workerId} ready`);
  while (!stopping) {
    const messages = await client.readMessages(flow, 10, 10, 1, 50);
    if (messages.length === 0) continue;
    const tasks = await client.startTasks(flow, messages.map((m) => m.msg_id), workerId);
    for (const task of tasks) {
      const output = handlers[task.step_slug](task.input);
      await client.completeTask(task, output);
      done.push({ run_id: task.run_id, step_slug: task.step_slug, task_index: task.task_index });
    }
  }
  for (const item of done) console.log(JSON.stringify(item));
  await sql.end();
}
