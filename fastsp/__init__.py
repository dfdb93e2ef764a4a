"""fastsp: performance-first diffusion training with the self-perceptual objective."""
