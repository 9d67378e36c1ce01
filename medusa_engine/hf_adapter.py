"""The only door into transformers.

Shape legend: T = tokens fed in one forward, N = tree nodes, K = keys in the cache after the
forward, E = hidden size, V = vocabulary.

The base model is driven through its public inputs only: `position_ids`, a 4D additive attention
mask (transformers returns a 4D mask as-is) and a `DynamicCache`. No modeling file is copied or
patched. Version differences live here:

* the cache keyword is `cache` from transformers 5.24 (`past_key_values` is deprecated there) and
  `past_key_values` before; we read the decoder's signature once;
* `DynamicCache` layers hold `keys`/`values` tensors [B, G, K, D] in 5.17 and 5.24. Compaction
  after acceptance rewrites those tensors directly (one gather per layer), because `crop`'s
  argument changed meaning between versions.

We call the decoder and the output embedding ourselves (rather than `model(...)`) to get the last
hidden state the heads need without materialising every layer's hidden states.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from attention.masks import additive_mask
from medusa_engine.models import ModelSource, resolve_model

log = logging.getLogger(__name__)

DTYPES = {"auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ContextOverflowError(ValueError):
    """A prompt (or conversation) longer than the model's context; one line for the CLI."""


@dataclass
class KVSession:
    """A KV cache and the token ids whose keys/values it holds, in order (owned by the caller).

    Reusing a session lets the next request prefill only what is new (multi-turn chat).
    """

    cache: Any
    token_ids: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.token_ids)


class HFModel:
    """A causal LM from transformers, seen as decoder + LM head over an explicit KV cache."""

    def __init__(self, model: Any, tokenizer: Any = None, name: str = "") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", "")
        self.config = model.config
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        if self.decoder is None or self.lm_head is None:
            raise ValueError(f"{type(model).__name__} exposes no decoder / output embeddings")
        params = inspect.signature(self.decoder.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        text_config = self.config.get_text_config(decoder=True)
        self.hidden_size = int(text_config.hidden_size)
        self.vocab_size = int(self.lm_head.weight.shape[0])
        self.max_context = int(getattr(text_config, "max_position_embeddings", 1 << 30))
        self.softcap = getattr(text_config, "final_logit_softcapping", None)
        self.eos_token_ids = _eos_ids(model)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @classmethod
    def load(
        cls,
        model: str | ModelSource,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "cpu",
        attn_implementation: str = "sdpa",
    ) -> HFModel:
        """Load model + tokenizer from an alias, folder, GGUF file or hub id (see `models`)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = resolve_model(model) if isinstance(model, str) else model
        torch_dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if isinstance(dtype, str) and dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        kwargs: dict[str, Any] = {"dtype": torch_dtype, "attn_implementation": attn_implementation}
        if source.gguf_file:
            kwargs["gguf_file"] = source.gguf_file
        hf_model: Any = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
        hf_model = hf_model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(
            source.path, **({"gguf_file": source.gguf_file} if source.gguf_file else {})
        )
        return cls(hf_model, tokenizer, name=source.alias or source.path)

    # ---- forward ----------------------------------------------------------------------------

    def new_session(self) -> KVSession:
        from transformers import DynamicCache

        return KVSession(DynamicCache(config=self.config))

    @torch.inference_mode()
    def forward(
        self,
        input_ids_T: torch.Tensor,
        position_ids_T: torch.Tensor,
        session: KVSession,
        block_mask_TT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run T new tokens on top of the cache; returns hidden_TE (after the final norm).

        Appends T entries to the cache. `block_mask_TT` (bool, [i, j] = token i sees new token j)
        structures the new block; the cached prefix is visible to all. None means causal.
        """
        t = input_ids_T.shape[0]
        past = len(session)
        mask = None
        if block_mask_TT is not None and t > 1:
            full_TK = torch.ones(t, past + t, dtype=torch.bool, device=input_ids_T.device)
            full_TK[:, past:] = block_mask_TT
            mask = additive_mask(full_TK, self.dtype)[None, None]
        out = self.decoder(
            input_ids=input_ids_T[None],
            position_ids=position_ids_T[None],
            attention_mask=mask,
            use_cache=True,
            **{self._cache_kw: session.cache},
        )
        return out.last_hidden_state[0]

    @torch.inference_mode()
    def logits(self, hidden_TE: torch.Tensor) -> torch.Tensor:
        """logits_TV from the output embedding (with the model's final soft-capping, if any)."""
        logits_TV = self.lm_head(hidden_TE)
        if self.softcap:
            logits_TV = torch.tanh(logits_TV / self.softcap) * self.softcap
        return logits_TV

    # ---- cache bookkeeping ------------------------------------------------------------------

    def check_fits(self, num_tokens: int) -> None:
        if num_tokens > self.max_context:
            raise ContextOverflowError(
                f"{num_tokens} tokens do not fit the model's context of {self.max_context}"
            )

    @torch.inference_mode()
    def keep(
        self, session: KVSession, start: int, keep_T: Sequence[int] | None, length: int
    ) -> None:
        """Keep cache rows `start + keep_T` at `start...`, then cut the cache to `length` rows.

        `keep_T` is increasing with keep_T[j] >= j (tree nodes are topologically ordered), so the
        gather reads rows at or after the ones it writes. `keep_T=None` only truncates.
        """
        gather = None
        if keep_T is not None and list(keep_T) != list(range(len(keep_T))):
            gather = torch.as_tensor(keep_T, device=self.device) + start
        for layer in session.cache.layers:
            if not getattr(layer, "is_initialized", True) or layer.keys is None:
                continue
            if gather is not None:
                n = gather.shape[0]
                layer.keys[..., start : start + n, :] = layer.keys.index_select(-2, gather)
                layer.values[..., start : start + n, :] = layer.values.index_select(-2, gather)
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def quiet_transformers() -> None:
    """Silence transformers' INFO logs and weight-loading progress bars (for the CLIs)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _eos_ids(model: Any) -> tuple[int, ...]:
    ids: list[int] = []
    for cfg in (getattr(model, "generation_config", None), model.config):
        eos = getattr(cfg, "eos_token_id", None)
        if eos is None:
            continue
        ids.extend([eos] if isinstance(eos, int) else list(eos))
    return tuple(dict.fromkeys(int(i) for i in ids))
