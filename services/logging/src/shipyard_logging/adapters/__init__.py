"""The logging service's edges: its tables in PostgreSQL."""
