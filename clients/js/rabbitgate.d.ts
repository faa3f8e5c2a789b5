// Type declarations for rabbitgate.js (checked by `tsc -p test/tsconfig.json`,
// run by tests/integration/test_js_client.py). Times are in seconds.

/** A token, or a function returning one (called for every (re)connect and every refresh). */
export type TokenSource = string | (() => string | Promise<string>);

/** A message on a subscribed channel, delivered once and in order. */
export interface Message {
  channel: string;
  seq: number;
  data: unknown;
  /** The publisher's verified `sub` (the frame's `from`), or null. */
  sender: string | null;
  /** Milliseconds since the epoch, or null. */
  ts: number | null;
}

export interface RabbitgateClientOptions {
  token: TokenSource;
  onMessage?: (message: Message) => void | Promise<void>;
  /** Messages of `channel` were missed: reload its state elsewhere. */
  onRecoveryLost?: (channel: string) => void | Promise<void>;
  /** Errors no call waits for (a subscription the policies ended, a refused resubscribe). */
  onError?: (error: RabbitgateError) => void | Promise<void>;
  /** Publishes kept while disconnected (default 1000); beyond, publish() rejects with QueueFull. */
  maxQueuedPublishes?: number;
  /** Reconnect delay: random() * min(backoffCap, backoffBase * 2 ** attempt); defaults 0.5 and 30. */
  backoffBase?: number;
  backoffCap?: number;
  /** Send a fresh token this long before the current one's `exp` (default 30). */
  refreshMargin?: number;
  /** A WebSocket constructor other than globalThis.WebSocket (Node: the `ws` package's). */
  WebSocket?: new (url: string, protocols?: string | string[]) => WebSocketLike;
}

/** What the client needs of a WebSocket (the browser's, or the `ws` package's). */
export interface WebSocketLike {
  readonly protocol: string;
  onopen: ((event: any) => void) | null;
  onmessage: ((event: { data: any }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: any) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

/** An error frame from the gateway (`code`: bad_request, unauthorized, forbidden, rate_limited, ...). */
export class RabbitgateError extends Error {
  constructor(code: string, message: string, options?: { retryAfter?: number | null; channel?: string | null });
  readonly code: string;
  /** Seconds to wait, for `rate_limited`. */
  readonly retryAfter: number | null;
  /** The channel of a subscription the gateway ended. */
  readonly channel: string | null;
}
/** Too many publishes already wait for a connection. */
export class QueueFull extends RabbitgateError {}
/** The connection was lost before the answer came (ping only; the rest is retried). */
export class Disconnected extends RabbitgateError {}
/** The client stopped: close() was called, or the gateway refused it for good. */
export class ClientClosed extends RabbitgateError {
  constructor(closeCode: number | null, reason: string);
  readonly closeCode: number | null;
}
/** What no retry can fix (a certificate, not a rabbitgate endpoint); `message` says what to change. */
export class CannotConnect extends ClientClosed {
  constructor(reason: string);
}

export class RabbitgateClient {
  /** @throws TypeError when `url` is not ws:// or wss:// */
  constructor(url: string, options: RabbitgateClientOptions);
  readonly url: string;
  /** The gateway's session id while connected, else null. */
  session: string | null;
  /** How many times a welcome was received. */
  connections: number;
  maxQueuedPublishes: number;
  backoffBase: number;
  backoffCap: number;
  refreshMargin: number;
  /** Resolves at the first welcome; rejects with ClientClosed (or CannotConnect) if refused for good. */
  connect(): Promise<void>;
  close(): void;
  /** Resolves at the first ack; rejects with RabbitgateError (`forbidden`, ...). */
  subscribe(channel: string): Promise<void>;
  unsubscribe(channel: string): Promise<void>;
  /** Resolves once RabbitMQ confirmed it (a retried publish may arrive twice). */
  publish(channel: string, data: unknown): Promise<void>;
  /** Round trip in seconds. */
  ping(): Promise<number>;
  /** Each message once, in order, when there is no onMessage. */
  messages(): AsyncGenerator<Message, void, undefined>;
}

/** Per subscribed channel, the last seq delivered (exported for tests). */
export class SeqTracker {
  last: Map<string, number | null>;
  acked: Set<string>;
  has(channel: string): boolean;
  add(channel: string): void;
  remove(channel: string): void;
  since(channel: string): number | null;
  accept(channel: string, seq: number): boolean;
  onAck(channel: string, seq: number | null, recovered: unknown): boolean;
}

export function backoffDelay(attempt: number, base: number, cap: number, random?: () => number): number;
export function tokenExpiry(token: string): number | null;
export function shouldReconnect(closeCode: number | null, tokenIsCallback: boolean): boolean;
export function checkUrl(url: string): void;
export function fatalConnectError(url: string, event: unknown): string | null;
