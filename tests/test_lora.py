"""LoRA export: `save_concept_edits_as_lora` loads into a plain pipeline (PEFT, no plugin) and equals the fused edit."""

import json

import pytest
import safetensors
import torch

from diffusers_uce.demo import make_demo_pipeline
from diffusers_uce.io import atomic_save_safetensors
from diffusers_uce.lora import lora_state_dict
from diffusers_uce.solve import LowRankFactors
from helpers import rel, unet_output

pytest.importorskip("peft")

ERASE = ["van gogh", "picasso", "monet", "dog"]
GUIDES = ["art", "art", "", "cat"]
PRESERVE = ["rembrandt", "a photo of a house"]


def read(path):
    with safetensors.safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def exact_changes(pipe):
    """``ΔW_ℓ = W_ℓ (T_ℓ,s − I)`` in float64, straight from the definition (one layer at a time)."""
    state = pipe._uce_state
    s = state.solution.to(dtype=torch.float64)
    originals = state.original_weights if state.fused else [p.module.weight for p in state.projections]
    out = {}
    for index, (projection, w) in enumerate(zip(state.projections, originals)):
        t = s.transform.clone()
        if s.correction is not None:
            c = s.correction
            t = t + c.tokens.T @ torch.diag(c.coef[index]) @ c.solved
        out[projection.name] = state.scale * w.detach().double() @ (t - torch.eye(t.shape[0], dtype=torch.float64))
    return out


def stored_changes(path):
    tensors, _ = read(path)
    names = {k[len("unet."):-len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")}
    return {n: tensors[f"unet.{n}.lora_B.weight"].double() @ tensors[f"unet.{n}.lora_A.weight"].double() for n in names}


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
        error = pipe.save_concept_edits_as_lora(tmp_path)
        assert 0 <= error < 1e-8
        tensors, metadata = read(tmp_path / "pytorch_lora_weights.safetensors")
        names = [p.name for p in pipe._uce_state.projections]
        assert set(tensors) == {f"unet.{n}.lora_{ab}.weight" for n in names for ab in "AB"}
        config = json.loads(metadata["lora_adapter_metadata"])
        assert config["unet.r"] == config["unet.lora_alpha"] == len(ERASE)  # one token per concept in "last" mode
        assert config["unet.alpha_pattern"] == config["unet.rank_pattern"] == {}
        stored = stored_changes(tmp_path / "pytorch_lora_weights.safetensors")
        assert frobenius_error(stored, exact_changes(pipe)) < 1e-6

        plain = make_demo_pipeline(family)  # no plugin
        plain.load_lora_weights(tmp_path)
        pipe.fuse_concept_edits()
        assert rel(unet_output(plain), unet_output(pipe)) < 1e-5

    def test_fused_edit_exports_the_same_lora(self, pipe, tmp_path):
        edit(pipe)
        pipe.save_concept_edits_as_lora(tmp_path / "a")
        pipe.fuse_concept_edits()
        pipe.save_concept_edits_as_lora(tmp_path / "b")
        a, _ = read(tmp_path / "a" / "pytorch_lora_weights.safetensors")
        b, _ = read(tmp_path / "b" / "pytorch_lora_weights.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)

    @pytest.mark.parametrize("technique", ["replace", "tensor"])
    def test_truncated_rank(self, pipe, technique, tmp_path):
        edit(pipe, technique, token_mode="paper")  # token blocks: rank well above 2
        exact = exact_changes(pipe)
        full = pipe.save_concept_edits_as_lora(tmp_path / "full")
        assert full < 1e-8
        for rank in (1, 2):
            error = pipe.save_concept_edits_as_lora(tmp_path / str(rank), rank=rank)
            path = tmp_path / str(rank) / "pytorch_lora_weights.safetensors"
            tensors, _ = read(path)
            assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")} == {rank}
            direct = frobenius_error(stored_changes(path), exact)
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
        tensors, _ = read(tmp_path / "pytorch_lora_weights.safetensors")
        assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")} == {1}


def test_per_module_ranks_load_with_scale_one(tmp_path):
    """Modules of different ranks (and a module left out at rank 0) keep LoRA scale 1 in plain diffusers + PEFT."""
    plain = make_demo_pipeline("sd1")
    names = [n for n, _ in plain.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]
    modules = [plain.unet.get_submodule(n) for n in names]
    originals = [m.weight.detach().clone().double() for m in modules]
    generator = torch.Generator().manual_seed(0)
    ranks = [1, 3, 3, 3, 2, 0, 3, 3]
    ups = [torch.randn(m.out_features, r, generator=generator, dtype=torch.float64) for m, r in zip(modules, ranks)]
    downs = [torch.randn(r, m.in_features, generator=generator, dtype=torch.float64) for m, r in zip(modules, ranks)]
    tensors, header = lora_state_dict("unet", names, LowRankFactors(ups, downs, ranks, 0.0))
    atomic_save_safetensors(tensors, tmp_path, "pytorch_lora_weights.safetensors", header)
    plain.load_lora_weights(tmp_path)
    plain.fuse_lora()
    for name, w, up, down in zip(names, originals, ups, downs):
        module = plain.unet.get_submodule(name)
        assert hasattr(module, "get_base_layer") == (up.shape[1] > 0), name  # the rank-0 module has no adapter
        fused = getattr(module, "get_base_layer", lambda: module)().weight.detach().double()
        assert rel(fused, w + up @ down) < 1e-6, name
