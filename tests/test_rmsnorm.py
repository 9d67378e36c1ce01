"""The one-kernel RMSNorm against its reference and transformers' LlamaRMSNorm.

Without CUDA the kernel runs under Triton's interpreter, in a fresh pytest process
(`tests/triton_interpreter.py` says why).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.triton_interpreter import DEVICE, RUN_HERE, rerun_under_interpreter

if not RUN_HERE:

    def test_rmsnorm_kernel_under_the_interpreter():
        rerun_under_interpreter(__file__)

else:
    pytest.importorskip("triton")
    from attention.rmsnorm import rms_norm_reference, rms_norm_triton
    from medusa_engine.hf_adapter.norms import FusedRMSNorm, fuse_rms_norms

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("shape", [(1, 64), (3, 7, 100), (5, 96)])
    def test_kernel_matches_reference(dtype, shape):
        gen = torch.Generator().manual_seed(sum(shape))
        x = (torch.randn(shape, generator=gen) * 3).to(dtype)
        w = (1 + torch.randn(shape[-1], generator=gen) / 4).to(dtype)
        want = rms_norm_reference(x, w, 1e-5)
        got = rms_norm_triton(x.to(DEVICE), w.to(DEVICE), 1e-5).cpu()
        assert got.dtype == want.dtype and got.shape == want.shape
        # Same arithmetic up to the float32 summation order: at most one rounding step apart.
        tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
        # A last-bit change of rstd rarely survives 16-bit rounding, so nearly every entry is
        # identical; but the interpreter casts float32 to bfloat16 by truncation, not rounding.
        truncates = os.environ.get("TRITON_INTERPRET") == "1" and dtype == torch.bfloat16
        if dtype != torch.float32 and not truncates:
            assert (got == want).float().mean() > 0.95

    def test_fused_llama_norms_and_undo():
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=64,
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(DEVICE).eval()
        ids = torch.randint(0, 64, (1, 9), device=DEVICE)
        with torch.no_grad():
            want = model(ids).logits
            norms = sum("RMSNorm" in type(m).__name__ for m in model.modules())
            undo = fuse_rms_norms(model)
            fused = [m for m in model.modules() if isinstance(m, FusedRMSNorm)]
            assert len(fused) == norms == 2 * 2 + 1  # two per layer and the final one
            got = model(ids).logits
            undo()
            again = model(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert torch.equal(again, want)
        assert not any(isinstance(m, FusedRMSNorm) for m in model.modules())
        assert not any("forward" in vars(m) for m in model.modules())  # nothing patched
