"""tasks of lit_divnorm."""

from lit_divnorm.tasks.classification import ClassificationTask as ClassificationTask
from lit_divnorm.tasks.language_model import LanguageModelTask as LanguageModelTask
from lit_divnorm.tasks.super_resolution import SuperResolutionTask as SuperResolutionTask
