"""Collaboration strategies, one method per module, registered by name.

`get_strategy(name)` finds a built-in strategy by its registered name (it imports the built-in
modules itself) or any strategy by "package.module:Class".
"""
from moco_ray.strategies.base import Answer, ExampleContext, Strategy, StrategyContext, register
from moco_ray.strategies.registry import get_strategy, list_strategies

__all__ = ["Answer", "ExampleContext", "Strategy", "StrategyContext", "get_strategy",
           "list_strategies", "register"]
