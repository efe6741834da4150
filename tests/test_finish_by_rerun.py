"""Nothing trained is lost and every run can finish: a run killed at any stage of publishing its
final weights finishes when rerun with --resume_from_checkpoint latest, with the weights of an
uninterrupted run; a rerun of a finished run exits 0 at once; a newest checkpoint that does not
load is set aside and the run goes on from the one before it."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT, made_once
from tests.launch import LAUNCH_TIMEOUT, tiny_args

FLAGS = ["--max_train_steps", "2", "--checkpointing_steps", "1", "--full_finetune", "--learning_rate", "1e-2", "--report_to", "none"]


def run(tiny_models, output_dir, *extra, stage=None, expect=0):
    """The Direct-Align trainer as `python train_direct_align.py` runs it; with `stage`, through
    tests/publish_kill_probe.py, killed there."""
    script = ["tests/publish_kill_probe.py", "train_direct_align", stage] if stage else ["train_direct_align.py"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO_ROOT)
    result = subprocess.run([sys.executable, *script, *tiny_args(tiny_models, output_dir, *FLAGS, *extra)], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert result.returncode == expect, f"exit {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def final_weights(output_dir):
    folder = os.path.join(output_dir, "transformer")
    return {name: tensor for file in sorted(os.listdir(folder)) if file.endswith(".safetensors")
            for name, tensor in load_file(os.path.join(folder, file)).items()}


# The runs these tests start from are made once per session, shared by pytest-xdist's workers (conftest.made_once).
@pytest.fixture(scope="module")
def uninterrupted(tiny_models, tmp_path_factory):
    return final_weights(made_once(tmp_path_factory, "finish-uninterrupted", lambda folder: run(tiny_models, folder)))


@pytest.fixture(scope="module")
def killed_before_card(tiny_models, tmp_path_factory):
    """A run killed after publishing its weights, before its model card: the "before_card" case, and the
    start of the "moved_aside" one (which needs a published copy to move aside); each test works on a copy."""
    return made_once(tmp_path_factory, "finish-killed-before-card",
                     lambda folder: run(tiny_models, folder, stage="before_card", expect=137))


@pytest.mark.parametrize("stage", ["writing", "written", "renamed", "before_card", "moved_aside"])
def test_a_run_killed_while_publishing_finishes_when_rerun(stage, tiny_models, uninterrupted, killed_before_card, tmp_path):
    output_dir = str(tmp_path / "run")
    if stage in ("before_card", "moved_aside"):
        shutil.copytree(killed_before_card, output_dir)
    if stage == "moved_aside":  # killed again, in the rerun's publishing, after moving the earlier copy aside
        run(tiny_models, output_dir, "--resume_from_checkpoint", "latest", stage=stage, expect=137)
        assert os.path.isdir(os.path.join(output_dir, "transformer.old"))
        assert not os.path.exists(os.path.join(output_dir, "transformer"))
    elif stage != "before_card":
        run(tiny_models, output_dir, stage=stage, expect=137)
    # Before this change every rerun was refused: "checkpoint-2 is at step 2, and --max_train_steps 2 leaves nothing to train".
    run(tiny_models, output_dir, "--resume_from_checkpoint", "latest")
    published = final_weights(output_dir)
    assert published.keys() == uninterrupted.keys()
    assert all(torch.equal(published[name], uninterrupted[name]) for name in published)
    leftovers = [name for name in os.listdir(output_dir) if name.endswith((".tmp", ".old"))]
    assert not leftovers and os.path.exists(os.path.join(output_dir, "README.md"))
    if stage != "before_card":  # once is enough for what follows
        return
    # A finished run rerun (a job script that reruns until success): exit 0 at once, naming the weights, touching nothing.
    before = {name: os.path.getmtime(os.path.join(output_dir, name)) for name in os.listdir(output_dir)}
    result = run(tiny_models, output_dir, "--resume_from_checkpoint", "latest")
    assert "holds a finished run (2 steps): its weights are" in result.stdout and "nothing to do" in result.stdout
    assert before == {name: os.path.getmtime(os.path.join(output_dir, name)) for name in os.listdir(output_dir)}


@pytest.fixture(scope="module")
def four_steps(tiny_models, tmp_path_factory):
    """An uninterrupted 4-step run: its final weights, and the folder with its checkpoints 1 to 4."""
    output_dir = made_once(tmp_path_factory, "finish-four-steps", lambda folder: run(tiny_models, folder, "--max_train_steps", "4"))
    return final_weights(output_dir), output_dir


@pytest.mark.parametrize("damage", ["optimizer", "weights", "training_state"])
def test_a_newest_checkpoint_that_does_not_load_is_set_aside(damage, tiny_models, four_steps, tmp_path):
    """Resumed with a damaged checkpoint-3, the run goes on from checkpoint-2 (checkpoint-3 set aside, never
    deleted) and reaches the weights of an uninterrupted run."""
    four_step_weights, four_step_run = four_steps
    output_dir = str(tmp_path / "run")
    four = ["--max_train_steps", "4"]
    for step in (2, 3):  # as the 4-step run left them after step 3: killed there
        shutil.copytree(os.path.join(four_step_run, f"checkpoint-{step}"), os.path.join(output_dir, f"checkpoint-{step}"))
    checkpoint = os.path.join(output_dir, "checkpoint-3")
    target = {"optimizer": "optimizer.bin", "weights": os.path.join("transformer", "diffusion_pytorch_model.safetensors"),
              "training_state": "training_state.json"}[damage]
    with open(os.path.join(checkpoint, target), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(checkpoint, target)) // 3)
    result = run(tiny_models, output_dir, *four, "--resume_from_checkpoint", "latest")
    # Kept as it was, beside the checkpoint-3 the resumed run wrote anew.
    assert os.path.getsize(os.path.join(checkpoint + ".unloadable", target)) < os.path.getsize(os.path.join(checkpoint, target))
    assert "checkpoint-3 does not load" in result.stderr and "set aside as checkpoint-3.unloadable" in result.stderr
    published = final_weights(output_dir)
    assert all(torch.equal(published[name], four_step_weights[name]) for name in four_step_weights)


def test_a_finished_run_rerun_with_push_to_hub_pushes_again(tmp_path, monkeypatch, capsys):
    """The push at the end of a run may be what failed (network, login): the same command rerun pushes the
    finished run, without loading a model; a failing push is one line saying to rerun."""
    import huggingface_hub

    import train_direct_align
    from flux_rl import args as common

    monkeypatch.setattr(common, "finished_run_weights", lambda args: os.path.join(args.output_dir, "transformer"))
    monkeypatch.setattr(train_direct_align, "main", lambda args: pytest.fail("a finished run must not train again"))
    uploads = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: huggingface_hub.RepoUrl(
        f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: uploads.append(kw))
    output_dir = str(tmp_path / "run")
    monkeypatch.setattr(sys, "argv", ["train_direct_align.py", "--pretrained_model_name_or_path", "someone/flux", "--output_dir",
                                      output_dir, "--push_to_hub", "--hub_model_id", "me/flux-lora", "--resume_from_checkpoint", "latest"])
    common.run_cli(train_direct_align.parse_args, train_direct_align.main)
    assert capsys.readouterr().out.strip().endswith("; pushed to https://huggingface.co/me/flux-lora")
    assert [(u["repo_id"], u["folder_path"]) for u in uploads] == [("me/flux-lora", output_dir)]

    def offline(**kw):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "upload_folder", offline)
    with pytest.raises(SystemExit) as end:
        common.run_cli(train_direct_align.parse_args, train_direct_align.main)
    line = capsys.readouterr().err.strip()
    assert end.value.code == 2 and line.startswith("error: --push_to_hub: uploading") and "rerun the same command" in line, line
