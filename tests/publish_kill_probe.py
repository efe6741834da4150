"""Run a trainer's main() as it is, but end the process at one stage of publishing its final weights,
with os._exit (no cleanup, no finally: as a SIGKILL or a power cut would) and status 137.

    python tests/publish_kill_probe.py <trainer module> <stage> <trainer flags>

stages (training.finish, checkpoints.publish):
  writing      the weights half written into the staging folder
  written      staged in full, not renamed into place
  moved_aside  a full fine-tune's earlier transformer/ renamed to transformer.old, the new one not in place
  renamed      in place, the staging folder not removed
  before_card  the weights published, the model card not written
"""

import importlib
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flux_rl import hub, models, training  # noqa: E402

module_name, stage = sys.argv[1], sys.argv[2]
ending = {"on": False, "renames": 0}


def killed():
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(137)


original_finish, original_replace, original_rmtree = training.finish, os.replace, shutil.rmtree
original_card, original_save_lora, original_save_full = hub.write_model_card, models.save_lora, models.save_full_model


def finish(run):
    ending["on"] = True
    return original_finish(run)


def replace(source, target, *args, **kwargs):
    if ending["on"]:
        ending["renames"] += 1
        if stage == "written" or (stage == "moved_aside" and ending["renames"] == 2):
            killed()
    return original_replace(source, target, *args, **kwargs)


def rmtree(path, *args, **kwargs):
    if ending["on"] and stage == "renamed" and ending["renames"] and str(path).endswith(".tmp"):
        killed()
    return original_rmtree(path, *args, **kwargs)


def write_model_card(*args, **kwargs):
    if stage == "before_card":
        killed()
    return original_card(*args, **kwargs)


def half_written(save):
    def save_then_cut(output_dir, *args, **kwargs):
        save(output_dir, *args, **kwargs)
        if ending["on"] and stage == "writing":
            files = [os.path.join(root, name) for root, _, names in os.walk(output_dir) for name in names]
            largest = max(files, key=os.path.getsize)
            with open(largest, "r+b") as f:
                f.truncate(os.path.getsize(largest) // 2)
            killed()
    return save_then_cut


training.finish = finish
os.replace, shutil.rmtree = replace, rmtree
hub.write_model_card = write_model_card
models.save_lora, models.save_full_model = half_written(original_save_lora), half_written(original_save_full)
module = importlib.import_module(module_name)
module.main(module.parse_args(sys.argv[3:]))
