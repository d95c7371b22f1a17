"""Resources: one file per outside system (home & policy, DuckDB, notifications, rollback)."""
