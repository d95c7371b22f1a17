"""The offline dashboard (seed §8): DuckDB queries → `reports/dashboard/index.html`.

`queries.dashboard_data` gathers everything with named SQL; `render.render_dashboard` fills the
Jinja template under `templates/dashboard/` and inlines its script and style, so the page opens
from disk with no network.
"""
