#!/usr/bin/env node
// A stand-in for your app's own backend: the endpoint that hands a signed-in user a short-lived
// wsbridge token. chat.mjs --token-url fetches from it before every connection and whenever the
// gateway says the token is about to expire, so tokens can live minutes instead of days.
//
//   node examples/js/token-server.mjs --secret SECRET [--port 8099] [--ttl 300] [--channels 'room:*']
//
//   GET /token?user=NAME  ->  200 {"token":"<HS256 JWT>","expires_at":<exp>}
//
// SECRET is the gateway's `auth.jwt_secret` (HS256). Each token carries `sub` = NAME,
// `exp` = now + TTL seconds and, with --channels, the `channels` claim (comma-separated
// patterns). Plain Node, no dependencies.
//
// Demo only: it trusts the `user` query parameter, so anyone who can reach it gets a token for
// any user. A real backend takes the user from its own session (a cookie, its login) and never
// from the request, and keeps the secret to itself. Bind it to loopback (the default).
//
// stdout, one JSON line each: {"listening":{"url":"http://HOST:PORT/token"}} once ready (port 0
// picks a free port), then {"issued":{"user":..,"exp":..}} for every token handed out.

import { createHmac } from 'node:crypto';
import { createServer } from 'node:http';

function usage(message) {
  if (message) console.error(`token-server.mjs: ${message}`);
  console.error(
    "usage: node examples/js/token-server.mjs --secret SECRET [--host 127.0.0.1] [--port 8099] [--ttl 300] [--channels 'room:*,user:42']"
  );
  process.exit(2);
}

function parseArgs(argv) {
  const args = { secret: process.env.WSBRIDGE_JWT_SECRET, host: '127.0.0.1', port: 8099, ttl: 300, channels: undefined };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const value = () => argv[++i] ?? usage(`${arg} needs a value`);
    if (arg === '--secret') args.secret = value();
    else if (arg === '--host') args.host = value();
    else if (arg === '--port') args.port = Number(value());
    else if (arg === '--ttl') args.ttl = Number(value());
    else if (arg === '--channels') args.channels = value().split(',').filter(Boolean);
    else if (arg === '-h' || arg === '--help') usage();
    else usage(`unknown argument ${arg}`);
  }
  if (!args.secret) usage('--secret (or WSBRIDGE_JWT_SECRET) is required: the gateway\'s auth.jwt_secret');
  if (!Number.isInteger(args.port) || args.port < 0) usage('--port must be a port number');
  if (!Number.isInteger(args.ttl) || args.ttl <= 0) usage('--ttl must be a whole number of seconds above 0');
  return args;
}

/** An HS256 JWT over `claims`. */
function sign(secret, claims) {
  const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString('base64url');
  const unsigned = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${unsigned}.${createHmac('sha256', secret).update(unsigned).digest('base64url')}`;
}

const args = parseArgs(process.argv.slice(2));
const print = (event, payload) => process.stdout.write(`${JSON.stringify({ [event]: payload })}\n`);

const server = createServer((req, res) => {
  const url = new URL(req.url, 'http://localhost');
  const reply = (status, body) => {
    // No caching: every call must get a token of its own, with a fresh exp.
    res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store' });
    res.end(JSON.stringify(body));
  };
  if (url.pathname !== '/token') return reply(404, { error: 'not_found' });
  if (req.method !== 'GET') return reply(405, { error: 'method_not_allowed' });
  const user = url.searchParams.get('user');
  if (!user) return reply(400, { error: 'user is required: /token?user=NAME' });
  const exp = Math.floor(Date.now() / 1000) + args.ttl;
  const claims = { sub: user, exp, ...(args.channels ? { channels: args.channels } : {}) };
  print('issued', { user, exp });
  reply(200, { token: sign(args.secret, claims), expires_at: exp });
});

server.listen(args.port, args.host, () => {
  const { address, port } = server.address();
  print('listening', { url: `http://${address}:${port}/token` });
});
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => server.close(() => process.exit(0)));
