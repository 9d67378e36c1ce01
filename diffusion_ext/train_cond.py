"""Train the text-conditioned MM-DiT or a ControlNet on the digits: `python -m
diffusion_ext.train_cond --preset mmdit|controlnet`.

Shape legend: N train images, B batch, C = 1 channel, H = W = 8, L text tokens.

One loop for both kinds, the recipe of `train.py` (AdamW, linear warm-up then cosine decay to
10%, velocity MSE of rectified flow with logit-normal t in fp32, gradient clipping, EMA with a
copy warm-up), on what differs per kind:

* `mmdit`: the MM-DiT and its text encoder trained jointly (`text.py` says why) on captions
  computed from each image (`text.training_captions`), the prompt replaced by the empty prompt with
  probability `cond_dropout` (classifier-free guidance on the text);
* `controlnet`: only the ControlNet is trained (`controlnet.py`); the class-conditional DiT at
  `base` is frozen (`requires_grad_(False)`, eval mode, outside the optimizer) and its weights'
  hash is checked after the last step; labels are dropped to the null class with probability
  `cond_dropout` as the base was trained.

Checkpoints (`state.safetensors`: trainable weights, EMA, optimizer, RNG, step; safetensors +
JSON, never a pickle) are written atomically every `checkpoint_every` steps and at the end;
`--resume` continues bit for bit; Ctrl-C / SIGTERM stops at the next step with a checkpoint. The
EMA weights are exported in fp16 as `OUT_DIR/<kind>.safetensors` with `kind` in the metadata.
fp32 is the default precision: bf16 autocast was slower on the CPU for these small matrices
(measured: diffusion_ext/README.md, MM-DiT training).

One module (~430 lines, over the house's ~400): the config, the loop both kinds share and its
CLI; split, each part would have this module as its only importer.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attention.precision import PRECISION_PRESETS, autocast, get_policy
from attention.state_files import atomic_write
from diffusion_ext import cli
from diffusion_ext.checkpoint import load_state, save_state
from diffusion_ext.config import MAX_BATCH, MAX_THREADS, _check_fields
from diffusion_ext.data import load_digits_split
from diffusion_ext.schedules import RectifiedFlow, bcast, get_process
from diffusion_ext.train import TrainingInterrupted, ema_update

logger = logging.getLogger(__name__)

KINDS = ("mmdit", "controlnet")
STATE_FILE = "state.safetensors"
DEFAULT_BASE = str(Path(__file__).parent / "assets" / "dit_digits_ema.safetensors")


@dataclass(frozen=True)
class CondTrainConfig:
    """Flags map one-to-one onto fields. Model sizes: `hidden_size` .. `text_depth` (mmdit);
    `base`, `control_blocks` (controlnet)."""

    kind: str = "mmdit"
    steps: int = 1300
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    ema_warmup_steps: int = 200
    cond_dropout: float = 0.1
    attr_keep: float = 0.5
    hidden_size: int = 64
    depth: int = 4
    num_heads: int = 4
    text_width: int = 64
    text_depth: int = 2
    base: str = DEFAULT_BASE
    control_blocks: int = 2
    precision: str = "fp32"
    seed: int = 0
    holdout_fraction: float = 0.1
    checkpoint_every: int = 250
    threads: int = 1

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.precision not in PRECISION_PRESETS:
            raise ValueError(f"unknown precision {self.precision!r}")
        if self.steps < 1 or not 1 <= self.batch_size <= MAX_BATCH:
            raise ValueError(f"need steps >= 1 and 1 <= batch_size <= {MAX_BATCH}")
        if self.checkpoint_every < 1 or self.warmup_steps < 0 or self.ema_warmup_steps < 0:
            raise ValueError("checkpoint_every >= 1, warmup_steps and ema_warmup_steps >= 0")
        if not (self.lr > 0 and self.grad_clip > 0 and 0 <= self.ema_decay < 1):
            raise ValueError("need lr > 0, grad_clip > 0 and 0 <= ema_decay < 1")
        if not (0 <= self.cond_dropout < 1 and 0 <= self.attr_keep <= 1):
            raise ValueError("need 0 <= cond_dropout < 1 and 0 <= attr_keep <= 1")
        if not 0 < self.holdout_fraction < 1 or not 0 <= self.seed < 2**32:
            raise ValueError("need 0 < holdout_fraction < 1 and 0 <= seed < 2**32")
        if not 0 <= self.threads <= MAX_THREADS or self.control_blocks < 1:
            raise ValueError(f"need 0 <= threads <= {MAX_THREADS} and control_blocks >= 1")


TRAIN_PRESETS: dict[str, CondTrainConfig] = {
    "mmdit": CondTrainConfig(),
    "controlnet": CondTrainConfig(kind="controlnet", steps=800, lr=1e-3, ema_warmup_steps=100),
    "mmdit-smoke": CondTrainConfig(
        steps=6,
        batch_size=16,
        hidden_size=32,
        depth=1,
        text_width=32,
        text_depth=1,
        checkpoint_every=3,
        warmup_steps=2,
    ),
    "controlnet-smoke": CondTrainConfig(
        kind="controlnet", steps=6, batch_size=16, checkpoint_every=3, warmup_steps=2
    ),
}


def lr_at(step: int, config: CondTrainConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to 0.1 * lr at `steps` (as `train.lr_at`)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    frac = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def ema_decay_at(step: int, config: CondTrainConfig) -> float:
    if step < config.ema_warmup_steps:
        return 0.0
    k = step - config.ema_warmup_steps
    return min(config.ema_decay, (1 + k) / (10 + k))


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def flow_loss(
    net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    process: RectifiedFlow,
    x0_BCHW: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Velocity MSE at logit-normal t (SD3 eq. 19): || net(c_in x_t, 1000 t) - (eps - x0) ||^2."""
    t_B = process.sample_t(x0_BCHW.shape[0], generator)
    eps = torch.randn(x0_BCHW.shape, generator=generator)
    x_t = process.add_noise(x0_BCHW, eps, t_B)
    out = net(bcast(process.c_in(t_B), x_t) * x_t, process.model_time(t_B))
    return F.mse_loss(out.float(), process.target(x0_BCHW, eps, t_B).float())


@dataclass
class Task:
    """What differs per kind: the trainable module, its batch loss, its export, a final check."""

    module: nn.Module
    loss: Callable[[nn.Module, torch.Tensor, torch.Generator], torch.Tensor]  # (net, idx_B, gen)
    export: Callable[[nn.Module, Path, dict[str, str]], None]
    check: Callable[[], dict[str, Any]] = lambda: {}
    num_train: int = 0
    frozen: nn.Module | None = None  # controlnet: the base, never trained


def make_task(config: CondTrainConfig) -> Task:
    """The kind's module (seeded init), data and loss."""
    torch.manual_seed(config.seed)
    data = load_digits_split(config.seed, config.holdout_fraction)
    process = get_process("rf")
    assert isinstance(process, RectifiedFlow)
    x_N, y_N = data.x_train_NCHW, data.y_train_N
    if config.kind == "mmdit":
        from diffusion_ext import mmdit, text

        model = mmdit.MMDiT(
            mmdit.MMDiTConfig(
                hidden_size=config.hidden_size,
                depth=config.depth,
                num_heads=config.num_heads,
                text_width=config.text_width,
                text_depth=config.text_depth,
            )
        )
        attrs = text.attributes(x_N, y_N)

        def mm_loss(net: nn.Module, idx_B: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            sub = text.Attributes(attrs.ink_N[idx_B], attrs.slant_N[idx_B])
            prompts = text.training_captions(y_N[idx_B], sub, config.attr_keep, gen)
            drop_B = torch.rand(len(prompts), generator=gen) < config.cond_dropout
            ids_BL = text.tokenize(["" if d else p for p, d in zip(prompts, drop_B, strict=True)])
            return flow_loss(lambda x, t: net(x, t, ids_BL), process, x_N[idx_B], gen)

        def mm_export(ema: nn.Module, path: Path, extra: dict[str, str]) -> None:
            assert isinstance(ema, mmdit.MMDiT)
            mmdit.export_mmdit(ema, path, torch.float16, **extra)

        return Task(model, mm_loss, mm_export, num_train=x_N.shape[0])
    from diffusion_ext import controlnet

    base = controlnet.load_frozen_base(config.base)
    base_hash = controlnet.weights_hash(base)
    cn = controlnet.ControlNet(base, config.control_blocks)
    edges_N = controlnet.sobel_edges(x_N)

    def cn_loss(net: nn.Module, idx_B: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        assert isinstance(net, controlnet.ControlNet)
        y_B = base.y_embed.drop(y_N[idx_B], config.cond_dropout, gen)
        controlled = controlnet.ControlledDiT(base, net)
        return flow_loss(
            lambda x, t: controlled(x, t, y_B, edges_N[idx_B]), process, x_N[idx_B], gen
        )

    def cn_export(ema: nn.Module, path: Path, extra: dict[str, str]) -> None:
        assert isinstance(ema, controlnet.ControlNet)
        controlnet.export_controlnet(ema, path, config.base, base_hash, torch.float16, **extra)

    def cn_check() -> dict[str, Any]:
        after = controlnet.weights_hash(base)
        if after != base_hash:  # the base is outside the optimizer: this would be a bug
            raise RuntimeError(f"the frozen base changed during training: {base_hash} -> {after}")
        return {"base_sha256_before": base_hash, "base_sha256_after": after}

    return Task(cn, cn_loss, cn_export, cn_check, x_N.shape[0], base)


@dataclass
class CondRun:
    """Everything a checkpoint holds; mutable, owned by `train`."""

    config: CondTrainConfig
    task: Task
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    step: int = 0
    elapsed_s: float = 0.0

    @classmethod
    def create(cls, config: CondTrainConfig) -> CondRun:
        task = make_task(config)
        ema = copy.deepcopy(task.module).requires_grad_(False)
        params = [p for p in task.module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
        return cls(config, task, ema, optimizer, torch.Generator().manual_seed(config.seed))

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "model": self.task.module.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "step": self.step,
            "elapsed_s": self.elapsed_s,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("config") != dataclasses.asdict(self.config):
            raise ValueError("the checkpoint was written with a different training config")
        try:
            self.task.module.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.generator.set_state(state["generator"])
            step, elapsed_s = state["step"], state["elapsed_s"]
            if not (isinstance(step, int) and 0 <= step <= self.config.steps):
                raise ValueError(f"step {step!r} is not in [0, {self.config.steps}]")
        except (KeyError, TypeError, RuntimeError, ValueError, AttributeError) as err:
            raise ValueError(f"the checkpoint does not fit this run: {cli.one_line(err)}") from None
        self.step, self.elapsed_s = step, float(elapsed_s)

    def train_step(self) -> float:
        """One optimizer step on a random batch; the loss."""
        config, module = self.config, self.task.module
        idx_B = torch.randint(
            0, self.task.num_train, (config.batch_size,), generator=self.generator
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, config)
        with autocast(get_policy(config.precision), "cpu"):
            loss = self.task.loss(module, idx_B, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        nn.utils.clip_grad_norm_(params, config.grad_clip)
        self.optimizer.step()
        ema_update(self.ema, module, ema_decay_at(self.step, config))
        self.step += 1
        return loss.item()


def train(
    config: CondTrainConfig,
    out_dir: Path,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    stop: Callable[[], bool] | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Train, checkpoint to `out_dir/state.safetensors`, export `out_dir/<kind>.safetensors`
    (fp16 EMA) at the last step; a summary. `stop_after`, `stop`, `resume` as in `train.train`."""
    state_path = out_dir / STATE_FILE
    _check_out_dir(out_dir, resume, state_path)
    if config.threads:
        torch.set_num_threads(config.threads)
    run = CondRun.create(config)
    if resume:
        run.load_state_dict(load_state(state_path))
        logger.info("resumed from %s at step %d", state_path, run.step)
    last = config.steps if stop_after is None else min(stop_after, config.steps)
    from tqdm import tqdm

    bar = tqdm(total=config.steps, initial=run.step, disable=not progress, desc=config.kind)
    run.task.module.train()
    start, loss_avg = time.perf_counter() - run.elapsed_s, float("nan")
    cpu_start = time.process_time()  # this process's CPU time: contention-free, unlike wall
    try:
        while run.step < last:
            loss = run.train_step()
            loss_avg = loss if math.isnan(loss_avg) else 0.98 * loss_avg + 0.02 * loss
            bar.update(1)
            bar.set_postfix(loss=f"{loss_avg:.4f}", refresh=False)
            run.elapsed_s = time.perf_counter() - start
            stopping = stop is not None and stop()
            if run.step % config.checkpoint_every == 0 or run.step == last or stopping:
                save_state(run.state_dict(), state_path)
            if stopping and run.step < config.steps:
                raise TrainingInterrupted(run.step, config.steps, state_path)
    finally:
        bar.close()
    summary: dict[str, Any] = {
        "kind": config.kind,
        "steps": run.step,
        "wall_s": round(run.elapsed_s, 1),
        "cpu_s_this_run": round(time.process_time() - cpu_start, 1),
        "final_loss_ema": round(loss_avg, 5),
    }
    summary.update(run.task.check())
    if run.step < config.steps:
        return summary
    extra = {
        "train_config": json.dumps(dataclasses.asdict(config)),
        "steps": str(run.step),
        "wall_s": f"{run.elapsed_s:.1f}",
        "command": command,
    }
    run.task.export(run.ema, out_dir / f"{config.kind}.safetensors", extra)
    text = json.dumps({"config": dataclasses.asdict(config), **summary}, indent=2) + "\n"
    atomic_write(out_dir / "train_summary.json", lambda tmp: tmp.write_text(text))
    return summary


def _check_out_dir(out_dir: Path, resume: bool, state_path: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=out_dir):
        pass
    if resume and not state_path.is_file():
        raise FileNotFoundError(f"--resume given but no checkpoint at {state_path}")
    if not resume and state_path.exists():
        raise FileExistsError(
            f"{state_path} exists: pass --resume to continue that run, or choose another "
            "--out-dir (it is never overwritten)"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog="python -m diffusion_ext.train_cond", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--preset", default="mmdit", choices=sorted(TRAIN_PRESETS))
    parser.add_argument("--out-dir", type=Path, default=None, help="default: <cache>/runs/PRESET")
    parser.add_argument("--resume", action="store_true", help=f"continue from OUT_DIR/{STATE_FILE}")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--stop-after", type=int, default=None, help="end this run after N steps")
    for field in dataclasses.fields(CondTrainConfig):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=type(field.default), default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    return cli.run(parser, lambda args: _main(parser.prog, args, argv), argv)


def _main(prog: str, args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(CondTrainConfig)
        if getattr(args, f.name) is not None
    }
    config = dataclasses.replace(TRAIN_PRESETS[args.preset], **overrides)
    if args.stop_after is not None and args.stop_after < 1:
        raise cli.UserError(f"--stop-after must be >= 1, got {args.stop_after}")
    if config.kind == "controlnet" and not Path(config.base).is_file():
        raise cli.UserError(f"--base {config.base}: no such checkpoint")
    out_dir = args.out_dir or cli.cache_dir() / "runs" / args.preset
    cli.check_out_dir(out_dir, "--out-dir")
    import sys

    command = " ".join([prog, *(sys.argv[1:] if argv is None else argv)])
    with cli.stop_requests() as stop:
        try:
            summary = train(
                config, out_dir, args.resume, not args.no_progress, args.stop_after, stop, command
            )
        except TrainingInterrupted as err:
            return cli.interrupted(prog, f"{err}; continue with --resume --out-dir {out_dir}")
        except KeyboardInterrupt:
            return cli.interrupted(prog, f"the last periodic checkpoint is in {out_dir}")
    print(json.dumps({"out_dir": str(out_dir), **summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
