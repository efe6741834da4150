"""Model card and Hub upload for a finished run."""

import contextlib
import os
import re

from .errors import ConfigurationError
from .models import LORA_WEIGHTS_NAME

CARD = """---
{base_model_line}library_name: diffusers
license: {license}
{license_lines}tags:
- {family_tag}
- text-to-image
- {method}
- {kind}
{widget_lines}---

# {title}

{kind_text} of `{base_model}` trained with **{method}** on the reward `{reward}` for {steps} steps.{note}

## Use

```python
import torch
from diffusers import {imports}

{load_code}
image = pipe({prompt}, num_inference_steps=50, guidance_scale=3.5).images[0]
```
{comfyui_section}
{validation_section}{license_section}## Training configuration

```
{config}
```
"""


# The licence a trained output inherits from its base, shown on its Hub page (as diffusers' FLUX
# trainers write it): (license, license_name, license_link); any other base gets "other".
BASE_LICENSES = {
    "black-forest-labs/FLUX.1-dev": ("other", "flux-1-dev-non-commercial-license",
                                     "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md"),
    "black-forest-labs/FLUX.1-schnell": ("apache-2.0", None, None),
}


def hub_id_of(model: str) -> str | None:
    """The Hub id of a model named by its id or by a snapshot folder of the Hub's cache
    (.../models--black-forest-labs--FLUX.1-dev/snapshots/<hash>); None for any other folder."""
    if not os.path.isdir(model):
        return model
    match = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", os.path.abspath(model).replace(os.sep, "/") + "/")
    return f"{match[1]}/{match[2]}" if match else None


# Each family's transformer class and Hub tag, for the card's loading code.
TRANSFORMER_CLASSES = {"FluxPipeline": ("FluxTransformer2DModel", "flux"), "Flux2KleinPipeline": ("Flux2Transformer2DModel", "flux2"),
                       "QwenImagePipeline": ("QwenImageTransformer2DModel", "qwen-image"),
                       "StableDiffusion3Pipeline": ("SD3Transformer2DModel", "sd3"), "ZImagePipeline": ("ZImageTransformer2DModel", "z-image")}


def write_model_card(output_dir, args, method, repo_id=None, note=None, pipeline_class="FluxPipeline"):
    use_lora = not args.full_finetune
    transformer_class, family_tag = TRANSFORMER_CLASSES[pipeline_class]
    weights = repo_id or output_dir
    # The Hub refuses a card whose base_model is not a model id (a local path would fail the push
    # at the end of training): a local copy of FLUX gets no base_model line.
    base_id = hub_id_of(args.pretrained_model_name_or_path)
    base = base_id or args.pretrained_model_name_or_path
    # the base the adapter was trained on: with --revision, that revision
    base_source = f'"{base}"' + (f', revision="{args.revision}"' if getattr(args, "revision", None) else "")
    if use_lora:
        imports = pipeline_class
        load_code = (f'pipe = {pipeline_class}.from_pretrained({base_source}, dtype=torch.bfloat16).to("cuda")\n'
                     f'pipe.load_lora_weights("{weights}")')
    else:  # the trained transformer replaces the base model's; the rest of the pipeline is the base model's
        imports = f"{pipeline_class}, {transformer_class}"
        load_code = (f'transformer = {transformer_class}.from_pretrained("{weights}", subfolder="transformer", dtype=torch.bfloat16)\n'
                     f'pipe = {pipeline_class}.from_pretrained({base_source}, transformer=transformer, '
                     'dtype=torch.bfloat16).to("cuda")')
    secret = {"hub_token"}
    config = "\n".join(f"{k} = {v}" for k, v in sorted(vars(args).items()) if k not in secret)
    license, license_name, license_link = BASE_LICENSES.get(base_id, ("other", None, None))
    widget_lines, validation_section = _validation_images(output_dir, args)
    text = CARD.format(
        widget_lines=widget_lines,
        validation_section=validation_section,
        base_model_line=f"base_model: {base_id}\n" if base_id else "",
        license=license,
        license_lines=f"license_name: {license_name}\nlicense_link: {license_link}\n" if license_name else "",
        license_section=(f"## License\n\nPlease adhere to the licensing terms of `{base}`, of which these weights are a "
                         f"derivative: [{license_name}]({license_link}).\n\n" if license_link else ""),
        base_model=base,
        method=method,
        kind="lora" if use_lora else "full-fine-tune",
        kind_text=("LoRA adapter" + (" (trained on a 4-bit NF4 copy of the base, `--quantize_base nf4`; it loads on the "
                                     "bf16 model as below)" if getattr(args, "quantize_base", "none") == "nf4" else "")
                   if use_lora else "Fully fine-tuned transformer"),
        title=os.path.basename(os.path.abspath(output_dir)),
        reward=args.reward,
        steps=args.max_train_steps,
        note=f"\n\n**Stopped early** (`--stop_on_hacking`, held-out reward `{args.heldout_reward}`): {note}." if note else "",
        imports=imports,
        load_code=load_code,
        comfyui_section=("\nIn ComfyUI, Forge or Krita, load `pytorch_lora_weights.safetensors` with the LoRA loader at strength 1.0 "
                         "(the trained strength is in the weights); for FLUX.1's own key layout, `python -m flux_rl.lora_export "
                         "<this folder>` writes a kohya-style copy.\n" if use_lora and pipeline_class == "FluxPipeline" else ""),
        family_tag=family_tag,
        prompt=repr((args.validation_prompt or ["a photo of a cat"])[0]),  # a Python literal, whatever its quotes
        config=config,
    )
    # Written beside and renamed into place: a run killed here leaves no half card (a card newer than the
    # last checkpoint tells a rerun that the run finished, checkpoints.finished_weights).
    path = os.path.join(output_dir, "README.md")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


REWARD_DOWNLOAD_ADVICE = ("on a node without the Hub, fetch the weights beforehand (python -m rewards.download --output_dir "
                          "weights/rewards) and pass --reward_models_dir weights/rewards")


def first_line(error: BaseException) -> str:
    """An error's message cut to its first line, for one-line reports."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def hub_failure(error: BaseException) -> str | None:
    """Why fetching from the Hub failed and what to do, in a line, when `error` or one of its
    causes (transformers and diffusers wrap the Hub's errors) is a Hub or network error; None for
    any other error, which keeps its traceback."""
    import urllib.error

    from huggingface_hub import errors

    for _ in range(10):  # the chain of causes; bounded, as a chain can loop
        if error is None:
            return None
        if isinstance(error, errors.GatedRepoError):
            return "a gated repository: accept its licence on its Hub page, then log in with `hf auth login` (or set HF_TOKEN)"
        if isinstance(error, errors.RepositoryNotFoundError):
            return "no such repository on the Hub (a typo, or a private one: log in with `hf auth login`)"
        if isinstance(error, errors.RevisionNotFoundError):
            return "no such --revision on the Hub"
        if isinstance(error, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
            return "not in the Hugging Face cache, and the Hub is out of reach (offline, or HF_HUB_OFFLINE=1)"
        if isinstance(error, (errors.HfHubHTTPError, ConnectionError, urllib.error.URLError)):
            return f"the download failed ({type(error).__name__}: {first_line(error)})"
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def fetching(what: str, advice: str):
    """A Hub or network failure inside the block becomes a one-line ConfigurationError naming
    `what` (the flag and value), why, and `advice`; other errors pass as they are."""
    try:
        yield
    except ConfigurationError:
        raise
    except Exception as error:
        problem = hub_failure(error)
        if problem is None:
            raise
        raise ConfigurationError(f"{what}: {problem}; {advice}") from None


def check_base_model_reachable(name_or_path: str, revision: str | None = None, cache_dir: str | None = None) -> str | None:
    """A FLUX named by Hub id: its model_index.json (a few hundred bytes, or the cached copy) is
    fetched first, so that a gated model without access, a typo or an offline node without a copy
    fails in one line at start, not with a traceback after the reward models have loaded. Returns
    its pipeline class (None for a local folder, checked while parsing)."""
    from huggingface_hub import errors, hf_hub_download

    if os.path.isdir(name_or_path):
        return
    with fetching(f"--pretrained_model_name_or_path {name_or_path}",
                  "download it on a connected machine (e.g. `hf download black-forest-labs/FLUX.1-dev --local-dir flux-dev`) "
                  "and pass that folder"):
        try:
            model_index = hf_hub_download(name_or_path, "model_index.json", revision=revision, cache_dir=cache_dir)
        except errors.HFValidationError:  # e.g. models/flux/dev: meant as a folder
            raise ConfigurationError(f"--pretrained_model_name_or_path {name_or_path}: no such folder, and not a Hub model id "
                                     "(e.g. black-forest-labs/FLUX.1-dev)") from None
        except errors.RemoteEntryNotFoundError:
            raise ConfigurationError(f"--pretrained_model_name_or_path {name_or_path} has no model_index.json: name a diffusers "
                                     "FLUX pipeline, e.g. black-forest-labs/FLUX.1-dev") from None
    from .models import check_pipeline_class

    return check_pipeline_class(model_index, name_or_path)


def _validation_images(output_dir, args) -> tuple[str, str]:
    """The final validation grid as the card's widget (the Hub shows it on the model page) and a
    before / after section with the step-0 grid, when --validation_prompt rendered them."""
    import json

    final = f"validation/step-{args.max_train_steps:06d}.png"
    if not os.path.exists(os.path.join(output_dir, final)):
        return "", ""
    prompts = "; ".join(getattr(args, "validation_prompt", None) or [])
    widget = f"widget:\n- text: {json.dumps(prompts)}\n  output:\n    url: {final}\n"  # a JSON string is a YAML string
    before = "validation/step-000000.png"
    rows = ([f"| before training (step 0) | ![before]({before}) |"] if os.path.exists(os.path.join(output_dir, before)) else [])
    rows.append(f"| after step {args.max_train_steps} | ![after]({final}) |")
    section = ("## Validation images\n\n" + f"Prompts: {prompts}; each tile captioned with its reward.\n\n"
               + "| | |\n|---|---|\n" + "\n".join(rows) + "\n\n")
    return widget, section


def fetch_trained_output(repo_id: str, cache_dir: str | None, flag: str) -> str:
    """The folder of a trained output pushed to the Hub (--push_to_hub): only its weights, the LoRA
    file or transformer/, downloaded into `cache_dir` if given. `flag` names the input in errors."""
    from huggingface_hub import snapshot_download

    if not re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", repo_id):
        raise ConfigurationError(f"{flag}: {repo_id} is neither a folder (a trainer's --output_dir) nor a Hub repository id")
    try:
        return snapshot_download(repo_id, allow_patterns=[LORA_WEIGHTS_NAME, "transformer/*"], cache_dir=cache_dir)
    except Exception as error:  # not on the Hub, private, or offline and not in the cache: the Hub's message says which
        raise ConfigurationError(f"{flag}: {repo_id} is not a folder, and the Hub gave no copy of it: "
                                 f"{type(error).__name__}: {error}".replace("\n", " ")) from None


def create_repo_before_training(hub_model_id) -> str:
    """--push_to_hub: the repository is created (or found) before anything loads, as diffusers'
    examples do, so that a missing login, a name taken by someone else or an offline node fails in
    one line at start, not after hours of training."""
    from huggingface_hub import create_repo

    try:
        return create_repo(hub_model_id, exist_ok=True).repo_id  # the token of `hf auth login` or HF_TOKEN
    except Exception as error:  # not logged in, no write access, offline: the Hub's message says which
        raise ConfigurationError(f"--push_to_hub: cannot create or reach {hub_model_id} on the Hub ({type(error).__name__}: {error}); "
                                 "log in with `hf auth login`, or drop --push_to_hub and upload later".replace("\n", " ")) from None


def push_to_hub(output_dir, hub_model_id) -> str:
    """Uploads the run's final outputs (not its checkpoints). A failure is one line saying how to
    try again: the same command with --resume_from_checkpoint latest pushes a finished run at once."""
    from huggingface_hub import create_repo, upload_folder

    try:
        repo_id = create_repo(hub_model_id, exist_ok=True).repo_id
        upload_folder(repo_id=repo_id, folder_path=output_dir, ignore_patterns=["checkpoint-*", "*.tmp", "*.unloadable"])
    except Exception as error:  # offline, logged out, a network cut mid-upload: the weights are safe on disk
        raise ConfigurationError(f"--push_to_hub: uploading {output_dir} to {hub_model_id} failed ({type(error).__name__}: {error}); "
                                 "the run's outputs are all there: rerun the same command with --resume_from_checkpoint latest "
                                 "to push them".replace("\n", " ")) from None
    return repo_id
