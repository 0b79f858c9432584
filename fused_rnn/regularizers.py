"""The regularizers of SPEC.md section 1: validated once, at construction."""

from __future__ import annotations

import dataclasses
import functools
import numbers

import torch

DROPOUT_MODES = ("step", "locked")
WEIGHT_DROPOUT_MODES = ("element", "row")
UPDATE_DROPOUT_MODES = ("step", "sequence")

_PROBABILITY_MEANING = {
    "dropout": "the probability of an element being zeroed",
    "input_dropout": "the probability of an input element being zeroed",
    "output_dropout": "the probability of an output element being zeroed",
    "recurrent_dropout": "the probability of an element of h_{t-1} being zeroed",
    "weight_dropout": "the probability of an element (or row) of W_hh being zeroed",
    "update_dropout": "the probability of an element of the cell update g being zeroed",
    "cell_dropout": "the probability of an element of the new cell state being zeroed",
    "zoneout_h": "the probability of a unit of h keeping its previous value",
    "zoneout_c": "the probability of a unit of c keeping its previous value",
}


# Every probability argument of fused_rnn.LSTM, nn.LSTM's `dropout` first.
PROBABILITIES = tuple(_PROBABILITY_MEANING)
# Those of the recurrence itself, in the order the fused ops take them.
RECURRENCE_PROBABILITIES = ("recurrent_dropout", "weight_dropout", "update_dropout", "cell_dropout", "zoneout_h", "zoneout_c")


class ArgumentTypeError(ValueError, TypeError):
    """An argument of the wrong type (a seed that is no int, a mode that is no string): the ValueError SPEC.md
    asks of a bad argument, and the TypeError Python raises for a wrong type."""


class ProbabilityTypeError(ArgumentTypeError):
    """A probability that is not a number at all (None, a string, a list, a complex)."""


def check_probability(name: str, value) -> float:
    if type(value) is float and 0 <= value <= 1:  # the common case, without numbers.Real's slow isinstance
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        message = f"{name} should be a number in range [0, 1] representing {_PROBABILITY_MEANING[name]}"
        # nn.LSTM's exact words for its own argument; ours also say what was given
        message = message if name == "dropout" else f"{message}, got {value!r}"
        # no number at all (None, a string, a tensor): also the TypeError nn.LSTM raises for it, at
        # construction (float(None)) or at a forward (a string set later)
        raise (ValueError if isinstance(value, numbers.Real) else ProbabilityTypeError)(message)
    return float(value)


def check_mode(name: str, value, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        error = ValueError if isinstance(value, str) else ArgumentTypeError
        raise error(f"{name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Regularizers:
    """Probabilities and modes of every regularizer; `dropout` is nn.LSTM's between-layer dropout."""

    dropout: float = 0.0
    dropout_mode: str = "step"
    input_dropout: float = 0.0
    output_dropout: float = 0.0
    recurrent_dropout: float = 0.0
    weight_dropout: float = 0.0
    weight_dropout_mode: str = "element"
    update_dropout: float = 0.0
    update_dropout_mode: str = "step"
    cell_dropout: float = 0.0
    zoneout_h: float = 0.0
    zoneout_c: float = 0.0

    def __post_init__(self):
        for name in PROBABILITIES:
            object.__setattr__(self, name, check_probability(name, getattr(self, name)))
        check_mode("dropout_mode", self.dropout_mode, DROPOUT_MODES)
        check_mode("weight_dropout_mode", self.weight_dropout_mode, WEIGHT_DROPOUT_MODES)
        check_mode("update_dropout_mode", self.update_dropout_mode, UPDATE_DROPOUT_MODES)

    def draws_masks(self, num_layers: int) -> bool:
        """Whether a training forward of `num_layers` layers draws any mask (and so needs a seed).

        `dropout` acts between layers, so with one layer it draws nothing, as in nn.LSTM.
        """
        return any(getattr(self, name) > 0 for name in PROBABILITIES if name != "dropout" or num_layers > 1)

    @property
    def locked(self) -> bool:
        return self.dropout_mode == "locked"

    @property
    def weight_rows(self) -> bool:
        return self.weight_dropout_mode == "row"

    @property
    def update_per_step(self) -> bool:
        return self.update_dropout_mode == "step"

    def recurrence_arguments(self) -> tuple[list[float], list[int]]:
        """The recurrence's regularizers as the fused ops take them: probabilities [recurrent, weight,
        update, cell, zoneout_h, zoneout_c] and modes [weight rows, update per step]."""
        probabilities = [getattr(self, name) for name in RECURRENCE_PROBABILITIES]
        return probabilities, [int(self.weight_rows), int(self.update_per_step)]

    @classmethod
    def of_recurrence_arguments(cls, probabilities, modes) -> "Regularizers":
        """The inverse of recurrence_arguments (the feature dropouts at 0). Each of a training step's layer
        ops, forward and backward, asks for it (of_fields)."""
        weight_rows, update_per_step = modes
        return of_fields(
            **dict(zip(RECURRENCE_PROBABILITIES, probabilities)),
            weight_dropout_mode="row" if weight_rows else "element",
            update_dropout_mode="step" if update_per_step else "sequence",
        )

    def layer_input_dropout(self, layer: int) -> float:
        """The probability of masks["input"][layer]: input_dropout for layer 0, dropout after."""
        return self.input_dropout if layer == 0 else self.dropout


# (name, default) of every field, in their order
_FIELD_DEFAULTS = tuple((field.name, field.default) for field in dataclasses.fields(Regularizers))


def of_fields(**fields) -> Regularizers:
    """Regularizers(**fields), validated once per distinct values and their types: every forward of a module
    and each of a training step's layer ops ask for one (True == 1.0, but only the float is a probability)."""
    values = tuple(fields.pop(name, default) for name, default in _FIELD_DEFAULTS)
    if fields:
        raise TypeError(f"Regularizers has no field {', '.join(sorted(fields))}")
    if torch.compiler.is_compiling():  # traced once per graph; torch 2.11's dynamo cannot trace hash(tuple)
        return Regularizers(*values)
    try:
        hash(values)
    except TypeError:  # not numbers or strings: the checks say so
        return Regularizers(*values)
    return _of_fields(values, tuple(map(type, values)))


@functools.lru_cache(maxsize=64)
def _of_fields(values: tuple, _types: tuple) -> Regularizers:
    return Regularizers(*values)
