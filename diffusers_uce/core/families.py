"""Pipeline families: which layers UCE edits and which text states feed them.

A family is a list of *target groups*. A group is a set of linear maps of the same text tokens ``c ∈ R^d``: one
shared transform is solved per group. SD 1.x/2.x and SDXL have one group (every cross-attention ``to_k``/``to_v`` of
the UNet); FLUX has two (``context_embedder`` on the T5 states and the pooled-CLIP ``text_embedder.linear_1``), each
with its own width and its own encoder. Everything else in the package is written against these descriptions, so a
new family is a new `Family` here plus a pipeline class.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TextStates:
    """How the tokens of a target group are computed from prompts: what the pipeline conditions those layers on.

    Args:
        encoders (`tuple[tuple[str, str], ...]`): ``(tokenizer, text encoder)`` pipeline attributes; the states of
            several encoders are concatenated along the feature axis (SDXL). The first tokenizer gives ``k``.
        output (`str`): `"last"` (``text_encoder(ids)[0]``), `"penultimate"` (``hidden_states[-2]``) or `"pooled"`
            (``pooler_output``: one token per prompt).
        causal (`bool`): the encoder is causal (CLIP), so ids may be cut after the last needed position.
        max_length (`int`, *optional*): padded length; the tokenizer's ``model_max_length`` when `None`.
    """

    encoders: tuple[tuple[str, str], ...]
    output: str = "last"
    causal: bool = True
    max_length: int | None = None


@dataclass(frozen=True)
class TargetGroup:
    """Linear maps of one kind of text token, edited with one shared transform.

    Args:
        name (`str`): key prefix of the group in edit files (``"unet"``, ``"transformer.context_embedder"``).
        component (`str`): pipeline attribute holding the layers (``"unet"``, ``"transformer"``).
        text (`TextStates`): the tokens the layers read.
        modules (`tuple[str, ...]`): names of the linear layers inside `component`; empty means every
            cross-attention (``attn2``) ``to_k``/``to_v``.
    """

    name: str
    component: str
    text: TextStates
    modules: tuple[str, ...] = ()

    @property
    def cross_attention(self) -> bool:
        return not self.modules

    def text_width(self, pipe) -> int:
        """Width of the tokens these layers read in `pipe`: its encoders' hidden sizes, concatenated."""
        return sum(int(getattr(pipe, encoder).config.hidden_size) for _, encoder in self.text.encoders)


@dataclass(frozen=True)
class Family:
    """A pipeline family.

    Args:
        name (`str`): ``"stable-diffusion"``, ``"stable-diffusion-xl"`` or ``"flux"``.
        groups (`tuple[TargetGroup, ...]`): its target groups, solved in this order.
        tags (`tuple[str, ...]`): Hub tags of an edited model of this family.
        pipeline (`str`): the diffusers pipeline class it is built on.
    """

    name: str
    groups: tuple[TargetGroup, ...]
    tags: tuple[str, ...] = field(default=())
    pipeline: str = "StableDiffusionPipeline"

    @property
    def named_layers(self) -> str:
        """The named layers the family edits (FLUX's), for messages."""
        return ", ".join(m for g in self.groups for m in g.modules)

    @property
    def has_keys(self) -> bool:
        """Whether the family edits key/value projections (so `edit_keys` means something)."""
        return all(g.cross_attention for g in self.groups)


_CLIP = (("tokenizer", "text_encoder"),)

STABLE_DIFFUSION = Family(
    "stable-diffusion",
    (TargetGroup("unet", "unet", TextStates(_CLIP)),),
    tags=("stable-diffusion", "stable-diffusion-diffusers", "text-to-image"),
)

# SDXL conditions its UNet on both CLIP towers' penultimate states, concatenated
# (StableDiffusionXLPipeline.encode_prompt).
STABLE_DIFFUSION_XL = Family(
    "stable-diffusion-xl",
    (TargetGroup("unet", "unet", TextStates((*_CLIP, ("tokenizer_2", "text_encoder_2")), output="penultimate")),),
    tags=("stable-diffusion-xl", "stable-diffusion-xl-diffusers", "text-to-image"),
    pipeline="StableDiffusionXLPipeline",
)

# FLUX: the T5 states enter through transformer.context_embedder (bidirectional encoder, padded to the pipeline's
# default max_sequence_length of 512), the pooled CLIP embedding through time_text_embed.text_embedder.linear_1.
FLUX = Family(
    "flux",
    (
        TargetGroup("transformer.context_embedder", "transformer",
                    TextStates((("tokenizer_2", "text_encoder_2"),), causal=False, max_length=512),
                    modules=("context_embedder",)),
        TargetGroup("transformer.text_embedder", "transformer",
                    TextStates(_CLIP, output="pooled", causal=False),
                    modules=("time_text_embed.text_embedder.linear_1",)),
    ),
    tags=("flux", "flux-diffusers", "text-to-image"),
    pipeline="FluxPipeline",
)

FAMILIES = (STABLE_DIFFUSION, STABLE_DIFFUSION_XL, FLUX)


def family_of(pipeline_class: type) -> Family:
    """The family of a diffusers pipeline class (by its base classes' names), or a `TypeError` naming what works."""
    names = {c.__name__ for c in pipeline_class.__mro__}
    for family in FAMILIES:
        if family.pipeline in names:
            return family
    supported = ", ".join(f.pipeline for f in FAMILIES)
    raise TypeError(f"concept editing supports {supported} (and their subclasses), got {pipeline_class.__name__}")
