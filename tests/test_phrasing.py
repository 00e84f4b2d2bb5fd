"""Captions as people write them (sdjax.data.phrasing): varied training captions, held-out
phrasings that never occur in training but use only training words, prompts read back, and the
evaluator's report by phrasing family."""

import re

import numpy as np
import pytest

from sdjax.data.analysis import FAMILIES, family_prompts, parse_prompt, phrasing_vocabulary
from sdjax.data.phrasing import HELDOUT_FRAMES, TRAIN_FRAMES, phrase, stated_attributes
from sdjax.data.synthetic import PALETTE, SyntheticConfig, _draw_attributes, _rng, caption_for, sample

VARIED = SyntheticConfig(captions="varied")
# A caption's skeleton: its words with every attribute word replaced by its kind.
_KINDS = {**dict.fromkeys(PALETTE, "C"), **dict.fromkeys(("circle", "square", "box", "triangle", "dot"), "S"),
          **dict.fromkeys(("small", "large", "big"), "Z"),
          **dict.fromkeys(("top", "bottom", "left", "right", "center", "centered", "middle"), "P")}


def skeleton(caption: str) -> str:
    return " ".join(_KINDS.get(w, w) for w in re.findall(r"[a-z]+|[^\sa-z]", caption.lower().rstrip(".")))


def test_varied_captions_keep_images_and_say_what_the_image_shows():
    captions = []
    for i in range(300):
        image, caption, attributes = sample(0, i, "train", VARIED)
        plain_image, template, plain_attributes = sample(0, i, "train")
        assert attributes == plain_attributes and image.tobytes() == plain_image.tobytes()
        assert sample(0, i, "train", VARIED)[1] == caption  # deterministic
        stated = parse_prompt(caption)
        for key, value in stated["objects"][0].items():
            assert attributes[key] == value, (caption, key)
        if "background" in stated:
            assert stated["background"] == attributes["background"], caption
        captions.append((caption, template))
    same = sum(c == t for c, t in captions) / len(captions)
    assert 0.2 < same < 0.4  # template_fraction 0.3; the rest as people write them
    varied = [c for c, t in captions if c != t]
    assert any("," in c for c in varied) and any(c[0].isupper() for c in varied)
    assert any(" box" in c for c in varied) and any(" dot" in c for c in varied)
    assert any(not re.search(r"\b(small|large|big|dot)\b", c) for c in varied)  # size optional
    assert any(not re.search(r"\b(top|bottom|left|right|center|centered|middle)\b", c) for c in varied)
    with pytest.raises(ValueError, match="captions"):
        SyntheticConfig(captions="fancy")


def test_heldout_phrasings_never_occur_in_training_and_use_only_training_words():
    train = {skeleton(sample(0, i, "train", VARIED)[1]) for i in range(6000)}
    heldout = [p["caption"] for p in family_prompts("heldout", 600)]
    assert not {skeleton(c) for c in heldout} & train
    assert {p["frame"] for p in family_prompts("heldout", 200)} == set(HELDOUT_FRAMES)
    # Same words (colour, shape, position, background, filler): order is what is new.
    assert phrasing_vocabulary(HELDOUT_FRAMES, 2000) <= phrasing_vocabulary(TRAIN_FRAMES, 2000)


def test_every_phrasing_word_is_one_token_of_the_trained_tokenizer(tmp_path):
    from sdjax.data.tokenizer import load_clip_tokenizer, train_tokenizer

    tok = load_clip_tokenizer(train_tokenizer(tmp_path / "tok"))
    for word in sorted(phrasing_vocabulary(TRAIN_FRAMES, 2000)):
        assert len(tok.encode(word).ids) == 3, (word, tok.encode(word).tokens)  # BOS word EOS


@pytest.mark.parametrize("frames", [TRAIN_FRAMES, HELDOUT_FRAMES])
def test_parse_prompt_reads_back_what_each_phrasing_states(frames):
    for i in range(400):
        rng = _rng(3, "train", i)
        attributes = _draw_attributes(rng, SyntheticConfig(), "train")
        p = phrase(attributes, rng, frames, p_color=0.9, p_background=0.9)
        assert parse_prompt(p.caption) == stated_attributes(attributes, p.stated), p.caption
        assert parse_prompt(caption_for(attributes))["background"] == attributes["background"]
    assert parse_prompt("Red circle, blue background, top-left") == {
        "background": "blue", "objects": [{"shape": "circle", "color": "red", "position": "top left"}],
        "shape": "circle", "color": "red", "position": "top left"}
    assert parse_prompt("a yellow dot against black")["size"] == "small"
    for bad in ("a photo of a cat", "a red circle and a blue square on white", "a red circle at the top bottom"):
        with pytest.raises(ValueError, match="prompt"):
            parse_prompt(bad)


def test_family_prompts_state_colour_background_and_position():
    for family in FAMILIES:
        prompts = family_prompts(family, 40)
        assert [p["seed"] for p in prompts] == list(range(prompts[0]["seed"], prompts[0]["seed"] + 40))
        for p in prompts:
            a = p["attributes"]
            assert {"background", "color", "shape", "position"} <= set(a), p
            assert parse_prompt(p["caption"]) == a
    assert any("size" not in p["attributes"] for p in family_prompts("heldout", 40))


def _eval_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "eval_tiny.py"
    spec = importlib.util.spec_from_file_location("eval_tiny", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluator_reports_by_family_and_catches_a_model_that_only_reads_the_template(capsys):
    from sdjax.data.analysis import parse_caption
    from sdjax.data.synthetic import render

    eval_tiny = _eval_script()
    assert eval_tiny.main(["--self-check", "--families", "--n", "12", "--negative", "4"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [row.split()[0] for row in table[1:4]] == list(FAMILIES)
    assert all(cell == "1.000" for row in table[1:4] for cell in row.split()[2:])
    assert table[4].split()[:2] == ["negative", "n"]  # the renderer ignores negatives: moved 0
    assert table[5].split()[:3] == ["color", "4", "0.000"]

    def template_only(captions, seeds, negatives=None):
        """Right for the template; for anything else, takes the first colour for the background
        and ignores the position."""
        images = []
        for caption in captions:
            try:
                attributes = parse_caption(caption)
            except ValueError:
                stated = parse_prompt(caption)
                o = {**stated["objects"][0], "size": "large", "position": "center"}
                colours = [w for w in re.findall(r"[a-z]+", caption.lower()) if w in PALETTE]
                attributes = {"background": colours[0], "objects": [{**o, "color": colours[-1]}]}
                if colours[0] == colours[-1]:
                    attributes["background"] = next(c for c in PALETTE if c != colours[0])
            images.append(render(attributes))
        return images

    report = eval_tiny.evaluate_families(template_only, n=24)
    assert report["template"]["all"] == 1.0
    assert report["heldout"]["background"] < 0.9 and report["heldout"]["position"] < 0.8
    assert np.isclose(report["heldout"]["n"], 24)
