"""Issue 19 §6: every registered trainer has its page in docs/methods/, the page names every key of the
trainer's config section, and the code points to these pages (no citation of a methods.md the repository
does not contain)."""
import re
from pathlib import Path

import pytest

from engine.config import get_cfg_default
from engine.registry import TRAINER_REGISTRY

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "methods"


def page(trainer):
    return DOCS / f"{trainer.lower()}.md"


@pytest.mark.parametrize("trainer", TRAINER_REGISTRY.names())
def test_every_trainer_has_a_page_naming_its_keys_paper_and_code(trainer):
    assert page(trainer).is_file(), f"{trainer} has no page {page(trainer).relative_to(REPO)}"
    text = page(trainer).read_text()
    for heading in ("## What it computes", "## Config keys"):
        assert heading in text, f"{page(trainer).name} lacks '{heading}'"
    assert re.search(r"^## (Deviations from the official code|Where this departs)", text, re.M)
    assert "**Paper:**" in text and "**Official code:**" in text
    node = get_cfg_default().TRAINER.get(trainer.upper())
    missing = [k for k in (node or {}) if f"`{k}`" not in text]
    assert not missing, f"{page(trainer).name} does not name TRAINER.{trainer.upper()} keys {missing}"
    assert f"`{trainer}`" in (DOCS / "README.md").read_text(), f"docs/methods/README.md does not list {trainer}"


def test_every_page_belongs_to_a_registered_trainer():
    names = {n.lower() for n in TRAINER_REGISTRY.names()}
    assert {p.stem for p in DOCS.glob("*.md")} - {"README"} == names


def test_the_code_points_to_the_method_pages():
    """The code cites docs/methods/<method>.md and docs/protocol.md (pages that exist), never the methods.md the
    repository does not contain."""
    assert (REPO / "docs" / "protocol.md").is_file()
    cited = set()
    code = [p for d in ("trainers", "engine", "lt_sampling", "datasets", "tools") for p in (REPO / d).rglob("*.py")]
    for path in sorted([*code, REPO / "train.py"]):
        text = path.read_text()
        assert not re.search(r"(?<![/\w])methods\.md", text), f"{path.relative_to(REPO)} cites methods.md"
        cited |= set(re.findall(r"docs/methods/([\w]+\.md)", text))
    assert cited, "no docstring points to docs/methods/"
    assert not {c for c in cited if not (DOCS / c).is_file()}, "a pointer names a page that does not exist"
