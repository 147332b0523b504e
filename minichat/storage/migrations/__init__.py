"""SQL migration files (data only)."""
