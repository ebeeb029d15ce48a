"""A bare aiohttp pass-through (no features), a comparison point for the benchmark.

UPSTREAM=http://127.0.0.1:9000 python bench/baselines/aiohttp_passthrough.py --port 8001
"""

import argparse
import asyncio
import os

import uvloop
from aiohttp import ClientSession, TCPConnector, web

UPSTREAM = os.environ.get("UPSTREAM", "http://127.0.0.1:9000")
HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "host"}
HOP |= {"content-length", "proxy-authorization", "proxy-authenticate", "trailer"}


async def handle(request: web.Request) -> web.StreamResponse:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    body = await request.read()
    session: ClientSession = request.app["session"]
    async with session.request(
        request.method,
        UPSTREAM + request.path_qs,
        headers=headers,
        data=body,
        allow_redirects=False,
    ) as up:
        resp = web.StreamResponse(
            status=up.status,
            reason=up.reason,
            headers={k: v for k, v in up.headers.items() if k.lower() not in HOP},
        )
        if "content-length" in up.headers:
            resp.content_length = int(up.headers["content-length"])
        await resp.prepare(request)
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


async def main(host: str, port: int) -> None:
    app = web.Application()
    app["session"] = ClientSession(connector=TCPConnector(limit=0), auto_decompress=False)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    await asyncio.Event().wait()  # run until killed (SIGTERM)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    a = ap.parse_args()
    uvloop.run(main(a.host, a.port))
