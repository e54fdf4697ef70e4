"""Live cursors on a shared board. Run ``sockworker serve examples.cursors:app --port 8787`` and
open http://127.0.0.1:8787/board/demo in two browser windows: each shows the others' cursors,
moving as they move, gone when they leave.

Each board is a Durable Object (one per name) holding hibernatable sockets; what it knows of a
participant (an id, a colour, the last position) is the socket's attachment, kept in the core, so
an idle board can hibernate and lose nothing. The page sends its pointer's position at most once
per animation frame (``requestAnimationFrame``), as a fraction of the board, and the object
broadcasts it to everyone else (``exclude=ws``), the frame encoded once by the core.

The protocol, all text frames of JSON (tests/test_example_cursors.py talks it without a browser):

- to a newcomer: ``{"kind": "hello", "id": ID, "color": CSS, "others": [{"id", "color", "x",
  "y"}, ...]}``, the others being the participants that have a position already;
- from a participant: ``{"x": X, "y": Y}``, each a number from 0 to 1;
- to the others: ``{"kind": "move", "id", "color", "x", "y"}``, and ``{"kind": "leave", "id"}``
  when a participant's socket closes;
- anything else from a participant (binary, not JSON, out of range) is answered to it alone with
  ``{"kind": "error", "message": ...}`` and goes nowhere else; its socket stays open.
"""

from __future__ import annotations

import json
import math
import secrets

import sockworker as sw


def _position(message: str | bytes) -> tuple[float, float]:
    """The (x, y) of a participant's message; ValueError, saying why, for anything else."""
    if not isinstance(message, str):
        raise ValueError('send text: {"x": X, "y": Y}')
    try:
        data = json.loads(message)
    except ValueError:
        raise ValueError('not JSON; send {"x": X, "y": Y}') from None
    if not isinstance(data, dict) or set(data) != {"x", "y"}:
        raise ValueError("send an object with exactly x and y")
    x, y = data["x"], data["y"]
    for value in (x, y):
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if not is_number or not math.isfinite(value) or not 0 <= value <= 1:
            raise ValueError("x and y are numbers from 0 to 1")
    return float(x), float(y)


class Board(sw.DurableObject):
    def __init__(self, ctx: sw.DurableObjectState, env: sw.Env) -> None:
        super().__init__(ctx, env)
        ctx.set_websocket_auto_response(sw.AutoResponse("ping", "pong"))

    def fetch(self, request: sw.Request) -> sw.Response:
        client, server = sw.WebSocketPair()
        me = {"id": secrets.token_hex(4), "color": f"hsl({secrets.randbelow(360)} 80% 45%)"}
        others = [
            seen
            for seen in (ws.deserialize_attachment() for ws in self.ctx.get_websockets())
            if seen and "x" in seen
        ]
        self.ctx.accept_websocket(server)  # hibernatable: no server.accept()
        server.serialize_attachment(me)  # kept in the core, survives hibernation
        server.send(json.dumps({"kind": "hello", **me, "others": others}))
        return sw.Response(status=101, websocket=client)

    def websocket_message(self, ws: sw.WebSocket, message: str | bytes) -> None:
        try:
            x, y = _position(message)
        except ValueError as error:
            ws.send(json.dumps({"kind": "error", "message": str(error)}))
            return
        me = ws.deserialize_attachment()
        me.update(x=x, y=y)
        ws.serialize_attachment(me)  # for the next newcomer's hello
        self.ctx.broadcast(json.dumps({"kind": "move", **me}), exclude=ws)

    def websocket_close(self, ws: sw.WebSocket, code: int, reason: str, was_clean: bool) -> None:
        self.ctx.broadcast(json.dumps({"kind": "leave", "id": ws.deserialize_attachment()["id"]}))


async def fetch(request: sw.Request, env: sw.Env, ctx: sw.ExecutionContext) -> sw.Response:
    name = request.path.removeprefix("/board/")
    if not request.path.startswith("/board/") or not name or "/" in name:
        return sw.Response(status=302, headers={"location": "/board/demo"})
    if request.headers.get("upgrade", "").lower() != "websocket":
        return sw.Response(PAGE, headers={"content-type": "text/html; charset=utf-8"})
    return await env.BOARDS.get_by_name(name).fetch(request)


app = sw.App(fetch=fetch, durable_objects={"BOARDS": Board})

# The page: the board fills the window; every other participant is an absolutely positioned
# arrow of their colour, at their fraction of the board. Self-contained (no CDN).

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>sockworker cursors</title>
<style>
  html, body { margin: 0; height: 100%; font: 14px system-ui, sans-serif; }
  #board { position: fixed; inset: 0; overflow: hidden; cursor: crosshair;
           background: repeating-linear-gradient(90deg, transparent 0 39px, #e8e8e8 39px 40px),
                       repeating-linear-gradient(0deg, #f7f7f7 0 39px, #e8e8e8 39px 40px); }
  #status { position: fixed; left: .5em; top: .5em; color: #555; pointer-events: none; }
  .cursor { position: absolute; width: 0; height: 0; pointer-events: none;
            transition: left 60ms linear, top 60ms linear; }
  .cursor::before { content: ""; position: absolute; border-style: solid;
                    border-width: 0 7px 18px 7px; border-color: transparent transparent
                    var(--color) transparent; transform: rotate(-25deg); }
  .cursor span { position: absolute; left: 12px; top: 16px; padding: 0 .3em; color: #fff;
                 background: var(--color); border-radius: 3px; font-size: 11px; }
</style></head>
<body>
<div id="board"></div>
<div id="status">connecting&hellip; <span id="me"></span> <span id="count"></span></div>
<script>
const $ = (id) => document.getElementById(id);
const board = $("board");
const cursors = new Map();  // id -> element

function place(p) {
  let el = cursors.get(p.id);
  if (!el) {
    el = document.createElement("div");
    el.className = "cursor";
    el.id = "cursor-" + p.id;
    const label = document.createElement("span");
    label.textContent = p.id;  // textContent, never innerHTML: it comes from the network
    el.append(label);
    board.append(el);
    cursors.set(p.id, el);
  }
  el.style.setProperty("--color", p.color);
  el.style.left = (p.x * 100) + "%";
  el.style.top = (p.y * 100) + "%";
  el.dataset.x = p.x; el.dataset.y = p.y;
  $("count").textContent = cursors.size + " other(s) here";
}

function remove(id) {
  const el = cursors.get(id);
  if (el) { el.remove(); cursors.delete(id); }
  $("count").textContent = cursors.size + " other(s) here";
}

const scheme = location.protocol === "https:" ? "wss:" : "ws:";
const ws = new WebSocket(`${scheme}//${location.host}${location.pathname}`);
ws.onmessage = (event) => {
  if (event.data === "pong") return;  // the answer to our keep-alive
  const m = JSON.parse(event.data);
  if (m.kind === "hello") {
    $("status").firstChild.textContent = "you are ";
    $("me").textContent = m.id;
    $("me").style.color = m.color;
    for (const other of m.others) place(other);
  } else if (m.kind === "move") place(m);
  else if (m.kind === "leave") remove(m.id);
  else if (m.kind === "error") console.warn("the board says:", m.message);
};
ws.onclose = () => {
  $("status").firstChild.textContent = "disconnected; reload to join again ";
  for (const id of [...cursors.keys()]) remove(id);
};
setInterval(() => ws.readyState === WebSocket.OPEN && ws.send("ping"), 20000);
// Leaving the page closes the socket at once (also when the browser would keep the page in its
// back-forward cache with the socket open), so the others see this cursor go; coming back
// from that cache joins again.
addEventListener("pagehide", () => ws.close(1000, "left the page"));
addEventListener("pageshow", (event) => { if (event.persisted) location.reload(); });

// At most one position per animation frame, and only if it moved.
let pending = null, scheduled = false;
board.addEventListener("pointermove", (event) => {
  pending = { x: Math.min(1, Math.max(0, event.clientX / board.clientWidth)),
              y: Math.min(1, Math.max(0, event.clientY / board.clientHeight)) };
  if (!scheduled) {
    scheduled = true;
    requestAnimationFrame(() => {
      scheduled = false;
      if (pending && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(pending));
      pending = null;
    });
  }
});
</script>
</body></html>
"""
