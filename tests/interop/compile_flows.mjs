// The flows of tests/interop/flows.py, defined with @pgflow/dsl 0.8.1.
// Prints {flow_slug: [statements]} as JSON.
import { Flow, compileFlow } from '@pgflow/dsl';

const h = async (input) => input;
const flows = [];

flows.push(new Flow({ slug: 'chain' })
  .step({ slug: 'a' }, h)
  .step({ slug: 'b', dependsOn: ['a'] }, h)
  .step({ slug: 'c', dependsOn: ['b'] }, h));

flows.push(new Flow({ slug: 'diamond', timeout: 10 })
  .step({ slug: 'start' }, h)
  .step({ slug: 'left', dependsOn: ['start'] }, h)
  .step({ slug: 'right', dependsOn: ['start'], maxAttempts: 5 }, h)
  .step({ slug: 'join', dependsOn: ['left', 'right'] }, h));

flows.push(new Flow({ slug: 'root_map' }).map({ slug: 'double' }, h));

flows.push(new Flow({ slug: 'dependent_map' })
  .step({ slug: 'list_items' }, h)
  .map({ slug: 'each_item', array: 'list_items' }, h));

flows.push(new Flow({ slug: 'map_reduce', baseDelay: 2 })
  .map({ slug: 'square', timeout: 5 }, h)
  .step({ slug: 'total', dependsOn: ['square'] }, h));

flows.push(new Flow({ slug: 'every_option', maxAttempts: 5, baseDelay: 2, timeout: 30 })
  .step({ slug: 'first', maxAttempts: 7, baseDelay: 3, timeout: 11, startDelay: 0 }, h)
  .step({ slug: 'second', dependsOn: ['first'], startDelay: 120 }, h)
  .map({ slug: 'third', array: 'second', maxAttempts: 1, baseDelay: 1, timeout: 3, startDelay: 9 }, h));

flows.push(new Flow({ slug: 'defaults_omitted' }).step({ slug: 'only' }, h));

flows.push(new Flow({ slug: 'explicit_defaults', maxAttempts: 3, baseDelay: 5, timeout: 60 })
  .step({ slug: 'only', maxAttempts: 3 }, h));

flows.push(new Flow({ slug: 'many_roots' })
  .step({ slug: 'alpha' }, h)
  .step({ slug: 'beta' }, h)
  .step({ slug: 'gamma', dependsOn: ['beta', 'alpha'] }, h));

flows.push(new Flow({ slug: 'map_of_map' })
  .step({ slug: 'source' }, h)
  .map({ slug: 'first_pass', array: 'source' }, h)
  .map({ slug: 'second_pass', array: 'first_pass', timeout: 15 }, h)
  .step({ slug: 'collect', dependsOn: ['second_pass', 'source'] }, h));

let long = new Flow({ slug: 'long_flow', timeout: 20 })
  .step({ slug: 's00' }, h)
  .step({ slug: 's01', dependsOn: ['s00'] }, h);
const pad = (n) => String(n).padStart(2, '0');
for (let i = 2; i < 24; i++) {
  const opts = { slug: `s${pad(i)}`, dependsOn: [`s${pad(i - 1)}`, `s${pad(i - 2)}`] };
  if (i % 5 === 0) opts.maxAttempts = i;
  long = long.step(opts, h);
}
flows.push(long);

flows.push(new Flow({ slug: 'Mixed_Case_Flow2' })
  .step({ slug: 'Fetch_Data' }, h)
  .map({ slug: 'ProcessEach', array: 'Fetch_Data', baseDelay: 10 }, h)
  .step({ slug: 'summarise_all', dependsOn: ['ProcessEach', 'Fetch_Data'], startDelay: 1 }, h));

const out = {};
for (const flow of flows) out[flow.slug] = compileFlow(flow);
console.log(JSON.stringify(out));
