"""The linear layers of one 7B Llama decoder step at M tokens, separate vs fused projections.

Diagnostic for the verification step (GPU): a 64-node tree multiplies the same weights as a
1-token step, so both should be bound by reading the weights; this times each projection shape
at M = 1, 16, 64 tokens (CUDA-graph replays, L2 flushed) and the fused alternatives (q|k|v as one
[3E, E] weight, gate|up as one [2F, E] weight), and prints the weight-read bandwidth.

    python -m eval.bench_gemm
"""

from __future__ import annotations

import json
import sys

import torch

from eval.timing import environment, graph_of, l2_flush, load_average, median_ms

E, F, V = 4096, 11008, 32000
LAYERS = {  # name -> (out features, in features, count per decoder layer)
    "q,k,v separate": [(E, E), (E, E), (E, E)],
    "qkv fused": [(3 * E, E)],
    "o": [(E, E)],
    "gate,up separate": [(F, E), (F, E)],
    "gate|up fused": [(2 * F, E)],
    "down": [(E, F)],
    "lm_head": [(V, E)],
}


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_gemm needs a CUDA GPU", file=sys.stderr)
        return 2
    load_start, flush = load_average(), l2_flush("write")
    rows = []
    for m in (1, 16, 64):
        for name, shapes in LAYERS.items():
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for n, k in shapes]
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _, k in shapes]

            def fn(ws=ws, xs=xs) -> None:
                for w, x in zip(ws, xs):
                    torch.nn.functional.linear(x, w)

            replay = graph_of(fn)
            seconds = 1e-3 * median_ms(
                replay, "cuda", iters=30, warmup=5, before=flush, clock="events"
            )
            nbytes = sum(w.numel() * 2 for w in ws)
            rows.append(
                {"m": m, "layer": name, "us": seconds * 1e6, "tb_s": nbytes / seconds / 1e12}
            )
            print(
                f"M={m:<3} {name:<18} {seconds * 1e6:9.1f} us  {nbytes / seconds / 1e12:5.2f} TB/s"
            )
    stamp = environment("cuda", torch.bfloat16, load_start)
    print(json.dumps({"bench": "gemm", **stamp, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
