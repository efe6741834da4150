"""Every complete command that README.md and the scripts' docstrings show for a trainer or for
evaluate_flux.py parses with that script's own parser and passes its checks: what users copy
must not fail on a renamed or refused flag. (Models are not loaded: parse_args stops before.)"""

import importlib
import os
import re
import shlex

import pytest
import torch

from tests.conftest import REPO_ROOT

SCRIPTS = ["train_srpo_flux", "train_direct_align", "train_refl_baseline", "train_draft_baseline", "evaluate_flux"]
# Flags whose value is a local file or folder the parser checks for: made in an empty folder first.
LOCAL_PATH_FLAGS = {"--dataset_name", "--reward_models_dir", "--train_data_dir", "--hpdv2_benchmark_dir", "--prompt_file"}


def documented_commands():
    """(source, script, flags, fsdp) of each command line in a bash block of README.md or in a
    script's docstring; lines with `...` are fragments and are left out."""
    sources = {"README.md": "\n".join(re.findall(r"```bash\n(.*?)```", open(os.path.join(REPO_ROOT, "README.md")).read(), re.S))}
    for script in SCRIPTS:
        module_text = open(os.path.join(REPO_ROOT, f"{script}.py")).read()
        sources[f"{script}.py"] = re.search(r'"""(.*?)"""', module_text, re.S).group(1)
    commands = []
    for source, text in sources.items():
        for line in re.sub(r"\\\n\s*", " ", text).splitlines():
            line = line.split(" #")[0].strip()
            match = re.search(r"\b(%s)\.py\b" % "|".join(SCRIPTS), line)
            if not match or "..." in line or line.startswith("#"):
                continue
            tokens = shlex.split(line.split("&&")[-1])
            script_index = tokens.index(f"{match.group(1)}.py")
            commands.append((source, match.group(1), tokens[script_index + 1 :], "fsdp.yaml" in line))
    return commands


COMMANDS = documented_commands()


def test_the_documents_show_commands_of_every_script():
    assert {script for _, script, _, _ in COMMANDS} == set(SCRIPTS)


@pytest.mark.parametrize("source, script, flags, fsdp", COMMANDS, ids=[f"{c[0]}:{c[1]}:{i}" for i, c in enumerate(COMMANDS)])
def test_documented_command_parses(source, script, flags, fsdp, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for flag, value in zip(flags, flags[1:]):
        if flag in LOCAL_PATH_FLAGS:
            if os.path.splitext(value)[1]:
                os.makedirs(os.path.dirname(value) or ".", exist_ok=True)
                open(value, "w").write("a photo of a cat\n")
            else:
                os.makedirs(value, exist_ok=True)
            if flag == "--hpdv2_benchmark_dir":  # read while parsing: HPDv2's four style files
                for style in ("anime", "concept-art", "paintings", "photo"):
                    open(os.path.join(value, f"{style}.json"), "w").write('["a photo of a cat"]')
    from flux_rl.args import looks_like_a_local_folder

    for flag, value in zip(flags, flags[1:]):  # FLUX from a local folder (the quick start's tiny-models/flux)
        if flag == "--pretrained_model_name_or_path" and looks_like_a_local_folder(value):
            os.makedirs(value, exist_ok=True)
            open(os.path.join(value, "model_index.json"), "w").write('{"_class_name": "FluxPipeline"}')
    if script == "evaluate_flux":  # --models name=folder: the trainers' output folders
        for spec in flags[flags.index("--models") + 1 :] if "--models" in flags else []:
            if spec.startswith("--"):
                break
            os.makedirs(spec.partition("=")[2], exist_ok=True)
    if fsdp:
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for that config
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the commands are for GPU machines
    module = importlib.import_module(script)
    assert module.parse_args(flags) is not None
