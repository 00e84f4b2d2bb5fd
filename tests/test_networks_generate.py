"""LoRAs and textual-inversion embeddings in `Pipeline.generate` (sdjax.pipeline.networks).

A `<lora:name:m>` tag must change the output exactly as merging the LoRA by hand does, leave
the pipeline's weights untouched, not recompile when the multiplier changes, and put A1111's
`Lora hashes` in the infotext. An embedding name in a prompt must put the embedding's vectors
into the text encoder's input (checked against transformers' CLIPTextModel given those rows).
"""

import hashlib

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import sdjax
from sdjax import sampling
from sdjax.pipeline import core as generation
from sdjax.errors import CheckpointError
from sdjax.pipeline.generator import discrete_model, encode_prompts
from sdjax.metadata import parse_hashes, parse_infotext
from sdjax.pipeline.networks import apply_networks
from sdjax.weights import lora as lora_lib
from sdjax_tiny import build_diffusers_pipeline

KW = dict(steps=3, sampler="euler", width=64, height=64, seed=4, cfg_scale=5.0)


def _lora_tensors(seed=0, extra=False):
    rng = np.random.default_rng(seed)
    t = {}
    for key, (out, inp) in {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32),
                            "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v": (32, 32),
                            "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (32, 32)}.items():
        t[f"{key}.lora_down.weight"] = rng.standard_normal((4, inp)).astype(np.float32) * 0.5
        t[f"{key}.lora_up.weight"] = rng.standard_normal((out, 4)).astype(np.float32) * 0.5
        t[f"{key}.alpha"] = np.array(2.0, np.float32)
    if extra:
        t["lora_unet_no_such_module.lora_down.weight"] = np.ones((4, 8), np.float32)
        t["lora_unet_no_such_module.lora_up.weight"] = np.ones((8, 4), np.float32)
    return t


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("nets")
    torch_pipe = build_diffusers_pipeline("sd15", seed=7)
    torch_pipe.save_pretrained(root / "sd")
    (root / "loras").mkdir()
    save_file(_lora_tensors(), str(root / "loras" / "style.safetensors"), metadata={"ss_network_dim": "4"})
    save_file(_lora_tensors(1, extra=True), str(root / "loras" / "broken.safetensors"))
    (root / "emb").mkdir()
    vectors = np.random.default_rng(3).standard_normal((2, 32)).astype(np.float32)
    save_file({"emb_params": vectors}, str(root / "emb" / "shinytok.safetensors"))
    (root / "emb" / "wrongwidth.safetensors").write_bytes(b"")  # unreadable: skipped with a warning
    return torch_pipe, sdjax.load_pipeline(root / "sd"), root, vectors


def _addnet_hash(path):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()[:12]


def test_lora_tag_equals_merging_by_hand(setup):
    _, pipe, root, _ = setup
    unet0, te0 = pipe.unet.state, pipe.text_encoder.state
    before = np.asarray(jax.tree.leaves(unet0)[0]).copy()
    res = pipe.generate("a cat <lora:style:0.8>", lora_dir=root / "loras", **KW)
    plain = pipe.generate("a cat", **KW)
    assert pipe.unet.state is unet0 and pipe.text_encoder.state is te0  # originals untouched
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(pipe.unet.state)[0]), before)

    lora = lora_lib.read_lora(root / "loras" / "style.safetensors")
    merged, _ = lora_lib.merge({"unet": unet0, "text_encoder": te0}, [(lora, 0.8, 0.8)])
    try:
        pipe.unet.state, pipe.text_encoder.state = merged["unet"], merged["text_encoder"]
        by_hand = pipe.generate("a cat", **KW)
    finally:
        pipe.unet.state, pipe.text_encoder.state = unet0, te0
    np.testing.assert_allclose(res.latents, by_hand.latents, atol=1e-6)
    assert np.abs(res.latents - plain.latents).max() > 1e-3  # the LoRA did something

    info = parse_infotext(res.infotexts[0])
    assert parse_hashes(info["Lora hashes"]) == {"style": _addnet_hash(root / "loras" / "style.safetensors")}
    assert "<lora:style:0.8>" in info["Prompt"]


def test_changing_the_multiplier_does_not_recompile(setup):
    _, pipe, root, _ = setup
    pipe.generate("a cat <lora:style:0.5>", lora_dir=root / "loras", **KW)
    sampler_id, _ = sampling.resolve("euler", None)
    spec = generation.Spec(sampler_id, "txt2img", False, (), False, "continuous")
    fn = generation.build(pipe.unet.graphdef, pipe.vae.graphdef, discrete_model(pipe), spec, pipe.vae.scaling_factor)
    n = fn._cache_size()
    a = pipe.generate("a cat <lora:style:0.3>", lora_dir=root / "loras", **KW)
    b = pipe.generate("a cat", loras=[f"{root / 'loras' / 'style.safetensors'}:0.3"], **KW)
    assert fn._cache_size() == n
    np.testing.assert_array_equal(a.latents, b.latents)  # explicit file == prompt tag


def test_unmatched_lora_keys_error_or_warn(setup):
    _, pipe, root, _ = setup
    with pytest.raises(CheckpointError, match="no_such_module"):
        pipe.generate("a cat <lora:broken:1>", lora_dir=root / "loras", **KW)
    with pytest.warns(UserWarning, match="no_such_module"):
        pipe.generate("a cat <lora:broken:1>", lora_dir=root / "loras", lora_strict=False, **KW)
    with pytest.raises(CheckpointError, match="missing"):
        pipe.generate("a cat <lora:missing:1>", lora_dir=root / "loras", **KW)


def test_embedding_name_gives_its_vectors(setup):
    torch_pipe, pipe, root, vectors = setup
    with pytest.warns(UserWarning, match="wrongwidth"):
        nets = apply_networks(pipe, ["a shinytok cat"], [""], embeddings_dir=root / "emb")
    cond, _ = encode_prompts(pipe, nets.prompts, nets.negatives, tokenizer=nets.tokenizer, te_state=nets.te_state)

    # transformers' CLIP with the same two rows appended, fed the expanded prompt.
    te = torch_pipe.text_encoder
    tok = nets.tokenizer
    ids = tok(nets.prompts[0], padding="max_length", max_length=77, return_tensors="pt").input_ids
    new_ids = tok.convert_tokens_to_ids(["shinytok", "shinytok_1"])
    assert all(int(i) in ids[0].tolist() for i in new_ids)
    table = te.get_input_embeddings().weight.detach()
    big = torch.nn.Embedding(len(tok), table.shape[1])
    with torch.no_grad():
        big.weight[: table.shape[0]] = table
        big.weight[new_ids] = torch.from_numpy(vectors)
        orig = te.get_input_embeddings()
        te.set_input_embeddings(big)
        try:
            ref = te(ids).last_hidden_state.numpy()
        finally:
            te.set_input_embeddings(orig)
    np.testing.assert_allclose(np.asarray(cond[0]), ref[0], atol=1e-4)

    res = pipe.generate("a shinytok cat", embeddings=[root / "emb" / "shinytok.safetensors"], **KW)
    digest = hashlib.sha256((root / "emb" / "shinytok.safetensors").read_bytes()).hexdigest()[:12]
    assert parse_hashes(parse_infotext(res.infotexts[0])["TI hashes"]) == {"shinytok": digest}
    unused = pipe.generate("a cat", embeddings=[root / "emb" / "shinytok.safetensors"], **KW)
    assert "TI hashes" not in parse_infotext(unused.infotexts[0])
