// Socket.IO with its Redis adapter, as a peer of rabbitgate for bench.load.
//
//   node bench/socketio/server.js PORT REDIS_URL CHANNEL_PREFIX
//
// The common multi-node Socket.IO deployment, on one node: WebSocket transport
// only (no long-polling upgrade dance), the Redis adapter on REDIS_URL, its
// Redis channels under CHANNEL_PREFIX (one per run, so runs never see each
// other). A client emits "subscribe" (room name, with an ack) to join a room
// and "publish" (room name, body, with an ack) to send to it; the server emits
// "message" with the body to the room and then acks. With the Redis adapter a
// room broadcast is written to the local members and PUBLISHed to Redis, whose
// subscriber (this same node's) receives and decodes it, as every node of a
// cluster does: that round trip is part of what is measured. The publisher's
// ack means "handed to Socket.IO", not a broker confirm: Socket.IO has none.
//
// Prints "listening PORT" on stdout when ready; exits on SIGTERM.
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

async function main() {
  const [port, redisUrl, prefix] = process.argv.slice(2);
  if (!port || !redisUrl || !prefix) {
    console.error("usage: server.js PORT REDIS_URL CHANNEL_PREFIX");
    process.exit(2);
  }
  const pubClient = createClient({ url: redisUrl });
  const subClient = pubClient.duplicate();
  pubClient.on("error", (err) => console.error("redis:", err.message));
  subClient.on("error", (err) => console.error("redis:", err.message));
  await Promise.all([pubClient.connect(), subClient.connect()]);

  const httpServer = http.createServer();
  const io = new Server(httpServer, {
    transports: ["websocket"],
    serveClient: false,
    perMessageDeflate: false,
    maxHttpBufferSize: 1e6,
    adapter: createAdapter(pubClient, subClient, { key: prefix }),
  });
  io.on("connection", (socket) => {
    socket.on("subscribe", (room, ack) => {
      if (typeof room !== "string") return;
      socket.join(room);
      if (typeof ack === "function") ack("ok");
    });
    socket.on("publish", (room, body, ack) => {
      if (typeof room !== "string") return;
      io.to(room).emit("message", body);
      if (typeof ack === "function") ack("ok");
    });
  });
  httpServer.listen(Number(port), "127.0.0.1", () => {
    process.stdout.write(`listening ${port}\n`);
  });
  const stop = async () => {
    io.close();
    await Promise.allSettled([pubClient.quit(), subClient.quit()]);
    process.exit(0);
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((err) => {
  console.error(err.stack || String(err));
  process.exit(1);
});
