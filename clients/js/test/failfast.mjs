// Run by tests/integration/test_js_client.py under Node with the `ws` package:
// what retrying cannot fix rejects connect() at once with CannotConnect.
//   node test/failfast.mjs URL [TOKEN [RETRIES]]  ->  one JSON line: {"name", "message", ...}
// With RETRIES > 0 it stops at that many connection attempts: {"name": "retried"}.
import WebSocket from "ws";
import { RabbitgateClient } from "../rabbitgate.js";

const [url, token = "t", retries = "0"] = process.argv.slice(2);
let tokens = 0;
const client = new RabbitgateClient(url, {
  token: () => {
    tokens += 1;
    if (Number(retries) > 0 && tokens >= Number(retries)) {
      console.log(JSON.stringify({ name: "retried", tokens }));
      process.exit(0);
    }
    return token;
  },
  WebSocket,
  backoffBase: 0.01,
  backoffCap: 0.05,
});
try {
  await client.connect();
  console.log(JSON.stringify({ name: "connected", tokens }));
} catch (error) {
  console.log(JSON.stringify({ name: error.constructor.name, message: error.message, closeCode: error.closeCode, tokens }));
}
client.close();
