"""A1111 payloads as sdjax Requests without generating (`sdjax.serve.a1111`), and the app's
model switch over --models-dir, in process (FastAPI's test client, no image made)."""

import base64
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from sdjax.cli import EMBEDDED_MODEL
from sdjax.errors import RequestError, UnknownNameError
from sdjax.pipeline.control import ControlNetUnit
from sdjax.serve import a1111


def b64(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_txt2img_payload_fields(tmp_path):
    ctx = a1111.Context(lora_dir=tmp_path)
    r, _ = a1111.to_request({"prompt": "a <lora:style:0.5> cat", "negative_prompt": "dull", "seed": 9, "steps": 12,
                             "cfg_scale": 4.5, "width": 96, "height": 64, "batch_size": 2, "n_iter": 3,
                             "sampler_name": "DPM++ 2M SDE", "scheduler": "Karras", "subseed": 4,
                             "subseed_strength": 0.25, "override_settings": {"CLIP_stop_at_last_layers": 2},
                             "eta": 1.0, "s_noise": 1.0, "restore_faces": False}, "txt2img", ctx)
    assert (r.prompt, r.negative_prompt, r.seed, r.steps, r.cfg_scale, r.width, r.height) == \
        ("a <lora:style:0.5> cat", "dull", 9, 12, 4.5, 96, 64)
    assert r.batch_size == 6 and r.clip_skip == 2 and (r.subseed, r.subseed_strength) == (4, 0.25)
    assert (r.sampler, r.schedule) == ("dpmpp_2m_sde", "karras") and r.lora_dir == tmp_path
    assert r.knobs == {}  # eta 1.0: this sampler's default (A1111 writes no Eta then)
    r, _ = a1111.to_request({"prompt": "x", "sampler_name": "Euler a", "eta": 0.5, "s_churn": 0.3}, "txt2img", ctx)
    assert r.knobs == {"eta": 0.5} and r.sampler == "euler_ancestral"  # s_churn: not a knob of Euler a
    r, _ = a1111.to_request({"prompt": "x", "sampler_name": "Euler", "s_churn": 0.3, "s_tmax": 0}, "txt2img", ctx)
    assert r.knobs["s_churn"] == 0.3 and r.knobs["s_tmax"] > 1e30  # 0 = no upper bound, as A1111
    resolved = a1111.resolve_seeds({"seed": -1})
    assert 0 <= resolved["seed"] < 2**32 and a1111.resolve_seeds({"seed": 5})["seed"] == 5


@pytest.mark.parametrize("payload, error, needle", [
    ({"steps": "ten"}, RequestError, "steps"),
    ({"width": 100}, RequestError, "width"),
    ({"sampler_name": "Restart"}, UnknownNameError, "Restart"),
    ({"n_iter": 0}, RequestError, "n_iter"),
    ({"tiling": True}, RequestError, "tiling"),
    ({"alwayson_scripts": {"ADetailer": {"args": []}}}, RequestError, "ADetailer"),
    ({"override_settings": {"CLIP_stop_at_last_layers": "two"}}, RequestError, "CLIP_stop_at_last_layers"),
])
def test_bad_payload_names_the_field(payload, error, needle):
    with pytest.raises(error, match=needle):
        a1111.to_request({"prompt": "x", **payload}, "txt2img", a1111.Context())


def test_img2img_payload_resize_mask_and_controlnet(tmp_path):
    (tmp_path / "control_canny.safetensors").write_bytes(b"")
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 32), 0)
    mask.paste(255, (0, 0, 32, 32))
    r, _ = a1111.to_request({
        "prompt": "x", "init_images": [b64(init)], "mask": b64(mask), "width": 64, "height": 64, "resize_mode": 1,
        "denoising_strength": 0.4, "inpainting_fill": 2, "inpaint_full_res": 1, "inpaint_full_res_padding": 8,
        "mask_blur": 2, "inpainting_mask_invert": 1,
        "alwayson_scripts": {"ControlNet": {"args": [
            {"enabled": True, "model": "control_canny [abc]", "image": b64(init), "module": "canny", "weight": 0.7,
             "guidance_start": 0.1, "guidance_end": 0.8, "threshold_a": 50, "threshold_b": 150, "control_mode": 2},
            {"enabled": False, "model": "ignored"}]}}}, "img2img", a1111.Context(controlnet_dir=tmp_path))
    assert r.task == "inpaint" and r.init_image.size == (64, 64) and r.strength == 0.4
    assert (r.inpainting_fill, r.inpaint_full_res, r.inpaint_full_res_padding, r.mask_blur) == \
        ("latent noise", True, 8, 2.0)
    m = np.asarray(r.mask)  # crop and resize: columns 16..48 of the 64x32 mask, doubled, then inverted
    assert m.shape == (64, 64) and m[:, :30].max() <= 16 and m[:, 34:].min() >= 239  # Lanczos rings a little
    (unit,) = r.controlnets
    assert isinstance(unit, ControlNetUnit) and unit.model == str(tmp_path / "control_canny.safetensors")
    assert (unit.scale, unit.start, unit.end, unit.preprocessor, unit.low_threshold, unit.high_threshold,
            unit.guess_mode) == (0.7, 0.1, 0.8, "canny", 50.0, 150.0, True)
    assert unit.image.size == (64, 32)
    with pytest.raises(RequestError, match=r"ControlNet.args\[0\].model"):
        a1111.to_request({"prompt": "x", "alwayson_scripts": {"controlnet": {"args": [
            {"model": "nope", "image": b64(init)}]}}}, "txt2img", a1111.Context(controlnet_dir=tmp_path))


def test_resize_modes():
    wide = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None, :, None], (32, 1, 3)))
    assert a1111.resize(wide, 64, 64, 0).size == (64, 64)
    crop = np.asarray(a1111.resize(wide, 32, 32, 1))
    assert crop.shape == (32, 32, 3) and 10 < crop[0, 0, 0] < 20  # the centre kept, the sides cut
    fill = np.asarray(a1111.resize(wide, 64, 64, 2))
    assert fill.shape == (64, 64, 3) and (fill[0] == fill[16]).all()  # the border stretched from the edge row


def test_png_info_and_model_switch(tmp_path):
    from fastapi.testclient import TestClient

    from sdjax import serve
    from sdjax.pipeline.load import load_pipeline

    image = Image.new("RGB", (8, 8))
    text = "a cat\nNegative prompt: dog\nSteps: 3, Sampler: Euler a, Seed: 4, Size: 8x8"
    info = a1111.png_info({"image": a1111.encode_png(image, text)})
    assert info["info"] == text and info["parameters"]["Seed"] == "4" and info["parameters"]["Size-1"] == "8"

    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(EMBEDDED_MODEL, models / "other")  # 3 MB
    loaded = []

    def load(path):
        loaded.append(path)
        return load_pipeline(path)

    app = serve.create_app(load_pipeline(EMBEDDED_MODEL), models_dir=models, load=load)
    with TestClient(app) as client:
        titles = [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
        assert titles[0].startswith("tiny [") and titles[1] == "other"
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "missing"})
        assert r.status_code == 422 and "sd_model_checkpoint" in r.json()["detail"]
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other"}).status_code == 200
        assert loaded == [models / "other"]
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("other [")
        assert client.post("/sdapi/v1/png-info", json={"image": "%%%"}).status_code == 422
        assert json.loads(json.dumps(client.get("/sdapi/v1/progress").json()))["state"]["sampling_steps"] == 0


def test_one_failing_request_never_fails_its_batch_mates():
    """A merged batch that fails runs each of its requests alone: the good ones get their images.
    (The failure is injected into the real generator for one prompt; nothing else is replaced.)"""
    from sdjax.errors import TaskError
    from sdjax.pipeline import combine
    from sdjax.pipeline.load import load_pipeline
    from sdjax.serve.scheduler import Scheduler

    pipe = load_pipeline(EMBEDDED_MODEL)
    real = pipe.generator.generate

    def generate(request, **kw):
        if "boom" in (request.prompt if isinstance(request.prompt, (list, tuple)) else [request.prompt]):
            raise TaskError("boom cannot be drawn")
        return real(request, **kw)

    pipe.generator.generate = generate
    sched = Scheduler(pipe, a1111.Context())
    small = {"steps": 2, "width": 64, "height": 64, "sampler_name": "Euler"}
    requests = [a1111.to_request({"prompt": p, "seed": i, **small}, "txt2img", sched.ctx)[0]
                for i, p in enumerate(["a", "boom", "c"])]
    assert len({combine.batch_key(pipe, r) for r in requests}) == 1  # they do share a batch
    outcomes = sched.execute(requests)
    assert "boom cannot be drawn" in str(outcomes[1].error) and outcomes[1].result is None
    for i in (0, 2):
        assert outcomes[i].error is None and len(outcomes[i].result.images) == 1
        assert outcomes[i].result.seeds == [i]
    assert sched.stats["generate_calls"] == 4  # the merged call, then each alone
