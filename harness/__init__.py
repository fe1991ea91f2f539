"""The regression harness: benchmarks, accuracy gates and the demo (run through noxfile.py sessions)."""
