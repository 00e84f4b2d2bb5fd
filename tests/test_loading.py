"""Loading diffusers folders: random torch models saved by diffusers/transformers, loaded by
`sdjax.load_pipeline`, must reproduce the torch outputs; broken folders must say what is wrong."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file as torch_load_safetensors
from safetensors.torch import save_file as torch_save_safetensors

import sdjax
from conftest import reference
from sdjax.errors import CheckpointError, ConfigError, UnsafePickleError
from sdjax.weights.files import find_weights, read_safetensors, read_weight_file
from sdjax_tiny import perturb, tiny_configs

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


# ---------------------------------------------------------------------------------------------
# Tiny torch pipelines derived from the real reference configs


def _torch_models(ref_name: str, seed: int = 0):
    import diffusers
    import transformers

    cfgs = tiny_configs(reference(ref_name), vae_levels=2)
    torch.manual_seed(seed)
    te_cfg = {k: v for k, v in cfgs["text_encoder"].items() if not k.startswith("_")}
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(**te_cfg))
    unet = diffusers.UNet2DConditionModel.from_config(cfgs["unet"])
    vae = diffusers.AutoencoderKL.from_config(cfgs["vae"])
    return {"text_encoder": perturb(te, seed), "unet": perturb(unet, seed + 1),
            "vae": perturb(vae, seed + 2)}


def _write_folder(folder: Path, ref_name: str, models: dict, *, safe=True, te_v4=False,
                  max_shard_size=None, variant=None) -> Path:
    ref = reference(ref_name)
    folder.mkdir(parents=True)
    shutil.copy(ref / "model_index.json", folder / "model_index.json")  # lists safety_checker too
    shutil.copytree(ref / "tokenizer", folder / "tokenizer")
    shutil.copytree(ref / "scheduler", folder / "scheduler")
    kw = dict(safe_serialization=safe, variant=variant)
    if max_shard_size:
        kw["max_shard_size"] = max_shard_size
    for name in ("unet", "vae"):
        models[name].save_pretrained(folder / name, **kw)
    te_dir = folder / "text_encoder"
    models["text_encoder"].save_pretrained(te_dir, **kw)
    if te_v4 or not safe:
        # Real (transformers v4) files: `text_model.` prefix and the position_ids buffer; v5
        # writes neither and no longer writes .bin, so rewrite the saved state dict.
        sd = {}
        for f in sorted(te_dir.glob("model*.safetensors")):
            sd.update(torch_load_safetensors(f))
            f.unlink()
        for f in te_dir.glob("*.index*.json"):
            f.unlink()
        if te_v4:
            sd = {"text_model." + k: v for k, v in sd.items()}
            sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        suffix = f".{variant}" if variant else ""
        if safe:
            torch_save_safetensors(sd, te_dir / f"model{suffix}.safetensors")
        else:
            torch.save(sd, te_dir / f"pytorch_model{suffix}.bin")
    return folder


# ---------------------------------------------------------------------------------------------
# Parity


def _inputs(models, seed=0):
    rng = np.random.default_rng(seed)
    te_cfg = models["text_encoder"].config
    ids = rng.integers(0, te_cfg.vocab_size - 2, size=(2, 77))
    ids[:, 0] = 49406
    ids[0, 9:] = 49407  # eos then padding with eos, as SD 1.x tokenizers do
    ids[1, 40] = 49407
    latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    images = np.tanh(rng.standard_normal((2, 16, 16, 3))).astype(np.float32)
    timesteps = np.array([10, 731], np.int64)
    return ids, latents, images, timesteps


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _check_parity(pipe, models, tol=TOL):
    ids, latents, images, timesteps = _inputs(models)
    with torch.no_grad():
        te_out = models["text_encoder"](torch.from_numpy(ids), output_hidden_states=True)
        context = te_out.last_hidden_state
        unet_out = models["unet"](_nchw(latents), torch.from_numpy(timesteps), context).sample
        dist = models["vae"].encode(_nchw(images)).latent_dist
        decoded = models["vae"].decode(_nchw(latents)).sample

    got_context = pipe.text_encoder(ids)
    assert got_context.shape == (2, 77, 32)
    np.testing.assert_allclose(np.asarray(got_context), context.numpy(), atol=tol, rtol=tol)
    full = pipe.text_encoder(ids, output_hidden_states=True)
    assert len(full.hidden_states) == len(te_out.hidden_states)
    np.testing.assert_allclose(np.asarray(full.hidden_states[-2]), te_out.hidden_states[-2].numpy(),
                               atol=tol, rtol=tol)
    np.testing.assert_allclose(np.asarray(full.pooled_output), te_out.pooler_output.numpy(), atol=tol, rtol=tol)

    got = pipe.unet(jnp.asarray(latents), jnp.asarray(timesteps), jnp.asarray(context.numpy()))
    np.testing.assert_allclose(np.asarray(got), _nhwc(unet_out), atol=tol, rtol=tol)

    mean, logvar = pipe.vae.encode(jnp.asarray(images))
    np.testing.assert_allclose(np.asarray(mean), _nhwc(dist.mean), atol=tol, rtol=tol)
    np.testing.assert_allclose(np.asarray(logvar), _nhwc(dist.logvar), atol=tol, rtol=tol)
    np.testing.assert_allclose(np.asarray(pipe.vae.decode(jnp.asarray(latents))), _nhwc(decoded),
                               atol=tol, rtol=tol)


@pytest.fixture(scope="module")
def sd15_models():
    return _torch_models("sd15")


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory, sd15_models):
    return _write_folder(tmp_path_factory.mktemp("sd15") / "tiny", "sd15", sd15_models)


def test_safetensors_folder_matches_torch(sd15_folder, sd15_models):
    pipe = sdjax.load_pipeline(sd15_folder, dtype="float32")
    assert pipe.model_dir == sd15_folder and pipe.dtype == jnp.float32
    assert pipe.scheduler_config == json.loads((sd15_folder / "scheduler" / "scheduler_config.json").read_text())
    assert pipe.tokenizer("a cat", padding="max_length", max_length=77).input_ids[:3] == [49406, 320, 2368]
    assert pipe.vae.scaling_factor == pytest.approx(0.18215)
    _check_parity(pipe, sd15_models)


def test_bin_folder_matches_torch(tmp_path, sd15_models):
    folder = _write_folder(tmp_path / "bin", "sd15", sd15_models, safe=False)
    assert (folder / "unet" / "diffusion_pytorch_model.bin").is_file()
    assert (folder / "text_encoder" / "pytorch_model.bin").is_file()
    pipe = sdjax.load_pipeline(folder)
    _check_parity(pipe, sd15_models)


def test_sd21_sharded_v4_text_encoder_matches_torch(tmp_path):
    models = _torch_models("sd21", seed=3)
    folder = _write_folder(tmp_path / "sd21", "sd21", models, te_v4=True, max_shard_size="200KB")
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert any(k.startswith("text_model.") for k in read_safetensors(folder / "text_encoder" / "model.safetensors"))
    pipe = sdjax.load_pipeline(folder)
    assert pipe.scheduler_config["prediction_type"] == "v_prediction"
    _check_parity(pipe, models)


def test_fp16_variant(tmp_path, sd15_models):
    half = {k: m.half() for k, m in _torch_models("sd15").items()}
    folder = _write_folder(tmp_path / "fp16", "sd15", half, variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    pipe = sdjax.load_pipeline(folder, variant="fp16")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(pipe.unet.state))
    _check_parity(pipe, {k: m.float() for k, m in half.items()})
    # The only variant present is used without being asked; bfloat16 runs and stays close.
    pipe16 = sdjax.load_pipeline(folder, dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(pipe16.states()))
    # bfloat16 keeps 8 significant bits: each rounding is off by at most 2^-9 relative, and
    # they compound through the layers: relative L2 measured 2.2, 4.5 and 5.4 units of 2^-8 for
    # the text encoder, the UNet and the VAE decoder (deeper, their inputs rounded too). The
    # bounds are about twice that; a wrong weight, a dropped norm or a float16 overflow is off
    # by O(1), where the old atol=0.1 let a 10% error through.
    ids, latents, _, timesteps = _inputs(half)
    latents, timesteps = jnp.asarray(latents), jnp.asarray(timesteps)
    bound = {"text_encoder": 4 * 2.0**-8, "unet": 9 * 2.0**-8, "vae": 11 * 2.0**-8}
    ctx, ctx16 = pipe.text_encoder(ids), pipe16.text_encoder(ids)
    pairs = {
        "text_encoder": (ctx16, ctx),
        "unet": (pipe16.unet(latents.astype(jnp.bfloat16), timesteps, ctx16), pipe.unet(latents, timesteps, ctx)),
        "vae": (pipe16.vae.decode(latents.astype(jnp.bfloat16)), pipe.vae.decode(latents)),
    }
    for name, (low, full) in pairs.items():
        low, full = np.asarray(low, np.float64), np.asarray(full, np.float64)
        rel = np.linalg.norm(low - full) / np.linalg.norm(full)
        assert rel < bound[name], (name, rel)


def test_component_is_a_pure_function_of_its_state(sd15_folder, sd15_models):
    pipe = sdjax.load_pipeline(sd15_folder)
    ids, latents, _, timesteps = _inputs(sd15_models)  # the parity test's shapes: compiled code is reused
    latents, timesteps = jnp.asarray(latents), jnp.asarray(timesteps)
    out = pipe.vae.decode(latents)
    zeroed = jax.tree.map(jnp.zeros_like, pipe.vae.state)
    np.testing.assert_array_equal(np.asarray(pipe.vae.apply_decode(pipe.vae.state, latents)), np.asarray(out))
    assert not np.allclose(np.asarray(pipe.vae.apply_decode(zeroed, latents)), np.asarray(out))
    ctx = pipe.text_encoder(ids)
    direct = pipe.unet.apply(pipe.unet.state, latents, timesteps, ctx)
    np.testing.assert_array_equal(np.asarray(direct), np.asarray(pipe.unet(latents, timesteps, ctx)))
    module = pipe.unet.module()
    np.testing.assert_array_equal(np.asarray(module.conv_in.kernel[...]),
                                  np.asarray(pipe.unet.state["conv_in"]["kernel"][...]))


def test_sharding_places_every_parameter(sd15_folder):
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    seen = []

    def sharding(path, abstract):
        seen.append(path)
        return replicated

    pipe = sdjax.load_pipeline(sd15_folder, dtype="bfloat16", sharding=sharding)
    leaves = jax.tree.leaves(pipe.states())
    assert len(seen) == len(leaves) > 100
    assert all(x.sharding == replicated and x.dtype == jnp.bfloat16 for x in leaves)


# ---------------------------------------------------------------------------------------------
# Errors name what is wrong


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_not_a_diffusers_folder(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model_index\.json.*unet/.*vae/.*text_encoder/.*tokenizer/"):
        sdjax.load_pipeline(tmp_path)
    with pytest.raises(CheckpointError, match=r"weights\.safetensors.*truncated"):
        sdjax.load_pipeline(tmp_path / "weights.safetensors")  # a file: the single-file loader says why
    with pytest.raises(CheckpointError, match="does not exist"):
        sdjax.load_pipeline(tmp_path / "nowhere")


def test_missing_component_folder(tmp_path, sd15_folder):
    folder = _copy(sd15_folder, tmp_path / "f")
    shutil.rmtree(folder / "vae")
    with pytest.raises(CheckpointError, match=r"'vae'.*vae/ is missing"):
        sdjax.load_pipeline(folder)


def test_truncated_safetensors_names_file(tmp_path, sd15_folder):
    folder = _copy(sd15_folder, tmp_path / "f")
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"unet/diffusion_pytorch_model\.safetensors.*truncated"):
        sdjax.load_pipeline(folder)
    path.write_bytes(data[:100])  # cut inside the header
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors.*truncated"):
        sdjax.load_pipeline(folder)


def _rewrite(path: Path, edit):
    sd = torch_load_safetensors(path)
    edit(sd)
    torch_save_safetensors(sd, path)


def test_renamed_and_misshaped_tensors_are_named(tmp_path, sd15_folder):
    folder = _copy(sd15_folder, tmp_path / "f")
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    _rewrite(vae_file, lambda sd: sd.__setitem__("decoder.conv_in.weigth", sd.pop("decoder.conv_in.weight")))
    with pytest.raises(CheckpointError, match=r"vae.*missing tensors: decoder\.conv_in\.weight.*"
                                              r"unexpected tensors: decoder\.conv_in\.weigth"):
        sdjax.load_pipeline(folder)
    _rewrite(vae_file, lambda sd: sd.__setitem__("decoder.conv_in.weight", sd.pop("decoder.conv_in.weigth")[:, :2].contiguous()))
    with pytest.raises(CheckpointError, match=r"decoder\.conv_in\.weight: file has \(32, 2, 3, 3\), "
                                              r"model expects \(32, 4, 3, 3\)"):
        sdjax.load_pipeline(folder)


def test_unknown_config_value_names_file_and_key(tmp_path, sd15_folder):
    folder = _copy(sd15_folder, tmp_path / "f")
    cfg_path = folder / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["class_embed_type"] = "timestep"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"unet/config\.json.*class_embed_type.*timestep"):
        sdjax.load_pipeline(folder)


def test_missing_shard_names_it(tmp_path, sd15_models):
    folder = _write_folder(tmp_path / "sh", "sd15", sd15_models, max_shard_size="200KB")
    shard = sorted((folder / "vae").glob("*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"shard {shard.name} is missing"):
        sdjax.load_pipeline(folder)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bin_that_runs_code_is_refused(tmp_path, sd15_models):
    folder = _write_folder(tmp_path / "evil", "sd15", sd15_models, safe=False)
    path = folder / "unet" / "diffusion_pytorch_model.bin"
    sd = dict(sd15_models["unet"].state_dict())
    marker = tmp_path / "marker"
    sd["conv_in.weight"] = _Payload(marker)
    torch.save(sd, path)
    with pytest.raises(UnsafePickleError, match=r"unet/diffusion_pytorch_model\.bin.*system"):
        sdjax.load_pipeline(folder)
    assert not marker.exists()


def test_weight_file_selection(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    torch_save_safetensors({"w": torch.ones(2, dtype=torch.bfloat16)}, d / "model.fp16.safetensors")
    assert find_weights(d).name == "model.fp16.safetensors"  # the only variant present
    torch_save_safetensors({"w": torch.ones(2)}, d / "diffusion_pytorch_model.safetensors")
    torch.save({"w": torch.zeros(2)}, d / "diffusion_pytorch_model.bin")
    assert find_weights(d).name == "diffusion_pytorch_model.safetensors"  # safetensors over .bin
    assert find_weights(d, "fp16").name == "model.fp16.safetensors"
    with pytest.raises(CheckpointError, match=r"no weight file.*diffusion_pytorch_model\.bf16\.safetensors"):
        find_weights(d, "bf16")
    w = read_weight_file(d / "model.fp16.safetensors")["w"]
    assert str(w.dtype) == "bfloat16" and np.asarray(w).astype(np.float32).tolist() == [1.0, 1.0]


# ---------------------------------------------------------------------------------------------
# torch is not needed


def test_loads_without_torch(tmp_path, sd15_models, sd15_folder):
    bin_folder = _write_folder(tmp_path / "bin", "sd15", sd15_models, safe=False)
    ids = _inputs(sd15_models)[0][:1]
    with torch.no_grad():
        want = sd15_models["text_encoder"](torch.from_numpy(ids)).last_hidden_state.numpy()
    np.save(tmp_path / "ids.npy", ids)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import numpy as np
        import sdjax
        ids = np.load({str(tmp_path / "ids.npy")!r})
        for folder in ({str(sd15_folder)!r}, {str(bin_folder)!r}):
            pipe = sdjax.load_pipeline(folder)
            out = np.asarray(pipe.text_encoder(ids))
            np.save(folder + "/out.npy", out)
            decoded = pipe.vae.decode(np.zeros((1, 4, 4, 4), np.float32))
            assert decoded.shape == (1, 8, 8, 3), decoded.shape
        assert sys.modules["torch"] is None
        print("OK")
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
    for folder in (sd15_folder, bin_folder):
        np.testing.assert_allclose(np.load(folder / "out.npy"), want, atol=TOL, rtol=TOL)


def test_bench_load_quick():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_load.py"), "--quick"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratio" in proc.stdout
