"""What ``scripts/fuzz`` is made of: image and tar mutants, the modes that run them in
worker processes, and the summary."""
