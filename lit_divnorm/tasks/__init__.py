"""tasks of lit_divnorm."""

from lit_divnorm.tasks.super_resolution import SuperResolutionTask as SuperResolutionTask
