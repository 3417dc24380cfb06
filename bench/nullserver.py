"""An ASGI app that does nothing, served the way the relay is served.

``python -m bench.nullserver --listen 127.0.0.1:PORT`` runs hypercorn's trio
worker with the relay's server settings and an app that reads each request body
and answers at once: ``{"success":true}``, or a legacy bulk answer of 50 ``ok``
results for ``POST /bulk``. The CPU it spends per request is what the HTTP
stack costs before the relay does any work (see ``bench.framework``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import msgspec
import trio

from router.cli import tune_gc
from router.http import parse_listen, serve_asgi

OK = b'{"success":true}'
BULK_OK = msgspec.json.encode({"results": [{"status": "ok"}] * 50, "success": True})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    body = BULK_OK if scope["path"].endswith("/bulk") else OK
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.nullserver",
                                description=__doc__.split("\n")[0])
    p.add_argument("--listen", default="127.0.0.1:8099", help="host:port (127.0.0.1:8099)")
    args = p.parse_args(argv)
    host, port = parse_listen(args.listen)
    tune_gc()  # the served relay's collector settings, so the two compare
    try:
        trio.run(serve_asgi, app, host, port)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
