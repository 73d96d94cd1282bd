"""tasks of lit_divnorm."""

from lit_divnorm.tasks.classification import ClassificationTask as ClassificationTask
