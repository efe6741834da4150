"""AdamW for bf16 weights with stochastic rounding: full fine-tuning of FLUX (12B) on one GPU.

With bf16 master weights, an update smaller than half a bf16 step (2^-9 of the weight) rounds
to nothing: the release's lr 5e-6 is below that for most weights, so plain bf16 AdamW would
barely train. Stochastic rounding rounds up or down with probability proportional to the
distance, so the expected weight follows the exact fp32 trajectory (Gupta et al. 2015; the
approach of torchao's bf16 optimizers). Moments are kept in bf16 too: 2 + 2 + 2 + 2 bytes per
parameter (weight, gradient, two moments) instead of 4 + 4 + 8 with fp32 AdamW.

Speed: the whole update of one parameter is one function of flat tensors, and its random bits
come from a counter-based hash of (element index, seed) instead of a random generator, so that
on the GPU torch.compile fuses it into one kernel (read weight, gradient and moments once,
write them once: 14 bytes per parameter). Eager, the same update took about 25 passes over
memory, which for FLUX's 12B parameters costs more than a second per step.
"""

import warnings

import torch

from rewards.base import host_to_device

_MASK32 = 0xFFFFFFFF


def _mix32(x):
    """A 32-bit integer hash (the xorshift-multiply shape of Wellons' lowbias32) on int64 values
    below 2^32. The multipliers are odd and below 2^31, so no product overflows int64."""
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _MASK32
    x = ((x ^ (x >> 16)) * 0x297A2D39) & _MASK32
    return x ^ (x >> 16)


def random_bits16(numel: int, seed, device) -> torch.Tensor:
    """`numel` pseudo-random 16-bit integers (int64), a pure function of the element index and
    `seed` (an int or an int64 tensor). Hashing the index first, then mixing in the seed, means
    two seeds do not give shifted copies of one sequence."""
    index = torch.arange(numel, device=device, dtype=torch.int64)
    return _mix32(_mix32(index) ^ _mix32(seed & _MASK32)) & 0xFFFF


def stochastic_round_to_bf16(x: torch.Tensor, seed=0) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction of the mantissa."""
    bits = x.float().contiguous().view(torch.int32)
    noise = random_bits16(bits.numel(), seed, bits.device).view(bits.shape).to(torch.int32)
    # Adding noise below bit 16 and truncating there rounds up exactly when noise >= 2^16 - dropped bits.
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def adamw_update(weight, grad, exp_avg, exp_avg_sq, hyper, step_seed, skip=None):
    """torch.optim.AdamW's update of one flat parameter, in place, computed in fp32. `hyper` holds
    [1 - beta1, beta2, 1 - beta2, 1 - lr * weight_decay, bias correction 2, eps, lr / bias correction 1]
    (fp32, on the parameter's device: a tensor, so new values do not recompile the compiled
    version); `step_seed` an int64 tensor, offset here by the parameter's size. bf16 targets are
    written with stochastic rounding. `skip` (a 0-dim tensor, non-zero: skip) keeps every value
    as it was, on the device (stochastic rounding of a value already in bf16 returns it)."""
    seed = step_seed + weight.numel()  # inside the fused kernel: no extra launch per parameter
    one_minus_beta1, beta2, one_minus_beta2, decay, bias_correction2, eps, step_size = hyper.unbind()
    grad = grad.float()
    new_exp_avg = exp_avg.float().lerp(grad, one_minus_beta1)
    new_exp_avg_sq = exp_avg_sq.float() * beta2 + one_minus_beta2 * grad * grad
    denominator = (new_exp_avg_sq / bias_correction2).sqrt() + eps
    new_weight = weight.float() * decay - step_size * new_exp_avg / denominator
    if skip is not None:
        keep = skip != 0
        new_exp_avg = torch.where(keep, exp_avg.float(), new_exp_avg)
        new_exp_avg_sq = torch.where(keep, exp_avg_sq.float(), new_exp_avg_sq)
        new_weight = torch.where(keep, weight.float(), new_weight)
    for stream, (target, value) in enumerate(((exp_avg, new_exp_avg), (exp_avg_sq, new_exp_avg_sq), (weight, new_weight))):
        # Three independent random streams: seed * 3 + stream.
        target.copy_(stochastic_round_to_bf16(value, seed * 3 + stream) if target.dtype == torch.bfloat16 else value)


class AdamWStochasticBF16(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias correction) computed in fp32 per
    parameter; bf16 parameters and moments are written back with stochastic rounding, fp32 ones
    exactly (then it is plain AdamW). `compile`: fuse each parameter's update into one kernel with
    torch.compile (None: on CUDA parameters). The random bits depend only on the seed, the step
    and the parameter's size, so a resumed run rounds as the uninterrupted one did. A `found_inf`
    attribute (a 0-dim device tensor, as GradScaler sets on fused optimizers) skips the update
    where it is non-zero; the step count still advances (it lives on the host)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, seed=0, compile=None,
                 compile_backend="inductor"):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed, self.compile, self.compile_backend = seed, compile, compile_backend
        self._compiled = None

    def _update_fn(self, device):
        if not (self.compile if self.compile is not None else device.type == "cuda"):
            return adamw_update
        if self._compiled is None:
            # dynamic: one kernel for every parameter length (all parameters are passed flat)
            self._compiled = torch.compile(adamw_update, backend=self.compile_backend, dynamic=True)
        return self._compiled

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            step_inputs = {}  # (device, step) -> (hyper, step seed): built once, shared by the group's parameters
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                state = self.state[parameter]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(parameter, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(parameter, memory_format=torch.contiguous_format)
                state["step"] += 1
                step, device = state["step"], parameter.device
                key = (device, step)  # parameters of one group normally share the step count
                if key not in step_inputs:
                    step_inputs[key] = (  # queued copies: a plain .to(device) would wait for the backward to finish
                        host_to_device(torch.tensor([1 - beta1, beta2, 1 - beta2, 1 - group["lr"] * group["weight_decay"],
                                                     1 - beta2**step, group["eps"], group["lr"] / (1 - beta1**step)],
                                                    dtype=torch.float32), device),
                        host_to_device(torch.tensor(self.seed + 1_000_003 * step, dtype=torch.int64), device),
                    )
                self._update(
                    device, parameter.view(-1), parameter.grad.reshape(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1),
                    *step_inputs[key], getattr(self, "found_inf", None),
                )
        return loss

    def _update(self, device, *tensors):
        try:
            return self._update_fn(device)(*tensors)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            # e.g. no working Triton for this GPU. Compilation fails before anything is written, and the
            # eager update is the same math (more memory traffic): train on rather than stop.
            warnings.warn(f"AdamWStochasticBF16: compiling the update failed ({str(error).splitlines()[0]}); using the eager update")
            self.compile = False
            return adamw_update(*tensors)


def step_unless_not_finite(optimizer, grad_norm) -> torch.Tensor:
    """optimizer.step(), skipped when `grad_norm` (the gradient's norm, from clipping) is nan or
    inf. One such gradient (a bf16 overflow, a NaN out of a reward model) would otherwise turn
    every trained weight into NaN, and every checkpoint written after it. Decided on the device: a
    check on the host would make the GPU wait at every step. torch's fused AdamW and
    AdamWStochasticBF16 read the flag as `found_inf` (the attribute GradScaler sets) and leave
    weights and moments as they were; another optimizer (bitsandbytes') gets a zero gradient
    instead, so that its moments decay by one step. Under fp16, accelerate's GradScaler skips such
    steps itself. Returns the flag (1.0: skipped), on the device, for the step's logs."""
    skipped = (~torch.isfinite(grad_norm)).float()
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    if getattr(optimizer, "scaler", None) is not None:
        optimizer.step()
        return skipped
    if isinstance(inner, AdamWStochasticBF16) or (isinstance(inner, torch.optim.Adam) and inner.defaults.get("fused")):
        inner.found_inf = skipped
        try:
            optimizer.step()
        finally:
            del inner.found_inf
        return skipped
    not_finite = skipped.bool()
    with torch.no_grad():
        for group in inner.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    parameter.grad.masked_fill_(not_finite, 0.0)
    optimizer.step()
    return skipped
