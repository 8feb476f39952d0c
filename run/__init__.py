"""Everything about one run beside the method itself: its configuration, its processes, its
folder, and the files it leaves there (checkpoints, results)."""
