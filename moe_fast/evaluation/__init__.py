"""Measuring a model: perplexity, speed, memory and skip rate (``measures``), a model
against its original (``comparison``) and accuracy on the built-in tasks (``tasks``).
"""
