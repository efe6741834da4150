"""Checkpoints: atomic writes, rotation to the newest N, and `--resume_from_checkpoint latest`;
the final weights are put in place by a rename too (`publish`).

A checkpoint is `accelerator.save_state` (model through the save hooks, optimizer, LR scheduler,
RNG states) plus `training_state.json` (the step and the run's configuration). It is written to
`checkpoint-N.tmp` and renamed when complete, so an interrupted save never replaces a good one.
"""

import json
import os
import re
import shutil

from .errors import ConfigurationError

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := CHECKPOINT_PATTERN.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None, config: dict, logger=None,
                    keep: str | None = None, state: dict | None = None) -> str:
    """Save, then keep only the newest `total_limit` checkpoints (None keeps all) and `keep` (the best
    one, --stop_on_hacking). `state`: more entries for its training_state.json."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    temporary = final + ".tmp"
    if accelerator.is_main_process and os.path.exists(temporary):
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(temporary)
    except (OSError, RuntimeError) as error:  # a full disk reads as torch's "unexpected pos N vs M"
        if not disk_full(output_dir, error):
            raise
        shutil.rmtree(temporary, ignore_errors=True)
        earlier = list_checkpoints(output_dir)
        raise ConfigurationError(f"checkpoint-{step} could not be written: the disk of --output_dir {output_dir} is full "
                                 f"({shutil.disk_usage(output_dir).free / 1e9:.2f} GB free); "
                                 + (f"{earlier[-1]} is intact: free some space and rerun with --resume_from_checkpoint latest"
                                    if earlier else "free some space and rerun")) from None
    accelerator.wait_for_everyone()  # every rank has written its RNG state before the rename
    if accelerator.is_main_process:
        with open(os.path.join(temporary, "training_state.json"), "w") as f:
            json.dump({"global_step": step, "config": config, **(state or {})}, f, indent=2, default=str)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(temporary, final)
        if total_limit is not None:
            for stale in [path for path in list_checkpoints(output_dir) if path != keep][:-total_limit]:
                shutil.rmtree(stale)
                if logger:
                    logger.info(f"removed old checkpoint {stale}")
    accelerator.wait_for_everyone()
    return final


def disk_full(folder: str, error: Exception) -> bool:
    """Whether `error`, raised while writing under `folder`, came from a full disk: ENOSPC, or torch's
    zip writer's "unexpected pos" with (almost) nothing left free."""
    import errno

    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return "unexpected pos" in str(error) and shutil.disk_usage(folder).free < 2**28


def publish(output_dir: str, name: str, write) -> str:
    """Puts output_dir/name (a file or a folder) in place by a rename: `write(folder)` first writes
    `name` into a fresh staging folder beside it. A process killed while writing (the final 24 GB
    of a full fine-tune take a minute) leaves the previous copy or none, never half a file."""
    staging = os.path.join(output_dir, f".{name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    write(staging)
    readable_as_usual(staging)
    source, target = os.path.join(staging, name), os.path.join(output_dir, name)
    if os.path.isdir(target):  # a folder cannot be renamed over a full one: the old one steps aside first
        previous = target + ".old"
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(target, previous)
        os.replace(source, target)
        shutil.rmtree(previous)
    else:
        os.replace(source, target)
    shutil.rmtree(staging)
    shutil.rmtree(target + ".old", ignore_errors=True)  # left by a run killed between the two renames above
    return target


def readable_as_usual(folder: str):
    """Files under `folder` get the mode a new file gets here (0644 under the usual umask 022):
    safetensors writes its files 0600, which other users of a shared node or a serving process
    under another account could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _, names in os.walk(folder):
        for name in names:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def read_training_state(path: str) -> dict | None:
    """A checkpoint's training_state.json ({"global_step", "config"}), or None when it is missing or
    does not parse (a checkpoint cut short by a full disk, or damaged since)."""
    try:
        with open(os.path.join(path, "training_state.json")) as f:
            state = json.load(f)
        return state if isinstance(state, dict) and isinstance(state.get("global_step"), int) else None
    except (OSError, ValueError):
        return None


def set_aside(path: str, logger=None, reason: str = "") -> str:
    """Renames a checkpoint that cannot be resumed from to checkpoint-N.unloadable (kept, never
    deleted: what it holds may still be recovered by hand); 'latest' and rotation no longer see it."""
    target = path + ".unloadable"
    if os.path.exists(target):
        shutil.rmtree(target)
    os.replace(path, target)
    if logger:
        logger.warning(f"{os.path.basename(path)} does not load{f' ({reason})' if reason else ''}; set aside as "
                       f"{os.path.basename(target)}, resuming from the checkpoint before it")
    return target


def finished_weights(output_dir: str, checkpoint: str) -> str | None:
    """The final weights of a run whose last step is `checkpoint`, if its end (training.finish) completed:
    the weights (LoRA file or transformer/) in place, no unfinished save beside them, and the model
    card, written last, newer than the checkpoint. None: a rerun has to publish them."""
    from .models import LORA_WEIGHTS_NAME

    weights = [os.path.join(output_dir, name) for name in (LORA_WEIGHTS_NAME, "transformer") if os.path.exists(os.path.join(output_dir, name))]
    leftovers = [name for name in (f".{LORA_WEIGHTS_NAME}.tmp", ".transformer.tmp", "transformer.old")
                 if os.path.lexists(os.path.join(output_dir, name))]
    card = os.path.join(output_dir, "README.md")
    if len(weights) != 1 or leftovers or not os.path.exists(card):
        return None
    return weights[0] if os.path.getmtime(card) >= os.path.getmtime(os.path.join(checkpoint, "training_state.json")) else None


def earlier_run_outputs(output_dir: str) -> list[str]:
    """Checkpoints and final weights (training.finish: the LoRA file or transformer/) a new run in
    output_dir would overwrite or rotate away."""
    from .models import LORA_WEIGHTS_NAME

    found = [os.path.basename(path) for path in list_checkpoints(output_dir)]
    return found + [name for name in (LORA_WEIGHTS_NAME, "transformer") if os.path.exists(os.path.join(output_dir, name))]


def earlier_run_paths(output_dir: str, logging_dir: str = "logs") -> list[str]:
    """What --overwrite_output_dir removes (remove_earlier_run): the paths in output_dir that a
    run of these trainers writes, those that exist."""
    from .models import LORA_WEIGHTS_NAME

    if not os.path.isdir(output_dir):
        return []
    names = [os.path.basename(path) for path in list_checkpoints(output_dir)]
    names += [name for name in os.listdir(output_dir) if name.startswith("checkpoint-") and name.endswith(".tmp")]
    names += [LORA_WEIGHTS_NAME, "transformer", "README.md", "validation", f".{LORA_WEIGHTS_NAME}.tmp", ".transformer.tmp",
              "transformer.old", "best_checkpoint.json", "drift_baseline.json"]
    logs = os.path.relpath(os.path.join(output_dir, logging_dir), output_dir)
    if logs != "." and not logs.startswith(".."):  # a --logging_dir outside the run's folder is not the run's to clear
        names.append(logs)
    return [os.path.join(output_dir, name) for name in names if os.path.lexists(os.path.join(output_dir, name))]


def remove_earlier_run(output_dir: str, logging_dir: str = "logs", logger=None):
    """--overwrite_output_dir: what an earlier run wrote here goes at start, so that none of it
    passes for this run's: its checkpoints (rotation and 'latest' must see only this run's), its
    final weights and model card (a new run stopped before its end would leave them beside its own
    checkpoints, looking finished; a LoRA run's file would sit beside a full fine-tune's transformer/),
    its validation images and TensorBoard logs (both runs' curves drawn as one), and unfinished
    saves. Files of the user's own are left."""
    for path in earlier_run_paths(output_dir, logging_dir):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
        if logger:
            logger.info(f"--overwrite_output_dir: removed {path} of an earlier run")


def inside(path: str, folder: str) -> bool:
    """`path` is `folder` or lies in it (symbolic links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str) -> str | None:
    """'latest' -> the newest checkpoint in output_dir (None if there is none yet); else a path."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        # The newest whose training_state.json reads; one cut short or damaged is passed over (and set aside when
        # the run starts, training.setup, as is one whose weights or optimizer state do not load).
        checkpoints = [path for path in list_checkpoints(output_dir) if read_training_state(path) is not None]
        return checkpoints[-1] if checkpoints else None
    path = resume_from_checkpoint
    if not os.path.isdir(path):
        candidate = os.path.join(output_dir, path)
        if not os.path.isdir(candidate):
            raise ConfigurationError(f"--resume_from_checkpoint {path}: no such checkpoint folder; use 'latest' or a checkpoint-N path")
        path = candidate
    return path


# Flags that decide what a checkpoint holds: with another value the saved weights or optimizer
# state do not load (rank, targets, the optimizer's kind) or load and mean something else (alpha
# scales the saved LoRA update; a full fine-tune's weights are not a LoRA).
STRUCTURAL_FLAGS = ("full_finetune", "bf16_weights", "use_8bit_adam", "rank", "lora_alpha", "lora_target_modules")


def check_resume_config(path: str, args):
    """A one-line error, before any model loads, when the checkpoint at `path` was written with
    other STRUCTURAL_FLAGS than this run's (accelerate would fail later with a size mismatch, or
    not at all)."""
    state = read_training_state(path)
    if state is None:
        raise ConfigurationError(f"--resume_from_checkpoint: {path} has no readable training_state.json; it is not a complete "
                                 "checkpoint of this trainer (--resume_from_checkpoint latest passes over such checkpoints)")
    saved = state.get("config", {})
    if args.max_train_steps < state["global_step"]:
        # Its weights are of a longer run than this one: the final save would pass them off as this run's.
        raise ConfigurationError(f"--resume_from_checkpoint: {os.path.basename(path)} is at step {state['global_step']}, past "
                                 f"--max_train_steps {args.max_train_steps}; raise --max_train_steps")
    # At exactly --max_train_steps nothing is left to train: the run publishes that checkpoint's weights (a run killed
    # after its last checkpoint and before its final weights finishes so), or has finished already (run_cli says where).
    for flag in STRUCTURAL_FLAGS:
        if flag not in saved or (args.full_finetune and flag in ("rank", "lora_alpha", "lora_target_modules")):
            continue
        before, now = _normalised(flag, saved[flag]), _normalised(flag, getattr(args, flag, None))
        if before != now:
            written = saved[flag]
            if flag == "lora_target_modules" and written is None:
                written = "attention (the default before 2026-12-05)"
            raise ConfigurationError(f"--resume_from_checkpoint: {os.path.basename(path)} was trained with --{flag} {written}, this run "
                                     f"has {getattr(args, flag, None)}; resume with the checkpoint's value or start a new --output_dir")


def _normalised(flag, value):
    if flag == "lora_target_modules":
        from .models import LORA_LAYER_PRESETS, lora_targets

        # The list peft gets, spaces dropped. A checkpoint's None is from before 2026-12-05, whose default was
        # the attention projections; since then the parsed flag holds the preset's name.
        return LORA_LAYER_PRESETS["attention"] if value is None else lora_targets(value)
    if flag == "lora_alpha" and value is not None:
        return float(value)
    return value


def load_checkpoint(accelerator, path: str) -> int:
    """Restore everything saved by save_checkpoint; returns the step to continue from."""
    accelerator.load_state(path)
    with open(os.path.join(path, "training_state.json")) as f:
        return int(json.load(f)["global_step"])


def checkpoint_bytes(args) -> int | None:
    """About how many bytes one checkpoint of this run takes: the trained weights and AdamW's two
    moments (fp32; 8-bit Adam's in one byte each; --bf16_weights' weights in two), from the shapes in
    the transformer's safetensors headers (no weights read), in its folder or in the Hub cache. None
    when FLUX is a Hub id not downloaded yet (it is checked on the next run, once in the cache)."""
    import glob
    import struct

    from .models import lora_targets, names_target

    model = args.pretrained_model_name_or_path
    if not os.path.isdir(model):
        try:
            from huggingface_hub import snapshot_download

            model = snapshot_download(model, revision=args.revision, cache_dir=args.cache_dir, local_files_only=True)
        except Exception:  # not in the cache (or not a repository id at all): nothing to read the sizes from
            return None
    shapes = {}
    for path in glob.glob(os.path.join(model, "transformer", "*.safetensors")):
        try:
            with open(path, "rb") as f:
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        except (OSError, ValueError, struct.error):
            return None  # a damaged file is reported where it is loaded
        shapes.update({name: entry["shape"] for name, entry in header.items() if name != "__metadata__"})
    if not shapes:
        return None
    moment_bytes = 2 if args.use_8bit_adam else 4 if args.bf16_weights else 8  # two moments: 8-bit, bf16 or fp32
    if args.full_finetune:
        return sum(_numel(shape) for shape in shapes.values()) * ((2 if args.bf16_weights else 4) + moment_bytes)
    from .families import FAMILIES

    try:
        with open(os.path.join(model, "model_index.json")) as f:
            family = FAMILIES.get(json.load(f).get("_class_name"))
    except (OSError, ValueError):
        family = None
    targets = lora_targets(args.lora_target_modules, getattr(family, "LORA_PRESETS", None))
    parameters = 0
    for name, shape in shapes.items():  # a linear layer's weight is the only 2-D one in these transformers
        module = name.removesuffix(".weight")
        if len(shape) == 2 and name.endswith(".weight") and any(names_target(module, t) for t in targets):
            parameters += args.rank * (shape[0] + shape[1])
    return parameters * (4 + moment_bytes)


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def check_free_space(args):
    """A one-line error when the disk of --output_dir has less room than one checkpoint and the final
    weights need (a full disk otherwise stops the run at its first checkpoint with a bare
    'unexpected pos' from torch's writer)."""
    import shutil

    needed = checkpoint_bytes(args)
    if needed is None:
        return
    folder = os.path.abspath(args.output_dir)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    free = shutil.disk_usage(folder).free
    if free < needed * 1.2:  # the checkpoint, the final weights (a third of it in fp32) and some slack
        raise ConfigurationError(f"--output_dir {args.output_dir}: a checkpoint of this run takes about {needed / 1e9:.2f} GB "
                                 f"and its disk has {free / 1e9:.2f} GB free; free some space or choose another --output_dir")


def write_json_atomically(path: str, value: dict):
    """`value` as JSON at `path`, written beside it and renamed into place (a kill leaves the old file or the new)."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2)
    os.replace(path + ".tmp", path)


def read_json(path: str) -> dict | None:
    """The JSON object at `path`, or None when it is missing or does not parse."""
    try:
        with open(path) as f:
            value = json.load(f)
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None
