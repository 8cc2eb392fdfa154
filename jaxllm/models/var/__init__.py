"""Visual autoregressive super-resolution: the multi-scale VQ-VAE (`vqvae`), the next-scale
transformer (`var`), VARSR's LR-conditioned model (`varsr`) and its diffusion refiner
(`refiner`)."""
