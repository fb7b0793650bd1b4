"""Training: patches and augmentation, losses, and the Ray Train loop."""
