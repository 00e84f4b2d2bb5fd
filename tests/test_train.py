"""The fine-tuning stack: loss math against diffusers, exact resume, export that diffusers loads,
data-parallel training equal to single-device training."""

import json

import jax
import numpy as np
import pytest
import torch

from sdjax import parallel
from sdjax.train import loss as L
from sdjax.train.config import TrainConfig

MINI_SPEC = {
    "text_encoder": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": 32,
                     "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 32},
    "vae": {"down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "latent_channels": 4,
            "norm_num_groups": 4, "sample_size": 32, "scaling_factor": 0.5},
    "unet": {"sample_size": 4, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "block_out_channels": [16, 32],
             "layers_per_block": 1, "attention_head_dim": 2, "cross_attention_dim": 32, "norm_num_groups": 8},
    "scheduler": {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                  "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": "epsilon",
                  "timestep_spacing": "leading", "steps_offset": 1},
}


@pytest.fixture(scope="module")
def mini_model(tmp_path_factory):
    from sdjax.data.tokenizer import train_tokenizer
    from sdjax.train.init import init_pipeline_folder

    root = tmp_path_factory.mktemp("mini")
    tok = train_tokenizer(root / "tok")
    return init_pipeline_folder(root / "model", MINI_SPEC, tok, seed=0)


def _cfg(model, out, **kw):
    base = dict(model=str(model), data="synthetic:0:64", output_dir=str(out), resolution=32, batch_size=2,
                max_steps=4, learning_rate=1e-3, checkpoint_every=2, log_every=1, caption_dropout=0.25,
                ema_decay=0.9, train_text_encoder=True)
    base.update(kw)
    return TrainConfig(**base)


def test_noise_and_targets_match_diffusers_ddpm():
    from diffusers import DDPMScheduler

    from sdjax.sampling import DiscreteModel

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    model = DiscreteModel.from_config(dict(sched.config))
    acp = jax.numpy.asarray(model.alphas_cumprod, jax.numpy.float32)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
    eps = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
    t = np.array([0, 500, 999])
    nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)  # noqa: E731
    back = lambda a: a.permute(0, 2, 3, 1).numpy()  # noqa: E731
    np.testing.assert_allclose(L.add_noise(x0, eps, t, acp), back(sched.add_noise(nchw(x0), nchw(eps), torch.from_numpy(t))),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(L.target(x0, eps, t, acp, "v_prediction"),
                               back(sched.get_velocity(nchw(x0), nchw(eps), torch.from_numpy(t))), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(L.target(x0, eps, t, acp, "epsilon"), eps)


def test_min_snr_weights():
    acp = jax.numpy.linspace(0.999, 0.001, 1000)
    t = jax.numpy.array([0, 999])
    snr = acp[t] / (1 - acp[t])
    w = L.min_snr_weight(t, acp, 5.0, "epsilon")
    np.testing.assert_allclose(w, np.minimum(snr, 5.0) / snr, rtol=1e-6)
    assert float(w[0]) < 1.0 and float(w[1]) == pytest.approx(1.0)  # clipped at high SNR only
    wv = L.min_snr_weight(t, acp, 5.0, "v_prediction")
    np.testing.assert_allclose(wv, np.minimum(snr, 5.0) / (snr + 1), rtol=1e-6)


def test_config_errors(tmp_path):
    from sdjax.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown training option.*learnin_rate"):
        TrainConfig.from_dict({"model": "m", "data": "d", "output_dir": "o", "learnin_rate": 1})
    with pytest.raises(ConfigError, match="mixed_precision"):
        TrainConfig(model="m", data="d", output_dir="o", mixed_precision="fp8")


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(mini_model, tmp_path):
    from sdjax.train.trainer import Trainer

    full = Trainer(_cfg(mini_model, tmp_path / "full"), log=lambda m: None)
    full_records = full.run(progress=False)

    first = Trainer(_cfg(mini_model, tmp_path / "split"), log=lambda m: None)
    first.run(stop_at=2, progress=False)
    del first
    messages = []
    resumed = Trainer(_cfg(mini_model, tmp_path / "split"), log=messages.append)
    assert resumed.step == 2 and any("resumed" in m for m in messages)
    resumed.run(progress=False)

    logged = [r["loss"] for r in resumed.metrics.read()]
    assert logged == [r["loss"] for r in full_records]  # the loss sequence, exactly
    for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (tmp_path / "split" / "loss.png").stat().st_size > 0
    # Training moved the weights (the test would pass trivially if nothing trained).
    before = jax.tree.leaves(full.pipe.unet.state)
    after = jax.tree.leaves(full.state["params"]["unet"])
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(before, after))


@pytest.mark.slow
def test_export_loads_in_diffusers_and_matches(mini_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    from sdjax.pipeline import load_pipeline
    from sdjax.train.trainer import Trainer

    trainer = Trainer(_cfg(mini_model, tmp_path / "run", max_steps=2), log=lambda m: None)
    trainer.run(progress=False)
    folder = trainer.export()
    ours = load_pipeline(folder)
    ref = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, local_files_only=True)

    np.testing.assert_array_equal(  # the exported weights are the EMA weights
        np.asarray(jax.tree.leaves(ours.unet.state)[0]), np.asarray(jax.tree.leaves(trainer.state["ema"]["unet"])[0]))
    rng = np.random.default_rng(0)
    ids = ours.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="np").input_ids
    with torch.no_grad():
        ctx_ref = ref.text_encoder(torch.from_numpy(ids))[0]
        x = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
        out_ref = ref.unet(torch.from_numpy(x).permute(0, 3, 1, 2), 500, ctx_ref).sample.permute(0, 2, 3, 1).numpy()
    ctx = ours.text_encoder(ids)
    np.testing.assert_allclose(np.asarray(ctx), ctx_ref.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(ours.unet(x, 500, ctx)), out_ref, atol=1e-4)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


@pytest.mark.slow
def test_data_parallel_equals_single_device(mini_model, tmp_path):
    from sdjax.train.trainer import Trainer

    runs = {}
    for n in (1, 4):
        mesh = parallel.make_mesh(data=n, devices=jax.devices()[:n])
        # The 1-device run is the one of test_parallel's FSDP + EMA test: one program, compiled once.
        t = Trainer(_cfg(mini_model, tmp_path / f"dp{n}", batch_size=4, max_steps=3), mesh=mesh, log=lambda m: None)
        runs[n] = [r["loss"] for r in t.run(progress=False)]
    np.testing.assert_allclose(runs[4], runs[1], rtol=1e-4)


def test_samples_during_training_use_the_trained_weights(mini_model, tmp_path):
    from PIL import Image

    from sdjax.images import read_infotext
    from sdjax.train.trainer import Trainer

    trainer = Trainer(_cfg(mini_model, tmp_path / "run", max_steps=2, sample_every=2, sample_steps=2,
                           sample_prompts=("a red circle", "a blue square"), learning_rate=1e-2),
                      log=lambda m: None)
    before = trainer.pipe.unet.state
    trainer.run()
    folder = tmp_path / "run" / "samples" / "0000002"
    files = sorted(p.name for p in folder.glob("*.png"))
    assert files == ["000.png", "001.png"]
    assert "Steps: 2" in read_infotext(folder / "000.png")
    assert trainer.pipe.unet.state is before  # the pipeline itself keeps its weights
    untrained = trainer.pipe.generate("a red circle", steps=2, seed=trainer.cfg.seed, width=32, height=32)
    sample = np.asarray(Image.open(folder / "000.png"), np.float32)
    assert np.abs(sample - np.asarray(untrained.images[0], np.float32)).max() > 1  # trained weights differ


def test_checkpoint_round_trip_keeps_values_dtypes_and_shardings(tmp_path):
    """A train-state-like tree with fsdp-sharded, replicated and scalar leaves (float32,
    bfloat16, int32) saved and restored into a template on the same mesh: every leaf equal, with
    the template's dtype and sharding (a single process saves host copies; see Checkpointer.save)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sdjax.train.checkpoint import Checkpointer

    mesh = parallel.make_mesh(data=2, fsdp=2, devices=jax.devices()[:4])
    rng = np.random.default_rng(0)
    tree = {"w": jax.device_put(rng.standard_normal((8, 6)).astype(np.float32), NamedSharding(mesh, P("fsdp", None))),
            "b": jax.device_put(rng.standard_normal((6,)).astype(jax.numpy.bfloat16), NamedSharding(mesh, P())),
            "step": jax.device_put(np.int32(7), NamedSharding(mesh, P())), "ema": None}
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=2)
    ckpt.save(7, tree, {"step": 7})
    template = jax.tree.map(jax.numpy.zeros_like, tree)
    restored, meta = ckpt.restore(template)
    assert meta == {"step": 7} and restored["ema"] is None
    for key in ("w", "b", "step"):
        got, want = restored[key], tree[key]
        assert got.dtype == want.dtype and got.sharding == template[key].sharding, key
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
