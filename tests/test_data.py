"""Prompts through `datasets` (every local format, a dataset folder laid out as on the Hub, its
configurations and splits) and the per-step batch order."""

import json

import pytest

from flux_rl.args import ConfigurationError
from flux_rl.data import BatchSchedule, load_prompts

PROMPTS = ["a red car", "a cat on a windowsill", "an old fisherman"]


def write(path, kind, prompts, column="prompt"):
    import pandas

    frame = pandas.DataFrame({column: prompts, "other": range(len(prompts))})
    if kind == "txt":
        path.write_text("\n".join(prompts) + "\n")
    elif kind == "json":
        path.write_text(json.dumps([{column: p} for p in prompts]))
    elif kind == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif kind == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return str(path)


@pytest.mark.parametrize("kind", ["txt", "json", "jsonl", "csv", "parquet"])
def test_local_prompt_files(kind, tmp_path):
    """Each format README names; blank prompts (and a txt file's empty lines) are dropped."""
    path = write(tmp_path / f"prompts.{kind}", kind, PROMPTS[:2] + ["  "] + PROMPTS[2:], column="caption")
    assert load_prompts(path, "caption", cache_dir=str(tmp_path / "cache")) == PROMPTS


def test_dataset_folder_configurations_and_splits(tmp_path):
    """A dataset folder as the Hub lays one out (README configs, split files): what --dataset_name
    with a hub id downloads. --dataset_config_name picks a configuration, --dataset_split a split;
    a wrong one is a one-line error naming those there are."""
    folder = tmp_path / "org-prompts"
    (folder / "photos").mkdir(parents=True)
    (folder / "anime").mkdir()
    write(folder / "photos" / "train.parquet", "parquet", PROMPTS[:2])
    write(folder / "photos" / "test.parquet", "parquet", ["a held-out prompt"])
    write(folder / "anime" / "train.parquet", "parquet", PROMPTS[2:])
    (folder / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: photos\n  default: true\n  data_files:\n  - split: train\n    path: photos/train.parquet\n"
        "  - split: test\n    path: photos/test.parquet\n"
        "- config_name: anime\n  data_files:\n  - split: train\n    path: anime/train.parquet\n---\n"
    )
    cache = str(tmp_path / "cache")
    assert load_prompts(str(folder), cache_dir=cache) == PROMPTS[:2]
    assert load_prompts(str(folder), config_name="anime", cache_dir=cache) == PROMPTS[2:]
    assert load_prompts(str(folder), split="test", cache_dir=cache) == ["a held-out prompt"]
    with pytest.raises(ConfigurationError, match="anim") as error:
        load_prompts(str(folder), config_name="anim", cache_dir=cache)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigurationError, match="validation"):
        load_prompts(str(folder), split="validation", cache_dir=cache)


def test_missing_column_and_unknown_dataset(tmp_path, monkeypatch):
    path = write(tmp_path / "prompts.csv", "csv", PROMPTS, column="caption")
    with pytest.raises(ConfigurationError, match=r"--prompt_column 'prompt' not in .*its columns are \['caption', 'other'\]"):
        load_prompts(path, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigurationError, match="--dataset_name nobody/no-such-prompts: .*a local file needs its extension"):
        load_prompts("nobody/no-such-prompts", cache_dir=str(tmp_path / "cache"))  # offline here: not in the cache


def test_flags_named_as_in_diffusers_examples():
    """--caption_column and --lora_layers (diffusers' FLUX examples) are our --prompt_column and --lora_target_modules."""
    import train_srpo_flux

    args = train_srpo_flux.parse_args(["--pretrained_model_name_or_path", "x", "--caption_column", "text",
                                       "--dataset_config_name", "photos", "--lora_layers", "attn.to_q,proj_mlp"])
    assert args.prompt_column == "text" and args.dataset_config_name == "photos"
    assert args.lora_target_modules == "attn.to_q,proj_mlp"


def test_batch_order_splits_each_global_batch_between_processes():
    """Per micro-step each process takes its own slice of one shuffled global batch; every epoch
    covers all prompts once; the order is a function of the seed alone (what exact resume needs)."""
    items = [f"p{i}" for i in range(6)]
    ranks = [BatchSchedule(items, 1, seed=3, num_processes=2, process_index=rank) for rank in range(2)]
    epoch = [prompt for step in range(3) for rank in ranks for prompt in rank.batch(step)]
    assert sorted(epoch) == items
    next_epoch = [prompt for step in range(3, 6) for rank in ranks for prompt in rank.batch(step)]
    assert sorted(next_epoch) == items and next_epoch != epoch
    again = BatchSchedule(items, 1, seed=3, num_processes=2, process_index=1)
    assert [again.batch(step) for step in (5, 0)] == [ranks[1].batch(5), ranks[1].batch(0)]
