"""Simulated prepaid meters: the sans-IO firmware model and the adapters that serve it."""
