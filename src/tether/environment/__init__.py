"""TRL 0.7's `trl.environment`: the classic tool-use environment, names for the implementations in rollout/.

`load_tool` is tether's: transformers 5 removed `transformers.load_tool`; this one returns tether's shipped
tools, by their names or by the hub ids TRL 0.7's example scripts load (see `rollout.tools.SHIPPED_TOOLS`).
"""

from ..rollout.text_environment import TextEnvironment
from ..rollout.text_history import TextHistory
from ..rollout.tools import load_tool

__all__ = ["TextEnvironment", "TextHistory", "load_tool"]
