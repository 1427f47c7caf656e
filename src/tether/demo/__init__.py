"""Offline demo helpers: a synthetic corpus and the pieces that let the demo run without a model hub.

`run_demo` runs the stages of `STAGES` in order (see `pipeline`); it imports torch only once it runs.
"""

from .pipeline import STAGES, DemoContext, Stage, run_demo

__all__ = ["STAGES", "DemoContext", "Stage", "run_demo"]
