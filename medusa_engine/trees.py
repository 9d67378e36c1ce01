"""Named tree presets: data only.

A tree is a list of paths from the root; each path lists, per depth, the top-k rank of the head
that proposes that node (depth d is proposed by head d-1). `(0, 1)` is "head 0's best token, then
head 1's second best". The root itself (the base model's own next token) is implicit.

Presets:
* `plain`: no speculation (plain decoding through the same loop).
* `chain_K`: the top-1 chain of depth K (one candidate per head).
* `cpu_8`, `cpu_16`, `cpu_24`: small trees for CPUs, where verifying ~16 nodes costs ~1.4x a plain
  step (see ANCHORS.md): wide at depth 1, a short top-1 spine.
* `mc_sim_7b_63`: Medusa's published 63-node tree for Vicuna-7B (FasterDecoding/Medusa,
  `medusa_choices.py`), 4 heads, top-10.
"""

from __future__ import annotations

Path = tuple[int, ...]

TREE_PRESETS: dict[str, tuple[Path, ...]] = {
    "plain": (),
    "chain_2": ((0,), (0, 0)),
    "chain_3": ((0,), (0, 0), (0, 0, 0)),
    "chain_4": ((0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)),
    "cpu_8": ((0,), (1,), (2,), (0, 0), (1, 0), (0, 1), (0, 0, 0), (0, 0, 0, 0)),
    "cpu_16": (
        (0,), (1,), (2,), (3,),
        (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0),
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0),
        (0, 0, 0, 0), (0, 0, 0, 1),
    ),
    "cpu_24": (
        (0,), (1,), (2,), (3,), (4,),
        (0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (2, 0), (3, 0),
        (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (1, 0, 0), (0, 2, 0),
        (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (0, 1, 0, 0),
        (0, 0, 0, 0, 0),
    ),
    "mc_sim_7b_63": (
        (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4),
        (2, 0), (0, 5), (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8),
        (0, 0, 2), (3, 0), (0, 9), (8,), (9,), (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0),
        (2, 1), (0, 0, 4), (0, 0, 5), (0, 0, 0, 0), (0, 1, 1), (0, 0, 6), (0, 3, 0), (5, 0),
        (1, 3), (0, 0, 7), (0, 0, 8), (0, 0, 9), (6, 0), (0, 4, 0), (1, 4), (7, 0), (0, 1, 2),
        (2, 0, 0), (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5), (1, 0, 1), (0, 2, 1), (9, 0),
        (0, 6, 0), (0, 0, 0, 1), (1, 6), (0, 7, 0),
    ),
}  # fmt: skip

DEFAULT_TREE = "cpu_16"
