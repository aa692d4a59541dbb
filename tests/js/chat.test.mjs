// docs/try-it.md's "Try it: two clients", for real: two replicas, the Python backend (examples/backends/python/backend.py) and
// two terminal chat clients (examples/js/chat.mjs, on wsbridge-client.mjs) on different
// replicas. Lines typed in one reach both; when one client's replica is killed it fails over,
// resumes its channel and gets what was said meanwhile, exactly once. And the chat with short
// tokens fetched from examples/js/token-server.mjs (--token-url): refreshed on the open
// connection, never closed by an expiry.

import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';

import { ROOT, killAll, startGateway, startProcess, startRedis, uniquePrefix } from './harness.mjs';

after(killAll);

const CHAT = path.join(ROOT, 'examples', 'js', 'chat.mjs');
const BACKEND = path.join(ROOT, 'examples', 'backends', 'python', 'backend.py');
const TOKEN_SERVER = path.join(ROOT, 'examples', 'js', 'token-server.mjs');
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

test('chat clients with 4 s tokens from the token endpoint stay connected across several expiries, and messages keep flowing', async () => {
  const redis = await startRedis();
  const prefix = uniquePrefix('chat-tokens');
  const secret = 'chat-token-secret';
  const ttl = 4;
  // Notice 2 s before exp: each token is replaced 1-2 s after it was issued (exp is whole seconds).
  const gw = await startGateway({ redisUrl: redis.url, prefix, jwtSecret: secret, env: { WSBRIDGE__AUTH__REFRESH_NOTICE_SECONDS: '2' } });
  const backend = startProcess('python3', [BACKEND, '--block-ms', '500'], {
    env: { REDIS_URL: redis.url, WSBRIDGE_API: gw.apiUrl, PREFIX: prefix },
  });
  const tokens = startProcess(process.execPath, [TOKEN_SERVER, '--secret', secret, '--port', '0', '--ttl', String(ttl)]);
  await tokens.until((l) => count(l, 'listening') === 1, 'the token server to listen');
  const tokenUrl = parsed(tokens.lines).find((e) => e.listening).listening.url;
  const issued = (user) => parsed(tokens.lines).filter((e) => e.issued?.user === user).map((e) => e.issued.exp);

  const alice = startProcess(process.execPath, [...NODE_FLAGS, CHAT, gw.wsUrl, '--token-url', `${tokenUrl}?user=alice`]);
  const bob = startProcess(process.execPath, [...NODE_FLAGS, CHAT, gw.wsUrl, '--token-url', `${tokenUrl}?user=bob`]);
  for (const [name, p] of [['alice', alice], ['bob', bob]]) {
    await p.until((l) => count(l, 'subscribed', (s) => s.channel === 'room:lobby') === 1, `${name} in room:lobby`);
  }
  assert.equal(parsed(alice.lines).find((e) => e.welcome).welcome.user, 'alice');

  // Round after round: wait for alice's next refresh (that is the clock passing), then a line
  // from her must reach both clients through the backend. Until three of her tokens, the one
  // she connected with included, have expired while her connection stayed open.
  const now = () => Date.now() / 1000;
  const said = [];
  for (let round = 1; !(issued('alice').length >= 3 && now() > issued('alice')[2]); round++) {
    assert.ok(round <= 12, `still within three token lifetimes after ${round - 1} refreshes: ${tokens.lines.join('\n')}`);
    await alice.until((l) => count(l, 'refreshed') >= round, `alice's refresh ${round}`);
    const line = `line ${round}, after refresh ${round}`;
    said.push(line);
    alice.write(line);
    for (const [name, p] of [['alice', alice], ['bob', bob]]) {
      await p.until((l) => texts(l).includes(line), `${name} to see "${line}"`);
    }
  }
  const expired = issued('alice').filter((exp) => exp < now()).length;
  assert.ok(expired >= 3, `${expired} of alice's tokens expired during the test`);

  for (const [name, p] of [['alice', alice], ['bob', bob]]) {
    assert.deepEqual(texts(p.lines), said, `${name} got every line, in order`);
    assert.equal(count(p.lines, 'welcome'), 1, `${name} connected once:\n${p.lines.join('\n')}`);
    assert.equal(count(p.lines, 'close'), 0, `${name} was never closed:\n${p.lines.join('\n')}`);
    assert.equal(count(p.lines, 'error'), 0, `${name}:\n${p.lines.join('\n')}`);
    // Every refresh_required was answered with a refresh the gateway took.
    assert.ok(count(p.lines, 'refreshed') >= count(p.lines, 'refresh_required') - 1, p.lines.join('\n'));
  }
  // A token of its own for the connection and for each refresh (at most one refresh may be
  // under way as the test ends).
  const fetched = issued('alice').length;
  assert.ok(fetched >= 1 + count(alice.lines, 'refreshed') && fetched <= 1 + count(alice.lines, 'refresh_required'), tokens.lines.join('\n'));
  assert.ok(backend.lines.some((l) => l.includes('sent, acknowledged')), backend.lines.join('\n'));

  alice.write('/quit');
  bob.write('/quit');
  for (const p of [alice, bob]) {
    const { code } = await p.child.exited;
    assert.equal(code, 0, p.stderr.join('\n'));
  }
});
