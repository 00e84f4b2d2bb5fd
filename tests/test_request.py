"""One `Request`, one validation: a bad value gives the same message through the API
(`Pipeline.generate`), the CLI (exit 2, one stderr line) and a prompts file (the batch runner)."""

import json
import math

import numpy as np
import pytest
from PIL import Image

import sdjax
from sdjax.cli import EMBEDDED_MODEL, main
from sdjax.errors import SdjaxError
from sdjax.pipeline.request import Request

# (CLI command and flags, the same value for Pipeline.generate)
BAD = [
    pytest.param(["generate", "--cfg-scale", "nan"], dict(cfg_scale=math.nan), id="nan-cfg"),
    pytest.param(["img2img", "--strength", "1.5"], dict(strength=1.5), id="strength-1.5"),
    pytest.param(["generate", "--steps", "0"], dict(steps=0), id="steps-0"),
    pytest.param(["generate", "--width", "100000", "--height", "100000"], dict(width=100000, height=100000),
                 id="width-100000"),
    pytest.param(["generate", "--seed", str(2**40)], dict(seed=2**40), id="seed-2**40"),
    pytest.param(["generate", "--sampler", "no_such_sampler"], dict(sampler="no_such_sampler"), id="unknown-sampler"),
]


@pytest.fixture(scope="module")
def pipe():
    return sdjax.load_pipeline(EMBEDDED_MODEL)


@pytest.fixture(scope="module")
def init_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / "init.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(path)
    return path


def _api_message(pipe, api, init_png) -> str:
    kw = dict(api, steps=api.get("steps", 2))
    if "strength" in api:
        kw["init_image"] = str(init_png)
    with pytest.raises(SdjaxError) as e:
        pipe.generate("a red circle", **kw)
    return str(e.value)


def _cli_stderr(argv, capsys, monkeypatch) -> str:
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


@pytest.mark.parametrize("cli,api", BAD)
def test_a_bad_value_gives_the_same_message_through_the_cli_and_the_api(cli, api, pipe, init_png, tmp_path,
                                                                          capsys, monkeypatch):
    message = _api_message(pipe, api, init_png)
    argv = [cli[0], "a red circle", *cli[1:], "--out", str(tmp_path / "out.png")]
    for flag, value in (("--steps", "2"), ("--seed", "1")):
        if flag not in cli:
            argv += [flag, value]
    if cli[0] == "img2img":
        argv += ["--image", str(init_png)]
    err = _cli_stderr(argv, capsys, monkeypatch)
    assert err.splitlines() == [f"sdjax: error: {message}"]
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("cli,api", BAD)
def test_a_prompts_file_line_gives_the_same_message(cli, api, pipe, init_png, tmp_path, capsys, monkeypatch):
    message = _api_message(pipe, api, init_png)
    line = {"prompt": "a red circle", **api}
    if "strength" in api:
        line["init_image"] = str(init_png)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(line) + "\n")
    err = _cli_stderr(["generate", "--prompts-file", str(prompts), "--steps", "2", "--seed", "1",
                       "--out", str(tmp_path / "out")], capsys, monkeypatch)
    assert err.splitlines() == [f"sdjax: error: {prompts} line 1: {message}"]


def test_a_request_is_frozen_data_checked_once_when_made():
    r = Request("a cat", steps=4, seed=1, knobs={"eta": 0.5})
    assert r.task == "txt2img" and r.batch_size == 1
    assert Request(["a", "b"]).batch_size == 2  # a list of prompts is a batch (diffusers)
    assert Request("a", init_image="x.png").task == "img2img"
    assert Request("a", init_image="x.png", mask="m.png").task == "inpaint"
    with pytest.raises(AttributeError):
        r.steps = 5
    with pytest.raises(SdjaxError, match="pixels"):
        r.sized(100000, 100000)
    with pytest.raises(SdjaxError, match="unknown generation option"):
        Request("a", knobs={"no_such_knob": 1})
    with pytest.raises(SdjaxError, match="a mask needs an init image"):
        Request("a", mask="m.png")
