"""The zoo: models made locally (no downloads), each built once into `<cache>/zoo/<name>`.

`zoo:tiny`, `zoo:tiny-s<N>` (random tiny Llamas sharing one tokenizer), `zoo:smollm2-135m-instruct`
(tiny.py), `zoo:spec-<task>` (tiny Llamas trained on synthetic tasks, specialists.py), and recipes
other layers or packages declare under the `moco_ray.zoo` entry point group (registry.py).
"""
from moco_ray.models.cache import cache_dir
from moco_ray.models.zoo.registry import (
    _RECIPES,
    build,
    lookup,
    recipe_names,
    register,
    register_family,
    zoo_dir,
)
from moco_ray.models.zoo.specialists import SPECIALIST_TASKS, train_specialist
from moco_ray.models.zoo.tiny import (
    TINY_CHAT_TEMPLATE,
    make_tiny_llama,
    make_tokenizer,
    smollm2,
    tiny_corpus,
    tiny_tokenizer_dir,
)

__all__ = ["SPECIALIST_TASKS", "TINY_CHAT_TEMPLATE", "_RECIPES", "build", "cache_dir", "lookup",
           "make_tiny_llama", "make_tokenizer", "recipe_names", "register", "register_family",
           "smollm2", "tiny_corpus", "tiny_tokenizer_dir", "train_specialist", "zoo_dir"]
