"""Recipes: one run assembly per algorithm (``run(cfg)``), in the order a run happens; ``common`` holds what
they share."""
