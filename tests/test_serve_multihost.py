"""`sdjax serve` on 2 processes x 2 simulated CPU devices (jax.distributed on 127.0.0.1, gloo):
HTTP on process 0 only, each batch broadcast to both processes, the images gathered back equal
to a 1-process server's."""

import json
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest

from test_serve import COMMON, free_port, pixels, serve_env, start_server, stop_server
from sdjax.serve.a1111 import decode_image


def _txt2img(port, payloads):
    """The payloads sent concurrently (so they can share a batch); the responses in order."""
    out = {}

    def send(i, p):
        out[i] = httpx.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json=p, timeout=400)

    threads = [threading.Thread(target=send, args=(i, p)) for i, p in enumerate(payloads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in out.values():
        assert r.status_code == 200, r.text
    return [out[i].json() for i in range(len(payloads))]


@pytest.mark.slow  # three servers and their compiles: ~2 min on 2 shared cores
def test_two_processes_serve_the_images_of_one(tmp_path):
    payloads = [{"prompt": "a red cube", "seed": 7, "batch_size": 3, **COMMON},
                {"prompt": "green hills", "seed": 40, **COMMON}]
    coordinator, http = free_port(), free_port()
    follower = subprocess.Popen(
        [sys.executable, "-m", "sdjax.cli", "serve", "--port", str(free_port()), "--devices", "all",
         "--batch-wait-ms", "1000", "--coordinator-address", f"127.0.0.1:{coordinator}", "--num-processes", "2",
         "--process-id", "1"], env=serve_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    leader = start_server(["--devices", "all", "--batch-wait-ms", "1000", "--coordinator-address",
                           f"127.0.0.1:{coordinator}", "--num-processes", "2", "--process-id", "0"],
                          serve_env(2), http)
    try:
        multi = _txt2img(http, payloads)
        stats = httpx.get(f"http://127.0.0.1:{http}/sdjax/v1/stats").json()
    finally:
        stop_server(leader)
        try:
            follower.wait(timeout=120)  # process 0's stop message ends the follower
        finally:
            if follower.poll() is None:
                follower.kill()
    assert follower.returncode == 0, follower.stderr.read()[-3000:]
    assert stats["generate_calls"] == 1  # both requests in one batch, this process's share of it

    single_port = free_port()
    single = start_server(["--batch-wait-ms", "1000"], serve_env(1), single_port)
    try:
        one = _txt2img(single_port, payloads)
    finally:
        stop_server(single)
    for m, o in zip(multi, one):
        assert len(m["images"]) == len(o["images"])
        for a, b in zip(m["images"], o["images"]):
            diff = np.abs(pixels(decode_image(a, "a")) - pixels(decode_image(b, "b")))
            assert diff.max() <= 1, f"differs by {diff.max()}/255"
        assert json.loads(m["info"])["infotexts"] == json.loads(o["info"])["infotexts"]
