"""A1111 infotext: exact writing, parsing of real A1111 strings, and write->parse round trips."""

import json
import random
import re

import pytest

from sdjax.metadata import (
    InfotextError,
    format_hashes,
    format_infotext,
    parse_hashes,
    parse_infotext,
    quote,
    unquote,
)


def test_format_matches_a1111_layout_and_order():
    params = {
        # deliberately not in A1111 order
        "Version": "sdjax 0.1.0",
        "Lora hashes": {"add_detail": "7c6bad76eb54", "more:details,x": "1234"},
        "Hires upscale": 2,
        "Clip skip": 2,
        "Seed": 1,
        "Model": "v1-5-pruned-emaonly",
        "Steps": 20,
        "Size": (512, 768),
        "Sampler": "DPM++ 2M",
        "CFG scale": 7,
        "Model hash": "6ce0161689",
        "Denoising strength": 0.5,
        "Schedule type": "Karras",
        "Variation seed": None,
    }
    got = format_infotext("a cat, (red:1.2)\nsecond line", "blurry, bad", params)
    want = (
        "a cat, (red:1.2)\nsecond line\n"
        "Negative prompt: blurry, bad\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x768, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.5, Clip skip: 2, "
        # keys outside A1111's fixed list keep the caller's order, before Version
        'Lora hashes: "add_detail: 7c6bad76eb54, moredetailsx: 1234", Hires upscale: 2, Version: sdjax 0.1.0'
    )
    assert got == want


def test_format_omits_empty_negative_clip_skip_1_and_defaults_version():
    got = format_infotext("p", "", {"Steps": 20, "Sampler": "Euler a", "Clip skip": 1, "Seed": 3})
    assert got == "p\nSteps: 20, Sampler: Euler a, Seed: 3, Version: sdjax 0.1.0"
    got = format_infotext("p", "", {"Steps": 20, "Sampler": "Euler", "Seed": 3, "Version": None})
    assert got == "p\nSteps: 20, Sampler: Euler, Seed: 3"


def test_quote_matches_a1111_where_a1111_quotes():
    # A1111: json.dumps(text, ensure_ascii=False) when "," ":" or "\n" is in the text.
    for text in ["a, b", "a: b", "a\nb", 'x: "y"', "größe, 1", "plain", "1.5"]:
        a1111 = json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text
        assert quote(text) == a1111
    assert unquote('"a, b"') == "a, b"
    assert unquote('"broken') == '"broken'
    assert unquote('"\\q"') == '"\\q"'  # invalid JSON is kept as is, like A1111


def test_bad_key_is_an_error():
    with pytest.raises(InfotextError, match="a,b"):
        format_infotext("p", "", {"Steps": 1, "Seed": 2, "a,b": 3})
    with pytest.raises(InfotextError):
        format_infotext("p", "", {"Steps": 1, "Seed": 2, "Lora (x)": 3})


def test_hashes_round_trip():
    hashes = {"add_detail": "7c6bad76eb54", "my lora-v2": "0123abcd"}
    assert parse_hashes(format_hashes(hashes)) == hashes


REAL_A1111 = [
    # A1111's own docstring example (old format, no version).
    (
        "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, "
        "by Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\n"
        "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, "
        "poorly drawn face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b",
        {
            "Prompt": "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, "
            "by Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate",
            "Negative prompt": "ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, "
            "poorly drawn face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing",
            "Steps": "20",
            "Sampler": "Euler a",
            "CFG scale": "7",
            "Seed": "965400086",
            "Size-1": "512",
            "Size-2": "512",
            "Model hash": "45dee52b",
        },
    ),
    # v1.10 txt2img with hires fix, LoRA, TI embedding, multi-line prompt and negative prompt.
    (
        "masterpiece, best quality, 1girl, (red hair:1.2), <lora:add_detail:0.5>\n"
        "standing in a field BREAK sunset\n"
        "Negative prompt: (worst quality, low quality:1.4), easynegative\n"
        "lowres\n"
        "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, "
        "Hires upscale: 2, Hires steps: 15, Hires upscaler: R-ESRGAN 4x+ Anime6B, "
        'Lora hashes: "add_detail: 7c6bad76eb54", TI hashes: "easynegative: c74b4e810b03", Version: v1.10.1',
        {
            "Prompt": "masterpiece, best quality, 1girl, (red hair:1.2), <lora:add_detail:0.5>\nstanding in a field BREAK sunset",
            "Negative prompt": "(worst quality, low quality:1.4), easynegative\nlowres",
            "Steps": "28",
            "Sampler": "DPM++ 2M",
            "Schedule type": "Karras",
            "CFG scale": "7",
            "Seed": "1234567890",
            "Size-1": "512",
            "Size-2": "768",
            "Model hash": "6ce0161689",
            "Model": "v1-5-pruned-emaonly",
            "Denoising strength": "0.45",
            "Clip skip": "2",
            "Hires upscale": "2",
            "Hires steps": "15",
            "Hires upscaler": "R-ESRGAN 4x+ Anime6B",
            "Lora hashes": "add_detail: 7c6bad76eb54",
            "TI hashes": "easynegative: c74b4e810b03",
            "Version": "v1.10.1",
        },
    ),
    # ADetailer and ControlNet extension keys, variation seed, seed resize, hires resize.
    (
        "portrait of a knight\n"
        "Steps: 30, Sampler: Euler a, CFG scale: 6.5, Seed: 42, Size: 768x512, Model hash: 31e35c80fc, "
        "Model: sd_xl_base_1.0, Variation seed: 7, Variation seed strength: 0.3, Seed resize from: 640x448, "
        "Denoising strength: 0.3, Hires resize: 1536x1024, Hires upscaler: Latent, "
        "ADetailer model: face_yolov8n.pt, ADetailer confidence: 0.3, ADetailer dilate erode: 4, "
        "ADetailer mask blur: 4, ADetailer denoising strength: 0.4, ADetailer inpaint only masked: True, "
        "ADetailer inpaint padding: 32, ADetailer version: 24.1.2, "
        'ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1, '
        "Resize Mode: Crop and Resize, Low Vram: False, Processor Res: 512, Threshold A: 100, "
        'Threshold B: 200, Guidance Start: 0, Guidance End: 1, Pixel Perfect: False, Control Mode: Balanced", '
        'Hires prompt: "a knight, detailed armor", Emphasis: No norm, Version: v1.9.4',
        {
            "Prompt": "portrait of a knight",
            "Negative prompt": "",
            "Steps": "30",
            "Sampler": "Euler a",
            "CFG scale": "6.5",
            "Seed": "42",
            "Size-1": "768",
            "Size-2": "512",
            "Model hash": "31e35c80fc",
            "Model": "sd_xl_base_1.0",
            "Variation seed": "7",
            "Variation seed strength": "0.3",
            "Seed resize from-1": "640",
            "Seed resize from-2": "448",
            "Denoising strength": "0.3",
            "Hires resize-1": "1536",
            "Hires resize-2": "1024",
            "Hires upscaler": "Latent",
            "ADetailer model": "face_yolov8n.pt",
            "ADetailer confidence": "0.3",
            "ADetailer dilate erode": "4",
            "ADetailer mask blur": "4",
            "ADetailer denoising strength": "0.4",
            "ADetailer inpaint only masked": "True",
            "ADetailer inpaint padding": "32",
            "ADetailer version": "24.1.2",
            "ControlNet 0": "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1, "
            "Resize Mode: Crop and Resize, Low Vram: False, Processor Res: 512, Threshold A: 100, "
            "Threshold B: 200, Guidance Start: 0, Guidance End: 1, Pixel Perfect: False, Control Mode: Balanced",
            "Hires prompt": "a knight, detailed armor",
            "Emphasis": "No norm",
            "Version": "v1.9.4",
        },
    ),
    # Prompt only: a last line with fewer than 3 pairs is prompt text.
    ("just a prompt: nothing else", {"Prompt": "just a prompt: nothing else", "Negative prompt": ""}),
    # Negative prompt only, escaped quotes inside a quoted value, padded lines.
    (
        "  \nNegative prompt:   text  \nSteps: 5, Sampler: Euler, Seed: 1, Comment: \"say \\\"hi\\\", ok\"\n",
        {"Prompt": "", "Negative prompt": "text", "Steps": "5", "Sampler": "Euler", "Seed": "1", "Comment": 'say "hi", ok'},
    ),
]


@pytest.mark.parametrize("text,expected", REAL_A1111)
def test_parse_real_a1111_infotexts(text, expected):
    assert parse_infotext(text) == expected


def test_parse_ignores_empty_value_like_a1111():
    got = parse_infotext("p\nSteps: 20, Sampler: , Seed: 1, CFG scale: 7")
    assert "Sampler" not in got and got["Seed"] == "1" and got["CFG scale"] == "7"


_KEYS = [
    "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model", "VAE",
    "Denoising strength", "Clip skip", "Hires upscale", "Hires upscaler", "Hires prompt", "Lora hashes",
    "TI hashes", "ADetailer model", "ControlNet 0", "Comment", "User", "x/y-plot_2", "Seed resize from",
]
_CHARS = list("abcXYZ 019.,:;\"'\\/(){}[]<>|=+-_#\t") + ["\n", "é", "日本", "😀", "\u2028", "\\n", '\\"', ", ", ": "]


def _random_text(rng, max_len=12):
    return "".join(rng.choice(_CHARS) for _ in range(rng.randint(0, max_len)))


def _random_prompt(rng):
    """Prompt lines as A1111 can carry them: stripped, none starting with "Negative prompt:"."""
    lines = []
    for _ in range(rng.randint(1, 3)):
        line = _random_text(rng, 30).replace("\n", " ").replace("\u2028", " ").strip()
        lines.append(line)
    return "\n".join(lines).strip()


def _expected_parse(prompt, negative, params):
    want = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in params.items():
        if value is None or (key == "Clip skip" and isinstance(value, int) and value <= 1):
            continue
        text = f"{value[0]}x{value[1]}" if isinstance(value, tuple) else str(value)
        size = re.fullmatch(r"(\d+)x(\d+)", text)
        if size:
            want[f"{key}-1"], want[f"{key}-2"] = size.groups()
        else:
            want[key] = text
    return want


def test_round_trip_random_params():
    rng = random.Random(1234)
    for _ in range(500):
        params = {"Steps": rng.randint(1, 150), "Sampler": rng.choice(["Euler a", "DPM++ 2M SDE", "DDIM"]), "Seed": rng.randint(0, 2**32 - 1)}
        for key in rng.sample(_KEYS, rng.randint(0, 10)):
            kind = rng.random()
            if key in ("Size", "Seed resize from") and kind < 0.5:
                params[key] = (rng.randint(1, 4096), rng.randint(1, 4096))
            elif key == "Clip skip":
                params[key] = rng.randint(1, 4)
            elif kind < 0.15:
                params[key] = None
            elif kind < 0.3:
                params[key] = rng.choice([rng.randint(-5, 5), round(rng.uniform(0, 20), 3), True])
            else:
                params[key] = _random_text(rng)
        params["Version"] = "sdjax 0.1.0"
        params = {k: v for k, v in params.items() if v != k}  # a value equal to its key is written bare
        prompt = _random_prompt(rng)
        negative = _random_prompt(rng) if rng.random() < 0.7 else ""
        text = format_infotext(prompt, negative, params)
        assert parse_infotext(text) == _expected_parse(prompt, negative, params), text
