"""Weight-level strategies: merge or train model weights (soups, merges, distillation)."""
