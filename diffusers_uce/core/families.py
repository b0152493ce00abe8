"""Pipeline families: which layers UCE edits and which text states feed them.

A family is a list of *target groups*. A group is a set of linear maps of the same text tokens ``c ∈ R^d``: one
shared transform is solved per group. SD 1.x/2.x and SDXL have one group (every cross-attention ``to_k``/``to_v`` of
the UNet); FLUX has two (``context_embedder`` on the T5 states and the pooled-CLIP ``text_embedder.linear_1``), each
with its own width and its own encoder. The edited layers are the first linear layers whose input depends on the text
alone and whose output then meets the image stream, so an edit is exact at every denoising step and resolution.

SD 1.x/2.x, SDXL and FLUX.1 encode prompts here, with their tokenizers and text encoders. The other families read
their layers' inputs from the pipeline itself (`TextStates.captured`): the pipeline encodes the prompts its own way
(chat templates, instruction prefixes, projections and norms inside the denoiser) and forward hooks on the layers
record what they receive. Everything else in the package is written against these descriptions, so a new family is
a new `Family` here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .targets import expand_names


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
        captured (`bool`): the layers' inputs are recorded from the pipeline's own call (forward hooks), not encoded
            here; `encoders` then only names what the states depend on, and `output` `"pooled"` means one vector per
            prompt.
        segments (`tuple[Segment, ...]`): for captured inputs, which tokenizer fills which positions (one run
            per text encoder whose states the layers read one after the other).
    """

    encoders: tuple[tuple[str, str], ...]
    output: str = "last"
    causal: bool = True
    max_length: int | None = None
    captured: bool = False
    segments: tuple["Segment", ...] = ()


@dataclass(frozen=True)
class Segment:
    """A run of positions of a captured input filled by one text encoder, and where a prompt's last token is in it.

    A prompt's ``k`` in the run is ``offset + prefix + n − 1``, ``n`` being the number of the prompt's own tokens
    (without special tokens, counted on the text as the pipeline preprocesses it): the authors' "attention-mask
    ones − 2" for a tokenizer that adds a start and an end token. For ``""`` without a start token (T5) that would be
    before the run: ``k`` is then the run's first position (T5's end token, which the pipelines' attention masks keep)
    unless `wrap`, and it never passes the run's last position.

    Args:
        tokenizer (`str`): the pipeline attribute of the tokenizer that fills the run.
        offset (`int`): the run's first position in the layer's input sequence.
        length (`int`, *optional*): its number of positions; up to the end of the sequence when `None`.
        prefix (`int`, *optional*): tokens before the prompt's own tokens in the run (CLIP's start token: 1); counted
            from the tokenizer (its special tokens before a word) when `None`.
        wrap (`bool`, *optional*, defaults to `False`): a ``k`` before the run is its last position instead of its
            first (the authors' scripts index with ``mask.sum() − 2``, which is −1 for ``""`` without a start token).
        suffix (`int`, *optional*): for runs padded on the left (FLUX.2's Mistral template), the number of template
            tokens after the prompt: ``k`` is then ``offset + length − 1 − suffix`` for every prompt.
    """

    tokenizer: str
    offset: int = 0
    length: int | None = None
    prefix: int | None = None
    wrap: bool = False
    suffix: int | None = None


@dataclass(frozen=True)
class TargetGroup:
    """Linear maps of one kind of text token, edited with one shared transform.

    Args:
        name (`str`): key prefix of the group in edit files (``"unet"``, ``"transformer.context_embedder"``).
        component (`str`): pipeline attribute holding the layers (``"unet"``, ``"transformer"``).
        text (`TextStates`): the tokens the layers read.
        modules (`tuple[str, ...]`): names of the linear layers inside `component` (``*`` stands for one name part);
            empty means every cross-attention (``attn2``) ``to_k``/``to_v``.
        per_layer (`bool`): each matched layer reads its own input (HiDream's caption projections, one per Llama
            layer): `specialise` makes one group of each.
        last_text (`TextStates`, *optional*): with `per_layer`, what the last matched layer reads instead of `text`
            (HiDream's last caption projection reads T5).
        optional (`bool`): the pipeline may leave `component` out (Wan 2.2's second expert); the group is then
            skipped.
        bias_in_targets (`bool`): the layers' bias is part of every target, ``W′ = W T + b uᵀ``, as the authors'
            FLUX.1 script solves it. Otherwise (the default) a bias is a constant that cancels out of the targets,
            and ``W′ = W T`` maps each erased token's output exactly as the guide's would be mapped.
        layer_group (`bool`): the group is one layer of a `per_layer` group (set by `specialise`); such families have
            dozens of groups, so narrower ones already take the low-rank solve (`wide.is_wide`).
    """

    name: str
    component: str
    text: TextStates
    modules: tuple[str, ...] = ()
    per_layer: bool = False
    last_text: TextStates | None = None
    bias_in_targets: bool = False
    optional: bool = False
    layer_group: bool = False

    @property
    def cross_attention(self) -> bool:
        return not self.modules

    @property
    def has_keys(self) -> bool:
        """Whether the group edits key projections (so that `edit_keys=False` drops some of its layers)."""
        return self.cross_attention or any(m.endswith("to_k") for m in self.modules)

    def text_width(self, pipe) -> int:
        """Width of the tokens these layers read in `pipe`: its encoders' hidden sizes, concatenated (for a captured
        input, the layers' own input width)."""
        if self.text.captured:
            denoiser = getattr(pipe, self.component)
            return int(denoiser.get_submodule(expand_names(denoiser, self.modules)[0]).in_features)
        return sum(int(getattr(pipe, encoder).config.hidden_size) for _, encoder in self.text.encoders)


@dataclass(frozen=True)
class Family:
    """A pipeline family.

    Args:
        name (`str`): ``"stable-diffusion"``, ``"stable-diffusion-xl"`` or ``"flux"``.
        groups (`tuple[TargetGroup, ...]`): its target groups, solved in this order.
        tags (`tuple[str, ...]`): Hub tags of an edited model of this family.
        pipeline (`str`): the diffusers pipeline class it is built on.
        also (`tuple[str, ...]`): other pipeline classes of the family (same denoiser and text path).
        call (`tuple[tuple[str, object], ...]`): keyword arguments that make the pipeline's call cheap when inputs
            are captured (the smallest image or video it accepts); only those its `__call__` takes are passed.
    """

    name: str
    groups: tuple[TargetGroup, ...]
    tags: tuple[str, ...] = field(default=())
    pipeline: str = "StableDiffusionPipeline"
    also: tuple[str, ...] = ()
    call: tuple[tuple[str, object], ...] = ()

    @property
    def named_layers(self) -> str:
        """The named layers the family edits (FLUX's), for messages."""
        return ", ".join(m for g in self.groups for m in g.modules)

    @property
    def has_keys(self) -> bool:
        """Whether the family edits key/value projections (so `edit_keys` means something)."""
        return any(g.has_keys for g in self.groups)

    @property
    def pipelines(self) -> tuple[str, ...]:
        return (self.pipeline, *self.also)


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
                    modules=("context_embedder",), bias_in_targets=True),
        TargetGroup("transformer.text_embedder", "transformer",
                    TextStates(_CLIP, output="pooled", causal=False),
                    modules=("time_text_embed.text_embedder.linear_1",), bias_in_targets=True),
    ),
    tags=("flux", "flux-diffusers", "text-to-image"),
    pipeline="FluxPipeline",
)


def _captured(*segments: Segment, encoders=(("tokenizer", "text_encoder"),), output: str = "last") -> TextStates:
    return TextStates(encoders, output=output, causal=False, captured=True, segments=segments)


def _cross_attention(blocks: str) -> tuple[str, ...]:
    """Every block's cross-attention key and value projection, as module patterns."""
    return (f"{blocks}.*.attn2.to_k", f"{blocks}.*.attn2.to_v")


_T5 = Segment("tokenizer", prefix=0)
_SMALL_IMAGE = (("height", 64), ("width", 64))
_NO_GUIDANCE = (*_SMALL_IMAGE, ("guidance_scale", 1.0))  # classifier-free guidance off: one row per prompt

# SD3 / 3.5: the joint sequence is both CLIP towers' penultimate states (concatenated, zero-padded to T5's width,
# 77 positions) followed by T5's; the pooled path reads both towers' projected pooled embeddings (the FLUX.1 pattern).
SD3 = Family(
    "sd3",
    (
        TargetGroup("transformer.context_embedder", "transformer",
                    _captured(Segment("tokenizer", 0, 77, prefix=1), Segment("tokenizer_3", 77, prefix=0),
                              encoders=(("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"),
                                        ("tokenizer_3", "text_encoder_3"))),
                    modules=("context_embedder",)),
        TargetGroup("transformer.text_embedder", "transformer",
                    _captured(encoders=(("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),
                              output="pooled"),
                    modules=("time_text_embed.text_embedder.linear_1",)),
    ),
    tags=("stable-diffusion-3", "sd3", "text-to-image"),
    pipeline="StableDiffusion3Pipeline",
    call=_NO_GUIDANCE,
)

# PixArt-Σ/α: T5 states through the transformer's caption_projection, read by every block's cross-attention.
PIXART = Family(
    "pixart",
    (TargetGroup("transformer", "transformer", _captured(_T5), modules=_cross_attention("transformer_blocks")),),
    tags=("pixart", "text-to-image"),
    pipeline="PixArtSigmaPipeline",
    also=("PixArtAlphaPipeline",),
    call=(*_NO_GUIDANCE, ("clean_caption", False)),
)

# Wan 2.1/2.2: UMT5 states through condition_embedder.text_embedder, read by every block's cross-attention; Wan 2.2
# A14B's low-noise expert (transformer_2) has a text embedder of its own, so its layers are a second group.
WAN = Family(
    "wan",
    (TargetGroup("transformer", "transformer", _captured(_T5), modules=_cross_attention("blocks")),
     TargetGroup("transformer_2", "transformer_2", _captured(_T5), modules=_cross_attention("blocks"), optional=True)),
    tags=("wan", "text-to-video"),
    pipeline="WanPipeline",
    call=(*_NO_GUIDANCE, ("num_frames", 1)),
)

# CogVideoX: T5 states enter the joint sequence through patch_embed.text_proj.
COGVIDEOX = Family(
    "cogvideox",
    (TargetGroup("transformer.text_proj", "transformer", _captured(_T5), modules=("patch_embed.text_proj",)),),
    tags=("cogvideox", "text-to-video"),
    pipeline="CogVideoXPipeline",
    call=(*_NO_GUIDANCE, ("num_frames", 9)),
)

# Sana: Gemma states (instruction prefix cut away, prompt lowercased) through caption_projection and caption_norm,
# read by every block's cross-attention. The kept sequence starts with Gemma's <bos>.
SANA = Family(
    "sana",
    (TargetGroup("transformer", "transformer", _captured(Segment("tokenizer", prefix=1)),
                 modules=_cross_attention("transformer_blocks")),),
    tags=("sana", "text-to-image"),
    pipeline="SanaPipeline",
    call=(*_NO_GUIDANCE, ("use_resolution_binning", False), ("clean_caption", False)),
)

# Qwen-Image: Qwen2.5-VL's last states with the chat template's 34 prefix tokens dropped, trimmed to the batch's
# longest prompt (zeros past each prompt's own tokens, which add nothing to a solve), through txt_norm into txt_in.
# No pooled path.
QWEN_IMAGE = Family(
    "qwenimage",
    (TargetGroup("transformer.txt_in", "transformer", _captured(Segment("tokenizer", prefix=0)),
                 modules=("txt_in",)),),
    tags=("qwen-image", "text-to-image"),
    pipeline="QwenImagePipeline",
    call=_SMALL_IMAGE,
)

# FLUX.2 [dev]: three intermediate Mistral layers stacked along the features, chat template padded on the left to
# 512; the prompt's last token is always just before the closing [/INST]. No pooled path, no bias.
FLUX2 = Family(
    "flux2",
    (TargetGroup("transformer.context_embedder", "transformer", _captured(Segment("tokenizer", suffix=1)),
                 modules=("context_embedder",)),),
    tags=("flux2", "flux", "text-to-image"),
    pipeline="Flux2Pipeline",
    call=_SMALL_IMAGE,
)

# FLUX.2 [klein]: the same reader on Qwen3's stacked layers; its template puts 3 tokens before the prompt and pads on
# the right.
FLUX2_KLEIN = Family(
    "flux2-klein",
    (TargetGroup("transformer.context_embedder", "transformer", _captured(Segment("tokenizer", prefix=3)),
                 modules=("context_embedder",)),),
    tags=("flux2", "flux", "text-to-image"),
    pipeline="Flux2KleinPipeline",
    call=_NO_GUIDANCE,
)

# HiDream-I1: caption_projection[i] reads Llama hidden layer llama_layers[i], the last one T5's states: one input per
# layer, so one solve per layer, at the authors' tokens (mask ones − 2 in each tokenizer, −1 for "": the last
# padding position).
_HIDREAM_ENCODERS = (("tokenizer_4", "text_encoder_4"), ("tokenizer_3", "text_encoder_3"))
HIDREAM = Family(
    "hidream",
    (TargetGroup("transformer.caption_projection", "transformer",
                 _captured(Segment("tokenizer_4", prefix=0, wrap=True), encoders=_HIDREAM_ENCODERS),
                 modules=("caption_projection.*.linear",), per_layer=True,
                 last_text=_captured(Segment("tokenizer_3", prefix=0, wrap=True), encoders=_HIDREAM_ENCODERS)),),
    tags=("hidream", "text-to-image"),
    pipeline="HiDreamImagePipeline",
    call=_NO_GUIDANCE,
)

FAMILIES = (STABLE_DIFFUSION, STABLE_DIFFUSION_XL, FLUX, SD3, FLUX2, FLUX2_KLEIN, QWEN_IMAGE, HIDREAM, SANA, PIXART,
            WAN, COGVIDEOX)


def specialise(family: Family, denoiser, missing: tuple[str, ...] = ()) -> Family:
    """`family` with its per-layer groups expanded to one group per layer of `denoiser`, and without the optional
    groups of the components in `missing` (a family with neither is returned as it is)."""
    if any(g.optional and g.component in missing for g in family.groups):
        family = replace(family, groups=tuple(g for g in family.groups if not (g.optional and g.component in missing)))
    if not any(g.per_layer for g in family.groups):
        return family
    groups = []
    for group in family.groups:
        if not group.per_layer:
            groups.append(group)
            continue
        names = expand_names(denoiser, group.modules)
        for index, name in enumerate(names):
            text = group.last_text if group.last_text is not None and index == len(names) - 1 else group.text
            groups.append(replace(group, name=f"{group.component}.{name}", modules=(name,), per_layer=False,
                                  text=text, last_text=None, layer_group=True))
    return replace(family, groups=tuple(groups))


def family_of(pipeline_class: type) -> Family:
    """The family of a diffusers pipeline class (by its base classes' names), or a `TypeError` naming what works."""
    names = {c.__name__ for c in pipeline_class.__mro__}
    for family in FAMILIES:
        if names.intersection(family.pipelines):
            return family
    supported = ", ".join(p for f in FAMILIES for p in f.pipelines)
    raise ValueError(f"concept editing has no built-in family for {pipeline_class.__name__}; the supported pipelines "
                     f"are {supported} (and their subclasses). For another pipeline, name the linear layers to edit: "
                     "diffusers_uce.attach(pipe, targets=[...]) (layers whose input depends on the text alone)")
