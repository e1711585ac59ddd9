// The Socket.IO relay on Node's socket.io server (npm), the same app as socketio_relay.py
// and sio_fastws.py.  Usage: node socketio_relay.js PORT [HOST] [REDIS_URL CHANNEL]
// With REDIS_URL: @socket.io/redis-adapter (pub/sub) shares rooms between nodes.
// WebSocket transport only, no compression, pings every 300 s; every client joins "relay" on connect,
// a "msg" event goes to the whole room (sender included), "echo" answers its ack.
'use strict';
const { Server } = require('socket.io');
const http = require('http');

const port = parseInt(process.argv[2], 10);
const host = process.argv[3] || '127.0.0.1';
const redisUrl = process.argv[4];
const channel = process.argv[5] || 'socket.io';

// served through an http server bound to HOST
async function start() {
  const server = http.createServer();
  const io = new Server(server, {
    transports: ['websocket'], perMessageDeflate: false, httpCompression: false,
    maxHttpBufferSize: 16 * 1024 * 1024, serveClient: false,
    // pings every 300 s, as the other relays of fastws bench (a saturated run queues seconds of
    // deliveries ahead of a ping's answer)
    pingInterval: 300000, pingTimeout: 300000 });
  if (redisUrl) {
    const { createClient } = require('redis');
    const { createAdapter } = require('@socket.io/redis-adapter');
    const pub = createClient({ url: redisUrl });
    const sub = pub.duplicate();
    await Promise.all([pub.connect(), sub.connect()]);
    io.adapter(createAdapter(pub, sub, { key: channel }));
  }
  io.on('connection', (socket) => {
    socket.join('relay');
    socket.on('msg', (data) => io.to('relay').emit('msg', data));
    socket.on('echo', (data, ack) => { if (typeof ack === 'function') ack(data); });
  });
  server.listen({ port, host, backlog: 4096 }, () => console.log(`socket.io relay on ${host}:${port}`));
}
start();
