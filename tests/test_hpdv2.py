"""HPDv2 preparation from a local train.json: unique prompts that the trainers' loader reads."""

import json

from flux_rl import hpdv2
from flux_rl.data import load_prompts


def test_prompts_file_from_train_json(tmp_path):
    records = [{"prompt": "a cat", "file_path": ["a.jpg", "b.jpg"], "human_preference": [1, 0]},
               {"prompt": "a cat ", "file_path": ["c.jpg", "d.jpg"], "human_preference": [0, 1]},
               {"prompt": "a red car", "file_path": ["e.jpg", "f.jpg"], "human_preference": [1, 0]}]
    (tmp_path / "train.json").write_text(json.dumps(records))
    hpdv2.main(["--train_json", str(tmp_path / "train.json"), "--output_dir", str(tmp_path / "out"), "--skip_benchmark"])
    assert load_prompts(str(tmp_path / "out" / "prompts.txt")) == ["a cat", "a red car"]


def test_a_failed_download_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub
    import pytest

    def unreachable(*args, **kwargs):
        raise ConnectionError("Connection refused")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(SystemExit) as stop:
        hpdv2.main(["--output_dir", str(tmp_path)])
    assert stop.value.code == (f"error: could not fetch train.json of the dataset {hpdv2.TRAIN_REPO} (ConnectionError: Connection "
                               "refused); run this on a machine that reaches huggingface.co, or pass an already downloaded --train_json")
