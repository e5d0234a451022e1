"""Site: serving store -> the static dashboard site (Jinja2 templates in ``reports/site/``)."""
