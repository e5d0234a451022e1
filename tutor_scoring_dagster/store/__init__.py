"""The serving store (Postgres, or SQLite by default): tables, migrations, publishing, reads."""
