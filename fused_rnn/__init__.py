"""fused_rnn: torch.nn.LSTM with zoneout, recurrent, weight, update and cell dropout fused into the recurrence."""

from .functional import lstm
from .module import LSTM
from .regularizers import Regularizers

__version__ = "0.1.0"
__all__ = ["LSTM", "Regularizers", "lstm"]
