"""The model that ships inside the package: present, small, loadable by diffusers with the same
images as sdjax, and used by `sdjax generate` when no --model is given."""

import json
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch

import sdjax
from sdjax.cli import EMBEDDED_MODEL
from sdjax.sampling import DiscreteModel, diffusers_schedule

EMBEDDED = Path(sdjax.__file__).parent / "assets" / "tiny"
PROMPT = "a red circle on a blue background"
# One worker runs the module: the two evaluations share one subprocess (`evaluations`).
pytestmark = pytest.mark.xdist_group("test_embedded")

# The evaluator's two runs (328 images in all) in one process at XLA's default optimisation level:
# generating is bound by execution, which the suite's -O0 (conftest) doubles. The images and
# scores are those of scripts/eval_tiny.py with --model embedded.
EVALUATIONS = """
import json, sys
sys.path.insert(0, sys.argv[1])
import eval_tiny
from sdjax import runtime
runtime.configure()
import sdjax
from sdjax.cli import EMBEDDED_MODEL
generate = eval_tiny.model_generator(sdjax.load_pipeline(EMBEDDED_MODEL))  # Euler, 20 steps, CFG 5, 64 px
splits = eval_tiny.evaluate_generator(generate, n=200, seed=0, batch_size=16)
heldout = eval_tiny.evaluate_families(generate, n=128, families=("heldout",))
print("REPORT " + json.dumps({"splits": splits, "heldout": heldout}))
"""


@pytest.fixture(scope="module")
def evaluations():
    import os

    from conftest import EXECUTION_XLA_FLAGS

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=EXECUTION_XLA_FLAGS)
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    proc = subprocess.run([sys.executable, "-c", EVALUATIONS, str(scripts)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


def test_embedded_model_is_shipped_small_and_fp16():
    assert EMBEDDED_MODEL == EMBEDDED
    index = json.loads((EMBEDDED / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    files = [p for p in EMBEDDED.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30 * 2**20
    from safetensors import safe_open

    for weights in EMBEDDED.glob("*/*.safetensors"):
        with safe_open(str(weights), "np") as f:
            assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"float16"}, weights


@pytest.fixture(scope="module")
def pipes():
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(EMBEDDED), safety_checker=None,
                                                            local_files_only=True, torch_dtype=torch.float32)
    return ref, sdjax.load_pipeline(EMBEDDED)


def test_diffusers_loads_embedded_model_and_makes_the_same_image(pipes):
    ref, pipe = pipes
    steps, size = 12, 64
    config = {k: v for k, v in ref.scheduler.config.items() if not k.startswith("_")}
    config["timestep_spacing"] = "trailing"  # diffusers' Euler init_noise_sigma is then sigma_max
    sched = diffusers.EulerDiscreteScheduler.from_config(config)
    sched.set_timesteps(steps)
    _, sigmas = diffusers_schedule(DiscreteModel.from_config(config), steps, solver="euler")
    np.testing.assert_allclose(sigmas, sched.sigmas.numpy(), rtol=5e-5)
    ref.scheduler = sched
    noise = np.random.default_rng(0).standard_normal((1, size // 8, size // 8, 4)).astype(np.float32)
    with torch.no_grad():
        theirs = ref(PROMPT, num_inference_steps=steps, guidance_scale=5.0, height=size, width=size,
                     latents=torch.from_numpy(noise).permute(0, 3, 1, 2).contiguous(), output_type="np").images
    ours = pipe.generate(PROMPT, steps=steps, sampler="euler", cfg_scale=5.0, width=size, height=size,
                         noise=noise, sigmas=sigmas)
    ours_np = np.asarray(ours.images[0], np.float32)[None] / 255.0
    assert np.abs(ours_np - theirs).max() <= 2 / 255 + 1e-6
    assert ours_np.std() > 0.01  # not a constant image


def test_embedded_model_is_trained_and_conditional(pipes):
    """Trained weights, not random ones: the denoising error is low, and lower with the image's own
    caption than with another image's caption (the model reads the prompt)."""
    from sdjax.data.datasets import SyntheticCaptions
    from sdjax.train import loss as L

    _, pipe = pipes
    ds = SyntheticCaptions(1000, seed=7, resolution=64)
    images = np.stack([ds[i][0] for i in range(16)])
    captions = [ds[i][1] for i in range(16)]
    mean, _ = pipe.vae.encode(images)
    latents = np.asarray(mean) * pipe.vae.scaling_factor
    acp = np.asarray(DiscreteModel.from_config(pipe.scheduler_config).alphas_cumprod, np.float32)
    t = np.full(16, 600)
    eps = np.random.default_rng(0).standard_normal(latents.shape).astype(np.float32)
    noisy = np.asarray(L.add_noise(latents, eps, t, acp))
    model = DiscreteModel.from_config(pipe.scheduler_config)
    target = np.asarray(L.target(latents, eps, t, acp, model.prediction_type))  # eps or v

    def error(caps):
        ids = pipe.tokenizer(caps, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
        return float(np.mean((np.asarray(pipe.unet(noisy, t, pipe.text_encoder(ids))) - target) ** 2))

    right, wrong = error(captions), error(captions[1:] + captions[:1])
    assert right < 0.1  # an untrained UNet's error is ~1
    assert right < 0.8 * wrong, (right, wrong)


@pytest.mark.slow
def test_cli_generate_uses_embedded_model_without_model_flag(tmp_path):
    out = tmp_path / "img.png"
    proc = subprocess.run([sys.executable, "-m", "sdjax.cli", "generate", PROMPT, "--out", str(out), "--steps", "10"],
                          capture_output=True, text=True, timeout=600, env=dict(__import__("os").environ))
    assert proc.returncode == 0, proc.stderr
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (64, 64)
        assert "Steps: 10" in im.info["parameters"]


@pytest.mark.slow
def test_embedded_model_meets_the_evaluator_targets(evaluations):
    """The README's evaluation (200 prompts, half held-out combinations; Euler, 20 steps, CFG 5,
    each prompt at its own seed) meets the issue's targets: background and shape colour >= 90%
    seen and >= 75% held-out, position >= 80%."""
    report = evaluations["splits"]
    assert report["seen"]["n"] + report["heldout"]["n"] == 200
    for split, floor in (("seen", 0.90), ("heldout", 0.75)):
        for attribute in ("background", "color"):
            assert report[split][attribute] >= floor, (split, attribute, report[split])
        assert report[split]["position"] >= 0.80, (split, report[split])


@pytest.mark.slow
def test_embedded_model_understands_heldout_phrasings(evaluations):
    """128 prompts in phrasings never used in training (`sdjax.data.phrasing.HELDOUT_FRAMES`; Euler,
    20 steps, CFG 5, each at its own seed): background and shape colour >= 90%, position >= 80%."""
    row = evaluations["heldout"]["heldout"]
    assert row["n"] == 128
    assert row["background"] >= 0.90 and row["color"] >= 0.90 and row["position"] >= 0.80, row


def readme_prompts() -> list[str]:
    """Every prompt the README gives the embedded model: `sdjax generate/img2img/inpaint/outpaint
    "..."` lines without --model, and `pipe.generate/outpaint` calls of blocks that load EMBEDDED_MODEL."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    prompts = []
    for block in re.findall(r"```(?:bash|python)\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            m = re.search(r'sdjax (?:generate|img2img|inpaint|outpaint) "([^"]+)"', line)
            if m and "--model" not in line:
                prompts.append(m[1])
        if "EMBEDDED_MODEL" in block:
            prompts += re.findall(r'pipe\.(?:generate|outpaint)\((?:image, )?"([^"]+)"', block)
    # A prompt-editing / AND example (the hires fix section's) changes what it asks for mid-run:
    # it states no one picture to check; tests/test_prompt_schedule_generate.py checks those.
    scheduled = re.compile(r"\[[^\]]*[:|][^\]]*\]|\bAND\b")
    return [p for p in dict.fromkeys(prompts) if not scheduled.search(p)]


def test_readme_prompts_are_found_and_read_by_the_evaluator():
    from sdjax.data.analysis import parse_prompt

    prompts = readme_prompts()
    assert "a red circle on a blue background" in prompts and len(prompts) >= 4
    for prompt in prompts:  # each states at least a shape colour, a shape and a background
        stated = parse_prompt(prompt)
        assert {"background", "color", "shape"} <= set(stated), prompt


@pytest.mark.slow
def test_readme_prompts_make_what_they_say(pipes):
    """Each README prompt as txt2img (Euler, 20 steps, CFG 5, seeds 0-3), read back by the
    evaluator's pixel analysis: background, shape colour and any stated position or size on every
    seed; the shape (the model's weak point) on most seeds."""
    from sdjax.data.analysis import analyze, parse_prompt

    _, pipe = pipes
    failures = []
    for prompt in readme_prompts():
        stated = parse_prompt(prompt)
        images = pipe.generate([prompt] * 4, steps=20, sampler="Euler", cfg_scale=5.0, seed=0, width=64,
                               height=64).images
        found = [analyze(im) for im in images]
        for key in ("background", "color", "size", "position"):
            if key in stated and any(f[key] != stated[key] for f in found):
                failures.append((prompt, key, [f[key] for f in found]))
        if sum(f["shape"] == stated["shape"] for f in found) < 3:
            failures.append((prompt, "shape", [f["shape"] for f in found]))
    assert not failures, failures


def test_eval_generator_batch_equals_each_image_made_alone(pipes):
    """scripts/eval_tiny.py's model_generator makes a chunk as one batch with each image's own
    seed: each image is the one made alone at that seed, up to float rounding (1/255)."""
    from test_phrasing import _eval_script

    _, pipe = pipes
    eval_tiny = _eval_script()
    captions = ["a red circle on a blue background", "a green square at the left", "a yellow triangle"]
    seeds = [7, 1_000_003, 42]  # not consecutive
    batch = eval_tiny.model_generator(pipe, steps=4)(captions, seeds, negatives=["", "red", ""])
    for image, caption, seed, negative in zip(batch, captions, seeds, ["", "red", ""]):
        alone = pipe.generate(caption, negative_prompt=negative, seed=seed, steps=4, sampler="Euler", cfg_scale=5.0,
                              width=64, height=64).images[0]
        diff = np.abs(np.asarray(image, np.int16) - np.asarray(alone, np.int16))
        assert diff.max() <= 1 and diff.mean() < 0.05, (caption, diff.max(), diff.mean())
    assert not np.array_equal(np.asarray(batch[0]), np.asarray(batch[2]))  # distinct images, not one repeated
