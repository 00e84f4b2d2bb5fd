"""LoRA: merged sdjax weights and outputs must match diffusers' `load_lora_weights` + `fuse_lora` on the
same files (kohya and PEFT formats, UNet and text encoder, conv LoRAs), unmerge must be bit-exact,
and modules that match nothing must be reported."""

import re

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

from sdjax.errors import CheckpointError
from sdjax.weights import diffusers as diffusers_folder
from sdjax.weights.lora import load_loras, merge, parse_lora, read_lora, unmerge
from sdjax.weights.mapping import export_state
from test_single_file import write_tiny_folder

# (module, kind) adapted in the tests: linear attention/MLP layers, the 1x1 proj_in conv of SD1,
# a 3x3 resnet conv (LoCon: kxk down, 1x1 up) and text-encoder layers.
UNET_MODULES = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
    "down_blocks.0.attentions.0.proj_in",
    "down_blocks.0.resnets.0.conv1",
    "up_blocks.0.resnets.1.conv2",
]
TE_ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}
TE_MODULES = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1",
              "text_model.encoder.layers.1.self_attn.out_proj"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import diffusers

    folder = write_tiny_folder(tmp_path_factory.mktemp("lora") / "sd15", "sd15", seed=3)
    states = {}
    for kind in ("unet", "text_encoder"):
        model, _ = diffusers_folder.load_model(kind, folder / kind)
        states[kind] = nnx.split(model)
    torch_pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    shapes = {"unet": {k: v.shape for k, v in torch_pipe.unet.state_dict().items()},
              "text_encoder": {("text_model." + k if not k.startswith("text_model.") else k): v.shape
                               for k, v in torch_pipe.text_encoder.state_dict().items()}}
    return folder, states, shapes


def _lora_tensors(shapes, seed, rank=4, fmt="kohya", with_alpha=True):
    """Random LoRA tensors for UNET_MODULES and TE_MODULES in `fmt` naming."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for component, modules in (("unet", UNET_MODULES), ("text_encoder", TE_MODULES)):
        for m in modules:
            w = shapes[component][m + ".weight"]
            if len(w) == 4:
                down = torch.randn((rank, w[1], w[2], w[3]), generator=g) * 0.3
                up = torch.randn((w[0], rank, 1, 1), generator=g) * 0.3
            else:
                down = torch.randn((rank, w[1]), generator=g) * 0.3
                up = torch.randn((w[0], rank), generator=g) * 0.3
            if fmt == "kohya":
                key = ("lora_unet_" if component == "unet" else "lora_te_") + m.replace(".", "_")
                out[key + ".lora_down.weight"], out[key + ".lora_up.weight"] = down, up
                if with_alpha:
                    out[key + ".alpha"] = torch.tensor(float(rank) / 2 + seed % 3)
            else:
                key = f"{component}.{m}"
                out[key + ".lora_A.weight"], out[key + ".lora_B.weight"] = down, up
    return out


def _diffusers_fused(folder, files, unet_scale, te_scale, weights=None):
    """diffusers pipeline with the LoRA files loaded, fused at the given scales, and unloaded."""
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    names = []
    for i, f in enumerate(files):
        pipe.load_lora_weights(str(f.parent), weight_name=f.name, adapter_name=f"a{i}")
        names.append(f"a{i}")
    if weights is not None:
        pipe.set_adapters(names, adapter_weights=weights)
    pipe.fuse_lora(components=["unet"], lora_scale=unet_scale, adapter_names=names)
    pipe.fuse_lora(components=["text_encoder"], lora_scale=te_scale, adapter_names=names)
    pipe.unload_lora_weights()
    return pipe


def _compare(pipe, states, new_states, atol=2e-6):
    for kind in ("unet", "text_encoder"):
        graphdef, _ = states[kind]
        ours = export_state(nnx.merge(graphdef, new_states[kind]))
        theirs = {k.removeprefix("text_model."): v.detach().numpy()
                  for k, v in getattr(pipe, kind).state_dict().items() if not k.endswith("position_ids")}
        assert set(ours) == set(theirs), kind
        changed = 0
        for k, v in theirs.items():
            np.testing.assert_allclose(ours[k], v, atol=atol, rtol=0, err_msg=f"{kind}.{k}")
        base = export_state(nnx.merge(graphdef, states[kind][1]))
        changed = sum(not np.array_equal(base[k], ours[k]) for k in ours)
        expected = len(UNET_MODULES if kind == "unet" else TE_MODULES)
        assert changed == expected, (kind, changed)


def _outputs_match(pipe, states, new_states):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49000, size=(1, 77))
    latents = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    te = nnx.merge(states["text_encoder"][0], new_states["text_encoder"])
    unet = nnx.merge(states["unet"][0], new_states["unet"])
    ctx = np.asarray(te(ids).last_hidden_state)
    eps = np.asarray(unet(latents, np.array([500]), ctx))
    with torch.no_grad():
        t_ctx = pipe.text_encoder(torch.from_numpy(ids))[0]
        t_eps = pipe.unet(torch.from_numpy(latents.transpose(0, 3, 1, 2)), 500, t_ctx).sample
    np.testing.assert_allclose(ctx, t_ctx.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(eps, t_eps.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=0)


def test_kohya_matches_diffusers(setup, tmp_path):
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (test extra)")
    folder, states, shapes = setup
    path = tmp_path / "style.safetensors"
    save_file(_lora_tensors(shapes, seed=1, fmt="kohya"), str(path))
    lora = read_lora(path)
    assert lora.name == "style" and len(lora.modules) == len(UNET_MODULES) + len(TE_MODULES)
    new_states, _ = merge({k: s for k, (_, s) in states.items()}, [(lora, 0.7, 1.3)])
    pipe = _diffusers_fused(folder, [path], 0.7, 1.3)
    _compare(pipe, states, new_states)
    _outputs_match(pipe, states, new_states)


def test_peft_format_and_two_loras_match_diffusers(setup, tmp_path):
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (test extra)")
    folder, states, shapes = setup
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(_lora_tensors(shapes, seed=2, fmt="peft"), str(a))
    save_file(_lora_tensors(shapes, seed=5, rank=2, fmt="kohya"), str(b))
    loras = load_loras([("a", 0.6), ("b", 1.5)], tmp_path)
    new_states, _ = merge({k: s for k, (_, s) in states.items()}, loras)
    pipe = _diffusers_fused(folder, [a, b], 1.0, 1.0, weights=[0.6, 1.5])
    _compare(pipe, states, new_states)


def test_kohya_names_resolve_like_diffusers_conversion(setup):
    """Without peft: diffusers' own kohya -> diffusers key conversion, fused by hand in torch."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    import diffusers

    folder, states, shapes = setup
    tensors = _lora_tensors(shapes, seed=6, fmt="kohya")
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(dict(tensors))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    mults = {"unet": 0.8, "text_encoder": 1.2}
    with torch.no_grad():
        for key, down in converted.items():
            if ".down." not in key:
                continue
            up = converted[key.replace(".down.", ".up.")]
            component, name = key.split(".", 1)
            name = name.removesuffix(".down.weight").removesuffix(".lora_linear_layer").removesuffix(".lora")
            name = re.sub(r"\.processor\.(to_(?:q|k|v|out))_lora$", r".\1", name).replace(".to_out", ".to_out.0") \
                if ".processor." in name else name
            name = re.sub(r"\.self_attn\.to_(\w+)_lora$", lambda m: f".self_attn.{TE_ATTN[m.group(1)]}", name)
            model = getattr(pipe, component)
            if not hasattr(model, "text_model"):  # transformers v5 CLIPTextModel has no text_model wrapper
                name = name.removeprefix("text_model.")
            weight = model.get_submodule(name).weight
            alpha = alphas.get(key + ".alpha", alphas.get(key.split(".lora.")[0] + ".alpha", down.shape[0]))
            delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
            weight.add_(mults[component] * alpha / down.shape[0] * delta)
    lora = parse_lora({k: v.numpy() for k, v in tensors.items()}, "k")
    new_states, _ = merge({k: s for k, (_, s) in states.items()}, [(lora, 0.8, 1.2)])
    _compare(pipe, states, new_states)


def test_unmerge_is_bit_exact_and_inputs_untouched(setup, tmp_path):
    _, states, shapes = setup
    lora = parse_lora({k: v.numpy() for k, v in _lora_tensors(shapes, seed=3).items()}, "x")
    before = {k: [np.asarray(x).copy() for x in jax_leaves(s)] for k, (_, s) in states.items()}
    merged, undo = merge({k: s for k, (_, s) in states.items()}, [(lora, 0.9, 0.4)])
    restored = unmerge(merged, undo)
    for k in states:
        for x, y, z in zip(before[k], jax_leaves(restored[k]), jax_leaves(states[k][1])):
            assert np.asarray(y).dtype == x.dtype
            np.testing.assert_array_equal(np.asarray(y), x)
            np.testing.assert_array_equal(np.asarray(z), x)
    assert set(undo) == {"unet", "text_encoder"}


def jax_leaves(state):
    import jax
    return jax.tree.leaves(state)


def test_unmatched_keys_error_or_warn(setup):
    _, states, shapes = setup
    flat = {k: v.numpy() for k, v in _lora_tensors(shapes, seed=4).items()}
    flat["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = np.zeros((4, 32), np.float32)
    flat["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = np.zeros((32, 4), np.float32)
    lora = parse_lora(flat, "bad")
    plain = {k: s for k, (_, s) in states.items()}
    with pytest.raises(CheckpointError, match="down_blocks_9_attentions_0_proj_in"):
        merge(plain, [(lora, 1.0, 1.0)])
    with pytest.warns(UserWarning, match="down_blocks_9_attentions_0_proj_in"):
        merged, undo = merge(plain, [(lora, 1.0, 1.0)], strict=False)
    assert len(undo["unet"]) == len(UNET_MODULES)


def test_parse_formats_and_refusals():
    d, u = np.ones((2, 8), np.float32), np.ones((8, 2), np.float32)
    old = parse_lora({"down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": d,
                      "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": u,
                      "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": d,
                      "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": u})
    keys = {(m.component, m.key) for m in old.modules}
    assert keys == {("unet", "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"),
                    ("text_encoder", "text_model_encoder_layers_0_self_attn_q_proj")}
    m = parse_lora({"lora_te1_x.lora_down.weight": d, "lora_te1_x.lora_up.weight": u,
                    "lora_te1_x.alpha": np.array(1.0, np.float32)}).modules[0]
    np.testing.assert_allclose(m.delta(), 0.5 * (u @ d))  # alpha / rank = 1 / 2
    with pytest.raises(CheckpointError, match="LoHa"):
        parse_lora({"lora_unet_x.hada_w1_a": d})
    te2 = parse_lora({"lora_te2_x.lora_down.weight": d, "lora_te2_x.lora_up.weight": u})  # SDXL's bigG
    assert [(m.component, m.key) for m in te2.modules] == [("text_encoder_2", "x")]
    with pytest.raises(CheckpointError, match="needs both"):
        parse_lora({"lora_unet_x.lora_down.weight": d})


def test_unsupported_variants_are_named_and_diffusion_keys_are_not_mistaken_for_them():
    from sdjax.errors import CheckpointError
    from sdjax.weights.lora import parse_lora

    z = np.zeros((4, 4), np.float32)
    for key, what in (("lora_unet_mid_block_attentions_0_proj_in.diff", "full weight differences"),
                      ("lora_unet_mid_block_attentions_0_proj_in.diff_b", "full weight differences"),
                      ("lora_unet_mid_block_attentions_0_proj_in.hada_w1_a", "LoHa")):
        with pytest.raises(CheckpointError, match=what):
            parse_lora({key: z}, strict=False)  # never skipped: it would silently change the images
    with pytest.raises(CheckpointError, match="not a LoRA down/up/alpha tensor"):
        parse_lora({"model.diffusion_model.out.2.weight": z})
    with pytest.warns(UserWarning, match="model.diffusion_model.out.2.weight"):
        assert parse_lora({"model.diffusion_model.out.2.weight": z}, strict=False).modules == ()
