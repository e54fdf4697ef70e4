"""A counter and a rate limiter, each a Durable Object with storage (docs/howto/counter.md).

    sockworker serve examples.counter:app --port 8787
    curl -X POST http://127.0.0.1:8787/counter/visits   # {"visits": 1}, then 2, 3, ...
    curl http://127.0.0.1:8787/limited                    # 200 ten times in a row, then 429

The counter survives hibernation and restarts (it is in the object's database), and its reply
leaves the server only once the new value is on disk. The rate limiter is one object per client
address: a token bucket of 10 requests, refilled at 1 per second, forgotten (deleted) by an
alarm a minute after the client's last request.
"""

import time

import sockworker as sw

BUCKET = 10  # requests in a burst
REFILL = 1.0  # tokens per second
FORGET_AFTER = 60.0  # seconds without a request


class Counter(sw.DurableObject):
    def increment(self, by: int = 1) -> int:
        value = (self.ctx.storage.get("value") or 0) + by
        self.ctx.storage.put("value", value)
        return value

    def value(self) -> int:
        return self.ctx.storage.get("value") or 0


class RateLimiter(sw.DurableObject):
    def allow(self) -> bool:
        """Takes a token if there is one."""
        storage, now = self.ctx.storage, time.time()
        state = storage.get(["tokens", "last"])
        tokens = min(BUCKET, state.get("tokens", BUCKET) + (now - state.get("last", now)) * REFILL)
        allowed = tokens >= 1
        storage.put({"tokens": tokens - 1 if allowed else tokens, "last": now})
        storage.set_alarm(now + FORGET_AFTER)  # replaces the previous one
        return allowed

    def alarm(self, info: sw.AlarmInfo) -> None:
        # A minute without a request: the bucket would be full again; keep nothing.
        self.ctx.storage.delete_all()


async def fetch(request: sw.Request, env: sw.Env, ctx: sw.ExecutionContext) -> sw.Response:
    client = (request.client or "unknown").rsplit(":", 1)[0]
    if not await env.LIMITER.get_by_name(client).allow():
        return sw.Response("slow down", status=429, headers={"retry-after": "1"})
    name = request.path.removeprefix("/counter/")
    if request.path.startswith("/counter/") and name:
        counter = env.COUNTERS.get_by_name(name)
        value = await (counter.increment() if request.method == "POST" else counter.value())
        return sw.Response(f'{{"{name}": {value}}}', headers={"content-type": "application/json"})
    if request.path == "/limited":
        return sw.Response("ok")
    return sw.Response("not found", status=404)


app = sw.App(fetch=fetch, durable_objects={"COUNTERS": Counter, "LIMITER": RateLimiter})
