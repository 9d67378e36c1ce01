"""Train Medusa heads on a frozen base model (Cai et al. 2024, "Medusa", Sec. 2.2).

Shape legend: B = sequences in a batch, T = padded length, E = hidden size, V = vocabulary,
K = heads, M = selected (sequence, position) rows.

Loss (Medusa-1, Eq. 1): L = Σ_k λ^k · CE(p_k(h_t), x_{t+k+2}), k = 0..K-1. The base LM head at
h_t predicts x_{t+1}; head k predicts the token k + 2 positions ahead, exactly as `generate` uses
it (heads read the hidden state of the last kept token; head 0 proposes the token after the base
model's own next token). With `distill_weight` w > 0 the target mixes in the base model's own
distribution for that token (Medusa-2 self-distillation): (1 - w)·CE + w·KL(p_base(h_{t+k+1}) ||
p_k(h_t)). Only positions whose target lies in the response (`Example.start`) count.

`--kind recurrent` trains the sequentially dependent heads of `recurrent_heads.py` instead, on
base-model features cached once on disk (`train_recurrent.py`, which has its own loss). The rest of
this module (data, self-distillation, accelerate, checkpoints, the command line) serves both.

Choices, and why (Medusa heads):
* Hidden states are recomputed every step (no disk cache): the base model is frozen and
  deterministic, and its forward is not the dominant cost. For SmolLM2-135M (K = 4, V = 49152)
  the heads' vocabulary projections, forward and backward, cost ~0.7 GFLOP per token against the
  base forward's ~0.27, so a cache would save at most ~30% of a step from the second epoch on,
  for ~1.1 KB of disk per token (E = 576, bf16). For stories260k (measured, 2 shared CPU cores)
  the base forward is about half of a step; its whole run takes minutes either way.
* The vocabulary projection and its loss run in chunks of `loss_chunk` rows under activation
  checkpointing, so memory is O(chunk·V) rather than O(K·B·T·V) (49152 vocabulary entries).
* Mixed precision through `attention.precision` (bf16 autocast, or fp16 autocast with dynamic
  loss scaling); master weights and optimizer state stay fp32.
* `accelerate` places the model and heads and wraps the heads for DDP under `accelerate launch`;
  the data order is ours (a seeded permutation per epoch, each process a slice of the global
  batch) so a checkpoint's data position is just the step number.
* Checkpoints (heads, optimizer, scheduler, loss scaler, RNG, step) go to a temp file and are
  `os.replace`d: a write killed midway leaves the previous checkpoint intact.

Size: ~400 lines of library plus the command-line front end (`add_arguments`, `run`, `main`),
kept here because `accelerate launch -m medusa_engine.train_heads` needs this module's
`__main__`, and `cli.py` wires `add_arguments`/`run` in as `medusa-engine train-heads`. Data
reading lives in `train_data.py`, self-distillation in `distill.py`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from attention.precision import DynamicLossScaler, autocast, get_policy
from medusa_engine.atomic import atomic_write
from medusa_engine.config import HEAD_KINDS, HeadsConfig
from medusa_engine.heads import MedusaHeads
from medusa_engine.heads_io import AnyHeads, save_heads
from medusa_engine.train_data import Example

log = logging.getLogger(__name__)


class TrainError(ValueError):
    """A training run that cannot start or resume; one line for the CLI."""


@dataclass(frozen=True)
class TrainConfig:
    """One training run; the CLI flags map one-to-one onto these fields."""

    num_heads: int = 4
    num_layers: int = 1
    shared_lm_head: bool = True
    out_map: bool = True  # HeadsConfig.out_map: lets shared-LM-head heads cancel the hidden state
    decay: float = 0.8  # λ: head k's loss weight is λ^k
    distill_weight: float = 0.0  # w: weight of the KL to the base model's distribution
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    steps: int = 0  # 0 = `epochs` passes over the data
    epochs: int = 1
    batch_size: int = 8
    max_length: int = 512
    precision: str = "bf16"
    grad_clip: float = 1.0
    loss_chunk: int = 4096
    checkpoint_every: int = 100
    seed: int = 0
    kind: str = "medusa"  # or "recurrent" (train_recurrent.py: cached features, one transition)
    ffn_size: int = 2048  # recurrent: transition width
    draft_vocab: int = 8192  # recurrent: tokens the heads score (0 = all)
    feature_weight: float = 1.0  # recurrent: β, weight of the hidden-state regression

    def __post_init__(self) -> None:
        get_policy(self.precision)
        if not 0 < self.decay <= 1 or not 0 <= self.distill_weight <= 1:
            raise ValueError("decay must be in (0, 1] and distill_weight in [0, 1]")
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"unknown heads kind {self.kind!r}; choose {' or '.join(HEAD_KINDS)}")
        for name in ("num_heads", "batch_size", "max_length", "loss_chunk", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class TrainResult:
    heads: AnyHeads
    losses: list[float] = field(default_factory=list)  # per step, of the steps run in this call
    step: int = 0
    wall_s: float = 0.0


def collate(examples: list[Example], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded ids_BT, lengths_B and target starts_B."""
    width = max(len(e.ids) for e in examples)
    ids_BT = torch.full((len(examples), width), pad_id, dtype=torch.int64)
    for b, e in enumerate(examples):
        ids_BT[b, : len(e.ids)] = torch.as_tensor(e.ids)
    lengths_B = torch.tensor([len(e.ids) for e in examples])
    return {"ids_BT": ids_BT, "lengths_B": lengths_B,
            "starts_B": torch.tensor([e.start for e in examples])}  # fmt: skip


def head_rows(
    lengths_B: torch.Tensor, starts_B: torch.Tensor, width: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(b_M, t_M): the rows where head k has a target x[b, t + k + 2] inside the response."""
    j_T = torch.arange(width, device=lengths_B.device) + k + 2
    valid_BT = (j_T[None] < lengths_B[:, None]) & (j_T[None] >= starts_B[:, None])
    b_M, t_M = valid_BT.nonzero(as_tuple=True)
    return b_M, t_M


def _chunk_loss(
    h_ME: torch.Tensor,
    w_VE: torch.Tensor,
    target_M: torch.Tensor,
    teacher_ME: torch.Tensor | None,
    distill_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, top-1 hits) of one chunk of rows; logits_MV live only inside this call."""
    logits_MV = F.linear(h_ME, w_VE.to(h_ME.dtype)).float()
    loss = F.cross_entropy(logits_MV, target_M, reduction="sum")
    if teacher_ME is not None and distill_weight > 0:
        with torch.no_grad():
            teacher_MV = F.linear(teacher_ME, w_VE.to(teacher_ME.dtype)).float().log_softmax(-1)
        kl = F.kl_div(logits_MV.log_softmax(-1), teacher_MV, log_target=True, reduction="sum")
        loss = (1 - distill_weight) * loss + distill_weight * kl
    hits = (logits_MV.detach().argmax(-1) == target_M).sum()
    return loss, hits


class HeadsLoss(nn.Module):
    """The trainable part as one module (what DDP wraps): heads + the Medusa loss.

    `forward(hidden_BTE, batch)` -> (loss, hits_K, counts_K); gradients reach only the heads.
    The base LM head's weight (`lm_weight_VE`, frozen) is a plain attribute, not a parameter.
    """

    def __init__(self, heads: MedusaHeads, lm_weight_VE: torch.Tensor, cfg: TrainConfig) -> None:
        super().__init__()
        self.heads = heads
        self.lm_weight_VE = lm_weight_VE
        self.cfg = cfg

    def forward(self, hidden_BTE: torch.Tensor, batch: dict[str, torch.Tensor]) -> Any:
        cfg, heads = self.cfg, self.heads
        hidden_BTE = hidden_BTE.float()  # the heads' master weights are fp32 (autocast may lower)
        ids_BT, width = batch["ids_BT"], hidden_BTE.shape[1]
        total = hidden_BTE.new_zeros((), dtype=torch.float32)
        hits_K = torch.zeros(heads.num_heads, dtype=torch.int64)
        counts_K = torch.zeros(heads.num_heads, dtype=torch.int64)
        for k in range(heads.num_heads):
            b_M, t_M = head_rows(batch["lengths_B"], batch["starts_B"], width, k)
            if b_M.numel() == 0:
                continue
            h_ME = heads.blocks[k](hidden_BTE[b_M, t_M])
            w_VE = _projection(self.lm_weight_VE, heads, k)
            teacher_ME = hidden_BTE[b_M, t_M + k + 1] if cfg.distill_weight > 0 else None
            target_M = ids_BT[b_M, t_M + k + 2]
            loss_k = h_ME.new_zeros((), dtype=torch.float32)
            for s in range(0, len(b_M), cfg.loss_chunk):
                sl = slice(s, s + cfg.loss_chunk)
                args = (h_ME[sl], w_VE, target_M[sl],
                        None if teacher_ME is None else teacher_ME[sl], cfg.distill_weight)  # fmt: skip
                if len(b_M) > cfg.loss_chunk:
                    loss, hits = checkpoint(_chunk_loss, *args, use_reentrant=False)
                else:
                    loss, hits = _chunk_loss(*args)
                loss_k = loss_k + loss
                hits_K[k] += int(hits)
            counts_K[k] = len(b_M)
            total = total + cfg.decay**k * loss_k / len(b_M)
        return total, hits_K, counts_K


def _projection(lm_weight_VE: torch.Tensor, heads: MedusaHeads, k: int) -> torch.Tensor:
    """Head k's vocabulary projection: the shared base LM head or the head's own."""
    if heads.lm_heads is None:
        return lm_weight_VE
    return cast(torch.Tensor, heads.lm_heads[k].weight)


@torch.no_grad()
def base_hidden(model: Any, ids_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
    """The frozen base model's last hidden states hidden_BTE (after the final norm)."""
    width = ids_BT.shape[1]
    mask_BT = (torch.arange(width, device=ids_BT.device)[None] < lengths_B[:, None]).long()
    out = model.decoder(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False)
    return out.last_hidden_state


def batch_order(n: int, batch: int, epoch: int, seed: int) -> list[list[int]]:
    """The epoch's global batches (full ones only): a seeded permutation of range(n)."""
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[i : i + batch] for i in range(0, n - batch + 1, batch)]


def make_heads(model: Any, cfg: TrainConfig) -> MedusaHeads:
    heads = MedusaHeads(HeadsConfig(cfg.num_heads, cfg.num_layers, model.hidden_size,
                                    model.vocab_size, cfg.shared_lm_head, model.name,
                                    cfg.out_map))  # fmt: skip
    heads.init_from_base(model.lm_head.weight.float())
    return heads


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return f


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save `state` to a temp file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: torch.save(state, p))


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise TrainError(f"cannot read checkpoint {path}: {err}") from None


def train(
    model: Any,
    examples: list[Example],
    cfg: TrainConfig,
    checkpoint_path: Path | None = None,
    resume: bool = False,
    accelerator: Any = None,
    on_step: Callable[[int, float, list[float]], None] | None = None,
) -> TrainResult:
    """Train heads on `examples` with `model` frozen; returns the (unwrapped) heads.

    `on_step(step, loss, top1_per_head)` is called after each optimizer step (and after that
    step's checkpoint is written), e.g. for a progress bar.
    """
    from accelerate import Accelerator

    acc = accelerator or Accelerator(cpu=model.device.type == "cpu")
    model.model.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    heads = make_heads(model, cfg)
    module = HeadsLoss(heads, model.lm_head.weight, cfg)

    def batch_loss(rows: list[int], module: Any) -> Any:
        batch = {k: v.to(acc.device) for k, v in collate([examples[i] for i in rows]).items()}
        hidden_BTE = base_hidden(model, batch["ids_BT"], batch["lengths_B"])
        return module(hidden_BTE, batch)

    return optimize(heads, module, batch_loss, cfg, len(examples), "examples", acc,
                    checkpoint_path, resume, on_step)  # fmt: skip


def optimize(
    heads: AnyHeads,
    module: nn.Module,
    batch_loss: Callable[[list[int], Any], Any],
    cfg: TrainConfig,
    num_items: int,
    items: str,
    acc: Any,
    checkpoint_path: Path | None,
    resume: bool,
    on_step: Callable[[int, float, list[float]], None] | None,
) -> TrainResult:
    """The optimisation loop both kinds of heads share: AdamW + warm-up/cosine schedule, mixed
    precision with loss scaling, gradient clipping, atomic checkpoints and `resume`.

    `batch_loss(rows, wrapped_module)` -> (loss, hits_K, counts_K) for the items `rows` (indices
    into the `num_items` training items, this process's share of the global batch). The data
    order is a function of the step alone (`batch_order`), so a resumed run sees the same batches.
    """
    global_batch = cfg.batch_size * acc.num_processes
    per_epoch = num_items // global_batch
    if per_epoch == 0:
        raise TrainError(f"{num_items} {items} are fewer than one batch of {global_batch}")
    params = [p for p in heads.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.steps or cfg.epochs * per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup_steps, total))
    policy = get_policy(cfg.precision)
    scaler = DynamicLossScaler(enabled=policy.loss_scaling)
    step = 0
    if resume and checkpoint_path is not None and checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path)
        if state["config"] != asdict(cfg):
            diff = sorted(k for k, v in asdict(cfg).items() if state["config"].get(k) != v)
            raise TrainError(f"{checkpoint_path} was written with other settings: {diff}")
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        step = int(state["step"])
        log.info("resumed from %s at step %d", checkpoint_path, step)
    module, optimizer = acc.prepare(module, optimizer)
    result = TrainResult(heads)
    start = time.perf_counter()
    epoch, order = -1, []
    while step < total:
        if step // per_epoch != epoch:
            epoch = step // per_epoch
            order = batch_order(num_items, global_batch, epoch, cfg.seed)
        rows = order[step % per_epoch][acc.process_index :: acc.num_processes]
        with autocast(policy, acc.device):
            loss, hits_K, counts_K = batch_loss(rows, module)
        acc.backward(scaler.scale(loss))
        if cfg.grad_clip > 0:
            scaler.unscale_(params)  # clip the true gradients; the scaler then sees scale 1
            acc.clip_grad_norm_(params, cfg.grad_clip)
            stepped = _step_unscaled(scaler, optimizer, params)
        else:
            stepped = scaler.step(optimizer, params)
        optimizer.zero_grad(set_to_none=True)
        if stepped:
            scheduler.step()
        step += 1
        result.losses.append(float(loss.detach()))
        if checkpoint_path is not None and (step % cfg.checkpoint_every == 0 or step == total):
            _save_state(acc, checkpoint_path, heads, optimizer, scheduler, scaler, step, cfg)
        if on_step is not None:
            top1 = (hits_K.float() / counts_K.clamp(min=1)).tolist()
            on_step(step, result.losses[-1], top1)
    result.step, result.wall_s = step, time.perf_counter() - start
    return result


def _step_unscaled(scaler: DynamicLossScaler, optimizer: Any, params: list) -> bool:
    """Step after the gradients were already unscaled: skip on inf/nan, update the scale."""
    from attention.precision import grads_finite

    finite = grads_finite(params)
    if finite:
        optimizer.step()
    scaler.update(finite)
    return finite


def _save_state(acc, path, heads, optimizer, scheduler, scaler, step, cfg) -> None:
    acc.wait_for_everyone()
    if acc.is_main_process:
        save_checkpoint(path, {
            "heads": heads.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "rng": _rng_state(), "step": step, "config": asdict(cfg),
        })  # fmt: skip


@torch.no_grad()
def evaluate(
    model: Any, heads: MedusaHeads, examples: list[Example], batch_size: int = 8,
    precision: str = "fp32",
) -> dict[str, Any]:  # fmt: skip
    """Per-head top-1/top-5 accuracy of x_{t+k+2} on held-out `examples` (+ the base LM's)."""
    policy = get_policy(precision)
    heads = heads.to(model.device).eval()
    k_heads = heads.num_heads
    hits1, hits5, counts = [0] * (k_heads + 1), [0] * (k_heads + 1), [0] * (k_heads + 1)
    w_VE = model.lm_head.weight
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(examples[i : i + batch_size]).items()}
        with autocast(policy, model.device):
            hidden_BTE = base_hidden(model, batch["ids_BT"], batch["lengths_B"]).float()
            for k in range(-1, k_heads):  # -1: the base LM head (target x_{t+1})
                b_M, t_M = head_rows(batch["lengths_B"], batch["starts_B"], hidden_BTE.shape[1], k)
                h_ME = hidden_BTE[b_M, t_M] if k < 0 else heads.blocks[k](hidden_BTE[b_M, t_M])
                proj = w_VE if k < 0 else _projection(w_VE, heads, k)
                top5_M5 = F.linear(h_ME, proj.to(h_ME.dtype)).topk(5, dim=-1).indices
                target_M = batch["ids_BT"][b_M, t_M + k + 2]
                hits1[k + 1] += int((top5_M5[:, 0] == target_M).sum())
                hits5[k + 1] += int((top5_M5 == target_M[:, None]).any(-1).sum())
                counts[k + 1] += len(b_M)
    acc1 = [h / max(c, 1) for h, c in zip(hits1, counts)]
    acc5 = [h / max(c, 1) for h, c in zip(hits5, counts)]
    return {
        "base_top1": acc1[0],
        "heads": [{"head": k, "top1": acc1[k + 1], "top5": acc5[k + 1], "tokens": counts[k + 1]}
                  for k in range(k_heads)],
    }  # fmt: skip


# ---- command line: `medusa-engine train-heads` and `accelerate launch -m medusa_engine.train_heads`


def add_arguments(p: Any) -> None:
    """The `train-heads` flags (TrainConfig fields one-to-one, plus data and output)."""
    d = TrainConfig()
    p.add_argument("--model", required=True, help="alias, HF folder, .gguf file or hub id")
    p.add_argument("--data", required=True, help="json/jsonl/txt/parquet file or hub dataset")
    p.add_argument("--out", required=True, help="heads folder to write (config, weights, metrics)")
    p.add_argument("--split", default="train", help="split of a hub dataset")
    p.add_argument("--max-examples", type=int, default=0, help="use the first N records (0 = all)")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="held out: the last part")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="dtype the frozen base model is loaded in")  # fmt: skip
    p.add_argument("--device", default=None, help="default: what accelerate picks")
    p.add_argument(
        "--checkpoint", default=None, help="training state file (default OUT/train_state.pt)"
    )  # noqa: E501
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint if present")
    p.add_argument("--with-reference-answers", action="store_true",
                   help="--kind recurrent + --self-distill: also train on the data's own answers")  # fmt: skip
    p.add_argument("--save-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="dtype of the written heads' weights (bf16 halves the file)")  # fmt: skip
    p.add_argument("--features-cache", default=None,
                   help="--kind recurrent: cached base features (default beside --checkpoint)")  # fmt: skip
    p.add_argument("--self-distill", action="store_true",
                   help="train on the base model's own answers to the data's prompts")  # fmt: skip
    p.add_argument("--distill-cache", default=None, help="default runs/self_distill/<model>-<data>")  # noqa: E501
    p.add_argument("--distill-max-new-tokens", type=int, default=256)
    p.add_argument("--distill-temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--distill-batch-size", type=int, default=8)
    p.add_argument("--extra-distill-temperature", type=float, action="append", default=[],
                   metavar="T", help="--self-distill: one more answer per prompt, sampled at T "
                   "(seed + i + 1, its own cache beside --distill-cache); repeatable; prompts of "
                   "held-out examples are left out")  # fmt: skip
    p.add_argument("--prompt-tokens", type=int, default=32,
                   help="plain text + --self-distill: continue the first N tokens")  # fmt: skip
    for name, value in asdict(d).items():
        flag = "--" + name.replace("_", "-")
        if name == "shared_lm_head":  # default on
            p.add_argument("--own-lm-head", dest=name, action="store_false",
                           help="give each head its own vocabulary projection (published format)")  # fmt: skip
        elif name == "out_map":  # default on
            p.add_argument("--no-out-map", dest=name, action="store_false",
                           help="no residual linear map after the blocks (HeadsConfig.out_map)")  # fmt: skip
        elif name == "precision":
            p.add_argument(flag, default=value, choices=["fp32", "bf16", "fp16"])
        elif name == "kind":
            p.add_argument(flag, default=value, choices=list(HEAD_KINDS),
                           help="medusa: independent heads; recurrent: heads that read the "
                                "drafted tokens (recurrent_heads.py)")  # fmt: skip
        else:
            p.add_argument(flag, type=type(value), default=value)


def config_from_args(args: Any) -> TrainConfig:
    return TrainConfig(**{k: getattr(args, k) for k in TrainConfig.__dataclass_fields__})


def check_writable(out: Path) -> None:
    """Fail before any work when the heads folder cannot be created or written."""
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise TrainError(f"heads folder {out} is not writable: {err.strerror or err}") from None


def _distilled(model: Any, records: Any, args: Any, acc: Any, extra: int = -1) -> Any:
    """The base model's answers to the records' prompts (cached); `extra` = i selects the i-th
    `--extra-distill-temperature` pass instead of the main one."""
    from medusa_engine.distill import DistillConfig, self_distill
    from medusa_engine.train_data import encode_prompt, prompt_messages, record_kind

    kind, tok = record_kind(records.column_names), model.tokenizer
    if kind == "text":
        prompts = [list(tok(r["text"])["input_ids"])[: args.prompt_tokens] for r in records]
    else:
        prompts = [encode_prompt(tok, prompt_messages(r, kind)) for r in records]
    cache = args.distill_cache or (
        f"runs/self_distill/{Path(model.name).name}-{Path(args.data).stem}"
    )
    temperature, seed = args.distill_temperature, args.seed
    if extra >= 0:
        temperature, seed = args.extra_distill_temperature[extra], args.seed + extra + 1
        cache = f"{cache}-t{temperature:g}-s{seed}"
    cfg = DistillConfig(args.distill_max_new_tokens, temperature, args.distill_batch_size, seed)
    from tqdm import tqdm

    bar = tqdm(total=len(prompts), desc="self-distill", disable=not acc.is_main_process)
    if acc.is_main_process:  # one process generates; the others then read its cache
        data, stats = self_distill(model, prompts, cache, cfg, progress=bar.update)
        if stats.new_tokens:
            print(f"self-distill: {stats.prompts_done} prompts, {stats.new_tokens} tokens in "
                  f"{stats.seconds:.1f} s = {stats.tokens_per_s:.1f} tok/s")  # fmt: skip
    acc.wait_for_everyone()
    if not acc.is_main_process:
        data, _ = self_distill(model, prompts, cache, cfg)
    bar.close()
    return data


def _reference_examples(model, records, eval_ex, args, cfg) -> list[Example]:
    """The records' own answers (prompts of held-out examples excluded), for `--kind recurrent`:
    its targets are the base model's choices, so any answer text is valid training context."""
    from medusa_engine.train_data import encode_dataset, record_kind

    if cfg.kind != "recurrent" or not args.self_distill:
        raise TrainError("--with-reference-answers needs --kind recurrent and --self-distill")
    if record_kind(records.column_names) == "text":
        raise TrainError("--with-reference-answers needs instruction records (they have answers)")
    held_out = {e.record for e in eval_ex}
    keep = [i for i in range(len(records)) if i not in held_out]
    return encode_dataset(model.tokenizer, records.select(keep), cfg.max_length)


def _run_recurrent(model, train_ex, eval_ex, cfg, ckpt, args, acc, on_step) -> Any:
    """Features (cached) -> `train_recurrent` -> held-out accuracy, for `--kind recurrent`."""
    from tqdm import tqdm

    from medusa_engine import train_recurrent as tr

    examples = train_ex + eval_ex
    path = (
        Path(args.features_cache) if args.features_cache else ckpt.with_name("features.safetensors")
    )
    key = tr.features_key(model.name, examples)
    features = tr.load_features(path, key)
    if features is None:
        bar = tqdm(total=len(examples), desc="features", disable=not acc.is_main_process)
        with torch.no_grad(), autocast(get_policy(cfg.precision), model.device):
            features = tr.compute_features(model, examples, cfg.num_heads, 8,
                                           progress=bar.update)  # fmt: skip
        bar.close()
        if acc.is_main_process:
            tr.save_features(path, features, key)
    train_pos = features.select(torch.arange(len(train_ex)))
    eval_pos = features.select(torch.arange(len(train_ex), len(examples)))
    result = tr.train_recurrent(model, features, train_pos, cfg, ckpt, args.resume, acc, on_step)
    metrics = tr.evaluate_recurrent(model, result.heads, features, eval_pos)
    calibration = tr.fit_confidence_temperatures(model, result.heads, features, eval_pos)
    temps = tuple(row["temperature"] for row in calibration)
    result.heads.config = replace(result.heads.config, confidence_temperature=temps)
    return result, {**metrics, "calibration": calibration}


def run(args: Any) -> int:
    """`train-heads`: data -> (self-distill) -> train -> held-out accuracy -> heads + metrics."""
    import json
    import sys

    from accelerate import Accelerator
    from tqdm import tqdm

    from medusa_engine.hf_adapter import HFModel, quiet_transformers
    from medusa_engine.train_data import encode_dataset, load_records, split_eval

    cfg = config_from_args(args)
    out = Path(args.out)
    check_writable(out)
    records = load_records(args.data, args.split)
    if args.max_examples > 0:
        records = records.select(range(min(args.max_examples, len(records))))
    acc = Accelerator(cpu=args.device == "cpu")
    quiet_transformers()
    model = HFModel.load(args.model, dtype=args.dtype, device=args.device or acc.device)
    originals = records
    if args.self_distill:
        records = _distilled(model, records, args, acc)
    train_ex, eval_ex = split_eval(
        encode_dataset(model.tokenizer, records, cfg.max_length), args.eval_fraction
    )
    if args.extra_distill_temperature and not args.self_distill:
        raise TrainError("--extra-distill-temperature needs --self-distill")
    held_out = {e.record for e in eval_ex}
    for i in range(len(args.extra_distill_temperature)):
        sampled = encode_dataset(model.tokenizer, _distilled(model, originals, args, acc, i),
                                 cfg.max_length)  # fmt: skip
        train_ex += [e for e in sampled if e.record not in held_out]
    if args.with_reference_answers:
        train_ex += _reference_examples(model, originals, eval_ex, args, cfg)
    ckpt = Path(args.checkpoint) if args.checkpoint else out / "train_state.pt"
    bar = tqdm(desc="train-heads", disable=not acc.is_main_process, dynamic_ncols=True)

    def on_step(step: int, loss: float, top1: list[float]) -> None:
        bar.total = bar.total or (cfg.steps or None)
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.3f}", top1="/".join(f"{a:.2f}" for a in top1))

    if cfg.kind == "recurrent":
        result, metrics = _run_recurrent(model, train_ex, eval_ex, cfg, ckpt, args, acc, on_step)
    else:
        result = train(model, train_ex, cfg, ckpt, args.resume, acc, on_step)
        metrics = evaluate(model, cast(MedusaHeads, result.heads), eval_ex, cfg.batch_size,
                           cfg.precision)  # fmt: skip
    bar.close()
    if not acc.is_main_process:
        return 0
    losses = result.losses
    summary = {
        "model": model.name, "data": args.data, "train_examples": len(train_ex),
        "eval_examples": len(eval_ex), "steps": result.step, "wall_s": round(result.wall_s, 1),
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "loss_last10_mean": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        **metrics, "config": asdict(cfg), "command": " ".join(sys.argv),
    }  # fmt: skip
    save_heads(result.heads, out, {"bf16": torch.bfloat16, "fp32": None}[args.save_dtype])
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(out / "metrics.json", lambda p: p.write_text(text))
    print(f"base LM top-1 {metrics['base_top1']:.3f} on {len(eval_ex)} held-out examples")
    for h in metrics["heads"]:
        print(
            f"head {h['head']}: top-1 {h['top1']:.3f}  top-5 {h['top5']:.3f}  ({h['tokens']} tokens)"
        )  # noqa: E501
    for c in metrics.get("calibration", []):
        print(f"depth {c['depth']}: confidence temperature {c['temperature']:.3f}  top-1 "
              f"{c['top1']:.3f}  mean top-1 probability {c['confidence']:.3f} -> "
              f"{c['calibrated_confidence']:.3f}")  # fmt: skip
    print(json.dumps({k: v for k, v in summary.items() if k not in ("config", "command")}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m medusa_engine.train_heads` / `accelerate launch -m medusa_engine.train_heads`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="train-heads", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (ValueError, OSError) as err:
        print(f"train-heads: error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
