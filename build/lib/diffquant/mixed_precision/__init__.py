"""Mixed precision.

Per-layer sensitivity (``sensitivity``), the cost model (``costs``), the integer program
(``solver``) and the step from an allocation config to a plan (``allocate``).
"""
