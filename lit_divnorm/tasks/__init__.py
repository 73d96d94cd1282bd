"""tasks of lit_divnorm."""
