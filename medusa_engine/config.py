"""Frozen, validated configuration dataclasses. CLI flags map one-to-one onto these fields."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from attention.api import BACKENDS
from medusa_engine.models import DEFAULT_MODEL


class HeadsError(ValueError):
    """Heads that cannot be loaded or do not fit the base model; one line for the CLI."""


@dataclass(frozen=True)
class HeadsConfig:
    """K draft heads on the base model's last hidden state (`kind="medusa"`, described here, or
    `kind="recurrent"`, described in `recurrent_heads.py`).

    Each head is `num_layers` residual blocks `x + SiLU(W x + b)` followed by a vocabulary
    projection: the head's own (`shared_lm_head=False`, the published Medusa format) or the base
    model's frozen LM head shared by all heads (`shared_lm_head=True`).

    `out_map` adds, after the blocks, a residual linear map x + U x (U zero-initialised, E x E, no
    bias). Why: SiLU is bounded below (>= -0.28), so the blocks can add to the hidden state but
    hardly cancel it; with a frozen shared LM head a head then stays close to the base model's
    next-token guess. (x + U x) can move the hidden state anywhere, for E^2 parameters per head
    instead of the E x V of an own LM head.
    """

    num_heads: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    shared_lm_head: bool = True
    base_model: str = ""
    out_map: bool = False  # a zero-initialised residual linear map x + U x after the blocks
    kind: str = "medusa"  # "medusa" (independent heads) or "recurrent" (see recurrent_heads.py)
    ffn_size: int = 0  # recurrent: width of the transition MLP
    draft_vocab: int = 0  # recurrent: tokens the heads score (0 = the whole vocabulary)
    # Per-depth temperatures that calibrate the heads' probabilities where a dynamic tree ranks
    # its nodes by them (fit on held-out data by train-heads; () = 1; deeper depths use the last)
    confidence_temperature: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        temps = tuple(float(t) for t in self.confidence_temperature)
        object.__setattr__(self, "confidence_temperature", temps)  # JSON gives a list
        if any(not t > 0 for t in temps):
            raise ValueError(f"confidence_temperature must be positive, got {list(temps)}")
        for name in ("num_heads", "num_layers", "hidden_size", "vocab_size"):
            if getattr(self, name) < (0 if name == "num_layers" else 1):
                raise ValueError(f"HeadsConfig.{name} must be positive, got {getattr(self, name)}")
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"unknown heads kind {self.kind!r}; choose {' or '.join(HEAD_KINDS)}")
        if self.kind == "eagle3":
            raise ValueError("eagle3 heads are described by eagle3.Eagle3Config")
        if self.kind == "recurrent":
            if self.ffn_size < 1 or not self.shared_lm_head:
                raise ValueError("recurrent heads need ffn_size >= 1 and the shared LM head")
            if not 0 <= self.draft_vocab <= self.vocab_size:
                raise ValueError(f"draft_vocab must be in [0, vocab_size], got {self.draft_vocab}")

    def check_fits(self, hidden_size: int, vocab_size: int, model_name: str = "") -> None:
        """Raise `HeadsError` when heads of this config cannot run on a model of this shape."""
        if self.hidden_size != hidden_size or self.vocab_size != vocab_size:
            trained = f" (trained for {self.base_model})" if self.base_model else ""
            raise HeadsError(
                f"heads{trained} expect hidden size {self.hidden_size} and vocabulary "
                f"{self.vocab_size}, but the model{' ' + model_name if model_name else ''} has "
                f"{hidden_size} and {vocab_size}"
            )

    def confidence_temp(self, depth: int) -> float:
        """The confidence temperature of draft depth `depth` (1-based): it calibrates the heads'
        probabilities for ranking dynamic-tree nodes (not the sampling temperature)."""
        temps = self.confidence_temperature
        return temps[min(depth, len(temps)) - 1] if temps else 1.0


HEAD_KINDS = ("medusa", "recurrent", "eagle3")  # eagle3: eagle3.Eagle3Config, not HeadsConfig
ATTENTION_CHOICES = ("hf", *BACKENDS)  # "hf": the model's own attention; else ours
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
# Most nodes of the prompt-lookup branch under the tree's root (`drafters.LookupBranch`); why 16:
# eval/results/cpu-refactor-2026-12-03/README.md, "Figures that left the code".
DEFAULT_LOOKUP = 16
# A longer branch would only ever be verified near the start of a long context (and reserves
# its length in every step's room to the context's end).
MAX_LOOKUP = 256
ACCEPTANCE_RULES = ("lossless", "typical")  # at temperature > 0; greedy is exact match


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen and candidates accepted.

    temperature == 0: greedy; exact-match acceptance (lossless: identical to greedy decoding).
    temperature > 0 with `acceptance="lossless"` (default): rejection sampling of the tree's
    drafts; the output is distributed as plain sampling at that temperature
    (`acceptance.accept_lossless`).
    temperature > 0 with `acceptance="typical"`: Medusa's typical acceptance (Cai et al. 2024,
    Sec. 3.3.1): candidate x is accepted when p(x) > min(epsilon, delta * exp(-H(p))), with
    epsilon = `posterior_threshold`, delta = `posterior_alpha`. Keeps more; not lossless.
    p is softmax(logits / temperature) restricted to the `top_k` likeliest tokens (0: all), then
    to the smallest set of them holding `top_p` of the probability (1: all), as in HF `generate`.
    """

    temperature: float = 0.0
    acceptance: str = "lossless"
    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3
    seed: int | None = None
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.acceptance not in ACCEPTANCE_RULES:
            raise ValueError(
                f"unknown acceptance rule {self.acceptance!r}; choose one of {ACCEPTANCE_RULES}"
            )
        if not 0 < self.posterior_threshold <= 1 or not 0 < self.posterior_alpha <= 1:
            raise ValueError("posterior_threshold and posterior_alpha must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:  # False for nan too
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class EngineConfig:
    """Everything that makes an engine: built and validated once at the edge (the CLI, chat,
    bench), then turned into objects by `engine.load_engine`.

    `model`: an alias, HF folder, .gguf file or hub id (`models.resolve_model`). `heads`: a heads
    folder, `auto` (the alias's bundled heads) or `none`. `tree`: a spec for
    `tree_spec.parse_tree`, or `default` (the heads' own tree.json, else `DEFAULT_TREE`) or
    `auto` (tuned for this machine, `tune.auto_tree`). `static_step`: greedy steps with static
    shapes (`static_step.py`).
    """

    model: str = DEFAULT_MODEL
    heads: str = "auto"
    tree: str = "default"
    dtype: str = "auto"
    attention: str = "hf"
    device: str = "cpu"
    lookup: int = DEFAULT_LOOKUP
    static_step: bool = False
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"--max-new-tokens must be positive, got {self.max_new_tokens}")
        if not 0 <= self.lookup <= MAX_LOOKUP:
            raise ValueError(f"--lookup must be in [0, {MAX_LOOKUP}], got {self.lookup}")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {DTYPE_CHOICES}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(
                f"unknown attention {self.attention!r}; choose one of {ATTENTION_CHOICES}"
            )
        if self.static_step and (self.lookup or self.attention == "hf" or not self.sampling.greedy):
            raise ValueError(
                "--static-step needs greedy decoding (--temperature 0), --lookup 0 and one of our "
                "attention backends (--attention sdpa, flex, triton or reference)"
            )
