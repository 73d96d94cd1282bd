"""Every implementation of the norms' fused formulas, side by side, one per device.

- :mod:`.box`: box means along an axis and their transpose in PyTorch (cached ``(L, L)``
  products, running sums in float64 beyond ``MATRIX_MAX_LENGTH``);
- :mod:`.eager`: local DN and the channel-window field in eager PyTorch, forward and backward
  (every device; what ``backend="compile"`` compiles);
- :mod:`.cpu` and ``dn_cpu.cpp``: the same in C++ for CPU tensors, plus the fused LSTM's steps.

:mod:`lit_divnorm.norm.ops` chooses among them; :mod:`lit_divnorm.norm.functional` holds the
term-by-term reference they are tested against.
"""
