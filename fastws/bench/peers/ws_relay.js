// The relay app on Node's `ws` (npm). Usage: node ws_relay.js PORT [HOST [deflate|plain [CERT KEY]]]
// "deflate": perMessageDeflate: true, ws's defaults (context takeover, zlib in
// libuv's thread pool). Its threshold (1024 bytes) applies only without
// server context takeover, which the benchmark's clients never ask for: every
// message is sent compressed. CERT KEY (PEM files): serve TLS (wss://) through
// an https.Server (Node's OpenSSL layer), the same relay on it.
'use strict';
const fs = require('fs');
const https = require('https');
const { WebSocketServer } = require('ws');

const port = parseInt(process.argv[2], 10);
const host = process.argv[3] || '127.0.0.1';
const deflate = process.argv[4] === 'deflate';
const cert = process.argv[5];
const key = process.argv[6];
const subscribers = new Set();

const options = { backlog: 4096, perMessageDeflate: deflate, maxPayload: 16 * 1024 * 1024 };
let wss;
if (cert) {
  const server = https.createServer({ cert: fs.readFileSync(cert), key: fs.readFileSync(key) });
  wss = new WebSocketServer({ server, ...options });
  server.listen(port, host, 4096, () => console.log(`ws relay on wss://${host}:${port}`));
} else {
  wss = new WebSocketServer({ port, host, ...options });
  wss.on('listening', () => console.log(`ws relay on ${host}:${port}`));
}
wss.on('connection', (ws, req) => {
  if (req.url === '/echo') {
    ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
    return;
  }
  subscribers.add(ws);
  ws.on('message', (data, isBinary) => {
    for (const s of subscribers) {
      if (s.readyState === 1) s.send(data, { binary: isBinary });
    }
  });
  ws.on('close', () => subscribers.delete(ws));
});
