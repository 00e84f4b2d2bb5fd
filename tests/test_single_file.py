"""Single-file checkpoints: our LDM layout must be what diffusers' `from_single_file` reads, sdjax's
single-file loader must give exactly the weights of the diffusers-folder load, conversion must
round-trip bit-exactly, and unsafe or unsupported files must be refused."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file

from conftest import reference
from sdjax.errors import CheckpointError, UnsafePickleError
from sdjax.weights import diffusers as diffusers_folder
from sdjax.weights import ldm
from sdjax.weights.files import read_component_weights
from sdjax.weights.diffusers import abstract_model
from sdjax.weights.single_file import (
    convert_diffusers_to_single_file, convert_single_file_to_diffusers, load_single_file_models,
    load_tokenizer, read_single_file, read_state, template_configs,
)
from sdjax_tiny import perturb, tiny_configs


def write_tiny_folder(folder: Path, ref_name: str, seed: int = 0, up_blocks_3=False) -> Path:
    """A random tiny diffusers folder with configs derived from a reference checkpoint."""
    import diffusers
    import transformers

    ref = reference(ref_name)
    cfgs = tiny_configs(ref, vae_levels=2)
    if up_blocks_3:  # three levels, two resnets per level: exercises the block numbering
        cfgs["unet"].update(block_out_channels=[16, 32, 32], layers_per_block=2,
                            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                            attention_head_dim=[2, 2, 4] if isinstance(cfgs["unet"]["attention_head_dim"], list)
                            else 4)
        cfgs["vae"].update(block_out_channels=[8, 16, 16], down_block_types=["DownEncoderBlock2D"] * 3,
                           up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=2)
    torch.manual_seed(seed)
    te_cfg = {k: v for k, v in cfgs["text_encoder"].items() if not k.startswith("_")}
    models = {"text_encoder": perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(**te_cfg)), seed),
              "unet": perturb(diffusers.UNet2DConditionModel.from_config(cfgs["unet"]), seed + 1),
              "vae": perturb(diffusers.AutoencoderKL.from_config(cfgs["vae"]), seed + 2)}
    folder.mkdir(parents=True)
    index = json.loads((ref / "model_index.json").read_text())
    index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (folder / "model_index.json").write_text(json.dumps(index))
    shutil.copytree(ref / "tokenizer", folder / "tokenizer")
    shutil.copytree(ref / "scheduler", folder / "scheduler")
    for name, m in models.items():
        m.save_pretrained(folder / name)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("single_file")
    return {name: write_tiny_folder(root / name, name, seed=i)
            for i, name in enumerate(("sd15", "sd21", "sd2-inpainting"))}


def _folder_weights(folder: Path) -> dict:
    """diffusers-folder tensors as torch layout numpy, with sdjax names (CLIP without text_model.)."""
    from sdjax.weights import names
    out = {}
    for kind, rename in (("unet", names.unet), ("vae", names.vae), ("text_encoder", names.clip_text)):
        flat, _ = read_component_weights(folder / kind)
        out[kind] = {k: np.asarray(v) for k, v in rename(flat).items()}
    return out


def _states_equal(a, b):
    la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape, p
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


@pytest.mark.parametrize("name", ["sd15", "sd21", "sd2-inpainting"])
def test_diffusers_from_single_file_reads_our_ldm_layout(folders, tmp_path, name):
    import diffusers

    folder = folders[name]
    path = convert_diffusers_to_single_file(folder, tmp_path / "model.safetensors")
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, safety_checker=None)
    expected = _folder_weights(folder)
    for kind in ("unet", "vae", "text_encoder"):
        got = {k.removeprefix("text_model."): v.numpy() for k, v in getattr(pipe, kind).state_dict().items()
               if not k.endswith("position_ids")}
        assert set(got) == set(expected[kind]), kind
        for k, v in expected[kind].items():
            np.testing.assert_array_equal(got[k], v, err_msg=f"{kind}.{k}")


@pytest.mark.parametrize("name,suffix", [("sd15", ".safetensors"), ("sd21", ".ckpt"), ("sd2-inpainting", ".ckpt")])
def test_single_file_loads_same_weights_as_folder(folders, tmp_path, name, suffix):
    folder = folders[name]
    st = convert_diffusers_to_single_file(folder, tmp_path / "model.safetensors")
    path = st
    if suffix == ".ckpt":
        path = tmp_path / "model.ckpt"
        sd = {k: torch.from_numpy(np.asarray(v).copy()) for k, v in np_load_file(st).items()}
        torch.save({"state_dict": sd, "global_step": 12, "epoch": 1}, path)
    loaded = load_single_file_models(path, config_dir=folder)
    for kind in ("unet", "vae", "text_encoder"):
        ref_model, _ = diffusers_folder.load_model(kind, folder / kind)
        from flax import nnx
        _states_equal(nnx.state(loaded[kind][0]), nnx.state(ref_model))
    ckpt = loaded["checkpoint"]
    assert ckpt.family == {"sd15": "sd1", "sd21": "sd2-v", "sd2-inpainting": "sd2-inpainting"}[name]
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert loaded["scheduler_config"]["prediction_type"] == sched.get("prediction_type", "epsilon")


def test_convert_round_trips_bit_exactly(folders, tmp_path):
    for name in ("sd15", "sd21"):
        folder = folders[name]
        a = convert_diffusers_to_single_file(folder, tmp_path / f"{name}_a.safetensors")
        out = convert_single_file_to_diffusers(a, tmp_path / f"{name}_dir", config_dir=folder)
        b = convert_diffusers_to_single_file(out, tmp_path / f"{name}_b.safetensors")
        ta, tb = np_load_file(a), np_load_file(b)
        assert set(ta) == set(tb)
        for k in ta:
            assert ta[k].dtype == tb[k].dtype
            np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)
        exp, got = _folder_weights(folder), _folder_weights(out)
        for kind in exp:
            assert set(exp[kind]) == set(got[kind])
            for k in exp[kind]:
                np.testing.assert_array_equal(exp[kind][k], got[kind][k])
        # the converted folder is a complete diffusers folder sdjax reads
        diffusers_folder.read_model_index(out)


def test_ema_preferred_and_sd2_extra_layer_dropped(folders, tmp_path):
    folder = folders["sd21"]
    st = convert_diffusers_to_single_file(folder, tmp_path / "base.safetensors")
    sd = {k: np.asarray(v) for k, v in np_load_file(st).items()}
    rng = np.random.default_rng(0)
    # An original SD2 file: one more OpenCLIP layer (SD2 uses the penultimate), text_projection, logit_scale.
    n = json.loads((folder / "text_encoder" / "config.json").read_text())["num_hidden_layers"]
    for k in [k for k in sd if k.startswith(f"cond_stage_model.model.transformer.resblocks.{n - 1}.")]:
        sd[k.replace(f"resblocks.{n - 1}.", f"resblocks.{n}.")] = rng.standard_normal(sd[k].shape).astype(np.float32)
    sd["cond_stage_model.model.text_projection"] = np.ones((32, 32), np.float32)
    sd["cond_stage_model.model.logit_scale"] = np.array(4.6, np.float32)
    ema = {"model_ema." + k[len("model."):].replace(".", ""): (v + 1).astype(v.dtype)
           for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    sd.update(ema)
    sd["model_ema.decay"] = np.array(0.999, np.float32)
    sd["alphas_cumprod"] = np.linspace(1, 0, 1000).astype(np.float32)
    path = tmp_path / "full.safetensors"
    np_save_file(sd, str(path))

    plain = read_single_file(st, config_dir=folder)
    with_ema = read_single_file(path, config_dir=folder)
    no_ema = read_single_file(path, config_dir=folder, prefer_ema=False)
    assert with_ema.used_ema and not no_ema.used_ema
    for k, v in plain.weights["unet"].items():
        np.testing.assert_array_equal(np.asarray(no_ema.weights["unet"][k]), np.asarray(v))
        np.testing.assert_array_equal(np.asarray(with_ema.weights["unet"][k]), np.asarray(v) + 1)
    assert set(with_ema.weights["text_encoder"]) == set(plain.weights["text_encoder"])
    for k, v in plain.weights["text_encoder"].items():
        np.testing.assert_array_equal(np.asarray(with_ema.weights["text_encoder"][k]), np.asarray(v))


def test_prediction_type_sources(folders, tmp_path):
    folder = folders["sd21"]
    path = convert_diffusers_to_single_file(folder, tmp_path / "m.safetensors")
    assert read_single_file(path, config_dir=folder).prediction_type == "v_prediction"  # from metadata
    assert read_single_file(path, prediction_type="epsilon", config_dir=folder).family == "sd2"
    sd = {k: np.asarray(v) for k, v in np_load_file(path).items()}
    bare = tmp_path / "bare.safetensors"
    np_save_file(sd, str(bare))  # no metadata: SD2 defaults to v, like diffusers
    assert read_single_file(bare, config_dir=folder).prediction_type == "v_prediction"
    bare.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: \"eps\"\n")
    ckpt = read_single_file(bare, config_dir=folder)
    assert (ckpt.prediction_type, ckpt.family) == ("epsilon", "sd2")
    assert template_configs("sd2", "epsilon")["unet"]["sample_size"] == 64 and ckpt.configs["scheduler"]["prediction_type"] == "epsilon"
    sd1 = convert_diffusers_to_single_file(folders["sd15"], tmp_path / "sd1.safetensors")
    sd1.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    assert read_single_file(sd1, config_dir=folders["sd15"]).prediction_type == "v_prediction"


def test_fp16_file_and_shipped_tokenizer(folders, tmp_path):
    folder = folders["sd15"]
    path = convert_diffusers_to_single_file(folder, tmp_path / "half.safetensors", dtype="float16")
    assert all(v.dtype == np.float16 for v in np_load_file(path).values())
    loaded = load_single_file_models(path, config_dir=folder, dtype="float32")
    from flax import nnx
    leaf = jax.tree.leaves(nnx.state(loaded["unet"][0]))[0]
    assert leaf.dtype == np.float32
    ref = reference("sd21")
    from transformers import CLIPTokenizer
    ckpt = read_single_file(convert_diffusers_to_single_file(folders["sd21"], tmp_path / "sd2.safetensors"),
                            config_dir=folders["sd21"])
    ckpt.tokenizer_dir = None  # use the shipped BPE files
    shipped, real = load_tokenizer(ckpt), CLIPTokenizer.from_pretrained(str(ref / "tokenizer"))
    text = ["a photo of an astronaut riding a horse, (masterpiece)"]
    kw = dict(padding="max_length", max_length=77)
    assert shipped(text, **kw).input_ids == real(text, **kw).input_ids
    assert shipped.pad_token_id == real.pad_token_id == 0


def test_template_mismatch_says_what_to_do(folders, tmp_path):
    path = convert_diffusers_to_single_file(folders["sd15"], tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match="config_dir"):
        read_single_file(path)


def test_incomplete_sdxl_refused(tmp_path):
    path = tmp_path / "xl.safetensors"
    np_save_file({"conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight":
                  np.zeros((77, 8), np.float32),
                  "model.diffusion_model.input_blocks.0.0.weight": np.zeros((8, 4, 3, 3), np.float32)}, str(path))
    # CLIP-L without OpenCLIP bigG: neither the SDXL base nor the refiner
    with pytest.raises(CheckpointError, match="unknown set of text encoders"):
        read_single_file(path)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


def test_malicious_ckpt_refused_and_nothing_runs(folders, tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3)},
                "payload": _Evil(str(marker))}, path)
    with pytest.raises(UnsafePickleError):
        read_single_file(path)
    with pytest.raises(UnsafePickleError):
        load_single_file_models(path)
    assert not marker.exists()


def test_ldm_tables_are_bijective():
    for ref_name in ("sd15", "sd21"):
        cfg = json.loads((reference(ref_name) / "unet" / "config.json").read_text())
        rows = ldm.unet_table(cfg)
        assert len({d for d, _, _ in rows}) == len({l for _, l, _ in rows}) == len(rows)
        # SD 1.x facts: 12 input blocks, 12 output blocks, upsampler after the attention.
        ldm_names = {l for _, l, _ in rows}
        assert "input_blocks.11.0" in ldm_names and "output_blocks.11.1" in ldm_names
        assert "output_blocks.2.1.conv" in ldm_names and "output_blocks.5.2.conv" in ldm_names
    vae = ldm.vae_table(json.loads((reference("sd15") / "vae" / "config.json").read_text()))
    assert len({l for _, l, _ in vae}) == len(vae)
    assert ("decoder.up_blocks.0.resnets.2", "decoder.up.3.block.2", ldm._VAE_RESNET) in vae


def test_three_level_unet_numbering(tmp_path):
    import diffusers

    folder = write_tiny_folder(tmp_path / "deep", "sd15", seed=7, up_blocks_3=True)
    path = convert_diffusers_to_single_file(folder, tmp_path / "deep.safetensors")
    state, _ = read_state(path)
    assert "model.diffusion_model.output_blocks.8.1.transformer_blocks.0.attn2.to_k.weight" in state
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, safety_checker=None)
    exp = _folder_weights(folder)["unet"]
    got = {k: v.numpy() for k, v in pipe.unet.state_dict().items()}
    assert set(got) == set(exp)
    for k in exp:
        np.testing.assert_array_equal(got[k], exp[k], err_msg=k)


def test_load_pipeline_accepts_a_single_file(folders, tmp_path):
    import sdjax.pipeline as pipeline

    folder = folders["sd21"]
    path = convert_diffusers_to_single_file(folder, tmp_path / "m.safetensors")
    single = pipeline.load_pipeline(path, "float32", config_dir=folder)
    ref = pipeline.load_pipeline(folder, "float32")
    for kind in ("unet", "vae", "text_encoder"):
        _states_equal(getattr(single, kind).state, getattr(ref, kind).state)
    assert single.scheduler_config["prediction_type"] == "v_prediction" and single.model_dir == path
    assert single.tokenizer("a cat").input_ids == ref.tokenizer("a cat").input_ids
    eps = pipeline.load_pipeline(path, "float32", config_dir=folder, prediction_type="epsilon")
    assert eps.scheduler_config["prediction_type"] == "epsilon"


@pytest.mark.xdist_group("full_size")  # one full-size model at a time: 24 GiB holds one, not two
@pytest.mark.slow
@pytest.mark.parametrize("ref_name", ["sd15", "sd21", "sd2-inpainting"])
def test_full_size_names_match_diffusers_converter(ref_name):
    """Every parameter name of the real-size UNet and VAE survives diffusers -> our LDM names ->
    diffusers' own LDM converter unchanged (names only: values are 1-element stand-ins)."""
    from flax import nnx
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from sdjax.models.unet import UNet2DConditionModel, UNetConfig
    from sdjax.models.vae import AutoencoderKL, VAEConfig
    from sdjax.weights.mapping import torch_name

    ref = reference(ref_name)
    for kind, cfg_cls, model_cls, to_ldm, prefix, convert in (
            ("unet", UNetConfig, UNet2DConditionModel, ldm.unet_to_ldm, ldm.UNET_PREFIX, convert_ldm_unet_checkpoint),
            ("vae", VAEConfig, AutoencoderKL, ldm.vae_to_ldm, ldm.VAE_PREFIX, convert_ldm_vae_checkpoint)):
        raw = json.loads((ref / kind / "config.json").read_text())
        cfg = cfg_cls.from_dict(raw)
        abstract = abstract_model(model_cls, cfg)
        names = {torch_name(p): np.zeros((1,), np.float32) for p, _ in nnx.to_flat_state(nnx.state(abstract))}
        ours = {prefix + k: v for k, v in to_ldm(names, raw).items()}
        theirs = convert(ours, raw)
        assert set(theirs) == set(names), (kind, sorted(set(theirs) ^ set(names))[:5])
        back = (ldm.unet_to_diffusers if kind == "unet" else ldm.vae_to_diffusers)(
            {k[len(prefix):]: v for k, v in ours.items()}, raw)
        assert set(back) == set(names)
