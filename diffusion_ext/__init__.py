"""diffusion_ext: DiT denoisers and SDE/ODE samplers on the shared attention and precision runtime.

Modules: `config` (frozen configs + presets), `embeddings`, `dit`, `schedules` (processes),
`samplers` (one signature), `guidance` (CFG, classifier guidance), `data` (scikit-learn digits),
`checkpoint` (safetensors + JSON, nothing unpickled), `pipeline` (`Pipeline.from_pretrained`:
every kind behind one call, its `KIND_LOADERS` table), `noisy_classifier` (the noise-aware
classifier for classifier guidance), `vqvae` (VQ-VAE) and `latent` (latent diffusion on it),
`text` (captions, tokenizer, text encoder) and `mmdit` (SD3's MM-DiT), `controlnet`
(ControlNet on the frozen DiT, Sobel edge maps), `train` / `sample` / `quality` and
`train_cond` / `sample_cond` (CLIs), `cli` (what the commands share: one-line errors, output
checks, interruption). The GPU benchmark is `eval/bench_diffusion.py`. Nothing is imported at
package import time.
"""
