"""models of lit_divnorm."""

from lit_divnorm.models.srcnn import SRCNN as SRCNN
