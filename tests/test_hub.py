"""Model card and Hub push (the Hub calls replaced by recorders: no network here)."""

import argparse

import huggingface_hub

from flux_rl import hub


def test_model_card_and_push(tmp_path, monkeypatch):
    args = argparse.Namespace(
        pretrained_model_name_or_path="black-forest-labs/FLUX.1-dev", full_finetune=False, reward="hpsv2:1.0",
        max_train_steps=20, validation_prompt=["a photo of a cat"], hub_token="hf_secret_token", learning_rate=1e-4,
    )
    hub.write_model_card(str(tmp_path), args, "srpo", "me/flux-srpo")
    card = (tmp_path / "README.md").read_text()
    assert 'pipe.load_lora_weights("me/flux-srpo")' in card and "base_model: black-forest-labs/FLUX.1-dev" in card
    assert "hf_secret_token" not in card and "learning_rate = 0.0001" in card

    calls = {}

    class Repo:
        repo_id = "me/flux-srpo"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.setdefault("create", (repo_id, kw)) and Repo())
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.setdefault("upload", kw))
    assert hub.push_to_hub(str(tmp_path), "me/flux-srpo", "hf_secret_token") == "me/flux-srpo"
    assert calls["create"][0] == "me/flux-srpo" and calls["create"][1]["exist_ok"]
    assert calls["upload"]["folder_path"] == str(tmp_path) and "checkpoint-*" in calls["upload"]["ignore_patterns"]
