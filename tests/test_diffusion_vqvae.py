"""VQ-VAE: straight-through gradients, EMA codebook, dead-code restarts, training, the committed
checkpoint's reconstruction and code usage, and the CLI's bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffusion_ext import vqvae as vqvae_cli
from diffusion_ext.checkpoint import load_state
from diffusion_ext.data import load_digits_split
from diffusion_ext.train import TrainingInterrupted
from diffusion_ext.vqvae import (
    STATE_FILE,
    VQVAE,
    VectorQuantizer,
    VQTrainConfig,
    VQVAEConfig,
    evaluate,
    load_vqvae,
    perplexity,
    train_vqvae,
)

COMMITTED = Path(vqvae_cli.__file__).parent / "assets" / "vqvae_digits.safetensors"
TINY = VQVAEConfig(hidden=8, code_dim=2, codebook_size=8)
TINY_TRAIN = VQTrainConfig(steps=6, batch_size=16, checkpoint_every=3, restart_every=2)


def tiny_model(seed: int = 0) -> tuple[VQVAE, torch.Tensor]:
    torch.manual_seed(seed)
    model = VQVAE(TINY)
    x = load_digits_split(0).x_train_NCHW[:32]
    with torch.no_grad():
        restarted = model.quantizer.restart_dead_codes(
            model.encode(x), 1.0, torch.Generator().manual_seed(seed)
        )
    assert restarted == TINY.codebook_size  # counts start at 0: every code is initialised
    return model, x


def test_straight_through_gradient_reaches_the_encoder() -> None:
    model, x = tiny_model()
    x_hat, z_e, q = model(x)
    z_e.retain_grad()
    q.z_q_BDhw.retain_grad()
    F.mse_loss(x_hat, x).backward()  # the reconstruction term alone
    assert z_e.grad is not None and q.z_q_BDhw.grad is not None
    assert float(z_e.grad.abs().max()) > 0
    assert torch.equal(z_e.grad, q.z_q_BDhw.grad)  # dL/dz_e = dL/dz_q, bit for bit
    for name, p in model.encoder.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    assert not any(p.requires_grad for p in model.quantizer.buffers())  # the EMA owns the codes


def test_commitment_term_pulls_z_e_towards_its_code() -> None:
    model, x = tiny_model()
    z_e = model.encode(x).detach().requires_grad_(True)
    q = model.quantizer(z_e)
    q.commitment_loss.backward()
    z_q = model.quantizer.lookup(q.codes_Bhw)
    beta = TINY.commitment_cost
    expected = 2 * beta * (z_e.detach() - z_q) / z_e.numel()  # d/dz_e of beta * mean((z_e - e)^2)
    assert z_e.grad is not None
    torch.testing.assert_close(z_e.grad, expected)
    torch.testing.assert_close(q.z_q_BDhw, z_q)  # forward value: the code itself


def test_ema_with_zero_decay_moves_each_used_code_to_its_cluster_mean() -> None:
    config = dataclasses.replace(TINY, ema_decay=0.0)
    quantizer = VectorQuantizer(config)
    quantizer.codebook_KD.copy_(torch.randn(8, 2, generator=torch.Generator().manual_seed(1)))
    z_e = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(2))
    codes = quantizer.codes(z_e)
    quantizer.ema_update(z_e, codes)
    z_ND, codes_N = z_e.permute(0, 2, 3, 1).reshape(-1, 2), codes.reshape(-1)
    for k in codes_N.unique().tolist():
        torch.testing.assert_close(
            quantizer.codebook_KD[k], z_ND[codes_N == k].mean(0), rtol=1e-4, atol=1e-4
        )
    assert float(quantizer.cluster_size_K.sum()) == pytest.approx(codes_N.numel())


def test_dead_codes_restart_from_encoder_outputs_and_live_codes_stay() -> None:
    quantizer = VectorQuantizer(TINY)
    quantizer.codebook_KD.copy_(torch.arange(16.0).reshape(8, 2))
    quantizer.cluster_size_K.copy_(torch.tensor([5.0, 0.1, 3.0, 0.0, 2.0, 0.5, 9.0, 1.0]))
    before = quantizer.codebook_KD.clone()
    z_e = torch.randn(2, 2, 2, 2, generator=torch.Generator().manual_seed(3)) + 100
    n = quantizer.restart_dead_codes(z_e, 1.0, torch.Generator().manual_seed(0))
    dead = torch.tensor([False, True, False, True, False, True, False, False])
    assert n == 3
    assert torch.equal(quantizer.codebook_KD[~dead], before[~dead])
    z_ND = z_e.permute(0, 2, 3, 1).reshape(-1, 2)
    for code in quantizer.codebook_KD[dead]:
        assert bool((z_ND == code).all(1).any())  # a real encoder output
    assert torch.equal(quantizer.cluster_size_K[dead], torch.ones(3))


def test_perplexity_counts_codes_in_use() -> None:
    assert perplexity(torch.arange(16), 16) == pytest.approx(16.0)
    assert perplexity(torch.zeros(50, dtype=torch.long), 16) == pytest.approx(1.0)
    assert 1.0 < perplexity(torch.tensor([0, 0, 0, 1]), 16) < 2.0


def test_training_resumes_bit_for_bit_and_never_overwrites(tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    summary = train_vqvae(TINY, TINY_TRAIN, straight, progress=False)
    assert summary["steps"] == 6 and (straight / "vqvae.safetensors").is_file()
    calls = []

    def stop_after_four() -> bool:
        calls.append(1)
        return len(calls) >= 4

    with pytest.raises(TrainingInterrupted):
        train_vqvae(TINY, TINY_TRAIN, split, progress=False, stop=stop_after_four)
    assert load_state(split / STATE_FILE)["step"] == 4
    train_vqvae(TINY, TINY_TRAIN, split, resume=True, progress=False)
    a, b = load_state(straight / STATE_FILE), load_state(split / STATE_FILE)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    with pytest.raises(FileExistsError):
        train_vqvae(TINY, TINY_TRAIN, straight, progress=False)
    with pytest.raises(ValueError, match="another VQ-VAE run or config"):
        other = dataclasses.replace(TINY_TRAIN, lr=0.5)
        train_vqvae(TINY, other, straight, resume=True, progress=False)
    model = load_vqvae(straight / "vqvae.safetensors")
    assert torch.equal(model.quantizer.codebook_KD, a["model"]["quantizer.codebook_KD"])


def test_committed_vqvae_reconstructs_held_out_digits_with_many_codes() -> None:
    model = load_vqvae(COMMITTED)
    split = load_digits_split(0)
    held_out = evaluate(model, split.x_test_NCHW)
    assert held_out["mse"] <= 0.05, held_out  # images in [-1, 1]
    assert held_out["perplexity"] >= 8, held_out
    with torch.no_grad():
        x_hat = model.decode(model.encode(split.x_test_NCHW))
    assert float(x_hat.min()) >= -1 and float(x_hat.max()) <= 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "steps, batch_size"),
        (["--commitment-cost", "nan"], "finite"),
        (["--codebook-size", "2.5"], "invalid int"),
        (["--ema-decay", "1"], "ema_decay"),
        (["--export", "out.pt"], "must end in .safetensors"),
    ],
)
def test_cli_bad_input_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code = vqvae_cli.main([*argv, "--out-dir", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert err.startswith("python -m diffusion_ext.vqvae: error: ")
    assert not (tmp_path / "run" / STATE_FILE).exists()


def test_cli_refuses_an_existing_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / STATE_FILE).write_bytes(b"not a checkpoint")
    assert vqvae_cli.main(["--out-dir", str(tmp_path), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert vqvae_cli.main(["--out-dir", str(tmp_path), "--resume", "--no-progress"]) == 2
    assert "cannot read training checkpoint" in capsys.readouterr().err
