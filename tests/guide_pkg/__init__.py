"""Code the architecture guide (docs/architecture.md) shows verbatim; its tests run it."""
