"""Edit files: `save_concept_edits` / `load_concept_edits` round trips, validation, atomic writes, Hub form.

Every test taking `family`/`pipe` runs on each pipeline family (SD 1.x, SD 2.x, SDXL, FLUX).
"""

import json
import os
import uuid

import pytest
import safetensors
import safetensors.torch
import torch

import diffusers_uce
from diffusers_uce.core.engine import Solution
from diffusers_uce.core.solve import Correction
from diffusers_uce.demo import make_demo_pipeline
from diffusers_uce.utils import safetensors_io
from tests.support.helpers import rel, target_layers, unet_output, weights
from tests.support.reference import denoiser, family_of

ERASE = ["van gogh", "picasso"]
PRESERVE = ["monet", "a photo of a dog"]
PIPELINE_CLASSES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                    "sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline"}
FAMILY_NAMES = {"sd1": "stable-diffusion", "sd2": "stable-diffusion", "sdxl": "stable-diffusion-xl", "flux": "flux"}


def fresh(family):
    return diffusers_uce.attach(make_demo_pipeline(family))


def apply(pipe, *args, **kwargs):
    return pipe.apply_concept_edits(*args, held_out=[], **kwargs)  # no held-out report: faster


def file_groups(pipe):
    """Group name in edit files → the layers it holds (spelt out here, independently of the package)."""
    if family_of(pipe) == "flux":
        return {"transformer.context_embedder": ["context_embedder"],
                "transformer.text_embedder": ["time_text_embed.text_embedder.linear_1"]}
    return {"unet": [n for n, _ in target_layers(pipe)]}


def solutions(pipe):
    return [g.solution for g in pipe._uce_state.groups]


def same_solution(a, b, tol=0.0):
    """Whether every group's solution of `a` equals `b`'s (bit for bit at `tol=0`)."""
    if len(solutions(a)) != len(solutions(b)):
        return False
    pairs = []
    for sa, sb in zip(solutions(a), solutions(b)):
        assert (sa.correction is None) == (sb.correction is None)
        pairs.append((sa.transform, sb.transform))
        if sa.correction is not None:
            pairs += [(getattr(sa.correction, k), getattr(sb.correction, k)) for k in ("tokens", "solved", "coef")]
    return all(x.shape == y.shape and (torch.equal(x, y) if tol == 0 else rel(x, y) <= tol) for x, y in pairs)


def header(path):
    with safetensors.safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["uce"]), set(f.keys())


def rewrite(path, change):
    """Rewrite the metadata of an edit file in place with `change(info)`; returns the new metadata."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        info, tensors = json.loads(f.metadata()["uce"]), {k: f.get_tensor(k) for k in f.keys()}
    change(info)
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt", "uce": json.dumps(info)})
    return info


def edit_hooks(pipe):
    """SD/SDXL: the processor class of every cross-attention module; FLUX: the forward hooks of the edited layers."""
    if family_of(pipe) == "flux":
        return {n: len(m._forward_hooks) for n, m in target_layers(pipe)}
    return {n: type(m.processor).__name__ for n, m in denoiser(pipe).named_modules() if n.endswith("attn2")}


def acts_without_fusing(pipe):
    """The edit acts through the family's mechanism: UCE processors (SD, SDXL) or a forward hook per layer (FLUX)."""
    hooks = edit_hooks(pipe)
    if family_of(pipe) == "flux":
        return all(n == 1 for n in hooks.values())
    return all(name == "UCEAttnProcessor" for name in hooks.values())


def to_version_1(info):
    """The metadata an SD 1.x/2.x file had in format version 1: no family, no groups, one text width."""
    info["format_version"] = 1
    del info["family"]
    for entry in info["projections"]:
        del entry["group"]
    for key in ("family", "text_hidden_sizes"):
        del info["base_model"][key]


class TestEditFiles:
    @pytest.mark.parametrize("technique", ["replace", "tensor"])
    def test_round_trip(self, pipe, family, technique, tmp_path):
        apply(pipe, ERASE, guide="art", preserve=PRESERVE, technique=technique)
        pipe.set_concept_edit_scale(0.7)
        expected = unet_output(pipe)
        path = pipe.save_concept_edits(tmp_path)
        assert path == str(tmp_path / "uce_edits.safetensors")
        loaded = fresh(family)
        original, unedited = weights(loaded), unet_output(loaded)
        assert rel(unedited, expected) > 1e-5  # the edit changes the output
        loaded.load_concept_edits(tmp_path)
        assert loaded.concept_edits == pipe.concept_edits
        assert loaded._uce_state.scale == 0.7
        assert all(torch.equal(original[n], w) for n, w in weights(loaded).items())  # processor/hook mode
        assert acts_without_fusing(loaded)
        assert [g.group.name for g in loaded._uce_state.groups] == list(file_groups(loaded))
        assert same_solution(pipe, loaded)  # bit for bit, every group
        assert all((s.correction is None) == (technique == "replace") for s in solutions(loaded))
        assert rel(unet_output(loaded), expected) < 1e-6

    def test_load_then_fuse_equals_fuse(self, pipe, family, tmp_path):
        apply(pipe, ERASE, guide="art", preserve=PRESERVE, technique="tensor")
        pipe.save_concept_edits(tmp_path)
        before = weights(pipe)
        pipe.fuse_concept_edits()
        loaded = fresh(family)
        loaded.load_concept_edits(tmp_path / "uce_edits.safetensors")
        loaded.fuse_concept_edits()
        fused = weights(pipe)
        assert not any(torch.equal(before[n], w) for n, w in fused.items())  # every layer changed
        for (name, a), b in zip(fused.items(), weights(loaded).values()):
            # an applied edit with few tokens fuses through its low-rank form, a loaded one through T (the file
            # stores T only): the same weights up to float32 rounding
            assert rel(b, a) < 1e-6 * max(1.0, rel(a, before[name])), name

    def test_apply_after_load_is_a_joint_solve(self, pipe, family, tmp_path):
        # non-default options are stored and must be given again; FLUX has no key/value projections
        options = (dict(layers=["context_embedder"]) if family == "flux"
                   else dict(edit_keys=False, layers=["up_blocks"]))
        apply(pipe, ERASE, guide="art", preserve=PRESERVE, technique="tensor", **options)
        pipe.save_concept_edits(tmp_path)
        loaded = fresh(family)
        loaded.load_concept_edits(tmp_path)
        apply(loaded, "dog", guide="cat", **options)
        apply(pipe, "dog", guide="cat", **options)
        assert loaded.concept_edits == pipe.concept_edits
        assert [p.name for p in loaded._uce_state.projections] == [p.name for p in pipe._uce_state.projections]
        assert same_solution(pipe, loaded, tol=1e-12)
        with pytest.raises(ValueError, match="edit_keys/layers must match"):
            apply(loaded, "cat", guide="dog")

    def test_callable_layer_filter_is_stored_as_names(self, pipe, family, tmp_path):
        last = target_layers(pipe)[-1][0]
        module = last.rsplit(".", 1)[0] if last.endswith((".to_k", ".to_v")) else last  # attention module or layer
        apply(pipe, ERASE, guide="art", layers=lambda name: name == module)
        info, _ = header(pipe.save_concept_edits(tmp_path))
        assert info["layers"] == [module]
        loaded = fresh(family)
        loaded.load_concept_edits(tmp_path)
        names = [p.name for p in loaded._uce_state.projections]
        assert names == [p.name for p in pipe._uce_state.projections] and all(n.startswith(module) for n in names)
        assert same_solution(pipe, loaded)

    def test_metadata(self, pipe, family, tmp_path):
        pipe.register_to_config(_name_or_path=f"tiny/{family}")
        out = apply(pipe, ERASE, guide=["art", ""], preserve=PRESERVE, technique="tensor")
        info, keys = header(pipe.save_concept_edits(tmp_path))
        groups = file_groups(pipe)
        parts = ("transform", "correction.tokens", "correction.solved", "correction.coef")
        assert keys == {f"{g}.uce.{part}" for g in groups for part in parts}  # FLUX: both groups' tensors
        assert info["format"] == "diffusers-uce-edit" and info["format_version"] == 3
        assert info["family"] == FAMILY_NAMES[family]
        assert info["denoiser"] == ("transformer" if family == "flux" else "unet")
        assert info["edits"] == json.loads(json.dumps([e.to_dict() for e in out.edits]))
        model = denoiser(pipe)
        assert info["projections"] == [{"group": g, "name": n, "shape": list(model.get_submodule(n).weight.shape)}
                                       for g, names in groups.items() for n in names]
        assert (info["edit_keys"], info["layers"], info["scale"]) == (True, None, 1.0)
        widths = {g: model.get_submodule(names[0]).in_features for g, names in groups.items()}
        attn2 = sum(n.endswith("attn2") for n, _ in model.named_modules())
        assert info["base_model"] == {
            "name_or_path": f"tiny/{family}", "pipeline_class": PIPELINE_CLASSES[family], "family": info["family"],
            "text_hidden_size": next(iter(widths.values())), "text_hidden_sizes": widths,
            "cross_attention_modules": attn2, "num_projections": len(info["projections"]),
        }
        assert set(info["versions"]) == {"diffusers-uce", "diffusers", "torch", "transformers"}
        assert info["versions"]["diffusers-uce"] == diffusers_uce.__version__
        biased = family == "flux"  # context_embedder and linear_1 have a bias: homogeneous (d+1)x(d+1) transforms
        with safetensors.safe_open(str(tmp_path / "uce_edits.safetensors"), framework="pt") as f:
            for group, d in widths.items():
                transform = f.get_tensor(f"{group}.uce.transform")
                assert transform.dtype == torch.float64 and transform.shape == (d + biased, d + biased)
                if biased:  # T̃ = [[T, 0], [uᵀ, 1]]: the bias is kept as it is
                    assert torch.equal(transform[:d, d], torch.zeros(d, dtype=torch.float64))
                    assert transform[d, d] == 1 and transform[d, :d].abs().max() > 0

    def test_file_and_folder_forms(self, pipe, family, tmp_path):
        apply(pipe, ERASE, guide="art")
        pipe.save_concept_edits(tmp_path / "one", weight_name="my_edit.safetensors")  # the only edit file there
        pipe.save_concept_edits(tmp_path / "repo" / "sub")
        pipe.save_concept_edits(tmp_path / "repo" / "sub", weight_name="other.safetensors")
        safetensors.torch.save_file({"x": torch.zeros(2)}, str(tmp_path / "one" / "unrelated.safetensors"))
        forms = [
            dict(pretrained_model_name_or_path=str(tmp_path / "one")),
            dict(pretrained_model_name_or_path=tmp_path / "one" / "my_edit.safetensors"),
            dict(pretrained_model_name_or_path=tmp_path / "repo", subfolder="sub"),
            dict(pretrained_model_name_or_path=tmp_path / "repo", subfolder="sub", weight_name="other.safetensors"),
        ]
        loaded = fresh(family)
        for kwargs in forms:
            loaded.load_concept_edits(**kwargs)
            assert same_solution(pipe, loaded), kwargs
            loaded.unload_concept_edits()
        os.remove(tmp_path / "repo" / "sub" / "uce_edits.safetensors")
        pipe.save_concept_edits(tmp_path / "repo" / "sub", weight_name="third.safetensors")
        with pytest.raises(FileNotFoundError, match="several.*pass weight_name"):
            loaded.load_concept_edits(tmp_path / "repo", subfolder="sub")
        with pytest.raises(FileNotFoundError, match="found none"):
            loaded.load_concept_edits(tmp_path / "repo")

    def test_overwrite(self, pipe, tmp_path):
        apply(pipe, ERASE, guide="art")
        path = pipe.save_concept_edits(tmp_path)
        before = open(path, "rb").read()
        with pytest.raises(FileExistsError, match="overwrite=True"):
            pipe.save_concept_edits(tmp_path)
        assert open(path, "rb").read() == before
        apply(pipe, "dog", guide="cat")
        pipe.save_concept_edits(tmp_path, overwrite=True)
        assert len(header(path)[0]["edits"]) == 2
        assert sorted(os.listdir(tmp_path)) == ["README.md", "uce_edits.safetensors"]  # no temp file left

    @pytest.mark.parametrize("failing", ["write", "replace"])
    def test_atomic_write(self, pipe, tmp_path, monkeypatch, failing):
        apply(pipe, ERASE, guide="art")
        fresh_dir = tmp_path / "new"

        def boom(*args, **kwargs):
            if failing == "write":  # a partial temporary file, then a crash
                args[0].write(b"partial")
            raise OSError("disk full")

        target = (safetensors_io, "write_safetensors") if failing == "write" else (os, "replace")
        path = pipe.save_concept_edits(tmp_path)
        before = open(path, "rb").read()
        with monkeypatch.context() as m:
            m.setattr(*target, boom)
            if failing == "replace":  # the move into place: a rename, or a link for a file that must be new
                m.setattr(os, "link", boom)
            with pytest.raises(OSError, match="disk full"):
                pipe.save_concept_edits(fresh_dir)
            with pytest.raises(OSError, match="disk full"):
                pipe.save_concept_edits(tmp_path, overwrite=True)
        assert not fresh_dir.exists()
        assert sorted(os.listdir(tmp_path)) == ["README.md", "uce_edits.safetensors"]  # no temporary file left
        assert not [n for n in os.listdir(tmp_path.parent) if n.startswith(f".{tmp_path.name}.")]
        assert open(path, "rb").read() == before

    def test_refuses_pickle_and_foreign_files(self, pipe, tmp_path):
        for name in ("edits.bin", "edits.pt", "edits.ckpt", "edits.pkl"):
            (tmp_path / name).write_bytes(b"not opened")
            with pytest.raises(ValueError, match="only safetensors"):
                pipe.load_concept_edits(tmp_path / name)
            with pytest.raises(ValueError, match="only safetensors"):
                pipe.load_concept_edits(tmp_path, weight_name=name)
        with pytest.raises(ValueError, match="only safetensors"):
            pipe.load_concept_edits(tmp_path / "missing.ckpt")
        with pytest.raises(FileNotFoundError, match="does not exist"):
            pipe.load_concept_edits(tmp_path / "missing.safetensors")
        safetensors.torch.save_file({"unet.a.lora_A.weight": torch.zeros(1, 2)}, str(tmp_path / "lora.safetensors"))
        with pytest.raises(ValueError, match="not a diffusers-uce edit file.*load_lora_weights"):
            pipe.load_concept_edits(tmp_path / "lora.safetensors")
        assert pipe.concept_edits == ()

    def test_refuses_invalid_metadata(self, pipe, family, tmp_path):
        apply(pipe, ERASE, guide="art")
        path = pipe.save_concept_edits(tmp_path)
        info = rewrite(path, lambda info: info["projections"][0]["shape"].__setitem__(0, 1000))
        loaded = fresh(family)
        with pytest.raises(ValueError, match=f"{info['projections'][0]['name']} has shape"):
            loaded.load_concept_edits(path)
        pipe.save_concept_edits(tmp_path, overwrite=True)
        rewrite(path, lambda info: info["projections"][-1].update(group="transformer.nowhere"))
        with pytest.raises(ValueError, match="'transformer.nowhere', not a group of this family"):
            loaded.load_concept_edits(path)
        pipe.save_concept_edits(tmp_path, overwrite=True)
        rewrite(path, lambda info: info.pop("family"))  # version 2 names the family (version 1: SD 1.x/2.x only)
        with pytest.raises(ValueError, match="misses the family"):
            loaded.load_concept_edits(path)
        pipe.save_concept_edits(tmp_path, overwrite=True)
        rewrite(path, lambda info: info["edits"][0].update(lamb=-1.0))
        with pytest.raises(ValueError, match="invalid edit record.*lamb"):
            loaded.load_concept_edits(path)
        rewrite(path, lambda info: info.update(format_version=99))
        with pytest.raises(ValueError, match="upgrade diffusers-uce"):
            loaded.load_concept_edits(path)
        assert loaded._uce_state is None

    def test_refuses_when_edits_exist_and_bad_input(self, pipe, tmp_path):
        with pytest.raises(ValueError, match="no concept edits to save"):
            pipe.save_concept_edits(tmp_path)
        apply(pipe, ERASE, guide="art")
        path = pipe.save_concept_edits(tmp_path)
        with pytest.raises(ValueError, match="unload_concept_edits"):
            pipe.load_concept_edits(path)
        for bad in ("edits.bin", "edits", "sub/edits.safetensors"):
            with pytest.raises(ValueError, match="weight_name"):
                pipe.save_concept_edits(tmp_path, weight_name=bad)
        assert sorted(os.listdir(tmp_path)) == ["README.md", "uce_edits.safetensors"]
        pipe.unload_concept_edits()
        pipe.load_concept_edits(path)
        assert len(pipe.concept_edits) == 1


@pytest.mark.parametrize(("source", "target"), [
    ("sd1", "sd2"), ("sd1", "sdxl"), ("sd1", "flux"), ("sdxl", "sd1"), ("sdxl", "flux"), ("flux", "sd1"),
    ("flux", "sdxl"),
])
def test_refuses_a_file_of_another_model(source, target, tmp_path):
    made = fresh(source)
    made.register_to_config(_name_or_path=f"tiny/{source}")
    apply(made, ERASE, guide="art")
    made.save_concept_edits(tmp_path)
    other = fresh(target)
    other.register_to_config(_name_or_path=f"tiny/{target}")
    before, hooks = weights(other), edit_hooks(other)
    with pytest.raises(ValueError, match="load it onto the base model it was made for") as error:
        other.load_concept_edits(tmp_path)
    message = str(error.value)
    assert f"tiny/{source} ({PIPELINE_CLASSES[source]}" in message
    assert f"tiny/{target} ({PIPELINE_CLASSES[target]}" in message
    assert other._uce_state is None and other.concept_edits == ()  # nothing changed
    assert edit_hooks(other) == hooks and all(torch.equal(before[n], w) for n, w in weights(other).items())


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_loads_version_1_files(pipe, family, tmp_path):
    """Files written before families existed (SD 1.x/2.x only, no "family"/"group" keys) still load there."""
    apply(pipe, ERASE, guide="art", preserve=PRESERVE, technique="tensor")
    pipe.set_concept_edit_scale(0.5)
    path = pipe.save_concept_edits(tmp_path)
    info = rewrite(path, to_version_1)
    assert "family" not in info and all(set(p) == {"name", "shape"} for p in info["projections"])
    loaded = fresh(family)
    loaded.load_concept_edits(path)
    assert loaded.concept_edits == pipe.concept_edits and loaded._uce_state.scale == 0.5
    assert same_solution(pipe, loaded)
    assert rel(unet_output(loaded), unet_output(pipe)) < 1e-6
    for other in ("sdxl", "flux"):  # a version-1 file is a Stable Diffusion 1.x/2.x file
        with pytest.raises(ValueError, match="load it onto the base model it was made for"):
            fresh(other).load_concept_edits(path)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_sd15_sized_file_is_small(pipe, tmp_path):
    # A fake SD 1.5-shaped solution (d = 768) in the real save path: T in float64 and a "last"-mode tensor edit
    # of 100 concepts on 32 projections.
    apply(pipe, ERASE, guide="art", technique="tensor")
    tokens = torch.randn(100, 768, dtype=torch.float64)
    (group,) = pipe._uce_state.groups
    group.set_solution(Solution(torch.eye(768, dtype=torch.float64),
                                Correction(tokens, tokens.clone(), torch.zeros(32, 100))))
    size = os.path.getsize(pipe.save_concept_edits(tmp_path))
    assert 768 * 768 * 8 < size < 10 * 1024 * 1024


class TestHub:
    def test_load_from_hub_repo(self, pipe, family, hub_server, hub_token, tmp_path):
        from huggingface_hub import HfApi

        apply(pipe, ERASE, guide="art", preserve=PRESERVE)
        path = pipe.save_concept_edits(tmp_path)
        api = HfApi(endpoint=hub_server.endpoint, token=hub_token)
        repo_id = f"user/uce-edit-{family}-{uuid.uuid4().hex[:8]}"
        api.create_repo(repo_id)
        api.upload_file(path_or_fileobj=path, path_in_repo="uce_edits.safetensors", repo_id=repo_id)
        api.upload_file(path_or_fileobj=path, path_in_repo="edits/vg.safetensors", repo_id=repo_id)
        for kwargs in ({}, dict(subfolder="edits", weight_name="vg.safetensors")):
            loaded = fresh(family)
            loaded.load_concept_edits(repo_id, token=hub_token, cache_dir=tmp_path / "cache", **kwargs)
            assert same_solution(pipe, loaded)
        loaded = fresh(family)
        loaded.load_concept_edits(repo_id, local_files_only=True, cache_dir=tmp_path / "cache")  # now cached
        assert loaded.concept_edits == pipe.concept_edits


@pytest.mark.parametrize("family", ["sd1"])  # file handling, the same for every family
def test_refuses_deep_headers_and_skips_special_files(pipe, family, tmp_path):
    apply(pipe, ERASE, guide="art")
    path = pipe.save_concept_edits(tmp_path / "deep")
    with safetensors.safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    deep = "[" * 100_000 + "]" * 100_000
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt", "uce": deep})
    loaded = fresh(family)
    with pytest.raises(ValueError, match="nested too deeply"):
        loaded.load_concept_edits(path)
    folder = tmp_path / "fifo"
    folder.mkdir()
    os.mkfifo(folder / "stuck.safetensors")  # reading it would block forever
    pipe.save_concept_edits(folder, weight_name="mine.safetensors")
    loaded.load_concept_edits(folder)  # the scan skips what is not a regular file
    assert loaded.concept_edits == pipe.concept_edits


@pytest.mark.parametrize("family", ["sd1"])
def test_refuses_values_that_overflow_where_they_are_applied(pipe, family, tmp_path):
    """Finite in float64 is not enough: the processors apply the edit in float32, and strengths are bounded."""
    apply(pipe, ERASE, guide="art")
    path = pipe.save_concept_edits(tmp_path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["unet.uce.transform"][0, 0] = 1e39
    safetensors.torch.save_file(tensors, str(tmp_path / "huge.safetensors"), metadata=metadata)
    loaded = fresh(family)
    with pytest.raises(ValueError, match="does not perform the edits it records"):  # caught by verification
        loaded.load_concept_edits(tmp_path / "huge.safetensors")
    with pytest.raises(ValueError, match="not finite in float32"):  # and without it
        loaded.load_concept_edits(tmp_path / "huge.safetensors", verify=False)
    rewrite(path, lambda info: info.update(scale=1e30))
    with pytest.raises(ValueError, match="invalid scale"):
        loaded.load_concept_edits(path)
    assert loaded._uce_state is None
    for scale in (1e30, -11):
        with pytest.raises(ValueError, match="between -10 and 10"):
            pipe.set_concept_edit_scale(scale)
    pipe.set_concept_edit_scale(-1.0)  # allowed: the edit reversed
    assert pipe.concept_edit_scale == -1.0


@pytest.mark.parametrize("family", ["sd1"])
def test_refuses_precise_factors_that_overflow_where_they_are_applied(pipe, family, tmp_path):
    """A precise-erasure edit has no transform to check: its per-layer factors must be finite in float32 too."""
    apply(pipe, ERASE, guide="art", method="speed")
    path = pipe.save_concept_edits(tmp_path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    up = tensors["unet.uce.layerwise.up"] = tensors["unet.uce.layerwise.up"].double()
    up[0, 0] = 1e39  # finite in float64, not in float32
    safetensors.torch.save_file(tensors, str(tmp_path / "huge.safetensors"), metadata=metadata)
    loaded = fresh(family)
    before = weights(loaded)
    with pytest.raises(ValueError, match="not finite in float32"):
        loaded.load_concept_edits(tmp_path / "huge.safetensors", verify=False)
    assert loaded._uce_state is None and all(torch.equal(w, weights(loaded)[n]) for n, w in before.items())


def test_fusing_refuses_to_overflow_half_precision(tmp_path):
    pipe = diffusers_uce.attach(make_demo_pipeline("sd1", torch_dtype=torch.float16))
    pipe.apply_concept_edits(ERASE, guide="art", held_out=[])
    original = {n: m.weight.clone() for n, m in target_layers(pipe)}
    for group in pipe._uce_state.groups:  # an edit whose weights exceed float16 (65504), as a tampered file could
        group.set_solution(group.solution.to(dtype=torch.float64))
        group.solution.transform.mul_(1e6)
        group.solution.low_rank = None
    with pytest.raises(ValueError, match="overflows the weights' dtype"):
        pipe.fuse_concept_edits()
    assert all(torch.equal(m.weight, original[n]) for n, m in target_layers(pipe))


def test_verified_load_refuses_records_that_do_not_describe_the_transform(pipe, family, tmp_path):
    """Renaming the erased concept in the header makes the file claim an edit its transform does not perform."""
    apply(pipe, ERASE, guide="art")
    path = pipe.save_concept_edits(tmp_path)
    rewrite(path, lambda info: info["edits"][0].update(erase=["monet", *info["edits"][0]["erase"][1:]]))
    loaded = fresh(family)
    with pytest.raises(ValueError, match="does not perform the edits it records.*verify=False"):
        loaded.load_concept_edits(path)
    assert loaded._uce_state is None
    loaded.load_concept_edits(path, verify=False)  # the user's call: loaded as stored
    assert loaded.concept_edits[0].erase[0] == "monet"
