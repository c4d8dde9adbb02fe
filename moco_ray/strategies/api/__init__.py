"""API-level strategies: choose which model answers (cascades, routers)."""
