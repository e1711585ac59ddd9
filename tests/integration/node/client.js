// Node `ws` client for the fastws integration tests.
//
//   node client.js ws://127.0.0.1:PORT/ [--too-big N]
//
// Echo round trips of text and binary messages of several sizes, then a
// clean close with 1000. With --too-big N, a second connection sends a
// binary message of N bytes and records the close code the server sends.
// Prints one JSON object on stdout: {"ok": bool, "errors": [...],
// "closeCode": n, "tooBigCloseCode": n|null, "extensions": "..."};
// exits 0 when ok.
'use strict';

const WebSocket = require('ws');

const url = process.argv[2];
const tooBigIdx = process.argv.indexOf('--too-big');
const tooBig = tooBigIdx > 0 ? parseInt(process.argv[tooBigIdx + 1], 10) : 0;
const SIZES = [0, 1, 125, 126, 127, 65535, 65536, 1048576];

const errors = [];
const result = { ok: false, errors, closeCode: null, closeReason: null,
                 tooBigCloseCode: null, extensions: null, roundTrips: 0 };

function textOf(n) {
  // ASCII, so n characters are n bytes on the wire
  const unit = 'abcdefghijklmnopqrstuvwxyz0123456789';
  return unit.repeat(Math.ceil(n / unit.length) + 1).slice(0, n);
}

function binaryOf(n) {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + 7) & 0xff;
  return b;
}

function open(u) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(u, { maxPayload: 64 * 1024 * 1024 });
    ws.once('open', () => resolve(ws));
    ws.once('error', reject);
  });
}

function nextMessage(ws) {
  return new Promise((resolve, reject) => {
    const onMsg = (data, isBinary) => { cleanup(); resolve({ data, isBinary }); };
    const onClose = (code) => { cleanup(); reject(new Error('closed ' + code)); };
    const onErr = (e) => { cleanup(); reject(e); };
    function cleanup() {
      ws.off('message', onMsg); ws.off('close', onClose); ws.off('error', onErr);
    }
    ws.on('message', onMsg); ws.once('close', onClose); ws.once('error', onErr);
  });
}

function closed(ws) {
  return new Promise((resolve) => {
    ws.once('close', (code, reason) => resolve({ code, reason: reason.toString() }));
  });
}

async function echoes(ws) {
  const texts = SIZES.map(textOf);
  texts.push('h\u00e9llo \u2603 \u{1F600} \u4e16\u754c');  // multi-byte UTF-8
  for (const t of texts) {
    ws.send(t);
    const { data, isBinary } = await nextMessage(ws);
    if (isBinary) errors.push(`text ${t.length}: echoed as binary`);
    else if (data.toString('utf8') !== t) errors.push(`text ${t.length}: payload differs`);
    else result.roundTrips++;
  }
  for (const n of SIZES) {
    const b = binaryOf(n);
    ws.send(b, { binary: true });
    const { data, isBinary } = await nextMessage(ws);
    if (!isBinary) errors.push(`binary ${n}: echoed as text`);
    else if (!Buffer.from(data).equals(b)) errors.push(`binary ${n}: payload differs (got ${data.length} bytes)`);
    else result.roundTrips++;
  }
}

async function main() {
  const ws = await open(url);
  result.extensions = ws.extensions;
  await echoes(ws);
  const done = closed(ws);
  ws.close(1000, 'bye');
  const c = await done;
  result.closeCode = c.code;
  result.closeReason = c.reason;
  if (c.code !== 1000) errors.push(`close code ${c.code}, expected 1000`);

  if (tooBig > 0) {
    const ws2 = await open(url);
    ws2.on('error', () => {});  // the server may reset after its close frame
    const done2 = closed(ws2);
    ws2.send(binaryOf(tooBig), { binary: true });
    const c2 = await done2;
    result.tooBigCloseCode = c2.code;
  }
}

const timer = setTimeout(() => {
  errors.push('timeout');
  console.log(JSON.stringify(result));
  process.exit(2);
}, 60000);

main().then(() => {
  result.ok = errors.length === 0;
}, (e) => {
  errors.push(String(e && e.stack || e));
}).finally(() => {
  clearTimeout(timer);
  console.log(JSON.stringify(result));
  process.exit(result.ok ? 0 : 1);
});
