"""FLUX model calls: text conditioning with an in-process cache, one velocity prediction, and the
deterministic Euler ODE rollout (no gradient)."""

import contextlib
from collections import OrderedDict
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rewards.base import host_to_device

from .modulations import tabulated
from .schedules import model_timestep


@dataclass
class Conditioning:
    prompt_embeds: torch.Tensor  # B x L x D (T5)
    pooled_embeds: torch.Tensor  # B x D' (CLIP pooled)
    text_ids: torch.Tensor  # L x 3

    def to(self, device, dtype=None):
        """On `device` (from the CPU cache: queued copies, see host_to_device)."""
        return Conditioning(
            host_to_device(self.prompt_embeds, device, dtype), host_to_device(self.pooled_embeds, device, dtype),
            host_to_device(self.text_ids, device),
        )

    def repeat(self, times: int):
        """The batch repeated `times` times (sample i of copy c is sample i): for stacked branches."""
        return Conditioning(self.prompt_embeds.repeat(times, 1, 1), self.pooled_embeds.repeat(times, 1), self.text_ids)


def text_encoders(pipeline) -> list:
    """The pipeline's text encoders, however many it has (FLUX.1 two, SD3 three, the Qwen-based one)."""
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    return [getattr(pipeline, name) for name in names if getattr(pipeline, name, None) is not None]


class PromptEncoder:
    """Encodes prompts with FLUX's CLIP + T5, keeping the embeddings in CPU memory.

    The authors pre-extract embeddings to disk with a separate script; caching in-process gives
    the same saving for prompts seen again (validation prompts, repeated epochs) with no extra
    step. The cache keeps the `cache_size` most recent prompts: one T5 embedding of FLUX is 4 MB
    (512 x 4096 bf16), so all of HPDv2's 107k prompts would need 400 GB.
    `offload`: the text encoders live on the CPU and visit `device` only to encode (saves about
    10 GB of GPU memory for T5-XXL). Each visit moves T5-XXL's 9.5 GB to the GPU and back (seconds
    over PCIe from pageable memory, estimated; benchmarks/time_text_encoder_visits.py times it),
    so a visit also encodes the `upcoming` prompts the caller passes (the next micro-steps'
    prompts, up to `lookahead`): one visit per `lookahead` new prompts instead of one per step."""

    LOOKAHEAD = 64  # prompts encoded per visit with offload: 256 MB of cache at 512 T5 tokens
    ENCODE_BATCH = 16  # prompts per text-encoder call, which bounds T5's activations on the GPU
    # A family with classifier-free guidance sets its negative prompt: its conditioning is then attached to every
    # batch's as `.negative` (cached like any prompt). FLUX.1's guidance is an input of the model: none.
    negative_prompt: str | None = None

    def __init__(self, pipeline, max_sequence_length=512, device="cpu", cache_size=2048, offload=False):
        self.pipeline = pipeline
        self.max_sequence_length = max_sequence_length
        self.device = device
        self.cache: "OrderedDict[str, tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()
        self.cache_size = cache_size
        self.offload = offload
        self.lookahead = self.LOOKAHEAD if offload else 0
        self.text_ids = None

    def encode_chunk(self, chunk) -> list:
        """One text-encoder call: what the cache keeps per prompt (FLUX: T5 and pooled CLIP embeddings)."""
        embeds, pooled, text_ids = self.pipeline.encode_prompt(
            prompt=chunk, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        self.text_ids = text_ids.cpu()
        return list(zip(embeds.cpu(), pooled.cpu()))

    def collate(self, entries: list):
        return Conditioning(torch.stack([e for e, _ in entries]), torch.stack([p for _, p in entries]), self.text_ids)

    def _encode(self, prompts):
        """Embeddings of `prompts` into the cache, ENCODE_BATCH at a time, in one visit of the encoders."""
        encoders = self.text_encoders()
        if self.offload:
            for encoder in encoders:
                encoder.to(self.device)
        try:
            for start in range(0, len(prompts), self.ENCODE_BATCH):
                chunk = prompts[start : start + self.ENCODE_BATCH]
                for prompt, entry in zip(chunk, self.encode_chunk(chunk)):
                    self.cache[prompt] = entry
        finally:
            if self.offload:
                for encoder in encoders:
                    encoder.to("cpu")

    def text_encoders(self):
        return text_encoders(self.pipeline)

    @torch.no_grad()
    def __call__(self, prompts: list[str], upcoming: list[str] = ()):
        """Conditioning of `prompts` (with the negative prompt's as `.negative`, for a family that has one)."""
        cond = self.encode(prompts, upcoming)
        if self.negative_prompt is not None:
            cond.negative = self.encode([self.negative_prompt] * len(prompts))
        return cond

    def encode(self, prompts: list[str], upcoming: list[str] = ()):
        """Conditioning of `prompts`. `upcoming`: prompts wanted soon, encoded now too when the
        encoders must visit the GPU anyway (with offload; as many as the cache keeps beside `prompts`)."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        if missing:
            room = min(self.lookahead, self.cache_size - len(set(prompts)))
            ahead = [p for p in dict.fromkeys(upcoming) if p not in self.cache and p not in missing]
            self._encode(missing + ahead[: max(room, 0)])
        for prompt in prompts:
            self.cache.move_to_end(prompt)
        entries = [self.cache[p] for p in prompts]
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return self.collate(entries)


def model_config(transformer):
    """The config of a transformer that may be wrapped (DDP's .module, torch.compile's ._orig_mod)."""
    while not hasattr(transformer, "config"):
        transformer = getattr(transformer, "module", None) or transformer._orig_mod
    return transformer.config


def timesteps(sigma, batch: int, device) -> torch.Tensor:
    """The B-vector of noise level `sigma` (a float or a B-tensor) that a model is given, float32 on
    `device`: exact, or truncated to 1/1000 under --match_release (schedules.model_timestep)."""
    sigma = model_timestep(sigma)
    if isinstance(sigma, torch.Tensor):
        return sigma.to(device, torch.float32).expand(batch)
    # filled on the device: torch.as_tensor(float, device="cuda") would wait for the GPU, each step
    return torch.full((batch,), float(sigma), device=device, dtype=torch.float32)


def velocity(transformer, latents, sigma, guidance, cond: Conditioning, img_ids):
    """The transformer's velocity prediction at noise level `sigma` (a float or a B-tensor)."""
    batch = latents.shape[0]
    dtype = cond.prompt_embeds.dtype
    timestep = timesteps(sigma, batch, latents.device)
    guidance_vector = None
    if model_config(transformer).guidance_embeds:
        guidance_vector = torch.full((batch,), float(guidance), device=latents.device, dtype=torch.float32)
    return transformer(
        hidden_states=latents.to(dtype),
        timestep=timestep,
        guidance=guidance_vector,
        pooled_projections=cond.pooled_embeds,
        encoder_hidden_states=cond.prompt_embeds,
        txt_ids=cond.text_ids,
        img_ids=img_ids,
        return_dict=False,
    )[0]


def ode_sample(velocity_fn, x, sigmas, checkpoint=False, progress=False, before_step=None):
    """Deterministic Euler ODE from x at sigmas[0] through sigmas[-1]:
    x <- x + (sigma_next - sigma) * v(x, sigma), in fp32 like FlowMatchEulerDiscreteScheduler.step.
    `checkpoint`: recompute each step in the backward pass (DRaFT-K with K > 1).
    `before_step(i)`: called before step i (e.g. modulations.StepSelector.select)."""
    x = x.float()
    for i in tqdm(range(len(sigmas) - 1), desc="sampling", leave=False, disable=not progress):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if before_step is not None:
            before_step(i)

        def euler_step(x, sigma=sigma, sigma_next=sigma_next):
            return x + (sigma_next - sigma) * velocity_fn(x, sigma).float()

        if checkpoint and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(euler_step, x, use_reentrant=False)
        else:
            x = euler_step(x)
    return x


@torch.no_grad()
def sample(transformer, noise, sigmas, guidance, cond: Conditioning, img_ids, progress=False, tabulate_modulations_of=None,
           full_schedule=None, velocity=velocity):
    """The rollout: from `noise` at sigmas[0] to sigmas[-1] without gradient. fp32 packed latents.
    `tabulate_modulations_of`: the unwrapped transformer, whose modulation layers then run once for
    every step of `full_schedule` (default `sigmas`; a rollout stopped early passes the whole schedule,
    so that the tables keep one shape), see flux_rl/modulations.py (--batch_rollout_modulations).
    `velocity`: the model family's call (flux_rl/families); `img_ids`: its positions of the image tokens."""
    if tabulate_modulations_of is None:
        table = contextlib.nullcontext()
    else:
        table = tabulated(tabulate_modulations_of, sigmas if full_schedule is None else full_schedule, guidance, cond)
    with table as steps:
        return ode_sample(lambda x, sigma: velocity(transformer, x, sigma, guidance, cond, img_ids), noise, sigmas,
                          progress=progress, before_step=steps.select if steps else None)
