"""A float64 transcription of UCE (DESIGN.md §1–2), written as plainly as possible: the oracle for the tests.

Nothing here is shared with the package's math or its family descriptions: each family's target layers and the
states that feed them are spelt out below, tokens are selected with Python loops from full-length encodings, one
prompt at a time, and every layer is solved on its own with an explicit inverse.
"""

import torch

# For each demo family: target groups as (layer names inside the denoiser, how to encode one prompt).
# An encoder returns (states (L, d) float64, k) for one prompt at the full padded length.


def _clip(pipe, prompt, tokenizer, encoder, output):
    inputs = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    with torch.no_grad():
        out = encoder(inputs.input_ids.to(encoder.device), output_hidden_states=True)
    states = {"last": out[0], "penultimate": out.hidden_states[-2], "pooled": getattr(out, "pooler_output", None)}
    return states[output], int(inputs.attention_mask.sum()) - 2


def _sd(pipe, prompt):
    states, k = _clip(pipe, prompt, pipe.tokenizer, pipe.text_encoder, "last")
    return states[0].double().cpu(), k


def _sdxl(pipe, prompt):
    a, k = _clip(pipe, prompt, pipe.tokenizer, pipe.text_encoder, "penultimate")
    b, _ = _clip(pipe, prompt, pipe.tokenizer_2, pipe.text_encoder_2, "penultimate")
    return torch.cat([a[0], b[0]], dim=-1).double().cpu(), k


def _t5(pipe, prompt):
    inputs = pipe.tokenizer_2(prompt, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = pipe.text_encoder_2(inputs.input_ids.to(pipe.text_encoder_2.device))[0][0]
    return states.double().cpu(), max(int(inputs.attention_mask.sum()) - 2, 0)  # T5: no start token, "" is </s>


def _pooled(pipe, prompt):
    pooled, _ = _clip(pipe, prompt, pipe.tokenizer, pipe.text_encoder, "pooled")
    return pooled.double().cpu(), 0  # one token per prompt


def _attn2(pipe):
    return [n for n, _ in pipe.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]


def _call_default(pipe, name):
    import inspect

    for cls in type(pipe).__mro__:  # the diffusers class's own __call__ (the plugin's wraps it as *args, **kwargs)
        parameters = inspect.signature(cls.__call__).parameters if "__call__" in vars(cls) else {}
        if name in parameters:
            return parameters[name].default
    raise KeyError(name)


def _t5_states(tokenizer, encoder, prompt, length, mask):
    """T5 states of one prompt padded to `length`, with or without the attention mask, and its k (T5 has no start
    token: "" is its end token, position 0)."""
    inputs = tokenizer(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        kwargs = {"attention_mask": inputs.attention_mask} if mask else {}
        states = encoder(inputs.input_ids, **kwargs)[0][0]
    return states, max(int(inputs.attention_mask.sum()) - 2, 0), int(inputs.attention_mask.sum())


def _pixart(pipe, prompt):  # T5 (masked) through the transformer's caption projection
    states, k, _ = _t5_states(pipe.tokenizer, pipe.text_encoder, prompt, _call_default(pipe, "max_sequence_length"),
                              True)
    with torch.no_grad():
        return pipe.transformer.caption_projection(states[None])[0].double(), k


def _wan(pipe, prompt):  # UMT5 (masked), zero past the prompt's own tokens, through the text embedder
    states, k, real = _t5_states(pipe.tokenizer, pipe.text_encoder, prompt,
                                 _call_default(pipe, "max_sequence_length"), True)
    states = torch.cat([states[:real], states.new_zeros(states.shape[0] - real, states.shape[1])])
    with torch.no_grad():
        return pipe.transformer.condition_embedder.text_embedder(states[None])[0].double(), k


def _cogvideox(pipe, prompt):  # T5 without a mask, straight into patch_embed.text_proj
    states, k, _ = _t5_states(pipe.tokenizer, pipe.text_encoder, prompt, _call_default(pipe, "max_sequence_length"),
                              False)
    return states.double(), k


def _sd3(pipe, prompt):
    """SD3's joint sequence: both CLIP towers' penultimate states side by side, zero-padded to T5's width (77
    positions), then T5's; k in each run: [k_clip, 77 + k_t5]."""
    a, k = _clip(pipe, prompt, pipe.tokenizer, pipe.text_encoder, "penultimate")
    b, _ = _clip(pipe, prompt, pipe.tokenizer_2, pipe.text_encoder_2, "penultimate")
    t5, k5, _ = _t5_states(pipe.tokenizer_3, pipe.text_encoder_3, prompt, _call_default(pipe, "max_sequence_length"),
                           False)
    clip = torch.cat([a[0], b[0]], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5]).double(), [k, 77 + k5]


def _sd3_pooled(pipe, prompt):
    def pooled(tokenizer, encoder):
        inputs = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        with torch.no_grad():
            return encoder(inputs.input_ids).text_embeds[0]
    return torch.cat([pooled(pipe.tokenizer, pipe.text_encoder),
                      pooled(pipe.tokenizer_2, pipe.text_encoder_2)])[None].double(), 0


def _sana(pipe, prompt):
    """Sana: the pipeline's own encoding (lowercased, instruction prefix cut away) through caption_projection and
    caption_norm; Gemma appends no end token, so the prompt's last token is at mask ones − 1, and "" reads <bos>
    (position 0: the instruction's lone trailing "▁" is template, not prompt)."""
    chi = _call_default(pipe, "complex_human_instruction")
    embeds, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, complex_human_instruction=chi,
                                            max_sequence_length=_call_default(pipe, "max_sequence_length"))
    with torch.no_grad():
        states = pipe.transformer.caption_norm(pipe.transformer.caption_projection(embeds))
    return states[0].double(), int(mask.sum()) - 1 if prompt.strip() else 0  # (Sana strips prompts)


def _qwenimage(pipe, prompt):
    """Qwen-Image: the pipeline's encoding of one prompt (template prefix dropped, 5 template tokens after the
    prompt) through txt_norm."""
    embeds, _ = pipe.encode_prompt(prompt, max_sequence_length=_call_default(pipe, "max_sequence_length"))
    with torch.no_grad():
        states = pipe.transformer.txt_norm(embeds)[0]
    return states.double(), max(states.shape[0] - 6, 0)


def _flux2(pipe, prompt):
    """FLUX.2: stacked Mistral layers, left-padded: the prompt ends just before the closing [/INST]."""
    embeds, _ = pipe.encode_prompt(prompt)
    return embeds[0].double(), embeds.shape[1] - 2


def _flux2_klein(pipe, prompt):
    """FLUX.2 [klein]: stacked Qwen3 layers, right-padded; the prompt ends just before <|im_end|>."""
    embeds, _ = pipe.encode_prompt(prompt)
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=False)
    ids = pipe.tokenizer(text)["input_ids"]
    return embeds[0].double(), ids.index(pipe.tokenizer.convert_tokens_to_ids("<|im_end|>")) - 1


def _hidream(layer):
    """HiDream (the authors' script): Llama hidden layer `layer` (None: T5) at mask ones − 2 of its tokenizer, −1
    (the last padding position) for a prompt of no tokens."""
    def encode(pipe, prompt):
        t5, _, llama, _, _, _ = pipe.encode_prompt(prompt=prompt, prompt_2=prompt, prompt_3=prompt, prompt_4=prompt,
                                                   do_classifier_free_guidance=False)
        tokenizer = pipe.tokenizer_3 if layer is None else pipe.tokenizer_4
        states = t5[0] if layer is None else llama[layer][0]
        mask = tokenizer(prompt, padding="max_length", max_length=states.shape[0], truncation=True).attention_mask
        k = sum(mask) - 2
        return states.double(), k if k >= 0 else states.shape[0] - 1
    return encode


def _hidream_groups(pipe):
    layers = pipe.transformer.config.llama_layers
    count = len(pipe.transformer.caption_projection)
    return [([f"caption_projection.{i}.linear"], _hidream(layers[i] if i < count - 1 else None))
            for i in range(count)]


def _blocks(pipe, blocks):
    return [n for n, _ in pipe.transformer.named_modules() if n.startswith(blocks + ".")
            and n.endswith(("attn2.to_k", "attn2.to_v"))]


GROUPS = {
    "sd3": lambda pipe: [(["context_embedder"], _sd3), (["time_text_embed.text_embedder.linear_1"], _sd3_pooled)],
    "pixart": lambda pipe: [(_blocks(pipe, "transformer_blocks"), _pixart)],
    "wan": lambda pipe: [(_blocks(pipe, "blocks"), _wan)],
    "cogvideox": lambda pipe: [(["patch_embed.text_proj"], _cogvideox)],
    "sana": lambda pipe: [(_blocks(pipe, "transformer_blocks"), _sana)],
    "qwenimage": lambda pipe: [(["txt_in"], _qwenimage)],
    "flux2": lambda pipe: [(["context_embedder"], _flux2)],
    "flux2-klein": lambda pipe: [(["context_embedder"], _flux2_klein)],
    "hidream": _hidream_groups,
    "sd1": lambda pipe: [(_attn2(pipe), _sd)],
    "sd2": lambda pipe: [(_attn2(pipe), _sd)],
    "sdxl": lambda pipe: [(_attn2(pipe), _sdxl)],
    "flux": lambda pipe: [(["context_embedder"], _t5), (["time_text_embed.text_embedder.linear_1"], _pooled)],
}


NEW_FAMILIES = {"StableDiffusion3Pipeline": "sd3", "PixArtSigmaPipeline": "pixart", "PixArtAlphaPipeline": "pixart",
                "WanPipeline": "wan", "CogVideoXPipeline": "cogvideox", "SanaPipeline": "sana",
                "QwenImagePipeline": "qwenimage", "Flux2Pipeline": "flux2", "Flux2KleinPipeline": "flux2-klein",
                "HiDreamImagePipeline": "hidream"}


def family_of(pipe) -> str:
    names = {c.__name__ for c in type(pipe).__mro__}
    for name, family in NEW_FAMILIES.items():
        if name in names:
            return family
    if "FluxPipeline" in names:
        return "flux"
    if "StableDiffusionXLPipeline" in names:
        return "sdxl"
    return "sd2" if pipe.tokenizer.pad_token == "!" else "sd1"


def denoiser(pipe):
    return pipe.unet if family_of(pipe) in ("sd1", "sd2", "sdxl") else pipe.transformer


def groups(pipe):
    """``[(layer names, encode)]`` of `pipe`'s family."""
    return GROUPS[family_of(pipe)](pipe)


def full_states(pipe, prompts, encode=None):
    """Full-length float64 states and ``k`` per prompt (with `encode`, or the family's first group's encoder)."""
    encode = encode or groups(pipe)[0][1]
    return {p: encode(pipe, p) for p in prompts}


def select_tokens(pipe, erase, guides, preserve, mode, encode=None):
    """Token lists per DESIGN.md §2: (pairs as lists of (c, c*) per concept, preserved tokens)."""
    if mode == "paper":
        guides = [g if g else " " for g in guides]
        preserve = list(preserve) + ([""] if "" not in preserve else [])
    states = full_states(pipe, list(erase) + list(guides) + list(preserve), encode)
    length = next(iter(states.values()))[0].shape[0]
    pairs = []
    for e, g in zip(erase, guides):
        (se, ke), (sg, kg) = states[e], states[g]
        if isinstance(ke, list):  # several runs (SD3): the last token of each, "last" mode only
            assert mode == "last"
            pairs.append([(se[a], sg[b]) for a, b in zip(ke, kg)])
        elif mode == "last":
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
        kp = kp if isinstance(kp, list) else [kp]
        kept.extend([sp[i] for i in kp] if mode == "last" else [sp[i] for i in range(length)])
    return pairs, kept


def reference_layer(weight, pairs, preserved, erase_scale, preserve_scale, lamb, technique, debiased=(), bias=None):
    """``W' = (λW + s_e Σ v* cᵀ + s_p Σ W p pᵀ) B⁻¹`` for one layer, float64.

    `debiased` lists ``(c, [(c_a, w_a), ...])``: target ``W c + Σ_a w_a (‖W c‖ / ‖W c_a‖) W c_a``. With a `bias`
    ``b`` the layer keeps it and every target includes it (``v* + b``, ``W p + b``), as the authors' FLUX script does.
    """
    w = weight.double()
    b_vec = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.double()
    d = w.shape[1]
    b = lamb * torch.eye(d, dtype=torch.float64)
    num = lamb * w
    for c, attributes in debiased:
        target = w @ c
        for c_a, w_a in attributes:
            target = target + w_a * (w @ c).norm() / (w @ c_a).norm() * (w @ c_a)
        num = num + erase_scale * torch.outer(target + b_vec, c)
        b = b + erase_scale * torch.outer(c, c)
    for block in pairs:
        alpha = 0.0
        if technique == "tensor":
            wc = torch.stack([w @ c for c, _ in block])
            wg = torch.stack([w @ g for _, g in block])
            alpha = float((wc * wg).sum() / (wc * wc).sum())
        for c, g in block:
            target = w @ g - alpha * (w @ c)
            num = num + erase_scale * torch.outer(target + b_vec, c)
            b = b + erase_scale * torch.outer(c, c)
    for p in preserved:
        num = num + preserve_scale * torch.outer(w @ p + b_vec, p)
        b = b + preserve_scale * torch.outer(p, p)
    return num @ torch.linalg.inv(b)


def reference_weights(pipe, originals, erase, guides, preserve, mode, erase_scale, preserve_scale, lamb, technique):
    """Reference edited weight of every target layer of `pipe` (by name), from its `originals` (name → weight)."""
    out = {}
    for names, encode in groups(pipe):
        pairs, kept = select_tokens(pipe, erase, guides, preserve, mode, encode)
        for name in names:
            module = denoiser(pipe).get_submodule(name)
            out[name] = reference_layer(originals[name], pairs, kept, erase_scale, preserve_scale, lamb, technique,
                                        bias=module.bias)
    return out


def probe_layers(pipe, concept, attributes):
    """Before an edit: per target group, one value layer (name, weight, bias) and the last tokens of `concept` and of
    ``"{attribute} {concept}"`` as that group reads them."""
    probes = []
    for names, encode in groups(pipe):
        name = next((n for n in names if n.startswith("mid_block") and n.endswith("to_v")), names[0])
        module = denoiser(pipe).get_submodule(name)
        states = full_states(pipe, [concept, *(f"{a} {concept}" for a in attributes)], encode)
        probes.append((name, module.weight.detach().double().clone(), module.bias, [s[k] for s, k in states.values()]))
    return probes


def attribute_shift(pipe, probes):
    """After a fused debias edit of the probed concept alone (default scales): per probe, the shift of the concept's
    output caused by its attribute weights, ``(W' − W'_0) c``, and the attributes' unit outputs ``W c_a / ‖W c_a‖``.

    ``W'_0`` is the oracle's solve of the same target with zero weights: ``W`` itself without a bias; with FLUX's kept
    bias, whose targets include ``b`` (DESIGN.md §1), it already moves ``c`` by a multiple of ``b``.
    """
    out = []
    for name, w, bias, (c, *attributes) in probes:
        zero = reference_layer(w, [], [], 1.0, 1.0, 0.5, "replace", [(c, [(a, 0.0) for a in attributes])], bias=bias)
        edited = denoiser(pipe).get_submodule(name).weight.detach().double()
        out.append((name, (edited - zero) @ c, [w @ a / (w @ a).norm() for a in attributes], (w @ c).norm()))
    return out


def _harden_tokens(pipe, erase, guides, token_mode, tokens, preserve, encode):
    """RECE's tokens (DESIGN.md §8.1) per concept: "all" pairs every position of the concept with the same position of
    its guide (an empty guide encoded as " "); "record" uses the edit's own pairs. Preserved prompts contribute every
    position ("all" or "paper") or their last token."""
    if tokens == "all":
        states = full_states(pipe, list(erase) + [g or " " for g in guides] + list(preserve), encode)
        pairs = []
        for e, g in zip(erase, guides):
            se, sg = states[e][0], states[g or " "][0]
            pairs.append([(se[i], sg[i]) for i in range(se.shape[0])])
    else:
        pairs, _ = select_tokens(pipe, erase, guides, [], token_mode, encode)
        states = full_states(pipe, list(preserve), encode)
    kept = []
    for p in preserve:
        sp, kp = states[p]
        kept.extend([sp[kp]] if tokens != "all" and token_mode == "last" else [sp[i] for i in range(sp.shape[0])])
    return pairs, kept


def reference_hardening(pipe, originals, edited, erase, guides, token_mode, rounds, reg, lamb=0.1, preserve_scale=0.1,
                        tokens="all", preserve=None):
    """RECE rounds on top of `edited` (name → weight after the UCE edit), layer by layer, explicit inverses.

    Each round, per target group: ``c' = (ρI + Σ_ℓ W'_ℓᵀ W'_ℓ)⁻¹ (Σ_ℓ W'_ℓᵀ W_ℓ) c`` for every erased token, then per
    layer the UCE edit from the current weights that maps ``c'`` to ``c*`` and preserves ``p`` (targets include a
    layer's bias). Returns the hardened weights and, per round (before the first and after each), the recovery
    ``1 − ‖W'c' − Wc‖ / ‖Wc − Wc*‖`` of each concept, summed over layers and groups.
    """
    preserve = [" "] * len(erase) if preserve is None else list(preserve)
    current = {n: w.double().clone() for n, w in edited.items()}
    sums = torch.zeros(rounds + 1, 2, len(erase), dtype=torch.float64)
    for names, encode in groups(pipe):
        pairs, kept = _harden_tokens(pipe, erase, guides, token_mode, tokens, preserve, encode)
        d = pairs[0][0][0].shape[0]
        biases = {n: denoiser(pipe).get_submodule(n).bias for n in names}
        for r in range(rounds + 1):
            a = reg * torch.eye(d, dtype=torch.float64) + sum(current[n].T @ current[n] for n in names)
            b = sum(current[n].T @ originals[n].double() for n in names)
            attack = torch.linalg.inv(a) @ b
            adversarial = [[attack @ c for c, _ in block] for block in pairs]
            for i, block in enumerate(pairs):
                for (c, g), x in zip(block, adversarial[i]):
                    for n in names:
                        w = originals[n].double()
                        sums[r, 0, i] += (current[n] @ x - w @ c).square().sum()
                        sums[r, 1, i] += (w @ c - w @ g).square().sum()
            if r == rounds:
                break
            flat = [(x, g) for block, xs in zip(pairs, adversarial) for (_, g), x in zip(block, xs)]
            inv = lamb * torch.eye(d, dtype=torch.float64)
            for x, _ in flat:
                inv = inv + torch.outer(x, x)
            for p in kept:
                inv = inv + preserve_scale * torch.outer(p, p)
            inv = torch.linalg.inv(inv)
            for n in names:
                w = current[n]
                bias = torch.zeros(w.shape[0], dtype=torch.float64) if biases[n] is None else biases[n].double()
                num = lamb * w
                for x, g in flat:
                    num = num + torch.outer(w @ g + bias, x)
                for p in kept:
                    num = num + preserve_scale * torch.outer(w @ p + bias, p)
                current[n] = num @ inv
    return current, 1 - (sums[:, 0] / sums[:, 1]).sqrt()
