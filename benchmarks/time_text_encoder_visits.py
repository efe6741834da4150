"""What `--offload_text_encoders` costs per prompt: FLUX.1's text encoders (T5-XXL v1.1 and CLIP
ViT-L/14's text tower) at full size with random weights in bf16, moved to the GPU and back as
flux_rl.flux.PromptEncoder moves them, and their encode time at 512 T5 tokens.

    python benchmarks/time_text_encoder_visits.py                             # on a GPU
    python benchmarks/time_text_encoder_visits.py --size tiny --device cpu    # the test suite

Prints a markdown table (median of --repeats): the visit (there and back), encoding 1 and
ENCODE_BATCH prompts, and the cost per new prompt when each visit encodes 1 prompt (before the
look-ahead) or PromptEncoder.LOOKAHEAD prompts (now).
"""

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import benchmark_trainers  # noqa: E402
from flux_rl.flux import PromptEncoder  # noqa: E402

SIZES = {
    # FLUX.1-dev's text_encoder_2 and text_encoder configs
    "full": (dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128, feed_forward_proj="gated-gelu"),
             dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, vocab_size=49408,
                  projection_dim=768)),
    "tiny": (dict(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, vocab_size=100, feed_forward_proj="gated-gelu"),
             dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=100, projection_dim=32,
                  bos_token_id=0, eos_token_id=1)),
}


def build_encoders(size: str):
    """Both encoders in bf16 in CPU memory. T5's weights are a constant (timing only: no minutes of
    random init for 4.8B parameters; written, so that every page is real memory, as loaded weights
    are; it has no buffers that to_empty would leave unset); CLIP's text tower is small and has a
    position-id buffer, so it is built as usual."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    t5_config, clip_config = SIZES[size]
    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(**t5_config)).to(torch.bfloat16)
    assert not list(t5.buffers())
    t5 = t5.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in t5.parameters():
            parameter.fill_(0.01)
    clip = CLIPTextModel(CLIPTextConfig(**clip_config)).to(torch.bfloat16)
    return t5.eval(), clip.eval()


def timed(function, device, repeats):
    """Median seconds of `repeats` calls, the device drained before and after each (benchmark_trainers.timed)."""
    return statistics.median(benchmark_trainers.timed(function, device) for _ in range(repeats))


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--t5_tokens", type=int, default=512)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    t5, clip = build_encoders(args.size)
    gib = sum(p.numel() * p.element_size() for encoder in (t5, clip) for p in encoder.parameters()) / 2**30

    def visit():
        for encoder in (t5, clip):
            encoder.to(device)
        for encoder in (t5, clip):
            encoder.to("cpu")

    @torch.no_grad()
    def encode(count):
        t5(torch.randint(0, t5.config.vocab_size, (count, args.t5_tokens), device=device))
        clip(torch.randint(0, clip.config.vocab_size, (count, 77), device=device))

    visit_s = timed(visit, device, args.repeats)
    for encoder in (t5, clip):
        encoder.to(device)
    batch, ahead = PromptEncoder.ENCODE_BATCH, PromptEncoder.LOOKAHEAD
    one_s, batch_s = timed(lambda: encode(1), device, args.repeats), timed(lambda: encode(batch), device, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [
        f"text encoders ({args.size}, {gib:.1f} GiB bf16) on {name}, T5 at {args.t5_tokens} tokens, median of {args.repeats}",
        "",
        f"| visit (to the device and back) s | encode 1 prompt s | encode {batch} prompts s | per new prompt, 1 a visit s "
        f"| per new prompt, {ahead} a visit s |",
        "|---|---|---|---|---|",
        f"| {visit_s:.3f} | {one_s:.4f} | {batch_s:.4f} | {visit_s + one_s:.3f} | {(visit_s + ahead / batch * batch_s) / ahead:.4f} |",
    ]
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
