"""An EAGLE-3 drafter (Li et al. 2025, arXiv 2503.01840): one decoder layer over fused base features.

Shape legend (ARCHITECTURE.md): B rows, E hidden size, X = 3 x the target's hidden size (three
auxiliary hidden states side by side), H query heads, G key/value heads, D head dim, S draft
cache slots, Q queries, K keys, F MLP width, M draft vocabulary, V target vocabulary, N tree
nodes, R top-k ranks.

The draft model reads, at base position p, the fusion g_p = fc([a_p^(l1); a_p^(l2); a_p^(l3)])
of three base layers' outputs (low, middle, high: `aux_layers`) and the embedding of the next
token x_{p+1}, and predicts x_{p+2}:

    u   = [input_layernorm(emb(x_{p+1})); hidden_norm(h_p)]            (2E: q/k/v read 2E)
    r   = h_p + o_proj(Attn(q(u), k(u), v(u)))                        (RoPE at position p)
    s_p = r + down(SiLU(gate(n)) * up(n)),  n = post_attention_layernorm(r)
    logits_M = lm_head(norm(s_p)),  target id = draft id + d2t[draft id]

with h_p = g_p for positions the base model has verified and h_p = s_{p-1} (the draft's own
pre-norm output) for draft steps beyond them, as in EAGLE-3's "training-time test". The layer
attends over its own keys: those of every verified position (the draft cache, kept across steps)
and, inside a tree, those of the node's ancestors (the tree mask). The embedding is the base
model's, frozen and shared; the draft scores M frequent tokens (`d2t` maps them back).

Parameter names are those of the published layout that SGLang (`LlamaForCausalLMEagle3`,
python/sglang/srt/models/llama_eagle3.py) and vLLM (`Eagle3LlamaForCausalLM`,
vllm/model_executor/models/llama_eagle3.py) load, so export is a dump (`export.py`);
`eagle3_config_json` / `config_from_json` translate the config.

Auxiliary layer ids count like SGLang's `eagle_config.eagle_aux_hidden_state_layer_ids`: id k is
the output of decoder layer k (0-based), i.e. the residual stream entering layer k + 1. vLLM's
top-level `eagle_aux_hidden_state_layer_ids` names the layer whose input is captured (k + 1):
the export writes both. Default: the inputs of layers 2, L/2 and L - 3 (SGLang's and vLLM's
default), i.e. ids (1, L/2 - 1, L - 4); for shallow models where these collide, (0, L/2, L - 2).

Draft state across steps (`Eagle3Drafter`): the loop tells the drafter after each commit which
rows of the verification forward it kept (`on_commit`); their captured features wait there until
the next draft, which runs them through the layer in one block (causal, on top of the cache):
the cache is thus committed along the accepted path with the base model's true features, as the
base cache is, and the tree's own draft rows are dropped after each step. A cache row is reused
while the token ids it was computed from are unchanged (checked on the host each draft).

Kept in one file with its drafter (over ~400 lines): the drafter needs the layer's pieces and
`drafters.py` imports this module (`make_drafter`), so the drafter cannot live there either.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from attention.api import BACKENDS, attention
from medusa_engine.config import HeadsError
from medusa_engine.dynamic_tree import DynamicTree, grow
from medusa_engine.int8_linear import Int8Linear, int8_supported
from medusa_engine.recurrent_heads import RMSNorm
from medusa_engine.tree import TreeBuffers

log = logging.getLogger(__name__)

MAX_UNROLL = 2  # trained for J draft steps, a dynamic tree may grow MAX_UNROLL * J deep


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """Output ids of the three base layers EAGLE-3 fuses by default (see the module docstring)."""
    ids = (1, num_layers // 2 - 1, num_layers - 4)
    if len(set(ids)) == 3 and min(ids) >= 0:
        return ids
    return (0, num_layers // 2, max(num_layers - 2, 0))


@dataclass(frozen=True)
class Eagle3Config:
    """An EAGLE-3 draft model for a base model of `target_hidden_size` / `vocab_size`.

    `num_heads`: draft steps it was trained to unroll (a static tree goes that deep);
    `aux_layers`: () = `default_aux_layers` of the base model it runs on.
    """

    hidden_size: int
    vocab_size: int
    draft_vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    target_hidden_size: int = 0  # 0 = hidden_size
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # None / "default", or a "llama3" rope
    max_position_embeddings: int = 2048
    aux_layers: tuple[int, ...] = ()
    num_heads: int = 4
    base_model: str = ""
    confidence_temperature: tuple[float, ...] = ()
    kind: str = field(default="eagle3")

    def __post_init__(self) -> None:
        for name in ("aux_layers", "confidence_temperature"):  # JSON gives lists
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.target_hidden_size:
            object.__setattr__(self, "target_hidden_size", self.hidden_size)
        if self.kind != "eagle3":
            raise ValueError(f"Eagle3Config needs kind='eagle3', got {self.kind!r}")
        for name in (
            "hidden_size",
            "vocab_size",
            "draft_vocab_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "intermediate_size",
            "num_heads",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(
                    f"eagle3 {name} must be a positive integer, got {getattr(self, name)}"
                )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("eagle3 num_attention_heads must be a multiple of num_key_value_heads")
        if self.draft_vocab_size > self.vocab_size:
            raise ValueError(
                f"draft_vocab_size {self.draft_vocab_size} > vocab_size {self.vocab_size}"
            )
        if self.aux_layers and (len(self.aux_layers) != 3 or min(self.aux_layers) < 0):
            raise ValueError(f"eagle3 needs three aux layer ids >= 0, got {list(self.aux_layers)}")
        if any(not t > 0 for t in self.confidence_temperature):
            raise ValueError("confidence_temperature must be positive")
        rope = (self.rope_scaling or {}).get("rope_type", "default")
        if rope not in ("default", "llama3"):
            raise ValueError(f"eagle3 supports default and llama3 RoPE, not {rope!r}")

    def check_fits(self, hidden_size: int, vocab_size: int, model_name: str = "") -> None:
        """HeadsError unless the base model has this hidden size (the embedding is shared) and
        vocabulary."""
        if (self.target_hidden_size, self.hidden_size, self.vocab_size) != (
            hidden_size,
            hidden_size,
            vocab_size,
        ):
            trained = f" (trained for {self.base_model})" if self.base_model else ""
            raise HeadsError(
                f"eagle3 heads{trained} expect hidden size {self.target_hidden_size} (draft "
                f"{self.hidden_size}) and vocabulary {self.vocab_size}, but the model"
                f"{' ' + model_name if model_name else ''} has {hidden_size} and {vocab_size}"
            )

    def confidence_temp(self, depth: int) -> float:
        temps = self.confidence_temperature
        return temps[min(depth, len(temps)) - 1] if temps else 1.0


def rope_inv_freq(config: Eagle3Config) -> torch.Tensor:
    """inv_freq_{D/2} of the layer's RoPE (Llama's; "llama3" rescales long wavelengths)."""
    d = config.head_dim
    inv = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", "default") == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        mixed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        inv = torch.where(medium, mixed, scaled)
    return inv.float()


def apply_rope(x_BHD: torch.Tensor, cos_BD: torch.Tensor, sin_BD: torch.Tensor) -> torch.Tensor:
    half = x_BHD.shape[-1] // 2
    rotated = torch.cat([-x_BHD[..., half:], x_BHD[..., :half]], dim=-1)
    return x_BHD * cos_BD[:, None] + rotated * sin_BD[:, None]


class Eagle3Attention(nn.Module):
    """q/k/v read 2E features ([embedding; state]); o_proj writes E."""

    def __init__(self, c: Eagle3Config) -> None:
        super().__init__()
        e, d = c.hidden_size, c.head_dim
        self.q_proj = nn.Linear(2 * e, c.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(2 * e, c.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(2 * e, c.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * d, e, bias=False)


class Eagle3MLP(nn.Module):
    """SwiGLU: down(SiLU(gate x) * up x)."""

    def __init__(self, c: Eagle3Config) -> None:
        super().__init__()
        e, f = c.hidden_size, c.intermediate_size
        self.gate_proj = nn.Linear(e, f, bias=False)
        self.up_proj = nn.Linear(e, f, bias=False)
        self.down_proj = nn.Linear(f, e, bias=False)

    def forward(self, x_BE: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_BE)) * self.up_proj(x_BE))


class Eagle3Layer(nn.Module):
    """The decoder layer, split around its attention so that callers choose the keys and mask
    (`qkv`, then any attention, then `finish`)."""

    def __init__(self, c: Eagle3Config) -> None:
        super().__init__()
        self.config = c
        self.self_attn = Eagle3Attention(c)
        self.mlp = Eagle3MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def qkv(
        self,
        emb_BE: torch.Tensor,
        hidden_BE: torch.Tensor,
        cos_BD: torch.Tensor,
        sin_BD: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q_BHD, k_BGD, v_BGD), RoPE applied."""
        c, b = self.config, emb_BE.shape[0]
        u_B2E = torch.cat([self.input_layernorm(emb_BE), self.hidden_norm(hidden_BE)], dim=-1)
        q = self.self_attn.q_proj(u_B2E).view(b, c.num_attention_heads, c.head_dim)
        k = self.self_attn.k_proj(u_B2E).view(b, c.num_key_value_heads, c.head_dim)
        v = self.self_attn.v_proj(u_B2E).view(b, c.num_key_value_heads, c.head_dim)
        return apply_rope(q, cos_BD, sin_BD), apply_rope(k, cos_BD, sin_BD), v

    def finish(self, attn_BHD: torch.Tensor, hidden_BE: torch.Tensor) -> torch.Tensor:
        """The layer's output state s (pre-norm) from the attention output and its input h."""
        r_BE = hidden_BE + self.self_attn.o_proj(attn_BHD.flatten(1))
        return r_BE + self.mlp(self.post_attention_layernorm(r_BE))


class Eagle3Heads(nn.Module):
    """fc + midlayer + norm + lm_head + d2t: the published EAGLE-3 layout's tensors."""

    d2t: torch.Tensor  # int64 [M]: target id - draft id (a buffer, saved)

    def __init__(self, config: Eagle3Config) -> None:
        super().__init__()
        self.config = config
        c = config
        self.fc = nn.Linear(3 * c.target_hidden_size, c.hidden_size, bias=False)
        self.midlayer = Eagle3Layer(c)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.int64))
        self._inv_freq = rope_inv_freq(c)  # fp32, not a buffer: `.to(bf16)` would round it

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    @property
    def draft_vocab_M(self) -> torch.Tensor:
        """Target token id of each draft id."""
        return torch.arange(self.d2t.numel(), device=self.d2t.device) + self.d2t

    def set_draft_vocab(self, token_ids_M: torch.Tensor) -> None:
        """Score these target ids (increasing); d2t = id - draft index."""
        if token_ids_M.shape != self.d2t.shape:
            raise ValueError(
                f"draft vocabulary of {token_ids_M.numel()} ids, config says {self.d2t.numel()}"
            )
        self.d2t.copy_(
            token_ids_M.to(self.d2t.device) - torch.arange(self.d2t.numel(), device=self.d2t.device)
        )

    def rope(self, positions_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos_BD, sin_BD) in the layer's dtype."""
        if self._inv_freq.device != positions_B.device:
            self._inv_freq = self._inv_freq.to(positions_B.device)
        angles = positions_B.float()[:, None] * self._inv_freq[None]
        angles_BD = torch.cat([angles, angles], dim=-1)
        dtype = self.norm.weight.dtype  # (fc may be an int8 copy's)
        return angles_BD.cos().to(dtype), angles_BD.sin().to(dtype)

    def logits(self, state_BE: torch.Tensor) -> torch.Tensor:
        """logits_BM over the draft vocabulary."""
        return self.lm_head(self.norm(state_BE))

    def check_compatible(self, hidden_size: int, vocab_size: int, model_name: str = "") -> None:
        self.config.check_fits(hidden_size, vocab_size, model_name)
        ids = self.draft_vocab_M
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise HeadsError("the eagle3 heads' d2t maps draft ids outside the model's vocabulary")


# ---- the published layout's config.json ----------------------------------------------------


def eagle3_config_json(c: Eagle3Config) -> dict[str, Any]:
    """config.json of the published EAGLE-3 layout (SGLang / vLLM `LlamaForCausalLMEagle3`),
    plus our own fields under "medusa_engine" (ignored by the loaders)."""
    if not c.aux_layers:
        raise HeadsError("these eagle3 heads name no aux layers: export needs them")
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": 1,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling,
        "max_position_embeddings": c.max_position_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "vocab_size": c.vocab_size,
        "draft_vocab_size": c.draft_vocab_size,
        "target_hidden_size": c.target_hidden_size,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": list(c.aux_layers),  # SGLang: output of layer k
            "use_aux_hidden_state": True,
        },
        # vLLM reads this one at the top level and counts the layer whose input it captures
        "eagle_aux_hidden_state_layer_ids": [k + 1 for k in c.aux_layers],
        "medusa_engine": {
            "num_heads": c.num_heads,
            "base_model": c.base_model,
            "confidence_temperature": list(c.confidence_temperature),
        },
    }


def _int(raw: dict[str, Any], key: str, default: int | None = None) -> int:
    """raw[key] (`default` when absent or null) as an int; ValueError otherwise."""
    value = default if raw.get(key) is None else raw[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return value


def config_from_json(raw: dict[str, Any]) -> Eagle3Config:
    """Eagle3Config from an EAGLE-3 layout config.json (ours or a published one); ValueError
    (one line) for what this drafter cannot run."""
    if _int(raw, "num_hidden_layers", 1) != 1:
        raise ValueError(f"{raw['num_hidden_layers']} draft layers: only one is supported")
    if raw.get("tie_word_embeddings"):
        raise ValueError("tie_word_embeddings: true (an EAGLE-3 drafter has its own lm_head)")
    if raw.get("attention_bias") or raw.get("mlp_bias") or raw.get("bias"):
        raise ValueError("biased draft layers are not supported")
    hidden, heads = _int(raw, "hidden_size"), _int(raw, "num_attention_heads")
    rope = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or (
        rope if rope.get("rope_type", "default") != "default" else None
    )
    eagle = raw.get("eagle_config") or {}
    if eagle.get("eagle_aux_hidden_state_layer_ids"):
        aux = [int(k) for k in eagle["eagle_aux_hidden_state_layer_ids"]]
    elif raw.get("eagle_aux_hidden_state_layer_ids"):  # vLLM's count: the layer read from
        aux = [int(k) - 1 for k in raw["eagle_aux_hidden_state_layer_ids"]]
    else:
        aux = []
    ours = raw.get("medusa_engine") or {}
    vocab = _int(raw, "vocab_size")
    return Eagle3Config(
        hidden_size=hidden,
        vocab_size=vocab,
        draft_vocab_size=_int(raw, "draft_vocab_size", vocab),
        num_attention_heads=heads,
        num_key_value_heads=_int(raw, "num_key_value_heads", heads),
        head_dim=_int(raw, "head_dim", hidden // heads),
        intermediate_size=_int(raw, "intermediate_size"),
        target_hidden_size=_int(raw, "target_hidden_size", hidden),
        rms_norm_eps=float(raw.get("rms_norm_eps") or 1e-6),
        rope_theta=float(raw.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        rope_scaling=scaling,
        max_position_embeddings=_int(raw, "max_position_embeddings", 2048),
        aux_layers=tuple(aux),
        num_heads=int(ours.get("num_heads", 4)),
        base_model=str(ours.get("base_model", "")),
        confidence_temperature=tuple(ours.get("confidence_temperature", ())),
    )


# ---- drafting ------------------------------------------------------------------------------


class AuxSource(Protocol):
    """The auxiliary hidden states of the base model's latest forward
    (`hf_adapter.aux_hidden.AuxCapture`)."""

    def rows(self) -> torch.Tensor:
        """aux_TX of the latest forward's T tokens ([a^(l1); a^(l2); a^(l3)] per row)."""
        ...

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids_T, position_ids_T) of the latest forward (on the device)."""
        ...


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):
        return n
    return next(i for i in range(n) if a[i] != b[i])


class _Memory:
    """One sequence's draft state: captured features of kept positions and the draft cache.

    Feature row p is valid while `feat_ids[:p + 1]` (the tokens it was computed from) are the
    sequence's; draft row p while `row_ids[:p + 2]` are (it also read x_{p+1})."""

    def __init__(self, heads: Eagle3Heads, device: torch.device, dtype: torch.dtype) -> None:
        c = heads.config
        self.feat_SX = torch.zeros(0, 3 * c.target_hidden_size, device=device, dtype=dtype)
        self.feat_ids: list[int] = []
        self.k_GSD = torch.zeros(c.num_key_value_heads, 0, c.head_dim, device=device, dtype=dtype)
        self.v_GSD = torch.zeros_like(self.k_GSD)
        self.s_SE = torch.zeros(0, c.hidden_size, device=device, dtype=dtype)
        self.row_ids: list[int] = []
        self.rows = 0

    def reserve(self, n: int) -> None:
        """Room for n positions (buffers grow by doubling)."""
        if self.feat_SX.shape[0] < n:
            size = max(n, 2 * self.feat_SX.shape[0], 64)
            self.feat_SX = _grow(self.feat_SX, size, 0)
        if self.k_GSD.shape[1] < n:
            size = max(n, 2 * self.k_GSD.shape[1], 64)
            self.k_GSD, self.v_GSD = _grow(self.k_GSD, size, 1), _grow(self.v_GSD, size, 1)
            self.s_SE = _grow(self.s_SE, size, 0)

    def store(self, start: int, aux_TX: torch.Tensor, ids: Sequence[int]) -> None:
        """Features of positions start.. (ids[p] = token at p, for p < start + T)."""
        end = start + aux_TX.shape[0]
        self.reserve(end)
        self.feat_SX[start:end] = aux_TX
        self.feat_ids = list(ids[:end])
        self.rows = min(self.rows, start)  # rows at or after `start` read old features


def _grow(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = size
    out = x.new_zeros(shape)
    out.narrow(dim, 0, x.shape[dim]).copy_(x)
    return out


class _Int8As(nn.Module):
    """An `Int8Linear` whose output has the drafter's dtype (the cache and norms expect it)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.dtype = Int8Linear(linear.weight), dtype

    def forward(self, x_BI: torch.Tensor) -> torch.Tensor:
        return self.inner(x_BI).to(self.dtype)


def _int8_copy(heads: Eagle3Heads, dtype: torch.dtype) -> Eagle3Heads:
    """A copy of `heads` whose matrices (q/k/v/o, the MLP, lm_head) are int8 (the caller's heads
    are left as they are).

    `fc` stays in float: it reads the base model's raw residual streams, where a few positions
    (the first token's above all) are orders of magnitude larger than the rest, and an int8 call
    quantises all its rows with one activation scale, so a prompt's features fused in one call
    lost almost all precision (bf16 SmolLM2: draft top-1 agreeing with the float layer on 10 of
    46 positions instead of 45). It runs once per committed position, not per tree node. The
    other matrices read normalised rows."""
    out = copy.deepcopy(heads)
    layer = out.midlayer
    for parent, names in (
        (out, ("lm_head",)),
        (layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
        (layer.mlp, ("gate_proj", "up_proj", "down_proj")),
    ):
        for name in names:
            parent.add_module(name, _Int8As(getattr(parent, name), dtype))
    return out


class Eagle3Drafter:
    """EAGLE-3 heads as a `drafters.Drafter`; the base model's aux hidden states come from
    `capture` (default: forward hooks on the model's decoder layers, `hf_adapter/aux_hidden.py`).

    Stateful: the decode loop calls `on_commit` after each session commit (`generate.py`). A draft
    for a sequence whose features were never committed adopts them from the latest forward when
    that was a causal one over consecutive positions of this text (teacher-forced calibration),
    else runs one base forward over the text for them (callers outside the decode loop only).
    Needs the session's token ids on the host: static steps (`static_step.py`) are refused.

    `int8` (default: wherever `int8_supported`, i.e. on a CPU) runs the heads' matrices with int8
    weights, as `drafters.RecurrentDrafter` does; drafts may differ slightly, verification
    still decides.
    """

    def __init__(
        self,
        heads: Eagle3Heads,
        model: Any,
        capture: AuxSource | None = None,
        int8: bool | None = None,
    ) -> None:
        heads.check_compatible(model.hidden_size, model.vocab_size, model.name)
        supported = int8_supported(model.device)
        if int8 and not supported:
            raise ValueError(
                f"int8 drafting needs a CPU with a quantized engine, not {model.device}"
            )
        self.int8 = supported if int8 is None else int8
        self.heads = heads.to(device=model.device, dtype=model.dtype).eval()
        if self.int8:
            self.heads = _int8_copy(self.heads, model.dtype)
        self.config = heads.config
        self.num_heads = heads.num_heads
        self.embed = model.embed_tokens
        self.vocab_M = self.heads.draft_vocab_M
        self.draft_vocab_size = int(self.vocab_M.numel())
        self.backend = model.attention if model.attention in BACKENDS else "sdpa"
        self.device, self.dtype = model.device, model.dtype
        self.model = model
        if capture is None:
            from medusa_engine.hf_adapter.aux_hidden import AuxCapture, decoder_layers

            ids = self.config.aux_layers or default_aux_layers(len(decoder_layers(model)))
            capture = AuxCapture(model, ids)
        self.capture = capture
        self.memory = _Memory(self.heads, model.device, model.dtype)

    @property
    def max_depth(self) -> int:
        return MAX_UNROLL * self.num_heads

    def _ids(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    # ---- state --------------------------------------------------------------------------

    @torch.inference_mode()
    def on_commit(self, token_ids: Sequence[int], past: int, nodes: Sequence[int] | None) -> None:
        """After `session.commit(past, tokens, nodes)`: keep the latest forward's rows `nodes`
        (None: all) as the features of positions past.. (`token_ids`: the session's, after)."""
        aux_TX = self.capture.rows()
        if nodes is not None:
            aux_TX = aux_TX[torch.as_tensor(list(nodes), device=aux_TX.device)]
        self.memory.store(past, aux_TX, token_ids)

    def _adopt(self, token_ids: Sequence[int], valid: int) -> bool:
        """Take the latest forward's rows as features when it was causal over consecutive
        positions from at most `valid` and fed these tokens (one host sync; not in the loop)."""
        ids_T, pos_T = self.capture.inputs()
        t = ids_T.shape[0]
        start = int(pos_T[0])
        if start > valid or start + t < len(token_ids):
            return False
        if not torch.equal(pos_T.cpu(), torch.arange(start, start + t)):
            return False
        if ids_T[: len(token_ids) - start].tolist() != list(token_ids[start:]):
            return False
        self.memory.store(start, self.capture.rows(), [*token_ids[:start], *ids_T.tolist()])
        return True

    def _sync(self, token_ids: Sequence[int], root: int) -> torch.Tensor:
        """Run the draft layer over the positions not in the draft cache; returns the state at
        the last one (position P - 1, read with the root x_P): the tree's root state."""
        mem, p = self.memory, len(token_ids)
        full = [*token_ids, root]
        if p == 0:
            raise ValueError(
                "eagle3 drafting reads the session's token ids (static steps pass none: "
                "use it without --static-step)"
            )
        valid = _common_prefix(mem.feat_ids, token_ids)
        if valid < p and not self._adopt(token_ids, valid):
            # Features nobody committed (a caller outside the decode loop): one base forward
            # over the text, then adopt it. The decode loop never comes here.
            log.debug("eagle3: recomputing features of %d positions", p)
            ids = torch.tensor(list(token_ids), device=self.device)
            self.model.forward(ids, torch.arange(p, device=self.device), self.model.new_session())
            if not self._adopt(token_ids, 0):
                raise RuntimeError("eagle3 drafter: the aux capture missed the base forward")
        start = min(mem.rows, p, max(_common_prefix(mem.row_ids, full) - 1, 0))
        if start < p:
            h = self.heads
            pos_B = torch.arange(start, p, device=self.device)
            hidden_BE = h.fc(mem.feat_SX[start:p])
            emb_BE = self.embed(torch.tensor(full[start + 1 : p + 1], device=self.device))
            q_BHD, k_BGD, v_BGD = h.midlayer.qkv(emb_BE, hidden_BE, *h.rope(pos_B))
            mem.reserve(p)
            mem.k_GSD[:, start:p] = k_BGD.transpose(0, 1)
            mem.v_GSD[:, start:p] = v_BGD.transpose(0, 1)
            out = attention(
                q_BHD.transpose(0, 1)[None],
                mem.k_GSD[None, :, :p],
                mem.v_GSD[None, :, :p],
                backend=self.backend,
                causal=p - start > 1,
            )
            assert isinstance(out, torch.Tensor)
            mem.s_SE[start:p] = h.midlayer.finish(out[0].transpose(0, 1), hidden_BE)
            mem.rows, mem.row_ids = p, full
        return mem.s_SE[p - 1]

    # ---- the tree ---------------------------------------------------------------------

    def _expander(self, token_ids: Sequence[int], root: torch.Tensor):
        """expand(rows_B, tokens_B) -> logits_BM, as `dynamic_tree.grow` calls it: the first
        call scores the root's children; each next one the children of B nodes whose parents
        are rows `rows_B` of the previous call (tree rows attend to the cache + ancestors)."""
        h, mem = self.heads, self.memory
        p = len(token_ids)
        state: dict[str, Any] = {"depth": 0}

        def expand(rows_B: torch.Tensor, tokens_B: torch.Tensor) -> torch.Tensor:
            depth = state["depth"]
            state["depth"] = depth + 1
            if depth == 0:
                s_1E = self._sync(token_ids, int(root))
                state.update(s=s_1E[None], entry=None, q=None, k=None, v=None, anc=None)
                return h.logits(s_1E[None])
            b = rows_B.shape[0]
            hidden_BE = state["s"][rows_B]
            pos_B = torch.full((b,), p - 1 + depth, device=self.device)
            q_BHD, k_BGD, v_BGD = h.midlayer.qkv(self.embed(tokens_B), hidden_BE, *h.rope(pos_B))
            n_old = 0 if state["q"] is None else state["q"].shape[0]
            anc = torch.eye(n_old + b, dtype=torch.bool, device=self.device)
            if state["anc"] is not None:
                anc[:n_old, :n_old] = state["anc"]
                anc[n_old:, :n_old] = state["anc"][state["entry"][rows_B]]
            q, k, v = (
                new if state[name] is None else torch.cat([state[name], new])
                for name, new in (("q", q_BHD), ("k", k_BGD), ("v", v_BGD))
            )
            out = attention(
                q.transpose(0, 1)[None],
                torch.cat([mem.k_GSD[:, :p], k.transpose(0, 1)], dim=1)[None],
                torch.cat([mem.v_GSD[:, :p], v.transpose(0, 1)], dim=1)[None],
                backend=self.backend,
                tree_mask_QQ=anc,
            )
            assert isinstance(out, torch.Tensor)
            s_BE = h.midlayer.finish(out[0, :, n_old:].transpose(0, 1), hidden_BE)
            entry_B = torch.arange(n_old, n_old + b, device=self.device)
            state.update(s=s_BE, entry=entry_B, q=q, k=k, v=v, anc=anc)
            return h.logits(s_BE)

        return expand

    @torch.inference_mode()
    def draft(
        self,
        hidden_E: torch.Tensor,
        root: torch.Tensor,
        tree: TreeBuffers,
        token_ids: Sequence[int],
    ) -> torch.Tensor:
        """tree_tokens_N: depth by depth, the nodes with children expanded in one batch."""
        tokens_N = root.reshape(1).repeat(tree.num_nodes)
        expand = self._expander(token_ids, root)
        depth, parent = tree.depth_N.tolist(), tree.parent_N.tolist()
        rank = ((tree.topk_index_N - 1) % tree.top_k).tolist()
        has_children = set(parent[1:])
        rows: dict[int, int] = {}  # node -> its row in the previous expansion
        expanded = [0]  # nodes whose children this depth scores
        for d in range(tree.max_depth):
            children = [i for i in range(tree.num_nodes) if depth[i] == d + 1]
            if not children:
                break
            parent_rows = self._ids([rows.get(parent[i], 0) for i in expanded])
            logits_BM = expand(parent_rows, tokens_N[self._ids(expanded)])
            top_BR = logits_BM.topk(tree.top_k, dim=-1).indices
            rows = {node: r for r, node in enumerate(expanded)}
            slots = self._ids([rows[parent[c]] * tree.top_k + rank[c] for c in children])
            tokens_N[self._ids(children)] = self.vocab_M[top_BR.flatten()[slots]]
            expanded = [c for c in children if c in has_children]
        return tokens_N

    @torch.inference_mode()
    def draft_dynamic(
        self,
        hidden_E: torch.Tensor,
        root: torch.Tensor,
        spec: DynamicTree,
        token_ids: Sequence[int],
    ) -> tuple[torch.Tensor, TreeBuffers]:
        expand = self._expander(token_ids, root)
        temp = self.config.confidence_temp
        depth = iter(range(1, spec.depth + 1))

        def calibrated(rows_B: torch.Tensor, tokens_B: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(expand(rows_B, tokens_B).float() / temp(next(depth)), dim=-1)

        return grow(spec, root, calibrated, self.vocab_M)

    @torch.inference_mode()
    def path_topk(
        self, hidden_E: torch.Tensor, path_L: Sequence[int], token_ids: Sequence[int], top_k: int
    ) -> torch.Tensor:
        root = torch.tensor(path_L[0], device=self.device)
        expand, out = self._expander(token_ids, root), []
        row = torch.zeros(1, dtype=torch.int64, device=self.device)
        for d in range(len(path_L)):
            tokens = torch.tensor([path_L[d]], device=self.device)
            out.append(expand(row, tokens).topk(top_k, dim=-1).indices[0])
        return self.vocab_M[torch.stack(out)]
