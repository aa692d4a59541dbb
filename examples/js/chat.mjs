#!/usr/bin/env node
// A terminal chat client for wsbridge, built on wsbridge-client.mjs: what docs/try-it.md
// ("Try it: two clients ...") runs, and a small example of the library in use.
//
//   node examples/js/chat.mjs [URL[,URL...]] [--channel room:lobby] [--token JWT | --token-url URL]
//
// URL defaults to ws://127.0.0.1:8080/ws; give several (comma-separated) replicas and the
// client fails over between them. Node 22+ has the WebSocket it needs; on Node 20/21 run
// `node --experimental-websocket examples/js/chat.mjs ...`.
//
// Tokens, when the gateway has auth on: --token JWT is one fixed token, and the connection is
// closed (1008) when it expires. --token-url URL is what an app does instead: before every
// connection, and whenever the gateway says the token is about to expire (`refresh_required`),
// the client calls a token function that GETs URL from the app's own backend and reads
// {"token":...} from the answer; the fresh token is sent on the open connection, so short
// tokens (minutes) never close it. examples/js/token-server.mjs is such an endpoint for demos.
//
// Every event is printed on stdout as one JSON line:
//   {"welcome":{...}}  {"subscribed":{"channel":..,"recovered":..}}  {"message":{"channel":..,
//   "data":..,"offset":..}}  {"ack":{"id":..,"entry":..}}  {"error":{"code":..,"message":..}}
//   {"close":{"code":..,"reason":..}}  {"reconnecting":{"attempt":..,"delayMs":..}}
//   {"refresh_required":{"expiresAt":..}}  {"refreshed":{"expiresAt":..}}
// Lines read from stdin:
//   /sub CHANNEL     subscribes and makes CHANNEL the current channel
//   /unsub CHANNEL   unsubscribes
//   /quit            (or end of input) closes and exits
//   anything else    a chat message to the current channel, sent to the stream `chat` as
//                    {"channel": CURRENT, "text": LINE}
//
// With examples/backends/python/backend.py (or `cargo run --example backend`) running, a line typed in one
// client appears in every client on the same channel, whichever replica each is on. Kill the
// replica a client is on: it reconnects to another, resumes its channels from the last offset
// it saw (history channels replay exactly what it missed) and resends what was not acked.

import { createInterface } from 'node:readline';
import { WsBridgeClient } from './wsbridge-client.mjs';

/** @param {string} [message] @returns {never} */
function usage(message) {
  if (message) console.error(`chat.mjs: ${message}`);
  console.error('usage: node examples/js/chat.mjs [URL[,URL...]] [--channel CHANNEL] [--token JWT | --token-url URL]');
  process.exit(2);
}

/** @param {string[]} argv */
function parseArgs(argv) {
  /** @type {{urls: string[], channel: string, token?: string, tokenUrl?: string}} */
  const args = { urls: ['ws://127.0.0.1:8080/ws'], channel: 'room:lobby', token: undefined, tokenUrl: undefined };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const value = () => argv[++i] ?? usage(`${arg} needs a value`);
    if (arg === '--channel') args.channel = value();
    else if (arg === '--token') args.token = value();
    else if (arg === '--token-url') args.tokenUrl = value();
    else if (arg === '-h' || arg === '--help') usage();
    else if (arg.startsWith('-')) usage(`unknown option ${arg}`);
    else args.urls = arg.split(',').filter(Boolean);
  }
  if (args.token && args.tokenUrl) usage('give --token or --token-url, not both');
  return args;
}

/**
 * The token function for --token-url: one GET per call, so every connection and every refresh
 * gets a token of its own. A failure rejects; the client reports it (`error`) and tries again
 * on the next connection attempt.
 * @param {string} url
 */
function fetchToken(url) {
  return async () => {
    // In a browser, add `credentials: 'include'` so the app's session cookie goes along.
    const res = await fetch(url, { cache: 'no-store' });
    if (!res.ok) throw new Error(`token endpoint ${url} answered ${res.status}`);
    const { token } = await res.json();
    if (typeof token !== 'string' || !token) throw new Error(`token endpoint ${url} sent no token`);
    return token;
  };
}

const args = parseArgs(process.argv.slice(2));
if (typeof globalThis.WebSocket !== 'function') {
  usage('this Node has no WebSocket: use Node 22+, or run node --experimental-websocket');
}

const print = (/** @type {string} */ event, /** @type {unknown} */ payload) => process.stdout.write(`${JSON.stringify({ [event]: payload })}\n`);
/** @param {Error & {code?: string, id?: string | number | null}} err an `error` event, or a rejection */
const printError = (err) =>
  print('error', { code: err.code ?? 'error', message: err.message, ...(err.id ? { id: err.id } : {}) });

const client = new WsBridgeClient({ urls: args.urls, token: args.tokenUrl ? fetchToken(args.tokenUrl) : args.token });
client.on('welcome', (info) => print('welcome', info));
client.on('subscribed', ({ channel, recovered, resumed }) => print('subscribed', { channel, recovered, resumed }));
client.on('message', (channel, data, offset) => print('message', { channel, data, offset }));
client.on('close', ({ code, reason, willReconnect }) => print('close', { code, reason, willReconnect }));
client.on('reconnecting', ({ attempt, delayMs }) => print('reconnecting', { attempt, delayMs }));
client.on('refresh_required', ({ expiresAt }) => print('refresh_required', { expiresAt }));
client.on('refreshed', ({ expiresAt }) => print('refreshed', { expiresAt }));
client.on('error', printError);

let current = args.channel;
let sent = 0;
const subscribe = (/** @type {string} */ channel) => client.subscribe(channel).catch(printError);

subscribe(current);
client.connect().catch(printError);

let quitting = false;
async function quit() {
  if (quitting) return;
  quitting = true;
  await client.close(1000, 'bye');
  process.exit(0);
}

const input = createInterface({ input: process.stdin });
input.on('line', (raw) => {
  const line = raw.trim();
  if (!line) return;
  const [command, rest] = [line.split(/\s+/, 1)[0], line.slice(line.split(/\s+/, 1)[0].length).trim()];
  if (command === '/quit') return quit();
  if (command === '/sub' && rest) {
    current = rest;
    return subscribe(rest);
  }
  if (command === '/unsub' && rest) return client.unsubscribe(rest).catch(printError);
  const id = `c${process.pid}-${++sent}`;
  client
    .send('chat', { channel: current, text: line }, { id })
    .then((entry) => print('ack', { id, entry }))
    .catch(printError);
});
input.on('close', quit);
