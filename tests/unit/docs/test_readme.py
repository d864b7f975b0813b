"""README is the newcomer's first screen: short, and every relative link in it resolves."""

import re

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_readme_is_short_and_its_links_resolve():
    assert len(README.splitlines()) <= 200
    links = [t for t in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README) if "://" not in t]
    assert links and all((ROOT / t).exists() for t in links), [t for t in links if not (ROOT / t).exists()]


def test_the_first_screen_says_what_it_is_why_and_how_to_start():
    first = "\n".join(README.splitlines()[:40])
    assert "alignment workbench" in first and "TRL" in first and "make demo" in first and "make test" in first
