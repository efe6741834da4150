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
