"""benchmarks/estimate_memory.py: the live-bytes count of a step on the meta device (how the README's memory figures for
configurations no GPU has run are estimated) counts what is alive, each storage once, and frees what is dropped; the
stand-ins for bitsandbytes' 8-bit Adam and NF4 layers hold the bytes the real ones hold; a tiny step runs through it."""

import torch

from benchmarks import estimate_memory
from benchmarks.estimate_memory import LiveBytes

MIB = 2**20


def test_live_bytes_counts_each_storage_once_and_frees_what_is_dropped():
    kept = torch.empty(MIB, dtype=torch.uint8, device="meta")  # alive before: counted from the start
    with LiveBytes() as live:
        start = live.start
        a = torch.empty(4 * MIB, dtype=torch.uint8, device="meta")
        view = a[: MIB]  # a view: no new storage
        a.add_(1)  # in place: no new storage
        b = a.float()  # 16 MiB
        del b  # freed
        c = torch.empty(2 * MIB, dtype=torch.uint8, device="meta")
        del view, c
    assert start >= MIB and kept.numel() == MIB
    assert live.peak - start == 4 * MIB + 16 * MIB  # a and b together; c came after b was gone


def test_the_flash_attention_stand_in_matches_sdpa_in_shape_and_keeps_no_scores():
    q, k, v = (torch.empty(1, 4, 2048, 64, dtype=torch.bfloat16, device="meta", requires_grad=True) for _ in range(3))
    with LiveBytes() as live:
        out = estimate_memory.flash_attention(q, k, v)
    assert out.shape == (1, 4, 2048, 64)
    # output + log-sum-exp (fp32 per query) and small extras, not a 4 x 2048 x 2048 score matrix (32 MiB in bf16)
    assert live.peak - live.start < 2 * MIB


def test_the_stand_ins_hold_what_bitsandbytes_holds():
    linear = torch.nn.Linear(3072, 12288, bias=True, device="meta", dtype=torch.bfloat16)
    nf4 = estimate_memory.NF4StandIn(linear, torch.bfloat16)
    stored = sum(t.numel() * t.element_size() for t in [*nf4.parameters(), *nf4.buffers()])
    weights = 3072 * 12288
    assert stored == weights // 2 + weights // 64 + 4 * ((weights // 64 + 255) // 256) + 2 * 12288  # codes, scales, bias
    x = torch.empty(2, 100, 3072, dtype=torch.bfloat16, device="meta", requires_grad=True)
    with LiveBytes() as live:
        nf4(x).sum().backward()
    assert x.grad.shape == x.shape
    assert live.peak - live.start >= 2 * weights  # the dequantized bf16 weight while the product runs

    parameter = torch.nn.Parameter(torch.empty(1000, device="meta"))
    optimizer = estimate_memory.EightBitAdamStandIn([parameter])
    parameter.grad = torch.empty_like(parameter)
    optimizer.step()
    state = optimizer.state[parameter]
    assert sum(t.numel() * t.element_size() for t in state.values()) == 2 * 1000 + 2 * 4 * 4  # two uint8 moments, scales


def test_a_tiny_step_is_estimated_with_the_stand_ins():
    peak, alive = estimate_memory.estimate("srpo", "lora", 64, 2, "--quantize_base nf4 --use_8bit_adam", size="tiny")
    assert peak > alive > 0


def test_the_other_families_steps_are_estimated_and_cfg_in_the_branches_costs_memory():
    """--family flux2_klein / qwen_image: their models (tiny here) through the same step, Qwen-Image's at a non-square
    size as its buckets are. Guidance above 1 in the training branches runs the transformer twice with gradients: its
    activations are held too."""
    one_pass, alive = estimate_memory.estimate("srpo", "lora", 64, 2, "--rollout_guidance 4 --train_guidance 1", size="tiny",
                                               family="flux2_klein")
    two_passes, _ = estimate_memory.estimate("srpo", "lora", 64, 2, "--rollout_guidance 4 --train_guidance 4", size="tiny",
                                             family="flux2_klein")
    assert two_passes > one_pass > alive > 0
    qwen_peak, qwen_alive = estimate_memory.estimate("srpo", "lora", "64,96", 2, "--rollout_guidance 4", size="tiny", family="qwen_image")
    assert qwen_peak > qwen_alive > 0
