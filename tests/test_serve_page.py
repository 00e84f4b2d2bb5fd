"""The page at `/` in headless Chromium (Debian's `chromium`), and a server's limits: body size
(413), a full queue (503), graceful shutdown with --outdir (no partial file)."""

import base64
import shutil
import signal
import subprocess
import threading
import time

import httpx
import pytest
from PIL import Image

from sdjax.images import read_infotext
from test_serve import COMMON, free_port, serve_env, start_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory):
    """No auth, a queue of 1, 64 KB bodies, images saved to --outdir."""
    tmp = tmp_path_factory.mktemp("serve-page")
    port = free_port()
    proc = start_server(["--max-queue", "1", "--max-body-mb", "0.0625", "--batch-wait-ms", "0",
                         "--outdir", tmp / "out"], serve_env(), port)
    yield port, proc, tmp / "out"
    if proc.poll() is None:
        proc.kill()


def chromium(url, tmp, *args):
    r = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=20000",
                        *args, url], capture_output=True, text=True, timeout=300)
    return r


@pytest.mark.slow  # a browser and a first compile: ~40 s on 2 shared cores
def test_the_page_submits_a_prompt_and_shows_the_image(plain_server, tmp_path):
    assert CHROMIUM, "Debian's chromium package is needed (apt-get install chromium; .ci/run installs it)"
    port = plain_server[0]
    url = (f"http://127.0.0.1:{port}/?prompt=a+green+field&steps=2&width=64&height=64&seed=21"
           "&sampler_name=Euler+a&autosubmit=1")
    r = chromium(url, tmp_path, "--dump-dom")
    dom = r.stdout
    assert 'class="result"' in dom, (dom[-2000:], r.stderr[-2000:])
    src = dom.split('class="result"')[0].rsplit("data:image/png;base64,", 1)[1].split('"')[0]
    png = tmp_path / "from-page.png"
    png.write_bytes(base64.b64decode(src))
    assert Image.open(png).size == (64, 64)
    assert "Seed: 21" in read_infotext(png) and "a green field" in read_infotext(png)
    assert "done: seeds 21" in dom
    shot = tmp_path / "page.png"
    r = chromium(url, tmp_path, f"--screenshot={shot}", "--window-size=900,700")
    assert shot.is_file() and Image.open(shot).size == (900, 700), r.stderr[-2000:]


@pytest.mark.slow  # a 300-step request to hold the queue: ~40 s on 2 shared cores
def test_body_limit_queue_limit_and_graceful_shutdown(plain_server):
    port, proc, outdir = plain_server
    base = f"http://127.0.0.1:{port}/sdapi/v1"
    r = httpx.post(f"{base}/txt2img", json={"prompt": "x" * 100_000, **COMMON})
    assert r.status_code == 413 and "bytes" in r.json()["detail"]
    answers = {}

    def send(name, seed, steps):
        answers[name] = httpx.post(f"{base}/txt2img", json={"prompt": "q", "seed": seed, **COMMON, "steps": steps},
                                   timeout=300)

    long = threading.Thread(target=send, args=("running", 1, 300))
    long.start()
    deadline = time.monotonic() + 120
    while httpx.get(f"{base}/progress").json()["state"]["sampling_step"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    queued = threading.Thread(target=send, args=("queued", 2, 2))
    queued.start()
    while httpx.get("http://127.0.0.1:%d/sdjax/v1/stats" % port).json()["queued"] < 1:
        time.sleep(0.05)
    r = httpx.post(f"{base}/txt2img", json={"prompt": "third", **COMMON})
    assert r.status_code == 503 and "queue is full" in r.json()["detail"]
    assert httpx.get(f"{base}/samplers").status_code == 200  # still serving
    proc.send_signal(signal.SIGTERM)  # graceful: the running batch finishes, nothing half-written
    long.join(timeout=300)
    queued.join(timeout=300)
    assert answers["running"].status_code == 200 and len(answers["running"].json()["images"]) == 1
    assert answers["queued"].status_code in (200, 503)
    proc.wait(timeout=120)
    saved = sorted(outdir.iterdir())
    assert saved and all(p.suffix == ".png" for p in saved), saved  # no temporary or partial file
    assert any("Seed: 1," in read_infotext(p) for p in saved)
