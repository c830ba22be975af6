"""The README's picture of the exported page: the shipped flower's page, grown 96 steps from the
seed in a headless Chromium (needs Debian's chromium package).

    python docs/web_figure.py [OUT.png]     # default: docs/web_page.png
"""
import pathlib
import sys
import tempfile

from nca_fast.export import export_html
from nca_fast.export.headless import screenshot
from nca_fast.model import shipped_models

out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else
                   pathlib.Path(__file__).resolve().parent / "web_page.png")
with tempfile.TemporaryDirectory() as folder:
    page = export_html(shipped_models()["flower"], pathlib.Path(folder) / "flower.html")
    screenshot(page, out, 96, 0, window=(560, 600))
print(f"wrote {out}")
