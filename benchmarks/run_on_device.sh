#!/usr/bin/env bash
# On a GPU machine (carry .whl): install the packages its image lacks, then time the trainers at
# full size. With no arguments it runs, most important first, the groups that the last recorded run
# (benchmarks/RESULTS.md) left unmeasured, each under its own time limit (cut to what is left of
# BUDGET), so that a short lease still returns every group that finished; FROM=NAME starts at that group
# (a second call: FROM=srpo_lora_cudnn_attention bash benchmarks/run_on_device.sh). With arguments it runs one group
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
# LoRA, compiled (adapters merged for the rollout, the default): 2.93 s measured, 1.93 s of it rollout, before the
# mid-step host waits were removed and the VAE's attention became two matmuls (--vae_attention math, now the
# default; the fused kernel's backward was 33 ms of the step): the plain variant measures those changes (and prints
# host waits: 0 expected). $fast is what may close the gap to 2.6 s: the VAE decoder and the reward's image tower
# compiled (eager GroupNorm was 125 ms of the step, the HPS forward 21 ms a call), both branches in one batch and
# the rollout's modulation layers run once for all 25 steps (62 ms of batch-1 products). With profiles. Every new
# process compiles the blocks, the VAE decoder and the reward tower again (inductor's cache helps): hence few groups.
fast="--compile_vae --compile_reward --batch_branches --batch_rollout_modulations"
bench srpo_lora_fast 260 --trainers srpo --modes lora --resolutions 720 --compile_modes compiled \
  --variant= --variant="$fast" --reuse_flops --profile "$out/profile_lora.txt"
# On top of $fast: cuDNN's attention for the no-grad rollout only (2/3 of the step, no backward); then half the
# transformer blocks checkpointed and none (less recompute, more memory; VAE checkpointing stays on). Not counted:
# FLOPs per step from --device meta are 1197 (ratio 1), 1160 (0.5), 1121 (0) TFLOP, rollout 932.
bench srpo_lora_more 190 --trainers srpo --modes lora --resolutions 720 --compile_modes compiled --no_flops \
  --variant="$fast --rollout_attention_backend _native_cudnn" \
  --variant="$fast --gradient_checkpointing_ratio 0.5" --variant="$fast --gradient_checkpointing_ratio 0"
# The trainer itself on the GPU, on the tiny models (the groups above time Run objects built by the benchmark):
# bf16, checkpointing, compiled blocks, LoRA merged for the rollout, batched rollout modulations, validation, and
# every text-image and image-only reward (only HPSv2.1 has run on a GPU so far); what it wrote is listed at the end.
# (The VAE and reward compiled are left to the groups above: compiling them too for the tiny models would not
# fit this group's 90 s.)
# Before the cuDNN group: it checks paths users run, the cuDNN group a kernel that crashed once.
QUIET=1 group smoke 90 bash -c "python3 -m flux_rl.tiny_models --output_dir /tmp/tiny-models && accelerate launch --num_processes 1 \
  train_srpo_flux.py --pretrained_model_name_or_path /tmp/tiny-models/flux --reward_models_dir /tmp/tiny-models/rewards \
  --resolution 64 --num_inference_steps 4 --max_train_steps 4 --mixed_precision bf16 --gradient_checkpointing \
  --vae_gradient_checkpointing --compile --batch_rollout_modulations \
  --validation_prompt 'a photo of a cat' --validation_steps 4 \
  --reward hpsv2:1,pickscore:0.05,imagereward:0.5,aesthetic:0.1 \
  --output_dir /tmp/srpo-smoke && ls -R /tmp/srpo-smoke"
# cuDNN's attention everywhere, training included, in its own process: torch 2.11's cuDNN backward once ended a
# process with an illegal memory access on strided q/k/v (diffusers' _native_cudnn makes them contiguous).
bench srpo_lora_cudnn_attention 110 --trainers srpo --modes lora --resolutions 720 --compile_modes compiled --no_flops \
  --variant="$fast --attention_backend _native_cudnn"
# What --offload_text_encoders costs per new prompt: T5-XXL + CLIP (9.7 GB) to the GPU and back, and their encode
# time; each visit now encodes 64 prompts ahead. About 40 s.
group text_encoder_visits 60 python3 benchmarks/time_text_encoder_visits.py
# The baselines compiled (only their eager steps are recorded).
bench baselines_compiled 200 --trainers direct_align,refl,draft_lv --modes lora --resolutions 720 --compile_modes compiled
bench srpo_1024 150 --trainers srpo --modes lora,full_bf16 --resolutions 1024 --compile_modes compiled
