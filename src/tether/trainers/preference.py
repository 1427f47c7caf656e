"""What the pairwise preference trainers (DPO, CPO/SimPO, ORPO) share: the config fields, preference data
through data/, and one concatenated forward pass giving each completion's log-prob."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data.collate import IGNORE_INDEX
from ..data.preference import PairBatch, PreferenceCollator, prepare_preference
from ..losses.preference import length_desensitised_log_probs
from ..models.forward import TokenLogProbs, causal_token_log_probs
from ..models.loading import is_encoder_decoder
from ..ops.logprobs import DEFAULT_CHUNK_SIZE
from ..reports.callback import generate_samples
from .base import TetherConfig, TetherTrainer

EVAL_SAMPLES = 4  # generate_during_eval: prompts completed at each evaluation
EVAL_SAMPLE_TOKENS = 48  # and their new tokens, unless max_completion_length is set


@dataclass
class PairwiseConfig(TetherConfig):
    """Fields common to the pairwise preference methods."""

    beta: float = field(default=0.1, metadata={"help": "Strength of the preference term (the method's beta)."})
    max_length: int | None = field(default=1024, metadata={"help": "Truncate prompt+completion to this many "
                                                                     "tokens."})
    max_prompt_length: int | None = field(default=512, metadata={"help": "Keep the last this many prompt "
                                                                           "tokens."})
    max_completion_length: int | None = field(default=None, metadata={
        "help": "Keep the first this many tokens of each completion (None: only max_length limits it)."})
    disable_dropout: bool = field(default=True, metadata={"help": "Turn dropout off in the model(s)."})
    padding_free: bool | None = field(default=None, metadata={
        "help": "Pack each batch's sequences into rows of max_length (position_ids, no padding) instead of "
                "padding them; None: on for transformers' own decoder models."})
    logprob_chunk_size: int = field(default=DEFAULT_CHUNK_SIZE, metadata={"help": "Tokens per chunk of the "
                                                                                    "vocabulary projection."})
    learning_rate: float = field(default=1e-6, metadata={"help": "Initial AdamW learning rate."})
    padding_value: int | None = field(
        default=None, metadata={"help": "Token id written in the padding of input batches (default: the tokenizer's "
                                        "pad id). Padding is masked, so it changes no loss."})
    is_encoder_decoder: bool | None = field(
        default=None, metadata={"help": "Whether the model is an encoder-decoder; read from the model, so it needs "
                                        "no setting; when given, it must agree with the model. The preference "
                                        "trainers here train decoder-only models."})
    generate_during_eval: bool = field(
        default=False, metadata={"help": "At each evaluation, write greedy completions of a few eval prompts by the "
                                         "policy (and by the reference, for methods with one) to "
                                         "output_dir/samples.jsonl (shown in the run report)."})

    def __post_init__(self) -> None:
        if self.padding_value is not None and (isinstance(self.padding_value, bool)
                                               or not isinstance(self.padding_value, int)):
            raise ValueError(f"padding_value must be an integer token id, got {self.padding_value!r}.")
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be at least 1 (or None), got {self.max_completion_length}.")
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}.")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be at least 1 token (or None: no limit), got "
                             f"{self.max_prompt_length}.")
        if self.max_length is not None and self.max_prompt_length is not None and (
                self.max_prompt_length >= self.max_length):
            # As in TRL, not an error (e.g. DPOConfig(max_length=512) keeps the default max_prompt_length=512):
            # only prompts that long lose their completion, and data preparation drops those rows, saying how many.
            warnings.warn(f"max_prompt_length ({self.max_prompt_length}) >= max_length ({self.max_length}): a prompt "
                          "of max_prompt_length tokens leaves no room for its completion; such pairs are dropped "
                          "when the data is prepared. Lower max_prompt_length to keep them.", UserWarning,
                          stacklevel=3)
        super().__post_init__()


class PairwiseTrainer(TetherTrainer):
    """Base of DPOTrainer, CPOTrainer and ORPOTrainer; subclasses define `compute_loss`, and return the
    implicit rewards as {"chosen_rewards", "rejected_rewards"} ([b] each) when asked for outputs, which
    evaluation hands to compute_metrics (see `prediction_step`).

    `padding_value`, `is_encoder_decoder` and `generate_during_eval` are PairwiseConfig fields, so DPO, CPO and
    ORPO share them; `truncation_mode` and `label_pad_token_id` are DPOConfig's, and a config without them gets
    their defaults here.
    """

    config_class: type[PairwiseConfig] = PairwiseConfig
    config_suffix = "Pairwise"
    dataset_description = "preference pairs (prompt/chosen/rejected)"
    _warned_no_predictions = False

    def _load(self, model: nn.Module | str, args: Any) -> nn.Module:
        model = super()._load(model, args)
        declared, actual = getattr(args, "is_encoder_decoder", None), is_encoder_decoder(model)
        if declared is not None and bool(declared) != actual:
            raise ValueError(f"is_encoder_decoder={declared} but the model ({type(model).__name__}) is "
                             f"{'an encoder-decoder' if actual else 'decoder-only'}. Fix: drop is_encoder_decoder "
                             "(it is read from the model) or pass the model it describes.")
        if actual:
            raise ValueError(f"{type(self).__name__} trains decoder-only (causal) language models; "
                             f"{type(model).__name__} is an encoder-decoder. Fix: use a causal LM.")
        return model

    @property
    def padding_value(self) -> int:
        """The id written in the padding of input batches: the config's `padding_value`, else the tokenizer's."""
        value = getattr(self.args, "padding_value", None)
        return self.processing_class.pad_token_id if value is None else value

    def _default_collator(self) -> Callable:
        return PreferenceCollator(self.padding_value, pack_to=self._packing_length(),
                                  pad_to_multiple_of=self.args.pad_to_multiple_of)

    def _adapt_collator(self, data_collator: Callable) -> Callable:
        # A collator written for TRL's rows returns labels with label_pad_token_id where nothing counts.
        return PairBatch(data_collator, self.padding_value, getattr(self.args, "label_pad_token_id", IGNORE_INDEX))

    def _prepare(self, dataset: Any, what: str) -> Any:
        label_pad = getattr(self.args, "label_pad_token_id", IGNORE_INDEX) if self._custom_collator else None
        return prepare_preference(dataset, self.processing_class, max_length=self.args.max_length,
                                  max_prompt_length=self.args.max_prompt_length,
                                  max_completion_length=self.args.max_completion_length,
                                  truncation_mode=getattr(self.args, "truncation_mode", "keep_end"),
                                  label_pad_token_id=label_pad, num_proc=self.args.dataset_num_proc, what=what)

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(loss, predictions, labels): predictions are the implicit rewards [b, 2] (chosen, rejected) of each
        pair and labels zeros [b] (column 0 is the preferred one), so `compute_accuracy` and
        `preprocess_logits_for_metrics` work as for the reward trainer; (loss, None, None) when only the loss is
        wanted or the method returns no rewards."""
        if prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if not outputs or "rejected_rewards" not in outputs:
            if (self.compute_metrics or self.preprocess_logits_for_metrics) and not self._warned_no_predictions:
                warnings.warn(f"{type(self).__name__}'s evaluation gives no predictions, so compute_metrics and "
                              "preprocess_logits_for_metrics are not called.", UserWarning, stacklevel=2)
                self._warned_no_predictions = True
            return loss.detach(), None, None
        rewards = torch.stack([outputs["chosen_rewards"], outputs["rejected_rewards"]], dim=1).detach()  # [b, 2]
        return loss.detach(), rewards, torch.zeros(rewards.shape[0], dtype=torch.long, device=rewards.device)

    def pair_log_probs(self, model: nn.Module, inputs: dict[str, torch.Tensor], ld_alpha: float | None = None,
                       aligned: bool = False) -> dict[str, torch.Tensor]:
        """Chosen and rejected completion log-probs of the [2b, t] batch (chosen rows first), one forward pass;
        see `pair_sequence_log_probs`. With `aligned`, also WPO's inputs "chosen_aligned", "rejected_aligned"
        [b] (detached): per completion, sum_t [log pi(y_t) - log sum_v pi(v)^2], the normaliser coming from
        the same pass (`TokenStats.log_sum_sq`)."""
        logps, tokens = pair_sequence_log_probs(model, inputs, self.args.logprob_chunk_size, ld_alpha,
                                                with_stats=aligned)
        if aligned:
            sums = tokens.sum_per_sequence(tokens.logps.detach() - tokens.stats.log_sum_sq)  # [2b]
            logps["chosen_aligned"], logps["rejected_aligned"] = sums.chunk(2)
        return logps

    # ----- generate_during_eval ----------------------------------------------------------------------------
    def _live_reference(self, model: nn.Module) -> tuple[nn.Module, contextlib.AbstractContextManager] | None:
        """(module, context) that computes as the reference model, or None: the methods without one (CPO,
        ORPO) keep this; DPO overrides it."""
        return None

    def evaluation_loop(self, dataloader: Any, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> Any:
        if getattr(self.args, "generate_during_eval", False):
            self._write_eval_samples(dataloader.dataset, metric_key_prefix)
        return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)

    def _write_eval_samples(self, dataset: Any, split: str) -> None:
        """generate_during_eval: greedy completions of the first few distinct prompts of `dataset`, by the policy
        and (when there is a live one) by the reference, appended to samples.jsonl as {"step", "split", "prompt",
        "completion", "reference_completion"}. Runs on every process (ZeRO-3 generation needs them all)."""
        max_new_tokens = self.args.max_completion_length or EVAL_SAMPLE_TOKENS
        policy = generate_samples(self.model, self.processing_class, dataset, EVAL_SAMPLES, max_new_tokens)
        live = self._live_reference(self.model)
        if live is not None:
            reference, context = live
            with context:
                from_reference = generate_samples(reference, self.processing_class, dataset, EVAL_SAMPLES,
                                                  max_new_tokens)
            for row, ref_row in zip(policy, from_reference):
                row["reference_completion"] = ref_row["completion"]
        self.write_samples([{"split": split, **row} for row in policy])

    def record_pair_metrics(self, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                            logps: dict[str, torch.Tensor], **extra: torch.Tensor | float) -> None:
        self.record_metrics(**{
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": logps["chosen"].detach().mean(),
            "logps/rejected": logps["rejected"].detach().mean(),
        }, **extra)


def pair_sequence_log_probs(model: nn.Module, inputs: dict[str, torch.Tensor], chunk_size: int = DEFAULT_CHUNK_SIZE,
                            ld_alpha: float | None = None, with_stats: bool = False
                            ) -> tuple[dict[str, torch.Tensor], TokenLogProbs]:
    """Completion log-probs of a [2b, t] preference batch (chosen sequences first, padded or packed), from one
    forward pass: "chosen", "rejected" [b] summed log-probs (LD-DPO-weighted with `ld_alpha`, see
    losses.preference.length_desensitised_log_probs), "chosen_unweighted" [b] (the plain sums, for the NLL
    terms), "chosen_tokens", "rejected_tokens" [b] (counts, at least 1); with the per-token log-probs, whose
    `sequences` [n] give each token's sequence (k < b: chosen k; b + k: rejected k), and with `with_stats`
    their TokenStats (WPO's normaliser); no method logs the others."""
    tokens = causal_token_log_probs(model, inputs, chunk_size=chunk_size, with_stats=with_stats)
    sums, num_sequences = tokens.sum_per_sequence(), tokens.num_sequences  # [2b]
    chosen_unweighted = sums.chunk(2)[0]
    if ld_alpha is not None:
        sums = length_desensitised_log_probs(tokens.logps, tokens.sequences, num_sequences // 2, ld_alpha)
    chosen, rejected = sums.chunk(2)
    chosen_tokens, rejected_tokens = tokens.count_per_sequence().clamp(min=1).chunk(2)
    return {"chosen": chosen, "rejected": rejected, "chosen_unweighted": chosen_unweighted,
            "chosen_tokens": chosen_tokens, "rejected_tokens": rejected_tokens}, tokens
