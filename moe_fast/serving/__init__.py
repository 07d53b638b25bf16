"""Running a model with skipping: patching a loaded transformers model (``patching``), the
experts implementation (``experts``), the skip calibration (``skipping``, ``betas``), saving and
loading a patched model (``saving``), calibrating skipping into a checkpoint (``skip_export``)
and the vLLM plugin (``vllm_plugin``).
"""
