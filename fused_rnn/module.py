"""`fused_rnn.LSTM`: torch.nn.LSTM with the regularizers language models use, fused into the recurrence."""

from __future__ import annotations

import dataclasses
import numbers

import torch
from torch import nn

from . import functional
from .backends import check_backend_name
from .masks import check_count, sample_masks
from .regularizers import Regularizers, check_probability, of_fields

_REGULARIZER_FIELDS = tuple(f.name for f in dataclasses.fields(Regularizers) if f.name != "dropout")


class LSTM(nn.RNNBase):
    """A drop-in for torch.nn.LSTM: same arguments, parameters, initialisation, state_dict and results.

    The keyword-only arguments add the regularizers of SPEC.md section 1; with all of them 0 (or in
    eval mode) the module computes what nn.LSTM computes. It derives from nn.RNNBase, as nn.LSTM
    does, but not from nn.LSTM itself: torch.compile refuses to trace an nn.LSTM instance.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        dropout_mode: str = "step",
        input_dropout: float = 0.0,
        output_dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        weight_dropout: float = 0.0,
        weight_dropout_mode: str = "element",
        update_dropout: float = 0.0,
        update_dropout_mode: str = "step",
        cell_dropout: float = 0.0,
        zoneout_h: float = 0.0,
        zoneout_c: float = 0.0,
        backend: str = "auto",
    ) -> None:
        # validated before nn.RNNBase creates (and randomly initialises) any parameter
        regularizers = Regularizers(
            dropout=dropout,
            dropout_mode=dropout_mode,
            input_dropout=input_dropout,
            output_dropout=output_dropout,
            recurrent_dropout=recurrent_dropout,
            weight_dropout=weight_dropout,
            weight_dropout_mode=weight_dropout_mode,
            update_dropout=update_dropout,
            update_dropout_mode=update_dropout_mode,
            cell_dropout=cell_dropout,
            zoneout_h=zoneout_h,
            zoneout_c=zoneout_c,
        )
        backend = check_backend_name(backend)
        super().__init__(
            "LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size, device, dtype
        )
        for name in _REGULARIZER_FIELDS:
            setattr(self, name, getattr(regularizers, name))
        self.backend = backend

    # nn.LSTM's versions for a (h, c) state; RNNBase's, which this class would inherit, take one tensor
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    @property
    def regularizers(self) -> Regularizers:
        """The current probabilities and modes (attributes may be changed between calls, as nn.LSTM's dropout)."""
        return self._regularizers(self.dropout)

    def _regularizers(self, dropout) -> Regularizers:
        return of_fields(dropout=dropout, **{name: getattr(self, name) for name in _REGULARIZER_FIELDS})

    def _forward_regularizers(self) -> tuple[Regularizers, Exception | None]:
        """The regularizers of a forward, and the error of a `dropout` set after construction, which nn.LSTM's
        kernel raises once its checks of the input have passed (functional.lstm raises it there too): a value
        that is no probability, or, where it applies (training, 2+ layers), one out of range, with nn.LSTM's
        RuntimeError; elsewhere an out-of-range value is unused."""
        dropout, error = self.dropout, None
        try:
            dropout = check_probability("dropout", dropout)
        except ValueError as refused:
            # a number out of range (NaN included) is nn.LSTM's RuntimeError where it applies, unused elsewhere
            if not isinstance(dropout, numbers.Real) or isinstance(dropout, bool):
                error = refused
            elif self.training and self.num_layers > 1:
                error = RuntimeError(f"dropout probability has to be between 0 and 1, but got {float(dropout):g}")
            dropout = 0.0
        return self._regularizers(dropout), error

    def _current_flat_weights(self) -> list:
        """nn.LSTM.forward's weights: RNNBase's flat list, refreshed where a weight was replaced behind its
        __setattr__ (in _parameters, say), kept where only the list was changed. RNNBase's check reads each
        weight through nn.Module.__getattr__ (12 us for 3 layers on CI's CPU); its parameters, where they
        are the list's, are checked here in 0.5."""
        flat, parameters = self._flat_weights, self._parameters
        for name, weight in zip(self._flat_weights_names, flat):
            if parameters.get(name) is not weight:
                self._update_flat_weights()
                return self._flat_weights
        return flat

    def forward(self, input, hx=None, *, seed: int | None = None):
        regularizers, dropout_error = self._forward_regularizers()
        if torch.compiler.is_compiling():
            weights = [getattr(self, name) for name in self._flat_weights_names]
        else:
            weights = self._current_flat_weights()
        return functional.lstm(
            input,
            hx,
            weights,
            has_biases=self.bias,
            num_layers=self.num_layers,
            bidirectional=self.bidirectional,
            batch_first=self.batch_first,
            training=self.training,
            regularizers=regularizers,
            seed=seed,
            backend=self.backend,
            input_size=self.input_size,
            hidden_size=self.hidden_size,
            # nn.LSTM accepts proj_size=False, as no projection
            proj_size=0 if self.proj_size is False else self.proj_size,
            _settings_error=dropout_error,
        )

    def sample_masks(self, seq_len: int, batch_size: int, seed: int, device=None) -> dict:
        """The masks a training forward with this seed uses (SPEC.md section 4), on `device` (default: the weights').

        seq_len is at least 1 and batch_size at least 0, the inputs a forward accepts: like nn.LSTM, it rejects
        an empty sequence and runs an empty batch.

        Laid out as SPEC 4 indexes them: masks["output"] is one mask, or None where output_dropout is off;
        every other entry is a list (masks["input"] one per layer l, the rest one per k = layer * directions +
        direction) whose elements are None where that regularizer is off, so masks["hidden"][k] is None
        without recurrent dropout, and masks["input"][l] is None for a layer whose input is not dropped.
        """
        seq_len = check_count("seq_len", seq_len, 1)
        batch_size = check_count("batch_size", batch_size, 0)
        return sample_masks(
            self.regularizers,
            num_layers=self.num_layers,
            num_directions=2 if self.bidirectional else 1,
            input_size=self.input_size,
            hidden_size=self.hidden_size,
            proj_size=self.proj_size,
            seq_len=seq_len,
            batch_size=batch_size,
            seed=functional.check_seed(seed),
            device=self.weight_ih_l0.device if device is None else device,
        )

    def extra_repr(self) -> str:
        s = super().extra_repr()
        # not through Regularizers: nn.LSTM's repr shows an out-of-range dropout set after construction
        for name in _REGULARIZER_FIELDS:
            value = getattr(self, name)
            if value != getattr(Regularizers, name):
                s += f", {name}={value!r}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s

    def __setstate__(self, state):
        super().__setstate__(state)
        for name in _REGULARIZER_FIELDS:
            self.__dict__.setdefault(name, getattr(Regularizers, name))
        self.__dict__.setdefault("backend", "auto")
