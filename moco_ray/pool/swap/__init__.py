"""Hot-swap of a live pool model's weights (hotswap.py): validated first, every replica at once,
rolled back on failure."""
