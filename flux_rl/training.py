"""The toolkit every trainer calls: `setup` (accelerator, prompts, rewards, FLUX, LoRA, optimizer,
resume), the `Run` it returns (rollout, decode, model calls, gradient sync, optimiser step,
logging, checkpoints, validation, stop requests) and `finish` (final weights, model card, push).
Each script owns its loop and its method; nothing here calls back into a script."""

import contextlib
import logging
import math
import os
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from rewards.base import host_to_device

from . import checkpoints, data, families, flux, hub, models, monitors, preemption, quantization, schedules, validation
from .args import chosen_trackers, compiles_reward, launched_with_fsdp, mixed_precision
from .errors import ConfigurationError
from .fp8 import fp8_linears
from .optim import AdamWStochasticBF16, step_unless_not_finite

logger = logging.getLogger(__name__)

# A bf16 overflow now and then costs one skipped update; this many in a row means the run cannot
# train (a reward or a learning rate that gives NaN for every image), so it stops with a checkpoint.
MAX_SKIPPED_IN_A_ROW = 10
# --heldout_reward: the step with the best held-out reward so far and its checkpoint, in --output_dir.
BEST_CHECKPOINT_FILE = "best_checkpoint.json"
DRIFT_BASELINE_FILE = "drift_baseline.json"  # --drift_band: the untrained model's drift monitors


@dataclass
class Run:
    args: object
    method: str
    accelerator: object
    transformer: object
    vae: object
    prompt_encoder: object
    reward: object
    optimizer: object
    lr_scheduler: object
    batches: data.BatchSchedule
    image_dataset: object
    weight_dtype: torch.dtype
    vae_scale_factor: int
    scheduler_config: dict  # the pipeline's scheduler config: the resolution-dependent shift when --rollout_shift is 0
    family: object = None  # the model family's adapter (a module of flux_rl/families); set by setup
    # (height, width) of the current micro-step's images: --resolution, or the bucket of its batch (data.image_size).
    # Set by rollout() and next_batch(); decode(), velocity_fn() and rollout_sigmas read it.
    image_size: tuple = None
    start_step: int = 0
    _step_started: float = field(default_factory=time.time)
    _last_loss: float = 0.0
    skipped_in_a_row: int = 0  # updates skipped for a non-finite gradient, up to the last logged step
    _dataset_prompts: list = None  # offline SRPO: the image dataset's prompt column, read once
    _per_size: dict = field(default_factory=dict)  # (what, size, steps) -> image ids or sigmas, made once per size
    heldout: object = None  # --heldout_reward's model: scored on the validation images, never trained on
    best: dict = None  # the validation step with the best held-out reward: step, heldout, reward, path (best_checkpoint.json)
    stop_reason: str = None  # set by watch_for_hacking: the loop ends, and the final weights are the best step's
    drift_baseline: dict = None  # the drift monitors of the untrained model's validation images (drift_baseline.json)

    @property
    def device(self):
        return self.accelerator.device

    def image_ids(self, size):
        """The family's positions of the image tokens of an image of `size` (height, width), on the device:
        FLUX's position ids (made on the host, queued up), Qwen-Image's latent grid."""
        if ("ids", size) not in self._per_size:
            self._per_size["ids", size] = self.family.positions(*size, self.vae_scale_factor, self.device, self.weight_dtype)
        return self._per_size["ids", size]

    def sigmas(self, steps, size):
        """The sampler's schedule of `steps` steps for images of `size`: fixed-shift, or (--rollout_shift 0)
        diffusers' shift for that many image tokens."""
        if ("sigmas", size, steps) not in self._per_size:
            image_seq_len = (size[0] // (self.vae_scale_factor * 2)) * (size[1] // (self.vae_scale_factor * 2))
            self._per_size["sigmas", size, steps] = schedules.rollout_sigmas(steps, image_seq_len, self.scheduler_config,
                                                                              self.args.rollout_shift or None, self.family.dynamic_mu)
        return self._per_size["sigmas", size, steps]

    @property
    def rollout_sigmas(self):
        """The rollout's schedule at the current micro-step's image size."""
        return self.sigmas(self.args.num_inference_steps, self.image_size)

    def validation_sigmas(self):
        return self.sigmas(self.args.validation_inference_steps or self.args.num_inference_steps, self.args.validation_resolution)

    def velocity_fn(self, cond, guidance=None):
        """velocity(x, sigma) of the trained transformer for `cond`, for the Direct-Align math."""
        guidance = self.args.train_guidance if guidance is None else guidance

        def run_model(x, sigma):
            with self.accelerator.autocast():
                return self.family.velocity(self.transformer, x, sigma, guidance, cond, self.image_ids(self.image_size))

        return run_model

    def condition(self, prompts, micro_step=None):
        """Text conditioning of `prompts`, on the device. With `micro_step`, the prompts of the
        micro-steps after it are offered to the encoder to encode ahead (PromptEncoder.lookahead)."""
        upcoming = self.upcoming_prompts(micro_step) if micro_step is not None else ()
        return self.prompt_encoder(prompts, upcoming).to(self.device, self.weight_dtype)

    def prompts_of(self, micro_step):
        """The prompts of this process's batch at global micro-step `micro_step`."""
        items = self.batches.batch(micro_step)
        if self.image_dataset is None:
            return items
        if self._dataset_prompts is None:
            self._dataset_prompts = list(self.image_dataset[self.args.prompt_column])  # the column alone: no image decoded
        return [self._dataset_prompts[i] for i in items]

    def upcoming_prompts(self, micro_step):
        """Prompts of the micro-steps after `micro_step`, up to the encoder's look-ahead, within the run."""
        wanted, prompts = getattr(self.prompt_encoder, "lookahead", 0), []
        later, end = micro_step + 1, self.args.max_train_steps * self.args.gradient_accumulation_steps
        while len(prompts) < wanted and later < end:
            prompts += self.prompts_of(later)
            later += 1
        return prompts[:wanted]

    def initial_noise(self, batch, generator):
        noise = self.family.initial_noise(batch, self.unwrapped().config.in_channels, *self.image_size, self.vae_scale_factor, generator)
        return host_to_device(noise, self.device)

    def rollout(self, prompts, generator, stop_index=None, micro_step=None):
        """(x, noise, cond): the ODE image of `noise` (or the state at rollout_sigmas[stop_index]),
        no gradient. Direct-Align later injects this same noise, as the release does, so
        x_sigma stays near the sampled trajectory. `micro_step`: see condition; it sets the image size."""
        self.image_size = data.image_size(self.args, micro_step)
        cond = self.condition(prompts, micro_step)
        noise = self.initial_noise(len(prompts), generator)
        sigmas = self.rollout_sigmas if stop_index is None else self.rollout_sigmas[: stop_index + 1]
        fp8 = self.args.rollout_dtype == "fp8"
        # --rollout_dtype fp8: the FP8 copies take the adapters in (fp8_linears), so they cost no matmuls of their own
        # and need no merge into the bf16 weights.
        merged = models.lora_merged(self.unwrapped()) if self.args.merge_lora_in_rollout and not fp8 else contextlib.nullcontext()
        quantized = fp8_linears(self.unwrapped()) if fp8 else contextlib.nullcontext()
        backend = models.attention_backend_within(self.unwrapped(), self.args.rollout_attention_backend)
        with self.accelerator.autocast(), torch.profiler.record_function("rollout"), merged, quantized, backend, \
                models.without_dropout(self.unwrapped()):  # record_function: a named range in profiles
            x = flux.sample(self.transformer, noise, sigmas, self.args.rollout_guidance, cond, self.image_ids(self.image_size),
                            tabulate_modulations_of=self._modulations_model(), full_schedule=self.rollout_sigmas,
                            velocity=self.family.velocity)
        return x, noise, cond

    def _modulations_model(self):
        """The model whose modulation layers a rollout runs once per schedule (--batch_rollout_modulations;
        FLUX.1's, flux_rl/modulations.py: other families roll out without the tables)."""
        return self.unwrapped() if self.args.batch_rollout_modulations and self.family.TABULATES_MODULATIONS else None

    def next_batch(self, micro_step, generator):
        """(x0, noise, cond, prompts) of one micro-step: an online rollout from the initial noise,
        or, with --train_data_dir (offline SRPO), VAE-encoded real images and fresh noise."""
        items = self.batches.batch(micro_step)
        if self.image_dataset is None:
            # --match_release (SRPO): one initial noise for all processes, as the release broadcasts rank 0's;
            # ours draws each process its own, so that the GPUs' images differ in noise as well as in prompt.
            shared = getattr(self.args, "match_release", False)
            noise_generator = data.step_generator(self.args.seed, micro_step, 0) if shared else generator
            x0, noise, cond = self.rollout(items, noise_generator, micro_step=micro_step)
            return x0, noise, cond, items
        self.image_size = data.image_size(self.args, micro_step)
        rows = [self.image_dataset[i] for i in items]
        prompts = [row[self.args.prompt_column] for row in rows]
        images = host_to_device(torch.stack([data.image_to_tensor(row["image"], self.image_size) for row in rows]), self.device)
        x0 = self.family.encode(self.vae, images)
        return x0, self.initial_noise(len(rows), generator), self.condition(prompts, micro_step), prompts

    def decode(self, packed):
        with self.accelerator.autocast(), torch.profiler.record_function("vae_decode"):
            return self.family.decode(self.vae, packed, *self.image_size, self.vae_scale_factor)

    def sync_gradients(self, last: bool):
        """DDP all-reduce only on the last backward of an optimiser step. Under FSDP every
        backward reduce-scatters: skipping it would keep whole unsharded gradients on every GPU
        until the last backward (48 GB for FLUX's 12B parameters in fp32), the memory FSDP is
        there to save."""
        from accelerate.utils import DistributedType

        if last or self.accelerator.num_processes == 1 or self.accelerator.distributed_type == DistributedType.FSDP:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.transformer)

    def unwrapped(self):
        return self.accelerator.unwrap_model(self.transformer)

    def optimizer_step(self):
        """Clip, step (skipped when the gradient is not finite), zero; returns the gradient norm
        and the skip flag, still on the device."""
        grad_norm = self.accelerator.clip_grad_norm_(models.trainable_parameters(self.transformer), self.args.max_grad_norm)
        skipped = step_unless_not_finite(self.optimizer, grad_norm)
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, skipped

    def steps(self):
        """Yields the step indices still to run, with a progress bar."""
        progress = tqdm(
            range(self.start_step, self.args.max_train_steps), initial=self.start_step, total=self.args.max_train_steps,
            desc=self.method, disable=not self.accelerator.is_local_main_process,
        )
        for step in progress:
            self._step_started = time.time()
            yield step
            progress.set_postfix(loss=self._last_loss)
            if self.stop_reason:  # --stop_on_hacking: no more steps; finish() publishes the best step's weights
                progress.close()
                return

    def log(self, step: int, values: dict):
        """`values` may be device tensors: the step's logs are read back here, once, after the
        optimiser step, not with an .item() per branch that would stall the GPU mid-step. With
        several processes each value is the mean over all of them (one all-reduce of one vector;
        every process calls this with the same keys), not rank 0's alone."""
        if self.accelerator.num_processes > 1:
            keys = sorted(values)
            # FSDP2's grad_norm is a DTensor (the same on every rank): its full value, a plain tensor, joins the vector.
            plain = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in values.items()}
            local = torch.stack([torch.as_tensor(plain[k], dtype=torch.float32).to(self.device) for k in keys])
            values = dict(zip(keys, self.accelerator.reduce(local, reduction="mean").tolist()))
        values = {k: float(v) for k, v in values.items()}
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if values.get("update_skipped") else 0
        if self.skipped_in_a_row and self.accelerator.is_main_process:
            logger.warning(f"step {step + 1}: the gradient norm is {values.get('grad_norm')}; the update was skipped")
        values["lr"] = self.lr_scheduler.get_last_lr()[0]
        values["step_time"] = time.time() - self._step_started
        self._last_loss = round(values.get("loss", 0.0), 5)
        self.accelerator.log(values, step=step + 1)

    def end_of_step(self, step: int, stop: preemption.StopRequest):
        """After optimiser step `step` (0-based): a checkpoint every --checkpointing_steps (the final
        step too), validation every --validation_steps. Then, if any process got a stop signal
        (SIGTERM, SIGUSR1, a first Ctrl-C) before the last step, a checkpoint and exit 128 + the
        signal; after MAX_SKIPPED_IN_A_ROW skipped updates in a row, a checkpoint and an error."""
        done = step + 1
        if self._checkpoint_due(done):
            self.save_checkpoint(done)
        if self.args.validation_steps and done % self.args.validation_steps == 0 and done < self.args.max_train_steps:
            self.watch_for_hacking(done, self.validate(done))
        signal_number = stop.agreed(self.accelerator)  # every process stops after the same step
        if signal_number and done < self.args.max_train_steps:  # one during the last step lets the run finish
            self.stop_for_resume(done, signal_number)
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            self.stop_after_skipped_updates(done)

    def _checkpoint_due(self, done: int) -> bool:
        # The final step too, as diffusers' examples: a run is extended by raising --max_train_steps and resuming.
        return done % self.args.checkpointing_steps == 0

    def save_checkpoint(self, done: int, state: dict | None = None) -> str:
        return checkpoints.save_checkpoint(
            self.accelerator, self.args.output_dir, done, self.args.checkpoints_total_limit, _config(self.args), logger,
            keep=self.best and self.best["path"], state=state,
        )

    def watch_for_hacking(self, done: int, scores: dict | None):
        """After a validation at step `done`: a new best held-out reward gets a checkpoint, kept from
        rotation and named in best_checkpoint.json; with --stop_on_hacking, a held-out reward fallen
        --hacking_margin below the best while the trained reward rose since ends the run: a checkpoint
        of this step (marked, so that a rerun finds the run finished), then the best step's state is
        loaded back, and finish() publishes it. Every process sees the same scores (Run.validate)."""
        if self.heldout is None or not scores:
            return
        heldout, trained = scores["heldout"], scores["reward"]
        drifted = [f"{name.rsplit('/', 1)[1]} {self.drift_baseline[name]:.4g} -> {value:.4g}" for name, value in scores.items()
                   if self.args.drift_band and self.drift_baseline and name in self.drift_baseline
                   and abs(value - self.drift_baseline[name]) > self.args.drift_band * abs(self.drift_baseline[name])]
        if drifted and self.best is not None:  # a drifted step is no new best, whatever its held-out score
            self.stop_for_hacking(done, f"a drift monitor of the validation images left its band (--drift_band "
                                        f"{self.args.drift_band}: {', '.join(drifted)})")
            return
        if self.best is None or heldout > self.best["heldout"]:
            path = self._checkpoint_now(done)
            self.best = {"step": done, "heldout": heldout, "reward": trained, "path": path}
            if self.accelerator.is_main_process:
                checkpoints.write_json_atomically(os.path.join(self.args.output_dir, BEST_CHECKPOINT_FILE), self.best)
            return
        fallen = heldout < self.best["heldout"] - self.args.hacking_margin * abs(self.best["heldout"])
        if self.args.stop_on_hacking and fallen and trained > self.best["reward"]:
            self.stop_for_hacking(done, f"the held-out reward fell from {self.best['heldout']:.4g} (step {self.best['step']}) "
                                        f"to {heldout:.4g} while the trained reward rose from {self.best['reward']:.4g} to {trained:.4g}")

    def stop_for_hacking(self, done: int, why: str):
        """--stop_on_hacking: a checkpoint of step `done` (marked: a rerun finds the run finished), the
        best step's state loaded back, and the loop ends (Run.steps) so that finish() publishes it."""
        self.stop_reason = (f"stopped at step {done} for reward hacking: {why}; the final weights are step {self.best['step']}'s "
                            f"({self.best['path']})")
        self.save_checkpoint(done, state={"stopped_for_hacking": True, "best_checkpoint": self.best["path"]})
        checkpoints.load_checkpoint(self.accelerator, self.best["path"])
        logger.warning(self.stop_reason)

    def _checkpoint_now(self, done: int) -> str:
        """A checkpoint of step `done`, unless end_of_step has just written it."""
        return os.path.join(self.args.output_dir, f"checkpoint-{done}") if self._checkpoint_due(done) else self.save_checkpoint(done)

    def stop_for_resume(self, done: int, signal_number: int):
        """After a stop signal (flux_rl/preemption.py): the steps done so far go into a checkpoint,
        and the process exits with 128 + the signal."""
        path = self._checkpoint_now(done)
        if self.accelerator.is_main_process:
            logger.warning(f"{signal.Signals(signal_number).name} received: stopped after step {done} of "
                           f"{self.args.max_train_steps}, saved {path}; continue with --resume_from_checkpoint latest")
        self.accelerator.end_training()
        raise SystemExit(128 + signal_number)

    def stop_after_skipped_updates(self, done: int):
        """MAX_SKIPPED_IN_A_ROW updates in a row were skipped (optim.step_unless_not_finite): the
        weights have not moved since, and a run that cannot take a step should not hold the GPUs.
        Every rank sees the same (global) gradient norm, so all stop here together."""
        path = self._checkpoint_now(done)
        self.accelerator.end_training()
        # One line, as a mistake in the input: the fix is a flag (the traceback would only show this function).
        raise ConfigurationError(
            f"steps {done - self.skipped_in_a_row + 1}-{done} all had a non-finite gradient, so every update was skipped; "
            f"the weights of step {done - self.skipped_in_a_row} are in {path}. Look at the losses and rewards logged "
            f"for these steps, then resume from it with a lower --learning_rate or --max_grad_norm"
        )

    def validate(self, step: int) -> dict | None:
        """Every rank renders through the wrapped model (FSDP needs all ranks in each forward);
        the main process logs. Returns the mean trained reward and (--heldout_reward) held-out
        reward of the images, the same on every process."""
        prompts, count = self.args.validation_prompt, self.args.num_validation_images
        if not prompts:
            return None
        images, scores, heldout, heldout_parts = [], [], [], defaultdict(list)
        # One batch of the prompts per seed: the batch the rollout's compiled graphs already know,
        # and no more memory than one image per prompt.
        for index in range(count):
            with self.accelerator.autocast(), models.without_dropout(self.unwrapped()):
                batch = validation.render(
                    self.transformer, self.vae, self.prompt_encoder, prompts, self.args.validation_seed + index,
                    *self.args.validation_resolution, self.validation_sigmas(), self.args.validation_guidance,
                    self.vae_scale_factor, self.device, self.weight_dtype,
                    tabulate_modulations_of=self._modulations_model(), family=self.family,
                )
                with torch.no_grad():
                    scores.append(self.reward(batch, prompts)[0])
                    if self.heldout is not None:
                        value, parts = self.heldout(batch.float(), prompts)
                        heldout.append(value)
                        for name, part in parts.items():
                            heldout_parts[f"validation/heldout/{name}"].append(part.float().mean())
            images.append(batch)
        means = {"reward": torch.stack(scores).float().mean(),
                 **{f"validation/{k}": v for k, v in monitors.image_statistics(torch.cat(images)).items()}}
        if heldout:
            means["heldout"] = torch.stack(heldout).float().mean()
        if self.accelerator.num_processes > 1:  # the same images on every rank; the mean makes the decision one
            means = {k: self.accelerator.reduce(v.to(self.device), reduction="mean") for k, v in means.items()}
        means = {k: float(v) for k, v in means.items()}
        if self.accelerator.is_main_process:
            # prompt-major: with several seeds, row p of the grid holds prompt p's images, one column per seed
            grid, flat = torch.stack(images, 1).flatten(0, 1), torch.stack(scores, 1).flatten()
            validation.log_validation(self.accelerator, grid, [p for p in prompts for _ in range(count)], flat, step,
                                      self.args.output_dir, columns=count if count > 1 else None)
            self.accelerator.log({k: v for k, v in means.items() if k.startswith("validation/drift/")}, step=step)
            if heldout:
                self.accelerator.log({"validation/heldout": means["heldout"],
                                      **{k: float(torch.stack(v).mean()) for k, v in heldout_parts.items()}}, step=step)
        if step == 0 and self.start_step == 0 and self.args.drift_band:  # the untrained model's: what --drift_band measures from
            self.drift_baseline = {k: v for k, v in means.items() if k.startswith("validation/drift/")}
            if self.accelerator.is_main_process:
                checkpoints.write_json_atomically(os.path.join(self.args.output_dir, DRIFT_BASELINE_FILE), self.drift_baseline)
        return means


def resume(accelerator, args, path: str) -> int:
    """Loads checkpoint `path` and returns its step. With --resume_from_checkpoint latest, a newest
    checkpoint that does not load (a truncated optimizer state, a damaged weights file, an unreadable
    training_state.json) is set aside as checkpoint-N.unloadable, never deleted, and the one before it
    is tried, and so on: the run goes on from the newest checkpoint that loads, saying so. Every
    process reads the same files, so all fail alike and agree on the fallback."""
    if args.resume_from_checkpoint == "latest" and accelerator.is_main_process:
        for candidate in checkpoints.list_checkpoints(args.output_dir):  # passed over at parse time: set aside now
            if checkpoints.read_training_state(candidate) is None:
                checkpoints.set_aside(candidate, logger, "no readable training_state.json")
    accelerator.wait_for_everyone()
    while True:
        try:
            step = checkpoints.load_checkpoint(accelerator, path)
            logger.info(f"resumed from {path} at step {step}")
            return step
        except Exception as error:  # whatever the damaged file raises in torch, safetensors or accelerate
            reason = hub.first_line(error)
            if args.resume_from_checkpoint != "latest":
                raise ConfigurationError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: does not load ({reason}); "
                                         "name another checkpoint, or use 'latest' to fall back to the newest one that loads") from error
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            checkpoints.set_aside(path, logger, reason)
        accelerator.wait_for_everyone()
        path = checkpoints.resolve_resume("latest", args.output_dir)
        if path is None:  # the failed loads may have changed some weights already: no silent fresh start
            raise ConfigurationError(f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir} loads (each set aside as "
                                     "checkpoint-N.unloadable); start over with --overwrite_output_dir")
        checkpoints.check_resume_config(path, args)


def init_lora(transformer, args):
    """--init_lora_weights: every adapter starts from the given LoRA (a folder, a file, or a Hub id,
    downloaded into --cache_dir and checked as a local one is at parse time)."""
    from .args import check_init_lora

    source = args.init_lora_weights
    if not os.path.exists(source):
        source = hub.fetch_trained_output(source, args.cache_dir, f"--init_lora_weights {source}")
        check_init_lora(args, source)
    folder, weight_name, rank, _ = models.lora_file_config(source)
    models.load_lora_into(transformer, folder, weight_name, complete=True)
    logger.info(f"LoRA adapters (rank {rank}) start from {args.init_lora_weights}")


def initial_learning_rate(args, num_processes: int) -> float:
    """--learning_rate; with --scale_lr times the images of an optimiser step, diffusers' examples' rule."""
    if not args.scale_lr:
        return args.learning_rate
    return args.learning_rate * num_processes * args.train_batch_size * args.gradient_accumulation_steps


def make_optimizer(args, params, lr: float):
    """AdamW (fp32 states), bitsandbytes' AdamW8bit, or AdamW with stochastic rounding for bf16 weights."""
    kwargs = dict(lr=lr, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    if args.bf16_weights:  # with --use_8bit_adam its moments are 8-bit codes (2 bytes per parameter for both, not 4)
        return AdamWStochasticBF16(params, seed=args.seed, eight_bit_moments=args.use_8bit_adam, **kwargs)
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    # fused: one kernel for all parameters, and it can skip a non-finite step on the device (optim.step_unless_not_finite)
    fused = all(p.device.type in ("cuda", "cpu") for p in params)
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


def make_lr_scheduler(args, optimizer):
    """diffusers' schedule named by --lr_scheduler, counted in optimiser steps: the Accelerator is
    made with step_scheduler_with_optimizer=False, so the scheduler steps once per optimiser step
    whatever the number of processes. (diffusers' examples let accelerate step it once per process
    and count in process-steps; a run resumed on fewer GPUs then finds its schedule ahead, e.g. a
    linear decay already at 0 when 2 GPUs' checkpoint resumes on 1.)"""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.max_train_steps,
        num_cycles=args.lr_num_cycles, power=args.lr_power,
    )


def continue_lr_schedule(lr_scheduler, step: int, base_lr: float):
    """Put a resumed scheduler at optimiser step `step` with this run's base rate `base_lr`: the
    learning rate is a function of the two alone. The checkpoint's optimizer and scheduler states
    carry the base rate it was written with; resuming with a lower --learning_rate is how a run
    that diverged goes on (Run.stop_after_skipped_updates says so), so this run's wins. A
    checkpoint written before the scheduler counted optimiser steps holds step x processes;
    LambdaLR.step() recomputes every group's rate from the position."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper, or torch's own
    scheduler.base_lrs = [base_lr] * len(scheduler.base_lrs)
    for group in scheduler.optimizer.param_groups:
        group["initial_lr"] = base_lr
    scheduler.last_epoch = step - 1
    scheduler.step()


def quiet_libraries(verbose: bool):
    """A console with this run's own lines: the libraries' loading bars (diffusers' "Loading pipeline
    components", transformers' "Loading weights", datasets' and the Hub's) and their warnings (e.g. a
    prompt cut at --max_sequence_length, every step) only with --verbose."""
    if verbose:
        return
    import datasets
    import diffusers
    import huggingface_hub
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.disable_progress_bar()
        library.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    # datasets logs a file it cannot parse at ERROR, with pyarrow's words; data.load_prompts says it in one line.
    datasets.utils.logging.set_verbosity(logging.CRITICAL)
    huggingface_hub.utils.disable_progress_bars()


def start_trackers(accelerator, args, method: str):
    """--report_to's trackers. wandb that cannot start (not logged in, its server out of reach) is a
    one-line error naming the ways out."""
    try:
        accelerator.init_trackers(args.tracker_project_name or method, config=_config(args))
    except Exception as error:
        if not type(error).__module__.startswith("wandb"):  # its own UsageError / CommError types
            raise
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ConfigurationError(
            f"--report_to {args.report_to}: wandb did not start ({reason}); log in with `wandb login`, set "
            "WANDB_MODE=offline to log to disk and `wandb sync` later, or use --report_to tensorboard"
        ) from error


def _config(args) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in vars(args).items() if k != "hub_token"}


def _weight_dtype(mixed_precision):
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def _fsdp_plugin(mixed_precision: str):
    """Under FSDP with bf16/fp16: weights gathered and used in the low precision, as accelerate
    sets them, but gradients reduced in fp32. accelerate reduces in the low precision by default;
    the release (autocast over fp32 FSDP weights) reduces fp32 gradients, and so does DDP here.
    None (accelerate's own plugin from the launcher's settings) otherwise."""
    if not launched_with_fsdp() or mixed_precision not in ("bf16", "fp16"):
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    low = _weight_dtype(mixed_precision)
    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP settings from the environment
    policy = {"param_dtype": low, "reduce_dtype": torch.float32}
    policy["output_dtype" if plugin.fsdp_version == 2 else "buffer_dtype"] = low
    plugin.mixed_precision_policy = policy
    plugin.set_mixed_precision(low)  # turns the dict into torch's policy object, keeping our dtypes
    return plugin


def setup(args, method: str) -> Run:
    """Everything up to the first training step, including resume."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    import rewards

    trackers = chosen_trackers(args.report_to)
    report_to = None if trackers == ["none"] else "all" if trackers == ["all"] else trackers
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        fsdp_plugin=_fsdp_plugin(mixed_precision(args)),
        log_with=report_to,
        step_scheduler_with_optimizer=False,  # the LR schedule counts optimiser steps (make_lr_scheduler)
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    # open_clip logs its loading steps at INFO on the root logger: keep the root at WARNING.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("flux_rl").setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    quiet_libraries(args.verbose)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # The inputs first, smallest first, so that a wrong column or reward file is reported before FLUX's 33 GB load
    # and before anything is written to --output_dir (its folder, logs, an earlier run removed).
    image_dataset = None
    with accelerator.main_process_first():  # one process downloads and converts into datasets' cache; the others read it
        pipeline_class = hub.check_base_model_reachable(args.pretrained_model_name_or_path, args.revision, args.cache_dir)
        if pipeline_class:
            models.check_family_flags(pipeline_class, args)
        if getattr(args, "train_data_dir", None):
            image_dataset = data.load_image_dataset(args.train_data_dir, args.prompt_column, args.cache_dir)
            items = list(range(len(image_dataset)))
        else:
            items = data.load_prompts(args.dataset_name, args.prompt_column, args.dataset_split, args.cache_dir, args.dataset_config_name)
    schedule = data.BatchSchedule(items, args.train_batch_size, args.seed, accelerator.num_processes, accelerator.process_index)
    weight_dtype = _weight_dtype(accelerator.mixed_precision)
    try:
        reward = rewards.load_combined_reward(args.reward, args.reward_models_dir, accelerator.device, weight_dtype,
                                              loading=lambda name: hub.fetching(f"--reward {name}", hub.REWARD_DOWNLOAD_ADVICE))
        heldout = rewards.load_combined_reward(args.heldout_reward, args.reward_models_dir, accelerator.device, weight_dtype,
                                               loading=lambda name: hub.fetching(f"--heldout_reward {name}", hub.REWARD_DOWNLOAD_ADVICE)
                                               ) if args.heldout_reward else None
    except rewards.registry.RewardLoadError as error:
        raise ConfigurationError(str(error)) from None
    if compiles_reward(args):
        try:  # under --compile alone, a reward of one's own without an image_tower() stays eager
            reward.compile_image_towers(args.compile_backend, args.compile_mode, required=args.compile_reward is True)
        except ValueError as error:  # a reward of one's own without an image_tower()
            raise ConfigurationError(str(error)) from None
    if accelerator.is_main_process:
        if args.push_to_hub:
            hub.create_repo_before_training(args.hub_model_id)
        os.makedirs(args.output_dir, exist_ok=True)
        if args.overwrite_output_dir and not args.resume_from_checkpoint:
            checkpoints.remove_earlier_run(args.output_dir, args.logging_dir, logger)
    accelerator.wait_for_everyone()
    resume_path = checkpoints.resolve_resume(args.resume_from_checkpoint, args.output_dir)
    if accelerator.is_main_process:  # before FLUX loads: wandb without a login fails here, not after FLUX's load
        start_trackers(accelerator, args, method)
    set_seed(args.seed)  # after the rewards' random initialisation: the LoRA init must not depend on the reward chosen
    pipeline = models.load_pipeline(args.pretrained_model_name_or_path, args.revision, args.variant, dtype=weight_dtype,
                                    cache_dir=args.cache_dir)
    family = families.family_of(pipeline)
    models.prepare_vae(pipeline.vae, args).to(accelerator.device)
    for encoder in family.text_encoders(pipeline):
        encoder.requires_grad_(False).eval().to("cpu" if args.offload_text_encoders else accelerator.device)
    transformer = pipeline.transformer
    models.prepare_for_training(transformer, args, accelerator.device).to(accelerator.device)
    if args.quantize_base != "none":
        logger.info(f"--quantize_base {args.quantize_base}: the transformer's weights with the adapters take "
                    f"{quantization.weight_bytes(transformer) / 2**30:.2f} GiB")
    if args.init_lora_weights and not resume_path:  # a resumed run takes its checkpoint's adapters
        init_lora(transformer, args)
    models.register_save_load_hooks(accelerator, use_lora=not args.full_finetune)

    params = models.trainable_parameters(transformer)
    learning_rate = initial_learning_rate(args, accelerator.num_processes)
    optimizer = make_optimizer(args, params, learning_rate)
    lr_scheduler = make_lr_scheduler(args, optimizer)
    transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)

    run = Run(
        args=args, method=method, accelerator=accelerator, transformer=transformer, vae=pipeline.vae,
        prompt_encoder=family.prompt_encoder(pipeline, args.max_sequence_length, accelerator.device, args.text_cache_size,
                                             args.offload_text_encoders),
        reward=reward, optimizer=optimizer, lr_scheduler=lr_scheduler, batches=schedule, image_dataset=image_dataset, weight_dtype=weight_dtype,
        vae_scale_factor=pipeline.vae_scale_factor, scheduler_config=pipeline.scheduler.config, image_size=args.resolution,
        family=family,
    )

    run.heldout = heldout
    if resume_path:
        run.start_step = resume(accelerator, args, resume_path)
        continue_lr_schedule(lr_scheduler, run.start_step, learning_rate)
        best = checkpoints.read_json(os.path.join(args.output_dir, BEST_CHECKPOINT_FILE))
        if heldout is not None and best and os.path.isdir(best.get("path", "")) and best["step"] <= run.start_step:
            run.best = best  # the held-out best so far, still kept from rotation
        run.drift_baseline = checkpoints.read_json(os.path.join(args.output_dir, DRIFT_BASELINE_FILE))
    elif args.resume_from_checkpoint:
        logger.info("no checkpoint to resume from yet; starting a new run")

    effective_batch = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in run.unwrapped().parameters())
    logger.info(
        f"{method}: {accelerator.num_processes} process(es), effective batch {effective_batch} "
        f"(= {args.train_batch_size} per device x {args.gradient_accumulation_steps} accumulation x {accelerator.num_processes}), "
        f"trainable parameters {trainable:,} of {total:,} ({'full fine-tune' if args.full_finetune else f'LoRA rank {args.rank}'}), "
        f"{args.max_train_steps} steps, learning rate {learning_rate:g}{' (--scale_lr)' if args.scale_lr else ''} "
        f"({args.lr_scheduler}), rollout {args.num_inference_steps} steps at "
        + (", ".join(f"{h}x{w}" for h, w in args.resolution_buckets) + " (buckets)" if args.resolution_buckets else
           "{}x{}".format(*args.resolution))
    )
    return run


def finish(run: Run):
    """Final validation, final weights in diffusers format, model card, optional Hub push."""
    args, accelerator = run.args, run.accelerator
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(run.transformer)  # a collective under FSDP: all ranks call it
    if accelerator.is_main_process:
        transformer = run.unwrapped()
        # In the training precision (bf16 under --mixed_precision bf16: FLUX's own, half the bytes of fp32 master weights;
        # checkpoints keep those), as diffusers' examples save; --upcast_before_saving keeps float32.
        dtype = torch.float32 if args.upcast_before_saving else run.weight_dtype
        if args.full_finetune:
            checkpoints.publish(args.output_dir, "transformer", lambda folder: models.save_full_model(
                os.path.join(folder, "transformer"), transformer, state_dict=state, dtype=dtype))
        else:
            checkpoints.publish(args.output_dir, models.LORA_WEIGHTS_NAME, lambda folder: models.save_lora(
                folder, transformer, state_dict=state, dtype=dtype, fold_alpha=True, pipeline_class=run.family.PIPELINE))
    run.validate(run.best["step"] if run.stop_reason else args.max_train_steps)  # stopped for hacking: the best step's again
    if accelerator.is_main_process:
        # With --hub_model_id, the card's code loads from that repository, pushed now or uploaded later.
        hub.write_model_card(args.output_dir, args, run.method, args.hub_model_id, note=run.stop_reason,
                             pipeline_class=run.family.PIPELINE)
        if args.push_to_hub:
            repo_id = hub.push_to_hub(args.output_dir, args.hub_model_id)
            logger.info(f"pushed to https://huggingface.co/{repo_id}")
    accelerator.end_training()
    if accelerator.is_main_process:
        print(final_line(args) + (f"; {run.stop_reason}" if run.stop_reason else
                                  f"; the best held-out reward was step {run.best['step']}'s ({run.best['path']})" if run.best else ""),
              flush=True)


def final_line(args) -> str:
    """What the run wrote, and where: the last line a user sees."""
    weights = os.path.join(args.output_dir, "transformer" if args.full_finetune else models.LORA_WEIGHTS_NAME)
    line = f"saved {'the fine-tuned transformer' if args.full_finetune else 'LoRA weights'} to {weights}, " \
           f"the model card to {os.path.join(args.output_dir, 'README.md')}"
    if chosen_trackers(args.report_to) != ["none"]:
        logs = os.path.join(args.output_dir, args.logging_dir)
        line += f", logs to {logs}" + (f" (tensorboard --logdir {logs})" if "tensorboard" in args.report_to else "")
    if args.validation_prompt:
        line += f", validation images to {os.path.join(args.output_dir, 'validation')}"
    return line


def reward_loss(reward: torch.Tensor, args) -> torch.Tensor:
    """Per-sample loss: ReFL's relu(threshold - r) * scale (the SRPO release: threshold 0.7,
    scale 1), or -r * scale."""
    if args.loss_type == "relu":
        return torch.relu(args.reward_threshold - reward) * args.loss_scale
    if args.loss_type == "neg":
        return -reward * args.loss_scale
    raise ValueError(f"unknown --loss_type '{args.loss_type}'; choose relu or neg")


def log_reward_terms(logs, loss, reward, components):
    """Append one backward pass's loss, total reward and each reward component to `logs`
    (as device tensors: Run.log reads them back once per step)."""
    logs["loss"].append(loss.detach())
    logs["reward"].append(reward.detach().mean())
    for name, value in components.items():
        logs[f"reward/{name}"].append(value.detach().mean())


def means(logs: dict) -> dict:
    """Each logged quantity's mean over the step's backward passes (NaN for none)."""
    return {key: sum(values) / len(values) if values else math.nan for key, values in logs.items()}
