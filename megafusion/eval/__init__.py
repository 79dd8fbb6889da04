"""Quality metrics for megafusion models (tools/evaluate.py calls these)."""
