"""`ModelConfig`: which model to load and how (dtype, attention, LoRA, 4/8-bit), as TRL 0.7's example
scripts parse it from the command line, and the configs it builds for transformers and peft.

    parser = HfArgumentParser((ScriptArguments, TrainingArguments, ModelConfig))
    args, training_args, model_config = parser.parse_args_into_dataclasses()
    model = AutoModelForCausalLM.from_pretrained(model_config.model_name_or_path,
                                                 **model_config.to_model_init_kwargs())
    trainer = SFTTrainer(model, ..., peft_config=get_peft_config(model_config))

`dtype` is TRL 1.x's field (default "float32"), a string as TRL 1.x scripts read it
(`getattr(torch, model_args.dtype)`). `torch_dtype` is TRL 0.7's name for it, kept for 0.7 scripts: when
given, `dtype` takes its value. `to_model_init_kwargs()` gives from_pretrained a torch.dtype (or "auto").
"""

from __future__ import annotations

from dataclasses import InitVar, asdict, dataclass, field
from typing import Any

import torch

from ..ops.dicts import flatten_dict

TORCH_DTYPES = ("auto", "bfloat16", "float16", "float32")
STORAGE_DTYPES = ("uint8", "bfloat16", "float16", "float32")
FOUR_BIT_QUANT_TYPES = ("nf4", "fp4")


@dataclass
class ModelConfig:
    """Model loading settings (TRL 0.7.11's fields and defaults). Validation runs in __post_init__."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Hub id or local path of the model to load."})
    model_revision: str = field(default="main", metadata={
        "help": "Branch, tag or commit of the model on the Hub."})
    dtype: str | None = field(default="float32", metadata={
        "help": "Load the weights in this dtype; 'auto' takes the checkpoint's. Also the 4-bit compute dtype.",
        "choices": list(TORCH_DTYPES)})
    torch_dtype: str | None = field(default=None, metadata={
        "help": "TRL 0.7's name for `dtype`; when set, `dtype` takes its value.", "choices": list(TORCH_DTYPES)})
    # TRL 0.x's field, which TRL 1.x moved onto the training configs. An init-only argument here, so that
    # `HfArgumentParser((RewardConfig, ModelConfig))` (TRL 0.7's reward script) does not register
    # --trust_remote_code twice: on a command line it is the training config's flag; in Python,
    # ModelConfig(trust_remote_code=True) still sets `model_config.trust_remote_code`.
    trust_remote_code: InitVar[bool] = False
    attn_implementation: str | None = field(default=None, metadata={
        "help": "Attention kernel, e.g. 'sdpa', 'eager' or 'flash_attention_2' (needs flash-attn)."})
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int | None = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int | None = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float | None = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "Module names to adapt (default: peft's choice for the architecture)."})
    lora_target_parameters: list[str] | None = field(default=None, metadata={
        "help": "Parameter names to adapt directly (peft's target_parameters, e.g. MoE expert weights held as "
                "plain parameters rather than Linear modules)."})
    lora_modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "Modules trained in full and saved with the adapter (e.g. a new score head)."})
    lora_task_type: str = field(default="CAUSAL_LM", metadata={
        "help": "peft task type of the adapter: 'CAUSAL_LM', or 'SEQ_CLS' for a reward model."})
    use_rslora: bool = field(default=False, metadata={
        "help": "Rank-stabilised LoRA: scale the update by lora_alpha / sqrt(r) instead of lora_alpha / r."})
    use_dora: bool = field(default=False, metadata={
        "help": "DoRA: train each adapted weight's magnitude separately from its LoRA direction (slower; merge "
                "the adapter for inference)."})
    load_in_8bit: bool = field(default=False, metadata={
        "help": "Load the base weights in 8 bits (bitsandbytes); train with LoRA."})
    load_in_4bit: bool = field(default=False, metadata={
        "help": "Load the base weights in 4 bits (bitsandbytes, QLoRA); train with LoRA."})
    bnb_4bit_quant_type: str | None = field(default="nf4", metadata={
        "help": "4-bit data type: 'nf4' or 'fp4'.", "choices": list(FOUR_BIT_QUANT_TYPES)})
    use_bnb_nested_quant: bool = field(default=False, metadata={
        "help": "Quantize the 4-bit quantization constants too (double quantization)."})
    bnb_4bit_quant_storage: str | None = field(default=None, metadata={
        "help": "dtype the packed 4-bit weights are stored in (e.g. 'bfloat16' to shard them with FSDP); "
                "default: bitsandbytes' uint8."})

    def __post_init__(self, trust_remote_code: bool = False) -> None:
        self.trust_remote_code = bool(trust_remote_code)
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("ModelConfig: load_in_8bit and load_in_4bit are both True; set only one "
                             "(--load_in_4bit for QLoRA).")
        for name in ("dtype", "torch_dtype"):
            if getattr(self, name) is not None and getattr(self, name) not in TORCH_DTYPES:
                raise ValueError(f"ModelConfig: {name}={getattr(self, name)!r}; use one of {TORCH_DTYPES} or None.")
        if self.torch_dtype is not None:
            # TRL 0.7's name. dtype's default ("float32") cannot be told from an explicit "float32", so only a
            # dtype that is neither the default nor torch_dtype's value conflicts.
            if self.dtype not in ("float32", self.torch_dtype):
                raise ValueError(f"ModelConfig: dtype={self.dtype!r} and torch_dtype={self.torch_dtype!r} disagree; "
                                 "they are the same option (torch_dtype is its old name): set only dtype.")
            self.dtype = self.torch_dtype
        if self.bnb_4bit_quant_storage is not None and self.bnb_4bit_quant_storage not in STORAGE_DTYPES:
            raise ValueError(f"ModelConfig: bnb_4bit_quant_storage={self.bnb_4bit_quant_storage!r}; use one of "
                             f"{STORAGE_DTYPES} or None.")
        # `--lora_target_modules all-linear` parses as ["all-linear"]; peft knows that keyword only as a string.
        # (TRL turns any single name into a string, which peft then reads as a regular expression that must
        # match a module's whole path, so `--lora_target_modules q_proj` would match nothing; names stay a list.)
        if self.lora_target_modules == ["all-linear"]:
            self.lora_target_modules = "all-linear"
        if self.bnb_4bit_quant_type is not None and self.bnb_4bit_quant_type not in FOUR_BIT_QUANT_TYPES:
            raise ValueError(f"ModelConfig: bnb_4bit_quant_type={self.bnb_4bit_quant_type!r}; use 'nf4' or 'fp4'.")
        if self.use_peft and (self.lora_r is None or self.lora_r < 1):
            raise ValueError(f"ModelConfig: lora_r={self.lora_r}; a LoRA rank is a positive integer.")

    @property
    def resolved_dtype(self) -> torch.dtype | str | None:
        """`dtype` as from_pretrained takes it: a torch.dtype, "auto" or None."""
        if self.dtype in (None, "auto"):
            return self.dtype
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a flat dict (for trackers)."""
        return flatten_dict({**asdict(self), "trust_remote_code": self.trust_remote_code})

    def to_model_init_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `from_pretrained(model_name_or_path, **...)`: revision, trust_remote_code,
        dtype (from torch_dtype), attn_implementation when set, and for 4/8-bit loading the
        quantization_config with the device_map that puts each process's copy on its own device."""
        kwargs: dict[str, Any] = {"revision": self.model_revision, "trust_remote_code": self.trust_remote_code}
        if self.dtype is not None:
            kwargs["dtype"] = self.resolved_dtype
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        quantization_config = get_quantization_config(self)
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
            kwargs["device_map"] = get_kbit_device_map()
        return kwargs


def get_peft_config(model_config: ModelConfig) -> Any:
    """A peft `LoraConfig` from the lora_* fields, use_rslora and use_dora (bias "none", as TRL's), or None
    when use_peft is False. The task type is `lora_task_type` ("CAUSAL_LM" by default; RewardTrainer turns a
    causal one into "SEQ_CLS" itself, with a warning)."""
    if not model_config.use_peft:
        return None
    try:
        from peft import LoraConfig
    except ImportError as error:
        raise ImportError("use_peft=True needs peft (pip install peft), which cannot be imported.") from error
    # target_parameters only when asked for: older peft versions do not know the keyword.
    extra = {} if model_config.lora_target_parameters is None else {
        "target_parameters": model_config.lora_target_parameters}
    return LoraConfig(
        r=model_config.lora_r,
        lora_alpha=model_config.lora_alpha,
        lora_dropout=model_config.lora_dropout,
        bias="none",
        task_type=model_config.lora_task_type,
        target_modules=model_config.lora_target_modules,
        modules_to_save=model_config.lora_modules_to_save,
        use_rslora=model_config.use_rslora,
        use_dora=model_config.use_dora,
        **extra,
    )


def get_quantization_config(model_config: ModelConfig) -> Any:
    """A transformers `BitsAndBytesConfig` for load_in_4bit (quant type, double quantization, storage dtype
    bnb_4bit_quant_storage, and compute dtype = dtype, float32 when that is None or "auto") or load_in_8bit;
    None otherwise.

    Built by `models.loading.resolve_quantization`, the one place TRL-style quantization flags become a
    config; it raises an ImportError with the install command when bitsandbytes is missing (TRL's
    version returned the config and failed later, at loading).
    """
    from .loading import resolve_quantization

    if model_config.load_in_4bit:
        dtype = model_config.resolved_dtype
        flags = {"load_in_4bit": True, "bnb_4bit_quant_type": model_config.bnb_4bit_quant_type or "nf4",
                 "use_bnb_nested_quant": model_config.use_bnb_nested_quant,
                 "bnb_4bit_compute_dtype": dtype if isinstance(dtype, torch.dtype) else torch.float32}
        if model_config.bnb_4bit_quant_storage is not None:
            flags["bnb_4bit_quant_storage"] = model_config.bnb_4bit_quant_storage
    elif model_config.load_in_8bit:
        flags = {"load_in_8bit": True}
    else:
        return None
    return resolve_quantization(flags)["quantization_config"]


def get_kbit_device_map() -> dict[str, int | str] | None:
    """{"": this process's local device} for quantized loading on an accelerator (CUDA: the local
    process index; XPU/NPU: "xpu:<index>" / "npu:<index>"), None on a CPU-only machine. Quantized
    weights cannot be moved after loading, so each process must load onto its own device."""
    from accelerate import PartialState

    if torch.cuda.is_available():
        return {"": PartialState().local_process_index}
    for kind in ("xpu", "npu"):
        backend = getattr(torch, kind, None)
        if backend is not None and backend.is_available():
            return {"": f"{kind}:{PartialState().local_process_index}"}
    return None
