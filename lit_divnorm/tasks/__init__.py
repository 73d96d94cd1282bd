"""tasks of lit_divnorm."""

from lit_divnorm.tasks.language_model import LanguageModelTask as LanguageModelTask
