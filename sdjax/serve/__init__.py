"""`sdjax serve`: AUTOMATIC1111's web API (`/sdapi/v1/*`) on a loaded pipeline, with the requests
that arrive together batched into one compiled call over every device.

    a1111.py      A1111 JSON <-> Request / response, its lists (samplers, models, LoRAs, PNG info)
    scheduler.py  the queue, cross-request batching, progress, interrupt, many hosts
    app.py        `create_app(pipe, ...)`: the FastAPI routes, auth, body limit, the page at /
    main.py       the `sdjax serve` command (parser, model loading, uvicorn, followers)
    page.html     the small web page (plain HTML + JS)

FastAPI and uvicorn are the optional extra `sdjax[serve]`; `create_app` imports them when first
used, so `import sdjax.serve` (and the `sdjax` command) works without them.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name == "create_app":  # FastAPI only when the server is used (the optional extra)
        from sdjax.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'sdjax.serve' has no attribute {name!r}")


__all__ = ["create_app"]
