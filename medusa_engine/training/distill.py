"""Self-distillation data (Medusa-2, Cai et al. 2024, Sec. 2.3.2): the base model answers the
training prompts itself, so the heads learn the distribution they will be asked to predict.

Shape legend (ARCHITECTURE.md): B = prompts in a batch, T = padded prompt length, S = T + new
tokens (the cache slots `generate` fills).

`self_distill(model, prompts, cache_dir)` generates in batches (left padding: every prompt ends at
the same column, so one `generate` call serves the batch), greedy (`temperature=0`) or sampled,
and writes each batch as a `datasets` shard (`save_to_disk` into a temp folder, then `os.replace`:
a killed run never leaves a half shard). A restart reads the shards already there and generates
only the prompts they lack; `meta.json` records the settings so a cache made with other settings
is refused instead of silently mixed. Rows: `prompt_index`, `input_ids` (prompt + response, the
response ending with EOS when the model stopped), `prompt_len`, `response` (text, for people).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig:
    """How the base model writes its answers."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be positive")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


@dataclass
class DistillStats:
    prompts_done: int = 0  # generated in this call (not counting the cache)
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids_BT and attention_mask_BT with each prompt right-aligned (padding on the left)."""
    width = max(len(p) for p in prompts)
    ids_BT = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask_BT = torch.zeros((len(prompts), width), dtype=torch.int64)
    for b, p in enumerate(prompts):
        if len(p):
            ids_BT[b, width - len(p) :] = torch.as_tensor(list(p))
            mask_BT[b, width - len(p) :] = 1
    return ids_BT, mask_BT


def cut_response(new_ids: Sequence[int], eos: set[int]) -> list[int]:
    """The generated ids up to and including the first EOS (what follows is padding)."""
    out: list[int] = []
    for t in new_ids:
        out.append(int(t))
        if int(t) in eos:
            break
    return out


def self_distill(
    model: Any,
    prompts: Sequence[Sequence[int]],
    cache_dir: str | os.PathLike[str],
    config: DistillConfig | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[Any, DistillStats]:
    """Generate (or finish generating) the answers to `prompts`; returns (Dataset, stats).

    `model` is an `HFModel`; `prompts` are token ids (chat template already applied).
    `progress(n)` is called after each batch with the number of prompts it finished.
    """
    import datasets

    config = config or DistillConfig()
    cache = Path(cache_dir)
    _check_meta(cache, model.name, prompts, config)
    done = _done_indices(cache)
    todo = [i for i in range(len(prompts)) if i not in done]
    if done:
        log.info("self-distill cache %s: %d/%d prompts done", cache, len(done), len(prompts))
    eos = set(model.eos_token_ids)
    tok = model.tokenizer
    pad_id = next(
        (i for i in (getattr(tok, "pad_token_id", None), *model.eos_token_ids) if i is not None), 0
    )
    stats = DistillStats()
    for first in range(0, len(todo), config.batch_size):
        batch = todo[first : first + config.batch_size]
        start = time.perf_counter()
        responses = _generate(model, [prompts[i] for i in batch], pad_id, eos, config, batch[0])
        stats.seconds += time.perf_counter() - start
        stats.new_tokens += sum(len(r) for r in responses)
        stats.prompts_done += len(batch)
        rows = {
            "prompt_index": batch,
            "input_ids": [list(prompts[i]) + r for i, r in zip(batch, responses)],
            "prompt_len": [len(prompts[i]) for i in batch],
            "response": [tok.decode(r, skip_special_tokens=True) if tok else "" for r in responses],
        }
        _write_shard(cache / f"shard-{batch[0]:07d}", datasets.Dataset.from_dict(rows))
        if progress is not None:
            progress(len(batch))
    shards = sorted(cache.glob("shard-*"))
    merged = datasets.concatenate_datasets([datasets.load_from_disk(str(s)) for s in shards])
    index = merged["prompt_index"]
    return merged.select(sorted(range(len(index)), key=index.__getitem__)), stats


@torch.no_grad()
def _generate(
    model: Any,
    prompts: list[Sequence[int]],
    pad_id: int,
    eos: set[int],
    config: DistillConfig,
    seed_offset: int,
) -> list[list[int]]:
    ids_BT, mask_BT = left_pad(prompts, pad_id)
    ids_BT, mask_BT = ids_BT.to(model.device), mask_BT.to(model.device)
    sampled = config.temperature > 0
    if sampled:  # seeded per batch, so a resumed run draws what an uninterrupted one would
        torch.manual_seed(config.seed + seed_offset)
    out_BS = model.model.generate(
        input_ids=ids_BT,
        attention_mask=mask_BT,
        max_new_tokens=config.max_new_tokens,
        do_sample=sampled,
        temperature=config.temperature if sampled else None,
        top_p=None,
        top_k=None,
        pad_token_id=pad_id,
        eos_token_id=sorted(eos) or None,
    )
    new_rows = out_BS[:, ids_BT.shape[1] :].tolist()  # per prompt: its new tokens, then padding
    return [cut_response(row, eos) for row in new_rows]


def _write_shard(dest: Path, shard: Any) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-" + dest.name, dir=dest.parent))
    try:
        shard.save_to_disk(str(tmp))
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _done_indices(cache: Path) -> set[int]:
    import datasets

    done: set[int] = set()
    for shard in sorted(cache.glob("shard-*")):
        done.update(int(i) for i in datasets.load_from_disk(str(shard))["prompt_index"])
    return done


def settings(
    model_name: str, prompts: Sequence[Sequence[int]], config: DistillConfig
) -> dict[str, Any]:
    """What a cache's answers depend on (its `meta.json`): the model, the prompts (a digest) and
    the generation settings; not the batch size (greedy answers do not depend on it)."""
    digest = hashlib.sha256(json.dumps([list(p) for p in prompts]).encode()).hexdigest()
    meta = {
        "model": model_name,
        "num_prompts": len(prompts),
        "prompts_sha256": digest,
        **asdict(config),
    }
    meta.pop("batch_size")
    return meta


def settings_key(model_name: str, prompts: Sequence[Sequence[int]], config: DistillConfig) -> str:
    """A short digest of `settings`: names a default cache that no other settings share."""
    text = json.dumps(settings(model_name, prompts, config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _check_meta(
    cache: Path, model_name: str, prompts: Sequence[Sequence[int]], config: DistillConfig
) -> None:
    meta = settings(model_name, prompts, config)
    file = cache / "meta.json"
    cache.mkdir(parents=True, exist_ok=True)
    if file.is_file():
        old = json.loads(file.read_text())
        if old != meta:
            diff = sorted(k for k in meta if old.get(k) != meta[k])
            raise ValueError(
                f"self-distill cache {cache} was made with other settings ({', '.join(diff)}); "
                "use another --distill-cache or delete it"
            )
        return
    file.write_text(json.dumps(meta, indent=2) + "\n")
