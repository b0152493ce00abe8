"""`UCEAttnProcessor`: applies a concept edit at inference time without touching the weights.

Because ``W' c = W (T c)``, an edited ``to_k``/``to_v`` is the original projection fed ``c T_ℓᵀ``. The processor
wraps whatever processor the attention module had and hands it a thin view of the module whose ``to_k``/``to_v``
transform their input first, so every detail of the wrapped processor (masks, norms, SDPA, IP-adapters...) stays as
it was. The strength ``s`` scales ``T − I``.
"""

from __future__ import annotations

import torch

from .solve import apply_to_inputs


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
        state (`EditState`-like): holds ``delta``, ``correction`` and ``scale``, shared by every projection so that a
            new solve or strength reaches all processors at once.
        layer (`int`): index of this projection in the solve (selects its correction coefficients).
    """

    def __init__(self, state, layer: int):
        self.state, self.layer = state, layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.state.active_scale
        if scale == 0:
            return x
        delta, correction = self.state.device_terms(x.device)
        correction = None if correction is None else correction.times(scale)
        return apply_to_inputs(x, delta * scale, correction, self.layer)


class UCEAttnProcessor:
    """Attention processor that applies a UCE concept edit to the keys and values of a cross-attention layer.

    Args:
        processor: the processor that was installed before; it does the attention, and `unload_concept_edits`
            puts it back.
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
