"""--batch_rollout_modulations: the blocks' modulation layers run once per rollout, on every step's
rows, and the rollout is the one of per-step layers."""

from collections import defaultdict

import pytest
import torch

from flux_rl import modulations
from tests.test_speed_options import _WithoutAutocast


def _tiny_run(flags=(), autocast=False):
    from accelerate import Accelerator

    from benchmarks import benchmark_trainers

    accelerator = Accelerator(mixed_precision="bf16", cpu=True)  # one AcceleratorState per process: as the other tests
    module, trainer_flags = benchmark_trainers.TRAINERS["srpo"]
    torch.manual_seed(0)
    run = benchmark_trainers.build_run(module, trainer_flags + list(flags), "tiny", "lora", 64, 4, False,
                                       torch.device("cpu"), accelerator)
    if not autocast:
        run.accelerator = _WithoutAutocast(accelerator)  # fp32: one batched matmul and per-row ones agree to rounding
    return module, run


def _modulation_layers(transformer):
    return [m.linear for m in transformer.modules() if type(m).__name__ in modulations._ADAPTIVE_NORMS]


@pytest.mark.parametrize("stop_index", [None, 2])
def test_tabulated_rollout_matches_per_step_layers(tiny_models, stop_index):
    """Two prompts (rows are step-major), the full schedule and one stopped early (ReFL): the same
    latents; each modulation layer runs once on steps x batch rows instead of once per step; on exit
    the layers are back and the tables freed."""
    module, run = _tiny_run()
    layers = _modulation_layers(run.unwrapped())
    assert len(layers) == 1 * 2 + 1 + 1  # one double block (two norms), one single block, the output norm
    prompts = ["a cat", "a dog"]
    results = {}
    for batched in (False, True):
        run.args.batch_rollout_modulations = batched
        rows = defaultdict(list)
        hooks = [layer.register_forward_hook(lambda m, args, out, i=i: rows[i].append(args[0].shape[0]))
                 for i, layer in enumerate(layers)]
        results[batched] = run.rollout(prompts, torch.Generator().manual_seed(1), stop_index=stop_index)[0]
        for hook in hooks:
            hook.remove()
        steps = len(run.rollout_sigmas) - 1
        ran = steps if stop_index is None else stop_index
        expected = [steps * len(prompts)] if batched else [len(prompts)] * ran
        assert all(rows[i] == expected for i in range(len(layers))), (batched, dict(rows))
    assert _modulation_layers(run.unwrapped()) == layers  # the layers are back, the stand-ins and tables gone
    assert not torch.equal(results[True][0], results[True][1])  # two prompts, two images
    assert torch.allclose(results[True], results[False], atol=1e-5)


def test_tabulated_rollout_under_bf16_autocast(tiny_models):
    """Under autocast the batched embeddings are the model's own per step (timestep and guidance cast to
    the hidden states' bf16, as its forward does; left in fp32 they were 7.6% off, here 0), and the
    rollout stays within bf16 rounding of the per-step one (equal on this project's CPU box)."""
    module, run = _tiny_run(autocast=True)
    model = run.unwrapped()
    per_step = []
    hook = model.time_text_embed.register_forward_hook(lambda module, args, out: per_step.append(out.detach()))
    prompts = ["a cat", "a dog"]
    results = {}
    for batched in (False, True):
        run.args.batch_rollout_modulations = batched
        results[batched], _, cond = run.rollout(prompts, torch.Generator().manual_seed(1))
        if not batched:
            hook.remove()
    with run.accelerator.autocast(), torch.no_grad():
        hidden_dtype = modulations._hidden_dtype(model, cond.prompt_embeds)
        sigmas = [float(s) for s in run.rollout_sigmas[:-1]]
        embeddings = modulations._embeddings(model, sigmas, run.args.rollout_guidance, cond.pooled_embeds, hidden_dtype)
    per_step = torch.cat(per_step).float()
    assert hidden_dtype == torch.bfloat16 and embeddings.shape == per_step.shape
    assert ((embeddings.float() - per_step).norm() / per_step.norm()).item() < 1e-2
    error = ((results[True] - results[False]).norm() / results[False].norm()).item()
    assert error < 0.02, error


def test_tabulated_rollout_compiles_once(tiny_models):
    """Compiled blocks: the stand-ins' tables and step index are graph inputs, so a second rollout and
    a training step after it add no graphs beyond the first step's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from flux_rl import models

    counter = CompileCounterWithBackend("aot_eager")
    module, run = _tiny_run(["--batch_rollout_modulations"])
    models.compile_blocks(run.unwrapped(), backend=counter)
    module.training_step(run, 0, defaultdict(list))
    graphs = counter.frame_count
    assert graphs > 0
    module.training_step(run, 1, defaultdict(list))
    run.rollout(["a dog"], torch.Generator().manual_seed(2))
    assert counter.frame_count == graphs
