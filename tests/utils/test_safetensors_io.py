"""Our safetensors writer: files that safetensors reads back bit for bit, no temporary of anyone else's, a killed
save cleaned by the next, and nothing written when a value is not finite."""

import multiprocessing
import os
import signal

import pytest
import safetensors
import safetensors.torch
import torch

from diffusers_uce.utils import files, safetensors_io
from diffusers_uce.utils.files import atomic_save_safetensors


def every_dtype():
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "f64": torch.randn(4, 2, generator=g, dtype=torch.float64),
        "i64": torch.arange(-5, 6),
        "i32": torch.arange(9, dtype=torch.int32).reshape(3, 3),
        "u8": torch.arange(11, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "view": torch.arange(12.0).reshape(3, 4).T,  # not contiguous
        "extremes": torch.tensor([torch.finfo(torch.float32).max, -0.0, 1e-45]),
    }


def test_files_load_bit_for_bit_with_safetensors(tmp_path):
    tensors = every_dtype()
    metadata = {"format": "pt", "uce": '{"é": [1, 2]}', "empty": ""}
    path = atomic_save_safetensors(tensors, tmp_path, "all.safetensors", metadata)
    loaded = safetensors.torch.load_file(path)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        as_bytes = tensor.contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), as_bytes), name
    with safetensors.safe_open(path, "pt") as f:
        assert f.metadata() == metadata
    # the same tensors written by safetensors itself hold the same bytes after the header
    reference = tmp_path / "reference.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, reference, metadata=metadata)
    assert os.path.getsize(path) - 8 - int.from_bytes(open(path, "rb").read(8), "little") == \
        os.path.getsize(reference) - 8 - int.from_bytes(reference.read_bytes()[:8], "little")


def test_cast_and_lazy_tensors(tmp_path):
    calls = []

    def make():
        calls.append(1)
        return torch.ones(2, 2, dtype=torch.float64)

    path = atomic_save_safetensors({"lazy": make, "ids": torch.arange(3)}, tmp_path, "x.safetensors", {},
                                   dtype=torch.bfloat16)
    loaded = safetensors.torch.load_file(path)
    assert loaded["lazy"].dtype == torch.bfloat16 and loaded["ids"].dtype == torch.int64 and len(calls) == 2


@pytest.mark.parametrize("dtype", [torch.float16, None])
def test_non_finite_is_refused_before_anything_is_written(tmp_path, dtype):
    big = torch.tensor([1.0, 7e4]) if dtype is not None else torch.tensor([1.0, float("inf")])
    with pytest.raises(ValueError, match="does not fit in torch.float16" if dtype else "non-finite"):
        atomic_save_safetensors({"ok": torch.ones(3), "big": big}, tmp_path, "x.safetensors", {}, dtype=dtype)
    assert os.listdir(tmp_path) == []


def test_no_temporary_of_a_third_party(tmp_path, monkeypatch):
    """safetensors' own writer puts a `.tmpXXXXXX` of its own beside the path; ours is never used."""
    def refuse(*args, **kwargs):
        raise AssertionError("safetensors.torch.save_file was called")

    monkeypatch.setattr(safetensors.torch, "save_file", refuse)
    atomic_save_safetensors({"a": torch.ones(2)}, tmp_path, "x.safetensors", {})
    assert os.listdir(tmp_path) == ["x.safetensors"]


def _save_and_die(folder, stop_after):
    real_write = safetensors_io.write_safetensors

    def write_then_kill(file, *args, **kwargs):
        real_write(file, *args, **kwargs)
        file.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # killed midway: the file is written, not yet moved into place

    files_written = {"x": torch.ones(256, 256)}
    if stop_after:
        safetensors_io.write_safetensors = write_then_kill
    atomic_save_safetensors(files_written, folder, "model.safetensors", {})


def test_a_killed_save_leaves_a_temporary_that_the_next_save_removes(tmp_path):
    worker = multiprocessing.get_context("fork").Process(target=_save_and_die, args=(tmp_path, True))
    worker.start()
    worker.join(30)
    assert worker.exitcode == -signal.SIGKILL
    left = os.listdir(tmp_path)
    assert len(left) == 1 and left[0].startswith(".model.safetensors.") and left[0].endswith(".tmp"), left
    assert os.path.getsize(tmp_path / left[0]) > 256 * 256 * 4  # checkpoint-sized
    atomic_save_safetensors({"y": torch.zeros(2)}, tmp_path, "other.safetensors", {})
    assert os.listdir(tmp_path) == ["other.safetensors"]
    assert files.remove_stale_temporaries(tmp_path) == []


def test_exception_midway_leaves_nothing(tmp_path):
    def boom():
        raise RuntimeError("disk gone")

    calls = iter([torch.ones(4), None])

    def second_call_fails():  # fine when checked, fails when written
        value = next(calls)
        if value is None:
            boom()
        return value

    with pytest.raises(RuntimeError, match="disk gone"):
        atomic_save_safetensors({"a": torch.ones(1000), "b": second_call_fails}, tmp_path, "x.safetensors", {})
    assert os.listdir(tmp_path) == []
