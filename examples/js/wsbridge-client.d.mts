// Types for wsbridge-client.mjs (hand-written: the module stays plain JavaScript that browsers
// import as it is, with no build step). TypeScript picks this file up by itself beside the
// .mjs, and through the "types" condition of package.json when installed as a package.
//
// Kept true by tests/ts (run by tests/run.sh): `tsc --noEmit` checks a typed consumer, the
// examples that use the client (chat.mjs, the whiteboard) and the client's own tests against it.
// Change the client, change this file.

// ---- the wire: frames the gateway sends and takes (docs/protocol.md, README's tables) -------

/** A message offset on a channel with history: `<epoch>:<ms>-<seq>`. Opaque; compare with
 * {@link compareOffsets}. */
export type Offset = string;

/** A frame id: yours, echoed in the answer. The client makes string ids (`<prefix>-<n>`). */
export type FrameId = string | number;

/** A member of a channel with presence: a connection, its user (`sub`; null when anonymous)
 * and the token's `info` claim (any JSON; absent without one). */
export interface PresenceMember {
  connection: string;
  user: string | null;
  info?: unknown;
}

/** An entry of the `users` view: a user and how many connections it has in the channel. An
 * anonymous connection is a user of its own, with `user: null` and its `connection`. */
export interface PresenceUser {
  user: string | null;
  connections: number;
  connection?: string;
}

/** The error codes of the gateway's `error` frames (README, "The client protocol"). */
export type GatewayErrorCode =
  | 'bad_frame'
  | 'unknown_type'
  | 'bad_request'
  | 'stream_not_allowed'
  | 'channel_not_allowed'
  | 'publish_not_allowed'
  | 'publish_forbidden'
  | 'presence_disabled'
  | 'token_invalid'
  | 'token_user_mismatch'
  | 'too_many_subscriptions'
  | 'rate_limited'
  | 'overloaded'
  | 'shutting_down'
  | 'redis_unavailable';

/** The codes this library rejects with by itself. */
export type ClientErrorCode =
  | 'closed' // the client stopped (close(), or a close it does not reconnect after)
  | 'queue_full' // maxPendingSends sends already wait for their ack
  | 'duplicate_id' // a send or publish with this id is already waiting
  | 'not_connected' // a publish while offline: sent now or not at all
  | 'disconnected' // a publish whose connection closed before its answer (may be published)
  | 'unsubscribed' // a subscribe whose channel was unsubscribed before it was answered
  | 'connect_timeout' // no welcome within connectTimeoutMs
  | 'socket_error' // the WebSocket reported an error
  | 'bad_frame'; // a frame from the gateway that is not JSON

/** Every code a {@link WsBridgeError} can carry; a newer gateway may add codes. */
export type WsBridgeErrorCode = GatewayErrorCode | ClientErrorCode | (string & {});

/** Frames a client sends (JSON text frames). */
export type ClientFrame =
  | { type: 'send'; stream: string; data: unknown; id?: FrameId }
  | { type: 'publish'; channel: string; data: unknown; id?: FrameId }
  | { type: 'subscribe'; channel: string; since?: Offset; id?: FrameId }
  | { type: 'unsubscribe'; channel: string; id?: FrameId }
  | {
      type: 'presence';
      channel: string;
      view?: 'connections' | 'users';
      cursor?: string;
      limit?: number;
      id?: FrameId;
    }
  | { type: 'refresh'; token: string; id?: FrameId };

/** Frames the gateway sends. `message` has `channel` only for channel messages and `offset`
 * only on channels with history; `ack` has `entry` for a send and `offset` (on channels with
 * history) for a publish; `subscribed` has `recovered` only when the subscribe gave `since`. */
export type ServerFrame =
  | { type: 'welcome'; connection: string; user: string | null }
  | { type: 'message'; channel?: string; offset?: Offset; data: unknown }
  | { type: 'ack'; id: FrameId | null; entry?: string; offset?: Offset }
  | { type: 'subscribed'; channel: string; id?: FrameId; recovered?: boolean }
  | { type: 'unsubscribed'; channel: string; id?: FrameId }
  | {
      type: 'presence';
      channel: string;
      id?: FrameId;
      connections: number;
      users: number;
      members: Array<PresenceMember | PresenceUser>;
      cursor: string | null;
    }
  | { type: 'join' | 'leave'; channel: string; member: PresenceMember }
  | { type: 'refresh_required'; expires_at: number }
  | { type: 'missed' }
  | { type: 'refreshed'; id?: FrameId; expires_at: number | null }
  | { type: 'error'; id: FrameId | null; code: WsBridgeErrorCode; message: string };

// ---- helpers -----------------------------------------------------------------------------

/** An error frame from the gateway, or a refusal by this library. */
export class WsBridgeError extends Error {
  constructor(code: WsBridgeErrorCode, message?: string, id?: FrameId | null);
  readonly name: 'WsBridgeError';
  /** snake_case code: the gateway's (`channel_not_allowed`, ...) or this library's. */
  code: WsBridgeErrorCode;
  /** The frame id the error answers, when there is one. */
  id: FrameId | null;
  /** Whether sending the same frame again, with the same id, may succeed (`overloaded`,
   * `redis_unavailable`, `rate_limited`, `shutting_down`). */
  retryable: boolean;
  /** The channel, on errors that answer a publish, presence or subscribe. */
  channel?: string;
}

/** Compares two offsets: negative, 0 or positive; null when they cannot be compared
 * (different epochs, or not offsets). */
export function compareOffsets(a: unknown, b: unknown): number | null;

/** The delay before reconnect attempt `attempt` (1 for the first): full jitter, uniform in
 * [0, capMs] where capMs = min(maxDelayMs, baseDelayMs * 2^(attempt-1)). */
export function backoff(
  attempt: number,
  baseDelayMs: number,
  maxDelayMs: number,
  random?: () => number,
): { capMs: number; delayMs: number };

// ---- the client --------------------------------------------------------------------------

/** What the client needs of a WebSocket: the browser's, Node's global one, or the `ws`
 * package's all fit. */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: unknown;
  onmessage: unknown;
  onerror: unknown;
  onclose: unknown;
}

/** A WebSocket constructor (`globalThis.WebSocket` by default). */
export type WebSocketConstructor = new (url: string) => WebSocketLike;

/** A function giving the URL of the next connection attempt. */
export type UrlFunction = (attempt: { attempt: number; previous: string | null }) => string | Promise<string>;

/** A JWT, or a function giving one, called before every connection and on `refresh_required`. */
export type TokenOption = string | (() => string | Promise<string>);

interface CommonOptions {
  /** A JWT sent as `?token=`; a function is called before every connection and, when the
   * gateway says the token is about to expire, its token is sent on the open connection. */
  token?: TokenOption;
  /** The WebSocket constructor (default `globalThis.WebSocket`). */
  WebSocket?: WebSocketConstructor;
  /** First reconnect delay cap (500). */
  baseDelayMs?: number;
  /** Largest reconnect delay cap (30000). */
  maxDelayMs?: number;
  /** An attempt without a welcome by then is abandoned and retried (10000). */
  connectTimeoutMs?: number;
  /** A connection that lived this long resets the backoff (5000). */
  stableAfterMs?: number;
  /** Sends waiting for their ack; beyond it `send` rejects with `queue_full` (100). */
  maxPendingSends?: number;
  /** Whether to reconnect after a 4000–4999 close (a backend's disconnect; false). */
  reconnectOnBackendClose?: boolean | ((code: number, reason: string) => boolean);
  /** Jitter source in [0, 1) (`Math.random`). */
  random?: () => number;
}

/** Options of {@link WsBridgeClient}: `url` (one URL or a function) or `urls` (round-robin). */
export type WsBridgeClientOptions = CommonOptions &
  (
    | { /** `ws(s)://HOST/ws`, or a function called before every connection. */ url: string | UrlFunction; urls?: readonly string[] }
    | { url?: string | UrlFunction; /** Several URLs, tried round-robin. */ urls: readonly string[] }
  );

/** The options as the client holds them: yours over the defaults. */
export type ResolvedOptions = WsBridgeClientOptions &
  Required<
    Pick<
      CommonOptions,
      'baseDelayMs' | 'maxDelayMs' | 'connectTimeoutMs' | 'stableAfterMs' | 'maxPendingSends' | 'reconnectOnBackendClose'
    >
  >;

export type ClientState = 'idle' | 'connecting' | 'open' | 'reconnecting' | 'closed';

/** A welcome: `connect()`'s result and the `welcome` event. */
export interface WelcomeInfo {
  connection: string;
  user: string | null;
  /** Whether an earlier connection of this client was welcomed. */
  reconnect: boolean;
  url: string;
}

/** A `subscribed`: `subscribe()`'s result and the `subscribed` event. */
export interface SubscribedInfo {
  channel: string;
  /** true: a resume replayed everything missed; false: it could not (reload the channel's
   * state); null: a first subscribe, nothing to recover. */
  recovered: boolean | null;
  /** Whether it was asked with `since`. */
  resumed: boolean;
  /** Whether the channel was joined on an earlier connection. */
  reconnect: boolean;
  /** Whether a backend subscribed this client. */
  byServer: boolean;
}

export interface UnsubscribedInfo {
  channel: string;
  byServer: boolean;
}

export interface PresenceEvent {
  channel: string;
  member: PresenceMember;
}

export interface CloseInfo {
  code: number;
  reason: string;
  byClient: boolean;
  willReconnect: boolean;
}

export interface ReconnectingInfo {
  attempt: number;
  delayMs: number;
  capMs: number;
  /** The close code that led to it; null when the attempt failed before a socket. */
  code: number | null;
}

/**
 * Every event and its listener's arguments. `Data` is what `message` listeners get as data
 * (`any` by default, as the platform's `MessageEvent.data`: the gateway relays any JSON).
 */
export interface WsBridgeClientEvents<Data = any> {
  /** The socket opened; the welcome follows. */
  open: [info: { url: string }];
  /** After channels were rejoined and pending sends resent. */
  welcome: [info: WelcomeInfo];
  /** `channel` is null for messages to this connection, its user or everyone; `offset` is null
   * on channels without history. */
  message: [channel: string | null, data: Data, offset: Offset | null];
  subscribed: [info: SubscribedInfo];
  unsubscribed: [info: UnsubscribedInfo];
  /** A user's first connection joined a channel with `join_leave`. */
  join: [event: PresenceEvent];
  /** A user's last connection left (or its replica died). */
  leave: [event: PresenceEvent];
  close: [info: CloseInfo];
  /** Before each wait. */
  reconnecting: [info: ReconnectingInfo];
  /** The token expires at `expiresAt` (unix seconds). */
  refresh_required: [info: { expiresAt: number }];
  /** A token function's fresh token was taken: the connection lasts until `expiresAt`. */
  refreshed: [info: { expiresAt: number | null }];
  /** Live messages without history (to this connection, its user, everyone, or channels without
   * history) may have been lost on the gateway's side (its Redis link dropped or overflowed):
   * reload what you keep from them. Channels with history catch up by themselves. */
  missed: [];
  /** Error frames not tied to a pending call, socket errors, failed subscribes, and what the
   * url or token function threw. */
  error: [error: WsBridgeError | Error];
}

export type WsBridgeClientEventName = keyof WsBridgeClientEvents;

export type Listener<E extends WsBridgeClientEventName, Data = any> = (...args: WsBridgeClientEvents<Data>[E]) => void;

export interface ClientStats {
  connects: number;
  reconnects: number;
  resends: number;
  duplicatesDropped: number;
}

export interface PublishResult {
  channel: string;
  /** The message's offset; null on a channel without history. */
  offset: Offset | null;
}

/** One page of a channel's presence. */
export interface PresencePage<Member = PresenceMember> {
  channel: string;
  /** Connections in the channel, across all replicas. */
  connections: number;
  /** Distinct users (an anonymous connection counts as one). */
  users: number;
  members: Member[];
  /** Where the next page starts; null on the last page. */
  cursor: string | null;
}

export interface PresenceOptions {
  view?: 'connections' | 'users';
  /** The previous page's cursor. */
  cursor?: string | null;
  /** The most members wanted (a page may hold more). */
  limit?: number;
}

export type PresenceChange = { type: 'join' | 'leave'; member: PresenceMember } | { type: 'reset' };

/** A live member list: {@link WsBridgeClient.watchPresence}'s result. */
export interface PresenceWatch {
  /** The members now, one per user. */
  readonly members: PresenceMember[];
  /** Reads the whole list again; resolves when it is read (or given up). */
  refresh(): Promise<void>;
  /** Stops watching (no more reads or calls to onChange). */
  stop(): void;
}

/**
 * A client for the wsbridge gateway: reconnects with backoff, resumes channels from their last
 * offset, resends unacknowledged sends with the same id. See README.md beside it.
 *
 * `Data` types the `data` of `message` events (unchecked: the gateway relays any JSON).
 */
export class WsBridgeClient<Data = any> {
  constructor(options: WsBridgeClientOptions);

  /** The options in use: yours over the defaults. */
  readonly options: ResolvedOptions;
  /** The current connection's id (null when not connected). */
  connectionId: string | null;
  /** The user of the current connection (null when anonymous or not connected). */
  user: string | null;
  /** The URL of the current or last connection (with its `?token=`). */
  url: string | null;
  readonly stats: ClientStats;

  on<E extends WsBridgeClientEventName>(event: E, listener: Listener<E, Data>): this;
  off<E extends WsBridgeClientEventName>(event: E, listener: Listener<E, Data>): this;
  once<E extends WsBridgeClientEventName>(event: E, listener: Listener<E, Data>): this;

  get state(): ClientState;
  /** The channels this client is in (or joining), in the order they were subscribed. */
  get channels(): string[];
  /** The last offset seen on `channel`, or null. */
  lastOffset(channel: string): Offset | null;
  /** The last `subscribed`'s `recovered` for `channel`; undefined when not subscribed. */
  recovered(channel: string): boolean | null | undefined;
  /** How many sends wait for their ack. */
  get pendingSends(): number;
  /** Consecutive reconnect attempts since the last stable connection. */
  get attempt(): number;

  /** Starts connecting (and reconnecting until close()); resolves with the next welcome (at
   * once when open); rejects with `closed` if the client stops first. */
  connect(): Promise<WelcomeInfo>;
  /** Closes for good; pending sends reject with `closed`. Resolves when the socket closed. */
  close(code?: number, reason?: string): Promise<void>;
  /** Drops the connection and connects again. */
  reconnect(): Promise<WelcomeInfo>;

  /** Joins `channel` and keeps it joined across reconnects; `since` resumes from a saved
   * offset. Rejects on an error frame (e.g. `channel_not_allowed`). */
  subscribe(channel: string, options?: { since?: Offset }): Promise<SubscribedInfo>;
  /** Leaves `channel` and forgets its offset. */
  unsubscribe(channel: string): Promise<void>;
  /** Appends `data` (any JSON value) to the inbound stream `stream`; resolves with the entry
   * id on `ack`. Resent with the same id after every reconnect until acked. */
  send(stream: string, data: unknown, options?: { id?: FrameId }): Promise<string>;
  /** Publishes `data` to `channel`'s subscribers (channels with `client_publish`); sent now or
   * rejected (`not_connected`), never resent. */
  publish(channel: string, data: unknown, options?: { id?: FrameId }): Promise<PublishResult>;
  /** One page of who is in `channel` (a channel with `presence`). */
  presence(channel: string, options: PresenceOptions & { view: 'users' }): Promise<PresencePage<PresenceUser>>;
  presence(channel: string, options?: PresenceOptions & { view?: 'connections' }): Promise<PresencePage<PresenceMember>>;
  presence(channel: string, options?: PresenceOptions): Promise<PresencePage<PresenceMember | PresenceUser>>;
  /** A live list of `channel`'s members, one per user, kept right across reconnects. */
  watchPresence(
    channel: string,
    onChange?: (members: PresenceMember[], change: PresenceChange) => void,
    options?: { limit?: number },
  ): PresenceWatch;
  /** Sends a fresh token of the same user on the open connection; resolves with its `exp`. */
  refresh(token: string): Promise<number | null>;
}

export default WsBridgeClient;
