"""TRL's `trl.experimental` package path: one subpackage per method, each a thin module of names pointing at
tether's implementation in `tether.trainers` (e.g. `tether.experimental.gkd.GKDTrainer`)."""
