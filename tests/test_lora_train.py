"""LoRA training: a LoRA trained by sdjax loads in diffusers (kohya file) and changes diffusers'
outputs exactly as it changes ours; only the factors train (base frozen, not in the optimizer);
resume equals an uninterrupted run; target selection and config errors."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open

from sdjax.errors import ConfigError
from sdjax.train import lora as lora_lib
from sdjax.train.config import TrainConfig
from test_train import MINI_SPEC

ALL_TARGETS = ("attn", "ff", "text_encoder:attn", "text_encoder:mlp")


@pytest.fixture(scope="module")
def mini_model(tmp_path_factory):
    from sdjax.data.tokenizer import train_tokenizer
    from sdjax.train.init import init_pipeline_folder

    root = tmp_path_factory.mktemp("mini_lora")
    tok = train_tokenizer(root / "tok")
    return init_pipeline_folder(root / "model", MINI_SPEC, tok, seed=0)


def _cfg(model, out, **kw):
    base = dict(model=str(model), data="synthetic:0:64", output_dir=str(out), resolution=32, batch_size=2,
                max_steps=4, learning_rate=2e-2, checkpoint_every=2, log_every=1, caption_dropout=0.25,
                lora_rank=4, lora_alpha=2.0, lora_targets=ALL_TARGETS, weight_decay=0.0)
    base.update(kw)
    return TrainConfig(**base)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _outputs(te, unet, ids, latents_nhwc):
    ctx = np.asarray(te(ids).last_hidden_state)
    return ctx, np.asarray(unet(latents_nhwc, np.array([500]), ctx))


def _torch_outputs(pipe, ids, latents_nhwc):
    with torch.no_grad():
        ctx = pipe.text_encoder(torch.from_numpy(ids))[0]
        eps = pipe.unet(torch.from_numpy(latents_nhwc.transpose(0, 3, 1, 2)), 500, ctx).sample
    return ctx.numpy(), eps.numpy().transpose(0, 2, 3, 1)


@pytest.mark.slow
def test_trained_lora_loads_in_diffusers_and_matches(mini_model, tmp_path):
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft")
    import diffusers

    from sdjax.train.trainer import Trainer
    from sdjax.weights.lora import merge, read_lora

    trainer = Trainer(_cfg(mini_model, tmp_path / "run", max_steps=3, ema_decay=None), log=lambda m: None)
    base_unet, base_te = _leaves(trainer.pipe.unet.state), _leaves(trainer.pipe.text_encoder.state)
    # Only the factors are trainable: every trained leaf carries the rank, and so does the optimizer state.
    for leaf in _leaves(trainer.state["params"]):
        assert 4 in leaf.shape and leaf.size < 64 * 64
    assert sum(x.size for x in _leaves(trainer.state["opt_state"])) < 3 * sum(
        x.size for x in _leaves(trainer.state["params"])) + 16
    trainer.run(progress=False)
    path = trainer.export()
    assert path == tmp_path / "run" / "lora.safetensors"

    # Base weights untouched, in the pipeline and in the frozen inputs of the step.
    for a, b, c in zip(base_unet, _leaves(trainer.pipe.unet.state), _leaves(trainer.frozen["unet"])):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    for a, b in zip(base_te, _leaves(trainer.frozen["text_encoder"])):
        np.testing.assert_array_equal(a, b)

    # kohya names, layouts and metadata.
    with safe_open(str(path), "np") as f:
        keys, meta = set(f.keys()), f.metadata()
        q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
        assert f.get_tensor(q + ".lora_down.weight").shape == (4, 16)
        assert f.get_tensor(q + ".lora_up.weight").shape == (16, 4)
        assert float(f.get_tensor(q + ".alpha")) == 2.0
    for name in (q, "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0",
                 "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
                 "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2",
                 "lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_te_text_model_encoder_layers_0_mlp_fc2"):
        assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= keys, name
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"

    # Our merged weights == the file read back and merged by sdjax's LoRA loader.
    trained = trainer.trained_states()
    reread, _ = merge({"unet": trainer.pipe.unet.state, "text_encoder": trainer.pipe.text_encoder.state},
                      [(read_lora(path), 1.0, 1.0)])
    for kind in ("unet", "text_encoder"):
        for a, b in zip(_leaves(trained[kind]), _leaves(reread[kind])):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)

    # diffusers: same outputs as our merged model, and the LoRA really changed them.
    rng = np.random.default_rng(0)
    ids = trainer.pipe.tokenizer(["a red circle on a blue square"], padding="max_length", max_length=77,
                                 return_tensors="np").input_ids.astype(np.int64)
    latents = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(mini_model), safety_checker=None)
    ref_base = _torch_outputs(pipe, ids, latents)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    ref_lora = _torch_outputs(pipe, ids, latents)
    te = nnx.merge(trainer.pipe.text_encoder.graphdef, trained["text_encoder"])
    unet = nnx.merge(trainer.pipe.unet.graphdef, trained["unet"])
    ours = _outputs(te, unet, ids, latents)
    for name, o, r, b in zip(("text encoder", "unet"), ours, ref_lora, ref_base):
        np.testing.assert_allclose(o, r, atol=1e-4, rtol=0, err_msg=name)
        assert np.abs(r - b).max() > 1e-2, f"{name}: the trained LoRA barely changes diffusers' outputs"


@pytest.mark.slow
def test_lora_resume_equals_uninterrupted_run(mini_model, tmp_path):
    from sdjax.train.trainer import Trainer

    cfg = dict(ema_decay=0.9, lora_targets=("attn", "text_encoder:attn"))
    full = Trainer(_cfg(mini_model, tmp_path / "full", **cfg), log=lambda m: None)
    full_records = full.run(progress=False)
    first = Trainer(_cfg(mini_model, tmp_path / "split", **cfg), log=lambda m: None)
    first.run(stop_at=2, progress=False)
    del first
    resumed = Trainer(_cfg(mini_model, tmp_path / "split", **cfg), log=lambda m: None)
    assert resumed.step == 2
    resumed.run(progress=False)
    assert [r["loss"] for r in resumed.metrics.read()] == [r["loss"] for r in full_records]
    for a, b in zip(_leaves(full.state), _leaves(resumed.state)):
        np.testing.assert_array_equal(a, b)
    # The exported file (EMA factors) is the same too, and differs from a fresh (up = 0) LoRA.
    a, b = full.export(), resumed.export(tmp_path / "resumed.safetensors")
    with safe_open(str(a), "np") as fa, safe_open(str(b), "np") as fb:
        assert set(fa.keys()) == set(fb.keys())
        for k in fa.keys():
            np.testing.assert_array_equal(fa.get_tensor(k), fb.get_tensor(k))
        assert any(np.abs(fa.get_tensor(k)).max() > 0 for k in fa.keys() if k.endswith("lora_up.weight"))


def test_targets_and_config_errors(mini_model):
    from sdjax.pipeline import load_pipeline

    assert lora_lib.parse_targets(("attn", "text_encoder:fc1")) == {
        "unet": ("to_q", "to_k", "to_v", "to_out.0"), "text_encoder": ("fc1",)}
    pipe = load_pipeline(mini_model)
    states = {"unet": pipe.unet.state, "text_encoder": pipe.text_encoder.state}
    spec = lora_lib.make_spec(states, lora_lib.DEFAULT_TARGETS, rank=2)
    # MINI_SPEC: 4 transformer blocks (down 1, mid 1, up 2) x 2 attentions x 4 projections; no text encoder.
    assert set(spec.modules) == {"unet"} and len(spec.modules["unet"]) == 32 and spec.scale == 1.0
    with pytest.raises(ConfigError, match="no unet module ends with 'to_qq'"):
        lora_lib.make_spec(states, ("to_qq",), rank=2)
    with pytest.raises(ConfigError, match="lora_targets entry"):
        lora_lib.parse_targets(("vae:conv_in",))
    with pytest.raises(ConfigError, match="train_text_encoder with lora_rank"):
        TrainConfig(model="m", data="d", output_dir="o", lora_rank=4, train_text_encoder=True)
    with pytest.raises(ConfigError, match="lora_rank"):
        TrainConfig(model="m", data="d", output_dir="o", lora_rank=0)
    assert TrainConfig.from_dict({"model": "m", "data": "d", "output_dir": "o", "lora_rank": 8,
                                  "lora_targets": ["to_q"]}).lora_targets == ("to_q",)

    # apply(): W + alpha / rank * down @ up on exactly the targeted kernels.
    params = lora_lib.init_params(spec, states, jax.random.key(0))
    params = jax.tree.map(lambda x: x + 0.1, params)
    merged = lora_lib.apply(lora_lib.LoRASpec(2, 3.0, spec.modules), "unet", states["unet"], params["unet"])
    flat_base, flat_new = dict(nnx.to_flat_state(states["unet"])), dict(nnx.to_flat_state(merged))
    targeted = {p: n for n, p in spec.modules["unet"].items()}
    for p, var in flat_base.items():
        w, new = np.asarray(var.get_value()), np.asarray(flat_new[p].get_value())
        if p in targeted:
            f = params["unet"][targeted[p]]
            np.testing.assert_allclose(new, w + 1.5 * np.asarray(f["down"]) @ np.asarray(f["up"]), atol=1e-6)
        else:
            np.testing.assert_array_equal(new, w)
