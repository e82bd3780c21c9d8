"""The README and docs/ cite only what the repository holds, and give commands that work as written."""

import re

import pytest

from tests.support.project import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
CODE = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.M | re.S)


def code_of(page):
    """The page's inline code and the lines of its fenced blocks."""
    text = page.read_text()
    return [*CODE.findall(text), *(line for block in FENCE.findall(text) for line in block.splitlines())]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_link_and_relative_path_is_a_file_of_the_repository(page):
    cited = [target for target in LINK.findall(page.read_text()) if "://" not in target]
    # A file named in code relative to the page or the project (`../shared/notes.md`), not a refused
    # value given as an example (`../../escape`).
    cited += [word for snippet in code_of(page) for word in snippet.split() if re.fullmatch(r"\.\./\S*\.\w+", word)]
    for target in cited:
        places = [(folder / target).resolve() for folder in (page.parent, ROOT)]
        assert any(place.is_relative_to(ROOT) and place.exists() for place in places), (
            f"{page.name} cites {target}, which the repository lacks")


def test_every_mlflow_run_given_uses_the_projects_own_environment():
    """MLflow's default environment manager builds Python with pyenv, which needs the internet."""
    given = [snippet for page in PAGES for snippet in code_of(page) if snippet.startswith("mlflow run .")
             and snippet != "mlflow run ."]
    assert given
    for command in given:
        assert "--env-manager local" in command, command
