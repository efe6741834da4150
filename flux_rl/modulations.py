"""The rollout's modulation layers, run once for the whole schedule instead of once per step.

Every FLUX block starts with an adaptive norm whose shift, scale and gate come from one linear layer
of the timestep-and-text embedding, `linear(silu(temb))`: in a double block a (B x 3072) @
(3072 x 18432) product. At batch 1 that is a matrix-vector product, bound by reading the weight
(113 MB in bf16) rather than by arithmetic: 76 of them per FLUX forward (19 double blocks x 2, 38
single blocks) took 62 ms of a compiled SRPO LoRA step on an H200 (the `nvjet_..._192x8_...` kernels,
1102 calls each = 29 forwards x 38, in benchmarks/logs/2026-11-26-h200-session4/profile_*.txt),
1.6 times what reading their 6.5 GB at full bandwidth costs (29 x 6.5 GB at 4.8 TB/s: 39 ms).
A rollout knows every step's embedding before it starts (the sigmas, the guidance, the pooled
text), so inside `tabulated` each layer runs once on the rows of all steps, one weight read instead
of one per step, and during the rollout the layer is stood in for by a lookup of the step's row.
"""

import contextlib

import torch

from rewards.base import host_to_device

from .schedules import model_timestep

_ADAPTIVE_NORMS = ("AdaLayerNormZero", "AdaLayerNormZeroSingle", "AdaLayerNormContinuous")


class _StepRows(torch.nn.Module):
    """Stands in for a modulation layer: its precomputed output for the current step. The step is a
    tensor, chosen on the device (no host wait), and a compiled block takes it and the table as
    inputs (a Python int would be specialised on: one graph per step)."""

    def __init__(self, table: torch.Tensor, step: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table, persistent=False)  # steps x B x out
        self.register_buffer("step", step, persistent=False)  # a one-element int64 index into steps

    def forward(self, x):
        return torch.index_select(self.table, 0, self.step).squeeze(0)


class StepSelector:
    def __init__(self, step: torch.Tensor):
        self.step = step

    def select(self, index: int):
        """Makes every stand-in return step `index`'s row (a fill on the device, queued)."""
        self.step.fill_(index)


def _hidden_dtype(model, like: torch.Tensor):
    """The dtype of the transformer's hidden states, which its timestep is cast to: the image
    embedder's output dtype (bf16 under autocast, else the weights')."""
    with torch.no_grad():
        return model.x_embedder(torch.zeros(1, model.config.in_channels, device=like.device, dtype=like.dtype)).dtype


def _embeddings(model, sigmas, guidance, pooled, hidden_dtype):
    """`temb` of every step in one batch, rows step-major (step i, sample b at i * B + b), computed as
    FluxTransformer2DModel.forward does: timestep and guidance cast to the hidden dtype, times 1000."""
    batch, steps = pooled.shape[0], len(sigmas)
    sigmas = [model_timestep(sigma) for sigma in sigmas]  # as flux.velocity gives them to the model
    timestep = host_to_device(torch.tensor(sigmas, dtype=torch.float32).repeat_interleave(batch), pooled.device)
    timestep = timestep.to(hidden_dtype) * 1000
    pooled = pooled.repeat(steps, 1)
    if not model.config.guidance_embeds:
        return model.time_text_embed(timestep, pooled)
    guidance = torch.full((steps * batch,), float(guidance), device=pooled.device, dtype=torch.float32).to(hidden_dtype) * 1000
    return model.time_text_embed(timestep, guidance, pooled)


@contextlib.contextmanager
def tabulated(model, sigmas, guidance, cond):
    """Inside: each adaptive norm's linear layer of `model` (the unwrapped FluxTransformer2DModel)
    returns its output for the rollout step chosen by the yielded selector's `select(i)`, step i
    running from sigmas[i] (the rollout's schedule; a rollout stopped early uses its first steps).
    The layers are computed here for all steps at once, under the caller's autocast and weights
    (merged LoRA included); on exit the layers are back. No gradient: for the no-grad rollout."""
    sigmas = [float(s) for s in sigmas[:-1]]
    pooled = cond.pooled_embeds
    batch = pooled.shape[0]
    norms = [m for m in model.modules() if type(m).__name__ in _ADAPTIVE_NORMS and getattr(m, "emb", None) is None]
    originals = [norm.linear for norm in norms]
    step = torch.zeros(1, dtype=torch.long, device=pooled.device)
    try:
        with torch.no_grad():
            hidden_dtype = _hidden_dtype(model, cond.prompt_embeds)
            temb = _embeddings(model, sigmas, guidance, pooled, hidden_dtype)
            for norm, linear in zip(norms, originals):
                features = norm.silu(temb)
                if type(norm).__name__ == "AdaLayerNormContinuous":  # it casts to the hidden states' dtype first
                    features = features.to(hidden_dtype)
                norm.linear = _StepRows(linear(features).view(len(sigmas), batch, -1), step)
        yield StepSelector(step)
    finally:  # the tables (53 MB at batch 1 for FLUX) go with their stand-ins
        for norm, linear in zip(norms, originals):
            norm.linear = linear
