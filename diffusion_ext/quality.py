"""Offline quality gate for the digits DiT: `python -m diffusion_ext.quality`.

Shape legend: N images, C = 1 channel, H = W = 8, F penultimate features, K = 10 classes.

A small CNN digit classifier is trained on the train split (never on the held-out split). For each
classifier-free guidance scale, class-conditional samples are drawn (equal numbers per class) and
we report (a) the classifier's accuracy on them against the requested labels and (b) the Frechet
distance (Heusel et al., 2017) between Gaussian fits of the classifier's penultimate features of the
samples and of the held-out split. The floor is the same distance between the train and held-out
splits: real data against real data, with the same estimator biases.

Bad input is one line `python -m diffusion_ext.quality: error: ...` and exit code 2, checked
before the classifier trains or anything samples: the flags, the DiT checkpoint, the classifier
file (or, with `--train-classifier`, that its folder is writable).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attention.state_files import atomic_write
from diffusion_ext import cli
from diffusion_ext.checkpoint import load_dit, read_header
from diffusion_ext.config import MAX_THREADS, SampleConfig
from diffusion_ext.data import DigitsSplit, load_digits_split
from diffusion_ext.dit import DiT
from diffusion_ext.sample import class_grid, generate

logger = logging.getLogger(__name__)

DEFAULT_CLASSIFIER = Path(__file__).parent / "assets" / "digits_classifier.safetensors"


class DigitClassifier(nn.Module):
    """Two 3x3 convs (16, 32 channels), 2x2 max-pool, a 64-wide penultimate layer, 10 logits."""

    def __init__(self, features: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, features)
        self.head = nn.Linear(features, 10)

    def features(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        """Penultimate features [N, F] (after ReLU)."""
        h = F.relu(self.conv1(x_NCHW))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x_NCHW))


def train_classifier(split: DigitsSplit, seed: int = 0, epochs: int = 40) -> DigitClassifier:
    """Adam on the train split with small random shifts (+-1 pixel) as augmentation."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x, y = split.x_train_NCHW, split.y_train_N
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for idx in order.split(64):
            dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
            xb = torch.roll(x[idx], shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def save_classifier(model: DigitClassifier, path: str | Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def load_classifier(path: str | Path) -> DigitClassifier:
    """The classifier `save_classifier` wrote; ValueError for any other file."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"no classifier at {path}")
    model = DigitClassifier()
    _, shapes = read_header(path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if shapes != expected:
        raise ValueError(f"{path} is not a digit classifier of this version (tensors differ)")
    try:
        model.load_state_dict(load_file(str(path)))
    except Exception as err:  # the header was fine; the data behind it was not
        raise ValueError(f"{path}: cannot read its tensors: {err}") from None
    return model.eval()


@torch.no_grad()
def accuracy(classifier: DigitClassifier, x_NCHW: torch.Tensor, y_N: torch.Tensor) -> float:
    return float((classifier(x_NCHW).argmax(-1) == y_N).float().mean())


def frechet_distance(a_NF: np.ndarray, b_NF: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in float64.

    Tr((S_a S_b)^(1/2)) is the sum of square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2)
    (symmetric PSD, same spectrum as S_a S_b), which avoids a non-symmetric matrix square root.
    """
    a, b = np.asarray(a_NF, np.float64), np.asarray(b_NF, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(w.clip(min=0))) @ v.T
    eig = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    tr_sqrt = np.sqrt(eig.clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt)


@torch.no_grad()
def features(classifier: DigitClassifier, x_NCHW: torch.Tensor) -> np.ndarray:
    return classifier.features(x_NCHW).numpy()


def guidance_sweep(
    model: DiT,
    process_name: str,
    classifier: DigitClassifier,
    split: DigitsSplit,
    scales: Sequence[float],
    base: SampleConfig,
    guidance_classifier: tuple[nn.Module, str] | None = None,
) -> list[dict[str, float]]:
    """Accuracy and Frechet distance (vs held-out) of guided samples, one row per scale
    (`guidance_classifier`: the noise-aware classifier for `base.classifier_guidance`)."""
    held_out = features(classifier, split.x_test_NCHW)
    y_N = class_grid(model.config.num_classes, base.per_class)
    rows = []
    for scale in scales:
        config = SampleConfig(**{**base.__dict__, "guidance_scale": scale})
        with torch.no_grad():
            x = generate(model, process_name, y_N, config, classifier=guidance_classifier)
        if not bool(torch.isfinite(x).all()):  # e.g. a huge finite scale overflows
            raise ValueError(f"guidance scale {scale}: sampling produced non-finite values")
        fd = frechet_distance(features(classifier, x), held_out)
        rows.append({"guidance_scale": scale, "accuracy": accuracy(classifier, x, y_N), "fd": fd})
        logger.info("scale %.2f: accuracy %.4f, FD %.3f", scale, rows[-1]["accuracy"], fd)
    return rows


def parse_scales(text: str) -> list[float]:
    """'0,1,1.5' -> [0.0, 1.0, 1.5]; ValueError naming the bad item (each is checked by
    `SampleConfig` too: finite, >= 0)."""
    scales = []
    for item in text.split(","):
        try:
            scales.append(float(item))
        except ValueError:
            raise ValueError(f"--scales: {item.strip()!r} is not a number (in {text!r})") from None
        if not (math.isfinite(scales[-1]) and scales[-1] >= 0):
            raise ValueError(f"--scales: guidance scales must be finite and >= 0, got {item!r}")
    return scales


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(prog="python -m diffusion_ext.quality", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=Path(__file__).parent / "assets" / "dit_digits_ema.safetensors",
    )
    parser.add_argument("--classifier", type=Path, default=DEFAULT_CLASSIFIER)
    parser.add_argument(
        "--train-classifier", action="store_true", help="train and write --classifier first"
    )
    parser.add_argument("--scales", default="0,1,1.5,2,3,4", help="comma-separated guidance scales")
    parser.add_argument("--sampler", default="heun")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data-seed", type=int, default=0, help="the split's seed (as in training)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--classifier-guidance",
        type=float,
        default=0.0,
        help="classifier guidance scale on every row (with --scales 0: the unconditional DiT)",
    )
    parser.add_argument(
        "--noisy-classifier",
        type=Path,
        default=Path(__file__).parent / "assets" / "noisy_classifier.safetensors",
        help="the noise-aware classifier for --classifier-guidance (not the judge)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(build_parser(), _main, argv)


def _main(args: argparse.Namespace) -> int:
    """Checks everything that can be checked first, then trains (optionally) and samples."""
    scales = parse_scales(args.scales)
    base = SampleConfig(
        sampler=args.sampler,
        steps=args.steps,
        per_class=args.per_class,
        seed=args.seed,
        classifier_guidance=args.classifier_guidance,
    )
    if not 1 <= args.threads <= MAX_THREADS:
        raise cli.UserError(f"--threads must be in [1, {MAX_THREADS}], got {args.threads}")
    if not 0 <= args.data_seed < 2**32:
        raise cli.UserError(f"--data-seed must be in [0, 2**32), got {args.data_seed}")
    if args.train_classifier:
        cli.check_out_file(args.classifier, "--classifier", (".safetensors",))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    guidance_classifier = None
    if base.classifier_guidance > 0:
        from diffusion_ext.noisy_classifier import load_guidance_classifier

        guidance_classifier = load_guidance_classifier(args.noisy_classifier)
    model, process_name = load_dit(args.checkpoint)
    if not args.train_classifier:
        classifier = load_classifier(args.classifier)
    split = load_digits_split(args.data_seed)
    if args.train_classifier:
        save_classifier(train_classifier(split, args.seed), args.classifier)
        classifier = load_classifier(args.classifier)
    held_out_acc = accuracy(classifier, split.x_test_NCHW, split.y_test_N)
    floor = frechet_distance(
        features(classifier, split.x_train_NCHW), features(classifier, split.x_test_NCHW)
    )
    rows = guidance_sweep(model, process_name, classifier, split, scales, base, guidance_classifier)
    print(
        f"classifier held-out accuracy {held_out_acc:.4f}; FD floor (train vs held-out) {floor:.3f}"
    )
    print(f"{'scale':>6} {'accuracy':>9} {'FD':>8} {'FD/floor':>9}")
    for r in rows:
        print(
            f"{r['guidance_scale']:6.4g} {r['accuracy']:9.4f} {r['fd']:8.3f} {r['fd'] / floor:9.2f}"
        )
    summary = {
        "classifier_held_out_accuracy": held_out_acc,
        "fd_floor": floor,
        "rows": rows,
        "sampler": args.sampler,
        "steps": args.steps,
        "per_class": args.per_class,
        "classifier_guidance": args.classifier_guidance,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
