"""`UCEAttnProcessor`: applies a concept edit at inference time without touching the weights.

Because ``W' c = W (T c)``, an edited ``to_k``/``to_v`` is the original projection fed ``c T_ℓᵀ``. The processor
wraps whatever processor the attention module had and hands it a thin view of the module whose ``to_k``/``to_v``
transform their input first, so every detail of the wrapped processor (masks, norms, SDPA, IP-adapters...) stays as
it was. The strength ``s`` scales ``T − I``.

Layers that are not cross-attention projections (FLUX's ``context_embedder`` and pooled-text ``linear_1``) get a
forward hook instead (`LinearEditHook`). They have a bias, and their edit is ``W' = W T + b uᵀ``: in homogeneous form
``[W | b] T̃ [c; 1]`` (`solve.with_bias`).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ..core.solve import apply_to_inputs, homogeneous


def _compiling() -> bool:
    """Whether torch.compile is tracing the caller."""
    check = getattr(torch.compiler, "is_compiling", None) or getattr(torch._dynamo, "is_compiling", None)
    return bool(check and check())


class _InputTransform:
    """A projection called on transformed inputs: ``module(x T_ℓᵀ)``."""

    def __init__(self, module: torch.nn.Module, edit: "ProjectionEdit"):
        self.module, self.edit = module, edit

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.module(self.edit(x), *args, **kwargs)

    def __getattr__(self, name):  # weight, bias, in_features... as the wrapped projection
        return getattr(self.module, name)


class _EditedAttention:
    """A view of an `Attention` module whose ``to_k``/``to_v`` apply the edit; everything else is the module."""

    def __init__(self, attn: torch.nn.Module, key: "ProjectionEdit | None", value: "ProjectionEdit | None"):
        self._attn = attn
        self.to_k = _InputTransform(attn.to_k, key) if key is not None else attn.to_k
        self.to_v = _InputTransform(attn.to_v, value) if value is not None else attn.to_v

    def __getattr__(self, name):
        return getattr(self._attn, name)


class ProjectionEdit:
    """The input transform of one projection: ``x ↦ x + s·(x Δᵀ + correction)`` with ``Δ = T − I``.

    Args:
        group (`GroupEdit`-like): holds the solution (``device_terms``) and, through ``group.state``, the strength,
            shared by every projection so that a new solve or strength reaches all processors at once.
        layer (`int`): index of this projection in its group's solve (selects its correction coefficients).
    """

    def __init__(self, group, layer: int):
        self.group, self.layer = group, layer

    @property
    def scale(self) -> float:
        return self.group.state.active_scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The transformed input; ``[x; 1]`` transformed (one more feature) for a biased group."""
        scale = self.scale
        if scale == 0:
            return homogeneous(x) if self.group.biased else x
        if torch.is_grad_enabled() or _compiling():  # traced or differentiated: no cache
            return self._transform(x, scale)
        # Generation: every layer of the group reads the same text states at every step, and without a per-layer
        # correction they all get the same transformed states, so they are computed once and reused while the input
        # tensor (the same object, unchanged), the solution and the strength stay the same.
        group, solution = self.group, self.group.solution
        shared = solution.correction is None and (solution.layerwise is None or solution.layerwise.down.shape[0] == 1)
        key = (scale, None if shared else self.layer, x._version)
        cached = group.__dict__.get("_uce_inputs")
        if cached is not None and cached[0]() is x and cached[1] is solution and cached[2] == key:
            return cached[3]
        out = self._transform(x, scale)
        group._uce_inputs = (weakref.ref(x), solution, key, out)
        return out

    def _transform(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        if self.group.biased:
            x = homogeneous(x)
        delta, correction = self.group.device_terms(x.device)
        correction = None if correction is None else correction.times(scale)
        layerwise = self.group.device_layerwise(x.device)
        return apply_to_inputs(x, None if delta is None else delta * scale, correction, self.layer,
                               None if layerwise is None else layerwise.times(scale))


class LinearEditHook:
    """Forward hook applying a concept edit to a linear layer ``y = W c (+ b)`` without touching its weights.

    Args:
        edit (`ProjectionEdit`): the layer's input transform.
    """

    def __init__(self, edit: ProjectionEdit):
        self.edit = edit

    def __call__(self, module: torch.nn.Linear, args, output):
        if self.edit.scale == 0:
            return output
        x = self.edit(args[0])
        if not self.edit.group.biased:
            return F.linear(x, module.weight, module.bias)
        d = module.in_features
        bias = module.bias if module.bias is not None else 0
        return F.linear(x[..., :d], module.weight) + x[..., d:] * bias


class UCEAttnProcessor:
    """Attention processor that applies a UCE concept edit to the keys and values of a cross-attention layer.

    Args:
        processor (`AttnProcessor`): the processor that was installed before; it does the attention, and
            `unload_concept_edits` puts it back.
        key (`ProjectionEdit`, *optional*): transform for ``to_k`` inputs (`None` leaves keys unchanged).
        value (`ProjectionEdit`, *optional*): transform for ``to_v`` inputs.
    """

    def __init__(self, processor, key: ProjectionEdit | None = None, value: ProjectionEdit | None = None):
        self.processor, self.key, self.value = processor, key, value

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None and (self.key is not None or self.value is not None):
            attn = _EditedAttention(attn, self.key, self.value)
        if temb is not None:
            kwargs["temb"] = temb
        return self.processor(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                              attention_mask=attention_mask, **kwargs)
