"""The writers of an edited pipeline hold little extra host memory: they write tensor by tensor.

How it is measured: a `TorchDispatchMode` sees every torch operation of the save and counts the bytes of each new
storage an operation creates (an output whose storage is none of its inputs': a cast, a copy, a concatenation, a
mask), until the tensor that owns it is freed; the peak of that live total is the extra memory torch allocated.
Deterministic, unlike sampling the resident size of a process (allocator reuse, other threads), and it sees torch's
memory, which `tracemalloc` does not. It does not see native code that allocates outside torch (the safetensors
serialiser of `save_pretrained`'s components): `benchmarks/host_memory.py` measures whole-process resident memory at
SDXL sizes for that.
"""

import weakref

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import diffusers_uce
from diffusers_uce.demo import make_demo_pipeline
from diffusers_uce.utils.files import atomic_save_safetensors


class CreatedBytes(TorchDispatchMode):
    """The peak bytes of live CPU storages that torch operations created inside the block."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def _free(self, ptr):
        self.now -= self.live.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                ptr = t.untyped_storage().data_ptr()
                if ptr and ptr not in inputs and ptr not in self.live:
                    self.live[ptr] = t.untyped_storage().nbytes()
                    self.now += self.live[ptr]
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(t, self._free, ptr)
        return out


def test_the_writer_holds_one_tensor_at_a_time(tmp_path):
    tensors = {f"w{i}": torch.randn(64, 64) for i in range(16)}
    with CreatedBytes() as created:
        atomic_save_safetensors(tensors, tmp_path, "x.safetensors", {}, dtype=torch.float16)
    one = 64 * 64 * 4
    assert 0 < created.peak <= 2 * one, created.peak  # a cast and its finiteness mask, not the whole dict


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    pipe = diffusers_uce.attach(make_demo_pipeline("sd1"))
    pipe.apply_concept_edits(["van gogh"], guide="art", held_out=[])
    return pipe


def model_bytes(pipe):
    return sum(t.numel() * t.element_size() for c in ("unet", "text_encoder", "vae")
               for t in getattr(pipe, c).state_dict().values())


@pytest.mark.parametrize("writer", ["lora", "single_file", "save_pretrained"])
def test_peak_extra_memory_under_a_quarter_of_the_model(pipe, tmp_path, writer):
    if writer != "lora" and not pipe._uce_state.fused:
        pipe.fuse_concept_edits()
    save = {"lora": lambda: pipe.save_concept_edits_as_lora(tmp_path / "lora"),
            "single_file": lambda: pipe.save_single_file(tmp_path / "m.safetensors", dtype=torch.float16),
            "save_pretrained": lambda: pipe.save_pretrained(tmp_path / "pipeline")}[writer]
    with CreatedBytes() as created:
        save()
    assert created.peak < 0.25 * model_bytes(pipe), (writer, created.peak / model_bytes(pipe))
