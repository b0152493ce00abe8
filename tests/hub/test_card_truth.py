"""Model cards that tell the truth: a LoRA card loads the LoRA, each snippet loads a file that is there, a push names
its repository, `base_model=`/`license=` reach the metadata, and a pushed edit repository carries the exact LoRA that
plain diffusers loads."""

import re
import uuid

import pytest
from diffusers import FluxPipeline, StableDiffusionPipeline
from huggingface_hub import HfApi, ModelCard, hf_hub_download

import diffusers_uce
from diffusers_uce.demo import make_demo_pipeline
from diffusers_uce.hub.cards import REPO_PLACEHOLDER, is_generated_card, save_model_card
from diffusers_uce.hub.hub_mixin import upload_folder_to_hub
from tests.support.helpers import rel, run_cli, weights

SD14 = "CompVis/stable-diffusion-v1-4"
LORA = "pytorch_lora_weights.safetensors"
EDIT = "uce_edits.safetensors"


@pytest.fixture
def api(hub_server, hub_token):
    return HfApi(endpoint=hub_server.endpoint, token=hub_token)


def new_repo(name="truth"):
    return f"user/{name}-{uuid.uuid4().hex[:8]}"


def edited(family="sd1"):
    pipe = diffusers_uce.attach(make_demo_pipeline(family))
    pipe.apply_concept_edits(["van gogh", "picasso"], guide="art", preserve=["monet"], held_out=["a cat"])
    return pipe


def usage(text):
    """The card's "How to use" section and its code blocks."""
    section = text.split("## How to use", 1)[1].split("\n## ", 1)[0]
    return section, re.findall(r"```py\n(.*?)```", section, re.DOTALL)


def remote_card(repo_id):
    return ModelCard.load(hf_hub_download(repo_id, "README.md", force_download=True))


# --- a LoRA card loads the LoRA --------------------------------------------------------------------------------------

@pytest.mark.parametrize("format, weight_name", [("diffusers", LORA), ("kohya", "uce_lora.safetensors")])
def test_lora_card_loads_the_lora(format, weight_name, tmp_path):
    pipe = edited()
    pipe.save_concept_edits_as_lora(tmp_path, format=format, base_model=SD14)
    card = ModelCard.load(tmp_path / "README.md")
    assert "lora" in card.data.tags and "uce" in card.data.tags
    assert (card.data.base_model, card.data.base_model_relation) == (SD14, "adapter")
    assert card.data.license == "creativeml-openrail-m"  # the base model's
    section, blocks = usage(card.text)
    assert f'pipe.load_lora_weights("{REPO_PLACEHOLDER}", weight_name="{weight_name}"' in blocks[0]
    assert f'DiffusionPipeline.from_pretrained("{SD14}"' in blocks[0]
    assert "load_concept_edits" not in card.text and "custom_pipeline" not in card.text  # no edit file here
    assert "exactly as the edit does" in section
    if format == "kohya":
        assert "models/Lora" in section and "<lora:uce_lora:1>" in section and "models/loras" in section
        assert "ComfyUI" in section and "reads it too" in section


def test_approximate_lora_card_says_so(tmp_path):
    error = edited().save_concept_edits_as_lora(tmp_path, rank=1)
    text = (tmp_path / "README.md").read_text()
    assert f"rank 1: it approximates the edit (relative error {error:.2g}" in text
    assert "exactly as the edit does" not in text and "rank 1, relative error" in text


def test_edit_file_card_offers_only_what_the_folder_holds(tmp_path):
    pipe = edited()
    pipe.save_concept_edits(tmp_path / "edit")
    text = (tmp_path / "edit" / "README.md").read_text()
    assert f'pipe.load_concept_edits("{REPO_PLACEHOLDER}", weight_name="{EDIT}")' in text
    assert "custom_pipeline" not in text and "pipeline.py" not in text  # the folder has no community pipeline
    assert "load_lora_weights(" not in text and "save_concept_edits_as_lora" in text
    # A LoRA of the same edit saved beside it: the card (ours, unedited) is written again and names both files.
    pipe.save_concept_edits_as_lora(tmp_path / "edit")
    text = (tmp_path / "edit" / "README.md").read_text()
    assert f"| `{EDIT}` |" in text and f"| `{LORA}` |" in text and "lora" in ModelCard(text).data.tags


def test_a_card_someone_edited_is_kept(tmp_path):
    pipe = edited()
    pipe.save_concept_edits(tmp_path)
    readme = tmp_path / "README.md"
    assert is_generated_card(readme.read_text())
    readme.write_text(readme.read_text().replace("# ", "# My notes on ", 1))
    assert not is_generated_card(readme.read_text())
    assert save_model_card("new card", tmp_path) is False and "My notes on" in readme.read_text()


# --- base_model= and license= ---------------------------------------------------------------------------------------

@pytest.fixture
def local_pipe(tmp_path):
    """An edited pipeline loaded from a local folder: its name_or_path is no Hub id."""
    make_demo_pipeline("sd1").save_pretrained(tmp_path / "base")
    pipe = diffusers_uce.UCEStableDiffusionPipeline.from_pretrained(tmp_path / "base")
    pipe.apply_concept_edits("van gogh", guide="art", held_out=[])
    return pipe


def test_base_model_and_license_of_local_saves(local_pipe, tmp_path):
    local_pipe.save_concept_edits(tmp_path / "plain")
    assert ModelCard.load(tmp_path / "plain" / "README.md").data.base_model is None
    local_pipe.save_concept_edits(tmp_path / "edit", base_model=SD14, license="mit")
    local_pipe.save_concept_edits_as_lora(tmp_path / "lora", base_model=SD14)
    local_pipe.save_pretrained(tmp_path / "full", fuse_concept_edits=True, base_model=SD14, license="openrail")
    expected = {"edit": ("adapter", "mit"), "lora": ("adapter", "creativeml-openrail-m"),
                "full": ("finetune", "openrail")}
    for folder, (relation, licence) in expected.items():
        card = ModelCard.load(tmp_path / folder / "README.md")
        assert (card.data.base_model, card.data.base_model_relation, card.data.license) == (SD14, relation, licence)
    assert f'from_pretrained("{SD14}"' in (tmp_path / "edit" / "README.md").read_text()


@pytest.mark.parametrize("bad", ["./my-model", "stable-diffusion", "a/b/c", "a/../b", "", 7])
def test_bad_base_model_is_refused_before_anything_is_written(bad, api, tmp_path):
    pipe = edited()
    repo_id = new_repo()
    for save in (lambda: pipe.save_concept_edits(tmp_path / "x", base_model=bad),
                 lambda: pipe.save_concept_edits_as_lora(tmp_path / "x", base_model=bad),
                 lambda: pipe.save_pretrained(tmp_path / "x", fuse_concept_edits=True, base_model=bad),
                 lambda: pipe.push_concept_edits_to_hub(repo_id, base_model=bad),
                 lambda: pipe.push_to_hub(repo_id, fuse_concept_edits=True, base_model=bad)):
        with pytest.raises(ValueError, match="base_model must be a Hub model id"):
            save()
    assert not (tmp_path / "x").exists() and not api.repo_exists(repo_id) and not pipe.concept_edits_fused
    with pytest.raises(ValueError, match="license must be"):
        pipe.save_concept_edits(tmp_path / "x", license="My Licence")
    assert not (tmp_path / "x").exists()


def test_cli_base_model_and_license(tmp_path):
    code, out, err = run_cli("edit", "--erase", "van gogh", "--base-model", "./local", "--save-edits", tmp_path / "e")
    assert code == 2 and out == "" and "--base-model" in err and "Loading" not in err
    code, _, err = run_cli("edit", "--erase", "van gogh", "--guide", "art", "--held-out", "", "--base-model", SD14,
                           "--license", "mit", "--lora", tmp_path / "lora", "--output", tmp_path / "full")
    assert code == 0, err
    lora, full = (ModelCard.load(tmp_path / f / "README.md") for f in ("lora", "full"))
    assert (lora.data.base_model, lora.data.base_model_relation, lora.data.license) == (SD14, "adapter", "mit")
    assert (full.data.base_model, full.data.base_model_relation, full.data.license) == (SD14, "finetune", "mit")
    assert usage(lora.text)[1][0].count(f'load_lora_weights("{REPO_PLACEHOLDER}", weight_name="{LORA}"') == 1


# --- a pushed edit repository: edit file + exact LoRA + pipeline.py -------------------------------------------------

@pytest.mark.parametrize("family, cls", [("sd1", StableDiffusionPipeline), ("flux", FluxPipeline)])
def test_pushed_edit_repo_carries_the_exact_lora(family, cls, api):
    pipe = edited(family)
    repo_id = new_repo()
    pipe.push_concept_edits_to_hub(repo_id, base_model=SD14 if family == "sd1" else None, license="mit")
    assert {EDIT, LORA, "pipeline.py", "README.md"} <= set(api.list_repo_files(repo_id))
    pipe.fuse_concept_edits()
    expected = weights(pipe)

    plain = make_demo_pipeline(family)  # plain diffusers, no plugin, the edit not applied
    assert type(plain) is cls and not isinstance(plain, diffusers_uce.UCEMixin)
    plain.load_lora_weights(repo_id, weight_name=LORA)
    plain.fuse_lora()
    plain.unload_lora_weights()
    assert max(rel(w, expected[n]) for n, w in weights(plain).items()) < 1e-5

    card = remote_card(repo_id)
    assert "lora" in card.data.tags and card.data.license == "mit"
    section, blocks = usage(card.text)
    assert f'load_lora_weights("{repo_id}", weight_name="{LORA}"' in blocks[0]
    assert f'load_concept_edits("{repo_id}", weight_name="{EDIT}")' in section
    assert f'custom_pipeline="{repo_id}"' in section and REPO_PLACEHOLDER not in card.text
    files = card.text.split("## Files", 1)[1].split("## How to use")[0]
    assert "the edit file" in files and "the edit as a LoRA (diffusers format; exact" in files
    assert "| `pipeline.py` |" in files


def test_hub_default_lora_snippet_finds_the_lora(api):
    pipe = edited()
    repo_id = new_repo()
    pipe.push_concept_edits_to_hub(repo_id)
    plain = make_demo_pipeline("sd1")
    plain.load_lora_weights(repo_id)  # no weight_name: diffusers picks pytorch_lora_weights.safetensors
    pipe.fuse_concept_edits()
    plain.fuse_lora()
    assert max(rel(w, weights(pipe)[n]) for n, w in weights(plain).items()) < 1e-5


def test_edit_the_lora_export_refuses_is_pushed_alone(api, caplog):
    pipe = edited()
    pipe.set_concept_edit_scale(0)  # changes no weight: there is no LoRA to export
    repo_id = new_repo()
    pipe.push_concept_edits_to_hub(repo_id)
    files = set(api.list_repo_files(repo_id))
    assert EDIT in files and LORA not in files
    card = remote_card(repo_id)
    assert "holds no LoRA export of the edit" in card.text and "load_lora_weights(" not in card.text
    assert "lora" not in card.data.tags and "without a LoRA export" in caplog.text


# --- `diffusers-uce push DIR REPO` names REPO -----------------------------------------------------------------------

def test_push_writes_the_card_again_for_the_repository(api, tmp_path):
    pipe = edited()
    pipe.save_concept_edits(tmp_path / "edit")
    pipe.save_concept_edits_as_lora(tmp_path / "lora", format="kohya")
    local = (tmp_path / "edit" / "README.md").read_text()
    pipe.fuse_concept_edits()
    code, _, err = run_cli("edit", "--erase", "van gogh", "--guide", "art", "--output", tmp_path / "full")
    assert code == 0, err
    for folder in ("edit", "lora", "full"):
        assert REPO_PLACEHOLDER in (tmp_path / folder / "README.md").read_text()
        repo_id = new_repo(folder)
        code, _, err = run_cli("push", tmp_path / folder, repo_id)
        assert code == 0, err
        card = remote_card(repo_id)
        assert REPO_PLACEHOLDER not in card.text and "<your-username>" not in card.text, folder
        assert is_generated_card(open(hf_hub_download(repo_id, "README.md")).read())
        section, blocks = usage(card.text)
        assert repo_id in blocks[0] and "custom_pipeline" not in card.text  # no pipeline.py in these folders
        if folder == "edit":
            assert f'load_concept_edits("{repo_id}", weight_name="{EDIT}")' in blocks[0]
            assert card.text.split("## Files")[0] == ModelCard(local).text.split("## Files")[0]  # table, report
        if folder == "lora":
            assert f'load_lora_weights("{repo_id}", weight_name="uce_lora.safetensors"' in blocks[0]
            assert "| erased | van gogh |" in card.text  # the report, from the LoRA's header
        if folder == "full":
            assert f'DiffusionPipeline.from_pretrained("{repo_id}"' in blocks[0]
    assert (tmp_path / "edit" / "README.md").read_text() == local  # the local card is left as it was


def test_push_with_base_model_and_license(api, local_pipe, tmp_path):
    local_pipe.save_concept_edits(tmp_path / "edit")
    repo_id = new_repo()
    code, _, err = run_cli("push", tmp_path / "edit", repo_id, "--base-model", SD14, "--license", "mit")
    assert code == 0, err
    card = remote_card(repo_id)
    assert (card.data.base_model, card.data.base_model_relation, card.data.license) == (SD14, "adapter", "mit")
    assert f'from_pretrained("{SD14}"' in usage(card.text)[1][0]
    code, _, err = run_cli("push", tmp_path / "edit", repo_id, "--base-model", "not a repo")
    assert code == 2 and "--base-model" in err


def test_push_uploads_a_readme_someone_wrote_as_it_is(api, tmp_path):
    pipe = edited()
    pipe.save_concept_edits(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(readme.read_text().replace("## What was edited", "## What I edited"))
    repo_id = new_repo()
    upload_folder_to_hub(tmp_path, repo_id, base_model=SD14)
    assert open(hf_hub_download(repo_id, "README.md")).read() == readme.read_text()


def test_repush_replaces_our_card_on_the_hub_but_not_yours(api):
    repo_id = new_repo()
    edited().push_concept_edits_to_hub(repo_id)
    other = diffusers_uce.attach(make_demo_pipeline("sd1"))
    other.apply_concept_edits("dog", guide="cat", held_out=[])
    other.push_concept_edits_to_hub(repo_id)  # the card there is ours: it now describes this edit
    text = remote_card(repo_id).text
    assert "dog → cat" in text and "van gogh" not in text
    api.upload_file(path_or_fileobj=text.replace("dog", "DOG").encode(), path_in_repo="README.md", repo_id=repo_id)
    edited().push_concept_edits_to_hub(repo_id)
    assert "DOG → cat" in remote_card(repo_id).text


def test_card_record_survives_in_the_files(tmp_path):
    """The edit file and the LoRA store what their card needs (records, report, family, base model)."""
    from diffusers_uce.hub.card_files import read_saved_edit

    pipe = edited("flux")
    pipe.save_concept_edits(tmp_path)
    pipe.save_concept_edits_as_lora(tmp_path)
    edit, lora = read_saved_edit(tmp_path / EDIT), read_saved_edit(tmp_path / LORA)
    for saved in (edit, lora):
        assert saved.info["family"] == "flux" and saved.info["report"]["erased"][0]["concept"] == "van gogh"
        assert saved.same_edit([r.to_dict() for r in pipe.concept_edits], 1.0)
    assert edit.lora is None and lora.lora.format == "diffusers" and lora.lora.rank is None


# --- records from a LoRA's header are not taken on trust -------------------------------------------------------------

def test_a_relabelled_lora_gets_no_card_and_a_lora_alone_is_marked_unverified(tmp_path):
    import json

    import safetensors
    import safetensors.torch
    import torch

    from diffusers_uce.hub.card_files import card_for_folder
    from diffusers_uce.loaders.lora_kohya import LORA_RECORD_KEY

    pipe = edited()
    pipe.save_concept_edits_as_lora(tmp_path / "lora", format="kohya", write_model_card=False)
    path = tmp_path / "lora" / "uce_lora.safetensors"
    card = card_for_folder(tmp_path / "lora", "user/ours")
    assert "van gogh" in card and "**Unverified:**" in card and "`uce_lora.safetensors`" in card
    with safetensors.safe_open(str(path), framework="pt") as f:
        record = json.loads(f.metadata()[LORA_RECORD_KEY])
    (tmp_path / "theirs").mkdir()
    layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # trained on self-attention
    trained = {f"{layer}.lora_down.weight": torch.ones(2, 8), f"{layer}.lora_up.weight": torch.ones(8, 2)}
    safetensors.torch.save_file(trained, str(tmp_path / "theirs" / "style.safetensors"),
                                metadata={"ss_network_module": "networks.lora", LORA_RECORD_KEY: json.dumps(record)})
    assert card_for_folder(tmp_path / "theirs", "user/theirs") is None  # no card claims it erases anything
