"""SDXL models: the UNet's added text/time conditioning (base and refiner) and the second text
encoder (transformers' CLIPTextModelWithProjection), in numerical parity with diffusers /
transformers on random weights: tiny configs derived from reference/sdxl-base and
reference/sdxl-refiner, and (slow) the real full-size configs."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from conftest import reference
from sdjax.errors import ConfigError
from sdjax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from sdjax.models.unet import UNet2DConditionModel, UNetConfig
from sdjax.weights.diffusers import abstract_model
from sdjax.weights import names
from sdjax.weights.mapping import load_state

diffusers = pytest.importorskip("diffusers")

_FAST_COMPILE = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
PROMPTS = ["a photo of an astronaut riding a horse on mars", "", "masterpiece, best quality, " * 20]


def _config(name: str, component: str = "unet") -> dict:
    d = json.loads((reference(name) / component / "config.json").read_text())
    d.pop("torch_dtype", None)  # build the torch references in float32
    return d


# Widths shrunk; block types, per-block transformer depths, linear projection, time-id count kept.
TINY_UNET = {
    "sdxl-base": dict(block_out_channels=[32, 64, 64], attention_head_dim=[2, 4, 4], norm_num_groups=8,
                      transformer_layers_per_block=[1, 2, 3], cross_attention_dim=24, layers_per_block=1,
                      addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8),
    "sdxl-refiner": dict(block_out_channels=[32, 64, 64, 64], attention_head_dim=[2, 4, 4, 4], norm_num_groups=8,
                         transformer_layers_per_block=2, cross_attention_dim=24, layers_per_block=1,
                         addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 5 * 8),
}


def _torch_unet(d: dict, seed: int = 0, scale: float = 0.1):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel.from_config(d).eval()
    if scale:
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(scale * torch.randn_like(p))
    return unet


class _Consuming(dict):
    """torch-named numpy views that free their torch tensor once read (load_state reads each once),
    so a full-size model is never held twice in memory."""

    def __init__(self, module: torch.nn.Module):
        # the Parameter objects themselves (state_dict() holds detached aliases of their storage)
        self.tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        super().__init__({k: None for k in self.tensors})

    def __getitem__(self, name):
        t = self.tensors.pop(name)
        arr = t.detach().numpy().copy()
        t.data = torch.empty(0)
        return arr


def _ours_unet(d: dict, flat) -> UNet2DConditionModel:
    cfg = UNetConfig.from_dict(d)
    abstract = abstract_model(UNet2DConditionModel, cfg)
    return load_state(abstract, flat, source="diffusers UNet")


def _apply(model, x_nhwc, t, ctx, text_embeds, time_ids):
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, compiler_options=_FAST_COMPILE)
    def run(state, x, t, ctx, te, ids):
        return nnx.merge(graphdef, state)(x, t, ctx, text_embeds=te, time_ids=ids)

    return np.asarray(run(state, x_nhwc, t, ctx, text_embeds, time_ids))


def _time_ids(n: int, batch: int) -> np.ndarray:
    if n == 6:  # original (h, w), crop (top, left), target (h, w): non-square, so order matters
        ids = [[1024, 768, 16, 32, 896, 640], [512, 512, 0, 0, 1024, 1024]]
    else:  # refiner: original (h, w), crop, aesthetic score
        ids = [[1024, 768, 16, 32, 6.0], [512, 512, 0, 0, 2.5]]
    return np.asarray(ids[:batch], np.float32)


def _unet_inputs(d, n_ids, batch, hw, pooled, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(batch, d["in_channels"], *hw).astype(np.float32)
    ctx = rng.randn(batch, 7, d["cross_attention_dim"]).astype(np.float32)
    te = rng.randn(batch, pooled).astype(np.float32)
    return x, ctx, te, _time_ids(n_ids, batch)


def _compare_unet(d, n_ids, pooled, batch, hw, t, tm=None):
    tm = tm or _torch_unet(d)
    x, ctx, te, ids = _unet_inputs(d, n_ids, batch, hw, pooled)
    with torch.no_grad():
        ref = tm(torch.tensor(x), torch.tensor(t), torch.tensor(ctx),
                 added_cond_kwargs={"text_embeds": torch.tensor(te), "time_ids": torch.tensor(ids)}).sample.numpy()
    model = _ours_unet(d, _Consuming(tm))
    del tm
    out = _apply(model, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx), jnp.asarray(te),
                 jnp.asarray(ids)).transpose(0, 3, 1, 2)
    assert out.shape == ref.shape
    return np.abs(out - ref).max(), ref.std(), model


@pytest.mark.parametrize("name, n_ids", [("sdxl-base", 6), ("sdxl-refiner", 5)])
def test_tiny_unet_parity(name, n_ids):
    d = _config(name)
    d.update(TINY_UNET[name])
    err, _, model = _compare_unet(d, n_ids, 16, 2, (8, 12), np.array([999, 20]))
    assert err <= 1e-4, err
    # the time ids matter: other ids give another output
    x = jnp.zeros((1, 8, 8, 4))
    ctx = jnp.ones((1, 7, 24))
    te = jnp.ones((1, 16))
    a = _apply(model, x, jnp.array([500]), ctx, te, jnp.asarray(_time_ids(n_ids, 1)))
    b = _apply(model, x, jnp.array([500]), ctx, te, jnp.asarray(_time_ids(n_ids, 2)[1:]))
    assert np.abs(a - b).max() > 1e-3


def test_reference_configs_read():
    base = UNetConfig.from_dict(_config("sdxl-base"))
    assert base.addition_embed_type == "text_time" and base.transformer_layers_per_block == (1, 2, 10)
    assert base.cross_attention_dim == (2048,) * 3 and base.projection_class_embeddings_input_dim == 2816
    refiner = UNetConfig.from_dict(_config("sdxl-refiner"))
    assert refiner.transformer_layers_per_block == (4,) * 4 and refiner.cross_attention_dim == (1280,) * 4
    assert refiner.projection_class_embeddings_input_dim == 2560 and refiner.addition_time_embed_dim == 256
    assert refiner.block_out_channels == (384, 768, 1536, 1536)
    d = _config("sdxl-base")
    d.update(TINY_UNET["sdxl-base"])
    abstract = abstract_model(UNet2DConditionModel, UNetConfig.from_dict(d))
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(abstract))}
    assert {"add_embedding.linear_1.kernel", "add_embedding.linear_2.bias"} <= paths
    assert not any(p.startswith("down_blocks.0.attentions") for p in paths)  # no attention in block 0


@pytest.mark.parametrize("key, value, words", [
    ("addition_embed_type", "text", "addition_embed_type"),
    ("addition_time_embed_dim", None, "addition_time_embed_dim"),
    ("projection_class_embeddings_input_dim", 0, "projection_class_embeddings_input_dim"),
    ("encoder_hid_dim", 768, "encoder_hid_dim"),
])
def test_sdxl_config_errors_name_the_key(key, value, words):
    d = _config("sdxl-base")
    d[key] = value
    with pytest.raises(ConfigError, match=words):
        UNetConfig.from_dict(d)


def test_added_conditioning_needs_the_sdxl_config():
    d = _config("sd15")
    d["addition_time_embed_dim"] = 256
    with pytest.raises(ConfigError, match="text_time"):
        UNetConfig.from_dict(d)


# ---------------------------------------------------------------- text encoders

TINY_TE = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=3, projection_dim=48)


def _token_ids(folder: str = "tokenizer_2") -> np.ndarray:
    tok = transformers.CLIPTokenizer.from_pretrained(str(reference("sdxl-base") / folder))
    return tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids


def _te_pair(cfg_dict, cls_torch, cls_ours, seed=0):
    torch.manual_seed(seed)
    ref = cls_torch(transformers.CLIPTextConfig.from_dict(cfg_dict)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cfg = CLIPTextConfig.from_dict(cfg_dict)
    abstract = abstract_model(cls_ours, cfg)
    model = load_state(abstract, names.clip_text({k: v.numpy() for k, v in ref.state_dict().items()}),
                       ignore=names.is_ignored)
    return ref, model


def _check_te(ref_out, got, tol_scale, projected):
    tol = tol_scale * float(ref_out.last_hidden_state.std())
    err = lambda a, b: float(np.abs(np.asarray(a, np.float32) - np.asarray(b.detach().numpy())).max())
    assert err(got.last_hidden_state, ref_out.last_hidden_state) < tol
    # SDXL's context: the penultimate hidden states, without the final layer norm
    assert err(got.hidden_states[-2], ref_out.hidden_states[-2]) < tol_scale * float(ref_out.hidden_states[-2].std())
    if projected:
        assert err(got.text_embeds, ref_out.text_embeds) < tol_scale * float(ref_out.text_embeds.std())


def test_tiny_text_encoder_2_parity():
    d = _config("sdxl-base", "text_encoder_2")
    d.update(TINY_TE)
    ref, model = _te_pair(d, transformers.CLIPTextModelWithProjection, CLIPTextModelWithProjection)
    ids = _token_ids()
    with torch.no_grad():
        want = ref(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
    got = model(jnp.asarray(ids, jnp.int32), output_hidden_states=True)
    assert got.text_embeds.shape == (3, 48)
    _check_te(want, got, 1e-4, True)


@pytest.mark.slow
@pytest.mark.parametrize("component, cls_torch, cls_ours", [
    ("text_encoder", transformers.CLIPTextModel, CLIPTextModel),
    ("text_encoder_2", transformers.CLIPTextModelWithProjection, CLIPTextModelWithProjection)])
@pytest.mark.xdist_group("full_size")  # one full-size model at a time: 24 GiB holds one, not two
def test_full_size_text_encoders(component, cls_torch, cls_ours):
    """The real SDXL text encoder configs (CLIP ViT-L; OpenCLIP bigG: 32 layers, 1280 wide), random init."""
    d = _config("sdxl-base", component)
    ids = _token_ids("tokenizer" if component == "text_encoder" else "tokenizer_2")
    torch.manual_seed(0)
    ref = cls_torch(transformers.CLIPTextConfig.from_dict(d)).eval()
    with torch.no_grad():
        want = ref(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
    cfg = CLIPTextConfig.from_dict(d)
    abstract = abstract_model(cls_ours, cfg)
    model = load_state(abstract, names.clip_text({k: v.numpy() for k, v in ref.state_dict().items()}),
                       ignore=names.is_ignored)
    del ref
    got = model(jnp.asarray(ids, jnp.int32), output_hidden_states=True)
    _check_te(want, got, 1e-3, component == "text_encoder_2")
    if component == "text_encoder":
        tol = 1e-3 * float(want.pooler_output.std())
        assert float(np.abs(np.asarray(got.pooled_output) - want.pooler_output.numpy()).max()) < tol


@pytest.mark.xdist_group("full_size")  # one full-size model at a time: 24 GiB holds one, not two
@pytest.mark.slow
def test_full_size_sdxl_unet():
    """The real SDXL base UNet config (2.6 B parameters), random init, one 32x32 latent, float32.
    The torch weights are freed as they are converted, so the model is held once at a time."""
    d = _config("sdxl-base")
    err, std, _ = _compare_unet(d, 6, 1280, 1, (32, 32), np.array([700]), tm=_torch_unet(d, scale=0.0))
    assert err <= 1e-3 * std, (err, std)
