"""The documentation site builds with mkdocs --strict: a broken link, a missing page or a page
left out of the nav fails here, not on a reader's screen."""

import os
import subprocess
import sys

from conftest import ROOT


def test_the_docs_site_builds_strictly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "site" / "config-reference" / "index.html").exists()
