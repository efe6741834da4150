"""AdamW with stochastic rounding for bf16 weights."""

import pytest
import torch

from flux_rl.optim import AdamWStochasticBF16, random_bits16, step_unless_not_finite, stochastic_round_to_bf16


def test_stochastic_rounding_is_unbiased_and_brackets():
    x = torch.full((200_000,), 1.0 + 2**-10)  # an eighth of the way from the bf16 value 1 to the next, 1 + 2^-7
    rounded = stochastic_round_to_bf16(x, seed=0).float()
    low, high = 1.0, 1.0 + 2**-7
    assert set(rounded.unique().tolist()) <= {low, high}
    assert rounded.mean().item() == pytest.approx(x[0].item(), abs=2e-5)
    exact = torch.tensor([1.5, -2.0, 0.0])
    assert torch.equal(stochastic_round_to_bf16(exact).float(), exact)  # representable values stay


def test_small_updates_survive_stochastic_rounding():
    """1000 updates of 1e-4 to a weight of 1: plain bf16 rounding loses all of them."""
    weights = torch.ones(10_000, dtype=torch.bfloat16)
    nearest = torch.ones(10_000, dtype=torch.bfloat16)
    for step in range(1000):
        weights = stochastic_round_to_bf16(weights.float() + 1e-4, seed=step)
        nearest = (nearest.float() + 1e-4).to(torch.bfloat16)
    assert nearest.float().mean().item() == 1.0
    assert weights.float().mean().item() == pytest.approx(1.1, abs=0.01)


def test_matches_torch_adamw_on_fp32_parameters():
    torch.manual_seed(0)
    reference = torch.nn.Linear(8, 4)
    ours = torch.nn.Linear(8, 4)
    ours.load_state_dict(reference.state_dict())
    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    optimizers = [torch.optim.AdamW(reference.parameters(), **kwargs), AdamWStochasticBF16(ours.parameters(), **kwargs)]
    for step in range(5):
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(step))
        for model, optimizer in zip((reference, ours), optimizers):
            optimizer.zero_grad()
            model(x).pow(2).mean().backward()
            optimizer.step()
    for a, b in zip(reference.parameters(), ours.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_bf16_parameters_track_the_fp32_trajectory():
    torch.manual_seed(0)
    reference = torch.nn.Linear(64, 64)
    ours = torch.nn.Linear(64, 64).to(torch.bfloat16)
    ours.load_state_dict({k: v.to(torch.bfloat16) for k, v in reference.state_dict().items()})
    reference.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in reference.state_dict().items()})
    start = reference.weight.detach().clone()
    kwargs = dict(lr=1e-4, weight_decay=0.0)
    optimizers = [torch.optim.AdamW(reference.parameters(), **kwargs), AdamWStochasticBF16(ours.parameters(), **kwargs)]
    for step in range(20):
        x = torch.randn(32, 64, generator=torch.Generator().manual_seed(step))
        for model, optimizer in zip((reference, ours), optimizers):
            optimizer.zero_grad()
            model(x.to(next(model.parameters()).dtype)).float().pow(2).mean().backward()
            optimizer.step()
    moved = (reference.weight - start).detach()
    ours_moved = ours.weight.float().detach() - start
    # lr 1e-4 x 20 steps is below a bf16 step for most weights; the mean movement still matches.
    assert ours_moved.abs().sum() > 0
    assert torch.corrcoef(torch.stack([moved.flatten(), ours_moved.flatten()]))[0, 1] > 0.8
    assert ours.weight.dtype == torch.bfloat16 and optimizers[1].state[ours.weight]["exp_avg"].dtype == torch.bfloat16


def test_random_bits_are_uniform_and_seeds_are_not_shifted_copies():
    bits = random_bits16(1 << 18, seed=7, device="cpu")
    assert torch.equal(bits, random_bits16(1 << 18, seed=7, device="cpu"))  # a pure function of index and seed
    assert 0 <= bits.min() and bits.max() <= 0xFFFF
    histogram = torch.bincount(bits >> 12, minlength=16).float()  # 16 bins of 16384 expected each
    assert ((histogram - 16384).abs() < 600).all()
    for bit in range(16):
        assert ((bits >> bit) & 1).float().mean().item() == pytest.approx(0.5, abs=0.01)
    other = random_bits16(1 << 18, seed=8, device="cpu")
    assert (bits == other).float().mean() < 0.001  # ~1/65536 by chance
    for shift in range(1, 4):  # a counter plus seed would make seed 8 the sequence of seed 7 moved by one
        assert (bits[shift:] == other[:-shift]).float().mean() < 0.001


def _bf16_steps(compile, steps=3):
    parameter = torch.nn.Parameter(torch.randn(300, 70, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16))
    optimizer = AdamWStochasticBF16([parameter], lr=1e-3, compile=compile)
    for step in range(steps):
        parameter.grad = torch.randn(300, 70, generator=torch.Generator().manual_seed(step + 1)).to(torch.bfloat16)
        optimizer.step()
    return parameter.detach(), optimizer.state[parameter]


def test_compiled_update_matches_the_eager_one():
    """On the GPU the update runs compiled (one fused kernel); it rounds with the same random bits."""
    eager_weight, eager_state = _bf16_steps(compile=False)
    compiled_weight, compiled_state = _bf16_steps(compile=True)
    # fp32 arithmetic may fuse differently (FMA), moving a value across a rounding threshold now and then
    assert (eager_weight != compiled_weight).float().mean() < 1e-3
    for name in ("exp_avg", "exp_avg_sq"):
        assert (eager_state[name] != compiled_state[name]).float().mean() < 1e-3
    assert compiled_state["step"] == 3


def test_bf16_updates_repeat_exactly():
    """No generator state: the same steps give the same bits (what an exact resume needs)."""
    first, _ = _bf16_steps(compile=False)
    second, _ = _bf16_steps(compile=False)
    assert torch.equal(first, second)


def test_resume_from_state_dict_rounds_as_the_uninterrupted_run():
    """What a checkpoint keeps (weights + optimizer.state_dict()) is all the update needs: no
    generator state, so a resumed run ends bit-identical to an uninterrupted one."""
    import copy

    def grad(step):
        return torch.randn(300, 70, generator=torch.Generator().manual_seed(100 + step)).to(torch.bfloat16)

    def new_run(weight):
        parameter = torch.nn.Parameter(weight.clone())
        return parameter, AdamWStochasticBF16([parameter], lr=1e-3, compile=False)

    start = torch.randn(300, 70, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    parameter, optimizer = new_run(start)
    for step in range(4):
        if step == 2:
            saved_weight, saved_state = parameter.detach().clone(), copy.deepcopy(optimizer.state_dict())
        parameter.grad = grad(step)
        optimizer.step()
    resumed, resumed_optimizer = new_run(saved_weight)
    resumed_optimizer.load_state_dict(saved_state)
    for step in range(2, 4):
        resumed.grad = grad(step)
        resumed_optimizer.step()
    assert not torch.equal(saved_weight, parameter)
    assert torch.equal(resumed, parameter)


def test_a_failing_compiler_falls_back_to_the_eager_update():
    def broken_backend(graph, example_inputs):
        raise RuntimeError("Cannot find a working triton installation")

    expected, _ = _bf16_steps(compile=False)
    parameter = torch.nn.Parameter(torch.randn(300, 70, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16))
    optimizer = AdamWStochasticBF16([parameter], lr=1e-3, compile=True, compile_backend=broken_backend)
    with pytest.warns(UserWarning, match="compiling the update failed"):
        for step in range(3):
            parameter.grad = torch.randn(300, 70, generator=torch.Generator().manual_seed(step + 1)).to(torch.bfloat16)
            optimizer.step()
    assert torch.equal(parameter.detach(), expected) and optimizer.compile is False


def _optimizers_under_test():
    """Each kind the trainers make: torch's fused AdamW (LoRA, fp32-master full fine-tune), ours
    for bf16 weights (eager; compiled on the GPU), and one without a skip flag (SGD with momentum
    standing in for bitsandbytes' AdamW8bit, which has no CPU kernels)."""
    kwargs = dict(lr=1e-2, weight_decay=0.1)
    return {
        "fused_adamw": (torch.float32, lambda params: torch.optim.AdamW(params, fused=True, **kwargs)),
        "stochastic_bf16": (torch.bfloat16, lambda params: AdamWStochasticBF16(params, compile=False, **kwargs)),
        "stochastic_bf16_8bit": (torch.bfloat16, lambda params: AdamWStochasticBF16(params, compile=False, eight_bit_moments=True,
                                                                                    **kwargs)),
        "no_skip_flag": (torch.float32, lambda params: torch.optim.SGD(params, momentum=0.9, **kwargs)),
    }


@pytest.mark.parametrize("kind", sorted(_optimizers_under_test()))
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_non_finite_gradient_skips_the_update(kind, poison):
    """Without the skip, clipping by a nan norm makes every gradient nan and the step every weight."""
    dtype, make = _optimizers_under_test()[kind]
    model = torch.nn.Linear(8, 4).to(dtype)
    optimizer = make(model.parameters())

    def step(gradient_fill=None):
        optimizer.zero_grad()
        model(torch.randn(16, 8, dtype=dtype, generator=torch.Generator().manual_seed(0))).float().pow(2).mean().backward()
        if gradient_fill is not None:
            model.weight.grad[0, 0] = gradient_fill
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        return step_unless_not_finite(optimizer, norm)

    assert step().item() == 0.0
    before = [p.detach().clone() for p in model.parameters()]
    moments = {k: v.clone() for k, v in optimizer.state[model.weight].items() if torch.is_tensor(v)}
    assert step(poison).item() == 1.0
    assert not hasattr(optimizer, "found_inf")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if kind == "no_skip_flag":  # a zero gradient instead: only the momentum moves the weights
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    else:  # weights and moments exactly as they were
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        for name, value in moments.items():
            if name != "step":
                assert torch.equal(value, optimizer.state[model.weight][name]), name
    if kind == "fused_adamw":
        assert optimizer.state[model.weight]["step"].item() == 1  # torch takes the skipped step back
    assert step().item() == 0.0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(before[0], model.weight)


def test_a_trainer_step_with_a_nan_reward_changes_no_weight(caplog):
    """Through the trainers' own optimizer (fused AdamW for LoRA) and Run.optimizer_step: the
    step is skipped, and the step's log says so."""
    import logging
    from collections import defaultdict

    from accelerate import Accelerator

    import train_direct_align
    from benchmarks import benchmark_trainers
    from flux_rl import models

    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    run = benchmark_trainers.build_run(train_direct_align, [], "tiny", "lora", 64, 2, False, torch.device("cpu"), accelerator)
    assert run.optimizer.defaults["fused"]
    reward = run.reward
    run.reward = lambda images, prompts: (lambda value, parts: (value * float("nan"), parts))(*reward(images, prompts))
    before = [p.detach().clone() for p in models.trainable_parameters(run.transformer)]
    train_direct_align.training_step(run, 0, defaultdict(list))
    grad_norm, skipped = run.optimizer_step()
    assert torch.isnan(grad_norm) and skipped.item() == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, models.trainable_parameters(run.transformer)))
    with caplog.at_level(logging.WARNING):
        run.log(0, {"grad_norm": grad_norm, "update_skipped": skipped})
    assert "step 1: the gradient norm is nan; the update was skipped" in caplog.text


def test_a_run_that_cannot_take_a_step_stops_with_a_checkpoint(tiny_models, tmp_path):
    """Two good steps, then a NaN reward for every image: ten skipped updates in a row end the run
    with an error and a checkpoint holding the weights of step 2, instead of idling to the end."""
    import glob
    import os

    from safetensors.torch import load_file

    from flux_rl.training import MAX_SKIPPED_IN_A_ROW
    from tests.launch import launch, tiny_args

    output_dir = str(tmp_path / "nan")
    result = launch("tests/nan_reward_probe.py", ["train_direct_align", "2"] + tiny_args(
        tiny_models, output_dir, "--max_train_steps", "40", "--rank", "4", "--checkpointing_steps", "2",
        "--checkpoints_total_limit", "20", "--num_inference_steps", "2"), expect_nonzero_exit=True)
    last = 2 + MAX_SKIPPED_IN_A_ROW
    assert f"\nerror: steps 3-{last} all had a non-finite gradient" in result.stderr and "Traceback" not in result.stderr.split("error: ")[0]
    assert result.stderr.count("the update was skipped") == MAX_SKIPPED_IN_A_ROW
    names = sorted(int(p.rsplit("-", 1)[1]) for p in glob.glob(os.path.join(output_dir, "checkpoint-*")))
    assert names == list(range(2, last + 1, 2))
    after_good_steps = load_file(os.path.join(output_dir, "checkpoint-2", "pytorch_lora_weights.safetensors"))
    at_stop = load_file(os.path.join(output_dir, f"checkpoint-{last}", "pytorch_lora_weights.safetensors"))
    for key, value in after_good_steps.items():
        assert torch.equal(value, at_stop[key]) and torch.isfinite(value).all(), key
    assert any(value.abs().sum() > 0 for key, value in after_good_steps.items() if "lora_B" in key)  # it had trained


def test_8bit_moments_keep_their_relative_precision():
    """The power codes: the first moment within a few percent of the block's largest where it matters, the second
    moment's small values (what sqrt(v) + eps divides by) within their own relative error, not rounded to zero."""
    from flux_rl.optim import BLOCK, dequantize_moment, quantize_moment

    values = torch.randn(3 * BLOCK + 17, generator=torch.Generator().manual_seed(0)) * torch.logspace(-6, 0, 3 * BLOCK + 17)
    codes, scale = quantize_moment(values, False, 1)
    assert codes.dtype == torch.int8 and codes.numel() == values.numel() and scale.numel() == 4
    back = dequantize_moment(codes, scale, False)
    block_max = scale.repeat_interleave(BLOCK)[: values.numel()]
    # sqrt code on 127 levels: |error| <= (2 sqrt(|x| / max) + 1 / 127) / 127 of the block's largest
    bound = (2 * (values.abs() / block_max).sqrt() + 1 / 127) / 127 * block_max
    assert ((back - values).abs() <= bound * 1.001).all() and (back.sign() * values.sign() >= 0).all()
    squares = values.square()
    codes, scale = quantize_moment(squares, True, 2)
    assert codes.dtype == torch.uint8
    back = dequantize_moment(codes, scale, True)
    kept = squares > scale.repeat_interleave(BLOCK)[: values.numel()] * 1e-4  # within 10^4 of the block's largest
    # a fourth-root code on 255 levels: at 10^-4 of the largest the code is about 25, one step is 16% of the value
    assert ((back[kept] - squares[kept]).abs() / squares[kept]).max() < 0.2
    assert (back[squares > 0] > 0).float().mean() > 0.95  # the small ones are not zeroed


def test_8bit_moments_train_like_16bit_ones_in_half_the_state():
    torch.manual_seed(0)
    target = torch.randn(64, 64)
    runs = {}
    for bits in (16, 8):
        weight = torch.nn.Parameter(torch.zeros(64, 64, dtype=torch.bfloat16))
        optimizer = AdamWStochasticBF16([weight], lr=5e-2, weight_decay=0.0, compile=False, eight_bit_moments=bits == 8)
        losses = []
        for step in range(60):
            x = torch.randn(32, 64, generator=torch.Generator().manual_seed(step))
            loss = (x @ weight.float() - x @ target).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        state_bytes = sum(v.numel() * v.element_size() for v in optimizer.state[weight].values() if torch.is_tensor(v))
        runs[bits] = (losses, weight.detach().float(), state_bytes)
    (losses16, weight16, bytes16), (losses8, weight8, bytes8) = runs[16], runs[8]
    assert losses8[-1] < 0.2 * losses8[0] and losses8[-1] < 1.2 * losses16[-1]
    assert torch.corrcoef(torch.stack([weight16.flatten(), weight8.flatten()]))[0, 1] > 0.98
    assert bytes8 / weight.numel() < 2.05 and bytes16 / weight.numel() == 4  # two moments: 2.03 bytes against 4


def test_8bit_moments_resume_exactly():
    import copy

    def new_run(weight):
        parameter = torch.nn.Parameter(weight.clone())
        return parameter, AdamWStochasticBF16([parameter], lr=1e-3, compile=False, eight_bit_moments=True)

    start = torch.randn(300, 70, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    parameter, optimizer = new_run(start)
    for step in range(4):
        if step == 2:
            saved_weight, saved_state = parameter.detach().clone(), copy.deepcopy(optimizer.state_dict())
        parameter.grad = torch.randn(300, 70, generator=torch.Generator().manual_seed(100 + step)).to(torch.bfloat16)
        optimizer.step()
    resumed, resumed_optimizer = new_run(saved_weight)
    resumed_optimizer.load_state_dict(saved_state)
    for step in range(2, 4):
        resumed.grad = torch.randn(300, 70, generator=torch.Generator().manual_seed(100 + step)).to(torch.bfloat16)
        resumed_optimizer.step()
    assert torch.equal(resumed, parameter)
