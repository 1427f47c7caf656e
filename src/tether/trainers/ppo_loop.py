"""`PPOTrainer.train()`: the whole RLHF loop for users who do not want to write it.

rollout (sample responses to a batch of prompts) -> score (reward functions and/or reward models, with
the dataset's other columns) -> `step()` -> log to output_dir/metrics.jsonl -> checkpoint every
`save_steps` (atomically) -> save the final model. PPO-ptx mixes a language-model loss on pretraining
text into each update.

Resuming repeats the uninterrupted run exactly: a checkpoint holds the weights (critic included), the
optimizer (and scheduler), the KL controller, the running score statistics (use_score_scaling), the step,
every process's random state (generation sampling, mini-batch shuffling, dropout, and whatever reward
functions draw) and the position of the prompt and PPO-ptx batch streams, whose order depends on (seed,
epoch) alone. Non-finite weights are never saved: a checkpoint or final save refuses them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import LanguageModelingCollator, collate_columns, prepare_language_modeling, prepare_prompts
from ..data.rounds import ShuffledBatches
from ..distributed import unwrap_model_for_generation
from ..models.value_head import VALUE_HEAD_FILE
from ..reports.page import write_report
from ..reports.runfiles import METRICS_FILE, SAMPLES_FILE, read_jsonl, save_run_config, write_jsonl
from .checkpoints import (
    PARTIAL_SUFFIX,
    atomic_directory,
    latest_checkpoint,
    load_rng_state,
    rng_file,
    save_rng_state,
)
from .episodes import episode_metrics
from .run_identity import check_fresh_output_dir, check_resume, describe_run, new_run_id, write_run_file


class PPOTrainLoop:
    """The `train()` half of PPOTrainer (the `step()` half is in ppo.py)."""

    _run_id: str | None = None  # this run's id, recorded in its checkpoints (see run_identity.py)

    def run_description(self) -> dict[str, dict[str, Any]]:
        """What a checkpoint records of this run and a resumption must match (see run_identity.py)."""
        rows = len(self.dataset) if hasattr(self.dataset, "__len__") else None
        return describe_run(self.config, train_rows=rows, peft=self.is_peft_model)

    def _ptx_iterator(self, dataset: Any) -> ShuffledBatches:
        """Endless shuffled batches of pretraining text for the PPO-ptx term (one per PPO mini-batch)."""
        if dataset is None:
            raise ValueError("ptx_coef > 0 needs ptx_dataset= (language-modeling data for the PPO-ptx term).")
        rows = prepare_language_modeling(dataset, self.tokenizer, max_length=512)
        micro = self.config.mini_batch_size
        collate = LanguageModelingCollator(self.tokenizer.pad_token_id)
        device = self.accelerator.device
        return ShuffledBatches(rows, micro, lambda batch: {k: v.to(device) for k, v in collate(batch).items()},
                               self.config.seed, stream=1, rank=self.accelerator.process_index,
                               world_size=self.accelerator.num_processes, name="ptx_dataset")

    def _prompt_batches(self) -> ShuffledBatches:
        """Endless batches of `batch_size` prompts (per process) as column lists, from shuffled epochs."""
        if self.dataset is None:
            raise ValueError("train() needs a prompt dataset: PPOTrainer(..., dataset=ds) with a 'prompt' column.")
        prompts = prepare_prompts(self.dataset, self.tokenizer, num_proc=self.config.dataset_num_proc)
        return ShuffledBatches(prompts, self.config.batch_size, collate_columns,
                               self.config.seed, stream=0, rank=self.accelerator.process_index,
                               world_size=self.accelerator.num_processes, name="prompt dataset")

    def train(self, resume_from_checkpoint: str | bool | None = None) -> list[dict[str, float]]:
        """Rollout -> score -> PPO step, `config.train_steps` times (total_steps, or ceil(steps / batch_size)), logging to output_dir/metrics.jsonl
        and checkpointing every `save_steps`; returns the logged rows.

        `resume_from_checkpoint`: a checkpoint folder, or True for the latest `checkpoint-N` of
        output_dir. The resumed run then ends exactly as an uninterrupted one would have.
        """
        config = self.config
        if self.rewards is None:
            raise ValueError("train() needs reward_funcs=: a function f(prompts, completions, **columns), a "
                             "reward model, or a path to one (or a list of them).")
        if not resume_from_checkpoint and self._run_id is None:  # a fresh run: the folder must hold no other run
            check_fresh_output_dir(config.output_dir, config.overwrite_output_dir,
                                   main_process=self.accelerator.is_main_process)
            self.accelerator.wait_for_everyone()
            self._run_id = new_run_id()
        os.makedirs(config.output_dir, exist_ok=True)
        self._prompts, history = self._prompt_batches(), []
        if resume_from_checkpoint:
            self._load_checkpoint(resume_from_checkpoint)  # last: it restores the random state too
        from transformers import TrainerState  # here: importing it loads transformers' trainer stack

        progress = tqdm(total=config.train_steps, initial=self.current_step, desc="PPO", unit="step",
                        disable=not self.accelerator.is_main_process)
        while self.current_step < config.train_steps:
            rows = next(self._prompts)
            queries = [torch.tensor(ids) for ids in rows["prompt_input_ids"]]
            columns = {k: v for k, v in rows.items() if k not in ("prompt", "prompt_input_ids")}
            t = time.perf_counter()
            episode_logs: dict[str, float] = {}
            if self.episodes is None:
                masks = None
                responses = self.generate(queries, batch_size=len(queries), return_prompt=False,
                                          max_new_tokens=config.max_new_tokens, do_sample=True,
                                          temperature=config.temperature, top_k=config.top_k, top_p=config.top_p)
                completions = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
            else:
                queries, responses, masks, completions, episode_logs = self._episodes(rows, columns)
            generation_s, t = time.perf_counter() - t, time.perf_counter()
            # TRL's reward-function contract: functions may read the run's progress from trainer_state.
            state = TrainerState(global_step=self.current_step, max_steps=config.train_steps)
            scores, per_function = self.rewards.score(rows["prompt"], completions, trainer_state=state,
                                                      reward_timeout=config.reward_timeout,
                                                      reward_warn_after=config.reward_warn_after, **columns)
            if config.missing_eos_penalty is not None:
                ended = torch.tensor([r[-1].item() == self.tokenizer.eos_token_id for r in responses])
                scores = scores - config.missing_eos_penalty * (~ended).float()
            scoring_s = time.perf_counter() - t
            stats = self.step(queries, responses, list(scores), masks)
            logs = {k: float(v) for k, v in stats.items() if np.ndim(v) == 0}
            logs.update({"step": self.current_step, "env/reward_mean": float(self.accelerator.reduce(
                scores.to(self.accelerator.device), "mean").mean()), "time/generation": generation_s,
                "time/scoring": scoring_s})
            logs.update({f"rewards/{name}": float(v.nanmean()) for name, v in per_function.items()}, **episode_logs)
            history.append(logs)
            if config.log_with is not None:
                self.log_stats(stats, {"query": rows["prompt"], "response": completions}, list(scores))
            progress.update(1)
            progress.set_postfix(reward=f"{logs['env/reward_mean']:.3f}", kl=f"{logs['objective/kl']:.3f}")
            if self.accelerator.is_main_process:
                with open(os.path.join(config.output_dir, METRICS_FILE), "a", encoding="utf-8") as f:
                    f.write(json.dumps(logs) + "\n")
                if self.current_step % config.logging_steps == 0:
                    progress.write(f"step {self.current_step}/{config.train_steps}: reward "
                                   f"{logs['env/reward_mean']:.3f} kl {logs['objective/kl']:.3f} kl_coef "
                                   f"{logs['objective/kl_coef']:.3f}")
                    write_jsonl(os.path.join(config.output_dir, SAMPLES_FILE), [  # a few rollouts, for the report
                        {"step": self.current_step, "prompt": p, "completion": c, "reward": float(r)}
                        for p, c, r in zip(rows["prompt"][:4], completions, scores.tolist())])
            if config.save_steps and self.current_step % config.save_steps == 0:
                self._save_checkpoint()
        progress.close()
        self.save_pretrained(config.output_dir)
        if self.accelerator.is_main_process:  # the report: plots of reward, KL, losses; samples; the config
            save_run_config(config.output_dir, "ppo", dataclasses.asdict(config))
            write_report(config.output_dir)
        return history

    def _episodes(self, rows: dict[str, list[Any]], columns: dict[str, list[Any]]
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[str], dict[str, float]]:
        """One multi-turn episode per prompt (trainers/episodes.py): (queries, responses, masks, texts) for step(),
        and the episodes' per-turn metrics,
        a response being everything after the query and its mask 1 at the model's own tokens (TRL 0.7's
        response_masks). The environment's reward joins `columns` for its reward function."""
        config, eos = self.config, self.tokenizer.eos_token_id
        settings = dict(max_new_tokens=config.max_new_tokens, eos_token_ids=[eos], pad_token_id=self.tokenizer.pad_token_id,
                        temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, min_p=0.0,
                        logprob_temperature=None)
        with unwrap_model_for_generation(self.model, self.accelerator) as policy:
            prompt_ids, episodes = self.episodes.sample(policy, rows, 1, settings, {}, self)
        lengths = episodes.episode_mask.sum(-1).tolist()
        responses = [episodes.completion_ids[i, :n].to(self.accelerator.device) for i, n in enumerate(lengths)]
        masks = [episodes.completion_mask[i, :n].long().to(self.accelerator.device) for i, n in enumerate(lengths)]
        columns.update(episodes.reward_columns())
        texts = episodes.texts(self.tokenizer, [eos])
        queries = [torch.tensor(p, device=self.accelerator.device) for p in prompt_ids]
        return queries, responses, masks, texts, episode_metrics(episodes)

    # ----- checkpoints: written to a temporary folder, then renamed, so none is ever half-written -------
    def _save_checkpoint(self) -> str:
        path = os.path.join(self.config.output_dir, f"checkpoint-{self.current_step}")
        self._check_finite_weights(path)  # NaN or inf weights are never saved: refused before anything is written
        main = self.accelerator.is_main_process
        with atomic_directory(path, writer=main, barrier=self.accelerator.wait_for_everyone) as partial:
            save_rng_state(rng_file(partial, self.accelerator.process_index))  # every process its own
            if main:
                write_run_file(partial, self._run_id or new_run_id(), self.run_description())
                self.save_pretrained(partial)
                state = {"optimizer": self.optimizer.state_dict()}
                if self.lr_scheduler is not None:
                    state["lr_scheduler"] = self.lr_scheduler.state_dict()
                torch.save(state, os.path.join(partial, "trainer_state.pt"))
                data = {"prompts": self._prompts.state_dict()}
                if self._ptx_batches is not None:
                    data["ptx"] = self._ptx_batches.state_dict()
                guard, moments = self.nonfinite_guard, self.running
                with open(os.path.join(partial, "ppo_state.json"), "w", encoding="utf-8") as f:
                    json.dump({"step": self.current_step, "kl_ctl": self.kl_ctl.state_dict(), "data": data,
                               # use_score_scaling's running statistics (floats: exact through JSON)
                               "score_moments": {k: getattr(moments, k) for k in ("mean", "var", "std", "count")},
                               "highest_reward": self.highest_reward,
                               "nonfinite": {"skipped": guard.skipped, "in_a_row": guard.in_a_row,
                                             "optimizer_steps": self._optimizer_steps}}, f)
        return path

    def _load_checkpoint(self, checkpoint: str | bool) -> None:
        if checkpoint is True:
            checkpoint = latest_checkpoint(self.config.output_dir)
            if checkpoint is None:
                raise ValueError(f"No checkpoint-N folder to resume from in {self.config.output_dir}: checkpoints "
                                 "are written every `save_steps` steps (save_steps=0 writes none).")
        if checkpoint.rstrip("/").endswith(PARTIAL_SUFFIX):
            raise ValueError(f"{checkpoint} is a checkpoint the run was still writing when it stopped; resume "
                             "from a complete checkpoint-N folder (resume_from_checkpoint=True picks the latest).")
        if not os.path.isfile(os.path.join(checkpoint, "ppo_state.json")):
            raise ValueError(f"{checkpoint} is not a PPOTrainer.train() checkpoint (no ppo_state.json in it).")
        self._run_id = check_resume(checkpoint, self.run_description())  # before anything is loaded
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
        if self.lr_scheduler is not None and "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        with open(os.path.join(checkpoint, "ppo_state.json"), encoding="utf-8") as f:
            ppo_state = json.load(f)
        self.current_step = ppo_state["step"]
        self.kl_ctl.load_state_dict(ppo_state["kl_ctl"])
        for key, value in ppo_state.get("score_moments", {}).items():
            setattr(self.running, key, value)
        self.highest_reward = ppo_state.get("highest_reward", self.highest_reward)
        nonfinite = ppo_state.get("nonfinite", {})
        self.nonfinite_guard.skipped = nonfinite.get("skipped", 0)
        self.nonfinite_guard.in_a_row = nonfinite.get("in_a_row", 0)
        self._optimizer_steps = nonfinite.get("optimizer_steps", 0)
        self._prompts.load_state_dict(ppo_state["data"]["prompts"], "prompt dataset")
        if self._ptx_batches is not None and "ptx" in ppo_state["data"]:
            self._ptx_batches.load_state_dict(ppo_state["data"]["ptx"], "ptx_dataset")
        self._drop_metrics_after_checkpoint()
        # Last: loading the weights above may have drawn from the random streams (fresh heads).
        load_rng_state(rng_file(checkpoint, self.accelerator.process_index))

    def _drop_metrics_after_checkpoint(self) -> None:
        """The interrupted run may have logged steps after its last checkpoint (and cut its last line
        short); the resumed run logs them again, so metrics.jsonl and samples.jsonl keep one set per step."""
        if not self.accelerator.is_main_process:
            return
        for name in (METRICS_FILE, SAMPLES_FILE):
            path = os.path.join(self.config.output_dir, name)
            if os.path.isfile(path):
                rows = [row for row in read_jsonl(path) if row.get("step", 0) <= self.current_step]
                write_jsonl(path, rows, append=False)
