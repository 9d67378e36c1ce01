"""The only door into transformers.

* `model.py`: `HFModel`, a causal LM as decoder + LM head over an explicit KV cache, loading
  (aliases, folders, GGUF, hub ids) and device checks;
* `cache.py`: `KVSession` over transformers' `DynamicCache` or our static `EngineCache`, and our
  attention registered through transformers' `AttentionInterface`;
* `norms.py`: Llama-style RMSNorms swapped for one Triton kernel each (CUDA);
* `chat.py`: the chat-template encoding.

The model is driven through its public inputs and extension points only; no modeling file is
copied or patched.
"""

from medusa_engine.hf_adapter.cache import EngineCache, KVSession
from medusa_engine.hf_adapter.chat import chat_text, encode_chat, encode_prompt, has_chat_template
from medusa_engine.hf_adapter.model import (
    DTYPES,
    HFModel,
    cache_keyword,
    quiet_transformers,
    usable_device,
)
from medusa_engine.model import ContextOverflowError

__all__ = [
    "DTYPES",
    "ContextOverflowError",
    "EngineCache",
    "HFModel",
    "KVSession",
    "cache_keyword",
    "chat_text",
    "encode_chat",
    "encode_prompt",
    "has_chat_template",
    "quiet_transformers",
    "usable_device",
]
