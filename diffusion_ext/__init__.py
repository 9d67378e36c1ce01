"""diffusion_ext: DiT denoisers and SDE/ODE samplers on the shared attention and precision runtime.

Modules: `config` (frozen configs + presets), `embeddings`, `dit`, `schedules` (processes),
`samplers` (one signature), `guidance` (CFG, classifier guidance), `data` (scikit-learn digits),
`checkpoint`, `train` and `sample` (CLIs), `quality` (digit classifier + Frechet distance),
`bench` (GPU benchmark). Nothing is imported at package import time.
"""
