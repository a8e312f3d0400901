"""``dashboard.html``: the W&B Report's panels as one self-contained page, for a machine without W&B.

The sections are the Report's (``reidreg.reporting.wandb_report.SECTIONS``), per dataset, each one
``<section class="panel">`` naming every method of the dataset; the figures
(``reidreg.reporting.dashboard_figures``) are PNGs embedded as base64 ``data:`` URIs and the tables are the
report's own Markdown tables as HTML. The page loads nothing (no script source, stylesheet, font or image
from elsewhere), so it opens offline and can be mailed as one file. A small inline script marks
``<body data-images>`` with how many figures decoded, which tests read from a browser's DOM.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from reidreg.reporting.dashboard_figures import cost_figure, png, test_metric_figure, validation_figure
from reidreg.reporting.plots import lambda_figure
from reidreg.reporting.table import Row
from reidreg.reporting.table_text import cost_table, primary_table
from reidreg.reporting.wandb_report import SECTIONS

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }
section.panel { border: 1px solid #ddd; border-radius: 6px; padding: 0.5rem 1rem; margin: 1rem 0; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }
td, th { border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: right; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; }
ul.methods { font-size: 0.9rem; }
"""
# Counts the figures that decoded once the page has loaded (a broken data: URI has no natural width).
CHECK_IMAGES = """
window.addEventListener("load", () => {
  const images = [...document.images];
  const decoded = images.filter((i) => i.complete && i.naturalWidth > 0);
  document.body.dataset.images = decoded.length + "/" + images.length;
});
"""


def markdown_table_html(text: str) -> str:
    """A Markdown pipe table (``reidreg.reporting.table_text``) as an HTML table."""
    lines = [line.strip().strip("|").split(" | ") for line in text.strip().splitlines()]
    header, body = lines[0], lines[2:]  # lines[1] is the alignment row

    def cells(values: list[str], tag: str) -> str:
        return "".join(f"<{tag}>{html.escape(value.strip())}</{tag}>" for value in values)

    rows = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in body)
    return f"<table><thead><tr>{cells(header, 'th')}</tr></thead><tbody>{rows}</tbody></table>"


def _image(figure_png: bytes, alt: str) -> str:
    data = base64.b64encode(figure_png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _methods(rows: list[Row]) -> str:
    items = "".join(
        f"<li class=method>{html.escape(row.method)}: {len(row.runs)} of {len(row.launched)} runs finished"
        f" (seeds {html.escape(', '.join(map(str, row.seeds)) or 'none')})</li>"
        for row in rows
    )
    return f"<ul class=methods>{items}</ul>"


def _panel(title: str, rows: list[Row], body: str) -> str:
    return f'<section class="panel"><h3>{html.escape(title)}</h3>{_methods(rows)}{body}</section>'


def dataset_section(rows: list[Row], dataset: str) -> str:
    """The panels of one dataset, in the order of ``SECTIONS``."""
    mine = [row for row in rows if row.dataset == dataset]
    figure = validation_figure(mine)
    validation = _image(png(figure), SECTIONS[2]) if figure else "<p>No run logged a validation score.</p>"
    lambdas = [(row, lambda_figure(row)) for row in mine]
    lambda_body = "".join(_image(png(f), f"{SECTIONS[3]}: {row.method}") for row, f in lambdas if f) or (
        "<p>No method of this dataset uses adaptive L2.</p>"
    )
    cost = cost_figure(mine)
    panels = [
        _panel(SECTIONS[0], mine, _image(png(test_metric_figure(mine)), SECTIONS[0])),
        _panel(SECTIONS[1], mine, markdown_table_html(primary_table(mine))),
        _panel(SECTIONS[2], mine, validation),
        _panel(SECTIONS[3], mine, lambda_body),
        _panel(
            SECTIONS[4],
            mine,
            (_image(png(cost), SECTIONS[4]) if cost else "<p>No run recorded its cost.</p>")
            + markdown_table_html(cost_table(mine)),
        ),
    ]
    return f'<section class="dataset"><h2>{html.escape(dataset)}</h2>{"".join(panels)}</section>'


def dashboard_html(rows: list[Row], *, title: str, report_file: str = "report.md") -> str:
    """The whole page; ``report_file`` is linked as the full report (the file beside the page)."""
    datasets = "".join(dataset_section(rows, d) for d in dict.fromkeys(row.dataset for row in rows))
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n"
        f"<body><h1>{html.escape(title)}</h1>"
        f'<p>Every number and test: <a href="{html.escape(report_file)}">{html.escape(report_file)}</a>.</p>'
        f"{datasets}<script>{CHECK_IMAGES}</script></body></html>\n"
    )


def write_dashboard(rows: list[Row], path: Path, *, title: str) -> Path:
    path.write_text(dashboard_html(rows, title=title))
    return path
