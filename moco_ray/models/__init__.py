"""Models as files: paths (local dir, hub name, `zoo:<name>`), the zoo that builds models
locally, checkpoints (format and checks), and the tokenizer helpers every engine shares."""
from moco_ray.models.paths import check_path, local_model_dir, resolve_path

__all__ = ["check_path", "local_model_dir", "resolve_path"]
