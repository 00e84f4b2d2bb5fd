"""SDXL single files (SGM layout, as A1111 / ComfyUI have them): our writer's layout is what diffusers'
`from_single_file` reads back to the folder's exact weights, sdjax reads such a file (and an original
one with OpenCLIP's extra tensors) to the folder's exact weights, base vs refiner comes from the
tensors, and `convert` round-trips bit-exactly both ways."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file

from conftest import reference
from sdjax.errors import CheckpointError
from sdjax.weights import diffusers as diffusers_folder
from sdjax.weights import names, sgm
from sdjax.weights.files import read_component_weights
from sdjax.weights.single_file import (
    convert_diffusers_to_single_file, convert_single_file_to_diffusers, read_single_file, read_state,
)
from sdjax_tiny_sdxl import write_sdxl_folder

KINDS = {"sdxl-base": ("unet", "vae", "text_encoder", "text_encoder_2"),
         "sdxl-refiner": ("unet", "vae", "text_encoder_2")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_single_file")
    return {name: write_sdxl_folder(root / name, name, seed=3 + i) for i, name in enumerate(KINDS)}


def _folder_weights(folder: Path, kinds) -> dict:
    out = {}
    for kind in kinds:
        rename = {"unet": names.unet, "vae": names.vae}.get(kind, names.clip_text)
        flat, _ = read_component_weights(folder / kind)
        out[kind] = {k: np.asarray(v) for k, v in rename(flat).items() if not names.is_ignored(k)}
    return out


def _states_equal(a, b):
    la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape, p
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


@pytest.mark.parametrize("name", list(KINDS))
def test_diffusers_from_single_file_reads_our_sgm_layout(folders, tmp_path, name):
    import diffusers

    folder = folders[name]
    path = convert_diffusers_to_single_file(folder, tmp_path / "xl.safetensors")
    state, _ = read_state(path)
    bigg = sgm.BIGG_PREFIX if name == "sdxl-base" else sgm.REFINER_BIGG_PREFIX
    assert bigg + "transformer.resblocks.1.attn.in_proj_weight" in state
    assert state[bigg + "text_projection"].shape == (48, 40)  # OpenCLIP: (width, projection)
    assert "model.diffusion_model.label_emb.0.2.weight" in state
    cls = diffusers.StableDiffusionXLPipeline if name == "sdxl-base" else diffusers.StableDiffusionXLImg2ImgPipeline
    pipe = cls.from_single_file(str(path), config=str(folder), local_files_only=True)
    expected = _folder_weights(folder, KINDS[name])
    for kind in KINDS[name]:
        got = {k.removeprefix("text_model."): v.numpy() for k, v in getattr(pipe, kind).state_dict().items()
               if not k.endswith("position_ids")}
        assert set(got) == set(expected[kind]), (kind, sorted(set(got) ^ set(expected[kind]))[:5])
        for k, v in expected[kind].items():
            np.testing.assert_array_equal(got[k], v, err_msg=f"{kind}.{k}")


def _original_layout(path: Path, dst: Path, name: str) -> Path:
    """Our file plus what real SGM files carry and SDXL does not use: OpenCLIP's logit_scale and
    attn_mask, CLIP-L's position_ids buffer."""
    sd = {k: np.asarray(v) for k, v in np_load_file(path).items()}
    bigg = sgm.BIGG_PREFIX if name == "sdxl-base" else sgm.REFINER_BIGG_PREFIX
    sd[bigg + "logit_scale"] = np.array(4.6, np.float32)
    sd[bigg + "attn_mask"] = np.triu(np.full((77, 77), -np.inf, np.float32), 1)
    if name == "sdxl-base":
        sd[sgm.CLIP_L_PREFIX + "text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    np_save_file(sd, str(dst))
    return dst


@pytest.mark.parametrize("name", list(KINDS))
def test_sdxl_single_file_loads_same_weights_as_folder(folders, tmp_path, name):
    import sdjax.pipeline as pipeline

    folder = folders[name]
    path = _original_layout(convert_diffusers_to_single_file(folder, tmp_path / "a.safetensors"),
                            tmp_path / "original.safetensors", name)
    single = pipeline.load_pipeline(path, "float32", config_dir=folder)
    ref = pipeline.load_pipeline(folder, "float32")
    assert single.family == ref.family == name.replace("-base", "")
    assert single.force_zeros_for_empty_prompt == ref.force_zeros_for_empty_prompt == (name == "sdxl-base")
    _states_equal(single.states(), ref.states())
    for tok in ("tokenizer", "tokenizer_2"):
        if getattr(ref, tok) is None:
            assert getattr(single, tok) is None
        else:
            assert getattr(single, tok)("a cat").input_ids == getattr(ref, tok)("a cat").input_ids


def test_shipped_sdxl_configs_and_tokenizers(folders, tmp_path):
    """Without config_dir the shipped SDXL configs are used (the real sizes: a tiny file does not fit,
    and the error says what to pass); the shipped tokenizers are SDXL's (bigG pads with '!')."""
    from transformers import CLIPTokenizer

    from sdjax.weights.single_file import load_tokenizer, template_configs

    path = convert_diffusers_to_single_file(folders["sdxl-base"], tmp_path / "xl.safetensors")
    with pytest.raises(CheckpointError, match="config_dir"):
        read_single_file(path)
    base, refiner = template_configs("sdxl", "epsilon"), template_configs("sdxl-refiner", "epsilon")
    assert base["unet"]["cross_attention_dim"] == 2048 and base["text_encoder_2"]["num_hidden_layers"] == 32
    assert refiner["unet"]["projection_class_embeddings_input_dim"] == 2560 and "text_encoder" not in refiner
    ckpt = read_single_file(path, config_dir=folders["sdxl-base"])
    ckpt.tokenizer_dir = ckpt.tokenizer_2_dir = None
    text = ["a photo of an astronaut riding a horse, (masterpiece)"]
    for tok in ("tokenizer", "tokenizer_2"):
        real = CLIPTokenizer.from_pretrained(str(reference("sdxl-base") / tok))
        shipped = load_tokenizer(ckpt, tok)
        kw = dict(padding="max_length", max_length=77)
        assert shipped(text, **kw).input_ids == real(text, **kw).input_ids
        assert shipped.pad_token_id == real.pad_token_id
    assert load_tokenizer(ckpt, "tokenizer_2").pad_token == "!"


def test_sdxl_convert_round_trips_both_ways(folders, tmp_path):
    for name in KINDS:
        folder = folders[name]
        a = convert_diffusers_to_single_file(folder, tmp_path / f"{name}_a.safetensors")
        out = convert_single_file_to_diffusers(a, tmp_path / f"{name}_dir", config_dir=folder)
        b = convert_diffusers_to_single_file(out, tmp_path / f"{name}_b.safetensors")
        ta, tb = np_load_file(a), np_load_file(b)
        assert set(ta) == set(tb)
        for k in ta:
            assert ta[k].dtype == tb[k].dtype
            np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)
        exp, got = _folder_weights(folder, KINDS[name]), _folder_weights(out, KINDS[name])
        for kind in exp:
            assert set(exp[kind]) == set(got[kind]), kind
            for k in exp[kind]:
                np.testing.assert_array_equal(exp[kind][k], got[kind][k])
        index = diffusers_folder.read_model_index(out)
        assert diffusers_folder.model_family(index) == name.replace("-base", "")
        # transformers reads the written text_encoder_2 (v4 names, text_projection outside text_model.)
        import transformers
        te2 = transformers.CLIPTextModelWithProjection.from_pretrained(out / "text_encoder_2")
        np.testing.assert_array_equal(te2.text_projection.weight.detach().numpy(),
                                      exp["text_encoder_2"]["text_projection.weight"])


def test_sdxl_convert_cli(folders, tmp_path):
    folder = folders["sdxl-refiner"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "sdjax.cli", "convert", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, env=env, timeout=300)
    r = run(folder, tmp_path / "r.safetensors")
    assert r.returncode == 0, r.stderr
    r = run(tmp_path / "r.safetensors", tmp_path / "r_dir", "--config-dir", folder)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r_dir" / "model_index.json").read_text())["text_encoder"] == [None, None]


def test_sdxl_detection_from_tensors(folders, tmp_path):
    base = read_state(convert_diffusers_to_single_file(folders["sdxl-base"], tmp_path / "b.safetensors"))[0]
    refiner = read_state(convert_diffusers_to_single_file(folders["sdxl-refiner"], tmp_path / "r.safetensors"))[0]
    assert sgm.detect_family(base)["family"] == "sdxl" and sgm.detect_family(base)["context_dim"] == 80
    assert sgm.detect_family(refiner)["family"] == "sdxl-refiner"
    assert sgm.detect_family(refiner)["add_embedding_in"] == 40 + 5 * 8
    inpaint = dict(base)
    w = np.asarray(base["model.diffusion_model.input_blocks.0.0.weight"])
    inpaint["model.diffusion_model.input_blocks.0.0.weight"] = np.concatenate([w, w, w[:, :1]], axis=1)
    assert sgm.detect_family(inpaint)["family"] == "sdxl-inpainting"
    no_bigg = {k: v for k, v in base.items() if not k.startswith(sgm.BIGG_PREFIX)}
    with pytest.raises(CheckpointError, match="unknown set of text encoders"):
        sgm.detect_family(no_bigg)
    narrow = {k: v for k, v in base.items() if not k.startswith(sgm.CLIP_L_PREFIX)}
    narrow.update({sgm.CLIP_L_PREFIX + "text_model.embeddings.token_embedding.weight": np.zeros((10, 16), np.float32)})
    with pytest.raises(CheckpointError, match="cross-attention is 80 wide"):
        sgm.detect_family(narrow)
    no_label = {k: v for k, v in base.items() if "label_emb" not in k}
    with pytest.raises(CheckpointError, match="label_emb"):
        sgm.detect_family(no_label)


@pytest.mark.xdist_group("full_size")  # one full-size model at a time: 24 GiB holds one, not two
@pytest.mark.slow
@pytest.mark.parametrize("ref_name", ["sdxl-base", "sdxl-refiner"])
def test_full_size_sdxl_unet_names_match_diffusers_converter(ref_name):
    """Every parameter name of the real SDXL (refiner) UNet survives diffusers -> our SGM names ->
    diffusers' own converter unchanged (names only: values are 1-element stand-ins)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from sdjax.models.unet import UNet2DConditionModel, UNetConfig
    from sdjax.weights import ldm
    from sdjax.weights.diffusers import abstract_model
    from sdjax.weights.mapping import torch_name
    from flax import nnx

    raw = json.loads((reference(ref_name) / "unet" / "config.json").read_text())
    abstract = abstract_model(UNet2DConditionModel, UNetConfig.from_dict(raw))
    flat = {torch_name(p): np.zeros((1,), np.float32) for p, _ in nnx.to_flat_state(nnx.state(abstract))}
    ours = {ldm.UNET_PREFIX + k: v for k, v in ldm.unet_to_ldm(flat, raw).items()}
    # the upsampler of an up level with attention comes after it (base), else after the resnet (refiner)
    assert ldm.UNET_PREFIX + f"output_blocks.2.{2 if ref_name == 'sdxl-base' else 1}.conv.weight" in ours
    theirs = convert_ldm_unet_checkpoint(ours, raw)
    assert set(theirs) == set(flat), sorted(set(theirs) ^ set(flat))[:5]
