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


# 8-bit moments (--bf16_weights --use_8bit_adam): blockwise, one fp32 scale per BLOCK elements. A linear int8 code
# would round the small second moments of a block to zero (the update's denominator, sqrt(v) + eps, then collapses and
# the step explodes); a power code keeps their relative precision: the first moment is stored as sign * sqrt(|m| / max)
# on 127 levels (smallest step 6e-5 of the block's largest), the second as (v / max)^(1/4) on 255 levels (smallest
# 2.4e-10 of it). Quantisation rounds stochastically (random bits as for the weights), so the stored moments are
# unbiased in the code's space.
BLOCK = 256


def _in_blocks(x: torch.Tensor) -> torch.Tensor:
    """A flat tensor as rows of BLOCK, zero-padded at the end."""
    return torch.nn.functional.pad(x, (0, (-x.numel()) % BLOCK)).view(-1, BLOCK)


def _stochastic_round(u: torch.Tensor, seed) -> torch.Tensor:
    """floor(u + r), r uniform in [0, 1) from the index-and-seed hash: u rounded up with probability frac(u)."""
    noise = random_bits16(u.numel(), seed, u.device).view(u.shape).float() / 65536.0
    return torch.floor(u + noise)


def quantize_moment(x: torch.Tensor, second: bool, seed) -> tuple[torch.Tensor, torch.Tensor]:
    """A flat fp32 moment -> (codes: int8 for the first moment, uint8 for the second, same length; fp32 scale per block)."""
    blocks = _in_blocks(x)
    scale = blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
    if second:
        codes = _stochastic_round((blocks / scale).clamp(min=0).pow(0.25) * 255, seed).clamp(0, 255).to(torch.uint8)
    else:
        level = _stochastic_round((blocks / scale).abs().sqrt() * 127, seed).clamp(0, 127)
        codes = (level * blocks.sign()).to(torch.int8)
    return codes.view(-1)[: x.numel()], scale.view(-1)


def dequantize_moment(codes: torch.Tensor, scale: torch.Tensor, second: bool) -> torch.Tensor:
    blocks = _in_blocks(codes.float())
    if second:
        values = (blocks / 255).pow(4) * scale.view(-1, 1)
    else:
        values = (blocks / 127).abs().square() * blocks.sign() * scale.view(-1, 1)
    return values.view(-1)[: codes.numel()]


def adamw_update(weight, grad, exp_avg, exp_avg_sq, hyper, step_seed, skip=None, scales=None):
    """torch.optim.AdamW's update of one flat parameter, in place, computed in fp32. `hyper` holds
    [1 - beta1, beta2, 1 - beta2, 1 - lr * weight_decay, bias correction 2, eps, lr / bias correction 1]
    (fp32, on the parameter's device: a tensor, so new values do not recompile the compiled
    version); `step_seed` an int64 tensor, offset here by the parameter's size. bf16 targets are
    written with stochastic rounding. `skip` (a 0-dim tensor, non-zero: skip) keeps every value
    as it was, on the device (stochastic rounding of a value already in bf16 returns it)."""
    seed = step_seed + weight.numel()  # inside the fused kernel: no extra launch per parameter
    one_minus_beta1, beta2, one_minus_beta2, decay, bias_correction2, eps, step_size = hyper.unbind()
    grad = grad.float()
    eight_bit = scales is not None  # (first moment's block scales, second's): the moments are 8-bit codes
    old_exp_avg = dequantize_moment(exp_avg, scales[0], False) if eight_bit else exp_avg.float()
    old_exp_avg_sq = dequantize_moment(exp_avg_sq, scales[1], True) if eight_bit else exp_avg_sq.float()
    new_exp_avg = old_exp_avg.lerp(grad, one_minus_beta1)
    new_exp_avg_sq = old_exp_avg_sq * beta2 + one_minus_beta2 * grad * grad
    denominator = (new_exp_avg_sq / bias_correction2).sqrt() + eps
    new_weight = weight.float() * decay - step_size * new_exp_avg / denominator
    if skip is not None:
        keep = skip != 0
        new_exp_avg = torch.where(keep, old_exp_avg, new_exp_avg)
        new_exp_avg_sq = torch.where(keep, old_exp_avg_sq, new_exp_avg_sq)
        new_weight = torch.where(keep, weight.float(), new_weight)
    if eight_bit:
        for stream, (target, scale, value, second) in enumerate(((exp_avg, scales[0], new_exp_avg, False),
                                                                (exp_avg_sq, scales[1], new_exp_avg_sq, True))):
            codes, new_scale = quantize_moment(value, second, seed * 3 + stream)
            if skip is not None:  # the codes as they were, not re-rounded
                codes, new_scale = torch.where(keep, target, codes), torch.where(keep, scale, new_scale)
            target.copy_(codes)
            scale.copy_(new_scale)
        weight.copy_(stochastic_round_to_bf16(new_weight, seed * 3 + 2) if weight.dtype == torch.bfloat16 else new_weight)
        return
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
                 compile_backend="inductor", eight_bit_moments=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed, self.compile, self.compile_backend = seed, compile, compile_backend
        self.eight_bit_moments = eight_bit_moments  # int8 / uint8 codes + a scale per 256: 2.03 bytes per parameter, not 4
        self._compiled = None

    def load_state_dict(self, state_dict):
        """As torch's, but every state tensor keeps the dtype it was saved in: torch casts floating ones to
        the parameter's, which would round the 8-bit codes' fp32 block scales to bf16 (and the codes with them)."""
        super().load_state_dict(state_dict)
        ids = [index for group in state_dict["param_groups"] for index in group["params"]]
        parameters = [parameter for group in self.param_groups for parameter in group["params"]]
        for index, parameter in zip(ids, parameters):
            for key, value in state_dict["state"].get(index, {}).items():
                if torch.is_tensor(value) and key != "step":
                    self.state[parameter][key] = value.detach().clone().to(parameter.device)

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
                    if self.eight_bit_moments:
                        blocks = -(-parameter.numel() // BLOCK)
                        state["exp_avg"] = torch.zeros(parameter.numel(), dtype=torch.int8, device=parameter.device)
                        state["exp_avg_sq"] = torch.zeros(parameter.numel(), dtype=torch.uint8, device=parameter.device)
                        state["exp_avg_scale"] = torch.ones(blocks, dtype=torch.float32, device=parameter.device)
                        state["exp_avg_sq_scale"] = torch.ones(blocks, dtype=torch.float32, device=parameter.device)
                    else:
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
                scales = (state["exp_avg_scale"], state["exp_avg_sq_scale"]) if "exp_avg_scale" in state else None
                self._update(
                    device, parameter.view(-1), parameter.grad.reshape(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1),
                    *step_inputs[key], getattr(self, "found_inf", None), scales,
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
