"""`PPOTrainer.train()`: the whole RLHF loop for users who do not want to write it.

rollout (sample responses to a batch of prompts) -> score (reward functions and/or reward models, with
the dataset's other columns) -> `step()` -> log to output_dir/metrics.jsonl -> checkpoint every
`save_steps` (atomically) -> save the final model. PPO-ptx mixes a language-model loss on pretraining
text into each update.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..data import LanguageModelingCollator, prepare_language_modeling, prepare_prompts
from ..models.value_head import VALUE_HEAD_FILE
from .checkpoints import atomic_directory, latest_checkpoint


class PPOTrainLoop:
    """The `train()` half of PPOTrainer (the `step()` half is in ppo.py)."""

    def _ptx_iterator(self, dataset: Any) -> Iterator[dict[str, torch.Tensor]]:
        """Endless shuffled micro-batches of pretraining text for the PPO-ptx term."""
        rows = prepare_language_modeling(dataset, self.tokenizer, max_length=512)
        micro = self.config.mini_batch_size // self.config.gradient_accumulation_steps
        collate = LanguageModelingCollator(self.tokenizer.pad_token_id)
        loader = torch.utils.data.DataLoader(rows, batch_size=micro, shuffle=True, collate_fn=collate)
        while True:
            for batch in loader:
                yield {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def _prompt_batches(self) -> Iterator[dict[str, list]]:
        if self.dataset is None:
            raise ValueError("train() needs a prompt dataset: PPOTrainer(..., dataset=ds) with a 'prompt' column.")
        prompts = prepare_prompts(self.dataset, self.tokenizer)
        loader = self.accelerator.prepare_data_loader(torch.utils.data.DataLoader(
            prompts, batch_size=self.config.batch_size, shuffle=True, drop_last=True,
            collate_fn=lambda rows: {k: [r[k] for r in rows] for k in rows[0]}))
        if len(loader) == 0:
            raise ValueError(f"The prompt dataset has fewer rows ({len(prompts)}) than batch_size "
                             f"({self.config.batch_size}) x processes.")
        while True:
            yield from loader

    def train(self, resume_from_checkpoint: str | bool | None = None) -> list[dict[str, float]]:
        """Rollout -> score -> PPO step, `config.total_steps` times, logging to output_dir/metrics.jsonl
        and checkpointing every `save_steps`; returns the logged rows."""
        config = self.config
        if self.rewards is None:
            raise ValueError("train() needs reward_funcs=: a function f(prompts, completions, **columns), a "
                             "reward model, or a path to one (or a list of them).")
        os.makedirs(config.output_dir, exist_ok=True)
        if resume_from_checkpoint:
            self._load_checkpoint(resume_from_checkpoint)
        batches, history = self._prompt_batches(), []
        for _ in range(self.current_step):  # the same prompts as an uninterrupted run would see next
            next(batches)
        while self.current_step < config.total_steps:
            rows = next(batches)
            queries = [torch.tensor(ids) for ids in rows["prompt_input_ids"]]
            t = time.perf_counter()
            responses = self.generate(queries, return_prompt=False, max_new_tokens=config.max_new_tokens,
                                      do_sample=True, temperature=config.temperature, top_k=config.top_k,
                                      top_p=config.top_p)
            generation_s, t = time.perf_counter() - t, time.perf_counter()
            completions = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
            columns = {k: v for k, v in rows.items() if k not in ("prompt", "prompt_input_ids")}
            scores, per_function = self.rewards.score(rows["prompt"], completions, **columns)
            if config.missing_eos_penalty is not None:
                ended = torch.tensor([r[-1].item() == self.tokenizer.eos_token_id for r in responses])
                scores = scores - config.missing_eos_penalty * (~ended).float()
            scoring_s = time.perf_counter() - t
            stats = self.step(queries, responses, list(scores))
            logs = {k: float(v) for k, v in stats.items() if np.ndim(v) == 0}
            logs.update({"step": self.current_step, "env/reward_mean": float(self.accelerator.reduce(
                scores.to(self.accelerator.device), "mean").mean()), "time/generation": generation_s,
                "time/scoring": scoring_s})
            logs.update({f"rewards/{name}": float(v.mean()) for name, v in per_function.items()})
            history.append(logs)
            if self.accelerator.is_main_process:
                with open(os.path.join(config.output_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
                    f.write(json.dumps(logs) + "\n")
                if self.current_step % config.logging_steps == 0:
                    print(f"step {self.current_step}/{config.total_steps}: reward {logs['env/reward_mean']:.3f} "
                          f"kl {logs['objective/kl']:.3f} kl_coef {logs['objective/kl_coef']:.3f}")
            if config.save_steps and self.current_step % config.save_steps == 0:
                self._save_checkpoint()
        self.save_pretrained(config.output_dir)
        return history

    # ----- checkpoints: written to a temporary folder, then renamed, so none is ever half-written -------
    def _save_checkpoint(self) -> str:
        path = os.path.join(self.config.output_dir, f"checkpoint-{self.current_step}")
        if self.accelerator.is_main_process:
            with atomic_directory(path) as partial:
                self.save_pretrained(partial)
                torch.save({"optimizer": self.optimizer.state_dict(), "rng": torch.get_rng_state()},
                           os.path.join(partial, "trainer_state.pt"))
                with open(os.path.join(partial, "ppo_state.json"), "w", encoding="utf-8") as f:
                    json.dump({"step": self.current_step, "kl_ctl": self.kl_ctl.state_dict()}, f)
        return path

    def _load_checkpoint(self, checkpoint: str | bool) -> None:
        if checkpoint is True:
            checkpoint = latest_checkpoint(self.config.output_dir)
            if checkpoint is None:
                raise ValueError(f"No checkpoint to resume from in {self.config.output_dir}.")
        model = self.accelerator.unwrap_model(self.model)
        restored = type(model).from_pretrained(checkpoint) if not self.is_peft_model else None
        if restored is not None:
            model.load_state_dict(restored.state_dict())
        else:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model.pretrained_model, load_file(os.path.join(checkpoint,
                                                                                     "adapter_model.safetensors")))
            model.v_head.load_state_dict(load_file(os.path.join(checkpoint, VALUE_HEAD_FILE)))
        if self.critic is not None:
            from safetensors.torch import load_file

            critic = self.accelerator.unwrap_model(self.critic)
            critic.load_state_dict(load_file(os.path.join(checkpoint, "critic", "model.safetensors")))
        state = torch.load(os.path.join(checkpoint, "trainer_state.pt"), weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        with open(os.path.join(checkpoint, "ppo_state.json"), encoding="utf-8") as f:
            ppo_state = json.load(f)
        self.current_step = ppo_state["step"]
        self.kl_ctl.load_state_dict(ppo_state["kl_ctl"])
