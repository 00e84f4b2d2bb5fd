"""The restricted unpickler: torch.save files -> numpy, never running code from the file."""

import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from sdjax.errors import CheckpointError, UnsafePickleError
from sdjax.weights.files import read_torch_bin
from sdjax.weights.pickle_safe import allowed_globals, load_torch_file

FORMATS = [pytest.param(True, id="zip"), pytest.param(False, id="legacy")]


def _save(obj, path, zip_format):
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    return path


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


@pytest.mark.parametrize("zip_format", FORMATS)
def test_dtypes_strides_offsets_roundtrip(tmp_path, zip_format):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, generator=g)
    sd = {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "f64": torch.randn(2, generator=g).double(),
        "transposed": torch.randn(3, 4, generator=g).t(),  # strides (1, 4)
        "sliced_bf16": torch.randn(4, 6, generator=g).bfloat16()[1:3, ::2],
        "offset_view": base[5:17].view(3, 4),  # shares `base`'s storage at offset 5
        "base": base,
        "conv_like": torch.randn(8, 4, 3, 3, generator=g).permute(0, 2, 3, 1),
        "param": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
        "int64": torch.arange(7),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    out = load_torch_file(_save(sd, tmp_path / "w.bin", zip_format))
    assert list(out) == list(sd)
    for name, ref in sd.items():
        got = out[name]
        assert isinstance(got, np.ndarray), name
        assert got.shape == tuple(ref.shape), name
        want_dtype = {torch.bfloat16: "bfloat16"}.get(ref.dtype, str(_np(ref).dtype))
        assert str(got.dtype) == want_dtype, name
        np.testing.assert_array_equal(np.asarray(got).astype(_np(ref).dtype), _np(ref), err_msg=name)


@pytest.mark.parametrize("zip_format", FORMATS)
def test_nested_containers_and_state_dict_wrapper(tmp_path, zip_format):
    lin = torch.nn.Linear(3, 2)
    obj = {"state_dict": lin.state_dict(), "epoch": 3, "names": ["a", ("b", 1.5)], "blob": b"\x00\xff"}
    path = _save(obj, tmp_path / "ckpt.pt", zip_format)
    out = load_torch_file(path)
    assert out["epoch"] == 3 and out["names"] == ["a", ("b", 1.5)] and out["blob"] == b"\x00\xff"
    flat = read_torch_bin(path)  # unwraps "state_dict"
    assert set(flat) == {"weight", "bias"}
    np.testing.assert_array_equal(flat["weight"], lin.weight.detach().numpy())


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Evals:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("zip_format", FORMATS)
@pytest.mark.parametrize("payload, global_name", [(_RunsCode, "system"), (_Evals, "eval")])
def test_code_running_pickle_is_refused(tmp_path, zip_format, payload, global_name):
    marker = tmp_path / "pwned"
    obj = {"weight": torch.ones(2), "evil": payload(marker)}
    path = _save(obj, tmp_path / "evil.bin", zip_format)
    # The file really is malicious: an unrestricted load runs the payload.
    control = tmp_path / "control"
    torch.save({"evil": payload(control)}, tmp_path / "control.bin", _use_new_zipfile_serialization=zip_format)
    torch.load(tmp_path / "control.bin", weights_only=False)
    assert control.exists()

    with pytest.raises(UnsafePickleError, match=rf"evil\.bin.*{global_name}"):
        load_torch_file(path)
    assert not marker.exists()
    with pytest.raises(UnsafePickleError):
        read_torch_bin(path)
    assert not marker.exists()


def test_plain_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.bin"
    path.write_bytes(pickle.dumps(_RunsCode(marker), protocol=2))
    with pytest.raises(UnsafePickleError, match=r"(posix|os)\.system"):
        load_torch_file(path)
    assert not marker.exists()


def test_pickle_cannot_modify_the_allow_list(tmp_path):
    # GLOBAL torch.FloatStorage, then BUILD with {'dtype': 1}: would poison later loads.
    evil = b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeK\x01sb."
    path = tmp_path / "poison.bin"
    path.write_bytes(evil)
    with pytest.raises(UnsafePickleError):
        load_torch_file(path)
    ok = _save({"w": torch.ones(3)}, tmp_path / "ok.bin", True)
    assert load_torch_file(ok)["w"].dtype == np.float32


def test_allowed_globals_are_only_tensor_machinery():
    allowed = allowed_globals()
    assert "collections.OrderedDict" in allowed and "torch._utils._rebuild_tensor_v2" in allowed
    assert not any(g.startswith(("os.", "posix.", "builtins.", "subprocess.")) for g in allowed)


@pytest.mark.parametrize("zip_format", FORMATS)
def test_truncated_file_names_the_file(tmp_path, zip_format):
    path = _save({"w": torch.randn(64, 64)}, tmp_path / "cut.bin", zip_format)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.bin.*(truncated|corrupt)"):
        load_torch_file(path)


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "junk.bin"
    path.write_bytes(pickle.dumps(12345))
    with pytest.raises(CheckpointError, match=r"junk\.bin.*not a PyTorch checkpoint"):
        load_torch_file(path)
    zpath = tmp_path / "other.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_torch_file(zpath)
