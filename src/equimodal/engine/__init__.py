"""The one training loop, checkpoints and run files."""
