#!/bin/bash
set -e
# Every model issue 21 trains (noise-aware classifier, VQ-VAE, latent DiT, MM-DiT, ControlNet),
# from scratch into OUT (default runs/diffusion-all; the committed assets are not touched), as
# two chains of one-thread runs, one per core of a 2-core CPU. Prints the elapsed time.
# Usage: scripts/train_diffusion_all.sh [OUT]
cd "$(dirname "$0")/.."
P=.venv/bin/python
O=${1:-runs/diffusion-all}
mkdir -p "$O"
start=$(date +%s)
(
  /usr/bin/time -f "noisy_classifier %e s wall %U s user" $P -m diffusion_ext.noisy_classifier --out $O/noisy.safetensors
  /usr/bin/time -f "vqvae %e s wall %U s user" $P -m diffusion_ext.vqvae --out-dir $O/vqvae --export $O/vqvae.safetensors
  /usr/bin/time -f "latent %e s wall %U s user" $P -m diffusion_ext.latent train --vqvae $O/vqvae.safetensors --out-dir $O/latent --export $O/latent.safetensors
) > $O/chain_a.log 2>&1 &
(
  /usr/bin/time -f "mmdit %e s wall %U s user" $P -m diffusion_ext.train_cond --preset mmdit --out-dir $O/mmdit
  /usr/bin/time -f "controlnet %e s wall %U s user" $P -m diffusion_ext.train_cond --preset controlnet --out-dir $O/controlnet
) > $O/chain_b.log 2>&1 &
wait
echo "all issue-21 training: $(( $(date +%s) - start )) s elapsed" > "$O/total.log"
grep -h "s wall" "$O/chain_a.log" "$O/chain_b.log" >> "$O/total.log"
cat "$O/total.log"
