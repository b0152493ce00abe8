"""A float64 transcription of UCE (DESIGN.md §1–2), written as plainly as possible: the oracle for the tests.

Nothing here is shared with the package's math: tokens are selected with Python loops from full-length encodings,
and every layer is solved on its own with an explicit inverse.
"""

import torch


def full_states(pipe, prompts):
    """``text_encoder(ids)[0]`` at full padded length, float64, and ``k`` per prompt."""
    tok = pipe.tokenizer
    out = {}
    for p in prompts:
        inputs = tok(p, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        with torch.no_grad():
            states = pipe.text_encoder(inputs.input_ids.to(pipe.text_encoder.device))[0][0]
        out[p] = (states.double().cpu(), int(inputs.attention_mask.sum()) - 2)
    return out


def select_tokens(pipe, erase, guides, preserve, mode):
    """Token lists per DESIGN.md §2: (pairs as lists of (c, c*) per concept, preserved tokens)."""
    if mode == "paper":
        guides = [g if g else " " for g in guides]
        preserve = list(preserve) + ([""] if "" not in preserve else [])
    states = full_states(pipe, list(erase) + list(guides) + list(preserve))
    length = pipe.tokenizer.model_max_length
    pairs = []
    for e, g in zip(erase, guides):
        (se, ke), (sg, kg) = states[e], states[g]
        if mode == "last":
            pairs.append([(se[ke], sg[kg])])
        else:
            f = max(ke, kg)
            erased_pos = list(range(ke, length - (f - ke)))
            guide_pos = list(range(kg, length - (f - kg)))
            assert len(erased_pos) == len(guide_pos)
            pairs.append([(se[i], sg[j]) for i, j in zip(erased_pos, guide_pos)])
    kept = []
    for p in preserve:
        sp, kp = states[p]
        kept.extend([sp[kp]] if mode == "last" else [sp[i] for i in range(length)])
    return pairs, kept


def reference_layer(weight, pairs, preserved, erase_scale, preserve_scale, lamb, technique, debiased=()):
    """``W' = (λW + s_e Σ v* cᵀ + s_p Σ W p pᵀ) B⁻¹`` for one layer, float64.

    `debiased` lists ``(c, [(c_a, w_a), ...])``: target ``W c + Σ_a w_a (‖W c‖ / ‖W c_a‖) W c_a``.
    """
    w = weight.double()
    d = w.shape[1]
    b = lamb * torch.eye(d, dtype=torch.float64)
    num = lamb * w
    for c, attributes in debiased:
        target = w @ c
        for c_a, w_a in attributes:
            target = target + w_a * (w @ c).norm() / (w @ c_a).norm() * (w @ c_a)
        num = num + erase_scale * torch.outer(target, c)
        b = b + erase_scale * torch.outer(c, c)
    for block in pairs:
        alpha = 0.0
        if technique == "tensor":
            wc = torch.stack([w @ c for c, _ in block])
            wg = torch.stack([w @ g for _, g in block])
            alpha = float((wc * wg).sum() / (wc * wc).sum())
        for c, g in block:
            target = w @ g - alpha * (w @ c)
            num = num + erase_scale * torch.outer(target, c)
            b = b + erase_scale * torch.outer(c, c)
    for p in preserved:
        num = num + preserve_scale * torch.outer(w @ p, p)
        b = b + preserve_scale * torch.outer(p, p)
    return num @ torch.linalg.inv(b)
