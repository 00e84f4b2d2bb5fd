"""SDXL networks: a kohya SDXL LoRA (SGM-layout UNet names, lora_te1_ / lora_te2_) and a PEFT one give
the weights diffusers' `load_lora_weights` + `fuse_lora` give, and the same images (within 2/255, same
noise); an SDXL textual-inversion embedding (`clip_l` / `clip_g`) gives diffusers' images with the
embedding loaded into both encoders. Tiny random SDXL (tests/sdjax_tiny_sdxl.py)."""

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

import sdjax
from sdjax.errors import CheckpointError
from sdjax.sampling import DiscreteModel, diffusers_schedule
from sdjax.weights.lora import merge, read_lora
from sdjax.weights.mapping import export_state
from sdjax_tiny_sdxl import build_sdxl_file_pipeline

pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (test extra)")

W, H = 64, 48
PROMPT = "a red circle on a blue background"
STEPS = 4
# (kohya SGM-layout name, diffusers module) of the tiny SDXL UNet (tests/sdjax_tiny.py: levels
# [DownBlock2D, CrossAttnDownBlock2D], one resnet per level, transformer depths [1, 2]).
UNET_MODULES = [
    ("input_blocks_3_1_transformer_blocks_1_attn1_to_q", "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q"),
    ("input_blocks_3_1_transformer_blocks_0_attn2_to_k", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
    ("input_blocks_3_1_proj_in", "down_blocks.1.attentions.0.proj_in"),
    ("middle_block_1_transformer_blocks_1_ff_net_0_proj", "mid_block.attentions.0.transformer_blocks.1.ff.net.0.proj"),
    ("output_blocks_1_1_transformer_blocks_0_attn1_to_out_0",
     "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0"),
    ("input_blocks_1_0_in_layers_2", "down_blocks.0.resnets.0.conv1"),        # 3x3 conv (LoCon)
    ("output_blocks_2_0_skip_connection", "up_blocks.1.resnets.0.conv_shortcut"),  # 1x1 conv
    ("label_emb_0_0", "add_embedding.linear_1"),
]
# diffusers 0.42 drops kohya text-encoder attention LoRAs (`..._self_attn_q_proj`: its converted
# `to_q_lora` keys end up UNEXPECTED), so the kohya file adapts the encoders' MLPs and the PEFT
# file (loaded by diffusers as is) their attention too.
TE_MODULES = {"text_encoder": ["encoder.layers.0.mlp.fc2", "encoder.layers.1.mlp.fc1"],
              "text_encoder_2": ["encoder.layers.0.mlp.fc1", "encoder.layers.1.mlp.fc2"]}
PEFT_TE_MODULES = {"text_encoder": ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"],
                   "text_encoder_2": ["encoder.layers.0.self_attn.v_proj", "encoder.layers.1.self_attn.out_proj",
                                      "encoder.layers.1.mlp.fc2"]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch_pipe = build_sdxl_file_pipeline("sdxl-base", seed=5, vae_levels=4)
    torch_pipe.scheduler = torch_pipe.scheduler.from_config(torch_pipe.scheduler.config, timestep_spacing="trailing")
    path = tmp_path_factory.mktemp("sdxl_networks") / "base"
    torch_pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipe(folder):
    return sdjax.load_pipeline(folder)


def _torch_pipe(folder):
    import diffusers
    return diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder))


def _shapes(torch_pipe):
    out = {"unet": {k.removesuffix(".weight"): v.shape for k, v in torch_pipe.unet.state_dict().items()}}
    for name in TE_MODULES:
        out[name] = {k.removeprefix("text_model.").removesuffix(".weight"): v.shape
                     for k, v in getattr(torch_pipe, name).state_dict().items()}
    return out


def _down_up(shape, g, rank):
    if len(shape) == 4:
        return (torch.randn((rank, *shape[1:]), generator=g) * 0.3,
                torch.randn((shape[0], rank, 1, 1), generator=g) * 0.3)
    return torch.randn((rank, shape[1]), generator=g) * 0.3, torch.randn((shape[0], rank), generator=g) * 0.3


def _kohya_sgm(shapes, seed=1, rank=4):
    g = torch.Generator().manual_seed(seed)
    out = {}
    modules = [("lora_unet_" + sgm, shapes["unet"][d]) for sgm, d in UNET_MODULES]
    modules += [(f"lora_te{i + 1}_text_model_" + m.replace(".", "_"), shapes[name][m])
                for i, name in enumerate(TE_MODULES) for m in TE_MODULES[name]]
    for key, shape in modules:
        out[key + ".lora_down.weight"], out[key + ".lora_up.weight"] = _down_up(shape, g, rank)
        out[key + ".alpha"] = torch.tensor(rank / 2.0)
    return out


def _peft(shapes, seed=2, rank=2):
    g = torch.Generator().manual_seed(seed)
    out = {}
    modules = [("unet." + d, shapes["unet"][d]) for _, d in UNET_MODULES if "label_emb" not in _]
    modules += [(f"{name}.text_model.{m}", shapes[name][m]) for name in PEFT_TE_MODULES for m in PEFT_TE_MODULES[name]]
    for key, shape in modules:
        out[key + ".lora_A.weight"], out[key + ".lora_B.weight"] = _down_up(shape, g, rank)
    return out


def _fused(folder, path, scale):
    torch_pipe = _torch_pipe(folder)
    torch_pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="a")
    torch_pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"], lora_scale=scale)
    torch_pipe.unload_lora_weights()
    return torch_pipe


def _compare_weights(pipe, torch_pipe, merged, n_unet, te_modules=TE_MODULES):
    for kind in ("unet", "text_encoder", "text_encoder_2"):
        component = getattr(pipe, kind)
        ours = export_state(nnx.merge(component.graphdef, merged[kind]))
        base = export_state(component.module())
        theirs = {k.removeprefix("text_model."): v.detach().numpy()
                  for k, v in getattr(torch_pipe, kind).state_dict().items() if not k.endswith("position_ids")}
        assert set(ours) == set(theirs), kind
        for k, v in theirs.items():
            np.testing.assert_allclose(ours[k], v, atol=2e-6, rtol=0, err_msg=f"{kind}.{k}")
        changed = sum(not np.array_equal(base[k], ours[k]) for k in ours)
        assert changed == (n_unet if kind == "unet" else len(te_modules[kind])), (kind, changed)


def _sigmas(torch_pipe):
    config = {k: v for k, v in torch_pipe.scheduler.config.items() if not k.startswith("_")}
    torch_pipe.scheduler.set_timesteps(STEPS)
    _, sigmas = diffusers_schedule(DiscreteModel.from_config(config), STEPS, solver="euler")
    return sigmas


NOISE = np.random.default_rng(0).standard_normal((1, H // 8, W // 8, 4)).astype(np.float32)


def _ours(pipe, sigmas, prompt, **networks):
    res = pipe.generate(prompt, "blurry", steps=STEPS, sampler="euler", cfg_scale=6.0, width=W, height=H,
                        noise=NOISE, sigmas=sigmas, **networks)
    return np.stack([np.asarray(im, np.float32) for im in res.images]) / 255.0, res.infotexts[0]


def _theirs(torch_pipe, prompt):
    with torch.no_grad():
        return torch_pipe(prompt, negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=6.0, height=H,
                          width=W, latents=torch.from_numpy(NOISE.transpose(0, 3, 1, 2).copy()),
                          output_type="np").images


@pytest.mark.slow  # ~40 s on a shared 2-core CPU (it compiles SDXL generation)
def test_kohya_sdxl_lora_matches_diffusers(folder, pipe, tmp_path):
    torch_pipe = _torch_pipe(folder)
    path = tmp_path / "xl_style.safetensors"
    save_file(_kohya_sgm(_shapes(torch_pipe)), str(path))
    lora = read_lora(path)
    assert {m.component for m in lora.modules} == {"unet", "text_encoder", "text_encoder_2"}
    import dataclasses
    merged, _ = merge(pipe.states(), [(lora, 0.8, 0.8)], unet_config=dataclasses.asdict(pipe.unet.config))
    fused = _fused(folder, path, 0.8)
    _compare_weights(pipe, fused, merged, len(UNET_MODULES))
    (ours, info), theirs = _ours(pipe, _sigmas(fused), PROMPT, loras=[(path, 0.8)]), _theirs(fused, PROMPT)
    assert np.abs(ours - theirs).max() <= 2 / 255 + 1e-6, np.abs(ours - theirs).max() * 255
    assert "Lora hashes" in info
    plain, _ = _ours(pipe, _sigmas(fused), PROMPT)
    assert np.abs(plain - theirs).max() > 10 / 255  # the LoRA changes the image: the check above has teeth


def test_peft_sdxl_lora_weights_match_diffusers(folder, pipe, tmp_path):
    torch_pipe = _torch_pipe(folder)
    path = tmp_path / "peft.safetensors"
    save_file(_peft(_shapes(torch_pipe)), str(path))
    merged, _ = merge(pipe.states(), [(read_lora(path), 1.3, 1.3)])
    _compare_weights(pipe, _fused(folder, path, 1.3), merged, len(UNET_MODULES) - 1, PEFT_TE_MODULES)


@pytest.mark.slow  # ~17 s after the LoRA test, ~40 s alone (compiles SDXL generation)
def test_sdxl_embedding_matches_diffusers(folder, pipe, tmp_path):
    from safetensors.numpy import save_file as np_save_file

    rng = np.random.default_rng(4)
    emb = {"clip_l": rng.standard_normal((2, 32)).astype(np.float32),
           "clip_g": rng.standard_normal((2, 48)).astype(np.float32)}
    path = tmp_path / "shinytok.safetensors"
    np_save_file(emb, str(path))
    torch_pipe = _torch_pipe(folder)
    torch_pipe.load_textual_inversion(torch.from_numpy(emb["clip_l"]), token="shinytok",
                                      text_encoder=torch_pipe.text_encoder, tokenizer=torch_pipe.tokenizer)
    torch_pipe.load_textual_inversion(torch.from_numpy(emb["clip_g"]), token="shinytok",
                                      text_encoder=torch_pipe.text_encoder_2, tokenizer=torch_pipe.tokenizer_2)
    prompt = "a shinytok circle"
    (ours, info), theirs = _ours(pipe, _sigmas(torch_pipe), prompt, embeddings=[path]), _theirs(torch_pipe, prompt)
    assert np.abs(ours - theirs).max() <= 2 / 255 + 1e-6, np.abs(ours - theirs).max() * 255
    assert "TI hashes" in info
    np_save_file({"clip_l": emb["clip_l"]}, str(tmp_path / "half.safetensors"))
    with pytest.raises(CheckpointError, match="without 'clip_g'"):
        pipe.generate(prompt, steps=1, width=W, height=H, embeddings=[tmp_path / "half.safetensors"])


def test_sdxl_lora_names_resolve_and_unmatched_are_named(pipe):
    import dataclasses
    cfg = dataclasses.asdict(pipe.unet.config)
    from sdjax.weights.lora import module_index
    index = module_index(pipe.unet.state, "unet", cfg)
    for sgm, d in UNET_MODULES:
        assert index[sgm] == index[d.replace(".", "_")], sgm
    assert index["output_blocks_1_2_conv"] == index["up_blocks_0_upsamplers_0_conv"]
    bad = {"lora_unet_input_blocks_9_1_proj_in.lora_down.weight": np.zeros((2, 64), np.float32),
           "lora_unet_input_blocks_9_1_proj_in.lora_up.weight": np.zeros((64, 2), np.float32)}
    from sdjax.weights.lora import parse_lora
    with pytest.raises(CheckpointError, match="input_blocks_9_1_proj_in"):
        merge(pipe.states(), [(parse_lora(bad, "bad"), 1.0, 1.0)], unet_config=cfg)


@pytest.mark.slow  # ~40 s on a shared 2-core CPU (compiles SDXL generation with a ControlNet)
def test_sdxl_controlnet_matches_diffusers(folder, pipe, tmp_path):
    """An SDXL ControlNet (diffusers folder, text_time added conditioning) gives diffusers'
    StableDiffusionXLControlNetPipeline images within 2/255."""
    import diffusers
    from PIL import Image

    from sdjax.pipeline.control import ControlNetUnit
    from sdjax_tiny import perturb

    torch_pipe = _torch_pipe(folder)
    cn = diffusers.ControlNetModel.from_unet(torch_pipe.unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    assert cn.config.addition_embed_type == "text_time"
    cn = perturb(cn, 21, scale=0.1)
    cn.save_pretrained(tmp_path / "cn")
    rng = np.random.default_rng(3)
    image = np.zeros((H, W, 3), np.uint8)
    image[12:36, 16:48] = 255
    image = np.where(rng.random((H, W, 1)) < 0.1, 255 - image, image).astype(np.uint8)
    ref_pipe = diffusers.StableDiffusionXLControlNetPipeline(**torch_pipe.components, controlnet=cn)
    with torch.no_grad():
        theirs = ref_pipe(PROMPT, negative_prompt="blurry", image=Image.fromarray(image), num_inference_steps=STEPS,
                          guidance_scale=6.0, height=H, width=W, controlnet_conditioning_scale=0.7,
                          latents=torch.from_numpy(NOISE.transpose(0, 3, 1, 2).copy()), output_type="np").images
    unit = ControlNetUnit(model=tmp_path / "cn", image=image, scale=0.7)
    ours, info = _ours(pipe, _sigmas(torch_pipe), PROMPT, controlnets=[unit])
    assert np.abs(ours - theirs).max() <= 2 / 255 + 1e-6, np.abs(ours - theirs).max() * 255
    assert "ControlNet 0" in info
    plain = _theirs(torch_pipe, PROMPT)
    assert np.abs(plain - theirs).max() > 4 / 255  # the ControlNet changes the image: the check has teeth
