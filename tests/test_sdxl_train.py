"""SDXL training with the same trainer: time ids come from each example's original size and crop,
a few steps change the UNet, the exported diffusers folder is what diffusers loads (the trained
weights exactly), and an exported kohya LoRA fused by diffusers gives the trained weights."""

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from sdjax.data.datasets import CaptionLoader, ImageCaptionFolder
from sdjax.errors import ConfigError
from sdjax.train.config import TrainConfig
from sdjax.train.trainer import Trainer
from sdjax.weights.mapping import export_state
from sdjax_tiny_sdxl import write_sdxl_folder

RES = 16  # the tiny VAE of tests/sdjax_tiny_sdxl.py has two levels: 16 px -> 8x8 latents


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_sdxl_folder(tmp_path_factory.mktemp("sdxl_train") / "base", "sdxl-base", seed=2, vae_levels=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl_data")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 24), (24, 32), (16, 16)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a picture number {i}")
    return folder


def _cfg(model, data, out, **kw):
    base = dict(model=str(model), data=str(data), output_dir=str(out), resolution=RES, batch_size=1, max_steps=2,
                learning_rate=1e-2, checkpoint_every=100, log_every=1, caption_dropout=0.0, weight_decay=0.0)
    return TrainConfig(**{**base, **kw})


def test_time_ids_come_from_original_size_and_crop(model, data, tmp_path):
    ds = ImageCaptionFolder(data, RES)
    # 40x24 resized to 27x16 (shorter side 16), center crop left (27 - 16) // 2 = 5: diffusers' rule
    assert ds.item_with_crop(0)[2] == (24, 40, 0, 5)
    assert ds.item_with_crop(1)[2] == (32, 24, 2, 0)  # 24x32 -> 16x21, top (21 - 16) // 2
    trainer = Trainer(_cfg(model, data, tmp_path / "run", batch_size=3), log=lambda m: None)
    batch = trainer.batch(0)
    order = CaptionLoader(ds, 3, seed=0).indices(0)[0]
    expected = {0: [24, 40, 0, 5, RES, RES], 1: [32, 24, 2, 0, RES, RES], 2: [16, 16, 0, 0, RES, RES]}
    np.testing.assert_array_equal(np.asarray(batch["time_ids"])[0], [expected[int(i)] for i in order])
    assert batch["input_ids"].shape == (1, 3, 2, 77)


@pytest.mark.slow  # ~100 s on a shared 2-core CPU (compiles the SDXL train step)
def test_sdxl_finetune_exports_a_folder_diffusers_loads(model, data, tmp_path):
    import diffusers

    trainer = Trainer(_cfg(model, data, tmp_path / "run"), log=lambda m: None)
    records = trainer.run(progress=False)
    assert len(records) == 2 and all(np.isfinite(r["loss"]) for r in records)
    out = trainer.export(tmp_path / "model")
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(out))
    ours = export_state(nnx.merge(trainer.pipe.unet.graphdef, trainer.trained_states()["unet"]))
    theirs = {k: v.detach().numpy() for k, v in pipe.unet.state_dict().items()}
    before = export_state(trainer.pipe.unet.module())
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        np.testing.assert_array_equal(ours[k], v, err_msg=k)
    assert sum(not np.array_equal(before[k], ours[k]) for k in ours) > len(ours) // 2  # it trained
    te2 = {k: v.detach().numpy() for k, v in pipe.text_encoder_2.state_dict().items()}
    np.testing.assert_array_equal(te2["text_projection.weight"],
                                  export_state(trainer.pipe.text_encoder_2.module())["text_projection.weight"])


@pytest.mark.slow  # ~60 s on a shared 2-core CPU
def test_sdxl_lora_training_exports_a_kohya_file_diffusers_fuses(model, data, tmp_path):
    import diffusers

    trainer = Trainer(_cfg(model, data, tmp_path / "run", lora_rank=4, lora_alpha=2.0,
                           lora_targets=("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj")), log=lambda m: None)
    trainer.run(progress=False)
    path = trainer.export(tmp_path / "xl_lora.safetensors")
    from safetensors.numpy import load_file
    keys = list(load_file(path))
    # as sd-scripts writes SDXL LoRAs: UNet modules under their SGM names
    assert any(k.startswith("lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_q.") for k in keys)
    assert not any("down_blocks" in k or "up_blocks" in k for k in keys)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(model))
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    pipe.fuse_lora(components=["unet"], lora_scale=1.0)
    pipe.unload_lora_weights()
    ours = export_state(nnx.merge(trainer.pipe.unet.graphdef, trainer.trained_states()["unet"]))
    before = export_state(trainer.pipe.unet.module())
    changed = 0
    for k, v in pipe.unet.state_dict().items():
        np.testing.assert_allclose(ours[k], v.detach().numpy(), atol=2e-6, rtol=0, err_msg=k)
        changed += not np.array_equal(before[k], ours[k])
    assert changed > 0


def test_sdxl_training_refuses_text_encoder_training(model, data, tmp_path):
    with pytest.raises(ConfigError, match="text encoders frozen"):
        Trainer(_cfg(model, data, tmp_path / "run", train_text_encoder=True), log=lambda m: None)
