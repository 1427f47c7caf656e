"""Hyperparameters are checked when the config is built, with the field named (issue 13, item 3): values that
would otherwise fail mid-run (a ZeroDivisionError, NaN weights from temperature 0, a run that trains nothing,
torch's optimizer naming its own argument) or, worse, train silently on nonsense."""

from __future__ import annotations

import pytest

from tether import DPOConfig, GRPOConfig, PPOConfig, RLOOConfig, SFTConfig

ONLINE = dict(per_device_train_batch_size=4, num_generations=2)


@pytest.mark.parametrize(("config_class", "options", "named"), [
    (GRPOConfig, dict(temperature=0.0), "temperature"),
    (RLOOConfig, dict(temperature=-1.0), "temperature"),
    (GRPOConfig, dict(beta=-0.1), "beta"),
    (GRPOConfig, dict(epsilon=-0.2), "epsilon"),
    (GRPOConfig, dict(epsilon_high=-0.1), "epsilon_high"),
    (GRPOConfig, dict(top_p=0.0), "top_p"),
    (GRPOConfig, dict(top_p=1.5), "top_p"),
    (GRPOConfig, dict(top_k=-1), "top_k"),
    (GRPOConfig, dict(min_p=2.0), "min_p"),
    (DPOConfig, dict(max_prompt_length=0), "max_prompt_length"),
    (SFTConfig, dict(num_train_epochs=0), "num_train_epochs"),
    (SFTConfig, dict(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
    (DPOConfig, dict(learning_rate=-1e-2), "learning_rate"),
    (SFTConfig, dict(per_device_train_batch_size=0), "per_device_train_batch_size"),
])
def test_bad_hyperparameters_are_named_when_the_config_is_built(tmp_path, config_class, options, named):
    extra = ONLINE if config_class in (GRPOConfig, RLOOConfig) else {}
    with pytest.raises(ValueError, match=named):
        config_class(output_dir=str(tmp_path), **extra, **options)


def test_good_edge_values_are_accepted(tmp_path):
    GRPOConfig(output_dir=str(tmp_path), **ONLINE, beta=0.0, epsilon=0.0, top_p=1.0, top_k=0, min_p=None)
    SFTConfig(output_dir=str(tmp_path), num_train_epochs=0, max_steps=5)  # max_steps decides
    DPOConfig(output_dir=str(tmp_path), max_prompt_length=None, learning_rate=0.0)


@pytest.mark.parametrize(("options", "named"), [
    (dict(cliprange=-0.1), "cliprange"), (dict(learning_rate=-1.0), "learning_rate"),
    (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps"), (dict(total_steps=0), "total_steps"),
])
def test_ppo_config_names_bad_values(options, named):
    with pytest.raises(ValueError, match=named):
        PPOConfig(batch_size=2, mini_batch_size=1, **options)
