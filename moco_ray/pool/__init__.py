"""The pool: each model a Ray Serve deployment (handles + OpenAI-compatible HTTP), logit groups
co-locating models for lockstep decoding, and the client strategies use."""
from moco_ray.pool.client import ServeClient
from moco_ray.pool.pool import ModelPool

__all__ = ["ModelPool", "ServeClient"]
