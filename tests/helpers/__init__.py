"""Pieces the test files share: tiny models, plain references written from the paper's rules,
and the brute-force enumeration the pruning tests compare against. No tests live here; pytest
finds this package through ``pythonpath`` in pyproject.toml (``from helpers.tiny_models import ...``).
"""
