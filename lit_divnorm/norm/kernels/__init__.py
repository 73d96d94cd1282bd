"""Every implementation of the norms' fused formulas, side by side, one per device.

- :mod:`.box`: box means along an axis and their transpose in PyTorch (cached ``(L, L)``
  products, running sums in float64 beyond ``MATRIX_MAX_LENGTH``);
- :mod:`.eager`: local DN, local mean subtraction (dnms) and the channel-window field in eager
  PyTorch, forward and backward (every device; what ``backend="compile"`` compiles);
- :mod:`.cpu` and ``dn_cpu.cpp``: the same in C++ for CPU tensors (box means of windows up to 7
  by shifted adds, wider ones by running sums), the whole-group fields with their L1 term,
  and the fused LSTM's steps; ``dn_torch.cpp`` makes local DN and the whole-group fields
  torch operators with their autograd in C++;
- :mod:`.triton`: the same in Triton for CUDA tensors (CPU tensors in Triton's interpreter).

The fused LSTM's steps have their eager counterpart in :mod:`lit_divnorm.models.fused_rnn` and
their term-by-term reference in :mod:`lit_divnorm.models.rnn`.

:mod:`lit_divnorm.norm.ops` chooses among them; :mod:`lit_divnorm.norm.functional` holds the
term-by-term reference they are tested against.
"""
