// The presence request as a stompjs application makes it (docs/stomp.md
// "Presence"): subscribe to /presence/<channel>, take the one MESSAGE, then
// unsubscribe. Run by tests/integration/test_stompjs.py:
//   node presence.mjs CONFIG.json   (prints one JSON object: what happened)
// CONFIG: {url, ca (PEM file), tokens: {alice, bob}}.
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

function open(passcode) {
  const seen = { connected: null, errors: [], closes: [] };
  const client = new Client({
    webSocketFactory: () =>
      new WebSocket(config.url, ["v12.stomp", "v11.stomp", "v10.stomp"], { ca }),
    connectHeaders: { login: "guest", passcode },
    reconnectDelay: 0,
    onConnect: (frame) => { seen.connected = frame.headers; },
    onStompError: (frame) => { seen.errors.push({ ...frame.headers, body: frame.body }); },
    onWebSocketClose: (event) => { seen.closes.push(event.code); },
  });
  client.activate();
  return { client, seen };
}

function receipt(client, id) {
  return new Promise((resolve) => client.watchForReceipt(id, (frame) => resolve(frame.headers)));
}

// What an application's "who is here?" looks like: one answer per subscribe.
function whoIsHere(client, channel) {
  return new Promise((resolve) => {
    const subscription = client.subscribe(`/presence/${channel}`, (message) => {
      subscription.unsubscribe();
      resolve({ headers: message.headers, body: JSON.parse(message.body) });
    });
  });
}

let result;
try {
  const alice = open(config.tokens.alice);
  const bob = open(config.tokens.bob);
  await until(() => alice.seen.connected && bob.seen.connected, "CONNECTED");
  const subscribed = receipt(alice.client, "joined");
  alice.client.subscribe("/topic/room.js", () => {}, { receipt: "joined" });
  await subscribed;
  let answer = await whoIsHere(bob.client, "room.js");
  for (let n = 0; n < 20 && answer.body.count < 1; n += 1) {
    await pause(500); // the shared count is written once a tick
    answer = await whoIsHere(bob.client, "room.js");
  }
  const again = await whoIsHere(bob.client, "room.js"); // a fresh request each time
  const errorsBefore = bob.seen.errors.length;
  bob.client.subscribe("/presence/secret.js", () => {});
  await until(() => bob.seen.closes.length > 0, "the close of a forbidden request");
  await alice.client.deactivate();
  await bob.client.deactivate();
  result = {
    answer,
    again,
    errorsBefore,
    forbidden: { errors: bob.seen.errors, closes: bob.seen.closes },
  };
} catch (error) {
  result = { error: String(error), stack: error?.stack };
}
process.stdout.write(JSON.stringify(result));
process.exit(0);
