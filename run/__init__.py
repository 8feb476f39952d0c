"""One run, phase by phase (engine.py): its configuration, processes and folder, the model, training,
evaluation, the other methods on the same ground, and the files it leaves (checkpoints, results)."""
