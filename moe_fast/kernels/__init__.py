"""The ops: the compiled extension's loader (``extension``), the op wrappers and fake kernels
(``ops``, public as ``moe_fast.ops``), their plain-PyTorch specification (``reference``, public as
``moe_fast.reference``) and the routing descriptor they take (``routing_spec``). Nothing here imports
another folder of moe_fast.
"""
