"""The only door into transformers.

Shape legend: T = tokens fed in one forward, N = tree nodes, K = keys in the cache after the
forward, E = hidden size, V = vocabulary, B batch, H query heads, G key/value heads, D head dim.

The base model is driven through its public inputs and extension points only; no modeling file is
copied or patched. Two attention paths, chosen per model (`attention=`):

* `"hf"` (default): the model's own attention (SDPA) over a `DynamicCache`, with the tree given as
  a 4D additive attention mask (transformers returns a 4D mask as-is) and explicit position ids.
  Compaction rewrites the `DynamicCache` layers' `keys`/`values` tensors (one gather per layer),
  because `crop`'s argument changed meaning between versions.
* one of `attention.api.BACKENDS` (`sdpa`, `flex`, `triton`, `reference`): our attention,
  registered through transformers' `AttentionInterface`, over `EngineCache`, a transformers
  `Cache` backed by `attention.kv_cache.StaticKVCache` (preallocated per request, compaction by
  one gather over all layers). The tree travels as a keyword argument that transformers forwards
  to the attention function; no mask tensor is built (transformers skips mask creation for an
  attention implementation without a registered mask function). `flex` and `triton` verify a
  tree over the whole preallocated buffer with the valid length as a device tensor
  (`attention.api.prepare_static`), so their shapes stay fixed as the cache grows (flex compiles
  once per tree); a forward without a tree (prefill, plain decoding) runs `flex` requests on SDPA,
  as every prompt length would otherwise be a compilation.
* `forward_static`: the same forward with no host-side bookkeeping at all (cache slots and mask
  prepared on the device by the caller), for a step captured in a CUDA graph
  (`medusa_engine/static_step.py`).
* On CUDA with our backends, Llama-style RMSNorms run as one Triton kernel each
  (`attention.rmsnorm.fuse_rms_norms`; `fused_norms=False` keeps transformers' own); `restore()`
  hands the model back with its own attention and norms.

Version differences live here: the cache keyword is `cache` from transformers 5.24
(`past_key_values` is deprecated there) and `past_key_values` before; we read the decoder's
signature once. We call the decoder and the output embedding ourselves (rather than `model(...)`)
to get the last hidden state the heads need without materialising every layer's hidden states.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface, Cache, DynamicCache

from attention.api import (
    BACKENDS,
    StaticMask,
    attention,
    attention_static,
    check_backend,
    prepare_static,
)
from attention.kv_cache import StaticKVCache
from attention.masks import additive_mask
from medusa_engine.models import ModelSource, resolve_model

log = logging.getLogger(__name__)

DTYPES = {"auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ATTENTION_CHOICES = ("hf", *BACKENDS)
ATTN_NAME = "medusa_engine"  # our entry in transformers' AttentionInterface
MIN_SLOTS = 256  # smallest static cache; it grows by doubling when a request needs more


class ContextOverflowError(ValueError):
    """A prompt (or conversation) longer than the model's context; one line for the CLI."""


def engine_attention(
    module: Any,
    query_BHTD: torch.Tensor,
    key_BGKD: torch.Tensor,
    value_BGKD: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature over `attention.api.attention`.

    Keyword `medusa_block_TT` (bool) is the structure of the new tokens (a tree); without it a
    multi-token forward is causal. `medusa_backend` names the backend. Returns out_BTHD.
    """
    if dropout:
        raise ValueError("the engine's attention is for inference: dropout must be 0")
    window = kwargs.get("sliding_window")
    if window is not None and key_BGKD.shape[2] > window:
        raise NotImplementedError("sliding-window layers need attention='hf'")
    static: StaticMask | None = kwargs.get("medusa_static")
    if static is not None:  # whole buffers, valid length on the device
        out_BHTD = attention_static(query_BHTD, key_BGKD, value_BGKD, static, scaling)
        return out_BHTD.transpose(1, 2), None
    t = query_BHTD.shape[2]
    block = kwargs.get("medusa_block_TT")
    backend = kwargs.get("medusa_backend", "sdpa")
    out = attention(
        query_BHTD, key_BGKD, value_BGKD, backend="sdpa" if backend == "flex" else backend,
        causal=block is None and t > 1, tree_mask_QQ=block, scale=scaling,
    )  # fmt: skip
    assert isinstance(out, torch.Tensor)
    return out.transpose(1, 2), None


class EngineCache(Cache):
    """A transformers `Cache` over `StaticKVCache`: `update` appends in place, no concatenation."""

    def __init__(self, static: StaticKVCache) -> None:
        super().__init__(layers=[])
        self.static = static
        # Set for one forward by HFModel: return every slot (attention masks by a device length),
        # and, for `forward_static`, write at these device slots without touching host lengths.
        self.whole_buffers = False
        self.write_slots: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.write_slots is not None:
            return self.static.write(layer_idx, self.write_slots, key_states, value_states)
        valid = self.static.append(layer_idx, key_states, value_states)
        return self.static.buffers(layer_idx) if self.whole_buffers else valid

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.static.layer_length(layer_idx)

    def __len__(self) -> int:
        return self.static.num_layers


@dataclass
class KVSession:
    """A KV cache and the token ids whose keys/values it holds, in order (owned by the caller).

    Reusing a session lets the next request prefill only what is new (multi-turn chat).
    """

    cache: Any
    token_ids: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.token_ids)


def cache_keyword(module: torch.nn.Module) -> str:
    """The name a transformers model's forward takes its cache by: `cache` from 5.24 on
    (`past_key_values` is deprecated there), `past_key_values` before."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class HFModel:
    """A causal LM from transformers, seen as decoder + LM head over an explicit KV cache."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        name: str = "",
        attention: str = "hf",
        fused_norms: bool | None = None,
    ):
        """`attention`: "hf" (transformers' own) or one of our backends. `fused_norms`: run
        Llama-style RMSNorms as one Triton kernel each (`attention.rmsnorm`); default on CUDA
        with our backends. `restore()` gives the model back as it came."""
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
            from attention.rmsnorm import fuse_rms_norms

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
            return KVSession(DynamicCache(config=self.config))
        return KVSession(EngineCache(self._allocate(capacity)))

    def _allocate(self, slots: int) -> StaticKVCache:
        c = self.text_config
        heads = int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
        head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
        return StaticKVCache.allocate(
            num_layers=int(c.num_hidden_layers), batch=1, kv_heads=heads, head_dim=head_dim,
            max_length=max(slots, MIN_SLOTS), dtype=self.dtype, device=self.device,
        )  # fmt: skip

    def reserve(self, session: KVSession, tokens: int) -> None:
        """Make sure the session's cache can hold `tokens` tokens (static caches grow by doubling)."""
        cache = session.cache
        if not isinstance(cache, EngineCache) or cache.static.max_length >= tokens:
            return
        bigger = self._allocate(max(tokens, 2 * cache.static.max_length))
        for layer in range(bigger.num_layers):
            bigger.append(layer, *cache.static.valid(layer))
        cache.static = bigger

    # ---- forward ----------------------------------------------------------------------------

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
        kwargs: dict[str, Any] = {self._cache_kw: session.cache}
        if self.attention in ("flex", "triton") and block_mask_TT is not None and t > 1:
            self.reserve(session, len(session) + t)
            cache = session.cache
            kv_len_B = torch.full((1,), len(session) + t, dtype=torch.int32, device=self.device)
            mask = prepare_static(
                self.attention, t, cache.static.max_length, kv_len_B, tree_mask_QQ=block_mask_TT
            )
            cache.whole_buffers = True
            try:
                return self._decode(input_ids_T, position_ids_T, kwargs | {"medusa_static": mask})
            finally:
                cache.whole_buffers = False
        if self.attention != "hf":
            self.reserve(session, len(session) + t)
            kwargs |= {"medusa_backend": self.attention, "medusa_block_TT": block_mask_TT}
        elif block_mask_TT is not None and t > 1:
            past = len(session)
            full_TK = torch.ones(t, past + t, dtype=torch.bool, device=input_ids_T.device)
            full_TK[:, past:] = block_mask_TT
            kwargs["attention_mask"] = additive_mask(full_TK, self.dtype)[None, None]
        return self._decode(input_ids_T, position_ids_T, kwargs)

    def _decode(
        self, input_ids_T: torch.Tensor, position_ids_T: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        out = self.decoder(
            input_ids=input_ids_T[None], position_ids=position_ids_T[None], use_cache=True, **kwargs
        )
        return out.last_hidden_state[0]

    @torch.inference_mode()
    def forward_static(
        self,
        input_ids_T: torch.Tensor,
        position_ids_T: torch.Tensor,
        session: KVSession,
        slots_T: torch.Tensor,
        mask: StaticMask,
    ) -> torch.Tensor:
        """`forward` with device-side bookkeeping only: nothing read on or written to the host.

        The T new keys/values go to cache slots `slots_T` (int64, device); attention masks the
        whole buffer with `mask` (`attention.api.prepare_static`, its kv_len on the device). The
        session's host lengths and token ids are not touched. Needs one of our backends.
        """
        cache = session.cache
        if not isinstance(cache, EngineCache):
            raise ValueError("forward_static needs attention='sdpa'/'flex'/'triton'/'reference'")
        cache.write_slots = slots_T
        try:
            kwargs = {self._cache_kw: cache, "medusa_static": mask}
            return self._decode(input_ids_T, position_ids_T, kwargs)
        finally:
            cache.write_slots = None

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
            gather = torch.as_tensor(keep_T, device=self.device)
        cache = session.cache
        if isinstance(cache, EngineCache):
            if gather is not None:
                cache.static.compact(start, gather, validate=False)
            cache.static.crop(min(length, cache.static.length))
            return
        for layer in cache.layers:
            if not getattr(layer, "is_initialized", True) or layer.keys is None:
                continue
            if gather is not None:
                rows = gather + start
                n = rows.shape[0]
                layer.keys[..., start : start + n, :] = layer.keys.index_select(-2, rows)
                layer.values[..., start : start + n, :] = layer.values.index_select(-2, rows)
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


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
