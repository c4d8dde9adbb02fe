"""Workflows over the layers below: the runtime (Ray init, job env), config loading and checks,
the job store, `moco-ray run` (sweep), the evolution loop (evolve/) and the report."""
