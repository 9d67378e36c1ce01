"""diffusion_ext: DiT denoisers and SDE/ODE samplers on the shared attention and precision runtime.

Modules: `config` (frozen configs + presets), `embeddings`, `dit`, `schedules` (processes),
`samplers` (one signature), `guidance` (CFG, classifier guidance), `data` (scikit-learn digits),
`checkpoint` (safetensors + JSON, nothing unpickled), `train` and `sample` (CLIs), `quality`
(digit classifier + Frechet distance), `cli` (what the three commands share: one-line errors,
output checks, interruption). The GPU benchmark is `eval/bench_diffusion.py`. Nothing is
imported at package import time.
"""
