"""A layer's routing in a loaded model (``layer_routing``: ranked ids, unpruned weights,
masked routing for any RoutingSpec) and the one forward of a block with experts masked
(``masked_forward``).
"""
