"""PPO with a separate critic initialised from a trained reward model (InstructGPT style), loadable
whether the reward model was saved whole or as a LoRA adapter."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification

from tether import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, RewardConfig, RewardTrainer
from tether.demo.corpus import preference_pairs
from tether.models.loading import load_critic
from tether.models.scoring import sequence_scores


def train_reward_model(tiny_decoder_dir, tokenizer, out, peft_config=None) -> AutoModelForSequenceClassification:
    args = RewardConfig(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                        report_to="none", save_strategy="no", disable_tqdm=True)
    trainer = RewardTrainer(tiny_decoder_dir, args=args, processing_class=tokenizer,
                            train_dataset=Dataset.from_list(preference_pairs(16, seed=3)), peft_config=peft_config)
    trainer.train()
    trainer.save_model()
    return trainer.model


@pytest.mark.parametrize("use_lora", [False, True])
def test_critic_loads_from_reward_checkpoint_either_way(tiny_decoder_dir, tokenizer, tmp_path, use_lora):
    from peft import LoraConfig

    lora = LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS") if use_lora else None
    trained = train_reward_model(tiny_decoder_dir, tokenizer, tmp_path / "rm", lora).eval()
    critic = load_critic(str(tmp_path / "rm")).eval()
    assert not hasattr(critic, "peft_config")  # a LoRA checkpoint is merged into its base
    ids = torch.tensor([tokenizer("the film was great.").input_ids])
    mask = torch.ones_like(ids)
    torch.testing.assert_close(sequence_scores(critic, ids, mask), sequence_scores(trained, ids, mask),
                               atol=1e-5, rtol=1e-5)


def test_ppo_with_a_critic_uses_and_trains_it(tiny_decoder_dir, tokenizer, tmp_path):
    train_reward_model(tiny_decoder_dir, tokenizer, tmp_path / "rm")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir)
    config = PPOConfig(batch_size=4, mini_batch_size=2, learning_rate=1e-3, ppo_epochs=1, output_dir=str(tmp_path))
    trainer = PPOTrainer(config, model, None, tokenizer, critic=str(tmp_path / "rm"))
    critic_before = {k: v.clone() for k, v in trainer.critic.state_dict().items()}
    v_head_before = trainer.model.v_head.summary.weight.clone()
    queries = [torch.tensor(tokenizer(p).input_ids) for p in ["this movie", "the plot", "the film", "the acting"]]
    responses = trainer.generate(queries, return_prompt=False, do_sample=True, max_new_tokens=6)
    stats = trainer.step(queries, responses, [torch.tensor(1.0)] * 4)
    # The values come from the critic: its estimates at step 0 are what the stats report.
    assert torch.isfinite(torch.tensor(stats["ppo/val/mean"]))
    assert any(not torch.equal(critic_before[k], v) for k, v in trainer.critic.state_dict().items())
    assert torch.equal(trainer.model.v_head.summary.weight, v_head_before)  # unused, frozen
    trainer.save_pretrained(str(tmp_path / "out"))
    assert (tmp_path / "out" / "critic" / "model.safetensors").is_file()


def test_train_checkpoints_and_resumes_the_critic(tiny_decoder_dir, tokenizer, tmp_path):
    """train() saves the critic in each checkpoint; resuming restores it with the policy and the step."""
    train_reward_model(tiny_decoder_dir, tokenizer, tmp_path / "rm")
    prompts = Dataset.from_dict({"prompt": ["this movie", "the plot", "the film", "the acting"] * 2})

    def length_reward(prompts, completions, **_):
        return [len(c) / 10 for c in completions]

    def trainer(steps: int) -> PPOTrainer:
        config = PPOConfig(batch_size=4, mini_batch_size=4, learning_rate=1e-3, ppo_epochs=1, total_steps=steps,
                           max_new_tokens=4, save_steps=1, output_dir=str(tmp_path / "run"))
        model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir)
        return PPOTrainer(config, model, None, tokenizer, dataset=prompts, reward_funcs=length_reward,
                          critic=str(tmp_path / "rm"))

    first = trainer(2)
    first.train()
    assert (tmp_path / "run" / "checkpoint-2" / "critic" / "model.safetensors").is_file()
    resumed = trainer(2)
    resumed.train(resume_from_checkpoint=True)  # nothing left to do: it only restores
    assert resumed.current_step == 2
    for (name, a), b in zip(first.critic.state_dict().items(), resumed.critic.state_dict().values()):
        assert torch.equal(a, b), name


def test_reward_model_load_says_when_its_head_is_new(tiny_decoder_dir, tokenizer, tmp_path, caplog):
    """A language model's checkpoint loaded as a reward model: one warning naming the new score head instead
    of transformers' load table; a trained reward model (or LoRA's base, whose adapter brings the head): none."""
    import logging

    from transformers.utils import logging as transformers_logging

    from tether.models.loading import load_reward_model

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    transformers_messages = Keep()
    root = logging.getLogger("transformers")  # does not propagate: caplog would not see its records
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_warning()  # the level at which transformers logs its load table
    root.addHandler(transformers_messages)
    try:
        with caplog.at_level(logging.WARNING, logger="tether.models.loading"):
            load_reward_model(tiny_decoder_dir)
    finally:
        root.removeHandler(transformers_messages)
        transformers_logging.set_verbosity(verbosity)
    warned = [r.getMessage() for r in caplog.records if r.name == "tether.models.loading"]
    assert len(warned) == 1 and "score.weight newly initialised" in warned[0] and tiny_decoder_dir in warned[0]
    assert not [m for m in transformers_messages.messages if "LOAD REPORT" in m]
    train_reward_model(tiny_decoder_dir, tokenizer, tmp_path / "rm")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tether.models.loading"):
        load_reward_model(str(tmp_path / "rm"))
        load_reward_model(tiny_decoder_dir, head_from_adapter=True)
    assert not [r for r in caplog.records if r.name == "tether.models.loading"]
