"""Training: the model, its data module, the Lightning training run, evaluation and the robustness suite."""
