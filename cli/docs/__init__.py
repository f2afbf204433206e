"""Renderers of the generated documents under docs/, from the code's own tables."""
