"""A noise-aware digit classifier p(y | x_t, t) for classifier guidance:
`python -m diffusion_ext.noisy_classifier --out FILE.safetensors`.

Shape legend: B batch, C = 1 channel, H = W = 8, K = 10 classes, F time features, U conv width.

Classifier guidance (Dhariwal & Nichol, 2021, Sec. 4) needs log p(y | x_t, t) on *noisy* inputs:
a classifier of clean digits (`quality.DigitClassifier`) says nothing useful about x_t at t = 0.7.
This one is trained, as Dhariwal & Nichol do, on x_t = alpha(t) x_0 + sigma(t) eps from the same
process as the DiT (`schedules.get_process`, rectified flow for the committed model), with t
uniform on [t_min, t_max] (the samplers query a uniform grid), on the train split only. It sees
what `guidance.classifier_log_prob` feeds it: c_in(t) x_t and the model time 1000 t.

It is deliberately *not* the quality gate's classifier: the gate judges guided samples with a
separately trained clean-image CNN, so guidance cannot score well by fooling its own judge.

Network: three 3x3 convs (U = 32, 64, 64) with GroupNorm and FiLM time conditioning (a
per-channel scale and shift from sinusoidal features of t, zero-initialised so the start is
time-independent), SiLU, one 2x2 average pool, global average pooling, a linear head; 106 k
parameters. Guidance uses it through `ShiftEnsemble` (`load_guidance_classifier`).

The file is safetensors (fp32) with JSON metadata: `format`, `process`, the training `config`,
the `command` that made it, wall time and held-out accuracy per noise level.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from attention.state_files import atomic_write
from diffusion_ext import cli
from diffusion_ext.checkpoint import read_header
from diffusion_ext.config import MAX_THREADS, PROCESSES
from diffusion_ext.data import DigitsSplit, load_digits_split
from diffusion_ext.embeddings import timestep_features
from diffusion_ext.schedules import Process, bcast, get_process

logger = logging.getLogger(__name__)

FORMAT = "diffusion_ext-noisy-classifier-1"
DEFAULT_NOISY_CLASSIFIER = Path(__file__).parent / "assets" / "noisy_classifier.safetensors"
EVAL_TIMES = (0.0, 0.25, 0.5, 0.75, 0.9)


class NoisyDigitClassifier(nn.Module):
    """logits_BK = classifier(c_in(t) x_t [B, 1, 8, 8], model time 1000 t [B])."""

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 64), freq_dim: int = 64) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        chans = (1, *widths)
        self.convs = nn.ModuleList(
            nn.Conv2d(chans[i], chans[i + 1], 3, padding=1) for i in range(3)
        )
        self.norms = nn.ModuleList(nn.GroupNorm(8, w) for w in widths)
        self.t_mlp = nn.Sequential(nn.Linear(freq_dim, 128), nn.SiLU())
        films = [nn.Linear(128, 2 * w) for w in widths]
        for film in films:  # FiLM starts as the identity: scale 1, shift 0
            nn.init.zeros_(film.weight)
            nn.init.zeros_(film.bias)
        self.films = nn.ModuleList(films)
        self.head = nn.Linear(widths[-1], 10)

    def forward(self, x_BCHW: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        if x_BCHW.ndim != 4 or tuple(x_BCHW.shape[1:]) != (1, 8, 8):
            raise ValueError(f"expected x [B, 1, 8, 8], got {tuple(x_BCHW.shape)}")
        c_BE = self.t_mlp(timestep_features(t_B, self.freq_dim).to(x_BCHW.dtype))
        h = x_BCHW
        for i, (conv, norm, film) in enumerate(
            zip(self.convs, self.norms, self.films, strict=True)
        ):
            scale_BU, shift_BU = film(c_BE).chunk(2, dim=-1)
            h = norm(conv(h)) * (1 + scale_BU[:, :, None, None]) + shift_BU[:, :, None, None]
            h = F.silu(h)
            if i == 1:
                h = F.avg_pool2d(h, 2)  # 8x8 -> 4x4
        return self.head(h.mean(dim=(2, 3)))


@dataclass(frozen=True)
class NoisyClassifierConfig:
    """Training of the noise-aware classifier (the CLI's flags map one-to-one onto fields)."""

    process: str = "rf"
    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    label_smoothing: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.process not in PROCESSES:
            raise ValueError(
                f"unknown process {self.process!r}; choose one of {', '.join(PROCESSES)}"
            )
        if not (1 <= self.steps <= 1_000_000 and 1 <= self.batch_size <= 65_536):
            raise ValueError(
                f"need 1 <= steps <= 1e6 and 1 <= batch_size <= 65536, got {self.steps}, "
                f"{self.batch_size}"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not 0.0 <= self.label_smoothing < 1.0:  # also false for NaN
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")


def noisy_batch(
    process: Process, x0: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_in(t) x_t, model time) for t ~ U[t_min, t_max]: what `classifier_log_prob` feeds."""
    u = torch.rand(x0.shape[0], generator=generator, dtype=torch.float64)
    t_B = process.t_min + (process.t_max - process.t_min) * u
    eps = torch.randn(x0.shape, generator=generator)
    x_t = process.add_noise(x0, eps, t_B.float())
    return bcast(process.c_in(t_B).float(), x0) * x_t, process.model_time(t_B).float()


def random_shifts(x_BCHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by its own (dy, dx) in {-1, 0, 1}^2, background (-1) filling in."""
    b, c, h, w = x_BCHW.shape
    padded = F.pad(x_BCHW, (1, 1, 1, 1), value=-1.0)  # [B, C, H + 2, W + 2]
    dy_B, dx_B = torch.randint(0, 3, (2, b), generator=generator)
    rows_BH = dy_B[:, None] + torch.arange(h)
    cols_BW = dx_B[:, None] + torch.arange(w)
    x = padded.gather(2, rows_BH[:, None, :, None].expand(b, c, h, w + 2))
    return x.gather(3, cols_BW[:, None, None, :].expand(b, c, h, w))


class ShiftEnsemble(nn.Module):
    """The classifier averaged over the shifts it was trained with (test-time augmentation):
    logits = mean over s of log_softmax(classifier(shift_s x, t)), s in {0, +-1 row, +-1 column}.

    Why: guidance climbs grad_x log p(y | x_t); a single network's gradient has directions that
    raise its own score without looking more like the digit (adversarial ones; the gate's
    classifier then disagrees). p(y | x_t) is shift-invariant on this data, so averaging over
    shifts keeps the posterior and cancels much of that (measured: diffusion_ext/README.md).
    """

    SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x_BCHW: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        log_p = [
            torch.log_softmax(self.classifier(torch.roll(x_BCHW, s, dims=(2, 3)), t_B), dim=-1)
            for s in self.SHIFTS
        ]
        return torch.stack(log_p).mean(0)


def train_noisy_classifier(split: DigitsSplit, config: NoisyClassifierConfig) -> nn.Module:
    """AdamW, one-cycle learning rate, label smoothing (calibrated probabilities: their gradients
    are what guidance follows), a +-1 pixel shift per image, on the train split only."""
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    process = get_process(config.process)
    model = NoisyDigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.steps)
    x, y = split.x_train_NCHW, split.y_train_N
    model.train()
    for step in range(config.steps):
        idx = torch.randint(0, x.shape[0], (config.batch_size,), generator=gen)
        x0 = random_shifts(x[idx], gen)
        x_in, t_in = noisy_batch(process, x0, gen)
        loss = F.cross_entropy(model(x_in, t_in), y[idx], label_smoothing=config.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0:
            logger.info("step %d: loss %.4f", step, loss.item())
    return model.eval()


@torch.no_grad()
def held_out_accuracy(
    model: nn.Module, process: Process, split: DigitsSplit, t: float, seed: int = 0
) -> float:
    """Accuracy on the held-out split noised to time t (one fixed noise draw per seed)."""
    gen = torch.Generator().manual_seed(seed)
    x0 = split.x_test_NCHW
    t_B = torch.full((x0.shape[0],), t, dtype=torch.float64)
    x_t = process.add_noise(x0, torch.randn(x0.shape, generator=gen), t_B.float())
    logits = model(bcast(process.c_in(t_B).float(), x0) * x_t, process.model_time(t_B).float())
    return float((logits.argmax(-1) == split.y_test_N).float().mean())


def save_noisy_classifier(model: nn.Module, path: str | Path, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    atomic_write(
        path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT, **meta})
    )


def load_noisy_classifier(path: str | Path) -> tuple[NoisyDigitClassifier, str]:
    """(classifier in eval mode, its process name); ValueError for any other file."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"no noise-aware classifier at {path}")
    meta, shapes = read_header(path)
    if meta.get("format") != FORMAT or meta.get("process") not in PROCESSES:
        raise ValueError(f"{path} is not a noise-aware classifier ({FORMAT}) of this version")
    model = NoisyDigitClassifier()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if shapes != expected:
        raise ValueError(f"{path}: tensors do not match the noise-aware classifier")
    try:
        model.load_state_dict(load_file(str(path)))
    except Exception as err:  # the header was fine; the data behind it was not
        raise ValueError(f"{path}: cannot read its tensors: {err}") from None
    return model.eval(), meta["process"]


def load_guidance_classifier(path: str | Path) -> tuple[nn.Module, str]:
    """(`ShiftEnsemble` of the classifier at `path`, its process): what guidance uses."""
    model, process = load_noisy_classifier(path)
    return ShiftEnsemble(model).eval(), process


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog="python -m diffusion_ext.noisy_classifier", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="a .safetensors file; default: $XDG_CACHE_HOME/diffusion_ext/noisy_classifier"
        ".safetensors (the committed one is assets/noisy_classifier.safetensors)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    for f in dataclasses.fields(NoisyClassifierConfig):
        parser.add_argument(
            "--" + f.name.replace("_", "-"), type=type(f.default), default=f.default
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(build_parser(), _main, argv)


def _main(args: argparse.Namespace) -> int:
    config = NoisyClassifierConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(NoisyClassifierConfig)}
    )
    if not 1 <= args.threads <= MAX_THREADS:
        raise cli.UserError(f"--threads must be in [1, {MAX_THREADS}], got {args.threads}")
    out = args.out or cli.cache_dir() / "noisy_classifier.safetensors"
    cli.check_out_file(out, "--out", (".safetensors",))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    split = load_digits_split(0)
    start, cpu_start = time.perf_counter(), time.process_time()
    model = train_noisy_classifier(split, config)
    wall_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    process = get_process(config.process)
    acc = {f"{t:g}": round(held_out_accuracy(model, process, split, t), 4) for t in EVAL_TIMES}
    command = "python -m diffusion_ext.noisy_classifier " + " ".join(
        f"--{f.name.replace('_', '-')} {getattr(config, f.name)}"
        for f in dataclasses.fields(config)
    )
    meta = {
        "process": config.process,
        "config": json.dumps(dataclasses.asdict(config)),
        "command": command,
        "wall_s": f"{wall_s:.1f}",
        "cpu_s": f"{cpu_s:.1f}",
        "held_out_accuracy_by_t": json.dumps(acc),
    }
    save_noisy_classifier(model, out, meta)
    summary = {"out": str(out), "wall_s": round(wall_s, 1), "cpu_s": round(cpu_s, 1)}
    print(json.dumps({**summary, "held_out_accuracy": acc}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
