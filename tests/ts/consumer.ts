// A typed app using the client through its package name, as an installed user would: every
// method, option and event of wsbridge-client.d.mts once, and `@ts-expect-error` lines for
// wrong usage, so that `tsc --noEmit` fails if the types accept it (or if a type turns `any`:
// the expected error then goes missing, which tsc also reports).
//
// Type-checked only, never run (the client's behaviour is tested in tests/js against real
// replicas). It needs no DOM and no Node types: tests/run.sh also checks it alone against the
// packed package in an empty folder.

import WsBridgeClientDefault, {
  WsBridgeClient,
  WsBridgeError,
  backoff,
  compareOffsets,
  type ClientState,
  type PresenceMember,
  type PresencePage,
  type PresenceUser,
  type ServerFrame,
  type WebSocketLike,
  type WelcomeInfo,
} from 'wsbridge-client';

// What the app does with values (no `console`: this file needs no DOM and no Node types).
declare function log(...values: unknown[]): void;

interface ChatLine {
  channel: string;
  text: string;
}

// A WebSocket constructor of the user's (e.g. the `ws` package's) fits the option.
declare const NodeWebSocket: new (url: string, options?: { perMessageDeflate?: boolean }) => WebSocketLike & {
  extensions: string;
};

export async function app(): Promise<void> {
  const client = new WsBridgeClient<ChatLine>({
    urls: ['ws://a.example/ws', 'ws://b.example/ws'],
    token: async () => 'jwt',
    WebSocket: NodeWebSocket,
    baseDelayMs: 250,
    maxDelayMs: 5000,
    connectTimeoutMs: 10_000,
    stableAfterMs: 5000,
    maxPendingSends: 10,
    reconnectOnBackendClose: (code, reason) => code === 4001 && reason !== 'banned',
    random: Math.random,
  });
  const byFunction = new WsBridgeClientDefault({ url: ({ attempt, previous }) => (attempt > 1 && previous ? previous : 'ws://a.example/ws') });
  byFunction.close(1000, 'bye').then(() => undefined);

  client
    .on('open', ({ url }) => url.startsWith('ws'))
    .on('welcome', ({ connection, user, reconnect, url }) => [connection, user ?? 'anonymous', reconnect, url])
    .on('message', (channel, data, offset) => {
      const text: string = data.text;
      if (channel !== null && offset !== null) void compareOffsets(offset, client.lastOffset(channel));
      return text;
    })
    .on('subscribed', ({ channel, recovered, resumed, reconnect, byServer }) => {
      if (recovered === false) log(`reload ${channel}`, resumed, reconnect, byServer);
    })
    .on('unsubscribed', ({ channel, byServer }) => [channel, byServer])
    .on('join', ({ channel, member }) => [channel, member.connection, member.user, member.info])
    .on('leave', ({ member }) => member.connection)
    .on('close', ({ code, reason, byClient, willReconnect }) => [code, reason, byClient, willReconnect])
    .on('reconnecting', ({ attempt, delayMs, capMs, code }) => [attempt, delayMs, capMs, code ?? 0])
    .on('refresh_required', ({ expiresAt }) => expiresAt * 1000)
    .on('refreshed', ({ expiresAt }) => expiresAt ?? 0)
    .on('missed', () => 'reload the notifications')
    .once('error', (err) => {
      if (err instanceof WsBridgeError && err.retryable) log(err.code, err.id, err.channel);
    });

  const welcome: WelcomeInfo = await client.connect();
  const state: ClientState = client.state;
  log(welcome.connection, state, client.connectionId, client.user, client.url, client.channels, client.pendingSends);
  log(client.attempt, client.stats.resends, client.options.maxPendingSends, client.recovered('room:1'));

  const sub = await client.subscribe('room:1', { since: '1a2b:1700000000000-0' });
  const recovered: boolean | null = sub.recovered;
  const entry: string = await client.send('chat', { channel: 'room:1', text: 'hi' }, { id: 'c1' });
  const { channel, offset } = await client.publish('cursor:1', { x: 1, y: 2 });
  const connections: PresencePage<PresenceMember> = await client.presence('room:1', { cursor: null, limit: 50 });
  const users: PresencePage<PresenceUser> = await client.presence('room:1', { view: 'users' });
  const watch = client.watchPresence('room:1', (members, change) => {
    if (change.type !== 'reset') log(change.member.connection, members.length);
  });
  await watch.refresh();
  watch.stop();
  const exp: number | null = await client.refresh('fresh-jwt');
  await client.unsubscribe('room:1');
  await client.reconnect();
  log(recovered, entry, channel, offset, connections.cursor, users.members[0]?.connections, watch.members, exp);

  const { capMs, delayMs } = backoff(3, 500, 30_000);
  const err = new WsBridgeError('queue_full', 'too many', 'c1');
  log(capMs, delayMs, err.retryable, err.name === 'WsBridgeError');

  // The wire frames, for apps that read them elsewhere (a service worker, a test).
  const frame = JSON.parse('{"type":"welcome","connection":"r1.1.1","user":null}') as ServerFrame;
  if (frame.type === 'ack') log(frame.entry ?? frame.offset);

  // ---- wrong usage, rejected --------------------------------------------------------------

  // @ts-expect-error: url or urls is required
  new WsBridgeClient({ token: 'jwt' });
  // @ts-expect-error: delays are numbers of milliseconds
  new WsBridgeClient({ url: 'ws://a.example/ws', maxDelayMs: '30s' });
  // @ts-expect-error: no such event (a typo of `message`)
  client.on('mesage', () => {});
  // @ts-expect-error: a message's channel is a string or null, not a number
  client.on('message', (ch: number) => ch);
  client.on('message', (ch) => {
    // @ts-expect-error: a message's channel is null for direct messages
    ch.length;
  });
  client.on('close', (info) => {
    // @ts-expect-error: close carries {code, reason, byClient, willReconnect}, not a status
    info.status;
  });
  // @ts-expect-error: send needs the data
  client.send('chat');
  // @ts-expect-error: send resolves with the entry id, a string
  const wrongEntry: number = await client.send('chat', {});
  // @ts-expect-error: the views are connections and users
  client.presence('room:1', { view: 'people' });
  // @ts-expect-error: a users page has no member connection ids to rely on
  const wrongUsers: PresencePage<PresenceMember> = await client.presence('room:1', { view: 'users' });
  // @ts-expect-error: not a state the client has
  if (client.state === 'opened') log(wrongEntry, wrongUsers);
  // @ts-expect-error: connectionId is null while not connected
  client.connectionId.split('.');
  // @ts-expect-error: refresh needs the token
  client.refresh();
  // @ts-expect-error: internals are private (#fields), not part of the API
  client._sends;
}
