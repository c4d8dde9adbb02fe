"""Text-level strategies: models exchange generated text (votes, debate, refinement)."""
