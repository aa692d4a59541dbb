// docs/try-it.md's "Try it: two clients", for real: two replicas, the Python backend (examples/backends/python/backend.py) and
// two terminal chat clients (examples/js/chat.mjs, on wsbridge-client.mjs) on different
// replicas. Lines typed in one reach both; when one client's replica is killed it fails over,
// resumes its channel and gets what was said meanwhile, exactly once.

import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';

import { ROOT, killAll, startGateway, startProcess, startRedis, uniquePrefix } from './harness.mjs';

after(killAll);

const CHAT = path.join(ROOT, 'examples', 'js', 'chat.mjs');
const BACKEND = path.join(ROOT, 'examples', 'backends', 'python', 'backend.py');
// Node 20/21 need this flag for a global WebSocket; pass it on when the tests run with it.
const NODE_FLAGS = process.execArgv.filter((flag) => flag === '--experimental-websocket');

const parsed = (lines) =>
  lines.map((line) => {
    try {
      return JSON.parse(line);
    } catch {
      assert.fail(`chat.mjs printed a line that is not JSON: ${line}`);
    }
  });
const texts = (lines) => parsed(lines).filter((e) => e.message).map((e) => e.message.data.text);
const count = (lines, key, pred = () => true) => parsed(lines).filter((e) => e[key] && pred(e[key])).length;

test('two chat clients on two replicas talk through the Python backend, and one survives its replica', async () => {
  const redis = await startRedis();
  const prefix = uniquePrefix('chat');
  const a = await startGateway({ redisUrl: redis.url, prefix });
  const b = await startGateway({ redisUrl: redis.url, prefix });
  const backend = startProcess('python3', [BACKEND, '--block-ms', '500'], {
    env: { REDIS_URL: redis.url, WSBRIDGE_API: b.apiUrl, PREFIX: prefix },
  });
  const alice = startProcess(process.execPath, [...NODE_FLAGS, CHAT, `${a.wsUrl},${b.wsUrl}`]);
  const bob = startProcess(process.execPath, [...NODE_FLAGS, CHAT, b.wsUrl]);
  for (const [name, p] of [['alice', alice], ['bob', bob]]) {
    await p.until((l) => count(l, 'subscribed', (s) => s.channel === 'room:lobby') === 1, `${name} in room:lobby`);
  }

  alice.write('hello from alice');
  for (const [name, p] of [['alice', alice], ['bob', bob]]) {
    await p.until((l) => texts(l).includes('hello from alice'), `${name} to see alice's line`);
  }
  await alice.until((l) => count(l, 'ack') === 1, 'the ack of alice line');
  const hello = parsed(bob.lines).find((e) => e.message)?.message;
  assert.equal(hello.channel, 'room:lobby');
  assert.match(hello.offset, /^\S+:\d+-\d+$/, 'a history channel message carries its offset');

  // Alice's replica dies. Bob talks while she is away; she fails over to B and resumes.
  await a.kill();
  bob.write('said while alice was away');
  await alice.until(
    (l) => count(l, 'subscribed', (s) => s.channel === 'room:lobby' && s.resumed) === 1,
    'alice to resume room:lobby on B'
  );
  const resumed = parsed(alice.lines).find((e) => e.subscribed?.resumed).subscribed;
  assert.equal(resumed.recovered, true, 'the history made alice whole');
  const welcomes = parsed(alice.lines).filter((e) => e.welcome);
  assert.equal(welcomes.at(-1).welcome.url, b.wsUrl, 'alice is now on B');
  await alice.until((l) => texts(l).includes('said while alice was away'), 'alice to get what bob said');

  alice.write('back on B');
  await bob.until((l) => texts(l).includes('back on B'), 'bob to see alice again');
  await alice.until((l) => texts(l).includes('back on B'), 'alice to see her own line');
  assert.deepEqual(texts(alice.lines), ['hello from alice', 'said while alice was away', 'back on B']);
  assert.deepEqual(texts(bob.lines), ['hello from alice', 'said while alice was away', 'back on B']);
  assert.equal(count(alice.lines, 'error'), 0, alice.lines.join('\n'));
  assert.equal(count(bob.lines, 'error'), 0, bob.lines.join('\n'));
  assert.ok(backend.lines.some((l) => l.includes('sent, acknowledged')), backend.lines.join('\n'));

  // /quit closes cleanly.
  alice.write('/quit');
  bob.child.stdin.end();
  for (const p of [alice, bob]) {
    const { code } = await p.child.exited;
    assert.equal(code, 0, p.stderr.join('\n'));
  }
});
