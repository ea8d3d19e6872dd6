"""The `parallax` command, the run configuration, the per-rank entry point and the training loop."""
