"""Edit files: `save_concept_edits` / `load_concept_edits` round trips, validation, atomic writes, Hub form."""

import json
import os
import uuid

import pytest
import safetensors
import safetensors.torch
import torch

import diffusers_uce
from diffusers_uce.demo import make_demo_pipeline
from diffusers_uce.engine import Solution
from diffusers_uce.solve import Correction
from helpers import rel, unet_output, weights

ERASE = ["van gogh", "picasso"]
PRESERVE = ["monet", "a photo of a dog"]


def fresh(family):
    return diffusers_uce.attach(make_demo_pipeline(family))


def apply(pipe, *args, **kwargs):
    return pipe.apply_concept_edits(*args, held_out=[], **kwargs)  # no held-out report: faster


def same_solution(a, b, tol=0.0):
    sa, sb = a._uce_state.solution, b._uce_state.solution
    pairs = [(sa.transform, sb.transform)]
    assert (sa.correction is None) == (sb.correction is None)
    if sa.correction is not None:
        pairs += [(getattr(sa.correction, k), getattr(sb.correction, k)) for k in ("tokens", "solved", "coef")]
    return all(rel(x, y) <= tol for x, y in pairs)


def header(path):
    with safetensors.safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["uce"]), set(f.keys())


class TestEditFiles:
    @pytest.mark.parametrize("technique", ["replace", "tensor"])
    def test_round_trip(self, pipe, family, technique, tmp_path):
        apply(pipe, ERASE, guide="art", preserve=PRESERVE, technique=technique)
        pipe.set_concept_edit_scale(0.7)
        expected = unet_output(pipe)
        path = pipe.save_concept_edits(tmp_path)
        assert path == str(tmp_path / "uce_edits.safetensors")
        loaded = fresh(family)
        original = weights(loaded)
        loaded.load_concept_edits(tmp_path)
        assert loaded.concept_edits == pipe.concept_edits
        assert loaded._uce_state.scale == 0.7
        assert all(torch.equal(original[n], w) for n, w in weights(loaded).items())  # processor mode
        assert all(isinstance(m.processor, diffusers_uce.UCEAttnProcessor) for n, m in loaded.unet.named_modules()
                   if n.endswith("attn2"))
        assert same_solution(pipe, loaded)  # bit for bit
        assert (loaded._uce_state.solution.correction is None) == (technique == "replace")
        assert rel(unet_output(loaded), expected) < 1e-6

    def test_load_then_fuse_equals_fuse(self, pipe, family, tmp_path):
        apply(pipe, ERASE, guide="art", preserve=PRESERVE, technique="tensor")
        pipe.save_concept_edits(tmp_path)
        pipe.fuse_concept_edits()
        loaded = fresh(family)
        loaded.load_concept_edits(tmp_path / "uce_edits.safetensors")
        loaded.fuse_concept_edits()
        for (name, a), b in zip(weights(pipe).items(), weights(loaded).values()):
            assert torch.equal(a, b), name

    def test_apply_after_load_is_a_joint_solve(self, pipe, family, tmp_path):
        options = dict(edit_keys=False, layers=["up_blocks"])
        apply(pipe, ERASE, guide="art", preserve=PRESERVE, technique="tensor", **options)
        pipe.save_concept_edits(tmp_path)
        loaded = fresh(family)
        loaded.load_concept_edits(tmp_path)
        apply(loaded, "dog", guide="cat", **options)
        apply(pipe, "dog", guide="cat", **options)
        assert loaded.concept_edits == pipe.concept_edits
        assert same_solution(pipe, loaded, tol=1e-12)
        with pytest.raises(ValueError, match="edit_keys/layers must match"):
            apply(loaded, "cat", guide="dog")

    def test_callable_layer_filter_is_stored_as_names(self, pipe, family, tmp_path):
        apply(pipe, ERASE, guide="art", layers=lambda name: name.startswith("up_blocks.1.attentions.1"))
        info, _ = header(pipe.save_concept_edits(tmp_path))
        assert info["layers"] == ["up_blocks.1.attentions.1.transformer_blocks.0.attn2"]
        loaded = fresh(family)
        loaded.load_concept_edits(tmp_path)
        assert [p.name for p in loaded._uce_state.projections] == [p.name for p in pipe._uce_state.projections]
        assert same_solution(pipe, loaded)

    def test_metadata(self, pipe, family, tmp_path):
        pipe.register_to_config(_name_or_path=f"tiny/{family}")
        out = apply(pipe, ERASE, guide=["art", ""], preserve=PRESERVE, technique="tensor")
        info, keys = header(pipe.save_concept_edits(tmp_path))
        assert keys == {"unet.uce.transform", "unet.uce.correction.tokens", "unet.uce.correction.solved",
                        "unet.uce.correction.coef"}
        assert info["format"] == "diffusers-uce-edit" and info["format_version"] == 1
        assert info["edits"] == json.loads(json.dumps([e.to_dict() for e in out.edits]))
        projections = pipe._uce_state.projections
        assert info["projections"] == [{"name": p.name, "shape": list(p.module.weight.shape)} for p in projections]
        assert (info["edit_keys"], info["layers"], info["scale"]) == (True, None, 1.0)
        d = pipe.text_encoder.config.hidden_size
        assert info["base_model"] == {"name_or_path": f"tiny/{family}", "pipeline_class": "StableDiffusionPipeline",
                                      "text_hidden_size": d, "cross_attention_modules": 4,
                                      "num_projections": len(projections)}
        assert set(info["versions"]) == {"diffusers-uce", "diffusers", "torch", "transformers"}
        assert info["versions"]["diffusers-uce"] == diffusers_uce.__version__
        with safetensors.safe_open(str(tmp_path / "uce_edits.safetensors"), framework="pt") as f:
            assert f.get_tensor("unet.uce.transform").dtype == torch.float64
            assert f.get_tensor("unet.uce.transform").shape == (d, d)

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
        for kwargs in forms:
            loaded = fresh(family)
            loaded.load_concept_edits(**kwargs)
            assert same_solution(pipe, loaded), kwargs
        os.remove(tmp_path / "repo" / "sub" / "uce_edits.safetensors")
        pipe.save_concept_edits(tmp_path / "repo" / "sub", weight_name="third.safetensors")
        with pytest.raises(FileNotFoundError, match="several.*pass weight_name"):
            fresh(family).load_concept_edits(tmp_path / "repo", subfolder="sub")
        with pytest.raises(FileNotFoundError, match="found none"):
            fresh(family).load_concept_edits(tmp_path / "repo")

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

    @pytest.mark.parametrize("failing", ["save_file", "replace"])
    def test_atomic_write(self, pipe, tmp_path, monkeypatch, failing):
        apply(pipe, ERASE, guide="art")
        fresh_dir = tmp_path / "new"

        def boom(*args, **kwargs):
            if failing == "save_file":  # a partial temporary file, then a crash
                open(args[1], "wb").write(b"partial")
            raise OSError("disk full")

        target = (safetensors.torch, "save_file") if failing == "save_file" else (os, "replace")
        path = pipe.save_concept_edits(tmp_path)
        before = open(path, "rb").read()
        with monkeypatch.context() as m:
            m.setattr(*target, boom)
            with pytest.raises(OSError, match="disk full"):
                pipe.save_concept_edits(fresh_dir)
            with pytest.raises(OSError, match="disk full"):
                pipe.save_concept_edits(tmp_path, overwrite=True)
        assert os.listdir(fresh_dir) == []
        assert sorted(os.listdir(tmp_path)) == ["README.md", "new", "uce_edits.safetensors"]  # no temporary file left
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

    def test_mismatched_base(self, tmp_path):
        sd1 = fresh("sd1")
        sd1.register_to_config(_name_or_path="tiny/sd1")
        apply(sd1, ERASE, guide="art")
        sd1.save_concept_edits(tmp_path)
        sd2 = fresh("sd2")
        sd2.register_to_config(_name_or_path="tiny/sd2")
        with pytest.raises(ValueError) as error:
            sd2.load_concept_edits(tmp_path)
        message = str(error.value)
        assert "tiny/sd1" in message and "tiny/sd2" in message
        assert "text hidden size 32" in message and "text hidden size 48" in message
        assert sd2.concept_edits == () and sd2._uce_state is None

    def test_mismatched_shape(self, pipe, family, tmp_path):
        apply(pipe, ERASE, guide="art")
        path = pipe.save_concept_edits(tmp_path)
        with safetensors.safe_open(path, framework="pt") as f:
            info, tensors = json.loads(f.metadata()["uce"]), {k: f.get_tensor(k) for k in f.keys()}
        info["projections"][0]["shape"][0] += 1
        safetensors.torch.save_file(tensors, path, metadata={"uce": json.dumps(info)})
        loaded = fresh(family)
        with pytest.raises(ValueError, match=f"{info['projections'][0]['name']} has shape"):
            loaded.load_concept_edits(path)
        info["projections"][0]["shape"][0] -= 1
        info["edits"][0]["lamb"] = -1.0
        safetensors.torch.save_file(tensors, path, metadata={"uce": json.dumps(info)})
        with pytest.raises(ValueError, match="invalid edit record.*lamb"):
            loaded.load_concept_edits(path)
        info["format_version"] = 99
        safetensors.torch.save_file(tensors, path, metadata={"uce": json.dumps(info)})
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

    def test_sd15_sized_file_is_small(self, pipe, tmp_path):
        # A fake SD 1.5-shaped solution (d = 768) in the real save path: T in float64 and a "last"-mode tensor edit
        # of 100 concepts on 32 projections.
        apply(pipe, ERASE, guide="art", technique="tensor")
        tokens = torch.randn(100, 768, dtype=torch.float64)
        pipe._uce_state.solution = Solution(torch.eye(768, dtype=torch.float64),
                                            Correction(tokens, tokens.clone(), torch.zeros(32, 100)))
        size = os.path.getsize(pipe.save_concept_edits(tmp_path))
        assert 768 * 768 * 8 < size < 10 * 1024 * 1024


class TestHub:
    def test_load_from_hub_repo(self, hub_server, hub_token, tmp_path):
        from huggingface_hub import HfApi

        pipe = fresh("sd1")
        apply(pipe, ERASE, guide="art", preserve=PRESERVE)
        path = pipe.save_concept_edits(tmp_path)
        api = HfApi(endpoint=hub_server.endpoint, token=hub_token)
        repo_id = f"user/uce-edit-{uuid.uuid4().hex[:8]}"
        api.create_repo(repo_id)
        api.upload_file(path_or_fileobj=path, path_in_repo="uce_edits.safetensors", repo_id=repo_id)
        api.upload_file(path_or_fileobj=path, path_in_repo="edits/vg.safetensors", repo_id=repo_id)
        for kwargs in ({}, dict(subfolder="edits", weight_name="vg.safetensors")):
            loaded = fresh("sd1")
            loaded.load_concept_edits(repo_id, token=hub_token, cache_dir=tmp_path / "cache", **kwargs)
            assert same_solution(pipe, loaded)
        loaded = fresh("sd1")
        loaded.load_concept_edits(repo_id, local_files_only=True, cache_dir=tmp_path / "cache")  # now cached
        assert loaded.concept_edits == pipe.concept_edits
