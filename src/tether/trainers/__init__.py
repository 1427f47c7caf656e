"""One module per training method, each a thin subclass of `TetherTrainer`."""
