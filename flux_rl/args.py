"""Flags every trainer shares, named as in diffusers' training examples, and their validation.
Each script adds its method's own flags and calls `validate_common_args` before loading anything."""

import argparse
import os

from .errors import ConfigurationError  # noqa: F401  (scripts and tests name it from here too)
from . import launcher
from .launcher import add_launch_args


def one_line_errors(parser: argparse.ArgumentParser):
    """argparse's own errors (an unknown flag, a missing value) as the one line run_cli prints, not its
    usage dump of every flag; a negative number after a flag reads as a flag to argparse, so say how to write it."""
    def error(message):
        if "expected one argument" in message:
            flag = message.split(":")[0].replace("argument ", "").split("/")[0].strip()
            message += f" (a negative number? write {flag}=-1e-4, with '=')"
        fail(f"{message}; `python {parser.prog} --help` lists the flags")

    parser.error = error
    return parser


def add_common_args(parser: argparse.ArgumentParser):
    one_line_errors(parser)
    a = parser.add_argument
    # Model and data
    a("--pretrained_model_name_or_path", type=str, default=None, help="FLUX folder or hub id, e.g. black-forest-labs/FLUX.1-dev.")
    a("--revision", type=str, default=None)
    a("--variant", type=str, default=None)
    a("--cache_dir", type=str, default=None,
      help="Where FLUX and hub datasets are downloaded and cached (default: the Hugging Face cache, HF_HOME).")
    a("--dataset_name", type=str, default=None, help="Hub dataset or local json/jsonl/csv/parquet/txt of prompts (default: built-in smoke prompts).")
    a("--dataset_config_name", type=str, default=None, help="Configuration (subset) of a hub dataset that has several.")
    a("--prompt_column", "--caption_column", dest="prompt_column", type=str, default="prompt",
      help="Column holding the prompts (--caption_column, as diffusers' examples name it, is the same flag).")
    a("--dataset_split", type=str, default="train")
    a("--max_sequence_length", type=int, default=512, help="T5 tokens, as the release.")
    a("--text_cache_size", type=int, default=2048, help="Prompts whose text embeddings stay cached (4 MB each at full size).")
    a("--offload_text_encoders", action="store_true", help="Keep CLIP/T5 on the CPU between encodes (about 10 GB less GPU memory).")
    # Reward
    a("--reward", type=str, default="hpsv2:1.0", help='Weighted reward spec, e.g. "hpsv2:1.0,pickscore:0.05".')
    a("--reward_models_dir", type=str, default=None, help="Folder with <reward name>/ subfolders of local weights; missing ones come from the Hub.")
    a("--reward_module", type=str, nargs="+", default=[],
      help="Python file(s) (my_rewards.py) or importable module(s) that register rewards of your own with "
           "rewards.register_reward; their names can then be used in --reward (README: 'Your own reward').")
    a("--loss_type", type=str, default="relu", choices=["relu", "neg"], help="relu: relu(threshold - r) * scale, as the SRPO release and ReFL; neg: -r * scale.")
    a("--reward_threshold", type=float, default=0.7, help="Threshold of the relu loss (0.7: SRPO release with HPSv2.1; 2: ReFL with ImageReward).")
    a("--loss_scale", type=float, default=1.0, help="Multiplies the loss (ReFL used 1e-3 with ImageReward).")
    # Rollout
    a("--resolution", type=str, default="720",
      help="Image size of the rollouts: one number for a square (720), or HEIGHT,WIDTH (e.g. 720,1280); multiples of 16.")
    a("--resolution_buckets", type=str, nargs="+", default=None,
      help="Several sizes, HEIGHT,WIDTH each (e.g. 1024,1024 768,1344 1344,768): every global batch takes one, drawn from "
           "(--seed, step), the same on every process, so a resumed run draws as an uninterrupted one. Replaces --resolution.")
    a("--validation_resolution", type=str, default=None,
      help="Size of the validation images, one number or HEIGHT,WIDTH (default: --resolution, or the first bucket).")
    a("--num_inference_steps", type=int, default=25, help="Rollout steps.")
    a("--rollout_shift", type=float, default=3.0, help="Fixed timestep shift of the rollout schedule; 0 uses diffusers' resolution-dependent shift.")
    a("--rollout_guidance", type=float, default=1.0,
      help="Guidance during the rollout: FLUX.1's guidance embedding (release: 1 for HPS, 2 for PickScore); for Qwen-Image and "
           "FLUX.2 [klein], classifier-free guidance, two transformer passes per step above 1 (e.g. 4.0).")
    a("--train_guidance", type=float, default=3.5,
      help="Guidance in the training step: FLUX.1's guidance embedding; for Qwen-Image and FLUX.2 [klein], classifier-free "
           "guidance (two passes, twice the branch's cost and activations, above 1; 1.0 is one pass).")
    # Fine-tuning
    a("--full_finetune", action="store_true", help="Train all transformer weights instead of LoRA.")
    a("--quantize_base", choices=["none", "nf4"], default="none",
      help="nf4: the frozen transformer's block weights in 4 bits (bitsandbytes NF4, QLoRA) under the fp32 LoRA adapters: "
           "FLUX.1's 22.2 GiB of weights become 5.8 GiB, for LoRA on a 24 GB card (with --offload_text_encoders, "
           "--gradient_checkpointing, --vae_gradient_checkpointing, --use_8bit_adam; README). Each layer is quantized "
           "on the GPU as it moves there. The LoRA it trains loads on the bf16 model as any other.")
    a("--rank", type=int, default=64)
    a("--lora_alpha", type=float, default=64)
    a("--lora_dropout", type=float, default=0.0,
      help="Dropout on the LoRA adapters' input in the steps that carry gradient; the rollout and validation run without it.")
    a("--init_lora_weights", type=str, default=None,
      help="Start the adapters from a trained LoRA: a folder with pytorch_lora_weights.safetensors (a trainer's --output_dir), "
           "a .safetensors file FluxPipeline.load_lora_weights reads (diffusers' or kohya's format), or a Hub id it was "
           "pushed to. --rank, --lora_alpha and --lora_layers must be the file's. A resumed run takes its checkpoint's "
           "adapters instead.")
    a("--lora_target_modules", "--lora_layers", dest="lora_target_modules", type=str, default="default",
      help="A preset or comma-separated module names (peft adapts every module whose name ends in one). Presets: 'default': "
           "the attention projections (to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out), the "
           "double blocks' feed-forwards (ff.net.0.proj, ff.net.2, ff_context.net.0.proj, ff_context.net.2: what diffusers' "
           "FLUX LoRA trainer adapts) and the single blocks' proj_mlp and proj_out (their attention output and MLP; the name "
           "also matches the final proj_out); 'attention': the attention projections only; 'all-linear': every linear layer, "
           "modulations and embedders too. --lora_layers, diffusers' name, is the same flag.")
    a("--gradient_checkpointing", action="store_true", help="Recompute each transformer block in the backward pass.")
    a("--gradient_checkpointing_ratio", type=float, default=1.0,
      help="With --gradient_checkpointing: the share of transformer blocks to recompute (spread evenly). Lower is faster "
           "(at 0 no recompute: one FLUX forward less per training branch) and holds the other blocks' activations.")
    a("--vae_gradient_checkpointing", action="store_true", help="Also recompute the VAE decoder's blocks when decoding with gradient.")
    a("--vae_attention", choices=["math", "sdpa"], default="math",
      help="The VAE's single-head attention (head dim 512) in decodes with gradient: 'math', two matmuls and a float32 "
           "softmax, or 'sdpa', torch's fused kernel, which for that head dim is the generic memory-efficient one (its "
           "backward took 16.5 ms a call at 720 px on an H200). math holds the N x N scores while it runs: 0.5 GB per "
           "image at 720 px, 2.1 GB at 1024. Decodes without gradient use the fused kernel either way.")
    a("--merge_lora_in_rollout", action="store_true", default=None,
      help="Fold the LoRA adapters into the base weights for the no-grad rollout (one matmul per projection instead of "
           "peft's extra kernels; the weights are restored bit for bit after it from copies: +2 bytes per adapted weight "
           "while it runs, 16 GiB for FLUX's default layers, 4.7 GiB for 'attention'; it sets the LoRA step's peak, 43.4 "
           "against 34.9 GiB estimated at 720 px: benchmarks/estimate_memory.py). Training branches keep the adapters. "
           "Default: on for LoRA on the attention projections only (--lora_layers attention), where the copies stay under "
           "the step's peak; off otherwise, under FSDP, with --quantize_base and with --rollout_dtype fp8 (whose copies take "
           "the adapters in). On a card with room, give it with the default layers for a faster rollout.")
    a("--no_merge_lora_in_rollout", dest="merge_lora_in_rollout", action="store_false", help="Run the rollout through peft's adapters.")
    a("--rollout_dtype", choices=["bf16", "fp8"], default="bf16",
      help="fp8: the no-grad rollout's linear layers as FP8 matmuls (e4m3, per-row weight and per-token input scales) on a "
           "copy of the current weights made each rollout, the LoRA adapters added into the copies; the training branches stay bf16 "
           "(flux_rl/fp8.py). Experimental: not timed on a GPU yet.")
    a("--batch_rollout_modulations", action="store_true", default=None,
      help="Run the blocks' modulation layers (linear(silu(temb)), 76 per forward) once for all rollout steps instead of "
           "once per step: one read of their 6.5 GB of bf16 weights instead of 25 (62 ms of a 2.9 s LoRA step at 720 px on "
           "an H200 went to these batch-1 products). Default: on, except under FSDP (sharded weights).")
    a("--no_batch_rollout_modulations", dest="batch_rollout_modulations", action="store_false",
      help="Run each modulation layer at every rollout step.")
    a("--compile", action="store_true",
      help="torch.compile each transformer block (per-block: short compile, same graphs reused), the VAE decoder and the "
           "reward models' image towers (see --no_compile_vae, --no_compile_reward). The first step compiles (about 80 s "
           "for FLUX at 720 px on an H200).")
    a("--compile_backend", type=str, default="inductor")
    a("--compile_mode", type=str, default=None, help="e.g. max-autotune-no-cudagraphs")
    a("--compile_vae", action="store_true", default=None,
      help="torch.compile the VAE decoder (eager GroupNorm was 125 ms of a 2.9 s LoRA step at 720 px on an H200; "
           "compiled, the reduction is split over the whole GPU and fused with SiLU). Default: with --compile.")
    a("--no_compile_vae", dest="compile_vae", action="store_false", help="Keep the VAE eager under --compile.")
    a("--compile_reward", action="store_true", default=None,
      help="torch.compile the reward models' image towers (a ViT at batch 1 is launch-bound: about 21 ms per HPSv2.1 "
           "forward on an H200 for 0.3 TFLOP). Default: with --compile, for every reward that names its image_tower().")
    a("--no_compile_reward", dest="compile_reward", action="store_false", help="Keep the reward models eager under --compile.")
    a("--attention_backend", type=str, default=None,
      help="diffusers attention backend of the transformer, e.g. flash (needs the flash-attn package); not _native_cudnn, "
           "whose backward crashed (see --rollout_attention_backend). Default: diffusers' native scaled_dot_product_attention "
           "(flash attention on the GPU).")
    a("--rollout_attention_backend", type=str, default=None,
      help="Attention backend for the no-grad rollout only, e.g. _native_cudnn: cuDNN's fused attention forward on Hopper "
           "(SRPO LoRA step 2.53 s at 720 px on an H200); the rollout has no backward, where torch 2.11's cuDNN attention "
           "crashed. Default: the transformer's own.")
    # Optimisation
    a("--output_dir", type=str, default="output")
    a("--seed", type=int, default=42)
    a("--train_batch_size", type=int, default=1, help="Rollout images per device per micro-step.")
    a("--gradient_accumulation_steps", type=int, default=1, help="Rollouts accumulated per optimiser step.")
    a("--max_train_steps", type=int, default=20)
    a("--learning_rate", type=float, default=None, help="Default: 5e-6 with --full_finetune (the SRPO release), 1e-4 for LoRA.")
    a("--scale_lr", action="store_true",
      help="Multiply --learning_rate by the images per optimiser step (GPUs x --train_batch_size x accumulation), as diffusers' examples do.")
    a("--lr_scheduler", type=str, default="constant")
    a("--lr_warmup_steps", type=int, default=0)
    a("--lr_num_cycles", type=int, default=1, help="Hard restarts of the cosine_with_restarts schedule.")
    a("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule (1: linear decay).")
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-4)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=0.1)
    a("--use_8bit_adam", action="store_true",
      help="8-bit optimizer moments: bitsandbytes' AdamW8bit, or with --bf16_weights the stochastic-rounding AdamW with "
           "blockwise 8-bit moments (flux_rl/optim.py; 2 bytes per parameter for both moments instead of 4).")
    a("--bf16_weights", action="store_true", help="Full fine-tune with bf16 trainable weights and AdamW with stochastic rounding (fits FLUX on one GPU).")
    a("--allow_tf32", action="store_true")
    a("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    # Checkpoints, logging, validation, hub
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int, default=None)
    a("--resume_from_checkpoint", type=str, default=None, help='"latest" or a checkpoint folder.')
    a("--upcast_before_saving", action="store_true",
      help="Save the final weights in float32. Default: in the training precision (bf16 under --mixed_precision bf16: "
           "a full fine-tune's fp32 master weights as a 24 GB bf16 model instead of 48 GB), as diffusers' examples do; "
           "checkpoints always keep the full precision.")
    a("--overwrite_output_dir", action="store_true",
      help="Start a new run in an --output_dir that holds an earlier run's checkpoints or weights (removed at start, with "
           "its model card, validation images and logs). Without it such a run is refused, so that nothing trained is "
           "overwritten by accident.")
    a("--report_to", type=str, default="tensorboard",
      help="tensorboard (default), wandb, or any accelerate tracker (comet_ml, mlflow, aim, clearml, dvclive, swanlab, trackio), "
           "several comma-separated; all (every one installed) or none. Validation images go to tensorboard and wandb.")
    a("--logging_dir", type=str, default="logs")
    a("--tracker_project_name", type=str, default=None)
    a("--validation_prompt", type=str, nargs="+", default=None,
      help="Prompts rendered before the first step (the untrained model), every --validation_steps and at the end.")
    a("--validation_steps", type=int, default=None, help="Render the validation prompts every N steps (besides before the first step and at the end).")
    a("--validation_seed", type=int, default=0, help="Image i of each validation prompt uses seed + i.")
    a("--validation_guidance", type=float, default=3.5,
      help="Guidance of the validation images: 3.5, FLUX.1-dev's usual embedding, as users will render them (the "
           "rollout's --rollout_guidance is the training recipe's, 1 under the HPS preset); classifier-free for Qwen-Image "
           "and FLUX.2 [klein].")
    a("--validation_inference_steps", type=int, default=None,
      help="Sampling steps of the validation images (default: --num_inference_steps), on the rollout's schedule.")
    a("--heldout_reward", type=str, default=None,
      help='A reward spec never trained on (e.g. "pickscore:1.0,aesthetic:1.0"), scored on the validation images beside the '
           "trained reward (logged as validation/heldout): the gap between the two is the sign of reward hacking.")
    a("--stop_on_hacking", action="store_true",
      help="With --heldout_reward and --validation_steps: stop when the held-out reward has fallen --hacking_margin below its "
           "best while the trained reward rose; the final weights are then those of the best step, whose checkpoint is kept.")
    a("--hacking_margin", type=float, default=0.02,
      help="How far below its best the held-out reward may fall before --stop_on_hacking stops, as a share of the best (0.02: 2%%).")
    a("--drift_band", type=float, default=None,
      help="With --stop_on_hacking: also stop when a drift monitor of the validation images (saturation, brightness, "
           "high-frequency energy) has moved more than this share of its value before training (e.g. 0.3), the other "
           "face of reward hacking; logged as validation/drift/* either way.")
    a("--num_validation_images", type=int, default=1,
      help="Images per validation prompt, rendered one batch of the prompts at a time (a grid row per prompt).")
    a("--push_to_hub", action="store_true")
    a("--hub_model_id", type=str, default=None)
    a("--hub_token", type=str, default=None,
      help="Refused: a token on the command line shows in `ps`, shell history and job logs. Run `hf auth login` once, "
           "or set HF_TOKEN in the environment.")
    a("--verbose", action="store_true",
      help="Show the libraries' own output too: diffusers', transformers' and datasets' loading bars and warnings.")
    add_launch_args(parser)
    return parser


def add_window_args(parser: argparse.ArgumentParser, train_window: str = "5,25"):
    """Where Direct-Align style branches start (Direct-Align and SRPO)."""
    a = parser.add_argument
    a("--train_window", type=str, default=train_window, help="Window [a,b] on a 50-step shift-3 schedule where branches start (release: 5,25 for HPS, 5,30 for PickScore).")
    a("--window_shift", type=float, default=3.0, help="Shift of that 50-step schedule.")
    a("--gt_ratio", type=float, default=0.9, help="Share of the way back to x0 covered by the known noise; the one model step covers the rest.")
    a("--num_injections", type=int, default=1, help="Noise injections (start points) per rollout image.")
    return parser


def validate_window_args(args):
    from .schedules import TrainingWindow

    args.train_window = parse_pair(args.train_window, "train_window", int)
    if args.num_injections < 1:
        fail(f"--num_injections must be at least 1, got {args.num_injections}")
    if args.window_shift <= 0:
        fail(f"--window_shift must be positive, got {args.window_shift} (the release's schedule uses 3)")
    TrainingWindow(*args.train_window, shift=args.window_shift, gt_ratio=args.gt_ratio)  # raises on a bad window


def parse_size(text, flag: str) -> tuple[int, int]:
    """'720' -> (720, 720); '720,1280' -> (720, 1280), as (height, width); one line naming the flag otherwise.
    Each side a positive multiple of 16 (FLUX packs 2x2 latents of an 8x VAE)."""
    if isinstance(text, tuple):
        return text
    parts = str(text).replace("x", ",").split(",")
    try:
        height, width = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
        if len(parts) > 2:
            raise ValueError
    except ValueError:
        fail(f"--{flag} '{text}': give one number (720) or HEIGHT,WIDTH (720,1280)")
    if min(height, width) <= 0 or height % 16 or width % 16:
        fail(f"--{flag} {text}: each side must be a positive multiple of 16 (FLUX packs 2x2 latents of an 8x VAE)")
    return height, width


def parse_pair(text, flag: str, cast=float) -> tuple:
    """'5,25' -> (5, 25); a one-line error naming the flag otherwise. Tuples pass through."""
    if isinstance(text, tuple):
        return text
    try:
        first, second = (cast(x) for x in str(text).split(","))
    except ValueError:
        example = "5,25" if cast is int else "0.1,0.25"
        raise ValueError(f"--{flag} '{text}' must be two comma-separated numbers, e.g. --{flag} {example}") from None
    return first, second




def run_cli(parse_args, main):
    """`python script.py ...`: a configuration error prints one line and exits with status 2,
    as argparse does, instead of a traceback. While parsing every ValueError is the input's;
    once running, only a ConfigurationError is (any other error keeps its traceback).
    With --num_processes or --accelerate_config this process checks the flags, then starts the
    workers (flux_rl.launcher) and exits with their status."""
    import sys

    def exit_with(error):
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

    request = launcher.launch_request(sys.argv[1:])
    try:
        if request:
            environment, count = launcher.worker_environment(request)
            os.environ.update(environment)  # the flags are checked as the workers will see them (FSDP or not)
        args = parse_args()
    except ValueError as error:
        exit_with(error)
    if weights := finished_run_weights(args):  # a job script that reruns until success succeeds, without loading a model
        if os.environ.get("RANK", "0") != "0":
            return
        line = (f"{args.output_dir} holds a finished run ({args.max_train_steps} steps): its weights are {weights}, "
                f"its model card {os.path.join(args.output_dir, 'README.md')}")
        if args.push_to_hub:  # the run's push may be what failed: pushing again is harmless (the Hub keeps one copy)
            from .hub import push_to_hub

            try:
                line += f"; pushed to https://huggingface.co/{push_to_hub(args.output_dir, args.hub_model_id)}"
            except ConfigurationError as error:
                exit_with(error)
        print(line if args.push_to_hub else line + "; nothing to do")
        return
    if request:
        sys.exit(launcher.run_workers(environment, count, sys.argv))
    try:
        main(args)
    except ConfigurationError as error:
        exit_with(error)


def finished_run_weights(args) -> str | None:
    """With --resume_from_checkpoint: the final weights of the run, if it has finished (its last step's
    checkpoint, its weights and its model card in place; checkpoints.finished_weights). A run whose
    last checkpoint is in place but whose end did not complete resumes there and publishes them."""
    from .checkpoints import finished_weights, read_training_state, resolve_resume

    if not getattr(args, "resume_from_checkpoint", None):  # evaluate_flux.py shares run_cli and has no checkpoints
        return None
    path = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    state = read_training_state(path) if path else None
    if state is None or (state["global_step"] != args.max_train_steps and not state.get("stopped_for_hacking")):
        return None
    return finished_weights(args.output_dir, path)


# --report_to's trackers (accelerate's) and the package each needs; "all" is every one installed.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "mlflow": "mlflow", "aim": "aim",
                    "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}


def chosen_trackers(report_to: str) -> list[str]:
    """--report_to as a list: "tensorboard", "wandb,mlflow", "all" or "none"."""
    return [name.strip() for name in report_to.split(",") if name.strip()] or ["none"]


def looks_like_a_path(value: str, extensions: tuple) -> bool:
    """A value meant as a local path rather than a Hub id: it starts like one or ends in one of
    `extensions`. Any dot is not enough: Hub ids hold them (black-forest-labs/FLUX.1-dev)."""
    return value.startswith((".", "/", "~")) or value.lower().endswith(extensions)


def mixed_precision(args) -> str:
    """--mixed_precision, else what `accelerate launch` was given (its config file or flag)."""
    return args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")


def launched_with_fsdp() -> bool:
    """`accelerate launch` with an FSDP config sets this before the script starts, so it is
    known before any model loads (accelerate's own state exists only later)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fail(message: str):
    raise ConfigurationError(message)


# (flag, wanted range, why): numbers outside these ranges would fail only after the models load
# (a seed numpy refuses, an AdamW beta torch refuses) or, worse, train nothing without a word
# (a zero LoRA alpha, loss scale or clipping norm leaves the weights where they are).
# A range is "positive", "non-negative", "in [0, 1)" or a closed interval (least, most).
COMMON_RANGES = [
    ("max_sequence_length", (1, 512), "FLUX.1's T5 takes at most 512 tokens"),
    ("text_cache_size", "non-negative", "0 keeps no prompt embedding cached"),
    ("loss_scale", "positive", "0 trains nothing and a negative scale lowers the reward"),
    ("rollout_shift", "non-negative", "0 uses diffusers' resolution-dependent shift"),
    ("rollout_guidance", "non-negative", "FLUX's guidance embedding is trained on non-negative values"),
    ("validation_guidance", "non-negative", "FLUX's guidance embedding is trained on non-negative values"),
    ("train_guidance", "non-negative", "FLUX's guidance embedding is trained on non-negative values"),
    ("lora_alpha", "positive", "the LoRA update is scaled by alpha / rank, so 0 trains nothing"),
    ("lora_dropout", "in [0, 1)", "it is the probability of dropping an adapter input"),
    ("seed", (0, 2**32 - 1), "numpy takes seeds in that range"),
    ("validation_seed", (0, 2**32 - 1), "numpy takes seeds in that range"),
    ("lr_warmup_steps", "non-negative", "0 starts at the full learning rate"),
    ("lr_num_cycles", "positive", "cosine_with_restarts runs at least one cosine"),
    ("lr_power", "positive", "the polynomial schedule decays as (1 - progress) ** power"),
    ("adam_beta1", "in [0, 1)", "AdamW refuses other betas"),
    ("adam_beta2", "in [0, 1)", "AdamW refuses other betas"),
    ("adam_weight_decay", "non-negative", "0 turns weight decay off"),
    ("adam_epsilon", "non-negative", "AdamW refuses a negative epsilon"),
    ("max_grad_norm", "positive", "gradients are clipped to this norm, so 0 trains nothing; a large value turns clipping off"),
]


def check_ranges(args, ranges):
    """A one-line error for the first flag of `ranges` whose value lies outside its range."""
    for flag, wanted, why in ranges:
        value = getattr(args, flag, None)
        if value is None:
            continue
        if wanted == "positive":
            ok = value > 0
        elif wanted == "non-negative":
            ok = value >= 0
        elif wanted == "in [0, 1)":
            ok = 0 <= value < 1
        else:
            ok = wanted[0] <= value <= wanted[1]
            wanted = f"in [{wanted[0]}, {wanted[1]}]"
        if not ok:
            fail(f"--{flag} must be {wanted}, got {value} ({why})")


def validate_common_args(args):
    """One-line errors that say what to change, before any model is loaded."""
    if not args.pretrained_model_name_or_path:
        fail("--pretrained_model_name_or_path is required (e.g. black-forest-labs/FLUX.1-dev, or tiny-models/flux for the smoke run)")
    args.resolution = parse_size(args.resolution, "resolution")
    if args.resolution_buckets:
        args.resolution_buckets = [parse_size(bucket, "resolution_buckets") for bucket in args.resolution_buckets]
        args.resolution = args.resolution_buckets[0]  # what the log, the card and validation name when buckets are used
    args.validation_resolution = parse_size(args.validation_resolution, "validation_resolution") if args.validation_resolution \
        else args.resolution
    for flag in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "num_inference_steps", "checkpointing_steps",
                 "num_validation_images", "validation_inference_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            fail(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    import math

    for flag, value in vars(args).items():  # nan passes every comparison, so every range check: refused first
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"--{flag} {value}: give a finite number")
    check_ranges(args, COMMON_RANGES)
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        fail(f"--checkpoints_total_limit must be at least 1, got {args.checkpoints_total_limit}")
    if args.learning_rate is None:
        args.learning_rate = 5e-6 if args.full_finetune else 1e-4
    if args.learning_rate <= 0:
        fail(f"--learning_rate must be positive, got {args.learning_rate}")
    if args.lr_scheduler == "polynomial" and args.learning_rate <= 1e-7:
        fail(f"--lr_scheduler polynomial decays to 1e-7, so --learning_rate must be above it, got {args.learning_rate}")
    if args.rank < 1:
        fail(f"--rank must be at least 1, got {args.rank}")
    if args.lora_target_modules and not args.full_finetune:
        from .models import check_lora_targets, check_lora_targets_of_folder, lora_targets

        pipeline_class = _local_pipeline_class(args)
        if pipeline_class in (None, "FluxPipeline"):  # FLUX.1's layers are written out: no model needed
            check_lora_targets(lora_targets(args.lora_target_modules))
        else:  # another family's local folder: its transformer built from its config on the meta device
            check_lora_targets_of_folder(args.pretrained_model_name_or_path, pipeline_class, args.lora_target_modules)
    if not 0.0 <= args.gradient_checkpointing_ratio <= 1.0:
        fail(f"--gradient_checkpointing_ratio must lie in [0, 1] (the share of blocks recomputed), got {args.gradient_checkpointing_ratio}")
    if args.gradient_checkpointing_ratio != 1.0 and not args.gradient_checkpointing:
        fail("--gradient_checkpointing_ratio needs --gradient_checkpointing (without it no block is recomputed)")
    if args.init_lora_weights:
        check_init_lora(args)
    if args.lora_dropout and args.full_finetune:
        fail("--lora_dropout is for LoRA training; drop it with --full_finetune")
    if args.bf16_weights and not args.full_finetune:
        fail("--bf16_weights is for --full_finetune (LoRA weights are small and stay fp32)")
    if args.bf16_weights and mixed_precision(args) != "bf16":
        # bf16 weights under fp32 inputs: the first matmul fails ("mat1 and mat2 must have the same dtype")
        fail("--bf16_weights runs the model in bf16: add --mixed_precision bf16")
    if args.merge_lora_in_rollout and args.full_finetune:
        fail("--merge_lora_in_rollout is for LoRA training; drop it with --full_finetune")
    if args.quantize_base != "none":
        if args.full_finetune:
            fail(f"--quantize_base {args.quantize_base} freezes the base in 4 bits, which a full fine-tune trains; drop one of them")
        if launched_with_fsdp():
            fail(f"--quantize_base {args.quantize_base} does not run on FSDP's sharded weights; train it on one GPU or with DDP")
        if args.merge_lora_in_rollout:  # peft would dequantize, add and quantize again, a lossy round trip every step
            fail(f"--merge_lora_in_rollout cannot fold adapters into 4-bit weights exactly; drop it with --quantize_base {args.quantize_base}")
        if args.rollout_dtype == "fp8":
            fail(f"--rollout_dtype fp8 makes FP8 copies of bf16 weights, not of 4-bit ones; drop it with --quantize_base {args.quantize_base}")
    if args.rollout_dtype == "fp8" and launched_with_fsdp():
        fail("--rollout_dtype fp8 quantises whole weights, which FSDP shards; drop it (or train with DDP)")
    if launched_with_fsdp():
        if args.bf16_weights:
            # accelerate upcasts trainable weights to fp32 under FSDP with mixed precision: the flag would do nothing.
            fail("--bf16_weights is for a single GPU; under FSDP the sharded weights are fp32 master copies, so drop --bf16_weights")
        if args.merge_lora_in_rollout:
            # Each rank holds a shard of every weight: peft's merge would add a whole delta to a shard.
            fail("--merge_lora_in_rollout does not run on FSDP's sharded weights; drop it (or train LoRA with DDP)")
        if args.batch_rollout_modulations:
            # The tables are computed outside the blocks' forwards, where FSDP holds only each rank's shard of the weights.
            fail("--batch_rollout_modulations needs whole weights outside the blocks' forwards, which FSDP shards; drop it")
        if args.use_8bit_adam:
            # bitsandbytes' 8-bit update refuses FSDP2's DTensor parameters (bitsandbytes 0.50).
            fail("--use_8bit_adam does not run on FSDP's sharded parameters; the optimizer state is already sharded across GPUs, so drop --use_8bit_adam")
    if args.merge_lora_in_rollout is None:
        from .models import ATTENTION_LORA_TARGETS, lora_targets

        # On where it does not raise the step's peak: adapters on the attention projections only, whose restoring copies
        # (4.7 GiB for FLUX) fit under the training branches' peak (H200: compiled LoRA step 3.09 -> 2.93 s, same peak).
        # With more layers adapted the copies make the rollout the peak: the default layers' 16 GiB, 43.4 against 34.9 GiB
        # estimated at 720 px (benchmarks/estimate_memory.py). Off with a 4-bit base and under FP8 (its copies take the
        # adapters in, fp8.py).
        attention_only = set(lora_targets(args.lora_target_modules)) <= set(ATTENTION_LORA_TARGETS)
        args.merge_lora_in_rollout = (not args.full_finetune and not launched_with_fsdp() and args.quantize_base == "none"
                                      and args.rollout_dtype != "fp8" and attention_only)
    # Measured on an H200 (benchmarks/RESULTS.md, 2026-11-27): with these two defaults and --batch_branches the compiled
    # SRPO LoRA step went 2.82 -> 2.59 s.
    if args.batch_rollout_modulations is None:
        args.batch_rollout_modulations = not launched_with_fsdp()
    if args.compile_vae is None:
        args.compile_vae = args.compile
    # --compile_reward stays None when not given: see compiles_reward.
    for flag in ("attention_backend", "rollout_attention_backend"):
        if getattr(args, flag, None) is not None:
            _check_attention_backend(flag, getattr(args, flag))
    if mixed_precision(args) == "fp16":
        import torch

        if not torch.cuda.is_available():  # accelerate would take it and run a CPU's fp16 autocast, slowly or not at all
            fail("--mixed_precision fp16 needs a CUDA GPU; on this machine use bf16 or no")
    if args.rollout_attention_backend == "_native_cudnn" and mixed_precision(args) == "no":
        # fp32 weights roll out in fp32, which cuDNN's attention does not take: torch would stop at the first rollout.
        fail("--rollout_attention_backend _native_cudnn takes bf16 or fp16 only; add --mixed_precision bf16 or drop the flag")
    _check_names_used_after_loading(args)
    trackers = chosen_trackers(args.report_to)
    unknown = [name for name in trackers if name not in TRACKER_PACKAGES and name not in ("all", "none")]
    if unknown or (len(trackers) > 1 and {"all", "none"} & set(trackers)):
        fail(f"--report_to {args.report_to}: choose from {', '.join(TRACKER_PACKAGES)} (several comma-separated), all or none")
    if args.validation_steps is not None and args.validation_steps < 1:
        fail(f"--validation_steps must be at least 1, got {args.validation_steps}")
    if args.heldout_reward and not args.validation_prompt:
        fail("--heldout_reward scores the validation images: add --validation_prompt (several prompts, e.g. a dozen) and --validation_steps")
    if args.stop_on_hacking and not (args.heldout_reward and args.validation_steps):
        fail("--stop_on_hacking compares the held-out and trained rewards at each validation: give --heldout_reward and --validation_steps")
    if args.drift_band is not None and not (args.drift_band > 0 and args.stop_on_hacking):
        fail(f"--drift_band must be positive and goes with --stop_on_hacking, got {args.drift_band}")
    if args.hacking_margin < 0:
        fail(f"--hacking_margin must be non-negative, got {args.hacking_margin}")
    if args.validation_steps is not None and not args.validation_prompt:
        fail("--validation_steps renders --validation_prompt, which is not given: add e.g. --validation_prompt \"a photo of a cat\"")
    if args.push_to_hub and not args.hub_model_id:
        fail("--push_to_hub needs --hub_model_id (e.g. your-name/flux-srpo-lora)")
    if args.hub_token:  # never echoed: the value is the secret
        fail("--hub_token: a token on the command line shows in `ps`, shell history and logs; drop it and run "
             "`hf auth login` once, or set HF_TOKEN")
    for flag in ("pretrained_model_name_or_path", "reward_models_dir", "train_data_dir"):
        value = getattr(args, flag, None)
        if value and (flag != "pretrained_model_name_or_path" or looks_like_a_local_folder(value)) and not os.path.exists(value):
            fail(f"--{flag} {value}: no such folder")
    model = args.pretrained_model_name_or_path
    if os.path.isdir(model) and not os.path.exists(os.path.join(model, "model_index.json")):
        fail(f"--pretrained_model_name_or_path {model}: no model_index.json in it; name a FluxPipeline folder (as save_pretrained "
             "writes it, or a Hub snapshot) or a Hub id")
    if os.path.isdir(model):
        from .models import check_family_flags, check_pipeline_class

        check_family_flags(check_pipeline_class(os.path.join(model, "model_index.json"), model), args)
    _check_output_dir_writable(args.output_dir)
    from .checkpoints import check_free_space

    check_free_space(args)
    import importlib.util

    for name in trackers:
        package = TRACKER_PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:  # accelerate would drop it with a warning and log nothing there
            fail(f"--report_to {name} needs {package}: pip install {package} (or use --report_to tensorboard)")
    from .data import LOCAL_FORMATS

    if args.dataset_name and looks_like_a_path(args.dataset_name, tuple(LOCAL_FORMATS)) and not os.path.exists(args.dataset_name):
        fail(f"--dataset_name {args.dataset_name}: no such file or folder")
    from .checkpoints import check_resume_config, earlier_run_outputs, earlier_run_paths, inside, resolve_resume
    from .models import LORA_WEIGHTS_NAME

    path = resolve_resume(args.resume_from_checkpoint, args.output_dir)  # one-line error when missing
    if path:
        check_resume_config(path, args)
    elif args.overwrite_output_dir:
        # What it removes at start must not be read by this run: a first stage's weights to start from,
        # the prompts, or (an --output_dir pointed at a model folder) part of FLUX or the reward models.
        for flag in ("init_lora_weights", "dataset_name", "train_data_dir", "pretrained_model_name_or_path", "reward_models_dir"):
            value = getattr(args, flag, None)
            if not value or not os.path.exists(value):
                continue
            read = os.path.join(value, LORA_WEIGHTS_NAME) if flag == "init_lora_weights" and os.path.isdir(value) else value
            holds_models = flag in ("pretrained_model_name_or_path", "reward_models_dir")
            doomed = [p for p in earlier_run_paths(args.output_dir, args.logging_dir)
                      if inside(read, p) or (holds_models and inside(p, read))]
            if doomed:
                fail(f"--{flag} {value} and {doomed[0]}, which --overwrite_output_dir removes at start, overlap; "
                     "write this run to another --output_dir")
    elif earlier := earlier_run_outputs(args.output_dir):
        # A new run would replace checkpoint-N folders of the same names and rotate the newer ones away.
        resumable = any(name.startswith("checkpoint-") for name in earlier)
        fail(f"--output_dir {args.output_dir} holds an earlier run's {', '.join(earlier[-3:])}: "
             + ("continue it with --resume_from_checkpoint latest, or " if resumable else "")
             + "start over with --overwrite_output_dir, or choose another --output_dir")
    from rewards import import_reward_modules, parse_reward_spec

    import_reward_modules(args.reward_module)  # before the spec is read: they add names to it
    parse_reward_spec(args.reward)
    if args.heldout_reward:
        parse_reward_spec(args.heldout_reward)


def _check_output_dir_writable(output_dir: str):
    """--output_dir is a folder, or can become one, that this user can write (checked on the nearest
    part of it that exists), before anything is loaded or trained."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        fail(f"--output_dir {output_dir} is a file; name a folder")
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        fail(f"--output_dir {output_dir}: {existing} is a file, so no folder can be made under it; name another --output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(f"--output_dir {output_dir}: {existing} is not writable by this user; name another --output_dir")


def _local_pipeline_class(args) -> str | None:
    """The pipeline class a local checkpoint folder's model_index.json names (None: a Hub id, or unreadable)."""
    import json

    path = os.path.join(getattr(args, "pretrained_model_name_or_path", "") or "", "model_index.json")
    try:
        with open(path) as f:
            return json.load(f).get("_class_name")
    except (OSError, ValueError):
        return None


def looks_like_a_local_folder(value: str) -> bool:
    """A path rather than a Hub id ("org/name"): it starts with . or /, has more than one /, or its first
    part is a folder here (tiny-models/flx, a typo of tiny-models/flux, is not asked of the Hub for 25 s)."""
    parts = value.split("/")
    return value.startswith((".", "/", "~")) or len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))


def check_init_lora(args, path: str | None = None):
    """The LoRA to start from (`path`: where it was downloaded to) exists and has this run's rank
    and alpha, read from its header. A Hub id is checked once downloaded, in training.setup."""
    path = path or args.init_lora_weights
    if args.full_finetune:
        fail("--init_lora_weights starts LoRA adapters; drop it with --full_finetune")
    if not os.path.exists(path):
        if looks_like_a_path(path, (".safetensors",)):
            fail(f"--init_lora_weights {path}: no such file or folder")
        return  # a Hub id
    from .models import lora_file_config

    try:
        _, _, rank, alpha = lora_file_config(path)
    except Exception as error:  # OSError, a safetensors header that does not parse, no LoRA weights in it
        fail(f"--init_lora_weights {args.init_lora_weights}: not a LoRA file that FluxPipeline.load_lora_weights reads "
             f"({type(error).__name__}: {error})")
    if rank != args.rank:
        fail(f"--init_lora_weights {args.init_lora_weights} has rank {rank}; pass --rank {rank}")
    if alpha is not None and float(alpha) != float(args.lora_alpha):
        fail(f"--init_lora_weights {args.init_lora_weights} was trained with lora_alpha {alpha}; pass --lora_alpha {alpha:g}")


# diffusers.optimization.SchedulerType's values, written out so that checking the flag does not import
# diffusers (3 s); tests/test_args.py holds the two equal.
LR_SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "piecewise_constant"]


def _check_names_used_after_loading(args):
    """Names that diffusers and torch.compile would refuse only once the models are loaded."""
    if args.lr_scheduler not in LR_SCHEDULERS:
        fail(f"--lr_scheduler {args.lr_scheduler}: choose one of {', '.join(LR_SCHEDULERS)}")
    if not (args.compile or args.compile_vae or compiles_reward(args)):
        return
    import torch._dynamo
    import torch._inductor

    backends = torch._dynamo.list_backends(exclude_tags=())
    if args.compile_backend not in backends:
        fail(f"--compile_backend {args.compile_backend}: choose one of torch.compile's backends, e.g. inductor or aot_eager")
    modes = list(torch._inductor.list_mode_options())
    if args.compile_mode is not None and args.compile_mode not in modes:
        fail(f"--compile_mode {args.compile_mode}: choose one of {', '.join(modes)}")


def compiles_reward(args) -> bool:
    """Whether the reward models' image towers are compiled: --compile_reward, else with --compile."""
    return args.compile if args.compile_reward is None else args.compile_reward


def _check_attention_backend(flag: str, name: str):
    """A diffusers attention backend that exists, has its package and can run here."""
    import torch
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    names = [backend.value for backend in AttentionBackendName]
    if name not in names:
        fail(f"--{flag} {name}: choose one of diffusers' backends: {', '.join(names)}")
    if flag == "attention_backend" and name == "_native_cudnn":
        # Seen twice on an H200 (torch 2.11): with torch's own pick of cuDNN in eager blocks (hence prepare_for_training
        # turns it off) and with this backend in compiled ones, the first backward stopped the process with an illegal
        # memory access.
        fail("--attention_backend _native_cudnn: cuDNN's attention backward crashed FLUX training (illegal memory access, "
             "torch 2.11 on an H200); use --rollout_attention_backend _native_cudnn, for the rollout, which has no backward")
    try:  # a backend from a package (flash-attn, sageattention, xformers) that is not installed
        _check_attention_backend_requirements(AttentionBackendName(name))
    except RuntimeError as error:
        fail(f"--{flag} {name}: {error}")
    if name in ("_native_cudnn", "_native_efficient") and not torch.cuda.is_available():
        fail(f"--{flag} {name} needs a CUDA GPU; drop the flag on this machine")
