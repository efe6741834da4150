#!/usr/bin/env python
"""Time one training step of each trainer on models with random weights.

    # full size on one GPU (FLUX.1-dev-size transformer and VAE, HPSv2.1-size reward, bf16)
    python benchmarks/benchmark_trainers.py --size full --resolutions 720,1024 --compile_modes eager,compiled

    # the tiny models on the CPU (what the test suite runs)
    python benchmarks/benchmark_trainers.py --size tiny --resolutions 64 --rollout_steps 3 --steps 1 --warmup 0

    # no GPU: FLOPs of one full-size step, counted on the meta device (shapes only, no memory, a
    # minute per configuration on a CPU), and the least time a card with that matmul peak needs
    python benchmarks/benchmark_trainers.py --device meta --modes lora,full --compile_modes eager --peak_tflops 805

    # another family: FLUX.2 [klein] base 4B or Qwen-Image, with their guidance (random Qwen embeddings stand in)
    python benchmarks/benchmark_trainers.py --family flux2_klein --trainers srpo --modes lora --resolutions 720 \
        --trainer_flags="--rollout_guidance 4 --train_guidance 1"

Modes: `lora` (bf16 base, fp32 LoRA r=64, AdamW), `full` (fp32 master weights, 8-bit AdamW),
`full_bf16` (bf16 weights, AdamW with stochastic rounding and bf16 moments).

Each trainer's own `training_step` runs on a `Run` assembled here from random-weight models
(no weights to download: speed and memory do not depend on the weight values). Text embeddings
are random tensors of FLUX's shapes (T5: 512 x 4096, CLIP pooled: 768), as the trainers cache
them after the first step anyway. Prints a markdown table: median seconds per optimiser step,
peak GPU memory, and achieved TFLOP/s (matmul FLOPs of one step counted with
torch.utils.flop_counter in eager mode, divided by the median step time); then the rollout alone
(the no-grad sampling every step starts with) and its TFLOP/s, the optimizer's part of a step
(clip + step + zero_grad, timed alone), and the first warm-up step's time
(with --compile: compilation plus one step, for the first compiled configuration of a process;
later ones reuse its graphs, as they are the same blocks), and on a GPU the host waits of the
FLOP-counted step (calls that made the host wait for the GPU, under torch.cuda.set_sync_debug_mode;
their source lines go to stderr; the run's first step, so its prompts are encoded). On a GPU the header also gives the
card's measured bf16 matmul rate (8192^3 products), the ceiling to read TFLOP/s against.
`--checkpointing on,off` and repeatable `--variant=FLAGS` multiply the configurations; with
`--reuse_flops` a configuration's variants (and its eager/compiled twin) share one FLOP count
(only for variants that do not change what a step computes), with `--no_flops` none is counted.
"""

import argparse
import contextlib
import dataclasses
import functools
import gc
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_direct_align  # noqa: E402
import train_draft_baseline  # noqa: E402
import train_refl_baseline  # noqa: E402
import train_srpo_flux  # noqa: E402
from flux_rl import data, models, tiny_models, training  # noqa: E402
from flux_rl.args import compiles_reward  # noqa: E402
from flux_rl.families import flux1, flux2_klein, qwen_image  # noqa: E402
from flux_rl.flux import Conditioning  # noqa: E402

nan = float("nan")

TRAINERS = {
    # SRPO's drift monitor (a no-grad decode of the rollout image, one step in --monitor_steps = 10 by default, 5.0
    # TFLOP at 720 px) is left out: the FLOP-counted step and every timed step do the same work.
    "srpo": (train_srpo_flux, ["--monitor_steps", "0"]),
    "direct_align": (train_direct_align, []),
    "refl": (train_refl_baseline, []),
    "draft_lv": (train_draft_baseline, ["--draft_lv"]),
}


class RandomPromptEncoder:
    """Stands in for FLUX's text encoders: random embeddings of the real shapes, fixed per prompt."""

    lookahead = 0  # nothing to encode ahead

    def __init__(self, joint_dim, pooled_dim, sequence_length):
        self.joint_dim, self.pooled_dim, self.sequence_length = joint_dim, pooled_dim, sequence_length

    def __call__(self, prompts, upcoming=()):
        generator = torch.Generator().manual_seed(len(prompts))
        return Conditioning(
            torch.randn(len(prompts), self.sequence_length, self.joint_dim, generator=generator),
            torch.randn(len(prompts), self.pooled_dim, generator=generator),
            torch.zeros(self.sequence_length, 3),
        )


class RandomFamilyPromptEncoder:
    """Stands in for FLUX.2 [klein]'s Qwen3 or Qwen-Image's Qwen2.5-VL: random embeddings of their shapes, with the
    negative prompt's as `.negative`, as the families' encoders attach it (used when a guidance is above 1)."""

    lookahead = 0

    def __init__(self, family, joint_dim, sequence_length):
        self.family, self.joint_dim, self.sequence_length = family, joint_dim, sequence_length

    def conditioning(self, embeds):
        if self.family is flux2_klein:  # text position ids (T, H, W, L) = (0, 0, 0, token)
            return flux2_klein.Conditioning(embeds, torch.cartesian_prod(*(torch.arange(1),) * 3, torch.arange(self.sequence_length)))
        return qwen_image.Conditioning(embeds, None)  # every prompt fills the length: no mask, as encode_prompt gives it

    def __call__(self, prompts, upcoming=()):
        generator = torch.Generator().manual_seed(len(prompts))
        positive, negative = (self.conditioning(torch.randn(len(prompts), self.sequence_length, self.joint_dim, generator=generator))
                              for _ in range(2))
        positive.negative = negative
        return positive


def family_models(family, size):
    """(transformer class, its config, VAE class, its config, prompt encoder, family module) of a family at a size: FLUX.1-dev,
    FLUX.2 [klein] base 4B (text 512 tokens, klein's --max_sequence_length) or Qwen-Image (256 text tokens: it keeps each
    prompt's own length, and a long HPDv2 prompt with the template's 34 dropped is about that)."""
    from diffusers import (AutoencoderKL, AutoencoderKLFlux2, AutoencoderKLQwenImage, Flux2Transformer2DModel, FluxTransformer2DModel,
                           QwenImageTransformer2DModel)

    full = size == "full"
    if family == "flux2_klein":
        config = tiny_models.KLEIN_4B_TRANSFORMER if full else tiny_models.TINY_KLEIN_TRANSFORMER
        return (Flux2Transformer2DModel, config, AutoencoderKLFlux2, tiny_models.KLEIN_VAE if full else tiny_models.TINY_KLEIN_VAE,
                RandomFamilyPromptEncoder(flux2_klein, config["joint_attention_dim"], 512 if full else 32), flux2_klein)
    if family == "qwen_image":
        config = {} if full else tiny_models.TINY_QWEN_IMAGE_TRANSFORMER
        return (QwenImageTransformer2DModel, config, AutoencoderKLQwenImage, {} if full else tiny_models.TINY_QWEN_IMAGE_VAE,
                RandomFamilyPromptEncoder(qwen_image, 3584 if full else config["joint_attention_dim"], 256 if full else 32), qwen_image)
    config = tiny_models.FLUX_DEV_TRANSFORMER if full else tiny_models.TINY_TRANSFORMER
    return (FluxTransformer2DModel, config, AutoencoderKL, tiny_models.FLUX_DEV_VAE if full else tiny_models.TINY_VAE,
            RandomPromptEncoder(config["joint_attention_dim"], config["pooled_projection_dim"], 512 if full else 32), flux1)


FAMILIES = ("flux1", "flux2_klein", "qwen_image")


def vae_can_checkpoint(family) -> bool:
    """Whether the family's VAE class supports gradient checkpointing (diffusers' own flag)."""
    return getattr(family_models(family, "tiny")[2], "_supports_gradient_checkpointing", False)


def vae_scale_factor_of(vae) -> int:
    """As the pipelines compute it: Qwen-Image's video VAE from its temporal downsampling steps, the others from their levels."""
    if hasattr(vae, "temperal_downsample"):
        return 2 ** len(vae.temperal_downsample)
    return 2 ** (len(vae.config.block_out_channels) - 1)


@functools.lru_cache(maxsize=None)
def build_reward(size, device, dtype, compile_backend=None, compile_mode=None):
    """One reward model for all measurements (ViT-H-14's random init takes a while on the CPU), and
    one more with its image tower compiled for those with --compile_reward."""
    import open_clip

    from rewards import CombinedReward
    from rewards.open_clip_rewards import OpenClipReward

    if size == "full":
        model = open_clip.create_model("ViT-H-14", pretrained=None, load_weights=False)  # HPSv2.1's architecture
    else:
        model = open_clip.CLIP(**tiny_models.tiny_open_clip_config()["model_cfg"])
    reward = OpenClipReward(model.to(device=device, dtype=dtype), open_clip.get_tokenizer("ViT-H-14"), "hpsv2")
    combined = CombinedReward({"hpsv2": reward}, {"hpsv2": 1.0})
    if compile_backend:
        combined.compile_image_towers(compile_backend, compile_mode)
    return combined


class MetaRun(training.Run):
    """A Run whose tensors live on the meta device: shapes without storage, so a full-size step
    runs on any CPU and FlopCounterMode can count it."""

    @property
    def device(self):
        return torch.device("meta")


def run_dtype(device) -> torch.dtype:
    return torch.bfloat16 if device.type in ("cuda", "meta") else torch.float32


def trainer_flags(extra_flags, mode, resolution, rollout_steps, compiled, device, backend="inductor", checkpointing=True,
                  vae_checkpointing=True):
    """The trainer's command line of one configuration."""
    # --output_dir: the step writes nothing, and ./output may hold a user's run (which a trainer would refuse to start over)
    flags = ["--pretrained_model_name_or_path", "random-weights", "--resolution", str(resolution),
             "--num_inference_steps", str(rollout_steps), "--report_to", "none",
             "--output_dir", os.path.join(tempfile.gettempdir(), "benchmark-writes-nothing"), *extra_flags]
    if checkpointing:  # the VAE too where it can (Qwen-Image's video VAE cannot: the trainers refuse the flag for it)
        flags += ["--gradient_checkpointing"] + (["--vae_gradient_checkpointing"] if vae_checkpointing else [])
    if compiled:
        flags += ["--compile", "--compile_backend", backend]
    if run_dtype(device) == torch.bfloat16:  # what build_run builds the models in (and what a cuDNN rollout asks)
        flags += ["--mixed_precision", "bf16"]
    if mode == "full":
        # bitsandbytes has no meta kernels; the optimiser does no matmuls, so the count is the same.
        flags += ["--full_finetune"] + (["--use_8bit_adam"] if device.type != "meta" else [])
    elif mode == "full_bf16":  # bf16 weights run under bf16 autocast (on the CPU too: the trainers require it)
        flags += ["--full_finetune", "--bf16_weights"] + ([] if "--mixed_precision" in flags else ["--mixed_precision", "bf16"])
    return flags


def build_run(module, extra_flags, size, mode, resolution, rollout_steps, compiled, device, accelerator, backend="inductor",
              checkpointing=True, family="flux1"):
    """A Run of one configuration, its models built with random weights; `family`: one of FAMILIES (at full size FLUX.1-dev,
    FLUX.2 [klein] base 4B or Qwen-Image)."""
    transformer_class, transformer_config, vae_class, vae_config, prompt_encoder, family_module = family_models(family, size)
    args = module.parse_args(trainer_flags(extra_flags, mode, resolution, rollout_steps, compiled, device, backend, checkpointing,
                                           vae_can_checkpoint(family)))
    dtype = run_dtype(device)
    # A 4-bit base (--quantize_base) is built on the host and quantized layer by layer as it moves to the GPU, as the
    # trainers load it: built on the GPU, the bf16 model alone would pass a 24 GB card's cap.
    quantized = getattr(args, "quantize_base", "none") != "none" and device.type == "cuda"
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in place on the device, in bf16: no 48 GB fp32 detour
    try:
        with torch.device("cpu" if quantized else device):
            transformer = transformer_class(**transformer_config)
        with torch.device(device):
            vae = vae_class(**vae_config)
    finally:
        torch.set_default_dtype(previous_dtype)
    models.prepare_vae(vae, args)  # exactly what the trainers do with these flags
    models.prepare_for_training(transformer, args, device).to(device)
    optimizer = training.make_optimizer(args, models.trainable_parameters(transformer), args.learning_rate)
    lr_scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    vae_scale_factor = vae_scale_factor_of(vae)
    return (MetaRun if device.type == "meta" else training.Run)(
        args=args, method=module.__name__, accelerator=accelerator, transformer=transformer, vae=vae,
        prompt_encoder=prompt_encoder,
        reward=build_reward(size, device, dtype, *((args.compile_backend, args.compile_mode) if compiles_reward(args) else ())),
        optimizer=optimizer, lr_scheduler=lr_scheduler,
        batches=data.BatchSchedule([f"prompt {i}" for i in range(64)], args.train_batch_size, args.seed),
        image_dataset=None, weight_dtype=dtype, vae_scale_factor=vae_scale_factor,
        scheduler_config=None,  # --rollout_shift 3 (the trainers' default): the fixed-shift schedule, no config read
        image_size=args.resolution, family=family_module,
    )


def one_step(module, run, step):
    module.training_step(run, step, defaultdict(list))
    run.optimizer_step()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def rollout(run):
    """The step's sampling part alone: one no-grad ODE solve over the whole schedule."""
    prompts = [f"prompt {i}" for i in range(run.args.train_batch_size)]
    run.rollout(prompts, torch.Generator().manual_seed(0))


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def profile_step(module, run, step, device, path, title):
    """Appends to `path` the op table of one step, most device time first, under `title`. Named
    ranges (rollout, vae_decode, reward_image_features_*) give the forward phases' totals."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        one_step(module, run, step)
        synchronize(device)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(path, "a") as f:
        f.write(f"## {title}\n\n{profiler.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=70)}\n")


@dataclasses.dataclass
class Measurement:
    seconds: float  # median per optimiser step; NaN where nothing ran (meta)
    peak_gib: float  # NaN off the GPU
    flops: int  # of one step
    rollout_seconds: float
    rollout_flops: int
    first_step_seconds: float  # the first warm-up step (compilation + one step in a process's first compiled run)
    optimizer_seconds: float  # clip + optimizer.step + zero_grad of one step, timed on its own
    host_waits: float = nan  # calls in the counted step that made the host wait for the GPU (CUDA only)


def count_host_waits(fn, device):
    """Runs fn; on CUDA returns the number of calls that made the host wait for the GPU (an .item(),
    a blocking upload, a stream synchronisation: torch.cuda.set_sync_debug_mode), listing their
    source lines on stderr. NaN elsewhere."""
    if device.type != "cuda":
        fn()
        return nan
    try:
        torch.cuda.set_sync_debug_mode("warn")
    except RuntimeError as error:  # an experimental API: it must never cost a measurement
        print(f"  host waits not counted: {error}", file=sys.stderr, flush=True)
        fn()
        return nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sources = defaultdict(int)
    for warning in caught:
        if "synchroniz" in str(warning.message):
            sources[f"{os.path.relpath(warning.filename)}:{warning.lineno}"] += 1
    if sources:
        print("  host waits: " + ", ".join(f"{where} x{n}" for where, n in sorted(sources.items())), file=sys.stderr, flush=True)
    return sum(sources.values())


def measure(trainer, mode, resolution, compiled, checkpointing, variant, device, accelerator, options, report=lambda result: None,
            known_flops=None):
    """One configuration's Measurement; `variant` is a string of more trainer flags; `options` carries the command line's
    size, rollout_steps, steps, warmup, compile_backend, trainer_flags and profile. `report(measurement)` is called
    once the numbers are in, before the profiled step, so that a run stopped while profiling still has them.
    `known_flops`: (step, rollout) FLOPs to use instead of counting them (an eager step under the counter, ~25 s at full size)."""
    from torch.utils.flop_counter import FlopCounterMode

    started = time.perf_counter()

    def progress(phase):  # to stderr: where a configuration's time goes when a time limit cuts it short
        print(f"  {trainer} {mode} {resolution}: {phase} at {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

    module, extra_flags = TRAINERS[trainer]
    flags = extra_flags + shlex.split(options.trainer_flags) + shlex.split(variant)
    run = build_run(module, flags, options.size, mode, resolution, options.rollout_steps, compiled, device,
                    accelerator, options.compile_backend, checkpointing=checkpointing, family=getattr(options, "family", "flux1"))
    progress("built")
    warmup, steps = options.warmup, options.steps
    for reward in run.reward.models.values():  # shared between configurations: each starts, as a run does,
        reward.clear_text_cache()              # encoding its first prompts (counted and timed alike)
    # FLOPs do not depend on compilation: count them on an eager step (compiled blocks run their
    # Python code under force_eager), so a compiled configuration gets its TFLOP/s on its own.
    host_waits = nan
    if known_flops:
        flops, rollout_flops = known_flops
        progress("FLOPs reused" if flops else "FLOPs not counted")
    else:
        with torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext():
            with FlopCounterMode(display=False) as counter:
                host_waits = count_host_waits(functools.partial(one_step, module, run, 0), device)
            flops = counter.get_total_flops()
            with FlopCounterMode(display=False) as counter:
                rollout(run)
            rollout_flops = counter.get_total_flops()
        progress("FLOPs counted")
    if device.type == "meta":  # nothing ran: there is no time or memory to measure
        result = Measurement(nan, nan, flops, nan, rollout_flops, nan, nan)
        report(result)
        return result
    warmup_times = [timed(functools.partial(one_step, module, run, step), device) for step in range(warmup)]
    progress("warmed up")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [timed(functools.partial(one_step, module, run, warmup + step), device) for step in range(steps)]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else nan
    module.training_step(run, warmup + steps, defaultdict(list))  # gradients for the optimizer's own timing
    optimizer_seconds = timed(run.optimizer_step, device)
    rollout_seconds = timed(functools.partial(rollout, run), device)  # warm: every step above rolled out
    result = Measurement(statistics.median(times), peak, flops, rollout_seconds, rollout_flops,
                         warmup_times[0] if warmup_times else nan, optimizer_seconds, host_waits)
    report(result)
    if options.profile:
        title = f"{trainer} {mode} {resolution} {'compiled' if compiled else 'eager'}" + ("" if checkpointing else " no-checkpointing")
        profile_step(module, run, warmup + steps + 1, device, options.profile, title + (f" {variant}" if variant else ""))
    del run
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def matmul_peak_tflops(size=8192, repeats=20):
    """The card's bf16 matmul rate on random data, as achieved through torch: the ceiling."""
    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (start.elapsed_time(end) / 1e3) / 1e12


def cell(value: float, spec: str) -> str:
    """A table cell: '-' where nothing was measured (NaN)."""
    return "-" if math.isnan(value) else format(value, spec)


def _total_gib():
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def main(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--family", choices=FAMILIES, default="flux1",
                        help="flux1: FLUX.1-dev; flux2_klein: FLUX.2 [klein] base 4B; qwen_image: Qwen-Image (their guidance in "
                             "--trainer_flags).")
    parser.add_argument("--trainers", default=",".join(TRAINERS))
    parser.add_argument("--modes", default="lora,full,full_bf16",
                        help="lora; full: fp32 master weights + 8-bit AdamW; full_bf16: bf16 weights + stochastic-rounding AdamW.")
    parser.add_argument("--resolutions", default="720,1024")
    parser.add_argument("--compile_modes", default="eager,compiled")
    parser.add_argument("--rollout_steps", type=int, default=25)
    parser.add_argument("--steps", type=int, default=3, help="Timed steps; the median is reported.")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--checkpointing", default="on",
                        help="Gradient checkpointing of the transformer and VAE: on, off (faster, more memory) or on,off (both).")
    parser.add_argument("--no_checkpointing", dest="checkpointing", action="store_const", const="off", help="= --checkpointing off")
    parser.add_argument("--trainer_flags", default="",
                        help="More trainer flags for every configuration; write it with '=', e.g. --trainer_flags=--merge_lora_in_rollout.")
    parser.add_argument("--variant", action="append", default=None,
                        help="Repeatable: each configuration runs once per variant, a string of more trainer flags ('' for none), "
                             "e.g. --variant= --variant=--merge_lora_in_rollout.")
    parser.add_argument("--reuse_flops", action="store_true",
                        help="Count FLOPs for the first variant of a configuration only and reuse the count for the others: "
                             "for variants that change how a step runs (compilation, batching, kernels), not what it computes.")
    parser.add_argument("--no_flops", action="store_true",
                        help="Do not count FLOPs (saves an eager step per configuration, ~25 s at full size; the TFLOP columns "
                             "and host waits stay empty): for a short device lease where the counts are known, e.g. from --device meta.")
    parser.add_argument("--profile", default=None,
                        help="Append each configuration's torch.profiler op table (one more step) to this file.")
    parser.add_argument("--compile_backend", default="inductor")
    parser.add_argument("--output", default=None, help="Also write the table to this markdown file.")
    parser.add_argument("--max_memory_gib", type=float, default=None,
                        help="Cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction), e.g. 22 to show a run "
                             "fits a 24 GB card: a configuration that needs more fails with out-of-memory in its row.")
    parser.add_argument("--device", choices=["auto", "meta"], default="auto",
                        help="auto: the GPU if there is one, else the CPU. meta: count FLOPs only (no GPU needed).")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="A card's bf16 matmul peak: adds the least s/step it allows (TFLOP/step / peak).")
    args = parser.parse_args(input_args)
    if args.device == "meta" and args.no_flops:
        parser.error("--device meta only counts FLOPs: drop --no_flops")
    if args.max_memory_gib is not None:
        if not torch.cuda.is_available():
            parser.error("--max_memory_gib caps a GPU's memory: there is no GPU here")
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.max_memory_gib * 2**30 / total))
    if args.device == "meta" and "--quantize_base" in " ".join([args.trainer_flags, *(args.variant or [])]):
        parser.error("--device meta: bitsandbytes' 4-bit layers have no meta kernels; count FLOPs without --quantize_base "
                     "(the matmuls are the same), or estimate the memory with benchmarks/estimate_memory.py")
    if args.device == "meta" and "compiled" in args.compile_modes.split(","):
        parser.error("--device meta counts FLOPs, which compilation does not change: use --compile_modes eager")
    checkpointing_modes = args.checkpointing.split(",")
    if not set(checkpointing_modes) <= {"on", "off"}:
        parser.error(f"--checkpointing takes on, off or on,off, not {args.checkpointing}")
    variants = args.variant or [""]

    from accelerate import Accelerator

    device = torch.device("meta" if args.device == "meta" else "cuda" if torch.cuda.is_available() else "cpu")
    accelerator = Accelerator(mixed_precision="bf16")  # bf16 autocast, as the trainers with --mixed_precision bf16
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    card = {"cpu": "CPU", "meta": "meta (FLOPs counted, nothing timed)"}.get(device.type) or torch.cuda.get_device_name()
    header = ["trainer", "mode", "resolution", "compile", "checkpointing", "variant", "s/step", "peak GiB", "TFLOP/step", "TFLOP/s",
              "rollout s", "rollout TFLOP/s", "optimizer s", "first step s", "host waits"]
    if args.peak_tflops:
        header.append(f"s/step at {args.peak_tflops:g} TFLOP/s")
    timing = "" if device.type == "meta" else f"; median of {args.steps} step(s)"
    if device.type == "cuda":
        timing += f"; bf16 matmul measured at {matmul_peak_tflops():.0f} TFLOP/s; torch {torch.__version__}"
    extra = f"; trainer flags: {args.trainer_flags}" if args.trainer_flags else ""
    lines = [f"Device: {card}; model: {args.family}, size {args.size}; rollout {args.rollout_steps} steps; gradient checkpointing "
             f"(transformer{' and VAE' if vae_can_checkpoint(args.family) else ''}) "
             f"{args.checkpointing}{extra}{timing}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    print("\n".join(lines), flush=True)
    configurations = [(trainer, mode, int(resolution), compile_mode, checkpointing, variant)
                      for trainer in args.trainers.split(",") for mode in args.modes.split(",")
                      for resolution in args.resolutions.split(",") for compile_mode in args.compile_modes.split(",")
                      for checkpointing in checkpointing_modes for variant in variants]
    flops_counted = {}  # (trainer, mode, resolution, checkpointing) -> (step, rollout) FLOPs, for --reuse_flops
    for trainer, mode, resolution, compile_mode, checkpointing, variant in configurations:
        names = [trainer, mode, str(resolution), compile_mode, checkpointing, variant or "-"]

        def report(result, out_of_memory=False, failure=None):
            tflop = result.flops / 1e12 if result.flops else nan
            row = names + [cell(result.seconds, ".3f"), cell(result.peak_gib, ".1f"), cell(tflop, ".4g"), cell(tflop / result.seconds, ".3g"),
                           cell(result.rollout_seconds, ".3f"),
                           cell(result.rollout_flops / 1e12 / result.rollout_seconds if result.rollout_flops else nan, ".3g"),
                           cell(result.optimizer_seconds, ".3f"), cell(result.first_step_seconds, ".3g"), cell(result.host_waits, ".0f")]
            if out_of_memory:
                row[len(names):len(names) + 2] = ["OOM", f"> {_total_gib():.0f}"]
            if failure:
                row[len(names)] = f"failed: {failure}".replace("|", "/")
            if args.peak_tflops:
                row.append(cell(tflop / args.peak_tflops, ".2f"))
            lines.append("| " + " | ".join(row) + " |")
            print(lines[-1], flush=True)

        rows_before, out_of_memory, failure = len(lines), False, None
        same_step = (trainer, mode, resolution, checkpointing)
        try:
            result = measure(trainer, mode, resolution, compile_mode == "compiled", checkpointing == "on", variant, device,
                             accelerator, args, report=report,
                             known_flops=(0, 0) if args.no_flops else flops_counted.get(same_step) if args.reuse_flops else None)
            flops_counted.setdefault(same_step, (result.flops, result.rollout_flops))
        except torch.cuda.OutOfMemoryError:  # one configuration that does not fit must not cost the rest of the table
            out_of_memory = True
        except Exception as error:  # nor one that fails (a flag refused here, a kernel this card lacks): row, traceback, go on
            traceback.print_exc()
            failure = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:120]}"
        if out_of_memory or failure:  # here, once the exception (whose traceback holds the run) is gone
            gc.collect()
            torch.cuda.empty_cache()
            if len(lines) == rows_before:  # not already reported (an OOM in the profiled step keeps its row)
                report(Measurement(nan, nan, 0, nan, 0, nan, nan), out_of_memory=out_of_memory, failure=failure)
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    sys.exit(1 if any("| failed: " in line for line in main()) else 0)
