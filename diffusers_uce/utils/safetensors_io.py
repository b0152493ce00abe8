"""A safetensors writer that streams: the header, then each tensor's bytes straight from its memory, one tensor at a
time, into a file we opened (no temporary file of a third party, no copy of the whole state dict), with every
floating-point tensor checked finite (after any cast) before the first byte is written.

The format: an 8-byte little-endian header length, the JSON header (``"__metadata__"`` and, per tensor, its dtype,
shape and ``data_offsets`` into the data that follows), padded with spaces to a multiple of 8 bytes, then the raw
little-endian bytes of every tensor, back to back.
"""

from __future__ import annotations

import json
import struct
import sys
from typing import IO, Callable, Mapping, Union

import torch

# torch dtype -> the safetensors name; float8 types where this torch has them
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        SAFETENSORS_DTYPES[getattr(torch, _name)] = _code

# A tensor, or a function that makes it (called twice: once to check it, once to write it).
TensorSource = Union[torch.Tensor, Callable[[], torch.Tensor]]


def _make(source: TensorSource, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = (source() if callable(source) else source).detach()
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return tensor


def check_finite(name: str, tensor: torch.Tensor, source: torch.Tensor | None = None) -> None:
    """Raise a `ValueError` naming `name` if the floating-point `tensor` holds `inf` or `nan`.

    Args:
        name (`str`): the tensor's name, for the message.
        tensor (`torch.Tensor`): what would be written.
        source (`torch.Tensor`, *optional*): the tensor before a cast to `tensor`'s dtype, to tell an overflow of the
            cast from values that were already not finite.
    """
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if source is not None and source.dtype != tensor.dtype and bool(torch.isfinite(source).all()):
        largest = float(source.abs().max())
        raise ValueError(
            f"{name} does not fit in {tensor.dtype}: {bad} of its values become inf (largest magnitude {largest:.4g},"
            f" above the {torch.finfo(tensor.dtype).max:.4g} that {tensor.dtype} holds). Nothing was written; save in "
            "a wider dtype (torch.float32, or torch.bfloat16 for a half-size file), or lower the edit's strength "
            "(set_concept_edit_scale) so the edited weights stay in range")
    raise ValueError(f"{name} holds {bad} non-finite value(s) (inf or nan), so the file would be broken. Nothing was "
                     f"written: a weight became non-finite, or a value is too large for {tensor.dtype}; reload the "
                     "model (or unload the concept edits) and edit again, with a lower strength if it overflows")


def plan_safetensors(tensors: Mapping[str, TensorSource], dtype: torch.dtype | None = None) -> list[tuple]:
    """Check every tensor (known dtype, finite after the cast to `dtype`) and return the file's layout.

    Returns:
        `list[tuple]`: ``(name, dtype, shape, begin, end)`` in file order (the widest dtypes first, so every tensor
        is aligned to its element size).
    """
    entries = []
    for name, source in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"safetensors keys must be strings, got {name!r}")
        raw = (source() if callable(source) else source).detach()
        tensor = _make(raw, dtype)
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name} has dtype {tensor.dtype}, which safetensors files cannot hold")
        check_finite(name, tensor, raw)
        entries.append((name, tensor.dtype, tuple(tensor.shape), tensor.numel() * tensor.element_size()))
        del raw, tensor
    entries.sort(key=lambda e: -e[1].itemsize)  # stable: names keep their order within a width
    plan, offset = [], 0
    for name, tensor_dtype, shape, nbytes in entries:
        plan.append((name, tensor_dtype, shape, offset, offset + nbytes))
        offset += nbytes
    return plan


def safetensors_header(plan: list[tuple], metadata: Mapping[str, str] | None) -> bytes:
    """The length prefix and the padded JSON header of a file laid out by `plan`."""
    header = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"safetensors metadata must map strings to strings; not so for {bad}")
        header["__metadata__"] = dict(metadata)
    for name, tensor_dtype, shape, begin, end in plan:
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor_dtype], "shape": list(shape), "data_offsets": [begin, end]}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(file: IO[bytes], tensors: Mapping[str, TensorSource], metadata: Mapping[str, str] | None = None,
                      dtype: torch.dtype | None = None, plan: list[tuple] | None = None) -> int:
    """Write `tensors` to the open binary `file` as safetensors, one tensor at a time.

    Extra host memory stays about one tensor (a cast, a copy from the device or a contiguous copy of a view); the
    bytes of a contiguous CPU tensor are written from its own memory.

    Args:
        file (`IO[bytes]`): an open binary file, at the position to write at.
        tensors (`Mapping[str, torch.Tensor or callable]`): the tensors (or functions that make them) by name.
        metadata (`Mapping[str, str]`, *optional*): the header's ``__metadata__``.
        dtype (`torch.dtype`, *optional*): cast floating-point tensors to it.
        plan (`list`, *optional*): what `plan_safetensors` returned for the same tensors (checked again otherwise).

    Returns:
        `int`: the number of bytes written.
    """
    if sys.byteorder != "little":
        raise RuntimeError("this safetensors writer runs on little-endian machines only")
    plan = plan_safetensors(tensors, dtype) if plan is None else plan
    head = safetensors_header(plan, metadata)
    file.write(head)
    for name, tensor_dtype, shape, begin, end in plan:
        tensor = _make(tensors[name], dtype).to("cpu").contiguous()
        if tensor.dtype != tensor_dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"{name} changed while it was being saved ({tensor.dtype} {tuple(tensor.shape)}, "
                               f"planned {tensor_dtype} {shape}); save again")
        if end > begin:
            file.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        del tensor
    return len(head) + (plan[-1][4] if plan else 0)


def check_finite_modules(modules: Mapping[str, torch.nn.Module]) -> None:
    """Raise a `ValueError` (naming the weight) if a floating-point weight or buffer of `modules` is not finite: the
    check of a save that writes the modules as they are, made before anything is written."""
    for component, module in modules.items():
        for name, tensor in module.state_dict().items():
            if tensor.device.type != "meta":
                check_finite(f"{component}.{name}", tensor)
