"""Chat rooms: join a room by a message, publish chat messages to it.

    fastws serve examples.chat:app --port 8000
    open http://127.0.0.1:8000/  (the page talks to ws://127.0.0.1:8000/chat)

Protocol (JSON text messages):
    client -> {"join": "lobby"}                    join a room (leaving none)
    client -> {"leave": "lobby"}
    client -> {"room": "lobby", "text": "hi"}      publish to a room you are in
    server -> {"room": "lobby", "seq": 7, "from": 3, "text": "hi"}
    server -> {"joined": "lobby", "members": 4}
"""

import json

import fastws

app = fastws.App()


@app.on_message("/chat")
def on_message(conn, data):
    try:
        msg = json.loads(data)
    except (TypeError, ValueError):
        conn.close(1003, "send JSON text")
        return
    if "join" in msg:
        conn.join(str(msg["join"]))
        conn.send(json.dumps({"joined": msg["join"], "members": app.rooms.count(str(msg["join"]))}))
    elif "leave" in msg:
        conn.leave(str(msg["leave"]))
    elif "room" in msg and "text" in msg:
        room = str(msg["room"])
        if room not in app.rooms.rooms_of(conn):
            conn.send(json.dumps({"error": f"join {room!r} first"}))
            return
        seq = app.rooms.seq(room) + 1   # the sequence number publish will assign
        app.publish(room, json.dumps({"room": room, "seq": seq, "from": conn.id, "text": str(msg["text"])}))


PAGE = """<!doctype html>
<meta charset="utf-8"><title>fastws chat</title>
<style>body{font:15px sans-serif;max-width:40em;margin:2em auto}
#log{border:1px solid #ccc;height:20em;overflow:auto;padding:.5em}</style>
<h1>fastws chat</h1>
<p>Room <input id="room" value="lobby"> <button id="join">Join</button> <span id="status">connecting…</span></p>
<div id="log"></div>
<p><input id="text" size="50" placeholder="message"> <button id="send">Send</button></p>
<script>
const log = (t) => { const d = document.createElement('div'); d.textContent = t;
  const l = document.getElementById('log'); l.appendChild(d); l.scrollTop = l.scrollHeight; };
const ws = new WebSocket(`ws://${location.host}/chat`);
ws.onopen = () => document.getElementById('status').textContent = 'connected';
ws.onclose = (e) => document.getElementById('status').textContent = 'closed ' + e.code;
ws.onmessage = (e) => { const m = JSON.parse(e.data);
  if (m.joined) log(`joined ${m.joined} (${m.members} here)`);
  else if (m.error) log('error: ' + m.error);
  else log(`[${m.room} #${m.seq}] ${m.from}: ${m.text}`); };
document.getElementById('join').onclick = () =>
  ws.send(JSON.stringify({join: document.getElementById('room').value}));
document.getElementById('send').onclick = () => {
  ws.send(JSON.stringify({room: document.getElementById('room').value,
                          text: document.getElementById('text').value}));
  document.getElementById('text').value = ''; };
</script>
"""


@app.http("GET", "/")
def page(request):
    return 200, PAGE, "text/html; charset=utf-8"
