"""The README's stage table is the stage registry: a stage added or renamed fails here."""

import re
from pathlib import Path

from raydapt.config import JobConfig
from raydapt.stage import STAGES

README = Path(__file__).resolve().parents[2] / "README.md"


def stage_rows() -> list[list[str]]:
    text = README.read_text()
    block = text.split("<!-- stages:", 1)[1].split("<!-- /stages -->", 1)[0]
    rows = [line for line in block.splitlines() if line.startswith("| `")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in rows]


def test_readme_stage_table_matches_the_registry():
    rows = stage_rows()
    assert [r[0].strip("`") for r in rows] == [s.name for s in STAGES]
    for row, stage in zip(rows, STAGES, strict=True):
        writes = f"`{stage.produces}`" if stage.produces else "HTTP"
        assert row[2] == writes, (stage.name, row[2])
        assert row[3] == stage.help, stage.name
        needs = set(re.findall(r"`(\w+)`", row[1])) - {"eval", "serve"}
        assert needs >= set(stage.needs(JobConfig())), stage.name  # default job's needs are listed


def test_every_stage_has_a_config_section_or_none_needed():
    sections = {f for f in JobConfig.__dataclass_fields__}
    assert {s.name for s in STAGES} <= sections
