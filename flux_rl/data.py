"""Prompts through `datasets`, and a deterministic per-step batch order.

The batch of step s is a pure function of (seed, s, process index), so a resumed run sees the
same prompts as an uninterrupted one without storing a data-loader position.
"""

import os

import torch

from .errors import ConfigurationError

BUILTIN_PROMPTS = os.path.join(os.path.dirname(__file__), "assets", "smoke_prompts.txt")
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_prompts(dataset_name: str | None, prompt_column: str = "prompt", split: str = "train", cache_dir: str | None = None,
                 config_name: str | None = None) -> list[str]:
    """A hub dataset id (or a local dataset folder, as a hub dataset is laid out), a local
    json/jsonl/csv/parquet/txt file, or None for the built-in list. `config_name`: the dataset's
    configuration (subset), for datasets that have several. `cache_dir`: where `datasets`
    downloads and caches (None: its default).

    HPDv2: its hub loading script does not run on datasets >= 4; download train.json and pass
    the file (see README)."""
    from datasets import load_dataset

    path = dataset_name or BUILTIN_PROMPTS
    extension = os.path.splitext(path)[1].lower()
    if os.path.isfile(path):
        if extension not in LOCAL_FORMATS:
            raise ConfigurationError(f"--dataset_name {path}: unknown file type '{extension}'; use one of {', '.join(LOCAL_FORMATS)}")
        if os.path.getsize(path) == 0:
            raise ConfigurationError(f"--dataset_name {path}: the file is empty; write one prompt per line (or records with a "
                                     f"'{prompt_column}' field)")
        try:
            dataset = load_dataset(LOCAL_FORMATS[extension], data_files=path, split="train", cache_dir=cache_dir)
        except Exception as error:  # datasets' DatasetGenerationError around pyarrow's ArrowInvalid, a JSON or CSV error
            cause = error.__cause__ or error
            raise ConfigurationError(f"--dataset_name {path}: not a readable {extension[1:]} file "
                                     f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})") from None
        if extension == ".txt":
            prompt_column = "text"
    else:
        try:
            dataset = load_dataset(path, config_name, split=split, cache_dir=cache_dir)
        except ValueError as error:  # an unknown configuration or split: datasets' message names the ones there are
            raise ConfigurationError(f"--dataset_name {path}: {error}".replace("\n", " ")) from None
        except (FileNotFoundError, ConnectionError) as error:  # no such dataset, or offline without it in the cache
            raise ConfigurationError(f"--dataset_name {path}: {error}; a local file needs its extension "
                                     f"({', '.join(LOCAL_FORMATS)})".replace("\n", " ")) from None
        except RuntimeError as error:
            if "scripts are no longer supported" in str(error):
                raise ConfigurationError(
                    f"--dataset_name {path} needs a loading script, which datasets >= 4 no longer runs; download its "
                    "data files and pass one (HPDv2: see README, Prompts)"
                ) from None
            raise
    if prompt_column not in dataset.column_names:
        raise ConfigurationError(f"--prompt_column '{prompt_column}' not in {path}; its columns are {dataset.column_names}")
    prompts = [p.strip() for p in dataset[prompt_column] if isinstance(p, str) and p.strip()]
    if not prompts:
        raise ConfigurationError(f"no prompts found in column '{prompt_column}' of {path}")
    return prompts


class BatchSchedule:
    """Epoch-wise shuffled items (prompts, or indices of an image dataset); each process takes
    its own slice of every global batch."""

    def __init__(self, items, batch_size, seed, num_processes=1, process_index=0):
        self.items = list(items)
        self.batch_size = batch_size
        self.seed = seed
        self.num_processes = num_processes
        self.process_index = process_index

    def _order(self, epoch):
        if getattr(self, "_cached_epoch", None) != epoch:
            generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._cached_order, self._cached_epoch = torch.randperm(len(self.items), generator=generator).tolist(), epoch
        return self._cached_order

    def batch(self, micro_step: int) -> list[str]:
        """Items of this process for global micro-step `micro_step`."""
        global_batch = self.batch_size * self.num_processes
        start = micro_step * global_batch + self.process_index * self.batch_size
        result = []
        for position in range(start, start + self.batch_size):
            epoch, offset = divmod(position, len(self.items))
            result.append(self.items[self._order(epoch)[offset]])
        return result


def image_size(args, micro_step: int | None) -> tuple[int, int]:
    """(height, width) of the images of global micro-step `micro_step`: --resolution, or with
    --resolution_buckets one bucket for the whole global batch (every process draws the same), drawn
    from (seed, micro-step) alone, so that a resumed run trains each step at the size it had."""
    buckets = getattr(args, "resolution_buckets", None)
    if not buckets or micro_step is None:
        return args.resolution
    generator = torch.Generator().manual_seed(args.seed * 1_000_033 + micro_step + 17)
    return buckets[int(torch.randint(len(buckets), (1,), generator=generator))]


def step_generator(seed: int, micro_step: int, process_index: int, device="cpu") -> torch.Generator:
    """All randomness of one micro-step (noise, timesteps, phrases) from one seeded generator."""
    return torch.Generator(device).manual_seed(seed + 1_000_003 * micro_step + 7919 * process_index)


def load_image_dataset(train_data_dir: str, prompt_column: str = "prompt", cache_dir: str | None = None):
    """An image folder with a metadata.jsonl / metadata.csv (file_name + prompt column), read by
    datasets' imagefolder builder: the real images of offline SRPO."""
    from datasets import load_dataset

    if not os.path.isdir(train_data_dir):
        raise ConfigurationError(f"--train_data_dir {train_data_dir}: no such folder")
    example = f'{{"file_name": "0.png", "{prompt_column}": "a cat"}}'
    try:
        dataset = load_dataset("imagefolder", data_dir=train_data_dir, split="train", cache_dir=cache_dir)
    except Exception as error:  # an empty folder, a metadata file that does not parse
        cause = error.__cause__ or error
        raise ConfigurationError(f"--train_data_dir {train_data_dir}: not an image folder datasets reads ({type(cause).__name__}: "
                                 f"{(str(cause).splitlines() or [''])[0]}); put images and a metadata.jsonl with lines like "
                                 f"{example} in it") from None
    if len(dataset) == 0:
        raise ConfigurationError(f"--train_data_dir {train_data_dir}: no images; add images and a metadata.jsonl like {example}")
    if prompt_column not in dataset.column_names:
        raise ConfigurationError(
            f"--prompt_column '{prompt_column}' not in {train_data_dir}; add a metadata.jsonl with "
            f'lines like {{"file_name": "0.png", "{prompt_column}": "a cat"}} (columns now: {dataset.column_names})'
        )
    return dataset


def image_to_tensor(image, size: tuple[int, int]) -> torch.Tensor:
    """PIL image -> 3 x height x width in [0, 1]: resized to cover (height, width), centre crop."""
    import numpy as np
    from PIL import Image

    height, width = size
    image = image.convert("RGB")
    scale = max(height / image.height, width / image.width)
    image = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    image = image.crop((left, top, left + width, top + height))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
