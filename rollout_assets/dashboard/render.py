"""Render the dashboard page: the Jinja template with its script, style and data inlined.

The page must open from disk on a machine with no network (seed §8 reviewers read it offline),
so nothing is linked: `dashboard.js` and `dashboard.css` are read and inlined, and the data is a
JSON document inside a `<script type="application/json">` element, escaped so no value can
close the element.
"""

from __future__ import annotations

import json
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path

import jinja2
from markupsafe import Markup

from rollout_assets.collect import atomic_write
from rollout_assets.dashboard.queries import ISO, dashboard_data
from rollout_assets.home import PROJECT_ROOT, RolloutHome
from rollout_assets.policy import Policy

TEMPLATE = "dashboard/index.html.j2"
ASSETS = ("dashboard/dashboard.js", "dashboard/dashboard.css")


def dashboard_path(home: RolloutHome) -> Path:
    return home.root / "reports" / "dashboard" / "index.html"


def _loader(home: RolloutHome) -> jinja2.BaseLoader:
    # a home may override the page with its own templates/dashboard/; the checkout's is the default
    dirs = list(dict.fromkeys([home.root / "templates", PROJECT_ROOT / "templates"]))
    return jinja2.FileSystemLoader([str(d) for d in dirs])


def _default(v):
    if isinstance(v, datetime):
        return v.strftime(ISO)
    if isinstance(v, date):
        return v.isoformat()
    if isinstance(v, Decimal):
        return float(v)
    return str(v)


def _clean(v):
    """NaN and infinities are not JSON: they become null, like DuckDB's NULL."""
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def json_for_script(data: dict) -> str:
    """JSON safe inside <script>: `<`, `>` and `&` are escaped, so `</script>` cannot appear."""
    text = json.dumps(_clean(data), default=_default, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_html(home: RolloutHome, data: dict) -> str:
    env = jinja2.Environment(loader=_loader(home), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    script, style = (env.loader.get_source(env, name)[0] for name in ASSETS)
    return env.get_template(TEMPLATE).render(
        d=data, data_json=Markup(json_for_script(data)),
        script=Markup(script.replace("</script", "<\\/script")),
        style=Markup(style.replace("</style", "<\\/style")),
    )


def render_dashboard(con, home: RolloutHome, policy: Policy,
                     days: float = 7.0) -> tuple[Path, dict]:
    """Query, render and atomically write `reports/dashboard/index.html`; return it and the data."""
    data = dashboard_data(con, home, policy, days=days)
    path = home.inside(dashboard_path(home))
    atomic_write(path, render_html(home, data))
    return path, data
