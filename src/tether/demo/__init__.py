"""The offline demo: a synthetic corpus, tiny local models, and `run_demo`, which writes the data and an untrained
model and then runs the demo's pipeline YAML (`config.demo_yaml`) with `tether pipeline` (see `pipeline`).
Nothing heavy is imported until it runs.
"""

from .pipeline import DemoContext, print_config, run_demo

__all__ = ["DemoContext", "print_config", "run_demo"]
