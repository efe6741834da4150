#!/usr/bin/env bash
# On a GPU machine (carry .whl): install the packages its image lacks, then time the trainers at
# full size. With no arguments it runs, most important first, the groups that the last recorded run
# (benchmarks/RESULTS.md) left unmeasured, each under its own time limit (cut to what is left of
# BUDGET), so that a short lease still returns every group that finished; FROM=NAME starts at that group
# (a second call: FROM=baselines_compiled bash benchmarks/run_on_device.sh). With arguments it runs one group
# with them, e.g.
#   NAME=srpo_1024 LIMIT=150 bash benchmarks/run_on_device.sh --trainers srpo --modes lora --resolutions 1024
# Logs (each ends with its markdown table) land in $OUT, or benchmarks/results/ where that is unset.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, diffusers, transformers, peft, accelerate, open_clip
print(*(f'{m.__name__} {m.__version__}' for m in (torch, diffusers, transformers, peft, accelerate, open_clip)), sep=', ')" \
  | tee -a "$out/gpu.txt"

# Each group gets its own limit, cut to what is left of BUDGET seconds (default 570: a 600 s device call).
budget=${BUDGET:-570}
start_at=${FROM:-}
group() {  # NAME SECONDS COMMAND...: one group, stopped after SECONDS, its output in $out/NAME.log
  # (and on the screen, unless QUIET=1: a trainer's progress bars would push the tables out of the call's output)
  local name=$1 seconds=$2; shift 2
  [ -n "$start_at" ] && [ "$name" != "$start_at" ] && { echo "$name: skipped (FROM=$FROM)"; return; }
  start_at=""
  local left=$((budget - SECONDS))
  (( seconds > left )) && seconds=$left
  (( seconds < 30 )) && { echo "$name: skipped, ${left}s left"; return; }
  if [ "${QUIET:-0}" = 1 ]; then
    timeout "$seconds" "$@" > "$out/$name.log" 2>&1
    echo "$name: exit $? (log: $name.log)"
  else
    timeout "$seconds" "$@" 2>&1 | tee "$out/$name.log"
  fi
}
bench() {  # NAME SECONDS ARGS...: one group of benchmark configurations
  local name=$1 seconds=$2; shift 2
  # EXTRA (word-split) goes last, e.g. EXTRA="--size tiny --resolutions 64" to try the groups on a CPU
  group "$name" "$seconds" python3 benchmarks/benchmark_trainers.py --size full "$@" ${EXTRA:-}
}

if [ $# -gt 0 ]; then
  bench "${NAME:-custom}" "${LIMIT:-540}" "$@"
  exit
fi
# LoRA on a 24 GB card (issue #24), never run on a GPU: the frozen base in 4 bits (--quantize_base nf4, built on the host
# and quantized layer by layer on the GPU) with 8-bit Adam for the adapters, under a 22 GiB cap (a 24 GB card less what
# CUDA itself holds): the row's peak, or out-of-memory if it does not fit; with SRPO's branches in one batch (the
# default) and one at a time. The text encoders are not in it (random embeddings; --offload_text_encoders keeps them on
# the host between visits: T5-XXL + CLIP, 9.1 GiB, come to the GPU while a step's prompts are encoded, not during it).
bench lora_24gb 220 --trainers srpo --modes lora --resolutions 720 --compile_modes eager --no_flops --max_memory_gib 22 \
  --variant="--quantize_base nf4 --use_8bit_adam" --variant="--quantize_base nf4 --use_8bit_adam --no_batch_branches"
# --rollout_dtype fp8 (issue #24), never run on a GPU: first what it changes (rollout image PSNR, gradient cosine against
# a bf16 rollout, both rollouts timed), then the SRPO LoRA step with it, eager (its interplay with --compile is unknown),
# beside the same step without it.
group fp8_fidelity 120 python3 benchmarks/fp8_rollout_fidelity.py --size full --resolution 720 --rollout_steps 25
bench srpo_fp8 200 --trainers srpo --modes lora --resolutions 720 --compile_modes eager --reuse_flops \
  --variant= --variant="--rollout_dtype fp8" --profile "$out/profile_fp8.txt"
# The full fine-tune with 8-bit moments (--bf16_weights --use_8bit_adam, issue #24's "one 80 GB card"), under a 78 GiB
# cap: the row's peak, or out-of-memory if it does not fit.
bench full_80gb 200 --trainers srpo --modes full_bf16 --resolutions 720 --compile_modes compiled --max_memory_gib 78 \
  --variant="--use_8bit_adam"
# FLUX.2 [klein] base 4B, never run on a GPU: README's command (classifier-free guidance 4 in the rollout, two passes per
# step; one pass in the branches), bf16 base and 4-bit base, eager; peaks estimated on the meta device (RESULTS.md).
bench klein_lora 200 --family flux2_klein --trainers srpo --modes lora --resolutions 720 --compile_modes eager \
  --variant="--rollout_guidance 4 --train_guidance 1" --variant="--rollout_guidance 4 --train_guidance 1 --quantize_base nf4 --use_8bit_adam"
# Qwen-Image (20.4B) at 1024 px, never run on a GPU: README's guidance, bf16 base and 4-bit base, eager (RESULTS.md has
# the meta-device estimates: its video VAE cannot checkpoint, so the decode's activations weigh).
bench qwen_lora 240 --family qwen_image --trainers srpo --modes lora --resolutions 1024 --compile_modes eager --no_flops \
  --variant="--rollout_guidance 4 --train_guidance 1" --variant="--rollout_guidance 4 --train_guidance 1 --quantize_base nf4 --use_8bit_adam"
# SRPO LoRA compiled with the defaults timed on 2026-11-27 (--compile now also compiles the VAE decoder and the
# reward's image tower; --batch_branches and --batch_rollout_modulations are on): 2.591 s then, in a process of its
# own, against 2.530 s with cuDNN's attention in the rollout in another; here both in one process, with the FLOPs of the
# compiled VAE and reward counted, a profile, and --no_batch_branches to see what the batch costs in memory
# (35.6 GiB against 31.9 before these defaults). Those were with the attention layers; the default layers now adapt the
# feed-forwards too, and their rollout runs unmerged by default: --merge_lora_in_rollout times what merging saves
# (estimated 43.4 against 34.9 GiB: benchmarks/estimate_memory.py).
bench srpo_lora 230 --trainers srpo --modes lora --resolutions 720 --compile_modes compiled --reuse_flops \
  --variant= --variant="--rollout_attention_backend _native_cudnn" --variant="--no_batch_branches" \
  --variant="--merge_lora_in_rollout" \
  --profile "$out/profile_lora.txt"
# The trainer itself on the GPU, on the tiny models, compiled (blocks, VAE decoder, reward towers): bf16, checkpointing,
# LoRA merged for the rollout, validation, and every text-image and image-only reward. Without --compile it ran on
# 2026-11-27 (benchmarks/logs/2026-11-27-h200-session12/smoke_no_compile.log); with it, compiling the tiny models'
# graphs took over 80 s. What it wrote is listed at the end.
QUIET=1 group smoke 150 bash -c "python3 -m flux_rl.tiny_models --output_dir /tmp/tiny-models && accelerate launch --num_processes 1 \
  train_srpo_flux.py --pretrained_model_name_or_path /tmp/tiny-models/flux --reward_models_dir /tmp/tiny-models/rewards \
  --resolution 64 --num_inference_steps 4 --max_train_steps 4 --mixed_precision bf16 --gradient_checkpointing \
  --vae_gradient_checkpointing --compile --merge_lora_in_rollout --validation_prompt 'a photo of a cat' --validation_steps 4 \
  --reward hpsv2:1,pickscore:0.05,imagereward:0.5,aesthetic:0.1 \
  --output_dir /tmp/srpo-smoke && ls -R /tmp/srpo-smoke"
# The full fine-tune with the new defaults (3.066 s before them).
bench srpo_full_bf16 150 --trainers srpo --modes full_bf16 --resolutions 720 --compile_modes compiled
# The baselines compiled (only their eager steps are recorded).
bench baselines_compiled 230 --trainers direct_align,refl,draft_lv --modes lora --resolutions 720 --compile_modes compiled
bench srpo_1024 170 --trainers srpo --modes lora,full_bf16 --resolutions 1024 --compile_modes compiled
# What --offload_text_encoders costs per new prompt: T5-XXL + CLIP (9.7 GB) to the GPU and back, and their encode
# time; each visit now encodes 64 prompts ahead. About 40 s.
group text_encoder_visits 60 python3 benchmarks/time_text_encoder_visits.py
