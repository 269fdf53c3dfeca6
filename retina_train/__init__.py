"""retina_train: batches -> models -> out-of-fold predictions -> stacking -> evaluation (docs/architecture.md)."""
