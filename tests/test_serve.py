"""`sdjax serve` as a user runs it: a real server on 127.0.0.1 in a subprocess (the embedded tiny
model), driven by A1111's own Python client (`webuiapi`): images equal to the CLI's, A1111-shaped
lists, PNG info, progress and interrupt, requests batched across clients, bad input, auth."""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

from sdjax.images import read_infotext

# One worker runs the whole module: its module fixtures are costly and then built once.
pytestmark = pytest.mark.xdist_group("test_serve")

USER, PASSWORD = "alice", "s3cret"
COMMON = dict(steps=3, width=64, height=64, cfg_scale=5.0, sampler_name="Euler a")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_env(devices: int = 1) -> dict:
    """The server's environment: no SDJAX_ settings but the run's compilation cache, and the
    suite's fast-compile XLA flag (conftest.py). A request batched with others gives the image it
    gives alone up to float rounding (another batch size is another compiled program) at XLA's
    default optimisation level as at level 0; the tests allow 1/255."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDJAX_")}
    return {**env, "SDJAX_CACHE_DIR": os.environ["SDJAX_CACHE_DIR"], "JAX_PLATFORMS": "cpu",
            "JAX_NUM_CPU_DEVICES": str(devices), "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}


def start_server(args, env, port, auth=None, timeout=240):
    """`sdjax serve ARGS` in a subprocess; returns it once GET /sdapi/v1/samplers answers."""
    proc = subprocess.Popen([sys.executable, "-m", "sdjax.cli", "serve", "--port", str(port), *map(str, args)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {proc.stderr.read()[-3000:]}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/sdapi/v1/samplers", auth=auth, timeout=2)
            return proc
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise TimeoutError("the server did not start")


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server():
    """One server for the module (starting one costs CPU): auth on, requests wait 1.5 s for batch-mates."""
    port = free_port()
    proc = start_server(["--api-auth", f"{USER}:{PASSWORD}", "--max-batch", "8", "--batch-wait-ms", "1500"],
                        serve_env(), port, auth=(USER, PASSWORD))
    yield port
    stop_server(proc)


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server, username=USER, password=PASSWORD)


def stats(port):
    return httpx.get(f"http://127.0.0.1:{port}/sdjax/v1/stats", auth=(USER, PASSWORD)).json()


def cli(*args):
    r = subprocess.run([sys.executable, "-m", "sdjax.cli", *map(str, args)], env=serve_env(),
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    return [Path(line) for line in r.stdout.splitlines() if line.endswith(".png")]


def pixels(image):
    return np.asarray(image.convert("RGB"), np.int16)


def assert_same_up_to_rounding(a, b):
    """The same image, up to float rounding: the server's program for a request need not be the
    CLI's or another batch's (XLA tiles and fuses each compiled program its own way), so a pixel
    may land one level apart. A different seed, prompt or setting changes far more."""
    diff = np.abs(pixels(a) - pixels(b))
    assert diff.max() <= 1 and diff.mean() < 0.05, (diff.max(), diff.mean())


@pytest.mark.slow  # a CLI run or a new batch shape to compile: ~50 s on 2 shared cores
def test_txt2img_equals_the_cli_and_png_info_reads_it_back(api, tmp_path):
    result = api.txt2img(prompt="a red cube", negative_prompt="blurry", seed=7, batch_size=2, **COMMON)
    assert len(result.images) == 2 and result.info["all_seeds"] == [7, 8]
    files = cli("generate", "a red cube", "--negative-prompt", "blurry", "--seed", 7, "--batch-size", 2,
                "--steps", 3, "--width", 64, "--height", 64, "--cfg-scale", 5, "--sampler", "Euler a",
                "--out", tmp_path / "cli")
    assert len(files) == 2
    for image, infotext, path in zip(result.images, result.info["infotexts"], files):
        assert_same_up_to_rounding(image, Image.open(path))
        assert infotext == read_infotext(path)
        assert image.info["parameters"] == infotext  # the A1111 `parameters` PNG chunk
    back = api.png_info(result.images[1])
    assert back.info == result.info["infotexts"][1]
    assert back.parameters["Seed"] == "8" and back.parameters["Prompt"] == "a red cube"
    assert back.parameters["Negative prompt"] == "blurry" and back.parameters["Sampler"] == "Euler a"


@pytest.mark.slow  # a CLI run or a new batch shape to compile: ~50 s on 2 shared cores
def test_inpaint_equals_the_cli(api, tmp_path):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16))
    init.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    result = api.img2img(images=[init], mask_image=mask, prompt="a door", seed=3, denoising_strength=0.6,
                         inpainting_fill=1, inpaint_full_res=False, mask_blur=4, **COMMON)
    files = cli("inpaint", "a door", "--image", tmp_path / "init.png", "--mask", tmp_path / "mask.png",
                "--seed", 3, "--strength", 0.6, "--masked-content", "original", "--mask-blur", 4, "--steps", 3,
                "--cfg-scale", 5, "--sampler", "Euler a", "--out", tmp_path / "cli")
    assert_same_up_to_rounding(result.images[0], Image.open(files[0]))
    assert result.info["infotexts"][0] == read_infotext(files[0])
    assert not np.array_equal(pixels(result.images[0]), pixels(init))  # it did repaint


def test_lists_are_a1111_shaped(api, server):
    samplers = api.get_samplers()
    assert {"name", "aliases", "options"} <= set(samplers[0])
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= {s["name"] for s in samplers}
    models = api.get_sd_models()
    assert models[0]["model_name"] == "tiny" and models[0]["title"] == f"tiny [{models[0]['hash']}]"
    assert {"title", "model_name", "hash", "sha256", "filename", "config"} == set(models[0])
    assert api.get_options()["sd_model_checkpoint"] == models[0]["title"]
    auth = (USER, PASSWORD)
    base = f"http://127.0.0.1:{server}/sdapi/v1"
    schedulers = httpx.get(f"{base}/schedulers", auth=auth).json()
    assert schedulers[0]["name"] == "automatic" and "karras" in {s["name"] for s in schedulers}
    assert httpx.get(f"{base}/scripts", auth=auth).json() == {"txt2img": [], "img2img": []}
    assert httpx.get(f"{base}/embeddings", auth=auth).json() == {"loaded": {}, "skipped": {}}
    assert httpx.get(f"{base}/loras", auth=auth).json() == []


@pytest.mark.slow  # a CLI run or a new batch shape to compile: ~50 s on 2 shared cores
def test_concurrent_clients_are_batched_and_get_their_own_images(api, server):
    before = stats(server)["generate_calls"]
    results = {}

    def client(i):
        results[i] = api.txt2img(prompt=f"prompt number {i}", seed=100 + 10 * i, **COMMON)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    calls = stats(server)["generate_calls"] - before
    assert calls < 8, f"8 requests took {calls} generation calls"
    # The same request served alone: a batch of 1, another compiled program, so the float rounding
    # may differ (XLA tiles a batch-8 matmul differently); the image is otherwise the same.
    alone = api.txt2img(prompt="prompt number 5", seed=150, **COMMON)
    assert_same_up_to_rounding(results[5].image, alone.image)
    assert results[5].info["infotexts"] == alone.info["infotexts"]
    assert len({pixels(r.image).tobytes() for r in results.values()}) == 8


@pytest.mark.slow  # a 400-step request and its compile: ~30-60 s on 2 shared cores
def test_progress_moves_and_interrupt_stops_a_long_request(api, server):
    out = {}

    def long_request():
        t = time.monotonic()
        out["result"] = api.txt2img(prompt="slow", seed=1, **{**COMMON, "steps": 400})
        out["seconds"] = time.monotonic() - t

    thread = threading.Thread(target=long_request)
    thread.start()
    seen = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(set(seen)) < 3:
        p = api.get_progress()
        if p["state"]["sampling_steps"] == 400 and p["state"]["sampling_step"] > 0:
            seen.append(p["state"]["sampling_step"])
            assert 0 < p["progress"] < 1 and p["eta_relative"] >= 0
        time.sleep(0.05)
    assert len(set(seen)) >= 3 and seen == sorted(seen), seen  # progress moves forward
    api.interrupt()
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert out["result"].images == [] and out["result"].info["interrupted"] is True
    assert api.get_progress()["state"]["sampling_steps"] == 0
    assert api.txt2img(prompt="after", seed=2, **COMMON).images  # still serving


BAD = [
    ({"steps": 0}, 422, "steps"),
    ({"width": 65}, 422, "width"),
    ({"width": 8192, "height": 8192}, 422, "pixels"),
    ({"batch_size": 1000}, 422, "batch_size"),
    ({"cfg_scale": "high"}, 422, "cfg_scale"),
    ({"seed": 2**40}, 422, "seed"),
    ({"sampler_name": "Nope"}, 422, "Nope"),
    ({"enable_hr": True}, 422, "enable_hr"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 0}}, 422, "clip_skip"),
    ({"prompt": "<lora:missing:1>"}, 422, "missing"),
]


@pytest.mark.parametrize("i", range(0, len(BAD), 5))
def test_bad_input_answers_its_status_and_the_server_keeps_serving(api, server, i):
    base = f"http://127.0.0.1:{server}/sdapi/v1"
    auth = (USER, PASSWORD)
    for change, status, needle in BAD[i:i + 5]:
        r = httpx.post(f"{base}/txt2img", json={"prompt": "x", **COMMON, **change}, auth=auth, timeout=120)
        assert r.status_code == status, (change, r.text)
        assert needle in r.json()["detail"], (change, r.json())
        assert api.txt2img(prompt="good", seed=i, **COMMON).images  # a good request between bad ones
    r = httpx.post(f"{base}/img2img", json={"init_images": ["not an image"], **COMMON}, auth=auth)
    assert r.status_code == 422 and "init_images[0]" in r.json()["detail"]
    r = httpx.post(f"{base}/txt2img", content=b"{not json", auth=auth, headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_auth_on_means_401_without_credentials(server):
    base = f"http://127.0.0.1:{server}"
    for path in ("/sdapi/v1/samplers", "/sdapi/v1/progress", "/"):
        assert httpx.get(base + path).status_code == 401
    assert httpx.get(base + "/sdapi/v1/samplers", auth=(USER, "wrong")).status_code == 401
    r = httpx.post(base + "/sdapi/v1/txt2img", json={"prompt": "x", **COMMON})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Basic"
