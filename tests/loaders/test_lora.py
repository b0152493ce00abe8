"""LoRA export: `save_concept_edits_as_lora` loads into a plain pipeline (PEFT, no plugin) and equals the fused edit.

Every test taking `family`/`pipe` runs on each pipeline family (SD 1.x, SD 2.x, SDXL, FLUX): plain diffusers loads
the LoRA with `StableDiffusionPipeline` / `StableDiffusionXLPipeline` / `FluxPipeline.load_lora_weights`.
"""

import json

import pytest
import safetensors
import torch

from diffusers_uce.core.lowrank import LowRankFactors
from diffusers_uce.demo import make_demo_pipeline
from diffusers_uce.loaders.lora import lora_factors, lora_state_dict
from diffusers_uce.utils.files import atomic_save_safetensors
from tests.support.helpers import rel, target_layers, unet_output, weights
from tests.support.reference import denoiser, family_of

pytest.importorskip("peft")

ERASE = ["van gogh", "picasso", "monet", "dog"]
GUIDES = ["art", "art", "", "cat"]
PRESERVE = ["rembrandt", "a photo of a house"]
LORA = "pytorch_lora_weights.safetensors"


def read(path):
    with safetensors.safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def component(pipe):
    """The key prefix diffusers' LoRA loaders expect for the denoiser."""
    return "transformer" if family_of(pipe) == "flux" else "unet"


def exact_changes(pipe):
    """``ΔW_ℓ`` at the current strength in float64, straight from the definition, one layer at a time.

    ``W'_ℓ = W_ℓ T_ℓ`` (``T_ℓ = T + Cᵀ diag(coef_ℓ) D`` for the "tensor" technique), and for a layer with a bias ``b``
    (FLUX), stored in homogeneous form ``T̃ = [[T, 0], [uᵀ, 1]]``: ``W' = W T + b uᵀ``, so ``ΔW = W (T − I) + b uᵀ``.
    """
    state = pipe._uce_state
    out = {}
    for group in state.groups:
        s = group.solution.to(dtype=torch.float64)
        originals = group.original_weights if state.fused else [p.module.weight for p in group.projections]
        for index, (projection, w) in enumerate(zip(group.projections, originals)):
            t = s.transform.clone()
            if s.correction is not None:
                c = s.correction
                t = t + c.tokens.T @ torch.diag(c.coef[index]) @ c.solved
            w = w.detach().double()
            d = w.shape[1]
            change = w @ (t[:d, :d] - torch.eye(d, dtype=torch.float64))
            if projection.module.bias is not None:
                assert torch.equal(t[:d, d], torch.zeros(d, dtype=torch.float64))  # the bias itself is kept
                change = change + torch.outer(projection.module.bias.detach().double(), t[d, :d])
            out[projection.name] = state.scale * change
    return out


def stored_changes(pipe, path):
    tensors, _ = read(path)
    prefix = component(pipe) + "."
    names = {k[len(prefix):-len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")}
    return {n: tensors[f"{prefix}{n}.lora_B.weight"].double() @ tensors[f"{prefix}{n}.lora_A.weight"].double()
            for n in names}


def frobenius_error(approx, exact):
    num = sum(float((approx.get(n, 0 * d) - d).norm() ** 2) for n, d in exact.items())
    return (num / sum(float(d.norm() ** 2) for d in exact.values())) ** 0.5


def edit(pipe, technique="replace", **kwargs):
    return pipe.apply_concept_edits(ERASE, guide=GUIDES, preserve=PRESERVE, technique=technique, held_out=[], **kwargs)


class TestLoraExport:
    @pytest.mark.parametrize("technique", ["replace", "tensor"])
    def test_exact_rank_loads_in_plain_pipeline(self, pipe, family, technique, tmp_path):
        edit(pipe, technique)
        pipe.set_concept_edit_scale(0.8)
        exact = exact_changes(pipe)
        # the definition is what fusing writes (float32 weights: compared at float32 precision)
        original = weights(pipe)
        pipe.fuse_concept_edits()
        fused = {n: w.double() - original[n].double() for n, w in weights(pipe).items()}
        assert frobenius_error(fused, exact) < 1e-4
        pipe.unfuse_concept_edits()

        # the float64 factors are exact; the file holds them in float32
        state = pipe._uce_state
        factors = {p.name: up @ down for g, f in zip(state.groups, lora_factors(state))
                   for p, up, down in zip(g.projections, f.up, f.down)}
        assert frobenius_error(factors, exact) < 1e-8
        error = pipe.save_concept_edits_as_lora(tmp_path)
        assert 0 <= error < 1e-8
        tensors, metadata = read(tmp_path / LORA)
        prefix, names = component(pipe), [n for n, _ in target_layers(pipe)]
        assert set(tensors) == {f"{prefix}.{n}.lora_{ab}.weight" for n in names for ab in "AB"}
        assert all(t.dtype == torch.float32 for t in tensors.values())
        config = json.loads(metadata["lora_adapter_metadata"])
        ranks = {n: int(torch.linalg.matrix_rank(d, rtol=1e-9)) for n, d in exact.items()}
        assert {n: tensors[f"{prefix}.{n}.lora_A.weight"].shape[0] for n in names} == ranks  # exact rank per layer
        assert config[f"{prefix}.r"] == config[f"{prefix}.lora_alpha"]  # LoRA scale 1
        assert config[f"{prefix}.alpha_pattern"] == config[f"{prefix}.rank_pattern"]
        assert sorted(config[f"{prefix}.target_modules"]) == sorted(names)
        if family != "flux":  # "last" mode: one token per erased concept
            assert set(ranks.values()) == {len(ERASE)}
        assert frobenius_error(stored_changes(pipe, tmp_path / LORA), exact) < 1e-6

        plain = make_demo_pipeline(family)  # no plugin: StableDiffusion(XL)Pipeline / FluxPipeline
        unedited = unet_output(plain)
        plain.load_lora_weights(tmp_path)
        pipe.fuse_concept_edits()
        edited = unet_output(pipe)
        assert rel(unet_output(plain), edited) < 1e-4
        assert rel(unet_output(plain), edited) < 1e-2 * rel(unedited, edited)  # the LoRA carries the edit

    def test_fused_edit_exports_the_same_lora(self, pipe, tmp_path):
        edit(pipe)
        pipe.save_concept_edits_as_lora(tmp_path / "a")
        pipe.fuse_concept_edits()
        pipe.save_concept_edits_as_lora(tmp_path / "b")
        a, _ = read(tmp_path / "a" / LORA)
        b, _ = read(tmp_path / "b" / LORA)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    @pytest.mark.parametrize("technique", ["replace", "tensor"])
    def test_truncated_rank(self, pipe, technique, tmp_path):
        edit(pipe, technique, token_mode="paper")  # token blocks: rank well above 2
        exact = exact_changes(pipe)
        full = pipe.save_concept_edits_as_lora(tmp_path / "full")
        assert full < 1e-8
        for rank in (1, 2):
            error = pipe.save_concept_edits_as_lora(tmp_path / str(rank), rank=rank)
            path = tmp_path / str(rank) / LORA
            tensors, _ = read(path)
            assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")} == {rank}
            direct = frobenius_error(stored_changes(pipe, path), exact)
            assert error > 1e-3
            assert error == pytest.approx(direct, rel=1e-4, abs=1e-6)

    def test_bad_input(self, pipe, tmp_path):
        with pytest.raises(ValueError, match="no concept edits to export"):
            pipe.save_concept_edits_as_lora(tmp_path)
        edit(pipe)
        for rank in (0, -1, 1.5, True, "2"):
            with pytest.raises(ValueError, match="rank must be a positive integer"):
                pipe.save_concept_edits_as_lora(tmp_path, rank=rank)
        with pytest.raises(ValueError, match="safetensors"):
            pipe.save_concept_edits_as_lora(tmp_path, weight_name="lora.bin")
        pipe.set_concept_edit_scale(0.0)
        with pytest.raises(ValueError, match="strength is 0"):
            pipe.save_concept_edits_as_lora(tmp_path)
        pipe.set_concept_edit_scale(1.0)
        pipe.save_concept_edits_as_lora(tmp_path, rank=100)  # above the exact rank: the exact LoRA
        with pytest.raises(FileExistsError, match="overwrite=True"):
            pipe.save_concept_edits_as_lora(tmp_path)
        pipe.save_concept_edits_as_lora(tmp_path, rank=1, overwrite=True)
        tensors, _ = read(tmp_path / LORA)
        assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")} == {1}


def test_per_module_ranks_load_with_scale_one(family, tmp_path):
    """Modules of different ranks (and, where there are enough, a module left out at rank 0) keep LoRA scale 1 in
    plain diffusers + PEFT, on every family's target layers."""
    plain = make_demo_pipeline(family)
    names = [n for n, _ in target_layers(plain)]
    modules = [denoiser(plain).get_submodule(n) for n in names]
    originals = [m.weight.detach().clone().double() for m in modules]
    generator = torch.Generator().manual_seed(0)
    ranks = ([1, 3, 3, 3, 2, 0, 3, 3] * 2)[:len(names)]  # FLUX's two layers: ranks 1 and 3
    ups = [torch.randn(m.out_features, r, generator=generator, dtype=torch.float64) for m, r in zip(modules, ranks)]
    downs = [torch.randn(r, m.in_features, generator=generator, dtype=torch.float64) for m, r in zip(modules, ranks)]
    tensors, header = lora_state_dict(component(plain), names, LowRankFactors(ups, downs, ranks, 0.0))
    atomic_save_safetensors(tensors, tmp_path, LORA, header)
    plain.load_lora_weights(tmp_path)
    plain.fuse_lora()
    for name, w, up, down in zip(names, originals, ups, downs):
        module = denoiser(plain).get_submodule(name)
        assert hasattr(module, "get_base_layer") == (up.shape[1] > 0), name  # the rank-0 module has no adapter
        fused = getattr(module, "get_base_layer", lambda m=module: m)().weight.detach().double()
        assert rel(fused, w + up @ down) < 1e-6, name
