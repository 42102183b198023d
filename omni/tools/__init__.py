"""What users run around training: evaluate, export, generate, ablate, bench, data bench and data show."""
