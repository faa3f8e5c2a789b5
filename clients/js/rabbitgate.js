// rabbitgate browser client (wire contract v1). An ES module, no build step:
//   import { RabbitgateClient } from "./rabbitgate.js";
//
// By itself it authenticates with an `auth` frame (browsers cannot set headers),
// reconnects after any disconnect with exponential backoff and full jitter,
// refreshes the token in band before it expires, resubscribes with `since` and
// drops messages it already delivered, and queues publishes while disconnected.
// Times are in seconds, as in the wire contract. Same behaviour as the Python
// client in clients/python (rabbitgate_client).
//
// What retrying cannot fix fails at once: a URL that is not ws:// or wss://
// (TypeError from the constructor); and, where the runtime reports it (Node's
// `ws` package does, browsers do not: they say 1006 for every failure), a
// certificate that does not verify, an HTTP refusal of the upgrade saying this
// is not a rabbitgate endpoint, or a server that did not select rabbitgate.v1:
// connect() rejects with CannotConnect. Network failures are retried.

const SUBPROTOCOL = "rabbitgate.v1";
const CLOSE_AUTH = 4401;
// Close codes after which a retry cannot help: policy (1008), banned (4403).
const FATAL_CLOSE_CODES = new Set([1008, 4403]);
const STABLE_SECONDS = 10; // a connection that lasted this long resets the backoff
const OPEN_TIMEOUT_SECONDS = 10; // upgrade + welcome
const REQUEST_TIMEOUT_SECONDS = 10;
const MAX_ATTEMPTS = 3; // per publish/subscribe, for `unavailable` or a connection lost before the ack
// Node's TLS verification error codes (what the `ws` package passes on): no retry fixes them.
const CERTIFICATE_ERRORS = new Set([
  "UNABLE_TO_VERIFY_LEAF_SIGNATURE", "SELF_SIGNED_CERT_IN_CHAIN", "DEPTH_ZERO_SELF_SIGNED_CERT",
  "UNABLE_TO_GET_ISSUER_CERT_LOCALLY", "UNABLE_TO_GET_ISSUER_CERT", "CERT_HAS_EXPIRED",
  "CERT_NOT_YET_VALID", "CERT_UNTRUSTED", "CERT_REVOKED", "ERR_TLS_CERT_ALTNAME_INVALID",
]);
// Answers to the upgrade that say "not a rabbitgate endpoint": the same request gets them again.
const NOT_AN_ENDPOINT_STATUSES = new Set([400, 404, 405, 426]);

export class RabbitgateError extends Error {
  constructor(code, message, { retryAfter = null, channel = null } = {}) {
    super(`${code}: ${message}`);
    this.name = "RabbitgateError";
    Object.assign(this, { code, retryAfter, channel });
  }
}
export class QueueFull extends RabbitgateError {}
export class Disconnected extends RabbitgateError {}
export class ClientClosed extends RabbitgateError {
  constructor(closeCode, reason) {
    super("closed", reason);
    this.closeCode = closeCode;
  }
}
/** What no retry can fix (a certificate, not a rabbitgate endpoint); `message` says what to change. */
export class CannotConnect extends ClientClosed {
  constructor(reason) {
    super(null, reason);
  }
}

// --- pure decisions ----------------------------------------------------------

/** Full jitter: uniform(0, min(cap, base * 2**attempt)), in seconds. */
export function backoffDelay(attempt, base, cap, random = Math.random) {
  return random() * Math.min(cap, base * 2 ** Math.min(attempt, 60));
}

/** The `exp` claim of a JWT, read WITHOUT verifying it: only to plan a refresh. */
export function tokenExpiry(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4)));
    return typeof claims?.exp === "number" && Number.isFinite(claims.exp) ? claims.exp : null;
  } catch {
    return null;
  }
}

/** Throws TypeError for a URL the client can never connect to (checked before any I/O). */
export function checkUrl(url) {
  const scheme = /^([a-z][a-z0-9+.-]*):\/\//i.exec(String(url))?.[1]?.toLowerCase();
  if (scheme !== "ws" && scheme !== "wss") {
    throw new TypeError(
      `rabbitgate: the gateway URL must start with wss:// (or ws:// when the gateway runs without TLS), not ${JSON.stringify(String(url))}`,
    );
  }
}

/** Why to stop for good after a WebSocket `error` event, or null to retry (a network failure).
 * Browsers give no detail (so: null); Node's `ws` package gives the Error. */
export function fatalConnectError(url, event) {
  const error = event?.error ?? null;
  const code = error?.code ?? null;
  const text = String(error?.message ?? event?.message ?? "");
  if (CERTIFICATE_ERRORS.has(code)) {
    return `the TLS certificate of ${url} does not verify (${code}): trust the CA that signed it ` +
      "(the development gateway's is certs/ca.pem; Node: NODE_EXTRA_CA_CERTS=certs/ca.pem)";
  }
  if (code === "ERR_SSL_WRONG_VERSION_NUMBER" || /wrong version number/i.test(text)) {
    return `${url} does not speak TLS on this port: use ws:// when the gateway runs without TLS, ` +
      "or the port of its TLS listener";
  }
  const status = /Unexpected server response: (\d{3})/.exec(text)?.[1];
  if (status && NOT_AN_ENDPOINT_STATUSES.has(Number(status))) {
    return `${url} answered the WebSocket upgrade with HTTP ${status}: it is not a rabbitgate ` +
      "endpoint (check the host, the port and the /ws path)";
  }
  if (/subprotocol/i.test(text)) return notSelected(url);
  return null;
}

const notSelected = (url) =>
  `${url} did not select the rabbitgate.v1 subprotocol: it is not a rabbitgate endpoint ` +
  "(check the host, the port and the /ws path)";

export function shouldReconnect(closeCode, tokenIsCallback) {
  if (FATAL_CLOSE_CODES.has(closeCode)) return false;
  if (closeCode === CLOSE_AUTH) return tokenIsCallback; // a fixed refused token stays refused
  return true;
}

/** Per subscribed channel, the last seq delivered: the `since` of a resubscribe,
 * and what is a duplicate. `onAck` returns true when the app must reload state. */
export class SeqTracker {
  constructor() {
    this.last = new Map();
    this.acked = new Set();
  }
  has(channel) { return this.last.has(channel); }
  add(channel) { if (!this.last.has(channel)) this.last.set(channel, null); }
  remove(channel) { this.last.delete(channel); this.acked.delete(channel); }
  since(channel) { return this.last.get(channel) ?? null; }
  accept(channel, seq) {
    if (!this.last.has(channel)) return false;
    const previous = this.last.get(channel);
    if (previous !== null && seq <= previous) return false;
    this.last.set(channel, seq);
    return true;
  }
  onAck(channel, seq, recovered) {
    if (!this.last.has(channel)) return false;
    const previous = this.last.get(channel);
    if (!this.acked.has(channel)) { // first subscribe: the channel's present is the start
      this.acked.add(channel);
      if (seq !== null && (previous === null || seq > previous)) this.last.set(channel, seq);
      return false;
    }
    if (previous === null) { // resubscribed without `since`: lost only if something was published
      this.last.set(channel, seq);
      return seq !== null;
    }
    if (recovered === true) return false; // the replay follows: keep `previous`
    this.last.set(channel, seq); // not recovered (or not said): restart from the present
    return true;
  }
}

const intOrNull = (v) => (Number.isInteger(v) ? v : null);
const parse = (text) => { try { return JSON.parse(text); } catch { return undefined; } };
const sleep = (seconds) => new Promise((resolve) => setTimeout(resolve, seconds * 1000));

function toError(frame) {
  return new RabbitgateError(String(frame.code ?? "internal"), String(frame.message ?? ""), {
    retryAfter: typeof frame.retry_after === "number" ? frame.retry_after : null,
    channel: typeof frame.channel === "string" ? frame.channel : null,
  });
}

function deferred() {
  const d = {};
  d.promise = new Promise((resolve, reject) => Object.assign(d, { resolve, reject }));
  d.promise.catch(() => {}); // nobody may be waiting; the caller's await still sees it
  return d;
}

// --- the client ----------------------------------------------------------------

export class RabbitgateClient {
  /**
   * @param {string} url  wss://host:port/ws
   * @param {object} options  token: string or () => string | Promise<string>;
   *   onMessage(message), onRecoveryLost(channel), onError(error): plain or async,
   *   called in order with the messages; maxQueuedPublishes (1000), backoffBase (0.5 s),
   *   backoffCap (30 s), refreshMargin (30 s).
   */
  constructor(url, options = {}) {
    checkUrl(url);
    this.url = url;
    this._token = options.token;
    this._onMessage = options.onMessage ?? null;
    this._onRecoveryLost = options.onRecoveryLost ?? null;
    this._onError = options.onError ?? null;
    this.maxQueuedPublishes = options.maxQueuedPublishes ?? 1000;
    this.backoffBase = options.backoffBase ?? 0.5;
    this.backoffCap = options.backoffCap ?? 30;
    this.refreshMargin = options.refreshMargin ?? 30;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.session = null; // the gateway's session id, while connected
    this.connections = 0; // how many times a welcome was received
    this._ids = 1;
    this._conn = null; // {ws, token, openedAt, timers}
    this._ready = false;
    this._closed = null;
    this._readyWaiters = [];
    this._requests = new Map(); // id -> {resolve, reject, channel?}
    this._queue = []; // publishes waiting for a connection, in order
    this._inflight = new Map(); // sent, waiting for the ack
    this._tracker = new SeqTracker();
    this._firstAck = new Map();
    this._attempt = 0;
    this._delivery = Promise.resolve(); // app callbacks, chained so they keep their order
    this._buffer = []; // messages for messages() when there is no onMessage
    this._wakeReader = null;
  }

  /** Start; resolves at the first welcome, rejects with ClientClosed if refused for good. */
  connect() {
    if (!this._started) {
      this._started = true;
      this._open();
    }
    return this._waitReady();
  }

  close() {
    this._stop(new ClientClosed(1000, "closed by the client"), false);
    clearTimeout(this._reconnectTimer);
    const conn = this._conn;
    if (conn) {
      this._detach(conn);
      conn.ws.close(1000);
      this._onClosed(conn, 1000, "closed by the client");
    }
  }

  /** Subscribe once; resubscribed with `since` after every reconnect. Resolves at the first ack. */
  subscribe(channel) {
    if (!this._tracker.has(channel)) {
      this._tracker.add(channel);
      this._firstAck.set(channel, deferred());
      if (this._ready) this._subscribeOn(this._conn, channel);
    }
    return this._firstAck.get(channel)?.promise ?? Promise.resolve();
  }

  async unsubscribe(channel) {
    this._tracker.remove(channel);
    this._firstAck.delete(channel);
    if (this._ready) await this._request(this._conn, { type: "unsubscribe", channel }).catch(() => {});
  }

  /** Resolves once RabbitMQ confirmed it. Queued while disconnected (QueueFull beyond the bound);
   * `unavailable` and a connection lost before the ack are retried, so it may arrive twice. */
  publish(channel, data) {
    if (this._closed) return Promise.reject(this._closed);
    if (this._queue.length >= this.maxQueuedPublishes) {
      return Promise.reject(new QueueFull("queue_full", `${this._queue.length} publishes already wait`));
    }
    const id = this._ids++;
    let text;
    try {
      text = JSON.stringify({ type: "publish", id, channel, data });
    } catch (error) {
      return Promise.reject(error); // not JSON (a cycle, a BigInt)
    }
    return new Promise((resolve, reject) => {
      this._queue.push({ id, text, resolve, reject, attempts: 0 });
      this._flush();
    });
  }

  /** Round trip in seconds. */
  async ping() {
    const conn = await this._waitReady();
    const started = performance.now();
    await this._request(conn, { type: "ping" });
    return (performance.now() - started) / 1000;
  }

  /** for await (const message of client.messages()) — when there is no onMessage.
   * onRecoveryLost and onError are then called from here, in order with the messages. */
  async *messages() {
    if (this._onMessage) throw new Error("messages() cannot be used together with onMessage");
    for (;;) {
      while (this._buffer.length) {
        const [kind, value] = this._buffer.shift();
        if (kind === "message") yield value;
        else await this._sideEffect(kind, value);
      }
      if (this._closed) {
        if (this._fatal) throw this._closed;
        return;
      }
      await new Promise((resolve) => {
        this._wakeReader = () => { this._wakeReader = null; resolve(); };
      });
    }
  }

  // --- connection loop ---------------------------------------------------------

  async _open() {
    if (this._closed) return;
    let token;
    try {
      token = typeof this._token === "function" ? String(await this._token()) : this._token;
    } catch (error) { // the identity provider may be down: retried with backoff
      console.warn("rabbitgate: token callback failed", error);
      return this._reconnectLater(null);
    }
    if (this._closed) return;
    let ws;
    try {
      ws = new this._WebSocket(this.url, SUBPROTOCOL);
    } catch (error) { // a malformed URL: no retry can fix it
      return this._stop(new ClientClosed(null, String(error)), true);
    }
    const conn = { ws, token, openedAt: null, timers: new Set() };
    this._conn = conn;
    this._later(conn, OPEN_TIMEOUT_SECONDS, () => this._drop(conn, "no welcome in time"));
    ws.onopen = () => {
      if (ws.protocol !== SUBPROTOCOL) return this._fail(conn, notSelected(this.url));
      ws.send(JSON.stringify({ type: "auth", token }));
    };
    ws.onmessage = (event) => this._handle(conn, event.data);
    ws.onclose = (event) => this._onClosed(conn, event.code, event.reason);
    ws.onerror = (event) => { // onclose follows with the code, unless this cannot be retried
      const fatal = fatalConnectError(this.url, event);
      if (fatal !== null) this._fail(conn, fatal);
      else if (conn.openedAt === null && this._attempt === 0) {
        console.warn(`rabbitgate: cannot connect to ${this.url}; retrying (a browser does not say ` +
          "why: a network failure, a certificate it does not trust, or not a rabbitgate endpoint)");
      }
    };
  }

  /** Stop for good on what no retry can fix. */
  _fail(conn, reason) {
    console.error(`rabbitgate: ${reason}`);
    this._detach(conn);
    try { conn.ws.close(1000); } catch { /* not open yet */ }
    this._stop(new CannotConnect(reason), true);
    this._onClosed(conn, null, reason);
  }

  _onConnected(conn, welcome) {
    this._clearTimers(conn);
    conn.openedAt = Date.now();
    this._ready = true;
    this.session = String(welcome.session);
    this.connections += 1;
    for (const channel of this._tracker.last.keys()) this._subscribeOn(conn, channel);
    this._scheduleRefresh(conn, tokenExpiry(conn.token));
    const heartbeat = typeof welcome.heartbeat === "number" && welcome.heartbeat > 0 ? welcome.heartbeat : 20;
    this._heartbeat(conn, heartbeat);
    for (const waiter of this._readyWaiters.splice(0)) waiter.resolve(conn);
    this._flush();
  }

  _onClosed(conn, code, reason) {
    if (this._conn !== conn) return;
    this._conn = null;
    this._ready = false;
    this.session = null;
    this._clearTimers(conn);
    for (const request of this._requests.values()) request.reject(new Disconnected("disconnected", "connection lost"));
    this._requests.clear();
    // Sent but not acked: unknown fate. Send again first, in the original order.
    const unacked = [...this._inflight.values()].sort((a, b) => a.id - b.id);
    this._inflight.clear();
    const again = [];
    for (const item of unacked) {
      if (++item.attempts >= MAX_ATTEMPTS) item.reject(new RabbitgateError("unavailable", "connection lost before the ack"));
      else again.push(item);
    }
    this._queue.unshift(...again);
    if (this._closed) return;
    if (!shouldReconnect(code, typeof this._token === "function")) {
      console.warn(`rabbitgate: closed with ${code} (${reason}); not reconnecting`);
      return this._stop(new ClientClosed(code, reason || "refused by the gateway"), true);
    }
    if (conn.openedAt !== null && Date.now() - conn.openedAt >= STABLE_SECONDS * 1000) this._attempt = 0;
    this._reconnectLater(code);
  }

  _reconnectLater(code) {
    const delay = backoffDelay(this._attempt++, this.backoffBase, this.backoffCap);
    console.info(`rabbitgate: disconnected (${code}); reconnecting in ${delay.toFixed(2)} s`);
    this._reconnectTimer = setTimeout(() => this._open(), delay * 1000);
  }

  /** Give up on a connection now, without waiting for the browser to notice it is dead. */
  _drop(conn, why) {
    console.warn(`rabbitgate: dropping the connection: ${why}`);
    this._detach(conn);
    try { conn.ws.close(4000, why); } catch { /* already closed */ }
    this._onClosed(conn, null, why);
  }

  _detach(conn) {
    conn.ws.onopen = conn.ws.onmessage = conn.ws.onclose = null;
  }

  _stop(error, fatal) {
    if (this._closed) return;
    this._closed = error;
    this._fatal = fatal;
    for (const waiter of this._readyWaiters.splice(0)) waiter.reject(error);
    for (const item of [...this._queue, ...this._inflight.values()]) item.reject(error);
    this._queue = [];
    this._inflight.clear();
    for (const waiter of this._firstAck.values()) waiter.reject(error);
    this._firstAck.clear();
    this._wakeReader?.();
  }

  _waitReady() {
    if (this._closed) return Promise.reject(this._closed);
    if (this._ready) return Promise.resolve(this._conn);
    const waiter = deferred();
    this._readyWaiters.push(waiter);
    return waiter.promise;
  }

  _later(conn, seconds, fn) {
    const timer = setTimeout(() => { conn.timers.delete(timer); fn(); }, seconds * 1000);
    conn.timers.add(timer);
  }

  _clearTimers(conn) {
    for (const timer of conn.timers) clearTimeout(timer);
    conn.timers.clear();
  }

  // --- frames ------------------------------------------------------------------

  /** One frame from the gateway. Anything malformed is logged and skipped. */
  _handle(conn, raw) {
    const frame = typeof raw === "string" ? parse(raw) : undefined;
    if (frame === null || typeof frame !== "object" || Array.isArray(frame)) {
      console.warn("rabbitgate: ignored a malformed frame", raw);
      return;
    }
    if (conn.openedAt === null) { // before welcome
      if (frame.type === "welcome") this._onConnected(conn, frame);
      else console.warn("rabbitgate: ignored a frame before welcome", raw);
      return;
    }
    if (frame.type === "message") {
      const seq = intOrNull(frame.seq);
      if (typeof frame.channel !== "string" || seq === null) {
        console.warn("rabbitgate: ignored a malformed message frame", raw);
      } else if (this._tracker.accept(frame.channel, seq)) {
        const sender = typeof frame.from === "string" ? frame.from : null;
        this._deliver("message", { channel: frame.channel, seq, data: frame.data, sender, ts: intOrNull(frame.ts) });
      }
      return;
    }
    if (!["ack", "error", "pong"].includes(frame.type)) return;
    const id = intOrNull(frame.id);
    const item = id === null ? undefined : this._inflight.get(id);
    const request = id === null ? undefined : this._requests.get(id);
    if (item) {
      this._inflight.delete(id);
      this._onPublishAnswer(item, frame);
    } else if (request) {
      this._requests.delete(id);
      // Applied now, before the replay frames that follow the ack are read.
      if (request.channel && frame.type === "ack") this._onSubscribed(request.channel, frame);
      request.resolve(frame);
    } else if (frame.type === "error") {
      const error = toError(frame);
      if (error.channel) { // a subscription the policies ended
        this._tracker.remove(error.channel);
        this._firstAck.delete(error.channel);
      }
      this._deliver("error", error);
    }
  }

  _onPublishAnswer(item, frame) {
    if (frame.type === "ack") return item.resolve();
    const error = toError(frame);
    if (error.code !== "unavailable" || ++item.attempts >= MAX_ATTEMPTS) return item.reject(error);
    const delay = error.retryAfter ?? backoffDelay(item.attempts, this.backoffBase, this.backoffCap);
    setTimeout(() => {
      if (this._closed) return;
      this._queue.unshift(item);
      this._flush();
    }, delay * 1000);
  }

  _flush() {
    const conn = this._conn;
    if (!this._ready || !conn) return;
    while (this._queue.length) {
      const item = this._queue.shift();
      this._inflight.set(item.id, item);
      conn.ws.send(item.text); // on a closing socket this is dropped; _onClosed requeues it
    }
  }

  _request(conn, frame, channel = null) {
    return new Promise((resolve, reject) => {
      const id = this._ids++;
      const timer = setTimeout(() => {
        this._requests.delete(id);
        reject(new RabbitgateError("timeout", "no answer in time"));
      }, REQUEST_TIMEOUT_SECONDS * 1000);
      const done = (fn) => (value) => { clearTimeout(timer); fn(value); };
      this._requests.set(id, { resolve: done(resolve), reject: done(reject), channel });
      conn.ws.send(JSON.stringify({ ...frame, id }));
    });
  }

  async _subscribeOn(conn, channel) {
    const since = this._tracker.since(channel);
    const frame = since === null ? { type: "subscribe", channel } : { type: "subscribe", channel, since };
    for (let attempt = 1; ; attempt++) {
      let answer;
      try {
        answer = await this._request(conn, frame, channel);
      } catch (error) {
        if (error instanceof Disconnected) return; // the next connection subscribes again
        answer = { type: "error", code: "unavailable", message: error.message };
      }
      if (answer.type === "ack") return; // _onSubscribed did the rest
      const error = toError(answer);
      if (error.code !== "unavailable" || attempt >= MAX_ATTEMPTS) {
        this._tracker.remove(channel);
        const waiter = this._firstAck.get(channel);
        this._firstAck.delete(channel);
        if (waiter) waiter.reject(error);
        else this._deliver("error", error);
        return;
      }
      await sleep(backoffDelay(attempt, this.backoffBase, this.backoffCap));
      if (this._conn !== conn) return;
    }
  }

  _onSubscribed(channel, ack) {
    const lost = this._tracker.onAck(channel, intOrNull(ack.seq), ack.recovered);
    this._firstAck.get(channel)?.resolve();
    this._firstAck.delete(channel);
    if (lost) this._deliver("recoveryLost", channel); // before the channel's next message
  }

  _scheduleRefresh(conn, exp) {
    if (typeof this._token !== "function" || exp === null) return; // the server closes at exp
    const delay = Math.max(0, exp - this.refreshMargin - Date.now() / 1000);
    this._later(conn, delay, async () => {
      let token = null;
      let answer;
      try {
        token = String(await this._token());
        answer = await this._request(conn, { type: "auth", token });
      } catch (error) {
        if (error instanceof Disconnected) return;
        answer = { type: "error", message: String(error) };
      }
      if (this._conn !== conn) return;
      const next = token === null ? null : tokenExpiry(token);
      if (answer.type === "ack" && (next === null || next > exp)) {
        conn.token = token;
        this._scheduleRefresh(conn, next);
      } else { // refused, or no later exp: try again shortly, until the server gives up
        console.warn("rabbitgate: token refresh did not take", answer.message ?? "same exp");
        this._later(conn, 1, () => this._scheduleRefresh(conn, exp));
      }
    });
  }

  _heartbeat(conn, seconds) {
    // Browsers may not notice a dead connection for minutes: ping, and drop it if silent.
    this._later(conn, seconds, async () => {
      try {
        await this._request(conn, { type: "ping" });
        if (this._conn === conn) this._heartbeat(conn, seconds);
      } catch (error) {
        if (!(error instanceof Disconnected) && this._conn === conn) this._drop(conn, "no pong");
      }
    });
  }

  // --- delivery to the application ---------------------------------------------

  _deliver(kind, value) {
    if (kind === "error") console.warn("rabbitgate: gateway error", value);
    if (!this._onMessage) {
      this._buffer.push([kind, value]);
      this._wakeReader?.();
      return;
    }
    this._delivery = this._delivery.then(() => this._sideEffect(kind, value));
  }

  /** Run an application callback (plain or async); its failure is logged, never ours. */
  async _sideEffect(kind, value) {
    const callback = { message: this._onMessage, recoveryLost: this._onRecoveryLost, error: this._onError }[kind];
    try {
      if (callback) await callback(value);
    } catch (error) {
      console.error(`rabbitgate: ${kind} callback failed`, error);
    }
  }
}
