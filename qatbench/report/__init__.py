"""Reports of a run: ``report.html``, one self-contained page rendered from a RunRecord.

``write_html(RunRecord.load(Path("report.json")), Path("report.html"))`` writes it.
"""

from qatbench.report.html import build_view, render_html, write_html

__all__ = ["build_view", "render_html", "write_html"]
