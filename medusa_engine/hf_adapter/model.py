"""`HFModel`: a transformers causal LM seen as decoder + LM head over an explicit KV cache.

Shape legend (ARCHITECTURE.md): T new tokens, K keys, E hidden size, V vocabulary.

The model is driven through its public inputs and extension points only: explicit position ids,
a `Cache`, a 4D attention mask, `AttentionInterface.register` (see `cache.py`). We call the
decoder and the output embedding ourselves (rather than `model(...)`) to get the last hidden
state the drafters need without materialising every layer's hidden states. Version differences
live here: the cache keyword is `cache` from transformers 5.24 (`past_key_values` is deprecated
there) and `past_key_values` before; we read the decoder's signature once.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import AttentionInterface, DynamicCache

from attention.api import StaticMask, check_backend, prepare_static
from attention.kv_cache import StaticKVCache
from attention.masks import additive_mask, causal_block
from attention.row_kv_cache import RowKVCache
from medusa_engine.config import ATTENTION_CHOICES
from medusa_engine.hf_adapter.cache import (
    ATTN_NAME,
    EngineCache,
    ForwardPlan,
    KVSession,
    RowsCache,
    engine_attention,
)
from medusa_engine.model import ContextOverflowError, Session
from medusa_engine.models import ModelSource, resolve_model

DTYPES = {"auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MIN_SLOTS = 256  # smallest static cache; it grows by doubling when a request needs more


def cache_keyword(module: torch.nn.Module) -> str:
    """The name a transformers model's forward takes its cache by: `cache` from 5.24 on
    (`past_key_values` is deprecated there), `past_key_values` before."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class HFModel:
    """A causal LM from transformers (the `medusa_engine.model.CausalLM` protocol).

    `attention`: "hf" runs the model's own attention over a `DynamicCache`, the tree given as a
    4D additive mask; one of `attention.api.BACKENDS` runs ours over a static, preallocated cache
    (`cache.py`). `flex` and `triton` verify a tree over the whole preallocated buffer with the
    valid length on the device (`attention.api.prepare_static`), so their shapes stay fixed as
    the cache grows; a forward without a tree runs `flex` requests on SDPA (every prompt length
    would otherwise be a compilation). `fused_norms`: Llama-style RMSNorms as one Triton kernel
    each (`norms.py`; default on CUDA with our backends). `restore()` gives the model back.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        name: str = "",
        attention: str = "hf",
        fused_norms: bool | None = None,
    ):
        if attention not in ATTENTION_CHOICES:
            raise ValueError(f"unknown attention {attention!r}; choose one of {ATTENTION_CHOICES}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", "")
        self.config = model.config
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        if self.decoder is None or self.lm_head is None:
            raise ValueError(f"{type(model).__name__} exposes no decoder / output embeddings")
        self.embed_tokens = model.get_input_embeddings()
        self._cache_kw = cache_keyword(self.decoder)
        text_config = self.config.get_text_config(decoder=True)
        self.text_config = text_config
        self.hidden_size = int(text_config.hidden_size)
        self.vocab_size = int(self.lm_head.weight.shape[0])
        self.max_context = int(getattr(text_config, "max_position_embeddings", 1 << 30))
        self.softcap = getattr(text_config, "final_logit_softcapping", None)
        self.eos_token_ids = _eos_ids(model)
        self.attention = attention
        self._attn_before = getattr(self.config, "_attn_implementation", None) or "sdpa"
        if attention != "hf":
            check_backend(attention, self.device)
            AttentionInterface.register(ATTN_NAME, engine_attention)
            self.decoder.set_attn_implementation(ATTN_NAME)
        if fused_norms is None:
            fused_norms = attention != "hf" and self.device.type == "cuda"
        self._undo_norms = None
        if fused_norms:
            from medusa_engine.hf_adapter.norms import fuse_rms_norms

            self._undo_norms = fuse_rms_norms(model)

    def restore(self) -> None:
        """Undo what this wrapper changed in the HF model (attention implementation, norms)."""
        if self.attention != "hf":
            self.decoder.set_attn_implementation(self._attn_before)
        if self._undo_norms is not None:
            self._undo_norms()
            self._undo_norms = None

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
        attention: str = "hf",
    ) -> HFModel:
        """Load model + tokenizer from an alias, folder, GGUF file or hub id (see `models`)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = usable_device(device)
        source = resolve_model(model) if isinstance(model, str) else model
        if isinstance(dtype, str) and dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        kwargs: dict[str, Any] = {"dtype": torch_dtype, "attn_implementation": "sdpa"}
        if source.gguf_file:
            kwargs["gguf_file"] = source.gguf_file
        hf_model: Any = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
        hf_model = hf_model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(
            source.path, **({"gguf_file": source.gguf_file} if source.gguf_file else {})
        )
        return cls(hf_model, tokenizer, name=source.alias or source.path, attention=attention)

    # ---- sessions ---------------------------------------------------------------------------

    def new_session(self, capacity: int = MIN_SLOTS) -> KVSession:
        """An empty cache; with our attention, a static one of `capacity` slots (grows on demand)."""
        if self.attention == "hf":
            return KVSession(DynamicCache(config=self.config), self.device)
        return KVSession(EngineCache(self._allocate(capacity)), self.device)

    def _kv_shape(self) -> tuple[int, int, int]:
        """(layers, key/value heads, head dim) of the cache."""
        c = self.text_config
        heads = int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
        head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
        return int(c.num_hidden_layers), heads, head_dim

    def _allocate(self, slots: int) -> StaticKVCache:
        layers, heads, head_dim = self._kv_shape()
        return StaticKVCache.allocate(
            num_layers=layers,
            batch=1,
            kv_heads=heads,
            head_dim=head_dim,
            max_length=max(slots, MIN_SLOTS),
            dtype=self.dtype,
            device=self.device,
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of keys and values one token takes in the cache."""
        return RowKVCache.bytes_per_token(*self._kv_shape(), self.dtype)

    def new_row_cache(self, rows: int, slots: int) -> RowKVCache:
        """A cache of `rows` independent rows of `slots` slots each (for `forward_rows`)."""
        if self.attention in ("hf", "flex", "triton"):
            raise ValueError(
                f"batched decoding runs on attention 'sdpa' or 'reference', not {self.attention!r}"
            )
        layers, heads, head_dim = self._kv_shape()
        return RowKVCache.allocate(
            num_layers=layers,
            rows=rows,
            kv_heads=heads,
            head_dim=head_dim,
            max_length=slots,
            dtype=self.dtype,
            device=self.device,
        )

    def reserve(self, session: Session, tokens: int) -> None:
        """Make sure the session's cache can hold `tokens` tokens (static caches grow by doubling)."""
        cache = _kv(session).cache
        if not isinstance(cache, EngineCache) or cache.static.max_length >= tokens:
            return
        bigger = self._allocate(max(tokens, 2 * cache.static.max_length))
        for layer in range(bigger.num_layers):
            bigger.append(layer, *cache.static.valid(layer))
        cache.static = bigger

    def check_fits(self, num_tokens: int) -> None:
        if num_tokens > self.max_context:
            raise ContextOverflowError(
                f"{num_tokens} tokens do not fit the model's context of {self.max_context}"
            )

    # ---- forward ----------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(
        self,
        input_ids_T: torch.Tensor,
        position_ids_T: torch.Tensor,
        session: Session,
        block_mask_TT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run T new tokens on top of the cache; returns hidden_TE (after the final norm).

        Appends T entries to the cache. `block_mask_TT` (bool, [i, j] = token i sees new token j)
        structures the new block; the cached prefix is visible to all. None means causal.
        """
        t = input_ids_T.shape[0]
        kwargs: dict[str, Any] = {self._cache_kw: _kv(session).cache}
        if self.attention == "hf":
            if block_mask_TT is not None and t > 1:
                past = len(session)
                full_TK = torch.ones(t, past + t, dtype=torch.bool, device=input_ids_T.device)
                full_TK[:, past:] = block_mask_TT
                kwargs["attention_mask"] = additive_mask(full_TK, self.dtype)[None, None]
            return self._decode(input_ids_T, position_ids_T, kwargs)
        self.reserve(session, len(session) + t)
        static = _kv(session).cache.static
        if self.attention in ("flex", "triton") and block_mask_TT is not None and t > 1:
            kv_len_B = torch.full((1,), len(session) + t, dtype=torch.int32, device=self.device)
            mask = prepare_static(
                self.attention, t, static.max_length, kv_len_B, tree_mask_QQ=block_mask_TT
            )
            plan = ForwardPlan(static, self.attention, static_mask=mask)
        else:
            plan = ForwardPlan(static, self.attention, block_mask_TT)
        return self._decode(input_ids_T, position_ids_T, kwargs | {"medusa_plan": plan})

    def _decode(
        self, input_ids_T: torch.Tensor, position_ids_T: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        out = self.decoder(
            input_ids=input_ids_T[None], position_ids=position_ids_T[None], use_cache=True, **kwargs
        )
        return out.last_hidden_state[0]

    @torch.inference_mode()
    def forward_rows(
        self,
        input_ids_BT: torch.Tensor,
        position_ids_BT: torch.Tensor,
        cache: RowKVCache,
        rows: range,
        block_mask_TT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_BTE of T new tokens in each of the B cache rows `rows` (a contiguous range),
        appended to each row after its own valid slots. `block_mask_TT` ([T, T], or [B, T, T]
        for a different structure per row) structures each row's new tokens; None is causal."""
        b, t = input_ids_BT.shape
        if len(rows) != b:
            raise ValueError(f"{b} rows of tokens for the {len(rows)} cache rows {rows}")
        write = cache.begin(rows, t)
        block = causal_block(t, self.device) if block_mask_TT is None else block_mask_TT
        mask = prepare_static(self.attention, t, write.k_len, write.kv_len_B, tree_mask_QQ=block)
        plan = ForwardPlan(None, self.attention, static_mask=mask, rows=write)
        out = self.decoder(
            input_ids=input_ids_BT,
            position_ids=position_ids_BT,
            use_cache=True,
            **{self._cache_kw: RowsCache(cache), "medusa_plan": plan},
        )
        return out.last_hidden_state

    @torch.inference_mode()
    def forward_static(
        self,
        input_ids_T: torch.Tensor,
        position_ids_T: torch.Tensor,
        session: Session,
        slots_T: torch.Tensor,
        mask: StaticMask,
    ) -> torch.Tensor:
        """`forward` with device-side bookkeeping only: nothing read on or written to the host.

        The T new keys/values go to cache slots `slots_T` (int64, device); attention masks the
        whole buffer with `mask` (`attention.api.prepare_static`, its kv_len on the device). The
        session's host lengths and token ids are not touched. Needs one of our backends.
        """
        static = session.static
        if static is None:
            raise ValueError("forward_static needs attention='sdpa'/'flex'/'triton'/'reference'")
        plan = ForwardPlan(static, self.attention, static_mask=mask, slots_T=slots_T)
        kwargs = {self._cache_kw: _kv(session).cache, "medusa_plan": plan}
        return self._decode(input_ids_T, position_ids_T, kwargs)

    @torch.inference_mode()
    def logits(self, hidden_TE: torch.Tensor) -> torch.Tensor:
        """logits_TV from the output embedding (with the model's final soft-capping, if any)."""
        logits_TV = self.lm_head(hidden_TE)
        if self.softcap:
            logits_TV = torch.tanh(logits_TV / self.softcap) * self.softcap
        return logits_TV


def _kv(session: Session) -> KVSession:
    if not isinstance(session, KVSession):
        raise TypeError(f"HFModel runs on its own sessions (new_session), not {type(session)}")
    return session


def usable_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, or ValueError (one line) if it is malformed or absent here."""
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"invalid device {str(device)!r}: {err}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"device {str(device)!r}: no CUDA GPU here (torch {torch.__version__}); use --device cpu"
            )
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA GPU(s)")
    return dev


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
