"""Hardening as part of an edit: its options, the tokens it reads, its replay on a solved edit, and the robustness
numbers of the report.

A hardened edit is solved as usual (jointly with every other edit, from the original weights), then the hardening
rounds of each hardened edit run on top of the solution, in edit order (`robust.hardening_round`): ``T ← T S_1 ⋯ S_k``.
Every erased concept gets its adversarial recovery ``1 − ‖W'c' − Wc‖ / ‖Wc − Wc*‖`` and norm ratio ``‖c'‖/‖c‖``,
summed over the layers of every target group before the ratios are taken.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from ..utils.checks import all_finite, is_finite_number, is_whole_number
from .limits import MAX_HARDEN_ROUNDS, MAX_PROMPTS, check_count
from .prompts import EncodedPrompts
from .robust import _attack, _edit_inputs, _further_edit, _positive, attack_system
from .solve import homogeneous, transform_from_sums, with_bias

HARDEN_TOKENS = ("all", "record")
HARDEN_OPTIONS = ("reg", "lamb", "preserve_scale", "preserve", "tokens")
REPORT_REG = 0.1  # the attacker's ρ of the robustness numbers of an edit that is not hardened
# How an edit that is not hardened is measured: no rounds, at REPORT_REG, with its own tokens.
NOT_HARDENED = {"rounds": 0, "reg": REPORT_REG, "lamb": 0.1, "preserve_scale": 0.1, "preserve": (), "tokens": "record"}


@dataclass(frozen=True)
class HardenOptions:
    """Options of the hardening rounds (RECE, Gong et al., ECCV 2024); the defaults are the authors'.

    Args:
        reg (`float`, *optional*): the attacker's regulariser ``ρ`` (> 0): smaller lets the attacker go further from
            the concept's embedding, so the rounds harden against stronger attacks (and change the model more). By
            default 0.1, and 1e-3 for `expand_prompts="art"` / `"object"` edits.
        lamb (`float`, defaults to 0.1): the regulariser ``λ`` of each round's edit (> 0).
        preserve_scale (`float`, defaults to 0.1): weight of the preserved prompts in each round (> 0).
        preserve (`list[str]`, *optional*): prompts each round preserves; by default `" "` once per erased concept.
        tokens (`str`, defaults to `"all"`): `"all"`: every position of the erased prompt, paired with every position
            of the guide's (an empty guide encoded as `" "`), preserved prompts at every position; `"record"`: the same
            tokens as the edit itself (its `token_mode`).
    """

    reg: float | None = None
    lamb: float = 0.1
    preserve_scale: float = 0.1
    preserve: tuple[str, ...] | None = None
    tokens: str = "all"


def harden_preset(erase, moderate=None, expand_prompts=None) -> tuple[int, float]:
    """Rounds and ``ρ`` of `harden=True` (the authors' settings): moderation and "nudity" 3 rounds at 0.1, artists and
    objects (`expand_prompts`) 1 round at 1e-3, other concepts 2 rounds at 0.1 (as the authors' I2P concepts)."""
    if moderate is not None or [e.lower() for e in erase] == ["nudity"]:
        return 3, 0.1
    if expand_prompts is not None:
        return 1, 1e-3
    return 2, 0.1


def _positive_option(options: dict, name: str) -> float:
    value = options[name]
    if not is_finite_number(value) or value <= 0:
        raise ValueError(f"harden_options[{name!r}] must be a finite number > 0, got {value!r}")
    return float(value)


def resolve_harden(harden, options=None, *, erase, moderate=None, expand_prompts=None) -> dict | None:
    """Validate `harden` / `harden_options` of one edit into the dict its record stores (`None`: not hardened).

    Args:
        harden (`bool` or `int`): `True` for the preset of the edit (`harden_preset`), or a number of rounds (>= 0).
        options (`dict` or `HardenOptions`, *optional*): see `HardenOptions`.
        erase (`Sequence[str]`): the erased prompts of the edit (hardening needs at least one).

    Returns:
        `dict` or `None`: ``{"rounds", "reg", "lamb", "preserve_scale", "preserve", "tokens"}``, all resolved.
    """
    if harden is None:
        harden = False
    if not (isinstance(harden, bool) or is_whole_number(harden)):
        raise ValueError(f"harden must be True/False or a number of rounds >= 0, got {harden!r}")
    if not isinstance(harden, bool):
        check_count(harden, "harden (the number of hardening rounds)", MAX_HARDEN_ROUNDS)
    if isinstance(options, HardenOptions):
        options = {k: v for k, v in options.__dict__.items() if v is not None}
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"harden_options must be a dict or a HardenOptions, got {type(options).__name__}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(HARDEN_OPTIONS))
    if unknown:
        raise ValueError(f"unknown harden_options {unknown}; use {', '.join(HARDEN_OPTIONS)}")
    if harden is False or harden == 0:
        if options:
            raise ValueError("harden_options given without harden: pass harden=True or a number of rounds")
        return None
    if not erase:
        raise ValueError("harden needs erased concepts: hardening protects erased concepts, and this edit erases none")
    rounds, reg = harden_preset(erase, moderate, expand_prompts)
    rounds = rounds if harden is True else int(harden)
    defaults = HardenOptions()
    options = {"reg": reg, "lamb": defaults.lamb, "preserve_scale": defaults.preserve_scale, "tokens": defaults.tokens,
               **options}
    resolved = {"rounds": rounds, **{k: _positive_option(options, k) for k in ("reg", "lamb", "preserve_scale")}}
    preserve = options.get("preserve")
    if preserve is None:
        preserve = [" "] * len(erase)
    elif isinstance(preserve, str):
        preserve = [preserve]
    if not isinstance(preserve, (list, tuple)) or not all(isinstance(p, str) for p in preserve):
        raise ValueError(f"harden_options['preserve'] must be a string or a list of strings, got {preserve!r}")
    check_count(len(preserve), "the number of harden_options['preserve'] prompts", MAX_PROMPTS)
    if options["tokens"] not in HARDEN_TOKENS:
        raise ValueError(f"harden_options['tokens'] must be one of {HARDEN_TOKENS}, got {options['tokens']!r}")
    return {**resolved, "preserve": tuple(preserve), "tokens": options["tokens"]}


def check_harden_record(data, erase) -> dict | None:
    """Validate the stored hardening of an edit record (`ConceptEdit.harden`), as `resolve_harden` made it."""
    if data is None:
        return None
    if not isinstance(data, dict) or set(data) != {"rounds", *HARDEN_OPTIONS}:
        raise ValueError(f"invalid hardening in edit record: {data!r}")
    if not is_whole_number(data["rounds"], 1):
        raise ValueError(f"harden rounds must be an integer >= 1, got {data['rounds']!r}")
    check_count(data["rounds"], "the number of hardening rounds of the edit record", MAX_HARDEN_ROUNDS)
    return resolve_harden(data["rounds"], {k: data[k] for k in HARDEN_OPTIONS}, erase=erase)


def hardening_prompts(records) -> list[str]:
    """The prompts the hardening (and robustness numbers) of `records` read, beyond the edits' own."""
    out = []
    for record in records:
        if record.harden and record.harden["tokens"] == "all":
            out += [g or " " for g in record.guide]
        if record.harden:
            out += list(record.harden["preserve"])
    return out


def needs_full_states(records) -> bool:
    """Whether some hardening reads every position of its prompts (no causal cut of the encoding)."""
    return any(r.harden and r.harden["tokens"] == "all" for r in records)


@dataclass
class HardenBlock:
    """The tokens and options of one edit's hardening (or of its robustness measurement, with ``rounds = 0``)."""

    erase: torch.Tensor
    guide: torch.Tensor
    concept: torch.Tensor
    num_concepts: int
    preserve: torch.Tensor
    preserve_weight: torch.Tensor
    rounds: int
    reg: float
    lamb: float
    guide_key: torch.Tensor | None = None  # one integer per guide token, equal for equal tokens (finds the distinct)


def hardening_blocks(records, encoded: EncodedPrompts, biased: bool) -> list[HardenBlock]:
    """One block per record that erases something, in record order; homogeneous tokens for a biased group."""
    states, length = encoded.states, encoded.max_length
    blocks = []
    for record in records:
        if not record.erase:
            continue
        options = record.harden or NOT_HARDENED
        rows_e = encoded.rows(record.erase)
        if options["tokens"] == "all":
            rows_g = encoded.rows([g or " " for g in record.guide])
            pair, pos_e = encoded.preserved(rows_e, "paper")  # every position of every prompt
            pos_g = pos_e
        else:
            rows_g = encoded.rows([record.guide_prompt(g) for g in record.guide])
            pair, pos_e, pos_g = encoded.pairs(rows_e, rows_g, record.token_mode)
        preserve, weight = [], []
        for prompt, count in Counter(options["preserve"]).items():
            row = encoded.rows([prompt])
            _, pos = encoded.preserved(row, "paper" if options["tokens"] == "all" else record.token_mode)
            preserve.append(states[row[0], pos])
            weight.append(torch.full((len(pos),), options["preserve_scale"] * count, dtype=torch.float64,
                                     device=states.device))
        empty = states.new_zeros((0, states.shape[-1]))
        tokens = [states[rows_e[pair], pos_e], states[rows_g[pair], pos_g], torch.cat(preserve) if preserve else empty]
        tokens = [homogeneous(t.double()) if biased else t.double() for t in tokens]
        blocks.append(HardenBlock(tokens[0], tokens[1], pair, len(record.erase), tokens[2],
                                  torch.cat(weight) if weight else tokens[2][:, 0], options["rounds"],
                                  options["reg"], options["lamb"], guide_key=rows_g[pair] * length + pos_g))
    return blocks


GRAM_BUDGET = 2**29  # bytes of per-concept token Grams a replay may keep; beyond, one token product per measurement
SUMS_FROM = 2.0  # rounds from token sums (`BlockSums`) when a block has more than this many tokens per width


def _concept_sum(block: HardenBlock, values: torch.Tensor) -> torch.Tensor:
    """`values` (one per token, or one row per token) summed over the tokens of each concept of `block`."""
    out = torch.zeros(block.num_concepts, *values.shape[1:], dtype=torch.float64, device=values.device)
    return out.index_add_(0, block.concept, values)


def _per_concept(block: HardenBlock, rows, metric=None) -> torch.Tensor:
    """``Σ rowᵀ metric row`` (or ``Σ ‖row‖²``) over the rows of each concept of `block`."""
    return _concept_sum(block, ((rows if metric is None else rows @ metric) * rows).sum(-1))


def recovery_sums(block: HardenBlock, adversarial, moved, fixed, biased: bool) -> torch.Tensor:
    """`measure` from the adversarial tokens themselves (few tokens): `moved` is ``‖W T c' − W c‖² − ‖W c‖²`` per
    token (from the attack), `fixed` what does not depend on the round (`fixed_sums`)."""
    k = adversarial.shape[1] - biased
    recovered = _concept_sum(block, moved + fixed[2]).clamp_min(0)  # (rounding may dip below 0)
    return torch.stack([recovered, fixed[0], _per_concept(block, adversarial[:, :k]), fixed[1]])


def fixed_sums(gram, block: HardenBlock, biased: bool):
    """``Σ‖W c − W c*‖²`` and ``Σ‖c‖²`` per concept and ``‖W c‖²`` per token (the round-invariant parts)."""
    k = gram.shape[0] - biased
    return (_per_concept(block, block.erase - block.guide, gram), _per_concept(block, block.erase[:, :k]),
            ((block.erase @ gram) * block.erase).sum(-1))


@dataclass
class BlockSums:
    """The token sums of one block that do not change from round to round (float64, homogeneous when biased).

    A round's attack is linear, ``c' = K c`` (an affine map of ``[c; 1]`` with a bias), so every sum over the
    adversarial tokens comes from these: ``Σ c'c'ᵀ = K (Σ c cᵀ) Kᵀ``, ``Σ c* c'ᵀ = (Σ c* cᵀ) Kᵀ``, and per concept
    ``Σ c'ᵀ Q c' = tr(KᵀQK · Σ c cᵀ)``: a round costs a few d×d products whatever the number of tokens.
    """

    erase: torch.Tensor  # Σ c cᵀ
    cross: tuple  # Σ c* cᵀ = Uᵀ V as (U, V): U the distinct guide tokens (often one prompt for all), V their Σ c
    preserve: torch.Tensor  # Σ w_p p pᵀ
    grams: torch.Tensor | None  # Σ c cᵀ per concept, (n, w, w); None past GRAM_BUDGET (then token products)
    gap: torch.Tensor  # Σ ‖W c − W c*‖² per concept
    norm: torch.Tensor  # Σ ‖c‖² per concept (the constant coordinate excluded)


def block_sums(gram, block: HardenBlock, biased: bool, budget: int | None = None) -> BlockSums:
    """The round-invariant sums of `block`: O(tokens · d²) once, instead of in every round."""
    erase, width = block.erase, gram.shape[0]
    k = width - biased
    grams = None
    if block.num_concepts * width * width * 8 <= (GRAM_BUDGET if budget is None else budget):
        counts = torch.bincount(block.concept, minlength=block.num_concepts)
        if bool((counts == counts[0]).all()) and bool((block.concept.diff() >= 0).all()):  # "all": 77 rows each
            rows = erase.reshape(block.num_concepts, -1, width)
            grams = rows.transpose(1, 2) @ rows
        else:
            grams = erase.new_empty(block.num_concepts, width, width)
            for i, rows in enumerate(erase[torch.argsort(block.concept, stable=True)].split(counts.tolist())):
                torch.matmul(rows.T, rows, out=grams[i])
    if block.guide_key is None:  # often one guide prompt for all
        guides, where = torch.unique(block.guide, dim=0, return_inverse=True)
    else:  # the same from the (prompt, position) of each guide token: no comparison of rows
        keys, where = torch.unique(block.guide_key, return_inverse=True)
        first = where.new_empty(len(keys)).scatter_(0, where, torch.arange(len(where), device=where.device))
        guides = block.guide[first]
    if 2 * guides.shape[0] < block.guide.shape[0]:
        cross = (guides, torch.zeros_like(guides).index_add_(0, where, erase))
    else:
        cross = (block.guide.T @ erase, None)  # (Σ c* cᵀ, None)
    return BlockSums(erase=grams.sum(0) if grams is not None else erase.T @ erase, cross=cross,
                     preserve=(block.preserve * block.preserve_weight[:, None]).T @ block.preserve, grams=grams,
                     gap=_per_concept(block, erase - block.guide, gram), norm=_per_concept(block, erase[:, :k]))


def attack_map(gram, transform, reg: float, biased: bool):
    """The attack of `robust.adversarial_embeddings` as one matrix: ``c' = L [c; 1]`` (``c' = L c`` without a bias).

    Returns ``L`` (k×w), ``R = (ρI + M_kk) L`` (the attack's right-hand sides), ``M = TᵀGT`` and ``G T``."""
    factor, m, gt = attack_system(gram, transform, reg, biased)
    k = gram.shape[0] - biased
    rhs = gt.T[:k].clone()
    if biased:
        rhs[:, k] -= m[:k, k]
    return torch.cholesky_solve(rhs, factor), rhs, m, gt


def measure(block: HardenBlock, sums: BlockSums, gram, attack, reg: float, biased: bool) -> torch.Tensor:
    """Per concept: ``Σ‖W T c' − W c‖²``, ``Σ‖W c − W c*‖²``, ``Σ‖c'‖²``, ``Σ‖c‖²``; shape ``(4, n)``.

    With ``x = L c`` and ``(ρI + M) x = R c``: ``‖WTx − Wc‖² = cᵀ(G − LᵀR − ρLᵀL)c`` (plus ``M_11 − 2 (TᵀG c)_1``
    with a bias), a quadratic form in the erased tokens like ``‖x‖² = cᵀLᵀLc``."""
    lmap, rhs, m, gt = attack
    norm = lmap.T @ lmap
    moved = torch.addmm(gram, lmap.T, torch.add(rhs, lmap, alpha=reg), alpha=-1)  # G − Lᵀ(R + ρL)
    if biased:
        k = gram.shape[0] - 1
        moved[k] -= 2 * gt[:, k]
        moved[k, k] += m[k, k]
    forms = torch.stack([moved, norm])
    if sums.grams is not None:  # tr(Q Γ_g), Γ_g symmetric
        values = sums.grams.flatten(1) @ forms.flatten(1).T
    else:
        width = gram.shape[0]
        products = (block.erase @ forms.transpose(0, 1).reshape(width, -1)).reshape(-1, 2, width)
        values = _concept_sum(block, (products * block.erase[:, None]).sum(-1))
    return torch.stack([values[:, 0].clamp_min(0), sums.gap, values[:, 1], sums.norm])  # (rounding may dip below 0)


def further_step(sums: BlockSums, lmap, lamb: float, biased: bool) -> torch.Tensor:
    """The round's edit ``S`` (`robust.hardening_round`) from the sums: ``Σ c'c'ᵀ = L (Σ c cᵀ) Lᵀ``,
    ``Σ c* c'ᵀ = (Σ c* cᵀ) Lᵀ`` and, with a bias, ``Σ c' = L Σ [c; 1]``."""
    k = lmap.shape[0]
    moved = lmap @ sums.erase
    left, right = sums.cross
    cross = left[:k] @ lmap.T if right is None else left[:, :k].T @ (right @ lmap.T)  # Σ c* c'ᵀ
    step, factor = transform_from_sums(moved @ lmap.T, cross, sums.preserve[:k, :k], lamb)
    if not biased:
        return step
    total = moved[:, k] + sums.preserve[:k, k]  # Σ c' + Σ w_p p (the constant coordinate of each token is 1)
    return with_bias(step, None, torch.cholesky_solve(total[:, None], factor)[:, 0])[0]


def replay_hardening(gram, transform, blocks: list[HardenBlock], biased: bool):
    """Run the hardening rounds of every block in order on `transform`, measuring recovery before and after each.

    Blocks without rounds are measured (at their ``ρ``) against the final transform.

    Returns:
        `tuple[torch.Tensor, list[torch.Tensor]]`: the hardened transform (float64) and, per block, the sums of
        `measure` before hardening and after each round, shape ``(rounds + 1, 4, n)``.
    """
    current = transform.to(gram.device, torch.float64)
    sums: list = [None] * len(blocks)
    for b in blocks:  # checked once here; the rounds then call the unchecked math (same formulas)
        _positive("reg", b.reg)
        _edit_inputs(gram, b.erase, b.guide, b.preserve, biased, b.lamb, 1.0, b.preserve_weight)
        if not all_finite(b.erase):
            raise ValueError("the erased tokens have non-finite entries (inf or nan); nothing was changed")
    for i, b in enumerate(blocks):
        if not b.rounds:
            continue
        by_sums = b.erase.shape[0] > SUMS_FROM * gram.shape[0]  # a round: O(d³) from sums, or O(tokens · d²)
        rows, fixed = [], block_sums(gram, b, biased) if by_sums else fixed_sums(gram, b, biased)
        for r in range(b.rounds + 1):
            if by_sums:
                attack = attack_map(gram, current, b.reg, biased)
                adversarial = attack[0]
            else:
                adversarial, moved = _attack(gram, current, b.erase, b.reg, biased, terms=True)
            if not all_finite(adversarial):
                raise ValueError(f"hardening round {r} produced non-finite values; nothing was changed: use a "
                                 "larger reg or lamb, or fewer rounds")
            rows.append(measure(b, fixed, gram, attack, b.reg, biased) if by_sums
                        else recovery_sums(b, adversarial, moved, fixed, biased))
            if r == b.rounds:
                break
            current = current @ (further_step(fixed, adversarial, b.lamb, biased) if by_sums else _further_edit(
                adversarial, b.guide, b.preserve, b.lamb, 1.0, b.preserve_weight, biased))
        sums[i] = torch.stack(rows)
    measured = [i for i, b in enumerate(blocks) if not b.rounds]
    for reg in dict.fromkeys(blocks[i].reg for i in measured):  # one attack of all their tokens per ρ
        same = [i for i in measured if blocks[i].reg == reg]
        sizes = [blocks[i].erase.shape[0] for i in same]  # from the adversarial tokens: cheaper than from sums
        tokens = torch.cat([blocks[i].erase for i in same])
        adversarial, moved = _attack(gram, current, tokens, reg, biased, terms=True)
        for i, x, m in zip(same, adversarial.split(sizes), moved.split(sizes)):
            sums[i] = recovery_sums(blocks[i], x, m, fixed_sums(gram, blocks[i], biased), biased)[None]
    return current, sums


def robustness_rows(records, group_sums: list[list[torch.Tensor]]) -> list[dict]:
    """The report's robustness rows from the sums of every target group (added up before the ratios are taken)."""
    total = [sum(parts) for parts in zip(*group_sums)]
    out, erasing = [], [r for r in records if r.erase]
    for record, sums in zip(erasing, total):
        moved, gap, top, bottom = sums.unbind(1)
        recovery = torch.where(gap > 0, 1 - (moved / gap.clamp_min(1e-300)).sqrt(), 0.0)
        ratio = torch.where(bottom > 0, (top / bottom.clamp_min(1e-300)).sqrt(), 0.0)
        harden = record.harden or NOT_HARDENED
        for j, (concept, guide) in enumerate(zip(record.erase, record.guide)):
            out.append({"concept": concept, "guide": guide, "reg": harden["reg"], "rounds": harden["rounds"],
                        "tokens": harden["tokens"],
                        "recovery": recovery[:, j].tolist(), "norm_ratio": ratio[:, j].tolist()})
    return out
