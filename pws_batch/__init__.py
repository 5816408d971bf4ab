"""pws-batch: batch generation of images that sound (Stable Diffusion + Auffusion on one shared latent)."""

__version__ = "0.1.0"
