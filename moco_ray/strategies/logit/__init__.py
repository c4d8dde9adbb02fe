"""Logit-level strategies: models decode together from combined next-token distributions."""
