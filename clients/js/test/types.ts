// Compiled (not run) by `tsc -p test/tsconfig.json`: the declarations describe
// the module as an application uses it, and refuse what it does not accept.
import {
  CannotConnect,
  ClientClosed,
  type Message,
  QueueFull,
  RabbitgateClient,
  RabbitgateError,
} from "rabbitgate-client";

const client = new RabbitgateClient("wss://localhost:8443/ws", {
  token: () => fetch("/api/rabbitgate-token").then((r) => r.text()),
  onMessage: (m: Message) => {
    const channel: string = m.channel;
    const seq: number = m.seq;
    const sender: string | null = m.sender;
    void [channel, seq, sender, m.data, m.ts];
  },
  onRecoveryLost: async (channel: string) => { void channel; },
  onError: (error) => console.warn(error.code, error.retryAfter, error.channel),
  maxQueuedPublishes: 10,
  backoffBase: 0.5,
  backoffCap: 30,
  refreshMargin: 30,
});

async function use(): Promise<void> {
  await client.connect();
  await client.subscribe("chat.lobby");
  try {
    await client.publish("chat.lobby", { text: "hi" });
  } catch (error) {
    if (error instanceof QueueFull) console.log("queue full");
    else if (error instanceof CannotConnect) console.log(error.message, error.closeCode);
    else if (error instanceof ClientClosed) console.log(error.closeCode);
    else if (error instanceof RabbitgateError && error.code === "rate_limited") {
      console.log(error.retryAfter);
    }
  }
  const rtt: number = await client.ping();
  for await (const message of client.messages()) console.log(message.seq, rtt);
  const session: string | null = client.session;
  void session;
  client.close();
}
void use;

// @ts-expect-error a token is required
new RabbitgateClient("wss://localhost:8443/ws", {});
// @ts-expect-error the token is a string or a function returning one
new RabbitgateClient("wss://localhost:8443/ws", { token: 42 });
// @ts-expect-error subscribe takes a channel name
void client.subscribe(7);
// @ts-expect-error a message's seq is a number
const wrong: string = ({} as Message).seq;
void wrong;
