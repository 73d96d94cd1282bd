"""models of lit_divnorm."""

from lit_divnorm.models.resnet import PreActResNet as PreActResNet
from lit_divnorm.models.rnn import LSTMLayer as LSTMLayer
from lit_divnorm.models.rnn import RNNLayer as RNNLayer
from lit_divnorm.models.rnn import StepwiseNorm as StepwiseNorm
from lit_divnorm.models.rnn_lm import RNNLanguageModel as RNNLanguageModel
from lit_divnorm.models.same_pool import SamePool2d as SamePool2d
from lit_divnorm.models.same_pool import pool2d_same as pool2d_same
from lit_divnorm.models.small_cnn import SmallCNN as SmallCNN
from lit_divnorm.models.srcnn import SRCNN as SRCNN
