"""FLUX model calls: text conditioning with an in-process cache, one velocity prediction, and the
deterministic Euler ODE rollout (no gradient)."""

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class Conditioning:
    prompt_embeds: torch.Tensor  # B x L x D (T5)
    pooled_embeds: torch.Tensor  # B x D' (CLIP pooled)
    text_ids: torch.Tensor  # L x 3

    def to(self, device, dtype=None):
        return Conditioning(
            self.prompt_embeds.to(device, dtype), self.pooled_embeds.to(device, dtype), self.text_ids.to(device)
        )


class PromptEncoder:
    """Encodes prompts with FLUX's CLIP + T5 once each, keeping the embeddings in CPU memory.

    The authors pre-extract embeddings to disk with a separate script; caching in-process gives
    the same saving (each prompt is encoded once per run) with no extra step."""

    def __init__(self, pipeline, max_sequence_length=512, device="cpu"):
        self.pipeline = pipeline
        self.max_sequence_length = max_sequence_length
        self.device = device
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.text_ids = None

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> Conditioning:
        missing = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        if missing:
            embeds, pooled, text_ids = self.pipeline.encode_prompt(
                prompt=missing, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
            )
            for prompt, e, p in zip(missing, embeds.cpu(), pooled.cpu()):
                self.cache[prompt] = (e, p)
            self.text_ids = text_ids.cpu()
        embeds = torch.stack([self.cache[p][0] for p in prompts])
        pooled = torch.stack([self.cache[p][1] for p in prompts])
        return Conditioning(embeds, pooled, self.text_ids)


def velocity(transformer, latents, sigma, guidance, cond: Conditioning, img_ids):
    """The transformer's velocity prediction at noise level `sigma` (a float or a B-tensor)."""
    batch = latents.shape[0]
    dtype = cond.prompt_embeds.dtype
    timestep = torch.as_tensor(sigma, device=latents.device, dtype=torch.float32).expand(batch)
    guidance_vector = None
    if transformer.config.guidance_embeds:
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


@torch.no_grad()
def sample(transformer, noise, sigmas, guidance, cond: Conditioning, img_ids, progress=False):
    """Deterministic Euler ODE from `noise` (packed latents at sigmas[0] = 1) to x0, in fp32 steps
    like FlowMatchEulerDiscreteScheduler.step. Returns fp32 packed latents."""
    x = noise.float()
    steps = range(len(sigmas) - 1)
    for i in tqdm(steps, desc="rollout", leave=False, disable=not progress):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        v = velocity(transformer, x, sigma, guidance, cond, img_ids)
        x = x + (sigma_next - sigma) * v.float()
    return x
