// socket.io-client (Node) against a fastws Socket.IO server: one scenario per run,
// one JSON line of results on stdout.  Used by tests/integration/test_socketio_js.py.
//
//   node sio_client.mjs SCENARIO URL [EMIT_URL]
//
// Every wait is bounded; the process exits by itself.
import { io } from "socket.io-client";

const [scenario, url, emitUrl] = process.argv.slice(2);
const out = { scenario, errors: [] };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const until = async (cond, ms = 10000) => {
  const end = Date.now() + ms;
  while (!cond() && Date.now() < end) await sleep(10);
  return cond();
};
const opts = (extra = {}) => ({ transports: ["websocket"], reconnection: false, timeout: 10000, ...extra });
const connected = (s) => new Promise((resolve, reject) => {
  s.once("connect", () => resolve(s));
  s.once("connect_error", (e) => reject(e));
});
const print = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
setTimeout(() => { out.errors.push("scenario timed out"); print(out); process.exit(2); }, 60000).unref();

async function basic() {
  const a = io(url, opts({ auth: { token: "t", user: "node" } }));
  await connected(a);
  out.id = a.id;
  out.whoami = await a.timeout(5000).emitWithAck("whoami");
  out.echo = await a.timeout(5000).emitWithAck("echo", { n: 1, s: "ü" });
  // server -> client with an ack
  a.on("question", (data, ack) => ack({ got: data }));
  out.ask = await a.timeout(5000).emitWithAck("ask", { event: "question", data: "q" });
  // binary both ways
  const buf = Buffer.from([0, 1, 2, 255]);
  const bin = [];
  a.on("binary_back", (d) => bin.push(d));
  const back = await a.timeout(5000).emitWithAck("binary", { b: buf, list: [buf, "x"] });
  out.binaryAck = Buffer.isBuffer(back.b) && back.b.equals(buf) && Buffer.isBuffer(back.list[0]) && back.list[1] === "x";
  await until(() => bin.length === 1);
  out.binaryEvent = bin.length === 1 && Buffer.from(bin[0].b).equals(buf);
  // an ack the server never sends: the client's own timeout
  try { await a.timeout(200).emitWithAck("no-such-event"); out.clientTimeout = false; }
  catch (e) { out.clientTimeout = true; }
  // rooms and skip_sid
  const b = io(url, opts());
  const c = io(url, opts());
  await Promise.all([connected(b), connected(c)]);
  const got = { a: [], b: [], c: [] };
  for (const [n, s] of [["a", a], ["b", b], ["c", c]]) s.on("room_msg", (d) => got[n].push(d));
  await a.timeout(5000).emitWithAck("join", "r");
  await b.timeout(5000).emitWithAck("join", "r");
  await a.timeout(5000).emitWithAck("to_room", { room: "r", data: "skip-a", skip: true });
  await until(() => got.b.length === 1);
  await sleep(200);
  out.rooms = got;
  // namespaces on the same connection (the Manager multiplexes them)
  const chat = io(url + "/chat", opts({ auth: { who: "chat" } }));
  await connected(chat);
  out.chatWhoami = await chat.timeout(5000).emitWithAck("whoami");
  out.sameEngine = chat.io === a.io;
  chat.disconnect(); a.disconnect(); b.disconnect(); c.disconnect();
}

async function refused() {
  const s = io(url, opts({ auth: { token: "bad" } }));
  try { await connected(s); out.connected = true; }
  catch (e) { out.message = e.message; out.data = e.data; }
  const n = io(url + "/nope", opts());
  try { await connected(n); out.nopeConnected = true; }
  catch (e) { out.nopeMessage = e.message; }
  s.close(); n.close();
}

async function polling() {
  const s = io(url, { transports: ["polling"], reconnection: false, timeout: 5000 });
  try { await connected(s); out.connected = true; }
  catch (e) { out.error = e.message; out.description = e.description; out.context = e.context && e.context.responseText; }
  s.close();
}

async function serverDisconnect() {
  const s = io(url, opts());
  await connected(s);
  const reason = new Promise((r) => s.once("disconnect", (why) => r(why)));
  s.emit("kick");
  out.reason = await Promise.race([reason, sleep(10000).then(() => "none")]);
  out.active = s.active;
}

async function pingTimeout() {
  // the test stops the server (SIGSTOP) once this prints "connected"
  const s = io(url, opts());
  await connected(s);
  const reason = new Promise((r) => s.once("disconnect", (why) => r(why)));
  print({ connected: true });
  out.reason = await Promise.race([reason, sleep(30000).then(() => "none")]);
}

async function recovery() {
  // connect, join a room, lose the link; meanwhile the room gets events; reconnect:
  // socket.recovered, the same id, the room kept, the missed events in order
  const s = io(url, { transports: ["websocket"], reconnectionDelay: 200, reconnectionDelayMax: 400, timeout: 10000 });
  const got = [];
  s.on("room_msg", (...args) => got.push(args));
  await connected(s);
  out.firstRecovered = s.recovered;
  const id1 = s.id;
  await s.timeout(5000).emitWithAck("join", "rec");
  const post = (data) => fetch(emitUrl, { method: "POST", body: JSON.stringify({ event: "room_msg", data, to: "rec" }) });
  await post("before");
  await until(() => got.length === 1);
  const reasons = [];
  s.on("disconnect", (why) => reasons.push(why));
  s.io.engine.close();          // the link drops (the client reconnects by itself)
  await until(() => reasons.length === 1, 5000);
  for (const d of ["missed-1", "missed-2", "missed-3"]) await post(d);
  await until(() => s.connected && got.length >= 4, 15000);
  await post("after");
  await until(() => got.length >= 5);
  out.reasons = reasons;
  out.recovered = s.recovered;
  out.sameId = s.id === id1;
  out.data = got.map((a) => a[0]);
  out.offsets = got.map((a) => a[a.length - 1]);
  out.rooms = await s.timeout(5000).emitWithAck("join", "other");
  // a second client that lost its pid gets a new id (no recovery)
  s.disconnect();
}

const scenarios = { basic, refused, polling, serverDisconnect, pingTimeout, recovery };
try {
  await scenarios[scenario]();
} catch (e) {
  out.errors.push(String((e && e.stack) || e));
}
print(out);
process.exit(0);
