"""AdamW for bf16 weights with stochastic rounding: full fine-tuning of FLUX (12B) on one GPU.

With bf16 master weights, an update smaller than half a bf16 step (2^-9 of the weight) rounds
to nothing: the release's lr 5e-6 is below that for most weights, so plain bf16 AdamW would
barely train. Stochastic rounding rounds up or down with probability proportional to the
distance, so the expected weight follows the exact fp32 trajectory (Gupta et al. 2015; the
approach of torchao's bf16 optimizers). Moments are kept in bf16 too: 2 + 2 + 2 + 2 bytes per
parameter (weight, gradient, two moments) instead of 4 + 4 + 8 with fp32 AdamW.
"""

import torch


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction of the mantissa."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, device=bits.device, dtype=torch.int32, generator=generator)
    # Adding noise below bit 16 and truncating there rounds up exactly when noise >= 2^16 - dropped bits.
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class AdamWStochasticBF16(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias correction) computed in fp32 per
    parameter; bf16 parameters and moments are written back with stochastic rounding, fp32 ones
    exactly (then it is plain AdamW)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, seed=0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed = seed

    def _store(self, target: torch.Tensor, value: torch.Tensor, generator):
        target.copy_(stochastic_round_to_bf16(value, generator) if target.dtype == torch.bfloat16 else value)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                state = self.state[parameter]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(parameter)
                    state["exp_avg_sq"] = torch.zeros_like(parameter)
                state["step"] += 1
                step = state["step"]
                # One generator per parameter and step: reproducible, and restored with the step count.
                generator = torch.Generator(parameter.device).manual_seed(self.seed + 1_000_003 * step + parameter.numel())
                grad = parameter.grad.float()
                exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                self._store(state["exp_avg"], exp_avg, generator)
                self._store(state["exp_avg_sq"], exp_avg_sq, generator)
                weight = parameter.float().mul_(1 - group["lr"] * group["weight_decay"])
                denominator = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(group["eps"])
                weight.addcdiv_(exp_avg, denominator, value=-group["lr"] / (1 - beta1**step))
                self._store(parameter, weight, generator)
        return loss
