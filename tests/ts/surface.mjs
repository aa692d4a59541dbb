// The hand-written types cannot drift from the module unnoticed: every export of
// wsbridge-client.mjs, every public member of WsBridgeClient (prototype and instance) and every
// event it emits must be declared in wsbridge-client.d.mts, and every declared event must be
// one it emits. (tsc checks the declarations against typed code; this checks them against the
// code.) Run by tests/run.sh: node tests/ts/surface.mjs
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const dir = fileURLToPath(new URL('../../examples/js/', import.meta.url));
const source = readFileSync(`${dir}wsbridge-client.mjs`, 'utf8');
const types = readFileSync(`${dir}wsbridge-client.d.mts`, 'utf8');
const mod = await import(`${dir}wsbridge-client.mjs`);
const problems = [];

const exported = new Set([...types.matchAll(/^export (?:default |class |function |type |interface )(\w+)/gm)].map((m) => m[1]));
for (const name of Object.keys(mod)) {
  if (name === 'default' ? !/^export default \w+;/m.test(types) : !exported.has(name)) problems.push(`export ${name}`);
}

const start = types.indexOf('export class WsBridgeClient<');
const classBody = types.slice(start, types.indexOf('\n}\n', start));
const client = new mod.WsBridgeClient({ url: 'ws://127.0.0.1:9/ws', WebSocket: class {} }); // never connects
const members = [
  ...Object.getOwnPropertyNames(mod.WsBridgeClient.prototype).filter((n) => n !== 'constructor'),
  ...Object.keys(client),
];
for (const name of members) {
  if (!new RegExp(`^\\s+(?:readonly |get )?${name}[<(:]`, 'm').test(classBody)) problems.push(`WsBridgeClient.${name}`);
}

const eventsStart = types.indexOf('export interface WsBridgeClientEvents');
const eventsBody = types.slice(eventsStart, types.indexOf('\n}\n', eventsStart));
const declared = new Set([...eventsBody.matchAll(/^ {2}(\w+): \[/gm)].map((m) => m[1]));
// `join` and `leave` are emitted under the frame's own type (`this.#emit(f.type, ...)`).
const emitted = new Set(['join', 'leave', ...[...source.matchAll(/#emit\('(\w+)'/g)].map((m) => m[1])]);
for (const e of emitted) if (!declared.has(e)) problems.push(`event ${e} is emitted but not in WsBridgeClientEvents`);
for (const e of declared) if (!emitted.has(e)) problems.push(`event ${e} is declared but never emitted`);

if (problems.length > 0) {
  console.error(`surface.mjs: wsbridge-client.d.mts does not declare what the module has:\n  ${problems.join('\n  ')}`);
  process.exit(1);
}
console.log(`surface.mjs: ${Object.keys(mod).length} exports, ${members.length} client members, ${declared.size} events declared`);
