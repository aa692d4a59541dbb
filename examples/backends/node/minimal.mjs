// The smallest wsbridge backend worth copying: read the chat stream as one consumer of a group,
// answer each message on its channel with POST /send, and acknowledge it (XACK) only after the
// gateway accepted the answer (202). An entry whose answer was refused, or that a crash left
// unacknowledged, stays pending and is read again from this consumer's pending list ('0') before
// new entries ('>'). backend.mjs beside it adds the rest: reclaiming a dead consumer's entries,
// dead letters, MessagePack, Redis Cluster, the whiteboard.
//
//   npm ci --prefix examples/backends/node && node examples/backends/node/minimal.mjs
import { hostname } from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';
import { createClient } from 'redis';

const env = process.env;
const api = env.WSBRIDGE_API ?? 'http://127.0.0.1:8081';
const stream = `${env.PREFIX ?? 'wsbridge'}:in:${env.STREAM ?? 'chat'}`;
const group = env.GROUP ?? 'backend';
const consumer = env.CONSUMER ?? `${hostname()}-${process.pid}`;

/** POST /send; the gateway's HTTP status, or 0 when it could not be reached. */
async function postSend(body) {
  const headers = { 'content-type': 'application/json' };
  const request = { method: 'POST', headers, body: JSON.stringify(body) };
  return fetch(`${api}/send`, request).then((r) => r.status, () => 0);
}

const r = await createClient({ url: env.REDIS_URL ?? 'redis://127.0.0.1:6379' }).connect();
try { // the gateway creates its groups too; this one starts at the stream's beginning as theirs do
  await r.xGroupCreate(stream, group, '0', { MKSTREAM: true });
} catch (e) {
  if (!e.message.includes('BUSYGROUP')) throw e;
}
console.log(`reading ${stream} as ${consumer} in group ${group}`);
let start = '0'; // first our own pending entries, then new ones
for (;;) {
  const reply = await r.xReadGroup(group, consumer, { key: stream, id: start }, { COUNT: 10, BLOCK: 5000 });
  const entries = reply?.[0]?.messages ?? [];
  if (start === '0' && entries.length === 0) start = '>';
  for (const { id, message: fields } of entries) {
    const data = fields?.encoding === 'json' ? JSON.parse(fields.data) : null;
    if (typeof data?.channel !== 'string' || data.channel === '' || !('text' in data)) {
      await r.xAck(stream, group, id);
      console.log(`${id} not a chat message: acknowledged`);
      continue;
    }
    const who = fields.user || fields.connection;
    const status = await postSend({ to: { channel: data.channel }, data: { from: who, text: data.text } });
    if (status !== 202) {
      console.log(`${id} chat ${data.channel}: the gateway answered ${status}, left pending`);
      await sleep(1000);
      start = '0';
      break;
    }
    await r.xAck(stream, group, id);
    console.log(`${id} chat ${data.channel} from ${who}: sent, acknowledged`);
  }
}
