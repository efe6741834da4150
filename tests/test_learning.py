"""Proven to learn: every trainer and reward kind, trained for 30 steps on the tiny models with an
analytic reward of known optimum, moves its reward on held-out prompts and seeds, judged in
standard errors of the paired (same prompt and seed) difference; swapped control phrases move it
the other way. The runs are those of benchmarks/learning_curves.py, which draws their curves."""

import os

import pytest

from benchmarks.learning_curves import LEARNING_RUNS, heldout_images, measure, train

STEPS = 30
MIN_STANDARD_ERRORS = 5


@pytest.fixture(scope="module")
def base_images(tiny_flux):
    from flux_rl import heldout

    pipe = heldout.load_base(tiny_flux)
    return pipe, heldout_images(pipe, None)


@pytest.mark.parametrize("name", sorted(LEARNING_RUNS))
def test_training_moves_the_heldout_reward(name, tiny_models, base_images, tmp_path):
    from flux_rl import heldout

    run = LEARNING_RUNS[name]
    output = train(run, tiny_models, str(tmp_path / name), steps=STEPS)
    pipe, base = base_images
    trained = heldout_images(pipe, output)
    gain, standard_error, z = heldout.paired_gain(measure(base, run.measure), measure(trained, run.measure))
    assert run.direction * z >= MIN_STANDARD_ERRORS, (
        f"{name}: held-out {run.measure} moved by {gain:+.5f} ({z:+.1f} standard errors of {standard_error:.5f}); "
        f"expected {'a rise' if run.direction > 0 else 'a fall'} of at least {MIN_STANDARD_ERRORS}")
    assert os.path.exists(os.path.join(output, "README.md"))  # the run finished: final weights and model card
