"""Report rendering for people: the job report as a self-contained HTML page (no torch here)."""

from app.reports.html import headline, render_report_html

__all__ = ["headline", "render_report_html"]
