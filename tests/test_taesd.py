"""TAESD decoder: parity with diffusers' AutoencoderTiny decoder on random weights, both file layouts."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny
from safetensors.numpy import save_file

from sdjax.errors import CheckpointError
from sdjax.weights.taesd import load_taesd, to_original

# diffusers' DecoderTiny only works with equal channels in every stage
TINY = dict(decoder_block_out_channels=(8, 8, 8), num_decoder_blocks=(1, 2, 1), encoder_block_out_channels=(8, 8, 8),
            num_encoder_blocks=(1, 1, 1))


def _reference(config: dict, seed: int) -> AutoencoderTiny:
    torch.manual_seed(seed)
    model = AutoencoderTiny(**config).eval()
    with torch.no_grad():  # default init leaves the output near a constant: spread the weights
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _decode_torch(model, latents_nhwc):
    with torch.no_grad():
        out = model.decode(torch.from_numpy(latents_nhwc).permute(0, 3, 1, 2)).sample
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("config", [TINY, {}], ids=["tiny", "default"])
def test_taesd_decoder_matches_diffusers(tmp_path, config):
    ref = _reference(config, 0)
    ref.save_pretrained(tmp_path / "taesd")
    latents = np.random.default_rng(0).normal(0, 2, (2, 8, 8, 4)).astype(np.float32)
    expected = _decode_torch(ref, latents)
    ours = np.asarray(load_taesd(tmp_path / "taesd")(latents))
    factor = 2 ** (len(ref.config.num_decoder_blocks) - 1)
    assert ours.shape == (2, 8 * factor, 8 * factor, 3)
    assert expected.std() > 0.05
    np.testing.assert_allclose(ours, expected, atol=2e-5 * np.abs(expected).max(), rtol=0)


def test_taesd_original_layout_and_errors(tmp_path):
    ref = _reference({}, 1)
    state = {k[len("decoder."):]: v.numpy() for k, v in ref.state_dict().items() if k.startswith("decoder.")}
    save_file(to_original(state), str(tmp_path / "taesd_decoder.safetensors"))
    assert "1.weight" in to_original(state) and "3.conv.0.weight" in to_original(state)
    latents = np.random.default_rng(1).normal(0, 2, (1, 4, 4, 4)).astype(np.float32)
    ours = np.asarray(load_taesd(tmp_path / "taesd_decoder.safetensors")(latents))
    expected = _decode_torch(ref, latents)
    np.testing.assert_allclose(ours, expected, atol=2e-5 * np.abs(expected).max(), rtol=0)
    with pytest.raises(CheckpointError, match="do not exist"):
        load_taesd(tmp_path / "missing.safetensors")
    save_file({"encoder.layers.0.weight": np.zeros((1, 1), np.float32)}, str(tmp_path / "enc.safetensors"))
    with pytest.raises(CheckpointError, match="encoder"):
        load_taesd(tmp_path / "enc.safetensors")
