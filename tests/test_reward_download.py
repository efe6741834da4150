"""rewards.download puts each model where its loader looks (the Hub replaced by the tiny models)."""

import os
import shutil

import huggingface_hub
import torch

import rewards
from rewards import download


def test_download_layout_loads_offline(tiny_rewards, tmp_path, monkeypatch):
    """Each Hub file is served from the tiny folder of the same layout; the result must load."""
    sources = {  # the repositories the downloader asks for, by its own constants
        download.HPS_REPO: os.path.join(tiny_rewards, "hpsv2"),
        download.CLIP_H14_HUB.removeprefix("hf-hub:"): os.path.join(tiny_rewards, "clip"),
        download.IMAGE_REWARD_REPO: os.path.join(tiny_rewards, "imagereward"),
    }

    def fake_hf_hub_download(repo_id, filename, local_dir, **kwargs):
        os.makedirs(local_dir, exist_ok=True)
        return shutil.copy(os.path.join(sources[repo_id], filename), os.path.join(local_dir, filename))

    def fake_snapshot_download(repo_id, local_dir, allow_patterns, **kwargs):
        import fnmatch

        for name in os.listdir(sources[repo_id]):
            if any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns):
                os.makedirs(local_dir, exist_ok=True)
                shutil.copy(os.path.join(sources[repo_id], name), local_dir)
        return local_dir

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    # The real HPSv2.1 folder holds only the .pt (architecture: ViT-H-14); keep the tiny config so it loads here.
    out = tmp_path / "weights"
    download.main(["--output_dir", str(out), "--names", "hpsv2,clip"])
    assert sorted(os.listdir(out / "hpsv2")) == ["HPS_v2.1_compressed.pt"]
    assert sorted(os.listdir(out / "clip")) == ["open_clip_config.json", "open_clip_model.safetensors"]
    shutil.copy(os.path.join(tiny_rewards, "hpsv2", "open_clip_config.json"), out / "hpsv2")
    for name in ("hpsv2", "clip"):
        model = rewards.load_reward_model(name, str(out))
        assert model(torch.rand(1, 3, 64, 64), ["a cat"]).shape == (1,)


def test_hpsv3_download_layout_loads_offline(tiny_rewards, tmp_path, monkeypatch):
    """HPSv3.safetensors from MizzenAI/HPSv3, config and tokenizer from Qwen/Qwen2-VL-7B-Instruct (both served
    from the tiny folder here): the folder loads, at the release's 448 x 448 image (no hpsv3_config.json)."""
    import fnmatch

    tiny = os.path.join(tiny_rewards, "hpsv3")
    asked = []

    def fake_hf_hub_download(repo_id, filename, local_dir, **kwargs):
        asked.append((repo_id, filename))
        return shutil.copy(os.path.join(tiny, filename), os.path.join(local_dir, filename))

    def fake_snapshot_download(repo_id, local_dir, allow_patterns, **kwargs):
        asked.append((repo_id, "*"))
        for name in os.listdir(tiny):
            if any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns):
                shutil.copy(os.path.join(tiny, name), local_dir)
        return local_dir

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = tmp_path / "weights"
    download.main(["--output_dir", str(out), "--names", "hpsv3"])
    assert asked == [(download.HPSV3_REPO, "HPSv3.safetensors"), (download.HPSV3_BASE_MODEL, "*")]
    assert {"HPSv3.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out / "hpsv3"))
    assert "hpsv3_config.json" not in os.listdir(out / "hpsv3")
    model = rewards.load_reward_model("hpsv3", str(out))
    assert model.image_pixels == 256 * 28 * 28
    assert model(torch.rand(1, 3, 64, 64), ["a cat"]).shape == (1,)


def test_unknown_name_fails(capsys):
    import pytest

    with pytest.raises(SystemExit):
        download.main(["--names", "hpsv9"])
    assert "unknown reward 'hpsv9'" in capsys.readouterr().err


def test_a_failed_download_is_one_line(tmp_path, monkeypatch):
    import pytest

    def unreachable(*args, **kwargs):
        raise ConnectionError("Connection refused\nmore lines")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(SystemExit) as stop:
        download.main(["--output_dir", str(tmp_path), "--names", "hpsv2"])
    assert stop.value.code == (f"error: hpsv2: could not fetch its weights (ConnectionError: Connection refused); run this on a "
                               f"machine that reaches huggingface.co, then copy {tmp_path}")
