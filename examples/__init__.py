"""The example tasks and scaling flags, imported as ``examples.tasks`` and ``examples.scaling``
with the repository root on ``sys.path`` (scripts under examples/ and benchmarks/ put it there)."""
