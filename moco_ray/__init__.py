"""moco_ray: model collaboration on Ray."""
