"""Optional integrations (each needs its extra installed)."""
