"""models of lit_divnorm."""
