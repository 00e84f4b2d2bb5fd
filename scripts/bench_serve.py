"""Images per second of `sdjax serve`: N requests one after another vs N clients at once.

    python scripts/bench_serve.py [--model DIR] [--requests 8] [--steps 4] [--size 64] [--devices all]

Starts a real server (a subprocess on a free port, 127.0.0.1), warms every batch shape up
(the server pads batches to powers of two; the first call of a shape compiles), then times N sequential single-image requests and the
same N requests sent by N client threads together, which the server batches into fewer
compiled calls. Prints one line per mode and the server's generation-call counts.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import subprocess
import sys
import threading
import time

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model (default: the embedded tiny model)")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--devices", help="the server's --devices")
    p.add_argument("--batch-wait-ms", type=float, default=50)
    a = p.parse_args()
    port = _free_port()
    cmd = [sys.executable, "-m", "sdjax.cli", "serve", "--port", str(port), "--max-batch", str(a.requests),
           "--batch-wait-ms", str(a.batch_wait_ms)]
    cmd += ["--model", a.model] if a.model else []
    cmd += ["--devices", a.devices] if a.devices else []
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if server.poll() is not None:
                raise SystemExit(f"server exited: {server.stderr.read()[-2000:]}")
            try:
                httpx.get(base + "/sdapi/v1/samplers", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.5)

        def one(i: int, batch_size: int = 1) -> None:
            r = httpx.post(base + "/sdapi/v1/txt2img", timeout=900, json={
                "prompt": f"benchmark prompt {i}", "seed": 1000 + i, "steps": a.steps, "width": a.size,
                "height": a.size, "sampler_name": "Euler a", "cfg_scale": 7, "batch_size": batch_size})
            r.raise_for_status()

        def concurrent() -> None:
            threads = [threading.Thread(target=one, args=(i,)) for i in range(a.requests)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        def calls() -> int:
            return httpx.get(base + "/sdjax/v1/stats").json()["generate_calls"]

        n = 1
        while n < 2 * a.requests:  # compile every batch shape the server uses (powers of two)
            one(-1, min(n, a.requests))
            n *= 2
        c0, t0 = calls(), time.perf_counter()
        for i in range(a.requests):
            one(i)
        seq_s, seq_calls = time.perf_counter() - t0, calls() - c0
        c0, t0 = calls(), time.perf_counter()
        concurrent()
        con_s, con_calls = time.perf_counter() - t0, calls() - c0
    finally:
        server.terminate()
        server.wait(timeout=120)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# sdjax serve benchmark, {now}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"# model {a.model or 'embedded tiny'}, {a.size}x{a.size}, {a.steps} steps, Euler a, "
          f"{a.requests} requests, --batch-wait-ms {a.batch_wait_ms:g}, devices {a.devices or 1}")
    print(f"sequential: {a.requests / seq_s:.2f} images/s ({seq_s:.2f} s, {seq_calls} generation calls)")
    print(f"concurrent: {a.requests / con_s:.2f} images/s ({con_s:.2f} s, {con_calls} generation calls)")


if __name__ == "__main__":
    main()
