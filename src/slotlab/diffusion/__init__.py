"""Slot-conditioned latent diffusion decoder (SlotDiffusion, Part 2)."""
