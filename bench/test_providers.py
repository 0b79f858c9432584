"""The providers compute what the tables say they compute (CPU, float64, a second or two)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fused_rnn import Regularizers
from fused_rnn.reference import lstm_layer_naive
from fused_rnn.stack import LayerWeights

from .providers import ALL_APPLIED, AWDLSTM, PROVIDERS, CellLoopLSTM, Shape, build_step, cell_step, make_input

TINY = Shape("tiny", seq_len=5, batch=3, input_size=4, hidden_size=6, num_layers=2, devices=("cpu",))
NO_REGULARIZER = dict.fromkeys(ALL_APPLIED, 0.0)


def test_cell_loop_without_regularizers_is_nn_lstm():
    torch.manual_seed(0)
    model = CellLoopLSTM(TINY, NO_REGULARIZER, compiled=False, dtype=torch.float64)
    x = torch.randn(TINY.seq_len, TINY.batch, TINY.input_size, dtype=torch.float64)
    torch.testing.assert_close(model(x), model.weights(x)[0])


def test_cell_step_is_spec_section_2():
    """The loop's step, given the reference's masks, computes what fused_rnn's reference computes."""
    torch.manual_seed(0)
    T, B, n_in, H = 6, 3, 4, 5
    reg = Regularizers(
        recurrent_dropout=0.3, weight_dropout=0.4, update_dropout=0.2, cell_dropout=0.25, zoneout_h=0.3, zoneout_c=0.35
    )
    f64 = dict(dtype=torch.float64)
    w = LayerWeights(
        torch.randn(4 * H, n_in, **f64),
        torch.randn(4 * H, H, **f64),
        torch.randn(4 * H, **f64),
        torch.randn(4 * H, **f64),
        None,
    )
    masks = {
        "hidden": torch.rand(B, H) > reg.recurrent_dropout,
        "weight": torch.rand(4 * H, H) > reg.weight_dropout,
        "update": torch.rand(T, B, H) > reg.update_dropout,
        "cell": torch.rand(B, H) > reg.cell_dropout,
        "zoneout_h": torch.rand(T, B, H) < reg.zoneout_h,
        "zoneout_c": torch.rand(T, B, H) < reg.zoneout_c,
    }
    x, h0, c0 = torch.randn(T, B, n_in, **f64), torch.randn(B, H, **f64), torch.randn(B, H, **f64)
    expected, h_n, c_n = lstm_layer_naive(x, h0, c0, w, reverse=False, reg=reg, masks=masks, training=True)

    def scaled(keep, p):
        return keep.double() / (1 - p)

    x_proj = x @ w.w_ih.T + w.b_ih + w.b_hh
    w_hh = w.w_hh * scaled(masks["weight"], reg.weight_dropout)
    h, c, outputs = h0, c0, []
    for t in range(T):
        h, c = cell_step(
            x_proj[t], h, c, w_hh,
            scaled(masks["hidden"], reg.recurrent_dropout),
            scaled(masks["update"][t], reg.update_dropout),
            scaled(masks["cell"], reg.cell_dropout),
            masks["zoneout_h"][t], masks["zoneout_c"][t],
        )  # fmt: skip
        outputs.append(h)
    torch.testing.assert_close(torch.stack(outputs), expected)
    torch.testing.assert_close((h, c), (h_n, c_n))


def test_awd_weight_drop_reaches_cudnn_weights_and_gradients():
    torch.manual_seed(0)
    model = AWDLSTM(TINY, 0.0, 0.0, 0.0, 0.5, dtype=torch.float64)
    x = torch.randn(TINY.seq_len, TINY.batch, TINY.input_size, dtype=torch.float64)
    plain = x
    for lstm in model.layers:
        plain = lstm(plain)[0]
    dropped = model(x)
    assert not torch.allclose(dropped, plain)
    dropped.sum().backward()
    grad = model.layers[0].weight_hh_l0.grad
    assert grad is not None and 0.2 < (grad == 0).double().mean() < 0.8  # DropConnect zeroes about half

    model.p_weight = 0.0
    torch.testing.assert_close(model(x), plain)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("provider", [p for p in PROVIDERS if "cpu" in p.devices], ids=lambda p: p.name)
def test_every_cpu_provider_runs_a_step(provider, mode):
    shape = dataclasses.replace(TINY, input_size=8, hidden_size=8)
    built = provider.build(shape, torch.float32, torch.device("cpu"))
    x = make_input(shape, torch.float32, torch.device("cpu"))
    assert built.forward(x).shape == (shape.seq_len, shape.batch, shape.hidden_size)
    step = build_step(built, shape, x, mode)
    step()
    assert all(p.grad is None for p in built.module.parameters())
