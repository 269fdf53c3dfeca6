"""retina_train: batches -> models -> out-of-fold predictions -> stacking -> evaluation (see DESIGN.md)."""
