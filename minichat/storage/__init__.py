"""Postgres: the SQL, the migrations and the transactions that run them (asyncpg)."""
