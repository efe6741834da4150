"""Shared code of the training scripts: schedules, rollout, Direct-Align math, LoRA, checkpoints."""

import logging

# bitsandbytes' CPU backend logs a warning at import on CPUs with AVX512-BF16 ("Failed to load CPU
# gemm_4bit_forward ... pip install kernels"): its 4-bit CPU matmul, which nothing here uses (the
# 8-bit AdamW runs on the GPU). Quieted so that a newcomer's first CPU run does not read as broken.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
