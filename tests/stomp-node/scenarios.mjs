// The real @stomp/stompjs client, as a Web-STOMP application uses it, against
// a real rabbitgate over TLS. Run by tests/integration/test_stompjs.py:
//   node scenarios.mjs CONFIG.json   (prints one JSON object: what happened)
// CONFIG: {url, ca (PEM file), tokens: {alice, bob, carol, expiring}}.
// Node-only on purpose: the browser runs the same library from its UMD bundle
// (tests/integration/test_stompjs.py, in Chromium).
import { readFileSync } from "node:fs";
import { Client } from "@stomp/stompjs";
import WebSocket from "ws";

const config = JSON.parse(readFileSync(process.argv[2], "utf8"));
const ca = readFileSync(config.ca);
const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function until(predicate, what, ms = 10000) {
  const end = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await pause(10);
  }
}

// A client as an application would make it, with what it saw recorded.
function open(passcode, extra = {}) {
  const seen = { connected: null, errors: [], closes: [] };
  const client = new Client({
    webSocketFactory: () =>
      new WebSocket(config.url, ["v12.stomp", "v11.stomp", "v10.stomp"], { ca }),
    connectHeaders: { login: "guest", passcode },
    reconnectDelay: 0, // a refused client must stay refused for the test to see it
    onConnect: (frame) => { seen.connected = frame.headers; },
    onStompError: (frame) => { seen.errors.push({ ...frame.headers, body: frame.body }); },
    onWebSocketClose: (event) => { seen.closes.push(event.code); },
    ...extra,
  });
  client.activate();
  return { client, seen };
}

function receipt(client, id) {
  return new Promise((resolve) => client.watchForReceipt(id, (frame) => resolve(frame.headers)));
}

async function basics() {
  const alice = open(config.tokens.alice);
  const bob = open(config.tokens.bob);
  await until(() => alice.seen.connected && bob.seen.connected, "CONNECTED");
  const received = [];
  const subscribed = receipt(alice.client, "sub-receipt");
  alice.client.subscribe("/topic/chat.js", (m) => received.push({ headers: m.headers, body: m.body }),
    { id: "sub-a", receipt: "sub-receipt" });
  const subscribeReceipt = await subscribed;
  const confirms = [];
  for (let n = 0; n < 3; n += 1) {
    const id = `send-${n}`;
    const confirmed = receipt(bob.client, id);
    bob.client.publish({
      destination: "/topic/chat.js",
      body: JSON.stringify({ n }),
      headers: { "content-type": "application/json", receipt: id },
    });
    confirms.push((await confirmed)["receipt-id"]);
  }
  bob.client.publish({ destination: "/topic/chat.js", body: "plain text" });
  await until(() => received.length === 4, "four messages");
  await alice.client.deactivate();
  await bob.client.deactivate();
  return {
    connected: alice.seen.connected,
    subscribeReceipt,
    confirms,
    received,
    errors: alice.seen.errors.concat(bob.seen.errors),
    closes: alice.seen.closes.concat(bob.seen.closes),
  };
}

async function replay(since) {
  const carol = open(config.tokens.carol);
  await until(() => carol.seen.connected, "CONNECTED");
  const received = [];
  carol.client.subscribe("/topic/chat.js", (m) => received.push({ headers: m.headers, body: m.body }),
    { "x-since": since });
  await until(() => received.length === 3, "the replay");
  await carol.client.deactivate();
  return received;
}

async function refused(subscribe) {
  const alice = open(config.tokens.alice);
  await until(() => alice.seen.connected, "CONNECTED");
  subscribe(alice.client);
  await until(() => alice.seen.closes.length > 0, "the close");
  await alice.client.deactivate();
  return { errors: alice.seen.errors, closes: alice.seen.closes };
}

async function unauthorized(passcode) {
  const client = open(passcode);
  await until(() => client.seen.closes.length > 0, "the close", 15000);
  await client.client.deactivate();
  return { connected: client.seen.connected, errors: client.seen.errors, closes: client.seen.closes };
}

let result;
try {
  // Started first and awaited last: its short-lived token must still be valid
  // when it connects, however long the other scenarios take on a busy machine.
  const expiry = unauthorized(config.tokens.expiring);
  const first = await basics();
  result = {
    basics: first,
    replay: await replay(first.received[0].headers["x-seq"]),
    queue: await refused((c) => c.subscribe("/queue/jobs", () => {})),
    wildcard: await refused((c) => c.subscribe("/topic/chat.*", () => {})),
    ack: await refused((c) => c.subscribe("/topic/chat.js", () => {}, { ack: "client" })),
    forbidden: await refused((c) => c.publish({ destination: "/topic/user.bob.inbox", body: "x" })),
    badPasscode: await unauthorized("guest"),
    expiry: await expiry,
  };
} catch (error) {
  result = { error: String(error), stack: error?.stack };
}
process.stdout.write(JSON.stringify(result));
process.exit(0);
