// Scenarios of fastws.js (the browser client) run in Node by tests/integration/test_client_js.py:
//
//   node client_scenarios.mjs SCENARIO /path/to/built/fastws.js '{"url": ...}'
//
// The client's WebSocket is the `ws` package's (installed here), so that a
// refused upgrade's HTTP status is visible. Every scenario prints JSON lines
// ({"event": ...}); the test reads them as they come (some scenarios wait
// for the test to kill or restart a server in between) and ends with
// {"event": "done", ...}. Every wait is bounded (the test also has a timeout).
import WebSocket from "ws";

const [scenario, modulePath, configText] = process.argv.slice(2);
const config = JSON.parse(configText || "{}");
const fastws = await import(modulePath);
const say = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function until(check, ms = 20000) {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) throw new Error("timed out waiting in scenario " + scenario);
    await sleep(10);
  }
}

const options = { WebSocket, base: 0.05, cap: 0.2 };

const scenarios = {
  // subscribe/publish/ack, binary, the error codes, unsubscribe, ping
  async basic() {
    const a = new fastws.RoomClient(config.url + "/rt", options);
    const b = new fastws.RoomClient(config.url + "/rt", options);
    const gotA = [], gotB = [];
    const sub = await a.subscribe("lobby", (m) => gotA.push(m));
    await b.subscribe("lobby", (m) => gotB.push(m));
    const acks = [await a.publish("lobby", "one"), await b.publish("lobby", new Uint8Array([0, 255, 7]))];
    await until(() => gotA.length === 2 && gotB.length === 2);
    const codes = [];
    for (const attempt of [() => a.subscribe("secret-x"), () => a.publish("readonly-x", "no"),
      () => a.subscribe("x".repeat(300))]) {
      try { await attempt(); codes.push("none"); } catch (e) { codes.push(e.code); }
    }
    const slow = new fastws.RoomClient(config.url + "/rt-slow", options);
    for (let i = 0; i < 5; i++) await slow.publish("s", String(i));
    try { await slow.publish("s", "6th"); codes.push("none"); } catch (e) { codes.push(e.code); }
    await a.unsubscribe("lobby");
    await b.publish("lobby", "after");
    await until(() => gotB.length === 3);
    const rtt = await a.ping();
    say({ event: "done", protocol: a.client.socket.protocol, recovered: sub.recovered, history: sub.history,
      acks: acks.map((x) => x.seq), gotA: gotA.map((m) => [m.seq, typeof m.data === "string" ? m.data : Array.from(m.data)]),
      gotB: gotB.length, codes, rtt });
    a.close(); b.close(); slow.close();
  },

  // resume across nodes: the test kills the client's node after "progress"
  async resume() {
    const got = [];
    const rt = new fastws.RoomClient(config.urls.map((u) => u + "/rt"), options);
    await rt.ready();
    const sub = await rt.subscribe(config.room, (m) => {
      got.push(m);
      if (got.length === config.killAfter) say({ event: "progress", n: got.length, url: rt.client.url });
    });
    say({ event: "subscribed", url: rt.client.url, history: sub.history });
    await until(() => got.length >= config.n, 60000);
    await sleep(300);
    say({ event: "done", data: got.map((m) => m.data), ids: got.map((m) => m.id), connections: rt.client.connections,
      url: rt.client.url, gaps: sub.gaps, recovered: sub.recovered });
    rt.close();
  },

  // a gap the server cannot fill: the test kills the node (and publishes) after "ready"
  async gap() {
    const got = [], gaps = [];
    const rt = new fastws.RoomClient(config.url + "/rt", options);
    const sub = await rt.subscribe(config.room, (m) => got.push(m), { onGap: (s, info) => { gaps.push(info); say({ event: "gap", info }); } });
    say({ event: "subscribed" });
    await until(() => got.length === 1);
    say({ event: "ready", position: sub.position });
    await until(() => gaps.length === 1 && got.length >= 2 && got[got.length - 1].data === "live", 60000);
    say({ event: "done", data: got.map((m) => m.data), gaps, recovered: sub.recovered, connections: rt.client.connections });
    rt.close();
  },

  // shuffled frames come out in order; a missing one is reported after the bounded wait
  async order() {
    const rt = new fastws.RoomClient(config.url + "/shuffle", Object.assign({ reorderWait: 0.3 }, options));
    const got = [], got2 = [], gaps = [];
    await rt.subscribe("shuffled-300-7", (m) => got.push(m.seq));
    await until(() => got.length === 300);
    const t0 = Date.now();
    await rt.subscribe("shuffled-50-5-skip-20", (m) => got2.push(m.seq), { onGap: (s, info) => gaps.push([(Date.now() - t0) / 1000, info.missing]) });
    await until(() => got2.length === 49);
    say({ event: "done", got, got2, gaps });
    rt.close();
  },

  // a refusing server: one request and the client gives up; or a long, growing delay
  async refused() {
    const c = fastws.connect(config.url, options);
    const err = await c.ready().then(() => null, (e) => e);
    const b = fastws.connect(config.url, Object.assign({ onRefused: "backoff", refusedDelay: 0.5 }, options));
    await sleep(3500);
    b.close();
    say({ event: "done", name: err && err.name, status: err && err.status, connections: c.connections, delays: b.delays });
  },

  // many clients lose the server at once: their first retries spread over [0, base]
  async jitter() {
    const clients = [];
    for (let i = 0; i < config.n; i++) clients.push(fastws.connect(config.url, { WebSocket, base: config.base, cap: 8 }));
    await until(() => clients.every((c) => c.connected));
    say({ event: "connected" });
    await until(() => clients.every((c) => c.delays.length >= 1), 30000);
    const firsts = clients.map((c) => c.delays[0]);
    const hints = clients.map((c) => c.lastClose && c.lastClose.reason);
    for (const c of clients) c.close();
    say({ event: "done", firsts, hints });
  },

  // the server's "reconnect in X s" close reason is waited
  async hint() {
    const c = fastws.connect(config.url, options);
    await c.ready();
    let lostAt = 0, upAt = 0;
    c.on("close", () => { lostAt = Date.now(); });
    c.on("open", () => { if (c.connections === 2) upAt = Date.now(); });
    say({ event: "connected" });
    await until(() => upAt > 0, 30000);
    say({ event: "done", lastClose: c.lastClose, delays: c.delays, waited: (upAt - lostAt) / 1000 });
    c.close();
  },

  // several URLs: the handshakes race, the first open socket wins, the others are closed;
  // when the winner's server dies the client goes to the other one
  async regions() {
    const urls = config.urls.map((u) => u + "/e");
    const c = fastws.connect(urls.concat([config.dead + "/e"]), options);
    await c.ready();
    say({ event: "connected", url: c.url, rtts: c.rtts });
    await until(() => c.lastClose !== null, 30000);
    await c.ready();
    const got = [];
    c.on("message", (m) => got.push(m));
    c.send("after the failover");
    await until(() => got.length === 1);
    say({ event: "done", url: c.url, got, connections: c.connections });
    c.close();
  },

  // a slow reader: the test floods the room while this client does not read (the server drops
  // messages for it), then sends "resume SENT" on stdin; the gaps are reported with their counts
  async drops() {
    const got = [], gaps = [];
    const rt = new fastws.RoomClient(config.url + "/rt", Object.assign({ reorderWait: 0.3, syncInterval: 0.5 }, options));
    await rt.subscribe(config.room, (m) => got.push(m.seq), { onGap: (s, info) => gaps.push(info.missing) });
    rt.client.socket._socket.pause();                 // the ws package's net.Socket: stop reading
    say({ event: "paused" });
    const line = await new Promise((r) => process.stdin.once("data", (d) => r(String(d))));
    const sent = parseInt(line.split(" ")[1], 10);
    rt.client.socket._socket.resume();
    await until(() => got.length + gaps.reduce((a, b) => a + b, 0) >= sent, 30000);
    say({ event: "done", got, gaps });
    rt.close();
  },

  // messages sent while disconnected wait in the bounded queue and go out in order
  async queue() {
    const c = fastws.connect(config.url, Object.assign({ sendQueue: 3 }, options));
    const strict = fastws.connect(config.url, Object.assign({ sendQueue: 2, sendQueuePolicy: "throw" }, options));
    const got = [];
    c.on("message", (m) => got.push(m));
    await c.ready(); await strict.ready();
    say({ event: "connected" });
    await until(() => !c.connected && !strict.connected);
    for (let i = 0; i < 5; i++) c.send("m" + i);
    const queued = c.queued, dropped = c.dropped;
    strict.send("a"); strict.send("b");
    let thrown = null;
    try { strict.send("c"); } catch (e) { thrown = e.name; }
    say({ event: "queued", queued, dropped, thrown });
    await until(() => got.length === 3, 30000);
    say({ event: "done", got });
    c.close(); strict.close();
  },
};

await scenarios[scenario]();
process.exit(0);
