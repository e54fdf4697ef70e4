"""A chat room per path. Run ``make demo`` (or ``sockworker serve examples.chat:app --port 8787``)
and open http://127.0.0.1:8787/room/lobby in two browser tabs.

Each room is a Durable Object: one instance per name, holding the room's WebSockets. The sockets
are accepted as *hibernatable*, so an idle room is dropped from Python memory while its sockets stay
open in the Rust core; the next message brings it back. The room keeps its last 100 messages in
its own SQLite database (``ctx.storage.sql``) and shows them to whoever joins, also after the
server restarts. See docs/howto/chat.md.
"""

import json
import time

import sockworker as sw

HISTORY = 100


class ChatRoom(sw.DurableObject):
    def __init__(self, ctx: sw.DurableObjectState, env: sw.Env) -> None:
        super().__init__(ctx, env)
        # The page sends "ping" every 20 s; the core answers "pong" without waking the room.
        ctx.set_websocket_auto_response(sw.AutoResponse("ping", "pong"))
        self.prepare()

    def prepare(self) -> None:
        # Runs at every wake-up; a no-op once the table exists.
        self.ctx.storage.sql.exec(
            "CREATE TABLE IF NOT EXISTS messages"
            " (id INTEGER PRIMARY KEY, user TEXT, text TEXT, at REAL)"
        )

    def fetch(self, request: sw.Request) -> sw.Response:
        user = request.query.get("user", "").strip()[:32] or "anonymous"
        client, server = sw.WebSocketPair()
        self.ctx.accept_websocket(server, tags=[user])  # hibernatable: no server.accept()
        server.serialize_attachment({"user": user})  # kept in the core, survives hibernation
        # The newcomer first gets what was said before (sent once the socket opens).
        server.send(json.dumps({"kind": "history", "messages": self.history()}))
        self.send_all("join", user)
        return sw.Response(status=101, websocket=client)

    def websocket_message(self, ws: sw.WebSocket, message: str | bytes) -> None:
        if isinstance(message, str):
            user, text = ws.deserialize_attachment()["user"], message[:2000]
            self.remember(user, text)
            # Sent once the insert is durable: nobody sees a message that a crash could lose.
            self.send_all("message", user, text)

    def websocket_close(self, ws: sw.WebSocket, code: int, reason: str, was_clean: bool) -> None:
        self.send_all("leave", ws.deserialize_attachment()["user"])

    def history(self) -> list[dict[str, object]]:
        """The last HISTORY messages, oldest first."""
        return self.ctx.storage.sql.exec(
            "SELECT user, text, at FROM"
            " (SELECT * FROM messages ORDER BY id DESC LIMIT ?) ORDER BY id",
            HISTORY,
        ).to_list()

    def remember(self, user: str, text: str) -> None:
        sql = self.ctx.storage.sql
        sql.exec("INSERT INTO messages (user, text, at) VALUES (?, ?, ?)", user, text, time.time())
        sql.exec("DELETE FROM messages WHERE id <= (SELECT max(id) FROM messages) - ?", HISTORY)

    def send_all(self, kind: str, user: str, text: str = "") -> None:
        # One frame, encoded once in the core and written to every socket of the room.
        self.ctx.broadcast(json.dumps({"kind": kind, "user": user, "text": text}))


async def fetch(request: sw.Request, env: sw.Env, ctx: sw.ExecutionContext) -> sw.Response:
    name = request.path.removeprefix("/room/")
    if not request.path.startswith("/room/") or not name or "/" in name:
        return sw.Response(status=302, headers={"location": "/room/lobby"})
    if request.headers.get("upgrade", "").lower() != "websocket":
        return sw.Response(PAGE, headers={"content-type": "text/html; charset=utf-8"})
    room = env.ROOMS.get(env.ROOMS.id_from_name(name))
    return await room.fetch(request)


app = sw.App(fetch=fetch, durable_objects={"ROOMS": ChatRoom})

# The page: a name to join with, then the room's messages. The browser's own WebSocket connects to
# the page's path with ?user=NAME.

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>sockworker chat</title>
<style>
  body { font: 15px system-ui, sans-serif; max-width: 40em; margin: 2em auto; }
  #log { border: 1px solid #ccc; height: 22em; overflow-y: auto; padding: .5em; }
  .note { color: #888; } input { font: inherit; } #text { width: 75%; }
</style></head>
<body>
<h1 id="title"></h1>
<form id="join">Your name: <input id="user" required maxlength="32"> <button>Join</button></form>
<div id="log"></div>
<form id="say" hidden><input id="text" autocomplete="off"> <button>Send</button></form>
<script>
const $ = (id) => document.getElementById(id);
$("title").textContent = "Room " + decodeURIComponent(location.pathname.slice(6));
let ws;

function show(text, note) {
  const line = document.createElement("div");
  line.textContent = text;  // textContent, never innerHTML: messages are untrusted
  if (note) line.className = "note";
  $("log").append(line);
  $("log").scrollTop = $("log").scrollHeight;
}

$("join").onsubmit = (event) => {
  event.preventDefault();
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const user = encodeURIComponent($("user").value);
  ws = new WebSocket(`${scheme}//${location.host}${location.pathname}?user=${user}`);
  ws.onopen = () => {
    $("join").hidden = true; $("say").hidden = false; $("text").focus();
    show("connected as " + $("user").value, true);
  };
  ws.onmessage = (event) => {
    if (event.data === "pong") return;  // the answer to our keep-alive
    const m = JSON.parse(event.data);
    if (m.kind === "history") {
      if (m.messages.length) show("earlier in this room:", true);
      for (const old of m.messages) show(old.user + ": " + old.text);
    } else if (m.kind === "message") show(m.user + ": " + m.text);
    else show(m.user + (m.kind === "join" ? " joined" : " left"), true);
  };
  ws.onclose = () => show("disconnected; reload the page to join again", true);
  setInterval(() => ws.readyState === WebSocket.OPEN && ws.send("ping"), 20000);
};

$("say").onsubmit = (event) => {
  event.preventDefault();
  if ($("text").value) ws.send($("text").value);
  $("text").value = "";
};
</script>
</body></html>
"""
