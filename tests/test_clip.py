"""CLIP text encoder: parity with transformers' CLIPTextModel (random weights), weight
layouts (transformers v4 `text_model.` prefix and v5), bf16, config validation, jit."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import reference
from flax import nnx

from sdjax.errors import ConfigError
from sdjax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextOutput
from sdjax.weights.diffusers import abstract_model
from sdjax.weights.mapping import load_state
from sdjax.weights.names import clip_text, is_ignored

PROMPTS = ["a photo of an astronaut riding a horse on mars, highly detailed", "",
           "masterpiece, best quality, " * 20]  # the last one is truncated at 77 tokens

# Shrunk sizes for the tiny parity configs; activation, eps and token ids stay the reference's.
TINY = dict(hidden_size=64, num_attention_heads=4, intermediate_size=256, num_hidden_layers=3)


def _config_dict(name: str, component: str = "text_encoder") -> dict:
    return json.loads((reference(name) / component / "config.json").read_text())


def _token_ids(name: str, length: int = 77) -> np.ndarray:
    """Real tokenizer output (B, length) int32: sd15 pads with eos, sd2 pads with '!' (id 0)."""
    tok = transformers.CLIPTokenizer.from_pretrained(str(reference(name) / "tokenizer"))
    enc = tok(PROMPTS, padding="max_length", max_length=length, truncation=True, return_tensors="np")
    return enc.input_ids.astype(np.int32)


def _torch_model(cfg_dict: dict, seed: int = 0, perturb: bool = True) -> transformers.CLIPTextModel:
    """A transformers CLIPTextModel with random weights; `perturb` also randomises the norms and
    biases (transformers initialises them to 1 and 0, which would hide a mix-up)."""
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(cfg_dict)).eval()
    if perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "layer_norm" in name and name.endswith("weight"):
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                elif name.endswith("bias"):
                    p.copy_(0.05 * torch.randn_like(p))
    return model


def _flat(model: torch.nn.Module, layout: str) -> dict:
    flat = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if layout == "v4":  # real checkpoints: `text_model.` prefix and the position_ids buffer
        flat = {f"text_model.{k}": v for k, v in flat.items()}
        flat["text_model.embeddings.position_ids"] = np.arange(model.config.max_position_embeddings)[None]
    return flat


def _jax_model(cfg: CLIPTextConfig, flat: dict, dtype=jnp.float32, param_dtype=jnp.float32) -> CLIPTextModel:
    abstract = abstract_model(CLIPTextModel, cfg, dtype, param_dtype)
    return load_state(abstract, clip_text(flat), ignore=is_ignored)


def _torch_run(model, ids: np.ndarray):
    with torch.no_grad():
        return model(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)


def _max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize("layout", ["v5", "v4"])
@pytest.mark.parametrize("name", ["sd15", "sd21", "sd2-inpainting"])
def test_tiny_parity(name, layout):
    cfg_dict = {**_config_dict(name), **TINY}
    ref = _torch_model(cfg_dict)
    model = _jax_model(CLIPTextConfig.from_dict(cfg_dict), _flat(ref, layout))
    ids = _token_ids(name)
    want = _torch_run(ref, ids)
    got = model(jnp.asarray(ids), output_hidden_states=True)

    assert got.last_hidden_state.shape == (len(PROMPTS), 77, 64)
    assert got.pooled_output.shape == (len(PROMPTS), 64)
    assert _max_abs(got.last_hidden_state, want.last_hidden_state) < 1e-4
    assert _max_abs(got.pooled_output, want.pooler_output) < 1e-4
    assert len(got.hidden_states) == len(want.hidden_states) == TINY["num_hidden_layers"] + 1
    for g, w in zip(got.hidden_states, want.hidden_states):
        assert _max_abs(g, w) < 1e-4
    # Clip skip: the final layer norm applies to any hidden state.
    with torch.no_grad():
        want_skip = ref.final_layer_norm(want.hidden_states[-2])
    assert _max_abs(model.final_layer_norm(got.hidden_states[-2]), want_skip) < 1e-4


def test_v4_and_v5_layouts_give_the_same_model():
    cfg_dict = {**_config_dict("sd15"), **TINY}
    ref = _torch_model(cfg_dict)
    cfg = CLIPTextConfig.from_dict(cfg_dict)
    s4 = nnx.state(_jax_model(cfg, _flat(ref, "v4")))
    s5 = nnx.state(_jax_model(cfg, _flat(ref, "v5")))
    leaves4, leaves5 = jax.tree.leaves(s4), jax.tree.leaves(s5)
    assert len(leaves4) == len(leaves5) == len(ref.state_dict())
    for a, b in zip(leaves4, leaves5):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("eos_token_id", [2, 7])
def test_pooling_rule_and_short_sequences(eos_token_id):
    """eos_token_id == 2 is transformers' legacy rule (argmax of ids); otherwise the first eos.
    A small vocabulary puts ids larger than eos after it, so the two rules pick different tokens."""
    cfg_dict = {**_config_dict("sd21"), **TINY, "vocab_size": 100, "eos_token_id": eos_token_id}
    ids = np.array([[0, 11, 7, 42, 99, 7, 3, 7, 1, 1, 1, 1],
                    [0, 98, 5, 7, 2, 2, 99, 1, 1, 1, 1, 1]], np.int32)  # L=12 < 77 positions
    ref = _torch_model(cfg_dict, seed=1)
    model = _jax_model(CLIPTextConfig.from_dict(cfg_dict), _flat(ref, "v5"))
    want = _torch_run(ref, ids)
    got = model(jnp.asarray(ids))
    assert got.hidden_states is None
    assert _max_abs(got.last_hidden_state, want.last_hidden_state) < 1e-4
    assert _max_abs(got.pooled_output, want.pooler_output) < 1e-4
    legacy_pos, first_eos_pos = np.array([4, 6]), np.array([2, 3])
    pos = legacy_pos if eos_token_id == 2 else first_eos_pos
    np.testing.assert_array_equal(np.asarray(got.pooled_output),
                                  np.asarray(got.last_hidden_state)[np.arange(2), pos])


def test_bf16_params_and_compute():
    """bf16 parameters and compute against fp32 torch; error is norm-relative:
    ||jax_bf16 - torch_fp32|| / ||torch_fp32||, per output (and per hidden state)."""
    cfg_dict = {**_config_dict("sd15"), **TINY, "num_hidden_layers": 4}
    ref = _torch_model(cfg_dict)
    model = _jax_model(CLIPTextConfig.from_dict(cfg_dict), _flat(ref, "v4"),
                       dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    ids = _token_ids("sd15")
    want = _torch_run(ref, ids)
    got = model(jnp.asarray(ids), output_hidden_states=True)
    assert got.last_hidden_state.dtype == jnp.bfloat16

    def rel(a, b):
        a, b = np.asarray(a, np.float32), b.numpy()
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    assert rel(got.last_hidden_state, want.last_hidden_state) < 2e-2
    assert rel(got.pooled_output, want.pooler_output) < 2e-2
    for g, w in zip(got.hidden_states, want.hidden_states):
        assert rel(g, w) < 2e-2


def test_jit_of_split_state_matches_eager():
    cfg_dict = {**_config_dict("sd21"), **TINY}
    model = _jax_model(CLIPTextConfig.from_dict(cfg_dict), _flat(_torch_model(cfg_dict), "v5"))
    ids = jnp.asarray(_token_ids("sd21"))
    graphdef, state = nnx.split(model)

    @jax.jit
    def encode(state, ids):
        out = nnx.merge(graphdef, state)(ids, output_hidden_states=True)
        return out, nnx.merge(graphdef, state).final_layer_norm(out.hidden_states[-2])

    # Strict promotion: no silent dtype widening anywhere in the model.
    with jax.numpy_dtype_promotion("strict"):
        jitted, skip = encode(state, ids)
    eager = model(ids, output_hidden_states=True)
    assert isinstance(jitted, CLIPTextOutput)
    np.testing.assert_allclose(jitted.last_hidden_state, eager.last_hidden_state, atol=1e-5)
    np.testing.assert_allclose(jitted.pooled_output, eager.pooled_output, atol=1e-5)
    for j, e in zip(jitted.hidden_states, eager.hidden_states):
        np.testing.assert_allclose(j, e, atol=1e-5)
    np.testing.assert_allclose(skip, model.final_layer_norm(eager.hidden_states[-2]), atol=1e-5)


def test_sequence_longer_than_positions_is_an_error():
    cfg = CLIPTextConfig.from_dict({**_config_dict("sd15"), **TINY, "max_position_embeddings": 8})
    model = CLIPTextModel(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(jnp.zeros((1, 9), jnp.int32))


@pytest.mark.parametrize("name,component", [("sd15", "text_encoder"), ("sd21", "text_encoder"),
                                            ("sd2-inpainting", "text_encoder"),
                                            ("sdxl-base", "text_encoder"), ("sdxl-base", "text_encoder_2")])
def test_reference_configs_are_accepted(name, component):
    d = _config_dict(name, component)
    cfg = CLIPTextConfig.from_dict(d)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.hidden_act) == \
        (d["hidden_size"], d["num_hidden_layers"], d["hidden_act"])
    assert (cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id) == \
        (d["eos_token_id"], d["pad_token_id"], d["bos_token_id"])
    assert cfg.checkpoint_dtype == d["torch_dtype"]


def test_config_accepts_metadata_and_training_keys():
    d = {**_config_dict("sd21"), "dropout": 0.1, "attention_dropout": 0.2, "dtype": "bfloat16",
         "_commit_hash": "abc", "transformers_version": "5.23.0", "hidden_act": "gelu_pytorch_tanh"}
    del d["torch_dtype"]
    cfg = CLIPTextConfig.from_dict(d)
    assert cfg.checkpoint_dtype == "bfloat16" and cfg.hidden_act == "gelu_pytorch_tanh"
    # Missing keys take transformers' defaults.
    assert CLIPTextConfig.from_dict({}) == CLIPTextConfig()
    assert CLIPTextConfig().eos_token_id == transformers.CLIPTextConfig().eos_token_id


@pytest.mark.parametrize("key,value", [
    ("use_cache", True),               # unknown key
    ("hidden_act", "relu"),            # unsupported activation
    ("hidden_act", "gelu_new"),
    ("eos_token_id", [2, 49407]),      # pooling needs one eos id
    ("model_type", "clip_vision_model"),
    ("torch_dtype", "int8"),
    ("architectures", ["CLIPVisionModel"]),
    ("num_hidden_layers", 0),
    ("hidden_size", 1000),             # not a multiple of 16 heads
])
def test_config_errors_name_the_key(key, value):
    d = {**_config_dict("sd21"), key: value}
    with pytest.raises(ConfigError) as err:
        CLIPTextConfig.from_dict(d)
    assert key in str(err.value)


def test_gelu_pytorch_tanh_parity():
    cfg_dict = {**_config_dict("sd21"), **TINY, "hidden_act": "gelu_pytorch_tanh"}
    ref = _torch_model(cfg_dict)
    model = _jax_model(CLIPTextConfig.from_dict(cfg_dict), _flat(ref, "v5"))
    ids = _token_ids("sd21")
    assert _max_abs(model(jnp.asarray(ids)).last_hidden_state, _torch_run(ref, ids).last_hidden_state) < 1e-4


@pytest.mark.xdist_group("full_size")  # one full-size model at a time: 24 GiB holds one, not two
@pytest.mark.slow
def test_full_size_sd21_parity():
    """The real SD 2.1 text encoder config (23 layers, 1024 wide) with transformers' random init."""
    cfg_dict = _config_dict("sd21")
    ref = _torch_model(cfg_dict, perturb=True)
    model = _jax_model(CLIPTextConfig.from_dict(cfg_dict), _flat(ref, "v4"))
    ids = _token_ids("sd21")
    want = _torch_run(ref, ids)
    got = model(jnp.asarray(ids), output_hidden_states=True)
    tol = 1e-3 * float(want.last_hidden_state.std())
    assert _max_abs(got.last_hidden_state, want.last_hidden_state) < tol
    assert _max_abs(got.pooled_output, want.pooler_output) < tol
    # SD 2.x uses the penultimate layer (clip skip 2) through the final layer norm.
    with torch.no_grad():
        want_skip = ref.final_layer_norm(want.hidden_states[-2])
    assert _max_abs(model.final_layer_norm(got.hidden_states[-2]), want_skip) < 1e-3 * float(want_skip.std())
