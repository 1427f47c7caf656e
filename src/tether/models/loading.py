"""Loading models and tokenizers by name, path or object, the same way for every trainer."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _resolve_dtype(value: Any) -> Any:
    if isinstance(value, str) and value != "auto":
        if value not in _DTYPES:
            raise ValueError(f"Unknown dtype {value!r}: use one of {sorted(_DTYPES)} or 'auto'.")
        return _DTYPES[value]
    return value


def _storage_dtype(value: Any) -> Any:
    """bnb_4bit_quant_storage as BitsAndBytesConfig takes it: None (uint8), or a torch dtype."""
    if value == "uint8":
        return torch.uint8
    return _resolve_dtype(value)


def model_init_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Normalise `model_init_kwargs`: remote code stays off unless asked for, `torch_dtype` becomes `dtype`,
    `use_auth_token` becomes `token`,
    and the quantization keys (`load_in_4bit`, `bnb_4bit_quant_type`, ...) become one `quantization_config`
    (see `resolve_quantization`). Normalising twice gives the same result.

    `dtype` defaults to float32, as in TRL: weights are trained in full precision (bf16=True is mixed
    precision over them), where transformers 5's own default ("auto") would keep a bf16 checkpoint in bf16,
    in which small updates to norm weights round away. `dtype="auto"` (or a dtype) asks otherwise."""
    kwargs = dict(kwargs or {})
    if "torch_dtype" in kwargs:
        kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
    if "use_auth_token" in kwargs:  # transformers 4's name, which transformers 5's from_pretrained rejects
        warnings.warn("use_auth_token is deprecated: pass token= (it is used as token here).", FutureWarning,
                      stacklevel=3)
        kwargs.setdefault("token", kwargs.pop("use_auth_token"))
    kwargs["dtype"] = _resolve_dtype(kwargs.get("dtype", torch.float32))
    kwargs.setdefault("trust_remote_code", False)
    return resolve_quantization(kwargs)


def parse_json_kwargs(config: Any, names: Sequence[str] = ()) -> None:
    """Turn each dict field of `config` given as a JSON object string (a command line's or YAML's form) into a dict:
    every `*_init_kwargs` field, and the fields `names`. A value that is none of None, a dict or such a string is a
    ValueError naming the field (an empty string is {})."""
    for f in dataclasses.fields(config):
        if not (f.name.endswith("_init_kwargs") or f.name in names):
            continue
        value = getattr(config, f.name)
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as error:
                raise ValueError(f"{type(config).__name__}.{f.name} must be a dict or a JSON object, got {value!r} "
                                 f"({error}).") from None
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{type(config).__name__}.{f.name} must be a dict or a JSON object ({{...}}), got "
                             f"{value!r}.")
        setattr(config, f.name, value)


def from_pretrained_kwargs(args: Any, init_kwargs: dict[str, Any] | None,
                           quantization_config: Any = None) -> dict[str, Any]:
    """`init_kwargs` (model_init_kwargs-style) completed for loading a model by name or path: the config's
    trust_remote_code unless `init_kwargs` sets its own (TRL's rule: the explicit key in model_init_kwargs
    wins), and the trainer's `quantization_config` keyword (an error if both give one)."""
    kwargs = dict(init_kwargs or {})
    kwargs.setdefault("trust_remote_code", getattr(args, "trust_remote_code", False))
    if quantization_config is not None:
        if any(kwargs.get(key) for key in ("quantization_config", "load_in_4bit", "load_in_8bit")):
            raise ValueError("quantization_config was given both to the trainer and in model_init_kwargs; give it "
                             "once (as the trainer's quantization_config= keyword).")
        kwargs["quantization_config"] = quantization_config
    return kwargs


# ----- quantization (QLoRA) --------------------------------------------------------------------------------
BNB_INSTALL_HINT = ('Fix: pip install bitsandbytes (from a tether checkout: pip install -e ".[quant]"), or drop the '
                    'quantization options (load_in_4bit, load_in_8bit, quantization_config) to load in full precision.')

# Keys of `model_init_kwargs` that describe bitsandbytes quantization, TRL's ModelConfig names included
# (`use_bnb_nested_quant` is TRL's name for `bnb_4bit_use_double_quant`).
FOUR_BIT_KEYS = ("bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant",
                 "use_bnb_nested_quant", "bnb_4bit_quant_storage")
QUANTIZATION_KEYS = ("load_in_4bit", "load_in_8bit", *FOUR_BIT_KEYS)


def require_bitsandbytes(what: str = "Quantized loading") -> None:
    """Raise an ImportError that says how to install bitsandbytes when it cannot be imported.

    Quantization never falls back to full precision silently: a run asked for 4-bit weights would otherwise
    need several times the memory it was planned with.
    """
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ImportError(f"{what} needs bitsandbytes, which is not installed or cannot be imported "
                          f"({error}). {BNB_INSTALL_HINT}") from error


def _is_bnb(quantization_config: Any) -> bool:
    method = (quantization_config.get("quant_method") if isinstance(quantization_config, dict)
              else getattr(quantization_config, "quant_method", None))
    return str(getattr(method, "value", method)) == "bitsandbytes"


def _bnb_config_from_dict(values: dict[str, Any]) -> Any:
    from transformers import BitsAndBytesConfig

    known = set(inspect.signature(BitsAndBytesConfig.__init__).parameters) - {"self", "kwargs"}
    values = {k: v for k, v in values.items() if k != "quant_method"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"quantization_config has unknown key(s) {unknown}; BitsAndBytesConfig takes "
                         f"{sorted(known)}.")
    for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
        if isinstance(values.get(key), str):
            values[key] = _resolve_dtype(values[key]) if values[key] in _DTYPES else values[key]
    return BitsAndBytesConfig(**values)


def resolve_quantization(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` with its quantization keys replaced by one `quantization_config=BitsAndBytesConfig(...)`.

    Accepted, TRL style: `load_in_4bit=True` or `load_in_8bit=True`, with for 4 bits `bnb_4bit_quant_type`
    ("nf4" by default, as in QLoRA), `bnb_4bit_compute_dtype` (default: `dtype` when given, else float32),
    `bnb_4bit_use_double_quant` / `use_bnb_nested_quant` and `bnb_4bit_quant_storage`; or
    `quantization_config` as a `BitsAndBytesConfig` or a dict of its arguments. Other quantization configs
    (GPTQ, torchao, ...) pass through untouched. bitsandbytes must be importable (else an ImportError
    that says how to install it); on a CUDA machine each process loads onto its own GPU (`device_map`).
    """
    kwargs = dict(kwargs)
    flags = {key: kwargs.pop(key) for key in QUANTIZATION_KEYS if key in kwargs}
    config = kwargs.pop("quantization_config", None)
    four_bit, eight_bit = bool(flags.get("load_in_4bit")), bool(flags.get("load_in_8bit"))
    if four_bit and eight_bit:
        raise ValueError("load_in_4bit and load_in_8bit are both set; choose one.")
    if config is not None and (four_bit or eight_bit):
        raise ValueError("Both quantization_config and load_in_4bit/load_in_8bit are set; put everything in "
                         "quantization_config, or use only the load_in_* keys.")
    stray = sorted(key for key in FOUR_BIT_KEYS if key in flags)
    if stray and not four_bit:
        raise ValueError(f"{', '.join(stray)} apply only to 4-bit loading: add load_in_4bit=True "
                         "(CLI: --load_in_4bit) or remove them.")
    if four_bit or eight_bit:
        from transformers import BitsAndBytesConfig

        nested = flags.get("bnb_4bit_use_double_quant", flags.get("use_bnb_nested_quant", False))
        if flags.get("use_bnb_nested_quant", nested) != nested:
            raise ValueError("bnb_4bit_use_double_quant and use_bnb_nested_quant (the same option) disagree.")
        dtype = kwargs.get("dtype")
        compute = flags.get("bnb_4bit_compute_dtype") or (dtype if isinstance(dtype, torch.dtype) else torch.float32)
        config = BitsAndBytesConfig(
            load_in_8bit=eight_bit, load_in_4bit=four_bit, bnb_4bit_quant_type=flags.get("bnb_4bit_quant_type", "nf4"),
            bnb_4bit_compute_dtype=_resolve_dtype(compute), bnb_4bit_use_double_quant=bool(nested),
            bnb_4bit_quant_storage=_storage_dtype(flags.get("bnb_4bit_quant_storage")),
        ) if four_bit else BitsAndBytesConfig(load_in_8bit=True)
    elif isinstance(config, dict) and (_is_bnb(config) or "quant_method" not in config):
        config = _bnb_config_from_dict(config)
    if config is None:
        return kwargs
    if _is_bnb(config):
        require_bitsandbytes()
        if torch.cuda.is_available() and "device_map" not in kwargs:
            # Quantized weights are placed at load time and cannot be moved later; under DDP each process
            # must get its own GPU, not GPU 0 for all.
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    kwargs["quantization_config"] = config
    return kwargs


def is_quantized(model: Any) -> bool:
    """Whether `model` (or the model inside a PEFT or value-head wrapper) holds quantized weights."""
    inner = getattr(model, "pretrained_model", model)
    return bool(getattr(inner, "is_quantized", False))


def check_quantized_for_training(model: Any) -> None:
    """Before training a quantized model: it must carry an adapter (quantized weights cannot be trained;
    QLoRA trains LoRA over them), and its 4-bit layers must keep a layout that backpropagates (see
    `_keep_4bit_layers_differentiable`). Nothing happens for a full-precision model."""
    if not is_quantized(model):
        return
    if not is_peft_model(getattr(model, "pretrained_model", model)):
        raise ValueError("The model is quantized (load_in_4bit / load_in_8bit / quantization_config), and "
                         "quantized weights cannot be trained directly. Fix: train a LoRA adapter over it, "
                         "e.g. peft_config=LoraConfig(target_modules='all-linear', task_type='CAUSAL_LM') "
                         "(CLI: --use_peft), or load the model in full precision.")
    _keep_4bit_layers_differentiable(model)


def _keep_4bit_layers_differentiable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes (0.50) repacking 4-bit weights for CPU inference in a model that will be trained.

    On a CPU with AVX512-BF16, the first eval-mode forward without grad (an evaluation, a generation, DPO's
    reference pass) repacks each Linear4bit's weight in place into a bf16 layout whose matmul has no autograd
    kernel: afterwards no gradient flows back through the frozen base layers, so every adapter below the
    last layer gets a wrong gradient, silently. Training models keep the differentiable layout.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def is_encoder_decoder(model_or_config: Any) -> bool:
    config = getattr(model_or_config, "config", model_or_config)
    return bool(getattr(config, "is_encoder_decoder", False))


# ----- a model given by name: a local folder, or a hub id -------------------------------------------------
def _why_a_local_path(path: str) -> str | None:
    """Why `path`, which does not exist, can only have meant a local path and never a hub id ('name' or
    'namespace/name'), or None when it may be a hub id. A path starts like one (./ ../ / ~ or a drive), has
    more than one separator, or its first part is an existing folder of the working directory (e.g.
    'outputs/sft-modle' next to outputs/) while no hub model of that name is in the local hub cache."""
    seps = [os.sep] + ([os.altsep] if os.altsep else [])
    if os.path.isabs(path) or path.startswith("~") or path in (".", "..") or any(
            path.startswith(dots + sep) for dots in (".", "..") for sep in seps):
        return "it starts like a path (./, ../, / or ~)"
    parts = path.replace(os.altsep, os.sep).split(os.sep) if os.altsep else path.split(os.sep)
    if len(parts) > 2:
        return f"it has {len(parts) - 1} '{os.sep}' (a hub id has at most one)"
    if len(parts) == 2 and os.path.isdir(parts[0]):
        from huggingface_hub.constants import HF_HUB_CACHE

        if not os.path.isdir(os.path.join(HF_HUB_CACHE, f"models--{parts[0]}--{parts[1]}")):
            return f"its first part {parts[0]!r} is a folder of the working directory"
    return None


def _nearest_existing_folder(path: str) -> str | None:
    folder = os.path.dirname(os.path.abspath(path))
    while folder and not os.path.isdir(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent
    return folder or None


def resolve_model_source(name_or_path: Any, what: str = "model") -> Any:
    """`name_or_path` as from_pretrained should get it: an existing local path (with ~ expanded), or a hub id,
    unchanged. A string that can only be a local path (see `_meant_as_local_path`) but does not exist raises a
    FileNotFoundError naming it, where transformers would say "Repo id must be in the form 'repo_name' or
    'namespace/repo_name'". Anything else (a hub id, a model object) comes back as it is. `what` names the
    thing in the message ("model", "tokenizer", "reward model", ...)."""
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path:
        return name_or_path
    expanded = os.path.expanduser(name_or_path)
    if os.path.exists(expanded):
        return expanded
    reason = _why_a_local_path(name_or_path)
    if reason is None:
        return name_or_path  # a hub id: transformers fetches it (or says why it cannot)
    where = os.path.abspath(expanded)
    detail = f" ({where})" if where != name_or_path else ""
    folder = _nearest_existing_folder(expanded)
    if folder is not None:
        missing = os.path.relpath(where, folder).split(os.sep)[0]
        entries = sorted(os.listdir(folder)) if os.access(folder, os.R_OK) else []
        close = difflib.get_close_matches(missing, entries, n=3)
        detail += (f"; the nearest existing folder, {folder}, has no {missing!r}"
                   + (f" (similar names there: {', '.join(close)})" if close else ""))
    raise FileNotFoundError(
        f"{what[:1].upper()}{what[1:]} {name_or_path!r}: no such local folder{detail}. It was read as a local path "
        f"because {reason}; a hub model id must look like 'name' or 'namespace/name'. Fix: correct the path "
        f"(relative paths start at the working directory, {os.getcwd()}), or give a hub id.")


def load_language_model(name_or_path: str, **kwargs: Any) -> PreTrainedModel:
    """A causal or seq2seq LM from a hub id or a local path, chosen from its config."""
    name_or_path = resolve_model_source(name_or_path, "model")
    kwargs = model_init_kwargs(kwargs)
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=kwargs["trust_remote_code"])
    auto_class = AutoModelForSeq2SeqLM if is_encoder_decoder(config) else AutoModelForCausalLM
    return auto_class.from_pretrained(name_or_path, **kwargs)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    name_or_path = resolve_model_source(name_or_path, "tokenizer")
    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


def model_name(model: Any) -> str:
    if isinstance(model, str):
        return model
    return getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> None:
    """Give a tokenizer without a pad token (GPT-2 style) the EOS token as pad, on tokenizer and model.

    Padding positions never count in any loss (masks decide), so reusing EOS as pad is safe.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(
                "The tokenizer has neither a pad token nor an EOS token, so batches cannot be padded. "
                "Fix: add one before training, e.g. tokenizer.add_special_tokens({'pad_token': '<pad>'}) "
                "and model.resize_token_embeddings(len(tokenizer))."
            )
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("The tokenizer had no pad token; using its EOS token %r for padding.", tokenizer.eos_token)
    if model is not None:
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and generation_config.pad_token_id is None:
            generation_config.pad_token_id = tokenizer.pad_token_id


def apply_peft(model: PreTrainedModel, peft_config: Any, activation_checkpointing: bool = False) -> Any:
    """Wrap `model` with a PEFT adapter described by `peft_config` (e.g. `LoraConfig`).

    A quantized model is first prepared for k-bit training (base frozen, half-precision norms and heads
    upcast to float32 for stable adapter gradients). Activation checkpointing stays the trainer's choice:
    peft's preparation would switch it on by default, which doubles the forward cost when nobody asked.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    if is_quantized(model):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        _keep_4bit_layers_differentiable(model)
    if activation_checkpointing:
        # Frozen embeddings give checkpointed blocks inputs without grad; adapters downstream still need it.
        model.enable_input_require_grads()
    return get_peft_model(model, peft_config)


def is_peft_model(model: Any) -> bool:
    # A PEFT model can only exist once peft was imported: asking costs nothing then, and a plain run never
    # pays for importing peft (and the bitsandbytes it loads, ~55 MiB).
    if "peft" not in sys.modules:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def load_reward_model(name_or_path: str, head_from_adapter: bool = False, **kwargs: Any) -> PreTrainedModel:
    """A sequence-classification model with one output, the scalar reward.

    transformers' load report (a table of missing and unexpected keys) is replaced by one warning saying what
    it means here: a checkpoint without a score head (a language model, which reward models start from) gets
    a new, untrained head (no warning with `head_from_adapter`: the base of a LoRA adapter that brings its own
    head); weights of the body missing from the checkpoint are named."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as transformers_logging

    name_or_path = resolve_model_source(name_or_path, "reward model")
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, num_labels=1, output_loading_info=True, **model_init_kwargs(kwargs))
    finally:
        transformers_logging.set_verbosity(verbosity)
    body = model.base_model_prefix + "."
    new_body = sorted(k for k in info["missing_keys"] if k.startswith(body))
    new_head = sorted(k for k in info["missing_keys"] if not k.startswith(body))
    if new_head and not head_from_adapter:
        logger.warning("%s has no score head (a language model's checkpoint): %s newly initialised. Expected when "
                       "a reward model is trained from it; a reward model that scores must have been trained.",
                       name_or_path, ", ".join(new_head))
    if new_body or info["mismatched_keys"]:
        named = new_body + [str(k) for k in info["mismatched_keys"]]
        logger.warning("%s: weights missing from the checkpoint or of another shape, newly initialised: %s",
                       name_or_path, ", ".join(named[:8]) + (f" and {len(named) - 8} more" if len(named) > 8 else ""))
    return model


def load_critic(name_or_path: str, **kwargs: Any) -> PreTrainedModel:
    """A value model initialised from a trained reward model's checkpoint (InstructGPT style), whether
    that checkpoint is a full model or a LoRA adapter (then merged into its base)."""
    name_or_path = resolve_model_source(name_or_path, "critic (value model)")
    if os.path.isfile(os.path.join(name_or_path, "adapter_config.json")):
        from peft import PeftConfig, PeftModel

        base_name = PeftConfig.from_pretrained(name_or_path).base_model_name_or_path
        base = load_reward_model(base_name, head_from_adapter=True, **kwargs)
        return PeftModel.from_pretrained(base, name_or_path).merge_and_unload()
    return load_reward_model(name_or_path, **kwargs)


# ----- merging an adapter into its base ---------------------------------------------------------------------
def merge_adapter_and_save(adapter: Any, output_dir: str, base_model_name_or_path: str | None = None,
                           tokenizer: PreTrainedTokenizerBase | None = None, **load_kwargs: Any) -> str:
    """Merge a LoRA adapter into full-precision base weights and save a plain safetensors model.

    `adapter` is a folder written by `save_pretrained` of a PEFT model, or a PEFT model in memory. The base
    is `base_model_name_or_path`, else the one the adapter records. An adapter trained over a quantized
    base (QLoRA) is merged into the base reloaded in full precision (`load_kwargs`, e.g. `dtype`), never
    into the quantized weights: rounding W + BA back to 4 bits would undo most of what the adapter
    learned. A full-precision PEFT model in memory is merged in a copy, leaving it untouched.
    The tokenizer (given, else found next to the adapter or the base) is saved too. Returns `output_dir`.
    """
    from peft import (
        PeftConfig,
        PeftModel,
        get_peft_model,
        get_peft_model_state_dict,
        set_peft_model_state_dict,
    )

    if any(key in load_kwargs for key in (*QUANTIZATION_KEYS, "quantization_config")):
        raise ValueError("merge_adapter_and_save merges into full-precision weights; drop the quantization "
                         "options from its keyword arguments.")
    adapter = resolve_model_source(adapter, "adapter")
    adapter_dir = adapter if isinstance(adapter, str) else None
    if adapter_dir is not None:
        peft_config = PeftConfig.from_pretrained(adapter_dir)
    elif is_peft_model(adapter):
        peft_config = adapter.peft_config[adapter.active_adapter]
    else:
        raise TypeError(f"adapter must be an adapter folder or a PEFT model, got {type(adapter).__name__}.")

    if adapter_dir is None and not is_quantized(adapter):
        merged = copy.deepcopy(adapter).merge_and_unload()
    else:
        base_name = base_model_name_or_path or peft_config.base_model_name_or_path
        if not base_name:
            raise ValueError("The adapter does not record its base model; pass base_model_name_or_path=.")
        if getattr(AutoConfig.from_pretrained(base_name), "quantization_config", None) is not None:
            raise ValueError(f"{base_name} is stored quantized, so it has no full-precision weights to merge "
                             "into. Fix: pass base_model_name_or_path= the original full-precision model.")
        if peft_config.task_type == "SEQ_CLS":
            base = load_reward_model(base_name, head_from_adapter=True, **load_kwargs)
        else:
            base = load_language_model(base_name, **load_kwargs)
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(base, adapter_dir)
        else:  # a quantized PEFT model in memory: carry its adapter weights over to the full-precision base
            model = get_peft_model(base, copy.deepcopy(peft_config))
            weights = get_peft_model_state_dict(adapter, adapter_name=adapter.active_adapter)
            loaded = set_peft_model_state_dict(model, {k: v.to(base.dtype) for k, v in weights.items()})
            if loaded.unexpected_keys:
                raise ValueError(f"The adapter's weights do not fit {base_name}: {loaded.unexpected_keys[:5]}; "
                                 "pass base_model_name_or_path= the model the adapter was trained on.")
        merged = model.merge_and_unload()
    merged.save_pretrained(output_dir)
    tokenizer = tokenizer or _find_tokenizer(adapter_dir, base_model_name_or_path or peft_config.base_model_name_or_path)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return output_dir


def _find_tokenizer(*sources: str | None) -> PreTrainedTokenizerBase | None:
    for source in sources:
        if source and (not os.path.isdir(source) or os.path.isfile(os.path.join(source, "tokenizer_config.json"))):
            try:
                return load_tokenizer(source)
            except OSError:  # a hub id without tokenizer files (or offline): the merged weights still count
                logger.info("No tokenizer found at %s.", source)
    return None


# ----- files of a saved model, local or on the hub, and adapters loaded by path -----------------------------
def find_model_file(name_or_path: str, filename: str, token: str | bool | None = None,
                    revision: str | None = None) -> str | None:
    """The local path of `filename` inside a model folder, or downloaded from the hub repo `name_or_path`;
    None when it has no such file (or the hub cannot be reached: an optional file then counts as absent)."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
        return path if os.path.isfile(path) else None
    if os.path.exists(name_or_path):
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return hf_hub_download(name_or_path, filename, token=token, revision=revision)
    except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
            HFValidationError, OfflineModeIsEnabled):
        return None


def read_weights(path: str, keep: Any = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors or PyTorch weights file (the latter with `weights_only=True`), on CPU;
    with `keep` (a predicate on names) only those it accepts, read lazily where the format allows."""
    keep = keep or (lambda _name: True)
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys() if keep(name)}
    try:  # memory-mapped: a whole LM's .bin is not read into memory to find a few tensors in it
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files in the legacy (pre-zip) format cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    return {name: tensor for name, tensor in state.items() if keep(name)}


def load_peft_adapter(model: PreTrainedModel, source: str, is_trainable: bool = True, **hub_kwargs: Any) -> Any:
    """`model` wrapped with the PEFT adapter saved at `source` (a folder or hub id). A trainable adapter over
    a quantized model gets the same k-bit preparation as a new one (`apply_peft`), so training resumed from
    a saved adapter computes like the run that saved it."""
    from peft import PeftModel, prepare_model_for_kbit_training

    source = resolve_model_source(source, "adapter")
    if is_trainable and is_quantized(model):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        _keep_4bit_layers_differentiable(model)
    return PeftModel.from_pretrained(model, source, is_trainable=is_trainable, **hub_kwargs)


ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def load_reward_adapter(model: Any, source: str, adapter_name: str = "reward_adapter",
                        head_names: tuple[str, ...] = ("score",), token: str | bool | None = None,
                        revision: str | None = None) -> torch.nn.Linear:
    """Add the reward model's LoRA adapter at `source` (trained as a sequence classifier over the same base
    model) to the PEFT model `model`, frozen and inactive, and return its classification head (the
    adapter's saved `score` layer) as a frozen float32 `nn.Linear(h, num_labels)` on CPU.

    Multi-adapter RLHF: policy adapter, value head and reward adapter share one base model.
    """
    hub_kwargs = {k: v for k, v in (("token", token), ("revision", revision)) if v is not None}
    weights_file = next((path for name in ADAPTER_WEIGHT_FILES
                         if (path := find_model_file(source, name, token, revision)) is not None), None)
    if weights_file is None:
        raise ValueError(f"reward_adapter={source!r} holds no adapter weights ({' or '.join(ADAPTER_WEIGHT_FILES)}); "
                         "pass the folder (or hub id) that a PEFT reward model was saved to.")
    head = read_weights(weights_file, keep=lambda name: _head_key(name, head_names) is not None)
    head = {_head_key(name, head_names): tensor for name, tensor in head.items()}
    if "weight" not in head:
        raise ValueError(f"The reward adapter at {source!r} has no saved classification head ({'/'.join(head_names)}"
                         ".weight): train it with task_type='SEQ_CLS' so the head is saved with the adapter.")
    loaded = model.load_adapter(source, adapter_name, is_trainable=False, **hub_kwargs)
    misfit = [key for key in loaded.unexpected_keys if _head_key(key, head_names) is None]
    if misfit:
        raise ValueError(f"The reward adapter at {source!r} does not fit this base model (unexpected weights "
                         f"{misfit[:3]}); train the reward adapter on the same base model as the policy.")
    num_labels, hidden_size = head["weight"].shape
    score = torch.nn.Linear(hidden_size, num_labels, bias="bias" in head)
    score.load_state_dict({k: v.float() for k, v in head.items()})
    return score.requires_grad_(False)


def _head_key(name: str, head_names: tuple[str, ...]) -> str | None:
    """'weight' or 'bias' when `name` is a parameter of one of the `head_names` modules, else None."""
    *path, leaf = name.split(".")
    return leaf if path and path[-1] in head_names and leaf in ("weight", "bias") else None
