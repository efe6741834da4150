import glob
import os

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalar_tags(output_dir: str) -> dict[str, list[float]]:
    """Every scalar the run logged to TensorBoard, by tag."""
    values = {}
    for path in glob.glob(os.path.join(output_dir, "logs", "**", "events.out.tfevents.*"), recursive=True):
        accumulator = EventAccumulator(path)
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            values.setdefault(tag, []).extend(e.value for e in accumulator.Scalars(tag))
    return values
