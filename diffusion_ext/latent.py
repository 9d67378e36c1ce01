"""Latent diffusion on the VQ-VAE's latents: `python -m diffusion_ext.latent {train,sample,quality}`.

Shape legend: B batch, C = 1 image channel, H = W = 8 image size, D latent channels (the VQ-VAE's
code width), h = w = 4 latent grid, K classes.

Rombach et al. (2022), "High-Resolution Image Synthesis with Latent Diffusion Models": a diffusion
model on an autoencoder's latents, decoded by its decoder. Here: a class-conditional rectified-flow
DiT (`DIT_PRESETS["latent-digits"]`, 16 tokens of 4x4x4) on `diffusion_ext.vqvae` latents.

* Which latents: the continuous, pre-quantisation z_e, quantised at decode time (the LDM paper's
  choice for its VQ-regularised autoencoders: the quantisation layer is absorbed into the
  decoder). Why: z_e is a continuous distribution, which a Gaussian flow fits without having to
  collapse exactly onto K = 64 points per cell (the dequantised z_q is a mixture of point masses);
  the commitment loss keeps z_e next to its code, so it carries the same information; and snapping
  a sample to its nearest codes projects the DiT's small errors back onto latents the decoder was
  trained on (`LatentPipeline.quantize`; measured, it changes the gate's figures by less than
  the Frechet distance's noise: diffusion_ext/README.md).
* Scale: latents are standardised with one scalar shift and scale (the train split's z_e mean and
  std, as LDM's scale factor) so that the flow's N(0, I) prior matches the data's scale; both are
  stored with the checkpoint. No x0 clipping when sampling (latents are not in [-1, 1]).
* Training is `diffusion_ext.train.train` itself (same loop, AdamW, EMA, bf16 autocast, atomic
  checkpoints, `--resume`, Ctrl-C) given the latents of the digits split as `data`;
  `latent_source.json` in the run folder records the VQ-VAE file's SHA-256 so that a resume with
  another VQ-VAE is refused.
* The export is one self-contained safetensors file: the DiT's EMA weights under `dit.`, the
  VQ-VAE under `vqvae.`, metadata `kind` = "latent-dit", `dit_config`, `process`, `vqvae_config`,
  `latent_shift`, `latent_scale`, and the training command and wall time. `load_latent_pipeline`
  reads it (shapes checked against the configs on the meta device before anything is allocated);
  `load_components` is `pipeline.Pipeline.from_pretrained`'s loader of the kind.

One module (~500 lines, over the house's ~400) for one kind: pipeline, file format, training
wrapper and the three subcommands that only this kind uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from attention.precision import PRECISION_PRESETS, PrecisionPolicy
from attention.state_files import atomic_write
from diffusion_ext import cli, quality
from diffusion_ext.checkpoint import load_dit, read_header
from diffusion_ext.config import (
    DIT_PRESETS,
    MAX_THREADS,
    PROCESSES,
    DiTConfig,
    SampleConfig,
    TrainConfig,
)
from diffusion_ext.data import DigitsSplit, load_digits_split
from diffusion_ext.dit import DiT
from diffusion_ext.guidance import model_denoiser
from diffusion_ext.pipeline import Components, LoadOptions, with_attention
from diffusion_ext.sample import class_grid, save_grid
from diffusion_ext.samplers import DenoiseFn
from diffusion_ext.samplers import sample as run_sampler
from diffusion_ext.schedules import get_process
from diffusion_ext.train import TrainingInterrupted, train
from diffusion_ext.vqvae import VQVAE, load_vqvae, vqvae_from_tensors, vqvae_tensors

logger = logging.getLogger(__name__)

KIND = "latent-dit"
EXPORT_FILE = "latent_dit.safetensors"
SOURCE_FILE = "latent_source.json"
ASSETS = Path(__file__).parent / "assets"
DEFAULT_VQVAE = ASSETS / "vqvae_digits.safetensors"
DEFAULT_CHECKPOINT = ASSETS / "latent_dit_digits.safetensors"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

DEFAULT_GUIDANCE = 1.25  # the quality bar is measured here (diffusion_ext/README.md)
# The pixel DiT's recipe (TRAIN_PRESETS["digits"]) on the latent preset, shorter: the latents are
# an easier target, and the CPU budget is 6 minutes for VQ-VAE + latent DiT together.
LATENT_TRAIN = TrainConfig(model="latent-digits", steps=1000, ema_warmup_steps=200)


@dataclass(frozen=True)
class LatentStats:
    """z = (z_e - shift) / scale: what the DiT sees."""

    shift: float
    scale: float


def latent_stats(z_e_BDhw: torch.Tensor) -> LatentStats:
    return LatentStats(float(z_e_BDhw.mean()), float(z_e_BDhw.std()))


@torch.no_grad()
def encode_split(vqvae: VQVAE, split: DigitsSplit) -> tuple[DigitsSplit, LatentStats]:
    """The split with images replaced by standardised z_e latents [N, D, 4, 4] (labels kept)."""
    z_train, z_test = vqvae.encode(split.x_train_NCHW), vqvae.encode(split.x_test_NCHW)
    stats = latent_stats(z_train)
    z_train, z_test = ((z - stats.shift) / stats.scale for z in (z_train, z_test))
    return DigitsSplit(z_train, split.y_train_N, z_test, split.y_test_N), stats


@dataclass
class LatentPipeline:
    """Class-conditional sampling: noise -> DiT flow in latent space -> VQ-VAE decoder."""

    dit: DiT
    vqvae: VQVAE
    process_name: str
    stats: LatentStats
    sampler: str = "heun"
    quantize: bool = True
    policy: PrecisionPolicy = PRECISION_PRESETS["fp32"]

    @property
    def num_classes(self) -> int:
        return self.dit.config.num_classes

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """One latent (D, h, w): what the sampler integrates."""
        c = self.dit.config
        return (c.in_channels, c.image_size, c.image_size)

    def denoiser(self, labels: torch.Tensor, guidance: float) -> DenoiseFn:
        """The guided latent denoiser for int64 labels [B] in [0, K] (K = the null class);
        `guidance` 0 is one unconditional pass, otherwise classifier-free guidance with scale w
        (1 = the conditional model)."""
        if labels.ndim != 1 or labels.dtype != torch.long:
            raise ValueError(f"expected int64 labels [B], got {labels.dtype} {tuple(labels.shape)}")
        if bool(((labels < 0) | (labels > self.num_classes)).any()):
            raise ValueError(
                f"labels must be in [0, {self.num_classes}] ({self.num_classes} = null)"
            )
        process = get_process(self.process_name)
        labels = labels.to(next(self.dit.parameters()).device)
        null = self.dit.null_class
        if guidance == 0:
            y_null = torch.full_like(labels, null)
            return model_denoiser(self.dit, process, y_null, null_class=null, policy=self.policy)
        return model_denoiser(
            self.dit, process, labels, null_class=null, guidance_scale=guidance, policy=self.policy
        )

    @torch.no_grad()
    def decode(self, z_BDhw: torch.Tensor) -> torch.Tensor:
        """Standardised latents -> images [B, 1, 8, 8] in [-1, 1] (fp32), through the codes when
        `quantize`."""
        z_e = z_BDhw.float() * self.stats.scale + self.stats.shift
        return self.vqvae.decode(z_e, quantize=self.quantize)

    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor,
        steps: int,
        guidance: float,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Images [B, 1, 8, 8] in [-1, 1] (fp32) for int64 labels [B] in [0, K] (K = the null
        class: unconditional), with classifier-free guidance scale `guidance` (1 = conditional)
        and `steps` sampler steps. Deterministic given `generator` (the noise is drawn from it,
        on its device)."""
        SampleConfig(sampler=self.sampler, steps=steps, guidance_scale=guidance)  # validates
        denoise = self.denoiser(labels, guidance)
        device = next(self.dit.parameters()).device
        gen_device = generator.device if generator is not None else torch.device("cpu")
        shape = (labels.shape[0], *self.sample_shape)
        noise = torch.randn(shape, generator=generator, device=gen_device).to(device)
        process = get_process(self.process_name)
        return self.decode(run_sampler(self.sampler, denoise, process, noise, steps, generator))

    def to(self, device: torch.device | str) -> LatentPipeline:
        self.dit.to(device)
        self.vqvae.to(device)
        return self


# -- files -------------------------------------------------------------------------------------


def export_latent_dit(
    dit: torch.nn.Module,
    dit_config: DiTConfig,
    process: str,
    vqvae: VQVAE,
    stats: LatentStats,
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    extra: dict[str, str] | None = None,
) -> None:
    """One safetensors file (atomic) holding the DiT (`dit.*`) and the VQ-VAE (`vqvae.*`)."""
    tensors = {"dit." + k: v.detach().to(dtype).contiguous() for k, v in dit.state_dict().items()}
    tensors.update(vqvae_tensors(vqvae, dtype, prefix="vqvae."))
    meta = {
        "kind": KIND,
        "dit_config": json.dumps(dataclasses.asdict(dit_config)),
        "process": process,
        "vqvae_config": json.dumps(dataclasses.asdict(vqvae.config)),
        "latent_shift": repr(stats.shift),
        "latent_scale": repr(stats.scale),
    }
    meta.update(extra or {})
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _dit_from_tensors(path: str | Path, config_json: str, tensors: dict[str, torch.Tensor]) -> DiT:
    try:
        config = DiTConfig(**json.loads(config_json))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: bad dit_config in its metadata: {err}") from None
    if config.depth > len(tensors):  # bounds the meta-device build below
        raise ValueError(f"{path}: dit_config says depth {config.depth}, the file is too small")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in DiT(config).state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != shapes:
        diff = sorted(set(expected.items()) ^ set(shapes.items()))[:3]
        raise ValueError(f"{path}: DiT tensors do not match its dit_config, e.g. {diff}")
    model = DiT(config)
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return model.eval()


def load_latent_pipeline(
    path: str | Path, device: torch.device | str = "cpu", sampler: str = "heun"
) -> LatentPipeline:
    """The `LatentPipeline` of an `export_latent_dit` file (kind "latent-dit"), fp32 weights on
    `device`; FileNotFoundError, or ValueError for anything that is not an intact export."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no latent-DiT checkpoint at {path}")
    meta, _ = read_header(path)
    missing = {"dit_config", "process", "vqvae_config", "latent_shift", "latent_scale"} - set(meta)
    if meta.get("kind") != KIND or missing:
        raise ValueError(f"{path} is not a latent-DiT export (kind {meta.get('kind')!r})")
    if meta["process"] not in PROCESSES:
        raise ValueError(f"{path}: unknown process {meta['process']!r} in its metadata")
    try:
        stats = LatentStats(float(meta["latent_shift"]), float(meta["latent_scale"]))
        tensors = load_file(str(path))
    except Exception as err:
        raise ValueError(f"{path}: cannot read it: {cli.one_line(err)}") from None
    if not (abs(stats.shift) < float("inf") and 0 < stats.scale < float("inf")):
        raise ValueError(f"{path}: bad latent shift/scale {stats}")
    parts: dict[str, dict[str, torch.Tensor]] = {"dit.": {}, "vqvae.": {}}
    for name, value in tensors.items():
        prefix = next((p for p in parts if name.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"{path}: unexpected tensor {name!r}")
        parts[prefix][name[len(prefix) :]] = value
    dit = _dit_from_tensors(path, meta["dit_config"], parts["dit."])
    vqvae = vqvae_from_tensors(path, meta["vqvae_config"], parts["vqvae."])
    SampleConfig(sampler=sampler)  # validates the name
    return LatentPipeline(dit, vqvae, meta["process"], stats, sampler).to(device)


def load_components(path: Path, options: LoadOptions) -> Components:
    """`pipeline.Pipeline`'s loader of the "latent-dit" kind: the DiT on `options`' device,
    attention backend and parameter dtype; the VQ-VAE decoder in fp32."""
    pipe = load_latent_pipeline(path, options.device)
    dit = with_attention(pipe.dit, options.attention)
    pipe.dit = dit.to(options.device, options.policy.param_torch_dtype).eval()
    pipe.policy = options.policy

    def make_denoiser(
        conditions: torch.Tensor | list[str], guidance: float, control: torch.Tensor | None
    ) -> DenoiseFn:
        assert isinstance(conditions, torch.Tensor) and control is None  # the pipeline checks
        return pipe.denoiser(conditions, guidance)

    return Components(
        kind=KIND,
        process_name=pipe.process_name,
        sample_shape=pipe.sample_shape,
        make_denoiser=make_denoiser,
        num_classes=pipe.num_classes,
        default_guidance=DEFAULT_GUIDANCE,
        decode=pipe.decode,
        x0_range=None,  # latents are not in [-1, 1]
        device=options.device,
        metadata=read_header(path)[0],
    )


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- training ----------------------------------------------------------------------------------


def train_latent(
    config: TrainConfig,
    vqvae_path: Path,
    out_dir: Path,
    resume: bool = False,
    progress: bool = True,
    stop: Callable[[], bool] | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Encode the digits split with the VQ-VAE at `vqvae_path`, train the DiT on the latents with
    `train.train`, and export `out_dir/latent_dit.safetensors` (fp32); the summary."""
    vqvae = load_vqvae(vqvae_path)
    if DIT_PRESETS[config.model].in_channels != vqvae.config.code_dim:  # the model is validated
        raise ValueError(
            f"model {config.model!r} does not take the VQ-VAE's {vqvae.config.code_dim}-channel "
            "4x4 latents"
        )
    split, stats = encode_split(vqvae, load_digits_split(config.seed, config.holdout_fraction))
    source = {"vqvae_sha256": file_sha256(vqvae_path)}
    source_path = out_dir / SOURCE_FILE
    cli.check_out_dir(out_dir, "--out-dir")
    if resume:
        recorded = json.loads(source_path.read_text()) if source_path.is_file() else None
        if recorded != source:
            raise ValueError(
                f"--resume: {out_dir} was trained on latents of another VQ-VAE than {vqvae_path}"
            )
    elif not (out_dir / "state.safetensors").exists():  # else train() refuses the folder
        text = json.dumps(source) + "\n"
        atomic_write(source_path, lambda tmp: tmp.write_text(text))
    summary = train(config, out_dir, resume, progress, stop=stop, data=split)
    if summary["steps"] == config.steps:
        dit, process = load_dit(out_dir / "ema.safetensors")
        meta = {"train_wall_s": str(summary["wall_s"]), **(extra or {})}
        export_latent_dit(dit, dit.config, process, vqvae, stats, out_dir / EXPORT_FILE, extra=meta)
    return summary


@torch.no_grad()
def guidance_rows(
    pipe: LatentPipeline,
    classifier: quality.DigitClassifier,
    split: DigitsSplit,
    scales: Sequence[float],
    per_class: int,
    steps: int,
    seed: int,
) -> list[dict[str, float]]:
    """The quality gate's accuracy and Frechet distance (vs held-out) per guidance scale."""
    held_out = quality.features(classifier, split.x_test_NCHW)
    y_N = class_grid(pipe.num_classes, per_class)
    rows = []
    for scale in scales:
        x = pipe.sample(y_N, steps, scale, torch.Generator().manual_seed(seed))
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"guidance scale {scale}: sampling produced non-finite values")
        fd = quality.frechet_distance(quality.features(classifier, x), held_out)
        rows.append(
            {"guidance_scale": scale, "accuracy": quality.accuracy(classifier, x, y_N), "fd": fd}
        )
    return rows


# -- CLI ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(prog="python -m diffusion_ext.latent", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train the latent DiT on a VQ-VAE's latents")
    tr.add_argument("--vqvae", type=Path, default=DEFAULT_VQVAE)
    tr.add_argument("--out-dir", type=Path, default=None, help="default: <cache>/runs/latent")
    tr.add_argument("--resume", action="store_true")
    tr.add_argument("--no-progress", action="store_true")
    tr.add_argument("--export", type=Path, default=None, help="also write the export here")
    tr.add_argument("--export-dtype", default="fp16", choices=sorted(DTYPES))
    for field in dataclasses.fields(TrainConfig):
        tr.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=None)
    for name, helptext in (("sample", "write a sample grid PNG"), ("quality", "the quality gate")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
        p.add_argument("--sampler", default="heun")
        p.add_argument("--steps", type=int, default=32 if name == "sample" else 16)
        p.add_argument("--per-class", type=int, default=10 if name == "sample" else 100)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--no-quantize", action="store_true", help="decode z without snapping")
    sub.choices["sample"].add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE)
    sub.choices["sample"].add_argument("--out", type=Path, default=None, help="a .png file")
    sub.choices["quality"].add_argument("--scales", default="1,1.25,1.5,2")
    sub.choices["quality"].add_argument(
        "--classifier", type=Path, default=quality.DEFAULT_CLASSIFIER
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    command = "python -m diffusion_ext.latent " + shlex.join(sys.argv[1:] if argv is None else argv)
    return cli.run(parser, lambda args: _main(parser.prog, command, args), argv)


def _main(prog: str, command: str, args: argparse.Namespace) -> int:
    if args.command == "train":
        return _train(prog, command, args)
    guidance = args.guidance_scale if args.command == "sample" else 1.0
    config = SampleConfig(
        sampler=args.sampler,
        steps=args.steps,
        guidance_scale=guidance,
        per_class=args.per_class,
        seed=args.seed,
        clip_denoised=False,  # latents are not in [-1, 1]
    )
    if not 1 <= args.threads <= MAX_THREADS:
        raise cli.UserError(f"--threads must be in [1, {MAX_THREADS}], got {args.threads}")
    if args.command == "sample":
        return _sample(args, config)
    return _quality(args, config)


def _load(args: argparse.Namespace, config: SampleConfig) -> LatentPipeline:
    torch.set_num_threads(args.threads)
    pipe = load_latent_pipeline(args.checkpoint, sampler=config.sampler)
    pipe.quantize = not args.no_quantize
    return pipe


def _sample(args: argparse.Namespace, config: SampleConfig) -> int:
    out = args.out or cli.cache_dir() / "latent_samples.png"
    cli.check_out_file(out, "--out", (".png",))  # before the model loads and samples
    pipe = _load(args, config)
    y_B = class_grid(pipe.num_classes, config.per_class)
    generator = torch.Generator().manual_seed(config.seed)
    x = pipe.sample(y_B, config.steps, config.guidance_scale, generator)
    if not bool(torch.isfinite(x).all()):  # e.g. a huge finite guidance scale overflows
        raise cli.UserError("sampling produced non-finite values; nothing written")
    save_grid(x, pipe.num_classes, out)
    fields = ("sampler", "steps", "guidance_scale", "per_class", "seed")
    print(json.dumps({"out": str(out), **{f: getattr(config, f) for f in fields}}))
    return 0


def _quality(args: argparse.Namespace, config: SampleConfig) -> int:
    scales = quality.parse_scales(args.scales)
    classifier = quality.load_classifier(args.classifier)
    pipe = _load(args, config)
    split = load_digits_split(0)
    floor = quality.frechet_distance(
        quality.features(classifier, split.x_train_NCHW),
        quality.features(classifier, split.x_test_NCHW),
    )
    rows = guidance_rows(
        pipe, classifier, split, scales, config.per_class, config.steps, config.seed
    )
    print(f"FD floor (train vs held-out) {floor:.3f}")
    print(f"{'scale':>6} {'accuracy':>9} {'FD':>8} {'FD/floor':>9}")
    for r in rows:
        print(
            f"{r['guidance_scale']:6.4g} {r['accuracy']:9.4f} {r['fd']:8.3f} {r['fd'] / floor:9.2f}"
        )
    summary = {"fd_floor": floor, "rows": rows, "sampler": config.sampler, "steps": config.steps}
    print(json.dumps({**summary, "per_class": config.per_class, "quantize": pipe.quantize}))
    return 0


def _train(prog: str, command: str, args: argparse.Namespace) -> int:
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if getattr(args, f.name) is not None
    }
    config = dataclasses.replace(LATENT_TRAIN, **overrides)
    out_dir = args.out_dir or cli.cache_dir() / "runs" / "latent"
    cli.check_out_dir(out_dir, "--out-dir")
    if args.export is not None:
        cli.check_out_file(args.export, "--export", (".safetensors",))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    vq_meta, _ = read_header(args.vqvae) if Path(args.vqvae).is_file() else ({}, {})
    extra = {"command": command, "vqvae_train_wall_s": vq_meta.get("wall_s", "unknown")}
    with cli.stop_requests() as stop:
        try:
            summary = train_latent(
                config, args.vqvae, out_dir, args.resume, not args.no_progress, stop, extra
            )
        except TrainingInterrupted as err:
            return cli.interrupted(prog, f"{err}; continue with --resume --out-dir {out_dir}")
        except KeyboardInterrupt:
            return cli.interrupted(prog, f"the last periodic checkpoint is in {out_dir}")
    if args.export is not None and summary["steps"] == config.steps:
        pipe = load_latent_pipeline(out_dir / EXPORT_FILE)
        meta = {"train_wall_s": str(summary["wall_s"]), **extra}
        export_latent_dit(
            pipe.dit,
            pipe.dit.config,
            pipe.process_name,
            pipe.vqvae,
            pipe.stats,
            args.export,
            DTYPES[args.export_dtype],
            meta,
        )
    print(json.dumps({"out_dir": str(out_dir), **summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
