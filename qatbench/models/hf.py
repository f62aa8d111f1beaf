"""Hugging Face models from local directories, built offline, as plain ``nn.Linear`` networks.

``hf_encoder`` and ``hf_sequence_classification`` load an encoder (BERT, MiniLM, ...) from
a local directory (option ``hf``), with ``(input_ids, attention_mask)`` inputs of
``seq_len`` tokens; the encoder returns mean- or CLS-pooled embeddings (option
``pooling``), the classifier its logits. Feed them ``data: {dataset: sentences,
tokenizer: <the same directory>}`` (or synthetic token ids) and judge them with the
``embedding`` task.

Registered as ``hf_causal_lm``. Model options (exactly one of the first two)::

    hf: path/to/checkpoint          # a local directory saved with save_pretrained()
    hf_config: {model_type: gpt2, vocab_size: 256, n_layer: 2, n_head: 2, n_embd: 64,
                n_positions: 128}   # built from a config, weights freshly initialised
    seq_len: 128                    # length of the example sequence (default: the context,
                                    # at most 128)
    attn_implementation: sdpa       # or eager

Nothing is downloaded: checkpoints load with ``local_files_only``. GPT-2's ``Conv1D``
projections (a Linear with its weight stored transposed) are replaced by equivalent
``nn.Linear`` layers, so every method that quantizes ``nn.Linear`` really quantizes them.
The model is wrapped in :class:`HfCausalLM`, whose ``forward(input_ids)`` returns the
logits, and whose ``cached_forward`` decodes with the model's own KV cache.

Needs the optional ``transformers`` package (``pip install 'qatbench[llm]'``); without it
the trial fails in its build phase with a message saying so.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qatbench.errors import ConfigError

INSTALL_HINT = "pip install 'qatbench[llm]'"
DEFAULT_MAX_SEQ_LEN = 128


def transformers_missing() -> str | None:
    """Why Hugging Face models cannot be built here, or None when they can."""
    try:
        import transformers  # noqa: F401  # only probing that it imports
    except ImportError as exc:
        return f"hf_causal_lm needs the optional 'transformers' package ({INSTALL_HINT}): {exc}"
    return None


class HfCausalLM(nn.Module):
    """A Hugging Face causal LM seen as ``input_ids [b, t] -> logits [b, t, vocab]``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def context(self) -> int:
        cfg = self.model.config  # type: ignore[union-attr]  # a PreTrainedModel's config
        for name in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return DEFAULT_MAX_SEQ_LEN

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # An explicit all-ones mask keeps transformers off its packed-sequence detection,
        # which uses an operator (aten::diff) the ONNX exporter does not have.
        out = self.model(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            use_cache=False,
            return_dict=False,
        )
        return out[0]

    def cached_forward(self, input_ids: torch.Tensor, past: Any = None) -> tuple[torch.Tensor, Any]:
        """Logits of ``input_ids`` following the tokens held in ``past`` (the model's
        cache object; None to start), and the cache grown by them."""
        out = self.model(input_ids=input_ids, use_cache=True, **{self._cache_keyword(): past})
        grown = getattr(out, "cache", None)
        return out.logits, grown if grown is not None else out.past_key_values

    def _cache_keyword(self) -> str:
        """``cache`` since transformers 5.x renamed it, else ``past_key_values``."""
        params = inspect.signature(self.model.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    @staticmethod
    def copy_cache(past: Any) -> Any:
        return copy.deepcopy(past)

    @staticmethod
    def cache_bytes(past: Any) -> int:
        """Bytes of the key and value tensors held in a cache object."""
        tensors = [
            getattr(layer, n, None)
            for layer in getattr(past, "layers", None) or []
            for n in ("keys", "values")
        ]
        # transformers 4.x caches keep lists instead of layer objects
        tensors += [*getattr(past, "key_cache", []), *getattr(past, "value_cache", [])]
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace every transformers ``Conv1D`` in ``model`` by an equal ``nn.Linear``;
    returns how many were replaced."""
    targets = [
        name
        for name, module in model.named_modules()
        if type(module).__name__ == "Conv1D" and hasattr(module, "nf")
    ]
    for name in targets:
        conv = model.get_submodule(name)
        weight: torch.Tensor = conv.weight  # type: ignore[assignment]  # [in, out]: x @ W + b
        bias: torch.Tensor | None = getattr(conv, "bias", None)
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if bias is not None:
                linear.bias.copy_(bias)
        model.set_submodule(name, linear)
    return len(targets)


def build_hf_causal_lm(
    hf: str | None = None,
    hf_config: dict[str, Any] | None = None,
    seq_len: int | None = None,
    attn_implementation: str | None = None,
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Registered as ``hf_causal_lm``; see the module docstring for the options."""
    if (hf is None) == (hf_config is None):
        raise ConfigError("hf_causal_lm: give exactly one of the options 'hf' and 'hf_config'")
    missing = transformers_missing()
    if missing:
        raise ConfigError(missing)
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # config notes about token ids are not ours to print
    hf_logging.disable_progress_bar()  # nor a progress bar per checkpoint load
    try:
        if hf is not None:
            if not Path(hf).is_dir():
                raise ConfigError(f"hf_causal_lm: option hf: {hf!r} is not a local directory")
            if torch.get_default_device().type == "meta":  # shapes only: the config suffices
                config = AutoConfig.from_pretrained(hf, local_files_only=True)
                model = AutoModelForCausalLM.from_config(config, **extra)
            else:
                model = AutoModelForCausalLM.from_pretrained(hf, local_files_only=True, **extra)
        else:
            assert hf_config is not None
            options = dict(hf_config)
            model_type = options.pop("model_type", None)
            if not model_type:
                raise ConfigError("hf_causal_lm: hf_config needs a model_type, e.g. gpt2")
            try:
                config = AutoConfig.for_model(model_type, **options)
            except ValueError as exc:
                raise ConfigError(f"hf_causal_lm: hf_config: {exc}".splitlines()[0]) from None
            model = AutoModelForCausalLM.from_config(config, **extra)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    conv1d_to_linear(model)
    wrapped = HfCausalLM(model.float().eval())
    length = seq_len or min(wrapped.context, DEFAULT_MAX_SEQ_LEN)
    return wrapped, (torch.zeros(1, length, dtype=torch.long),)


class HfEncoder(nn.Module):
    """A Hugging Face encoder seen as ``(input_ids, attention_mask) -> embeddings [b, dim]``:
    the last hidden state mean-pooled over the attended tokens, or the first (CLS) token."""

    def __init__(self, model: nn.Module, pooling: str) -> None:
        super().__init__()
        self.model = model
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask)[0]
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class HfSequenceClassifier(nn.Module):
    """A Hugging Face sequence classifier seen as ``(input_ids, attention_mask) -> logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask)[0]


def build_hf_encoder(
    hf: str, pooling: str = "mean", seq_len: int = DEFAULT_MAX_SEQ_LEN
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Registered as ``hf_encoder``: ``AutoModel`` from the local directory ``hf`` (saved
    with ``save_pretrained``), embeddings out (``pooling``: mean or cls). The example is
    ``seq_len`` seeded token ids below the config's vocabulary size and a mask of ones."""
    if pooling not in ("mean", "cls"):
        raise ConfigError(f"hf_encoder: option pooling: {pooling!r}; allowed: mean, cls")
    from transformers import AutoModel

    model = _from_local(AutoModel, hf, "hf_encoder")
    return HfEncoder(model.float().eval(), pooling), _token_example(model, seq_len)


def build_hf_sequence_classification(
    hf: str, seq_len: int = DEFAULT_MAX_SEQ_LEN
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Registered as ``hf_sequence_classification``: ``AutoModelForSequenceClassification``
    from the local directory ``hf``, logits out."""
    from transformers import AutoModelForSequenceClassification

    model = _from_local(AutoModelForSequenceClassification, hf, "hf_sequence_classification")
    return HfSequenceClassifier(model.float().eval()), _token_example(model, seq_len)


def _from_local(auto: Any, hf: str, kind: str) -> nn.Module:
    missing = transformers_missing()
    if missing:
        raise ConfigError(missing.replace("hf_causal_lm", kind))
    if not Path(hf).is_dir():
        raise ConfigError(f"{kind}: option hf: {hf!r} is not a local directory")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model: nn.Module = auto.from_pretrained(hf, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model


def _token_example(model: nn.Module, seq_len: int) -> dict[str, torch.Tensor]:
    vocab = int(getattr(model.config, "vocab_size", 256))  # type: ignore[union-attr]
    ids = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones(1, seq_len, dtype=torch.long)}
