"""The head-end system: registry, polls, readings, payments, credit delivery, policies."""
