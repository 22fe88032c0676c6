"""Training: recipes (``recipe.py``), the loop (``loop.py``), checkpoints (``checkpoint.py``), the CLI (``cli.py``)."""
