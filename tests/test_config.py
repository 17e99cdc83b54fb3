import dataclasses

import pytest

from chronomoe_v3 import ChronoConfig


def test_defaults_match_the_design():
    c = ChronoConfig()
    assert c.clock_alphas == (0.9, 0.99, 0.999)
    assert (c.eta_beta, c.tau, c.beta_min, c.beta_max) == (0.01, 0.5, -1.0, 1.0)
    assert (c.lambda_complexity, c.rho_redundancy, c.kappa_instability) == (0.01, 0.1, 0.1)
    assert (c.min_improvement, c.max_edits_per_cycle, c.cooldown_steps) == (0.01, 1, 500)
    assert (c.min_experts_per_layer, c.max_experts_per_layer) == (2, 16)
    assert c.spawn_strategy == "clone_and_perturb"
    assert c.split_perturbation_scale == 0.01
    assert c.alpha_centroid == 0.95
    assert c.basin_window_size == 50
    assert c.coherence_estimator == "loo"


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"alpha_fast": 1.0}, "alpha_fast"),
        ({"alpha_slow": 0.0}, "alpha_slow"),
        ({"alpha_mid": -0.5}, "alpha_mid"),
        ({"alpha_fast": 0.99, "alpha_mid": 0.99}, "alpha_fast < alpha_mid"),
        ({"alpha_fast": 0.995}, "alpha_fast < alpha_mid"),
        ({"beta_min": 1.0, "beta_max": 1.0}, "beta_min"),
        ({"beta_min": 0.5, "beta_max": 0.2}, "beta_min"),
        ({"min_experts_per_layer": 5, "max_experts_per_layer": 4}, "min_experts_per_layer"),
        ({"coherence_estimator": "median"}, "coherence_estimator"),
        ({"spawn_strategy": "clone"}, "spawn_strategy"),
        ({"bias_mode": "both"}, "bias_mode"),
        ({"degrade_baseline": "fast"}, "degrade_baseline"),
        ({"degrade_z": -1.0}, "degrade_z"),
        ({"eta_beta": float("nan")}, "eta_beta"),
        ({"cooldown_steps": -1}, "cooldown_steps"),
        ({"lifecycle_eval_interval": 0}, "lifecycle_eval_interval"),
        ({"alpha_centroid": 1.5}, "alpha_centroid"),
        ({"tau": 2.0}, "tau"),
    ],
)
def test_invalid_values_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field.split()[0]):
        ChronoConfig(**changes)


def test_error_message_states_allowed_range():
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        ChronoConfig(alpha_fast=1.2)
    with pytest.raises(ValueError, match="one of"):
        ChronoConfig(coherence_estimator="x")


def test_dict_round_trip_and_unknown_field():
    c = dataclasses.replace(ChronoConfig(), tau=0.3, coherence_estimator="full")
    assert ChronoConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown ChronoConfig fields"):
        ChronoConfig.from_dict({"taux": 1})
