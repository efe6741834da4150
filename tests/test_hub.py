"""Model card and Hub push (the Hub calls replaced by recorders: no network here)."""

import argparse

import huggingface_hub
import pytest

from flux_rl import hub, models


def test_model_card_and_push(tmp_path, monkeypatch):
    args = argparse.Namespace(
        pretrained_model_name_or_path="tiny-org/tiny-flux", full_finetune=False, reward="hpsv2:1.0",
        max_train_steps=20, validation_prompt=["a photo of a cat"], hub_token="hf_secret_token", learning_rate=1e-4,
    )
    hub.write_model_card(str(tmp_path), args, "srpo", "tiny-org/tiny-flux-srpo")
    card = (tmp_path / "README.md").read_text()
    assert 'pipe.load_lora_weights("tiny-org/tiny-flux-srpo")' in card and "base_model: tiny-org/tiny-flux" in card
    assert "hf_secret_token" not in card and "learning_rate = 0.0001" in card
    args.revision = "a1b2c3"  # the base the adapter was trained on is that revision
    hub.write_model_card(str(tmp_path), args, "srpo", "tiny-org/tiny-flux-srpo")
    assert 'FluxPipeline.from_pretrained("tiny-org/tiny-flux", revision="a1b2c3", dtype=' in (tmp_path / "README.md").read_text()

    calls = {}

    class Repo:
        repo_id = "tiny-org/tiny-flux-srpo"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.setdefault("create", (repo_id, kw)) and Repo())
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.setdefault("upload", kw))
    assert hub.push_to_hub(str(tmp_path), "tiny-org/tiny-flux-srpo") == "tiny-org/tiny-flux-srpo"  # token: hf auth login / HF_TOKEN
    assert calls["create"][0] == "tiny-org/tiny-flux-srpo" and calls["create"][1]["exist_ok"]
    assert calls["upload"]["folder_path"] == str(tmp_path) and "checkpoint-*" in calls["upload"]["ignore_patterns"]


@pytest.mark.parametrize("full_finetune", [False, True])
def test_model_card_code_runs(tiny_flux, tmp_path, full_finetune):
    """The card's "Use" snippet, run as written (on the CPU, in fp32, 2 steps at 64 px), loads the
    trained weights: a LoRA through load_lora_weights, a full fine-tune as the pipeline's transformer."""
    import os
    import re

    import torch
    from diffusers import FluxTransformer2DModel

    from flux_rl import models

    transformer = FluxTransformer2DModel.from_pretrained(os.path.join(tiny_flux, "transformer"))
    if full_finetune:
        with torch.no_grad():
            transformer.x_embedder.bias.fill_(0.25)
        transformer.save_pretrained(str(tmp_path / "transformer"))
    else:
        models.add_lora(transformer, rank=4, alpha=4, target_modules=models.DEFAULT_LORA_TARGETS)
        models.save_lora(str(tmp_path), transformer)
    args = argparse.Namespace(pretrained_model_name_or_path=tiny_flux, full_finetune=full_finetune, reward="hpsv2:1.0",
                              max_train_steps=2, validation_prompt=['a "quoted" cat'])
    hub.write_model_card(str(tmp_path), args, "srpo")
    card = (tmp_path / "README.md").read_text()
    assert ("Fully fine-tuned transformer" in card) == full_finetune and ("- lora" in card) != full_finetune
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    code = code.replace('.to("cuda")', "").replace("torch.bfloat16", "torch.float32")
    code = code.replace("num_inference_steps=50", "num_inference_steps=2, height=64, width=64")
    namespace = {}
    exec(code, namespace)
    pipe = namespace["pipe"]
    assert namespace["image"].size == (64, 64)
    if full_finetune:
        assert torch.all(pipe.transformer.x_embedder.bias == 0.25)
    else:
        assert any("lora" in name for name, _ in pipe.transformer.named_parameters())


def test_card_names_a_base_model_only_by_its_hub_id(tmp_path):
    """The Hub refuses a card whose base_model is not a model id, so a run from a local copy of
    FLUX would fail its push at the end of training: an id, or a folder of the Hub's cache, gives
    the id; any other folder gives no base_model line (and the usage code names the folder)."""
    from huggingface_hub import ModelCard

    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-flux" / "snapshots" / "0ef5fff"
    local = tmp_path / "my-flux"
    for folder in (snapshot, local):
        folder.mkdir(parents=True)
    assert hub.hub_id_of("tiny-org/tiny-flux") == "tiny-org/tiny-flux"
    assert hub.hub_id_of(str(snapshot)) == "tiny-org/tiny-flux"
    assert hub.hub_id_of(str(local)) is None
    for base, expected in ((str(snapshot), "tiny-org/tiny-flux"), (str(local), None)):
        args = argparse.Namespace(pretrained_model_name_or_path=base, full_finetune=False, reward="hpsv2:1.0",
                                  max_train_steps=2, validation_prompt=None)
        out = tmp_path / f"out-{expected is None}"
        out.mkdir()
        hub.write_model_card(str(out), args, "srpo")
        card = ModelCard.load(str(out / "README.md"))
        assert card.data.to_dict().get("base_model") == expected and card.data.library_name == "diffusers"
        assert f'FluxPipeline.from_pretrained("{expected or local}"' in card.text


def test_card_carries_the_base_models_licence(tmp_path, monkeypatch):
    """A base with a licence of its own (as FLUX's dev model has) passes it to the card's
    metadata and text; any other base says "other"."""
    from huggingface_hub import ModelCard

    link = "https://huggingface.co/tiny-org/tiny-flux-dev/blob/main/LICENSE.md"
    monkeypatch.setitem(hub.BASE_LICENSES, "tiny-org/tiny-flux-dev", ("other", "tiny-dev-license", link))
    for base, expected in (("tiny-org/tiny-flux-dev", {"license": "other", "license_name": "tiny-dev-license", "license_link": link}),
                           ("tiny-org/tiny-flux", {"license": "other"})):
        args = argparse.Namespace(pretrained_model_name_or_path=base, full_finetune=False, reward="hpsv2:1.0",
                                  max_train_steps=2, validation_prompt=None)
        hub.write_model_card(str(tmp_path), args, "srpo")
        card = ModelCard.load(str(tmp_path / "README.md"))
        data = card.data.to_dict()
        assert {key: data[key] for key in ("license", "license_name", "license_link") if key in data} == expected
        assert (f"[tiny-dev-license]({link})" in card.text) == ("license_name" in expected)


def test_card_shows_the_validation_images(tmp_path):
    """With --validation_prompt, the final grid is the card's widget (shown on the Hub's model page)
    and the card sets it beside the untrained model's (step 0)."""
    from huggingface_hub import ModelCard

    (tmp_path / "validation").mkdir()
    for step in (0, 2):
        (tmp_path / "validation" / f"step-{step:06d}.png").write_bytes(b"png")
    args = argparse.Namespace(pretrained_model_name_or_path="tiny-org/tiny-flux", full_finetune=False, reward="hpsv2:1.0",
                              max_train_steps=2, validation_prompt=['a "quoted" cat', "a dog"])
    hub.write_model_card(str(tmp_path), args, "srpo")
    card = ModelCard.load(str(tmp_path / "README.md"))
    assert card.data.to_dict()["widget"] == [{"text": 'a "quoted" cat; a dog', "output": {"url": "validation/step-000002.png"}}]
    assert "![before](validation/step-000000.png)" in card.text and "![after](validation/step-000002.png)" in card.text
    (tmp_path / "validation" / "step-000002.png").unlink()  # no final grid (no --validation_prompt): neither
    hub.write_model_card(str(tmp_path), args, "srpo")
    card = ModelCard.load(str(tmp_path / "README.md"))
    assert "widget" not in card.data.to_dict() and "Validation images" not in card.text


def _hub_error(kind, message):
    """A Hub error as huggingface_hub raises it, without an HTTP response to build it from."""
    error = kind.__new__(kind)
    Exception.__init__(error, message)
    return error


def test_hub_failures_are_one_line_with_the_way_out():
    gated = _hub_error(huggingface_hub.errors.GatedRepoError, "403 Client Error. Cannot access gated repo")
    try:  # as transformers and diffusers raise it: their own OSError, caused by the Hub's
        try:
            raise gated
        except Exception as cause:
            raise OSError("We couldn't load tiny-org/tiny-flux") from cause
    except OSError as wrapped:
        assert hub.hub_failure(wrapped).startswith("a gated repository: accept its licence on its Hub page")
    missing = _hub_error(huggingface_hub.errors.RepositoryNotFoundError, "404")
    assert hub.hub_failure(missing).startswith("no such repository on the Hub")
    assert hub.hub_failure(ConnectionError("Connection refused")) == "the download failed (ConnectionError: Connection refused)"
    assert hub.hub_failure(ValueError("a shape mismatch")) is None  # not the Hub's: keeps its traceback

    with pytest.raises(hub.ConfigurationError, match=r"^--reward hpsv2: no such repository on the Hub .*; fetch it first$"):
        with hub.fetching("--reward hpsv2", "fetch it first"):
            raise missing
    with pytest.raises(ValueError, match="a shape mismatch"):
        with hub.fetching("--reward hpsv2", "fetch it first"):
            raise ValueError("a shape mismatch")


def test_a_flux_id_is_checked_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.check_base_model_reachable(str(tmp_path))  # a folder: nothing to fetch
    with pytest.raises(hub.ConfigurationError, match="^--pretrained_model_name_or_path models/flux/dev: no such folder, and not a Hub"):
        hub.check_base_model_reachable("models/flux/dev")
    with pytest.raises(hub.ConfigurationError, match="^--pretrained_model_name_or_path tiny-org/tiny-flux: not in the Hugging Face cache"):
        hub.check_base_model_reachable("tiny-org/tiny-flux", cache_dir=str(tmp_path))
    # Cached (as `hf download` leaves it), it passes offline.
    snapshot = tmp_path / "models--tiny-org--tiny-flux" / "snapshots" / ("1" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    (tmp_path / "models--tiny-org--tiny-flux" / "refs").mkdir()
    (tmp_path / "models--tiny-org--tiny-flux" / "refs" / "main").write_text("1" * 40)
    assert hub.check_base_model_reachable("tiny-org/tiny-flux", cache_dir=str(tmp_path)) == "FluxPipeline"
    # A Qwen-Image id: its family's flags are checked from the class, before anything loads (training.setup does this).
    (snapshot / "model_index.json").write_text('{"_class_name": "QwenImagePipeline"}')
    family = hub.check_base_model_reachable("tiny-org/tiny-flux", cache_dir=str(tmp_path))
    with pytest.raises(hub.ConfigurationError, match="--vae_gradient_checkpointing: Qwen-Image's video VAE"):
        models.check_family_flags(family, argparse.Namespace(vae_gradient_checkpointing=True))
    # A family these trainers do not train yet (here FLUX.2 [dev]) is named for what it is, before anything loads.
    (snapshot / "model_index.json").write_text('{"_class_name": "Flux2Pipeline"}')
    with pytest.raises(hub.ConfigurationError, match="tiny-org/tiny-flux is a Flux2Pipeline checkpoint; these trainers train "
                                                     "FluxPipeline, Flux2KleinPipeline, QwenImagePipeline, StableDiffusion3Pipeline"):
        hub.check_base_model_reachable("tiny-org/tiny-flux", cache_dir=str(tmp_path))
