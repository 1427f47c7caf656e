"""Knowledge distillation from a teacher: GKDTrainer (TRL's experimental GKD) and DistillationTrainer (TRL 1.16's
on-policy distillation). One optimizer step, per process:

    1. complete   each micro-batch's prompts get their completions before the step's first backward pass: with
                  probability lmbda sampled from the student (on-policy), else the dataset's own completions, or
                  with seq_kd sampled from the teacher (`rollout.sampling.sample_groups`, one completion per
                  prompt; DistillationTrainer always samples from the student, with vLLM if asked)
    2. count      the step's completion tokens, over all micro-batches and processes, normalise the loss
    3. diverge    both models read prompt + completion; the generalized JSD (losses/distill.py, Agarwal et al.,
                  2024, eq. 2) between the teacher's and the student's next-token distributions at every completion
                  token, computed from the final hidden states and LM heads a chunk of tokens at a time
    4. update     loss = sum of the per-token divergences / the step's token count (TRL's reduction)

Completing inside `get_batch_samples` (before the count) keeps gradient accumulation exact when a sampled
completion is longer or shorter than the dataset's. Which source a micro-batch uses and the sampling noise are
drawn from generators seeded by (seed, optimizer step, micro-batch[, process]), not from the global streams, so a
run is reproducible and a resumed run samples exactly what the uninterrupted one did.

Shapes: b = sequences, q = prompt tokens, t = sequence tokens, n = completion tokens in the batch.
"""

from __future__ import annotations

import collections
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data import prepare_prompts
from ..data.collate import LanguageModelingCollator, _example_loss_mask, pad_with_mask
from ..data.formats import DatasetError, is_stream
from ..data.prepare import as_messages, map_rows, sample_of
from ..distributed import prepare_frozen_model, unwrap_model_for_generation
from ..losses.distill import generalized_jsd, linear_generalized_jsd
from ..models.forward import _head_inputs, _logits, _model_inputs, _targets, splittable_head, unwrap_model
from ..models.loading import is_encoder_decoder, load_language_model
from ..models.reference import freeze
from ..ops.logprobs import entropy_from_logits, linear_entropy
from ..rollout.generation import eos_token_ids
from ..rollout.sampling import SampledGroups, sample_groups, sampling_settings
from ..rollout.vllm_generation import require_vllm, vllm_sampler
from .base import TetherTrainer, as_config
from .completion_log import completions_table
from .gkd_config import DistillationConfig, GKDConfig
from .sft import SFTTrainer


# ----- data -------------------------------------------------------------------------------------------------------
def last_turn_as_completion(dataset: Any, what: str, num_proc: int | None = None) -> Any:
    """Conversations (`messages`, or ShareGPT `conversations`) -> prompt-completion rows: the last turn, which
    must be the assistant's, is the completion and the turns before it the prompt (as TRL's GKD collator splits
    them). Prompt-completion rows pass; plain text, which has no prompt to complete, is a DatasetError."""
    import datasets

    if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        return dataset  # a torch dataset of tokenized rows: its loss mask says where the completion starts
    dataset, sample = as_messages(dataset, sample_of(dataset, what), num_proc)
    columns = sample.column_names
    if "messages" in columns and "prompt" not in columns:
        def split(row: dict[str, Any], index: int) -> dict[str, Any]:
            turns = row["messages"]
            if not isinstance(turns, list) or len(turns) < 2 or not isinstance(turns[-1], dict) \
                    or turns[-1].get("role") != "assistant":
                raise DatasetError(f"Row {index} of the {what} dataset, column 'messages': GKD completes the "
                                   "conversation's last turn, which must be the assistant's, after at least one "
                                   "earlier turn. Fix: end each conversation with an assistant turn, or drop such "
                                   "rows.")
            return {"prompt": turns[:-1], "completion": [turns[-1]]}

        return map_rows(dataset, split, columns=["messages"], num_proc=num_proc, with_indices=True,
                        desc=f"Splitting the {what} conversations")
    if "prompt" not in columns and "input_ids" not in columns:
        raise DatasetError(f"The {what} dataset has columns {sorted(columns)}, but GKD needs prompts to complete: "
                           "prompt-completion rows ('prompt' and 'completion') or conversations ('messages', the "
                           "last turn the assistant's). Fix: split your texts into prompt and completion.")
    return dataset


def _prompt_part(example: dict[str, Any]) -> list[int]:
    """The tokens of a tokenized example before its first loss-masked token (its prompt)."""
    ids = list(example["input_ids"])
    mask = _example_loss_mask(example, ids)
    start = next((j for j in range(1, len(ids)) if mask[j]), None)
    if start is None:
        raise DatasetError("A row has no completion token (its loss mask is empty after the first token), so there "
                           "is no prompt/completion boundary to complete from. Fix: drop such rows.")
    return ids[:start]


@dataclass
class PromptCollator:
    """Batches for distillation: `sequences` (a causal LM collator) collates the examples' tokenized sequences,
    if any, and `prompts` [b, q] (left-padded) with `prompt_attention_mask` [b, q] hold each example's prompt: its
    `prompt_input_ids`, or the tokens before its first loss-masked token."""

    pad_token_id: int
    sequences: Callable | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.sequences(examples) if self.sequences is not None and "input_ids" in examples[0] else {}
        prompts = [list(e["prompt_input_ids"]) if "prompt_input_ids" in e else _prompt_part(e) for e in examples]
        batch["prompts"], mask = pad_with_mask(prompts, self.pad_token_id, left=True)
        batch["prompt_attention_mask"] = mask.long()
        return batch


def _prompt_lists(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Each row's prompt ids, from `prompts` + `prompt_attention_mask` (TRL's collator keys), or, for a collator
    that gives none, the tokens of each row before its first loss-masked one."""
    if "prompts" in batch:
        return [row[mask.bool()].tolist() for row, mask in zip(batch["prompts"], batch["prompt_attention_mask"])]
    if "attention_mask" not in batch:
        raise ValueError("The batch has no `prompts` and is padding-free, so the prompts cannot be told apart. Fix: "
                         "use GKDTrainer's default collator, or give `prompts` and `prompt_attention_mask`.")
    rows = []
    for ids, mask, counts in zip(batch["input_ids"], batch["attention_mask"].bool(), batch["loss_mask"].bool()):
        rows.append(_prompt_part({"input_ids": ids[mask].tolist(), "loss_mask": counts[mask].tolist()}))
    return rows


def _seeded_generator(key: str, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(random.Random(key).getrandbits(63))


# ----- what both trainers share -----------------------------------------------------------------------------------
class _Distillation:
    """The teacher, the completion step and the loss; mixed into GKDTrainer and DistillationTrainer (TetherTrainer
    subclasses). A subclass sets lmbda / seq_kd / beta / temperature and `_generation_options`."""

    lmbda: float = 1.0
    seq_kd: bool = False
    loss_temperature: float = 1.0
    log_entropy = False
    _vllm: Any = None

    @staticmethod
    def _require_teacher(teacher_model: Any, args: Any, name: str) -> None:
        if teacher_model is None and args.teacher_model_name_or_path is None:
            raise ValueError(f"{name} needs a teacher: pass teacher_model= (a model, or a hub id / local folder) or set "
                             f"{type(args).__name__}.teacher_model_name_or_path.")

    def _set_up_teacher(self, teacher_model: nn.Module | str | None) -> None:
        """Load (by name or path, with teacher_model_init_kwargs), check, freeze and place the teacher as a reference
        model is placed: evaluated only, never wrapped for training."""
        args = self.args
        teacher_model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        if isinstance(teacher_model, str):
            kwargs = self.model_loading_kwargs(args.teacher_model_init_kwargs)
            if getattr(args, "teacher_model_revision", None) is not None:
                kwargs.setdefault("revision", args.teacher_model_revision)
            teacher_model = load_language_model(teacher_model, **kwargs)
        elif args.teacher_model_init_kwargs:
            raise ValueError("teacher_model_init_kwargs applies to a teacher given by name or path; this teacher is "
                             "already loaded. Fix: drop teacher_model_init_kwargs, or pass the teacher's name or path.")
        if is_encoder_decoder(teacher_model) or is_encoder_decoder(self.model):
            raise ValueError(f"{type(self).__name__} distills decoder-only language models; got an encoder-decoder.")
        trainable = {id(p) for p in self.model.parameters() if p.requires_grad}
        if any(id(p) in trainable for p in teacher_model.parameters()):
            raise ValueError("teacher_model is the student itself (or shares its weights); pass a separate model.")
        student_vocab, teacher_vocab = _vocabulary(self.model), _vocabulary(teacher_model)
        if teacher_vocab < student_vocab:
            raise ValueError(f"The teacher's vocabulary ({teacher_vocab} tokens) is smaller than the student's "
                             f"({student_vocab}): the divergence compares distributions over the same tokens. Fix: "
                             "use a teacher with the student's tokenizer.")
        # A teacher head padded past the student's vocabulary is cut to it; sampling never draws the extra ids.
        self._teacher_only_ids = list(range(student_vocab, teacher_vocab))
        self.teacher_model = prepare_frozen_model(self.accelerator, freeze(teacher_model))
        self._eos_ids = sorted({self.processing_class.eos_token_id, *eos_token_ids(self.model)} - {None})
        self._completion_log: collections.deque = collections.deque(
            maxlen=args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size)
        self._eval_batches = 0

    def _generation_options(self) -> tuple[dict[str, Any], int, dict[str, Any] | None]:
        """(sampling settings by name, max new tokens, generation_kwargs over them)."""
        raise NotImplementedError

    # ----- 1. complete ------------------------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device
                          ) -> tuple[list[dict[str, Any]], torch.Tensor | None]:
        """The step's micro-batches with their completions, and their global count of completion tokens."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.model.train()  # Trainer does so next anyway; metrics recorded while completing are training ones
        batches = [self._complete(batch, i, training=True) for i, batch in enumerate(batches)]
        return batches, self._get_num_items_in_batch(batches, device)

    def _completion_source(self, micro: int) -> str | None:
        """"student", "teacher" or None (the dataset's) for micro-batch `micro` of this step: the same on every
        process (a ZeRO-3 gather for generation is collective)."""
        coin = random.Random(f"{self.args.seed}/source/{self.state.global_step}/{micro}").random()
        if coin < self.lmbda:
            return "student"
        return "teacher" if self.seq_kd else None

    def _complete(self, batch: dict[str, Any], micro: int, training: bool) -> dict[str, Any]:
        source = self._completion_source(micro) if training else "student"
        if source is None:
            return batch
        prompts = _prompt_lists(batch)
        phase = "train" if training else "eval"
        stream = f"{self.args.seed}/{phase}/{self.state.global_step}/{micro}/{self.args.process_index}"
        generator = _seeded_generator(stream, self.accelerator.device)
        model = self.model_wrapped if source == "student" else self.teacher_model
        with unwrap_model_for_generation(model, self.accelerator) as unwrapped:
            sampled = self._sample(unwrapped, prompts, generator, teacher=source == "teacher")
        self._record_completions(prompts, sampled)
        lengths = sampled.completion_mask.sum(-1).tolist()
        rows = [{"input_ids": p + ids[:m].tolist(), "loss_mask": [False] * len(p) + [True] * m}
                for p, ids, m in zip(prompts, sampled.completion_ids, lengths)]
        collated = self._sequence_collator(rows)
        return {name: value.to(self.accelerator.device) for name, value in collated.items()}

    def _sample(self, model: nn.Module, prompts: list[list[int]], generator: torch.Generator, teacher: bool
                ) -> SampledGroups:
        named, max_new_tokens, generation_kwargs = self._generation_options()
        pad_id = self.processing_class.pad_token_id
        if self._vllm is not None and not teacher:  # vLLM takes generation_kwargs as SamplingParams
            self._vllm.sync(model, self.state.global_step)
            return self._vllm(prompts, 1, max_new_tokens, pad_id, self._eos_ids, **named,
                              generation_kwargs=generation_kwargs)
        settings = sampling_settings(generation_kwargs, **named, max_new_tokens=max_new_tokens,
                                     eos_token_ids=self._eos_ids)
        if teacher and self._teacher_only_ids:
            settings["suppress_tokens"] = [*settings.get("suppress_tokens", []), *self._teacher_only_ids]
        return sample_groups(model, prompts, 1, pad_token_id=pad_id, generator=generator, **settings)

    @property
    def _sequence_collator(self) -> LanguageModelingCollator:
        return LanguageModelingCollator(self.processing_class.pad_token_id,
                                        flatten=bool(getattr(self.args, "padding_free", False)),
                                        pad_to_multiple_of=self.args.pad_to_multiple_of)

    def _record_completions(self, prompts: list[list[int]], sampled: SampledGroups) -> None:
        """TRL's completion metrics, and the rows of the log_completions table."""
        lengths = sampled.completion_mask.sum(-1).float()  # [b]
        ended = lengths[~sampled.truncated.to(lengths.device)]
        nan = float("nan")
        self.record_metrics(**{
            "completions/mean_length": lengths.mean(), "completions/min_length": lengths.min(),
            "completions/max_length": lengths.max(),
            "completions/clipped_ratio": sampled.truncated.float().mean(),
            "completions/mean_terminated_length": ended.mean() if len(ended) else nan,
            "completions/min_terminated_length": ended.min() if len(ended) else nan,
            "completions/max_terminated_length": ended.max() if len(ended) else nan,
        })
        if getattr(self.args, "log_completions", False):
            decode = self.processing_class.batch_decode
            texts = decode([ids[m].tolist() for ids, m in zip(sampled.completion_ids, sampled.completion_mask)],
                           skip_special_tokens=True)
            rows = [{"prompt": p, "completion": c} for p, c in zip(decode(prompts, skip_special_tokens=True), texts)]
            if self.args.world_size > 1:
                from accelerate.utils import gather_object

                rows = gather_object(rows)
            self._completion_log.extend(rows)

    # ----- 3-4. diverge, update ---------------------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor:
        """sum over the completion tokens of JSD_beta(teacher || student) / the step's completion-token count."""
        normalizer = self._token_normalizer(inputs, num_items_in_batch)
        divergence = self.token_divergence(model, inputs)  # [n]
        if self.model.training:
            tokens = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else inputs["input_ids"].numel()
            self._num_tokens_seen += tokens * self.args.world_size
        loss = divergence.sum() / normalizer
        return (loss, None) if return_outputs else loss

    def token_divergence(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """JSD_beta(teacher || student) at every loss-masked token of `batch`, [n] (differentiable in the student),
        at `loss_temperature`. Models whose LM head is a plain linear layer: from their final hidden states, in
        chunks of `logprob_chunk_size` tokens (`linear_generalized_jsd`); others: from their full logits."""
        rows, positions, _ = _targets(batch)
        student_head, teacher_head = splittable_head(model), splittable_head(self.teacher_model)
        temperature, chunk = self.loss_temperature, self.args.logprob_chunk_size
        # The student's entropy is a metric only, and a second projection onto the vocabulary: on logging steps.
        log_entropy = self.log_entropy and self.logs_this_step()
        entropy = None
        if student_head is not None and teacher_head is not None:
            hidden, _ = _head_inputs(model, batch, student_head, rows, positions)  # [n, h_s]
            with torch.no_grad():
                teacher_hidden, _ = _head_inputs(self.teacher_model, batch, teacher_head, rows, positions)  # [n, h_t]
                if log_entropy:
                    entropy = linear_entropy(hidden.detach(), student_head.weight.detach(), student_head.bias,
                                             temperature, chunk)
            divergence = linear_generalized_jsd(hidden, student_head.weight, teacher_hidden, teacher_head.weight,
                                                student_head.bias, teacher_head.bias, beta=self.beta,
                                                temperature=temperature, chunk_size=chunk)
        else:  # a head that cannot be applied on its own (soft-capped, wrapped, sharded): the models' logits
            inputs = _model_inputs(batch)
            logits = _logits(model(**inputs, use_cache=False))[rows, positions - 1]  # [n, v]
            with torch.no_grad():
                teacher_logits = _logits(self.teacher_model(**inputs, use_cache=False))[rows, positions - 1]
                if log_entropy:
                    entropy = entropy_from_logits(logits.detach().float() / temperature)
            divergence = generalized_jsd(logits, teacher_logits[:, : logits.shape[-1]], self.beta, temperature)
        if entropy is not None:
            self.record_metrics(entropy=entropy.mean() if entropy.numel() else float("nan"))
        return divergence

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(logs, start_time)
        if getattr(self.args, "log_completions", False) and self.accelerator.is_main_process and self._completion_log:
            print(completions_table(list(self._completion_log), self.state.global_step,
                                    self.args.num_completions_to_print, self.args.log_unique_prompts))


def _vocabulary(model: nn.Module) -> int:
    """Rows of the model's LM head (its vocabulary, padding rows included)."""
    head = unwrap_model(model).get_output_embeddings()
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] > 0:
        return int(weight.shape[0])
    return int(unwrap_model(model).config.get_text_config().vocab_size)


# ----- the trainers ------------------------------------------------------------------------------------------------
class GKDTrainer(_Distillation, SFTTrainer):
    """Generalized Knowledge Distillation: `GKDTrainer(model, teacher_model, args=GKDConfig(...),
    train_dataset=..., processing_class=...)`, as TRL's experimental GKDTrainer.

    train_dataset: prompt-completion rows (plain or conversational) or conversations (`messages`, whose last turn,
    the assistant's, is the completion); tokenized rows whose loss mask marks the completion work too. See GKDConfig
    for lmbda, seq_kd, beta and temperature. The loss is the generalized JSD at the models' own temperature (1), as
    in TRL; temperature only samples."""

    config_class = GKDConfig
    config_suffix = "GKD"

    def __init__(self, model: nn.Module | str | None = None, teacher_model: nn.Module | str | None = None,
                 args: GKDConfig | None = None, data_collator: Callable | None = None, train_dataset: Any = None,
                 eval_dataset: Any = None, processing_class: Any = None, compute_metrics: Callable | None = None,
                 callbacks: list | None = None, optimizers: tuple = (None, None),
                 preprocess_logits_for_metrics: Callable | None = None, peft_config: Any = None,
                 formatting_func: Callable | None = None) -> None:
        args = as_config(GKDConfig, args, "model" if model is None else model, self.config_suffix)
        self._require_teacher(teacher_model, args, "GKDTrainer")
        if formatting_func is not None:
            raise ValueError("GKDTrainer takes no formatting_func: a row formatted into one text loses the prompt the "
                             "student completes. Fix: map your rows to 'prompt' and 'completion' columns first.")
        super().__init__(model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, compute_metrics=compute_metrics,
                         callbacks=callbacks, optimizers=optimizers, peft_config=peft_config,
                         preprocess_logits_for_metrics=preprocess_logits_for_metrics)
        self.lmbda, self.beta, self.temperature, self.seq_kd = args.lmbda, args.beta, args.temperature, args.seq_kd
        self._set_up_teacher(teacher_model)

    def _generation_options(self) -> tuple[dict[str, Any], int, dict[str, Any] | None]:
        return {"temperature": self.args.temperature}, self.args.max_new_tokens, None  # TRL: top_k 0, top_p 1

    def _prepare(self, dataset: Any, what: str) -> Any:
        if not (self.args.dataset_kwargs or {}).get("skip_prepare_dataset", False):
            dataset = last_turn_as_completion(dataset, what, self.args.dataset_num_proc)
        return super()._prepare(dataset, what)

    def _default_collator(self) -> Callable:
        return PromptCollator(self.processing_class.pad_token_id, super()._default_collator())


class DistillationTrainer(_Distillation, TetherTrainer):
    """On-policy distillation, as TRL 1.16's top-level DistillationTrainer: `DistillationTrainer(model,
    teacher_model, args=DistillationConfig(...), train_dataset=prompts)`. Every completion is sampled from the
    student (with vLLM when use_vllm) and the loss is the generalized JSD at `temperature`."""

    config_class = DistillationConfig
    config_suffix = "Distillation"
    dataset_description = "prompts (a 'prompt' column)"
    loss_is_scaled_for_ga = True  # the loss divides by the step's global token count itself
    log_entropy = True

    def __init__(self, model: nn.Module | str, teacher_model: nn.Module | str | None = None,
                 args: DistillationConfig | None = None, train_dataset: Any = None, eval_dataset: Any = None,
                 processing_class: Any = None, callbacks: list | None = None, optimizers: tuple = (None, None),
                 quantization_config: Any = None, peft_config: Any = None, tools: list[Callable] | None = None) -> None:
        args = as_config(DistillationConfig, args, model, self.config_suffix)
        self._require_teacher(teacher_model, args, "DistillationTrainer")
        if tools:
            raise ValueError("DistillationTrainer(tools=...): tether has no tool calling yet (issue 16). Fix: drop "
                             "tools.")
        if args.use_vllm and args.vllm_mode == "colocate":
            require_vllm()
            if not torch.cuda.is_available():
                raise ValueError("use_vllm=True with vllm_mode='colocate' needs a CUDA GPU; on this machine leave "
                                 "use_vllm=False, or run `tether vllm-serve` and set vllm_mode='server'.")
        self._num_tokens_seen = 0
        super().__init__(model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, callbacks=callbacks, optimizers=optimizers,
                         peft_config=peft_config, quantization_config=quantization_config)
        self.beta, self.temperature, self.loss_temperature = args.beta, args.temperature, args.temperature
        self._set_up_teacher(teacher_model)
        self._vllm = self._vllm_sampler(model) if args.use_vllm else None

    def _vllm_sampler(self, model: nn.Module | str) -> Any:
        source = model if isinstance(model, str) else self.model.config._name_or_path
        return vllm_sampler(self.args, source, self.args.vllm_max_model_length)

    def _generation_options(self) -> tuple[dict[str, Any], int, dict[str, Any] | None]:
        a = self.args
        named = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p or 0.0,
                     repetition_penalty=a.repetition_penalty)
        return named, a.max_completion_length, a.generation_kwargs

    def _prepare(self, dataset: Any, what: str) -> Any:
        if is_stream(dataset) and what == "train" and self.args.shuffle_dataset:
            dataset = dataset.shuffle(seed=self.args.seed)  # a stream's rows through a seeded buffer, as TRL
        return prepare_prompts(dataset, self.processing_class, num_proc=self.args.dataset_num_proc, what=what,
                               chat_template_kwargs=self.args.chat_template_kwargs)

    def _default_collator(self) -> Callable:
        return PromptCollator(self.processing_class.pad_token_id)

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if self.args.shuffle_dataset:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return None if is_stream(dataset) else torch.utils.data.SequentialSampler(dataset)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
                      ) -> torch.Tensor:
        """Trainer's step, timed: `step_time` is the seconds of an optimizer step's forward and backward passes."""
        started = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_time = getattr(self, "_step_time", 0.0) + time.perf_counter() - started
        if self.accelerator.sync_gradients:
            self.record_metrics(step_time=self._step_time)
            self._step_time = 0.0
        return loss

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[torch.Tensor, None, None]:
        """Evaluation: the student completes the eval prompts; the loss (eval_loss) is their divergence."""
        inputs = self._complete(self._prepare_inputs(inputs), self._eval_batches, training=False)
        self._eval_batches += 1
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            logs["num_tokens"] = float(self._num_tokens_seen)
        super().log(logs, start_time)
