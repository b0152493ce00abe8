"""Robust erasure on a pipeline: hardening rounds replayed on every solve, and the attacker's embeddings of an edit."""

from __future__ import annotations

import torch
from diffusers.utils import logging

from ..core import engine
from ..core.hardening import hardening_blocks, replay_hardening
from ..core.robust import adversarial_embeddings
from ..core.solve import scaled
from ..utils.checks import is_finite_number

logger = logging.get_logger(__name__)


class UCERobustMixin:
    """Hardening against adversarial embeddings and the closed-form attack (part of `UCEMixin`)."""

    def _uce_harden(self, group, weights: torch.Tensor, solution: engine.Solution, records, encoded,
                    measure: bool = True):
        """Replay the hardening rounds of `records` on one group's solved edit and measure every erased concept.

        Args:
            group (`GroupEdit`): the target group; its cached Gram matrix of the original weights is used.
            weights (`torch.Tensor`): the group's stacked original weights (``[W | b]`` when biased).
            measure (`bool`, defaults to `True`): also measure the edits that are not hardened (for the report).

        Returns:
            `tuple`: the (hardened) solution, and the per-record recovery sums (`None` without `measure`, or when the
            edit has per-layer corrections, whose robustness is not measured).
        """
        if solution.correction is not None or solution.layerwise is not None:  # per-layer transforms
            return solution, None
        blocks = [b for b in hardening_blocks(records, encoded, group.biased) if measure or b.rounds]
        if not blocks:
            return solution, None
        gram = group.gram(weights.device, weights)
        transform, sums = replay_hardening(gram, solution.transform, blocks, group.biased)
        if any(r.harden for r in records):  # a hardened transform has no low-rank form: T is used as is
            solution = engine.Solution(transform, None, None)
        return solution, sums if measure else None

    @torch.no_grad()
    def adversarial_embeds(self, concept: str, reg: float = 0.1) -> dict:
        r"""The closed-form attack on the applied edit: text embeddings that bring an erased concept back.

        For every state ``c`` of the concept's prompt, the attacker's embedding is
        ``c' = argmin_x Σ_ℓ ‖W'_ℓ x − W_ℓ c‖² + ρ‖x‖²`` over every edited layer (``W'``: the edit at its current
        strength, ``W``: the original weights). Generating from ``c'`` shows what an attacker who controls the text
        embedding (a learned token, textual inversion) gets back; after hardening much less of the concept returns.

        Args:
            concept (`str`): the prompt to attack, e.g. an erased concept.
            reg (`float`, defaults to 0.1): the attacker's regulariser ``ρ`` (> 0); smaller goes further from the
                concept's own embedding.

        Returns:
            `dict`: keyword arguments for the pipeline call, in the text encoder's dtype on the pipeline's device:
            `prompt_embeds` (``[1, 77, d]`` for SD 1.x/2.x, ``[1, 77, 2048]`` for SDXL, ``[1, 512, 4096]`` for FLUX)
            and, for SDXL and FLUX, `pooled_prompt_embeds` (SDXL: the concept's own pooled embedding, which the edit
            does not change; FLUX: attacked too, as its pooled projection is edited).

        Example:
        ```py
        >>> pipe.apply_concept_edits(moderate="nudity", harden=True)
        >>> image = pipe(**pipe.adversarial_embeds("nudity"), generator=torch.Generator().manual_seed(0)).images[0]
        ```
        """
        if not isinstance(concept, str) or not concept.strip():
            raise ValueError(f"concept must be a non-empty prompt, got {concept!r}")
        if not is_finite_number(reg) or reg <= 0:
            raise ValueError(f"reg must be a finite number > 0, got {reg!r}")
        state = self._uce_require_state("attack")
        device = self._execution_device
        out = {}
        for group in state.groups:
            solution = group.solution
            if solution.correction is not None or solution.layerwise is not None:
                raise ValueError("adversarial_embeds needs an edit whose layers share one d×d transform: not "
                                 "available with the 'tensor' technique, debiasing, precise erasure, or on layers "
                                 "reading inputs so wide that they are edited in low-rank form (FLUX.2, HiDream)")
            transform = scaled(solution.transform.to(device, torch.float64), None, state.scale)[0]
            encoded = self._uce_encode(group.group, [concept], False, device)
            states = encoded.states[0]
            attacked = adversarial_embeddings(group.gram(device), transform, states, float(reg), group.biased)
            attacked = attacked[:, : states.shape[-1]].to(states.dtype)
            if group.group.text.output == "pooled":
                out["pooled_prompt_embeds"] = attacked.reshape(1, -1)
            else:
                out["prompt_embeds"] = attacked[None]
        family = self._uce_family.name
        if family == "stable-diffusion-xl":  # the pooled embedding is read by layers the edit does not change
            out["pooled_prompt_embeds"] = self.encode_prompt(concept, device=device, num_images_per_prompt=1,
                                                             do_classifier_free_guidance=False)[2]
        elif family == "flux" and len(out) < 2:  # a `layers` filter left one of the two groups unedited
            plain = self.encode_prompt(concept, None, device=device, num_images_per_prompt=1)
            out = {"prompt_embeds": plain[0], "pooled_prompt_embeds": plain[1], **out}
        logger.info(f"adversarial embeddings of {concept!r} at reg={reg:g}")
        return out
