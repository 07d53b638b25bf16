"""Checkpoints on disk: loading a model, its dtype and tokenizer (``loading``), checking
safetensors files (``verify``), what every command checks before the first forward (``preflight``),
writing a folder elsewhere and moving it in whole (``staging``), OpenAI's MXFP4 expert weights
(``mxfp4``) and moe_fast's entry in config.json (``config_record``).
"""
