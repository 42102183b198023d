"""`omni launch`: the local multi-process runner and the slurm / gke / tpu renderers (runners.py)."""
