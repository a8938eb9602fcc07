"""Training pieces shared by the scripts in the repository's `training/` folder: the training step, crash-safe
checkpoints and the demo model's recipe.
"""
