"""The parts that fetch, apply a domain rule and store the outcome."""
