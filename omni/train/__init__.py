"""Training: the jitted steps (step.py), the loop (loop.py), checkpoints, metrics, preemption, multi-process start-up
and performance figures (perf.py). The trainer imports no tool and no demo (tests/test_layering.py)."""
