"""Every field TRL 1.16's configs add to TrainingArguments is accepted by tether's config of the same name.

The field list is tests/data/trl_1_16_config_fields.json, written from TRL itself by
`tools/trl_config_fields.py --write` (in a venv with trl==1.16.0). Each case builds tether's config with one field
set to TRL's default, as a TRL user's `GRPOConfig(..., field=value)` would, and checks it is stored. What each
option does is tested where it is implemented (test_grpo_options.py, test_dpo_options.py, test_sft_options.py...).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from trl_config_fields import BEGIN, END, NOT_YET, check_field, options_tables  # noqa: E402

SNAPSHOT = json.loads((Path(__file__).parent / "data" / "trl_1_16_config_fields.json").read_text())
CASES = [(config, field, value) for config, fields in sorted(SNAPSHOT.items()) if config not in NOT_YET
         for field, value in sorted(fields.items())]


def test_snapshot_covers_the_trainers() -> None:
    # A truncated or stale snapshot would make the cases below pass vacuously.
    for config in ("SFTConfig", "DPOConfig", "RewardConfig", "KTOConfig", "GRPOConfig", "RLOOConfig", "CPOConfig",
                   "ORPOConfig", "ModelConfig"):
        assert len(SNAPSHOT[config]) >= 10, config
    assert len(CASES) > 240


@pytest.mark.parametrize(("config", "field", "value"), CASES, ids=[f"{c}.{f}" for c, f, _ in CASES])
def test_tether_accepts_trl_field(config: str, field: str, value: object) -> None:
    assert check_field(config, field, value) is None


def test_migration_guide_tables_are_current() -> None:
    # docs/migrating-from-trl.md shows, per option, what tether does with it; regenerate with
    # `python tools/trl_config_fields.py --markdown tests/data/trl_1_16_config_fields.json --doc docs/migrating-from-trl.md`
    doc = (Path(__file__).resolve().parents[1] / "docs" / "migrating-from-trl.md").read_text()
    section = doc.split(BEGIN, 1)[1].split(END, 1)[0]
    assert section.strip() == options_tables(SNAPSHOT).strip()
    assert "**missing**" not in section
