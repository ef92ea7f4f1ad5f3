"""save_gram / load_gram: round trips and refusals."""

import os

import pytest
import torch

import tangent_kernels as tk


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_round_trip_is_exact_with_metadata(tmp_path, dtype):
    K = torch.randn(7, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    meta = {"model": "mlp", "params": 123, "betas": [0.1, 0.01], "nested": {"seed": 0}}
    written = tk.save_gram(tmp_path / "sub" / "K.safetensors", K, meta)
    loaded, got = tk.load_gram(written)
    assert loaded.dtype == dtype and torch.equal(loaded, K)
    assert {k: got[k] for k in meta} == meta
    assert got["shape"] == [7, 5] and got["format"] == "tangent_kernels.gram/1"
    assert [p.name for p in written.parent.iterdir()] == ["K.safetensors"]  # no temporary left


def test_save_replaces_atomically_and_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "K.safetensors"
    tk.save_gram(path, torch.eye(3))
    with pytest.raises(TypeError, match="JSON-serializable"):
        tk.save_gram(path, torch.zeros(3, 3), {"model": object()})
    K, _ = tk.load_gram(path)
    assert torch.equal(K, torch.eye(3))
    assert sorted(os.listdir(tmp_path)) == ["K.safetensors"]


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="2-D floating-point"):
        tk.save_gram(tmp_path / "a", torch.zeros(3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        tk.save_gram(tmp_path / "a", [[1.0]])
    with pytest.raises(ValueError, match="may not set"):
        tk.save_gram(tmp_path / "a", torch.eye(2), {"shape": [1]})
    with pytest.raises(ValueError, match="is a directory"):
        tk.save_gram(tmp_path, torch.eye(2))
    with pytest.raises(FileNotFoundError, match="no Gram file"):
        tk.load_gram(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a Gram file"):
        tk.load_gram(junk)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"weights": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not one written by tangent_kernels.save_gram"):
        tk.load_gram(other)


def _forged(path, K, header):
    """A safetensors file shaped like ours but with the given metadata string."""
    from safetensors.torch import save_file

    save_file({"K": K}, str(path), metadata={"tangent_kernels": header})
    return path


def test_refuses_inconsistent_or_foreign_metadata(tmp_path):
    import json

    good = {"format": "tangent_kernels.gram/1", "shape": [3, 3], "dtype": "float32"}
    with pytest.raises(ValueError, match=r"inconsistent: K has shape \[2, 2\], its metadata says \[3, 3\]"):
        tk.load_gram(_forged(tmp_path / "a.safetensors", torch.eye(2), json.dumps(good)))
    with pytest.raises(ValueError, match="has format 'tangent_kernels.gram/9'; this version reads"):
        tk.load_gram(_forged(tmp_path / "b.safetensors", torch.eye(3), json.dumps({**good, "format": "tangent_kernels.gram/9"})))
    with pytest.raises(ValueError, match="unreadable tangent_kernels metadata"):
        tk.load_gram(_forged(tmp_path / "c.safetensors", torch.eye(3), "{not json"))
    with pytest.raises(ValueError, match="has format 'list'"):
        tk.load_gram(_forged(tmp_path / "d.safetensors", torch.eye(3), "[1, 2]"))
    K, meta = tk.load_gram(_forged(tmp_path / "e.safetensors", torch.eye(3), json.dumps(good)))
    assert torch.equal(K, torch.eye(3)) and meta == good  # the same bytes with consistent metadata load
