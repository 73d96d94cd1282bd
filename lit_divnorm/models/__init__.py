"""models of lit_divnorm."""

from lit_divnorm.models.rnn import LSTMLayer as LSTMLayer
from lit_divnorm.models.rnn import RNNLayer as RNNLayer
from lit_divnorm.models.rnn import StepwiseNorm as StepwiseNorm
from lit_divnorm.models.rnn_lm import RNNLanguageModel as RNNLanguageModel
