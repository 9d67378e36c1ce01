"""A small conv VQ-VAE for the 8x8 digits: `python -m diffusion_ext.vqvae`.

Shape legend: B batch, C = 1 image channel, H = W = 8 image size, D code width, h = w = 4 latent
grid, N = B * h * w latent vectors, K codebook size.

van den Oord, Vinyals & Kavukcuoglu (2017), "Neural Discrete Representation Learning"; paper
symbols -> names: x -> x_BCHW, z_e(x) -> z_e_BDhw (encoder output), e_k -> codebook_KD[k],
z_q(x) -> z_q_BDhw (nearest code, eq. 1-2), beta -> `commitment_cost`, sg[.] -> `.detach()`.

* Straight-through estimator (Sec. 3.1): the decoder reads z_e + sg[z_q - z_e], which equals z_q
  forward and passes dL/dz_q to z_e unchanged backward.
* Loss (eq. 3) = ||x - dec(z_q)||^2 + beta ||z_e - sg[e]||^2. The codebook term ||sg[z_e] - e||^2
  is replaced by exponential moving averages (Appendix A.1; Razavi et al., 2019), chosen because
  (a) the codebook then moves at a rate set by `ema_decay`, independent of the optimiser's
  learning rate and Adam's per-parameter normalisation, so it settles in a few hundred steps
  (the whole run here has ~1 min of a shared CPU), and (b) its counts N_k are exactly the usage
  statistic the dead-code restarts need: N_k <- g N_k + (1 - g) n_k, m_k <- g m_k + (1 - g) sum
  of the z_e assigned to k, e_k = m_k / N_k (Laplace-smoothed), g = `ema_decay`.
* Dead-code restarts (Dhariwal et al., 2020, Jukebox, Sec. 2.2): every `restart_every` steps a
  code with N_k < `restart_threshold` is re-initialised to a random encoder output of the batch.
  Counts start at 0, so step 0 restarts every code: a data-dependent initialisation.
* Code usage is reported as perplexity exp(-sum_k p_k log p_k) of the codes chosen on a set of
  images (K if all codes are used equally, 1 if one code is).

The decoder's output is clamped to [-1, 1] (the data range) by `decode` and `evaluate`; training
sees it unclamped. Training checkpoints (`state.safetensors`) and the export (`vqvae.safetensors`,
kind "vqvae", the config in its metadata) use `diffusion_ext.checkpoint`'s pickle-free formats;
the CLI follows `diffusion_ext.train`'s (resume, Ctrl-C, one-line errors).

Model, training loop and CLI share this file (~500 lines, over the house's ~400): the loop is not
`train.train`'s (no weight EMA, no diffusion loss, codebook EMA and restarts instead), and split
out it would be imported by this module alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from attention.state_files import atomic_write
from diffusion_ext import cli
from diffusion_ext.checkpoint import load_state, read_header, save_state
from diffusion_ext.config import MAX_BATCH, MAX_THREADS, check_fields
from diffusion_ext.data import load_digits_split
from diffusion_ext.train import TrainingInterrupted

logger = logging.getLogger(__name__)

KIND = "vqvae"
STATE_FILE = "state.safetensors"
EXPORT_FILE = "vqvae.safetensors"
EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class VQVAEConfig:
    """The autoencoder and its quantiser (a 4x4 grid of `code_dim`-wide codes)."""

    hidden: int = 64
    code_dim: int = 4
    codebook_size: int = 64
    commitment_cost: float = 0.25  # beta
    ema_decay: float = 0.99  # g of the codebook EMA
    laplace_eps: float = 1e-5

    def __post_init__(self) -> None:
        check_fields(self)
        if min(self.hidden, self.code_dim, self.codebook_size) < 1:
            raise ValueError(f"hidden, code_dim, codebook_size must be >= 1: {self}")
        if max(self.hidden, self.code_dim, self.codebook_size) > 4096:
            raise ValueError(f"hidden, code_dim, codebook_size must be <= 4096: {self}")
        if not (0.0 <= self.ema_decay < 1.0 and self.commitment_cost >= 0 and self.laplace_eps > 0):
            raise ValueError("need 0 <= ema_decay < 1, commitment_cost >= 0, laplace_eps > 0")


@dataclass(frozen=True)
class VQTrainConfig:
    """VQ-VAE training on the digits' train split. CLI flags map one-to-one onto fields."""

    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-3
    restart_every: int = 50
    restart_threshold: float = 1.0
    seed: int = 0
    holdout_fraction: float = 0.1
    checkpoint_every: int = 500
    threads: int = 1

    def __post_init__(self) -> None:
        check_fields(self)
        if min(self.steps, self.batch_size, self.restart_every, self.checkpoint_every) < 1:
            raise ValueError("steps, batch_size, restart_every, checkpoint_every must be >= 1")
        if self.batch_size > MAX_BATCH or not 0 <= self.threads <= MAX_THREADS:
            raise ValueError(f"need batch_size <= {MAX_BATCH} and 0 <= threads <= {MAX_THREADS}")
        if not (self.lr > 0 and self.restart_threshold >= 0 and 0 < self.holdout_fraction < 1):
            raise ValueError("need lr > 0, restart_threshold >= 0, 0 < holdout_fraction < 1")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")


@dataclass(frozen=True)
class Quantized:
    z_q_BDhw: torch.Tensor  # straight-through: z_e + sg[z_q - z_e]
    codes_Bhw: torch.Tensor  # int64 in [0, K)
    commitment_loss: torch.Tensor  # beta ||z_e - sg[z_q]||^2 (mean), fp32 scalar


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantiser with an EMA codebook (buffers, not parameters)."""

    codebook_KD: torch.Tensor
    cluster_size_K: torch.Tensor
    embed_sum_KD: torch.Tensor

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        self.config = config
        k, d = config.codebook_size, config.code_dim
        self.register_buffer("codebook_KD", torch.zeros(k, d))
        self.register_buffer("cluster_size_K", torch.zeros(k))  # N_k; 0 = dead, restarted
        self.register_buffer("embed_sum_KD", torch.zeros(k, d))  # m_k

    def codes(self, z_e_BDhw: torch.Tensor) -> torch.Tensor:
        """argmin_k ||z_e - e_k||^2 per grid cell, codes_Bhw int64."""
        b, d, h, w = z_e_BDhw.shape
        if d != self.config.code_dim:
            raise ValueError(f"expected z_e [B, {self.config.code_dim}, h, w], got {(b, d, h, w)}")
        z_ND = z_e_BDhw.permute(0, 2, 3, 1).reshape(-1, d).float()
        dist_NK = torch.cdist(z_ND, self.codebook_KD.float())
        return dist_NK.argmin(1).reshape(b, h, w)

    def lookup(self, codes_Bhw: torch.Tensor) -> torch.Tensor:
        """e_{codes}: z_q_BDhw."""
        return self.codebook_KD[codes_Bhw].permute(0, 3, 1, 2)

    def forward(self, z_e_BDhw: torch.Tensor) -> Quantized:
        codes_Bhw = self.codes(z_e_BDhw)
        z_q_BDhw = self.lookup(codes_Bhw).to(z_e_BDhw.dtype)
        commitment = F.mse_loss(z_e_BDhw.float(), z_q_BDhw.detach().float())
        z_st_BDhw = z_e_BDhw + (z_q_BDhw - z_e_BDhw).detach()  # straight-through (Sec. 3.1)
        return Quantized(z_st_BDhw, codes_Bhw, self.config.commitment_cost * commitment)

    @torch.no_grad()
    def ema_update(self, z_e_BDhw: torch.Tensor, codes_Bhw: torch.Tensor) -> None:
        """One EMA step of N_k, m_k and e_k (Appendix A.1, eqs. 6-8); mutates the buffers."""
        c = self.config
        z_ND = z_e_BDhw.detach().permute(0, 2, 3, 1).reshape(-1, c.code_dim).float()
        onehot_NK = F.one_hot(codes_Bhw.reshape(-1), c.codebook_size).float()
        self.cluster_size_K.lerp_(onehot_NK.sum(0), 1 - c.ema_decay)
        self.embed_sum_KD.lerp_(onehot_NK.T @ z_ND, 1 - c.ema_decay)
        n = self.cluster_size_K.sum()
        smoothed_K = (self.cluster_size_K + c.laplace_eps) / (n + c.codebook_size * c.laplace_eps)
        self.codebook_KD.copy_(self.embed_sum_KD / (smoothed_K * n)[:, None])

    @torch.no_grad()
    def restart_dead_codes(
        self, z_e_BDhw: torch.Tensor, threshold: float, generator: torch.Generator
    ) -> int:
        """Codes with N_k < `threshold` <- random encoder outputs of this batch (N_k = 1); the
        number restarted."""
        dead_K = self.cluster_size_K < threshold
        n_dead = int(dead_K.sum())
        if n_dead:
            z_ND = z_e_BDhw.detach().permute(0, 2, 3, 1).reshape(-1, self.config.code_dim)
            pick = torch.randint(0, z_ND.shape[0], (n_dead,), generator=generator)
            self.codebook_KD[dead_K] = z_ND[pick].float()
            self.embed_sum_KD[dead_K] = z_ND[pick].float()
            self.cluster_size_K[dead_K] = 1.0
        return n_dead


class VQVAE(nn.Module):
    """x_BCHW [B, 1, 8, 8] -> z_e_BDhw [B, D, 4, 4] -> z_q -> x_hat [B, 1, 8, 8]."""

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        self.config = config
        e, d = config.hidden, config.code_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(1, e // 2, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(e // 2, e, 4, stride=2, padding=1),  # 8x8 -> 4x4
            nn.ReLU(),
            nn.Conv2d(e, e, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(e, d, 1),
        )
        self.quantizer = VectorQuantizer(config)
        self.decoder = nn.Sequential(
            nn.Conv2d(d, e, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(e, e, 3, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(e, e // 2, 4, stride=2, padding=1),  # 4x4 -> 8x8
            nn.ReLU(),
            nn.Conv2d(e // 2, 1, 3, padding=1),
        )

    def encode(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """z_e_BDhw, continuous (before quantisation)."""
        if x_BCHW.ndim != 4 or tuple(x_BCHW.shape[1:]) != (1, 8, 8):
            raise ValueError(f"expected images [B, 1, 8, 8], got {tuple(x_BCHW.shape)}")
        return self.encoder(x_BCHW)

    def decode(self, z_BDhw: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """Images [B, 1, 8, 8] in [-1, 1] from latents, snapped to the nearest codes first when
        `quantize` (the decoder was trained on codes)."""
        if quantize:
            z_BDhw = self.quantizer.lookup(self.quantizer.codes(z_BDhw))
        return self.decoder(z_BDhw).clamp(-1.0, 1.0)

    def forward(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Quantized]:
        """(x_hat unclamped, z_e, quantised) for training."""
        z_e_BDhw = self.encode(x_BCHW)
        q = self.quantizer(z_e_BDhw)
        return self.decoder(q.z_q_BDhw), z_e_BDhw, q


def perplexity(codes: torch.Tensor, codebook_size: int) -> float:
    """exp(entropy) of the empirical code distribution of `codes` (any shape)."""
    p_K = torch.bincount(codes.reshape(-1), minlength=codebook_size).double()
    p_K = p_K / p_K.sum()
    return float(torch.exp(-(p_K[p_K > 0] * p_K[p_K > 0].log()).sum()))


@torch.no_grad()
def evaluate(model: VQVAE, x_NCHW: torch.Tensor) -> dict[str, float]:
    """Reconstruction MSE (clamped output vs x, images in [-1, 1]) and code perplexity."""
    z_e = model.encode(x_NCHW)
    codes = model.quantizer.codes(z_e)
    x_hat = model.decoder(model.quantizer.lookup(codes)).clamp(-1.0, 1.0)
    return {
        "mse": float(F.mse_loss(x_hat, x_NCHW)),
        "perplexity": perplexity(codes, model.config.codebook_size),
    }


def vq_loss(model: VQVAE, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Quantized]:
    """(loss = MSE(x, dec(z_q)) + beta ||z_e - sg[z_q]||^2, z_e, quantised)."""
    x_hat, z_e, q = model(x_BCHW)
    return F.mse_loss(x_hat, x_BCHW) + q.commitment_loss, z_e, q


# -- training ----------------------------------------------------------------------------------


@dataclass
class VQRun:
    """Everything a VQ-VAE checkpoint holds; mutable, owned by `train_vqvae`."""

    model_config: VQVAEConfig
    config: VQTrainConfig
    model: VQVAE
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    step: int = 0
    elapsed_s: float = 0.0

    @classmethod
    def create(cls, model_config: VQVAEConfig, config: VQTrainConfig) -> VQRun:
        torch.manual_seed(config.seed)
        model = VQVAE(model_config)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        return cls(
            model_config, config, model, optimizer, torch.Generator().manual_seed(config.seed)
        )

    def _configs(self) -> dict[str, Any]:
        return {
            "model": dataclasses.asdict(self.model_config),
            "train": dataclasses.asdict(self.config),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "config": self._configs(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "step": self.step,
            "elapsed_s": self.elapsed_s,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != KIND or state.get("config") != self._configs():
            raise ValueError("the checkpoint was written by another VQ-VAE run or config")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.generator.set_state(state["generator"])
            step, elapsed_s = state["step"], float(state["elapsed_s"])
            if not (isinstance(step, int) and 0 <= step <= self.config.steps):
                raise ValueError(f"step {step!r} is not in [0, {self.config.steps}]")
        except (KeyError, TypeError, RuntimeError, ValueError) as err:
            raise ValueError(f"the checkpoint does not fit this run: {cli.one_line(err)}") from None
        self.step, self.elapsed_s = step, elapsed_s


def lr_at(step: int, config: VQTrainConfig) -> float:
    """Cosine decay from `lr` to 0.1 * lr (no warm-up: the model is tiny and Adam-stable)."""
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / config.steps)))


def train_step(run: VQRun, x_NCHW: torch.Tensor) -> float:
    """One step on a random batch: restarts (every `restart_every`), Adam, EMA; the loss."""
    config, model = run.config, run.model
    idx_B = torch.randint(0, x_NCHW.shape[0], (config.batch_size,), generator=run.generator)
    x_BCHW = x_NCHW[idx_B]
    if run.step % config.restart_every == 0:
        with torch.no_grad():
            z_e = model.encode(x_BCHW)
        restarted = model.quantizer.restart_dead_codes(z_e, config.restart_threshold, run.generator)
        if restarted:
            logger.debug("step %d: restarted %d dead codes", run.step, restarted)
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(run.step, config)
    loss, z_e, q = vq_loss(model, x_BCHW)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    model.quantizer.ema_update(z_e, q.codes_Bhw)
    run.step += 1
    return loss.item()


def train_vqvae(
    model_config: VQVAEConfig,
    config: VQTrainConfig,
    out_dir: Path,
    resume: bool = False,
    progress: bool = True,
    stop: Callable[[], bool] | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train, checkpoint to `out_dir/state.safetensors`, export `out_dir/vqvae.safetensors` (fp32,
    `extra` in its metadata); the summary (held-out MSE and perplexity). Refuses to overwrite a
    checkpoint without `resume` (FileExistsError); on `stop()` writes a checkpoint and raises
    `train.TrainingInterrupted`. Sets torch's intra-op threads to `config.threads` if non-zero."""
    state_path = out_dir / STATE_FILE
    cli.check_out_dir(out_dir, "--out-dir")
    if resume and not state_path.is_file():
        raise FileNotFoundError(f"--resume given but no checkpoint at {state_path}")
    if not resume and state_path.exists():
        raise FileExistsError(f"{state_path} exists: pass --resume or choose another --out-dir")
    if config.threads:
        torch.set_num_threads(config.threads)
    run = VQRun.create(model_config, config)
    if resume:
        run.load_state_dict(load_state(state_path))
    data = load_digits_split(config.seed, config.holdout_fraction)
    from tqdm import tqdm

    bar = tqdm(total=config.steps, initial=run.step, disable=not progress, desc="vqvae")
    start, loss_avg = time.perf_counter() - run.elapsed_s, float("nan")
    run.model.train()
    try:
        while run.step < config.steps:
            loss = train_step(run, data.x_train_NCHW)
            loss_avg = loss if math.isnan(loss_avg) else 0.98 * loss_avg + 0.02 * loss
            bar.update(1)
            bar.set_postfix(loss=f"{loss_avg:.4f}", refresh=False)
            run.elapsed_s = time.perf_counter() - start
            stopping = stop is not None and stop()
            if run.step % config.checkpoint_every == 0 or run.step == config.steps or stopping:
                save_state(run.state_dict(), state_path)
            if stopping and run.step < config.steps:
                raise TrainingInterrupted(run.step, config.steps, state_path)
    finally:
        bar.close()
    model = run.model.eval()
    held_out, train_eval = evaluate(model, data.x_test_NCHW), evaluate(model, data.x_train_NCHW)
    summary = {
        "steps": run.step,
        "wall_s": round(run.elapsed_s, 1),
        "held_out_mse": round(held_out["mse"], 5),
        "held_out_perplexity": round(held_out["perplexity"], 2),
        "train_mse": round(train_eval["mse"], 5),
        "train_perplexity": round(train_eval["perplexity"], 2),
    }
    meta = {k: str(v) for k, v in summary.items()}
    export_vqvae(model, out_dir / EXPORT_FILE, extra={**meta, **(extra or {})})
    text = json.dumps({"config": run._configs(), **summary}, indent=2) + "\n"
    atomic_write(out_dir / "train_summary.json", lambda tmp: tmp.write_text(text))
    return summary


# -- files -------------------------------------------------------------------------------------


def vqvae_tensors(model: VQVAE, dtype: torch.dtype, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}


def export_vqvae(
    model: VQVAE,
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    extra: dict[str, str] | None = None,
) -> None:
    """The weights and codebook as safetensors (atomic); metadata: kind, `vqvae_config`, extra."""
    meta = {"kind": KIND, "vqvae_config": json.dumps(dataclasses.asdict(model.config))}
    meta.update(extra or {})
    tensors = vqvae_tensors(model, dtype)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def vqvae_from_tensors(
    path: str | Path, config_json: str, tensors: dict[str, torch.Tensor]
) -> VQVAE:
    """A VQVAE (eval mode, fp32) of `config_json` holding `tensors`; ValueError naming `path` if
    the config is bad or the tensors' names or shapes differ from the config's."""
    try:
        config = VQVAEConfig(**json.loads(config_json))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: bad vqvae_config in its metadata: {err}") from None
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in VQVAE(config).state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != shapes:
        diff = sorted(set(expected.items()) ^ set(shapes.items()))[:3]
        raise ValueError(f"{path}: tensors do not match its vqvae_config, e.g. {diff}")
    model = VQVAE(config)
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return model.eval()


def load_vqvae(path: str | Path) -> VQVAE:
    """The VQVAE of an `export_vqvae` file; FileNotFoundError / ValueError otherwise."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no VQ-VAE checkpoint at {path}")
    meta, _ = read_header(path)
    if meta.get("kind") != KIND or "vqvae_config" not in meta:
        raise ValueError(f"{path} is not a diffusion_ext VQ-VAE export (kind {meta.get('kind')!r})")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # the header was fine; the data behind it was not
        raise ValueError(f"{path}: cannot read its tensors: {err}") from None
    return vqvae_from_tensors(path, meta["vqvae_config"], tensors)


# -- CLI ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(prog="python -m diffusion_ext.vqvae", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="default: $XDG_CACHE_HOME/diffusion_ext/runs/vqvae (~/.cache if unset)",
    )
    parser.add_argument("--resume", action="store_true", help=f"continue from OUT_DIR/{STATE_FILE}")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--export", type=Path, default=None, help="also write the export here")
    parser.add_argument("--export-dtype", default="fp16", choices=sorted(EXPORT_DTYPES))
    for cls in (VQVAEConfig, VQTrainConfig):
        for field in dataclasses.fields(cls):
            flag = "--" + field.name.replace("_", "-")
            parser.add_argument(flag, type=type(field.default), default=None)
    return parser


def _overrides(cls: Any, args: argparse.Namespace) -> dict[str, Any]:
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if getattr(args, f.name) is not None
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    command = "python -m diffusion_ext.vqvae " + shlex.join(sys.argv[1:] if argv is None else argv)
    return cli.run(parser, lambda args: _main(parser.prog, command, args), argv)


def _main(prog: str, command: str, args: argparse.Namespace) -> int:
    model_config = VQVAEConfig(**_overrides(VQVAEConfig, args))
    config = VQTrainConfig(**_overrides(VQTrainConfig, args))
    out_dir = args.out_dir or cli.cache_dir() / "runs" / "vqvae"
    cli.check_out_dir(out_dir, "--out-dir")
    if args.export is not None:
        cli.check_out_file(args.export, "--export", (".safetensors",))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with cli.stop_requests() as stop:
        try:
            summary = train_vqvae(
                model_config, config, out_dir, args.resume, not args.no_progress, stop
            )
        except TrainingInterrupted as err:
            return cli.interrupted(prog, f"{err}; continue with --resume --out-dir {out_dir}")
        except KeyboardInterrupt:
            return cli.interrupted(prog, f"the last periodic checkpoint is in {out_dir}")
    if args.export is not None:
        model = load_vqvae(out_dir / EXPORT_FILE)
        meta = {k: str(v) for k, v in summary.items()}
        export_vqvae(
            model, args.export, EXPORT_DTYPES[args.export_dtype], {**meta, "command": command}
        )
    print(json.dumps({"out_dir": str(out_dir), **summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
