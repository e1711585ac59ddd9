// fastws.js: the browser (and Node) client of fastws. No dependencies.
//
//   import { connect, RoomClient } from "/fastws.js";   // served with --serve-client-js
//
//   const ws = connect("ws://127.0.0.1:8000/echo");      // reconnects by itself
//   ws.on("message", (data) => console.log(data));
//   ws.send("hello");                                    // queued while disconnected
//
//   const rt = new RoomClient("ws://127.0.0.1:8000/rt"); // the room protocol, fastws.rooms.v1
//   await rt.subscribe("lobby", (m) => console.log(m.room, m.seq, m.data));
//   await rt.publish("lobby", "hi");                     // resolves on the server's ack
//
// The same semantics as the Python client (fastws.client): reconnect with
// exponential backoff and full jitter (base, cap, maxAttempts, resetAfter),
// the server's "reconnect in 1.7s" close reason honoured, several URLs raced
// by handshake time (the fastest one wins), a bounded send queue while
// disconnected ("dropOldest" or "throw"), subscriptions resumed from their
// last position on every reconnect, a reorder buffer by seq with a bounded
// wait, gaps recovered from the server's history or reported (never
// silent), and ping/pong liveness of the room protocol.
//
// A browser cannot see the HTTP status of a refused upgrade (the WebSocket
// API reports every failed opening as 1006), so a server that refuses the
// client (401/403) is retried like an unreachable one: with the backoff
// (doubling up to `cap`, 30 s, full jitter) and `maxAttempts`. Where the
// status is visible (Node's `ws` package as the `WebSocket` option: its
// "unexpected-response" event), 401 and 403 end the client at once
// (`onRefused: "throw"`, the default) or wait `refusedDelay` (60 s, doubling)
// (`onRefused: "backoff"`), and a 503/429's Retry-After is honoured.
//
// Options of connect() / new RoomClient(): WebSocket (the constructor; the
// global one by default), protocols, base, cap, maxAttempts, resetAfter,
// onRefused, refusedDelay, sendQueue, sendQueuePolicy, openTimeout; the
// room client also: reorderWait, reorderMax, ackTimeout, pingInterval,
// pingTimeout, syncInterval (seconds between two checks of every room's last
// seq on the server: messages lost at the end of a burst are found).

const SUBPROTOCOL = "fastws.rooms.v1";
const VERSION = "0.1.0";

// -- backoff and the server's hints ------------------------------------------------

class Backoff {
  constructor({ base = 0.5, cap = 30, maxAttempts = null, resetAfter = 10, random = Math.random } = {}) {
    if (!(base > 0) || cap < base) throw new RangeError("need 0 < base <= cap");
    this.base = base; this.cap = cap; this.maxAttempts = maxAttempts;
    this.resetAfter = resetAfter; this.random = random;
    this.attempt = 0; this.upSince = null;
  }
  window(n = this.attempt) { return Math.min(this.cap, this.base * Math.pow(2, Math.min(n, 60))); }
  nextDelay() { const d = this.random() * this.window(); this.attempt += 1; return d; }
  get exhausted() { return this.maxAttempts != null && this.attempt >= this.maxAttempts; }
  connected() { this.upSince = Date.now(); }
  disconnected() {
    if (this.upSince != null && (Date.now() - this.upSince) / 1000 >= this.resetAfter) this.attempt = 0;
    this.upSince = null;
  }
}

function reconnectHint(reason) {
  const m = /reconnect in (\d+(?:\.\d+)?)\s*s\b/.exec(reason || "");
  return m ? parseFloat(m[1]) : null;
}

function retryAfter(value) {
  if (value == null) return null;
  const s = String(value).trim();
  if (/^\d+$/.test(s)) return parseInt(s, 10);
  const when = Date.parse(s);
  return isNaN(when) ? null : Math.max(0, (when - Date.now()) / 1000);
}

function streamId(id) {
  const i = id.indexOf("-");
  return i < 0 ? [Number(id), 0] : [Number(id.slice(0, i)), Number(id.slice(i + 1))];
}

function compareIds(a, b) { return a[0] - b[0] || a[1] - b[1]; }

function b64encode(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

function b64decode(text) {
  const s = atob(text); const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

class Emitter {
  constructor() { this._listeners = {}; }
  on(event, fn) { (this._listeners[event] = this._listeners[event] || []).push(fn); return this; }
  off(event, fn) { const l = this._listeners[event]; if (l) this._listeners[event] = l.filter((f) => f !== fn); return this; }
  emit(event, ...args) {
    for (const fn of (this._listeners[event] || []).slice()) {
      try { fn(...args); } catch (e) { setTimeout(() => { throw e; }); }
    }
  }
}

class GaveUp extends Error {
  constructor(message, status = null, attempts = 0) { super(message); this.name = "GaveUp"; this.status = status; this.attempts = attempts; }
}

class SendQueueFull extends Error { constructor(message) { super(message); this.name = "SendQueueFull"; } }

class SubscriptionError extends Error {
  constructor(code, message, room) { super(code + ": " + message); this.name = "SubscriptionError"; this.code = code; this.room = room; }
}

// -- the reconnecting client ------------------------------------------------------------

class Client extends Emitter {
  // events: "open" (socket), "message" (string | Uint8Array), "close" ({code, reason}),
  //         "gaveup" (GaveUp), "retry" ({delay, attempt})
  constructor(urls, options = {}) {
    super();
    this.urls = Array.isArray(urls) ? urls.slice() : [urls];
    if (!this.urls.length) throw new RangeError("no URL to connect to");
    this.WebSocket = options.WebSocket || globalThis.WebSocket;
    if (!this.WebSocket) throw new Error("no WebSocket: pass options.WebSocket (Node: require('ws'))");
    this.protocols = options.protocols || [];
    this.backoff = options.backoff || new Backoff(options);
    this.onRefused = options.onRefused || "throw";
    this.refusedDelay = options.refusedDelay != null ? options.refusedDelay : 60;
    this.sendQueueSize = options.sendQueue != null ? options.sendQueue : 1024;
    this.sendQueuePolicy = options.sendQueuePolicy || "dropOldest";
    this.openTimeout = options.openTimeout != null ? options.openTimeout : 10;
    if (!["throw", "backoff"].includes(this.onRefused)) throw new RangeError("onRefused: 'throw' or 'backoff'");
    if (!["dropOldest", "throw"].includes(this.sendQueuePolicy)) throw new RangeError("sendQueuePolicy: 'dropOldest' or 'throw'");
    this.socket = null; this.url = null; this.connections = 0; this.dropped = 0;
    this.delays = []; this.rtts = {}; this.lastClose = null; this.gaveUp = null;
    this._outbox = []; this._closing = false; this._timer = null; this._refusals = 0;
    this._connectHooks = []; this._waiters = [];
    setTimeout(() => this._attempt(), 0);
  }

  get connected() { return this.socket !== null && this.socket.readyState === 1; }

  // resolves once connected (rejects with GaveUp)
  ready() {
    if (this.connected) return Promise.resolve(this);
    if (this.gaveUp) return Promise.reject(this.gaveUp);
    return new Promise((resolve, reject) => this._waiters.push([resolve, reject]));
  }

  send(data) {
    if (this.gaveUp) throw this.gaveUp;
    if (this._closing) throw new Error("client closed");
    if (this.connected && !this._outbox.length) { this.socket.send(data); return; }
    if (this._outbox.length >= this.sendQueueSize) {
      if (this.sendQueuePolicy === "throw" || this.sendQueueSize === 0) throw new SendQueueFull("send queue full (" + this.sendQueueSize + " messages) while disconnected");
      this._outbox.shift(); this.dropped += 1;
    }
    this._outbox.push(data);
  }

  get queued() { return this._outbox.length; }

  close(code = 1000, reason = "") {
    this._closing = true;
    clearTimeout(this._timer);
    const s = this.socket;
    if (s) { try { s.close(code, reason); } catch (e) { /* closed already */ } }
    for (const [, reject] of this._waiters.splice(0)) reject(new Error("client closed"));
  }

  // async iteration over the messages, across reconnects: for await (const m of client.messages())
  messages() {
    const queue = []; let wake = null; let done = false;
    this.on("message", (m) => { queue.push(m); if (wake) { wake(); wake = null; } });
    const end = () => { done = true; if (wake) { wake(); wake = null; } };
    this.on("gaveup", end); this.on("closed", end);
    const self = this;
    return {
      [Symbol.asyncIterator]() { return this; },
      async next() {
        while (!queue.length) {
          if (done || self._closing) return { value: undefined, done: true };
          await new Promise((r) => { wake = r; });
        }
        return { value: queue.shift(), done: false };
      },
    };
  }

  _open(url) {
    // one attempt at url: resolves with {socket, status, retryAfter, elapsed} (socket null on failure)
    return new Promise((resolve) => {
      const t0 = (globalThis.performance || Date).now();
      let sock, status = null, hint = null, settled = false;
      const finish = (ok) => {
        if (settled) return; settled = true; clearTimeout(timer);
        resolve({ socket: ok ? sock : null, status, retryAfter: hint, elapsed: ((globalThis.performance || Date).now() - t0) / 1000, url });
      };
      try { sock = new this.WebSocket(url, this.protocols); } catch (e) { settled = true; resolve({ socket: null, status: null, error: e, url }); return; }
      sock.binaryType = "arraybuffer";
      const timer = setTimeout(() => { try { sock.close(); } catch (e) { /* ignore */ } finish(false); }, this.openTimeout * 1000);
      if (typeof sock.on === "function") {          // Node's ws: the refused upgrade's status
        sock.on("unexpected-response", (req, res) => {
          status = res.statusCode; hint = retryAfter(res.headers["retry-after"]);
          try { req.destroy(); } catch (e) { /* ignore */ }
          finish(false);
        });
      }
      sock.onopen = () => finish(true);
      sock.onerror = () => {};
      sock.onclose = () => finish(false);
    });
  }

  async _attempt() {
    this._timer = null;
    if (this._closing) return;
    let results;
    if (this.urls.length === 1) results = [await this._open(this.urls[0])];
    else {
      // race the handshakes: the first open socket wins, the others are closed
      results = await new Promise((resolve) => {
        const all = []; let winner = null; let pending = this.urls.length;
        for (const u of this.urls) {
          this._open(u).then((r) => {
            all.push(r); pending -= 1;
            this.rtts[u] = r.socket ? r.elapsed : Infinity;
            if (r.socket && !winner) { winner = r; resolve([r]); }
            else if (r.socket) { try { r.socket.close(1000, "another server answered first"); } catch (e) { /* ignore */ } }
            if (pending === 0 && !winner) resolve(all);
          });
        }
      });
    }
    const ok = results.find((r) => r.socket);
    if (this._closing) { if (ok) ok.socket.close(1000); return; }
    if (!ok) return this._failed(results);
    this._connected(ok.socket, ok.url);
  }

  _failed(results) {
    const refused = results.find((r) => r.status === 401 || r.status === 403 || (r.status >= 400 && r.status < 500 && ![408, 429].includes(r.status)));
    if (refused) {
      if (this.onRefused === "throw") return this._giveUp(new GaveUp("server refused the connection with HTTP " + refused.status, refused.status, this.backoff.attempt));
      this._refusals += 1;
      const w = this.refusedDelay * Math.pow(2, Math.min(this._refusals - 1, 4));
      return this._retry(w / 2 + Math.random() * w / 2);
    }
    if (this.backoff.exhausted) return this._giveUp(new GaveUp(this.backoff.attempt + " attempt(s) failed", null, this.backoff.attempt));
    let delay = this.backoff.nextDelay();
    const hinted = results.find((r) => (r.status === 503 || r.status === 429) && r.retryAfter != null);
    if (hinted) delay = hinted.retryAfter;
    this._retry(delay);
  }

  _retry(delay) {
    this.delays.push(delay);
    this.emit("retry", { delay, attempt: this.backoff.attempt });
    this._timer = setTimeout(() => this._attempt(), delay * 1000);
  }

  _giveUp(err) {
    this.gaveUp = err;
    for (const [, reject] of this._waiters.splice(0)) reject(err);
    this.emit("gaveup", err);
  }

  _connected(sock, url) {
    this.socket = sock; this.url = url; this.connections += 1; this._refusals = 0;
    this.backoff.connected();
    sock.onmessage = (ev) => {
      const d = ev.data;
      this.emit("message", typeof d === "string" ? d : new Uint8Array(d));
    };
    sock.onclose = (ev) => this._lost(sock, ev.code, ev.reason || "");
    for (const hook of this._connectHooks) { try { hook(sock); } catch (e) { setTimeout(() => { throw e; }); } }
    while (this._outbox.length && sock.readyState === 1) sock.send(this._outbox.shift());
    this.emit("open", sock);
    for (const [resolve] of this._waiters.splice(0)) resolve(this);
  }

  // the connection is gone (or given up on, e.g. by a liveness check)
  _lost(sock, code, reason) {
    if (sock !== this.socket) return;
    sock.onclose = null; sock.onmessage = null;
    this.socket = null;
    this.backoff.disconnected();
    this.lastClose = { code, reason };
    this.emit("close", { code, reason });
    if (this._closing) { this.emit("closed"); return; }
    const hint = reconnectHint(reason);
    if (hint != null) return this._retry(hint);
    if (this.backoff.exhausted) return this._giveUp(new GaveUp(this.backoff.attempt + " attempt(s) failed", null, this.backoff.attempt));
    this._retry(this.backoff.nextDelay());
  }

  // drop the current connection at once (e.g. it stopped answering) and reconnect
  _drop(code, reason) {
    const s = this.socket;
    if (!s) return;
    try { s.close(4000, reason); } catch (e) { /* ignore */ }
    this._lost(s, code, reason);
  }
}

function connect(urls, options = {}) { return new Client(urls, options); }

// -- the room client ------------------------------------------------------------------

class Subscription {
  constructor(rooms, room, handler, { since = null, onGap = null } = {}) {
    this.rooms = rooms; this.room = room; this.handler = handler; this.onGap = onGap;
    this.position = since; this.recovered = null; this.history = null;
    this.gaps = 0; this.recoveries = 0; this.delivered = 0; this.active = true;
    this._lastId = typeof since === "string" ? streamId(since) : null;
    this._nextSeq = null; this._answered = false; this._collect = []; this._held = new Map();
    this._timer = null; this._answer = null; this._retry = null;
  }

  _request(recovering = false) {
    this._answered = false; this._collect = [];
    if (recovering) this.recoveries += 1;
    const req = { t: "sub", room: this.room };
    if (this.position != null) req.since = this.position;
    return JSON.stringify(req);
  }

  _frame(f) {
    if (!this._answered) {
      this._collect.push(f);
      if (this._collect.length > this.rooms.collectMax) this._collect.shift();
      return;
    }
    const seq = f.seq;
    if (!Number.isInteger(seq)) { this._deliver(f); return; }
    const nxt = this._nextSeq;
    if (nxt === null || seq === nxt) {
      this._nextSeq = seq + 1; this._deliver(f);
      if (this._held.size) this._drain();
    } else if (seq < nxt) {
      return;
    } else {
      this._held.set(seq, f);
      if (this._held.size >= this.rooms.reorderMax) this._gap();
      else if (this._timer === null) this._timer = setTimeout(() => this._gap(), this.rooms.reorderWait * 1000);
    }
  }

  _drain() {
    while (this._held.has(this._nextSeq)) {
      const f = this._held.get(this._nextSeq); this._held.delete(this._nextSeq);
      this._nextSeq += 1; this._deliver(f);
    }
    if (!this._held.size && this._timer !== null) { clearTimeout(this._timer); this._timer = null; }
  }

  _gap() {
    if (this._timer !== null) { clearTimeout(this._timer); this._timer = null; }
    if (!this._held.size) return;
    const seqs = Array.from(this._held.keys()).sort((a, b) => a - b);
    const missing = seqs[0] - this._nextSeq;
    if (this._recover()) return;
    this._reportGap({ missing, reason: "messages lost (no history to recover from)" });
    this._nextSeq = seqs[0];
    this._drain();
  }

  // with history: ask for everything after our position (the replay brings the
  // missing messages and the held ones again, in stream order); false without
  _recover() {
    if (!(this.history && this.rooms.client.connected)) return false;
    const held = Array.from(this._held.keys()).sort((a, b) => a - b).map((s) => this._held.get(s));
    this._held = new Map(); this._nextSeq = null;
    this.rooms.client.send(this._request(true));
    this._collect.push(...held);
    return true;
  }

  // a sync pong says the room's last message here was `seq`: one we lack is lost
  _checkTail(seq) {
    const nxt = this._nextSeq;
    if (!this._answered || nxt === null || !Number.isInteger(seq) || this._held.size || seq < nxt) return;
    if (this._recover()) return;
    this._reportGap({ missing: seq - nxt + 1, reason: "messages lost (no history to recover from)" });
    this._nextSeq = seq + 1;
  }

  _answeredWith(a) {
    this._answered = true;
    this.recovered = !!a.recovered;
    const pos = a.pos;
    if (typeof pos === "string") this.history = true;
    else if (Number.isInteger(pos)) this.history = false;
    const asked = this.position;
    const collected = this._collect; this._collect = [];
    if (this.history) collected.sort((x, y) => compareIds(typeof x.id === "string" ? streamId(x.id) : [0, 0], typeof y.id === "string" ? streamId(y.id) : [0, 0]));
    for (const f of collected) this._deliver(f);
    if (pos != null) {
      if (this.history) {
        if (this._lastId === null || compareIds(streamId(pos), this._lastId) > 0) { this._lastId = streamId(pos); this.position = pos; }
      } else this.position = pos;
    }
    this._nextSeq = Number.isInteger(a.seq) ? a.seq + 1 : null;
    for (const s of Array.from(this._held.keys())) if (this._nextSeq !== null && s < this._nextSeq) this._held.delete(s);
    if (!this.recovered && asked != null) this._reportGap({ missing: null, reason: "the server could not replay what was missed (no history, or trimmed past our position)", since: asked });
    const p = this._answer; this._answer = null;
    if (p) p.resolve(this);
  }

  _refused(err) {
    const p = this._answer; this._answer = null;
    if (err.code === "unavailable" && this.active) {
      if (p) { p.reject(err); return; }
      this._retry = setTimeout(() => { this._retry = null; if (this.active && this.rooms.client.connected) this.rooms.client.send(this._request()); }, 1000);
      return;
    }
    this.active = false;
    if (this.rooms.subs.get(this.room) === this) this.rooms.subs.delete(this.room);
    if (p) p.reject(err); else this.rooms.emit("error", err);
    this._end();
  }

  _reportGap(info) {
    this.gaps += 1; info.room = this.room;
    if (this.onGap) { try { this.onGap(this, info); } catch (e) { setTimeout(() => { throw e; }); } }
    this.rooms.emit("gap", this, info);
  }

  _deliver(f) {
    const id = f.id;
    if (typeof id === "string") {
      const fid = streamId(id);
      if (this._lastId !== null && compareIds(fid, this._lastId) <= 0) return;
      this._lastId = fid; this.position = id; this.history = true;
    } else if (this.history !== true && Number.isInteger(f.seq)) this.position = f.seq;
    const m = { room: this.room, data: "data" in f ? f.data : b64decode(f.b64 || ""), seq: Number.isInteger(f.seq) ? f.seq : null, id: typeof id === "string" ? id : null };
    this.delivered += 1;
    if (this.handler) { try { this.handler(m); } catch (e) { setTimeout(() => { throw e; }); } }
  }

  _end() {
    if (this._timer !== null) { clearTimeout(this._timer); this._timer = null; }
    if (this._retry !== null) { clearTimeout(this._retry); this._retry = null; }
  }

  unsubscribe() { return this.rooms.unsubscribe(this.room); }
}

class RoomClient extends Emitter {
  // events: "gap" (sub, info), "error" (SubscriptionError), plus the Client's via .client
  constructor(urls, options = {}) {
    super();
    this.reorderWait = options.reorderWait != null ? options.reorderWait : 0.5;
    this.reorderMax = options.reorderMax != null ? options.reorderMax : 1000;
    this.ackTimeout = options.ackTimeout != null ? options.ackTimeout : 10;
    this.collectMax = options.collectMax != null ? options.collectMax : 100000;
    this.pingInterval = options.pingInterval != null ? options.pingInterval : 20;
    this.pingTimeout = options.pingTimeout != null ? options.pingTimeout : 20;
    this.syncInterval = options.syncInterval != null ? options.syncInterval : 10;
    this._synced = Date.now();
    this.subs = new Map(); this._acks = new Map(); this._pings = new Map(); this._unsubs = new Map();
    this._sentAcks = new Set(); this._n = 0; this._heard = Date.now(); this._pingSent = 0; this._alive = null;
    this.client = new Client(urls, Object.assign({}, options, { protocols: [SUBPROTOCOL] }));
    this.client._connectHooks.push((sock) => this._onConnect(sock));
    this.client.on("message", (text) => this._onFrame(text));
    this.client.on("close", (ev) => this._onDisconnect(ev));
    const every = Math.min(...[this.pingInterval, this.pingTimeout, this.syncInterval].filter((x) => x > 0));
    if (every !== Infinity) this._alive = setInterval(() => this._checkAlive(), Math.max(50, every * 250));
  }

  get connected() { return this.client.connected; }
  ready() { return this.client.ready().then(() => this); }

  close() {
    if (this._alive) clearInterval(this._alive);
    this.client.close();
    const err = new Error("client closed");
    for (const s of this.subs.values()) { s.active = false; s._end(); if (s._answer) s._answer.reject(err); }
    for (const p of [...this._acks.values(), ...this._pings.values(), ...this._unsubs.values()]) p.reject(err);
    this._acks.clear(); this._pings.clear(); this._unsubs.clear();
  }

  _onConnect(sock) {
    this._heard = Date.now(); this._pingSent = 0;
    for (const s of this.subs.values()) if (s.active) sock.send(s._request());
    this._sentAcks = new Set(this._acks.keys());
  }

  _onDisconnect(ev) {
    const err = Object.assign(new Error("connection lost (" + ev.code + ")"), { code: ev.code });
    for (const n of this._sentAcks) { const p = this._acks.get(n); if (p) { this._acks.delete(n); p.reject(err); } }
    this._sentAcks = new Set();
    for (const s of this.subs.values()) {
      if (s._timer !== null) { clearTimeout(s._timer); s._timer = null; }
      s._held = new Map(); s._nextSeq = null;
    }
  }

  _checkAlive() {
    if (!this.client.connected) return;
    const now = Date.now();
    if (this._pingSent && this._heard < this._pingSent) {
      if (now - this._pingSent >= this.pingTimeout * 1000) { this._pingSent = 0; this.client._drop(1006, "ping timeout"); }
      return;
    }
    if (now - this._heard >= this.pingInterval * 1000) {
      this._pingSent = now;
      this.client.send(JSON.stringify({ t: "ping", ts: 0, seqs: true }));
    }
    if (this.syncInterval > 0 && this.subs.size && now - this._synced >= this.syncInterval * 1000) {
      this._synced = now;
      this.client.send(JSON.stringify({ t: "ping", ts: "sync", seqs: true }));
    }
  }

  _onFrame(text) {
    this._heard = Date.now();
    let f;
    try { f = JSON.parse(text); } catch (e) { return; }
    if (!f || typeof f !== "object") return;
    const t = f.t;
    if (t === "m") { const s = this.subs.get(f.room); if (s && s.active) s._frame(f); }
    else if (t === "subscribed") { const s = this.subs.get(f.room); if (s) s._answeredWith(f); }
    else if (t === "ack") { const p = this._acks.get(f.ack); if (p) { this._acks.delete(f.ack); p.resolve(f); } }
    else if (t === "pong") {
      if (f.seqs && typeof f.seqs === "object") {
        for (const [room, seq] of Object.entries(f.seqs)) { const s = this.subs.get(room); if (s && s.active) s._checkTail(seq); }
      }
      const p = this._pings.get(f.ts); if (p) { this._pings.delete(f.ts); p.resolve(((globalThis.performance || Date).now() - p.t0) / 1000); }
    }
    else if (t === "unsubscribed") { const p = this._unsubs.get(f.room); if (p) { this._unsubs.delete(f.room); p.resolve(); } }
    else if (t === "error") this._onError(f);
  }

  _onError(f) {
    const err = new SubscriptionError(String(f.code), String(f.message || ""), f.room);
    if (f.ack != null && this._acks.has(f.ack)) { const p = this._acks.get(f.ack); this._acks.delete(f.ack); p.reject(err); return; }
    const s = this.subs.get(f.room);
    if (s && !s._answered) { s._refused(err); return; }
    this.emit("error", err);
  }

  _pending(map, key, timeout) {
    return new Promise((resolve, reject) => {
      const timer = timeout ? setTimeout(() => { map.delete(key); reject(new Error("no answer within " + timeout + "s")); }, timeout * 1000) : null;
      const entry = { resolve: (v) => { clearTimeout(timer); resolve(v); }, reject: (e) => { clearTimeout(timer); reject(e); }, t0: (globalThis.performance || Date).now() };
      map.set(key, entry);
    });
  }

  // resolves with the Subscription once the server answered; rejects with SubscriptionError
  subscribe(room, handler, options = {}) {
    if (typeof room !== "string" || !room) return Promise.reject(new TypeError("room must be a non-empty string"));
    const old = this.subs.get(room);
    if (old && old.active) return Promise.reject(new Error("already subscribed to " + room));
    const sub = new Subscription(this, room, handler, options);
    this.subs.set(room, sub);
    const answered = new Promise((resolve, reject) => { sub._answer = { resolve, reject }; });
    if (this.client.connected) this.client.send(sub._request());
    const gaveUp = new Promise((_, reject) => { if (this.client.gaveUp) reject(this.client.gaveUp); else this.client.on("gaveup", reject); });
    return Promise.race([answered, gaveUp]).catch((e) => {
      if (this.subs.get(room) === sub) this.subs.delete(room);
      sub.active = false; throw e;
    });
  }

  unsubscribe(room) {
    const s = this.subs.get(room);
    if (!s) return Promise.resolve();
    this.subs.delete(room); s.active = false; s._end();
    if (!this.client.connected) return Promise.resolve();
    const p = this._pending(this._unsubs, room, this.ackTimeout);
    this.client.send(JSON.stringify({ t: "unsub", room }));
    return p.catch(() => {});
  }

  // resolves with the server's ack (ack: true, the default) or at once (ack: false)
  publish(room, data, { ack = true } = {}) {
    const req = { t: "pub", room };
    if (typeof data === "string") req.data = data;
    else req.b64 = b64encode(data instanceof Uint8Array ? data : new Uint8Array(data));
    if (!ack) { this.client.send(JSON.stringify(req)); return Promise.resolve(null); }
    const n = req.ack = ++this._n;
    const p = this._pending(this._acks, n, this.ackTimeout);
    if (this.client.connected) this._sentAcks.add(n);
    this.client.send(JSON.stringify(req));
    return p;
  }

  // a round trip of the room protocol, in seconds; { sync: true }: the pong also names each
  // subscribed room's last seq on the server, and a room that lacks messages up to it recovers
  // them (with history) or reports the gap (done every syncInterval seconds anyway)
  ping({ sync = false } = {}) {
    const ts = ++this._n;
    const p = this._pending(this._pings, ts, this.ackTimeout);
    this.client.send(JSON.stringify(sync ? { t: "ping", ts, seqs: true } : { t: "ping", ts }));
    return p;
  }
}

export { connect, Client, RoomClient, Subscription, Backoff, reconnectHint, retryAfter, GaveUp, SendQueueFull, SubscriptionError, SUBPROTOCOL, VERSION };
