"""VAE training (sdjax.train.vae), which the embedded model's recipe uses: the edge-weighted loss,
the decoder-only fine-tune that leaves the encoder (and so the latents) alone, resume, and
scripts/train_tiny.py's decoder stage end to end."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from test_train import mini_model  # noqa: F401 -- the module-scoped mini model fixture

ROOT = Path(__file__).resolve().parents[1]


def _edge_map_numpy(images: np.ndarray) -> np.ndarray:
    """The definition, written out: per pixel, the largest |difference| to a 4-neighbour (edge
    pixels are their own neighbours), over channels; times 2, clipped to [0, 1]."""
    b, h, w, _ = images.shape
    out = np.zeros((b, h, w, 1), np.float32)
    for y in range(h):
        for x in range(w):
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                yy, xx = min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)
                d = np.abs(images[:, yy, xx] - images[:, y, x]).max(-1)
                out[:, y, x, 0] = np.maximum(out[:, y, x, 0], d)
    return np.clip(out * 2, 0, 1)


def test_edge_map_marks_both_sides_of_an_edge_and_nothing_else():
    from sdjax.train.vae import edge_map

    image = np.full((1, 12, 12, 3), -1.0, np.float32)
    image[0, 3:7, 4:9] = [1.0, -0.5, 0.2]  # a rectangle
    image[0, 9, 1] = [-0.9, -1.0, -1.0]  # a faint dot: difference 0.1 -> weight 0.2
    got = np.asarray(edge_map(jnp.asarray(image)))
    np.testing.assert_allclose(got, _edge_map_numpy(image), atol=1e-6)
    assert got[0, 0, 0, 0] == 0 and got[0, 5, 6, 0] == 0  # flat background, flat inside
    assert got[0, 3, 6, 0] == 1 and got[0, 2, 6, 0] == 1  # the rectangle's top row and the row above
    np.testing.assert_allclose(got[0, 9, 1, 0], 0.2, atol=1e-6)
    assert not np.asarray(edge_map(jnp.zeros((2, 8, 8, 3)))).any()


def test_vae_loss_weighs_edge_pixels(mini_model):  # noqa: F811
    """The loss with edge_weight w is the mean of (1 + w * edge) / mean(1 + w * edge) times the L1 +
    L2 error, plus the KL term: computed here by hand from the same latent sample."""
    import sdjax
    from flax import nnx

    from sdjax.train.vae import vae_loss

    pipe = sdjax.load_pipeline(mini_model, dtype="float32")
    images = np.full((2, 32, 32, 3), -0.8, np.float32)
    images[0, 8:20, 10:22] = 0.9
    images[1, 4:12, 4:30] = [0.5, -0.2, 0.1]
    key = jax.random.key(3)
    vae = nnx.merge(pipe.vae.graphdef, pipe.vae.state)
    mean, logvar = (np.asarray(a) for a in vae.encode(jnp.asarray(images)))
    z = mean + np.exp(0.5 * logvar) * np.asarray(jax.random.normal(key, mean.shape))
    err = np.asarray(vae.decode(jnp.asarray(z))) - images
    kl = 0.5 * np.mean(mean ** 2 + np.exp(logvar) - 1 - logvar)
    for w in (0.0, 8.0):
        weight = 1 + w * _edge_map_numpy(images)
        weight /= weight.mean()
        want = np.mean(weight * np.abs(err)) + np.mean(weight * err ** 2) + 1e-4 * kl
        got = float(vae_loss(pipe.vae.state, pipe.vae.graphdef, jnp.asarray(images), key, 1e-4, edge_weight=w))
        np.testing.assert_allclose(got, want, rtol=2e-5)


def _leaves(state, parts):
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat if p[0].key in parts}


@pytest.mark.slow
def test_decoder_only_training_keeps_the_encoder_and_resumes(mini_model, tmp_path):  # noqa: F811
    import sdjax
    from sdjax.data.datasets import SyntheticCaptions
    from sdjax.train.vae import train_vae

    pipe = sdjax.load_pipeline(mini_model, dtype="float32")
    data = SyntheticCaptions(64, seed=0, resolution=32)
    logs = []
    kw = dict(batch_size=2, learning_rate=1e-3, seed=0, checkpoint_every=2, edge_weight=8.0, parts="decoder",
              latent_noise=0.1, log=logs.append)
    two, _ = train_vae(pipe.vae, data, tmp_path / "run", steps=2, **kw)
    frozen, trained = ("encoder", "quant_conv"), ("decoder", "post_quant_conv")
    before, after = _leaves(pipe.vae.state, frozen + trained), _leaves(two, frozen + trained)
    for name in _leaves(pipe.vae.state, frozen):
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    changed = [n for n in _leaves(pipe.vae.state, trained) if not np.array_equal(after[n], before[n])]
    assert len(changed) >= 0.9 * len(_leaves(pipe.vae.state, trained))  # every decoder weight moves
    # Resume: 2 more steps from the checkpoint equal 4 steps in one go.
    three, _ = train_vae(pipe.vae, data, tmp_path / "run", steps=4, **kw)
    assert any("resumed at step 2" in m for m in logs)
    straight, _ = train_vae(pipe.vae, data, tmp_path / "straight", steps=4, **kw)
    for a, b in zip(jax.tree.leaves(three), jax.tree.leaves(straight)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="parts='unet'"):
        train_vae(pipe.vae, data, tmp_path / "bad", steps=1, **{**kw, "parts": "unet"})


@pytest.mark.slow
def test_train_tiny_decoder_stage_writes_a_model_with_the_same_encoder(mini_model, tmp_path):  # noqa: F811
    """`train_tiny.py --init-from M --vae-decoder-steps 2 --unet-steps 0`: a model folder whose VAE
    encoder, scaling factor, UNet and text encoder are M's, its decoder fine-tuned, in float16."""
    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "scripts" / "train_tiny.py")
    train_tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_tiny)
    out = tmp_path / "run"
    assert train_tiny.main(["--out", str(out), "--init-from", str(mini_model), "--vae-decoder-steps", "2",
                            "--vae-batch", "2", "--vae-decoder-lr", "1e-2", "--unet-steps", "0"]) == 0
    model = out / "model"
    assert json.loads((model / "vae" / "config.json").read_text()) == \
        json.loads((mini_model / "vae" / "config.json").read_text())
    new, old = (load_file(str(next((m / "vae").glob("*.safetensors")))) for m in (model, mini_model))
    assert {str(v.dtype) for v in new.values()} == {"float16"}
    assert new.keys() == old.keys()
    for name, value in new.items():  # the decoder's weights moved (lr 1e-2: beyond float16's rounding)
        trained = name.startswith(("decoder.", "post_quant_conv."))
        assert np.array_equal(value, old[name].astype(np.float16)) != trained, name
    for component in ("unet", "text_encoder"):
        a, b = (load_file(str(next((m / component).glob("*.safetensors")))) for m in (model, mini_model))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), component
    import sdjax

    assert sdjax.load_pipeline(model).generate("a red circle", steps=2, width=32, height=32).images[0].size == (32, 32)
