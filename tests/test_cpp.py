"""The C++ backend: its draws and masks bit for bit, float64 equality with the reference, gradcheck, opcheck,
torch.compile, and the fallback when it cannot be built."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fused_rnn
from fused_rnn import masks, philox
from fused_rnn.cpp import flags, loader
from fused_rnn.regularizers import Regularizers

from conftest import require_backend
from helpers import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = (0, 12345, 2**32 + 7, 2**63 - 1)
ALL_ON = dict(
    dropout=0.3, input_dropout=0.2, output_dropout=0.25, recurrent_dropout=0.35, weight_dropout=0.4,
    update_dropout=0.3, cell_dropout=0.2, zoneout_h=0.3, zoneout_c=0.4,
)
TIGHT = 1e-10


@pytest.fixture(scope="module")
def ops():
    require_backend("cpp")
    return torch.ops.fused_rnn_cpp


@pytest.fixture
def two_threads():
    """Two threads even on a one-core machine, so the per-thread unit blocks of the kernels are exercised."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def seed_tensor(seed: int) -> torch.Tensor:
    return torch.tensor(seed, dtype=torch.int64)


# ---- the draws, bit for bit ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_philox_words(ops, seed):
    g = torch.Generator().manual_seed(seed % 1000)
    counters = torch.randint(0, 2**32, (257, 4), generator=g, dtype=torch.int64)
    counters[0] = 0
    counters[1] = 2**32 - 1
    words = ops.philox(seed_tensor(seed), counters)
    k0, k1 = philox.seed_key(seed)
    expected = torch.stack(philox.philox4x32(*counters.unbind(1), k0, k1), dim=1)
    assert torch.equal(words, expected)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind, index, step, numel", [(1, 0, 0, 1), (1, 2, 5, 4103), (2, 0, 33, 77), (3, 5, 0, 1026)])
def test_bulk_draws_four_per_call(ops, seed, kind, index, step, numel):
    draws = ops.bulk_draws(seed_tensor(seed), kind, index, step, numel)
    expected = philox.packed_draws(seed, kind, index, step, numel, torch.device("cpu"))[0]
    assert torch.equal(draws, expected)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind, step", [(4, 0), (5, 0), (5, 17)])
def test_unit_draws_one_call_per_unit(ops, seed, kind, step):
    batch, hidden = 3, 150  # hidden crosses the kernels' 64-unit chunks
    draws = ops.unit_draws(seed_tensor(seed), kind, 3, step, batch, hidden)
    expected = philox.unit_draws(seed, kind, 3, step, batch, hidden, torch.device("cpu"))
    for word in range(3):
        assert torch.equal(draws[word], expected[word][0]), f"word {word}"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("p", [0.3, 1.0])
def test_weight_mask(ops, seed, rows, p):
    hidden, real = 5, 3
    factors = ops.weight_factors(seed_tensor(seed), 2, p, rows, hidden, real, torch.float64)
    keep = masks.weight_keep_mask(seed, 2, p, rows, hidden, real, "cpu")
    assert torch.equal(factors, keep.double() * philox.keep_scale(p))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("locked", [False, True])
@pytest.mark.parametrize("kind, index, p", [(1, 0, 0.3), (1, 1, 0.5), (2, 0, 0.25), (1, 0, 1.0)])
def test_feature_dropout_mask(ops, seed, locked, kind, index, p):
    steps, batch, features = 4, 3, 523  # more than one 1024-element block per step
    x = torch.ones(steps, batch, features, dtype=torch.float64)
    x[0, 0, :3] = float("inf")  # a dropped element is exactly 0, whatever it held
    y = ops.feature_dropout(x, seed_tensor(seed), kind, index, p, locked)
    keep = masks.feature_keep_mask(seed, kind, index, p, 1 if locked else steps, batch, features, "cpu")
    assert torch.equal(y, torch.where(keep, x * philox.keep_scale(p), 0.0))


def test_sequence_and_step_masks_through_the_layer(ops):
    """Each per-unit mask alone, read back through one step: the word each mask reads, and its threshold."""
    hidden, batch, seed = 70, 3, 2**40 + 3
    reg = Regularizers(recurrent_dropout=0.5, cell_dropout=0.5, update_dropout=0.5, zoneout_h=0.5, zoneout_c=0.5)
    expected = masks.unit_masks(reg, seed, 1, 1, batch, hidden, hidden, "cpu")
    x = torch.zeros(1, batch, 1, dtype=torch.float64)
    w_ih = torch.zeros(4 * hidden, 1, dtype=torch.float64)
    w_hh = torch.zeros(4 * hidden, hidden, dtype=torch.float64)
    h0 = torch.full((batch, hidden), 0.5, dtype=torch.float64)
    c0 = torch.full((batch, hidden), 2.0, dtype=torch.float64)
    # i = f = o = g = 0.5 (sigmoid 0 = 0.5, g from tanh(large) = 1 through its bias): c~ = 0.5 c0 + 0.5 g
    b = torch.zeros(4 * hidden, dtype=torch.float64)
    b[2 * hidden : 3 * hidden] = 50.0

    def step(w_hh=w_hh, **p):
        args = dict(recurrent_dropout=0.0, weight_dropout=0.0, weight_rows=False, update_dropout=0.0, update_per_step=True,
                    cell_dropout=0.0, zoneout_h=0.0, zoneout_c=0.0)
        args.update(p)
        layer = [1, 0, 1, int(args["weight_rows"]), int(args["update_per_step"])]  # k = 1, forward, training
        probabilities = [args[name] for name in
                         ("recurrent_dropout", "weight_dropout", "update_dropout", "cell_dropout", "zoneout_h", "zoneout_c")]
        return ops.lstm_layer(x, h0, c0, w_ih, w_hh, b, torch.zeros_like(b), None, seed_tensor(seed), None, layer, probabilities)

    assert torch.equal(step(zoneout_c=0.5)[2] == 2.0, expected["zoneout_c"][0])
    assert torch.equal(step(zoneout_h=0.5)[1] == 0.5, expected["zoneout_h"][0])
    assert torch.equal(step(cell_dropout=0.5)[2] != 0, expected["cell"])
    # update dropped: c~ = 0.5 * 2 + 0.5 * 0 = 1
    assert torch.equal(step(update_dropout=0.5)[2] != 1.0, expected["update"][0])
    reg_seq = Regularizers(update_dropout=0.5, update_dropout_mode="sequence")
    expected_seq = masks.unit_masks(reg_seq, seed, 1, 1, batch, hidden, hidden, "cpu")["update"][0]
    assert torch.equal(step(update_dropout=0.5, update_per_step=False)[2] != 1.0, expected_seq)
    # recurrent dropout through W_hh's input-gate rows = identity: i = sigmoid(r), kept r = 0.5 * 2 moves c off 1.5
    eye = torch.zeros(4 * hidden, hidden, dtype=torch.float64)
    eye[:hidden] = torch.eye(hidden, dtype=torch.float64)
    assert torch.equal(step(w_hh=eye, recurrent_dropout=0.5)[2] != 1.5, expected["hidden"])


# ---- float64 equality with the reference ---------------------------------------------------------------------------

def run_lstm(backend, cfg, reg, training, lengths, dtype=torch.float64, seed=2**33 + 5, batch_first=False, sizes=(6, 3, 5, 6)):
    steps, batch, inputs, hidden = sizes
    num_layers, bidirectional, proj = cfg
    torch.manual_seed(11)
    lstm = fused_rnn.LSTM(inputs, hidden, num_layers, bidirectional=bidirectional, proj_size=proj, batch_first=batch_first,
                          dtype=torch.float64, backend=backend, **reg).to(dtype)
    lstm.train(training)
    dirs, real = 2 if bidirectional else 1, proj or hidden
    x = torch.randn(steps, batch, inputs, dtype=torch.float64).to(dtype).requires_grad_()
    h0 = torch.randn(num_layers * dirs, batch, real, dtype=torch.float64).to(dtype).requires_grad_()
    c0 = torch.randn(num_layers * dirs, batch, hidden, dtype=torch.float64).to(dtype).requires_grad_()
    inp = x.transpose(0, 1) if batch_first else x
    if lengths is not None:
        inp = pack_padded_sequence(inp, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False)
    out, (h_n, c_n) = lstm(inp, (h0, c0), seed=seed)
    if lengths is not None:
        out = pad_packed_sequence(out, batch_first=batch_first, total_length=steps)[0]
    if batch_first:
        out = out.transpose(0, 1)
    g = torch.Generator().manual_seed(3)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype)).sum() for t in (out, h_n, c_n))
    loss.backward()
    results = {"out": out, "h_n": h_n, "c_n": c_n, "grad x": x.grad, "grad h0": h0.grad, "grad c0": c0.grad}
    results.update({f"grad {name}": p.grad for name, p in lstm.named_parameters()})
    return results


def assert_equal64(ref, out):
    for name, expected in ref.items():
        assert expected is not None and out[name] is not None, name
        diff = (expected - out[name]).abs().max().item() if expected.numel() else 0.0
        assert diff <= TIGHT, f"{name}: max abs diff {diff:.3g}"


MODES = list(itertools.product(("element", "row"), ("step", "sequence"), ("step", "locked")))
ONE_LAYER_DROPOUT = "ignore:dropout option adds dropout after all but last recurrent layer"


@pytest.mark.filterwarnings(ONE_LAYER_DROPOUT)
@pytest.mark.parametrize("weight_mode, update_mode, dropout_mode", MODES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("lengths", [None, (6, 2, 4)])
@pytest.mark.parametrize("cfg", list(itertools.product((1, 2), (False, True), (0, 4))))
def test_float64_equals_reference(ops, cfg, lengths, training, weight_mode, update_mode, dropout_mode):
    reg = dict(ALL_ON, weight_dropout_mode=weight_mode, update_dropout_mode=update_mode, dropout_mode=dropout_mode)
    ref = run_lstm("reference", cfg, reg, training, lengths)
    assert_equal64(ref, run_lstm("cpp", cfg, reg, training, lengths))


@pytest.mark.filterwarnings(ONE_LAYER_DROPOUT)
@pytest.mark.parametrize("cfg", [(2, True, 0), (2, True, 37), (1, False, 37)])
@pytest.mark.parametrize("lengths", [None, (9, 3, 7, 1, 9)])
def test_float64_equals_reference_in_thread_blocks(ops, two_threads, cfg, lengths):
    """H = 70: two unit blocks (one per thread), 64-unit chunks with a ragged tail; R = 37 gets blocks of its own."""
    sizes = (9, 5, 11, 70)
    ref = run_lstm("reference", cfg, ALL_ON, True, lengths, sizes=sizes)
    assert_equal64(ref, run_lstm("cpp", cfg, ALL_ON, True, lengths, sizes=sizes))


@pytest.mark.parametrize("name", sorted(ALL_ON))
@pytest.mark.parametrize("p", [0.5, 1.0])
def test_each_regularizer_alone(ops, name, p):
    reg = {name: p}
    ref = run_lstm("reference", (2, True, 0), reg, True, None)
    out = run_lstm("cpp", (2, True, 0), reg, True, None)
    assert_equal64(ref, out)
    assert all(not t.isnan().any() for t in out.values())


def fuzz_cases(count: int, seed: int = 0):
    rng = random.Random(seed)
    names = sorted(ALL_ON)
    for _ in range(count):
        hidden = rng.choice([1, 2, 7, 33, 37, 70, 129])  # one or two unit blocks, ragged 64-unit chunks
        proj = rng.choice([0, max(1, hidden // 3)]) if hidden > 1 else 0
        layers = rng.choice([1, 2])
        reg = {name: rng.choice([0.0, 0.3, 0.7, 1.0]) for name in names}
        if layers == 1:
            reg["dropout"] = 0.0
        reg.update(weight_dropout_mode=rng.choice(["element", "row"]), update_dropout_mode=rng.choice(["step", "sequence"]),
                   dropout_mode=rng.choice(["step", "locked"]))
        steps, batch = rng.choice([1, 2, 5]), rng.choice([1, 3, 17])
        lengths = None
        if rng.random() < 0.4:
            lengths = tuple([steps] + [rng.randint(1, steps) for _ in range(batch - 1)])
        yield (layers, rng.random() < 0.5, proj), reg, rng.random() < 0.8, lengths, (steps, batch, rng.choice([1, 3, 20]), hidden)


@pytest.mark.parametrize("cfg, reg, training, lengths, sizes", list(fuzz_cases(24)))
def test_float64_equals_reference_fuzzed(ops, two_threads, cfg, reg, training, lengths, sizes):
    ref = run_lstm("reference", cfg, reg, training, lengths, sizes=sizes)
    out = run_lstm("cpp", cfg, reg, training, lengths, sizes=sizes)
    assert_equal64(ref, out)
    assert all(not t.isnan().any() for t in out.values())


def test_batch_first_input_is_not_contiguous(ops):
    ref = run_lstm("reference", (2, False, 0), ALL_ON, True, None, batch_first=True)
    assert_equal64(ref, run_lstm("cpp", (2, False, 0), ALL_ON, True, None, batch_first=True))


@pytest.mark.filterwarnings(ONE_LAYER_DROPOUT)
@pytest.mark.parametrize("gemm", ["vector", "aten"])
@pytest.mark.parametrize("cfg", [(2, True, 0), (1, False, 37)])
def test_float32_close_to_reference(ops, two_threads, monkeypatch, gemm, cfg):
    """float32 against the float64 reference: no worse than the float32 reference itself, within a small factor."""
    if gemm == "aten":
        monkeypatch.setenv("FUSED_RNN_CPP_GEMM", "aten")
    elif not ops.vector_gemm():
        pytest.skip("built without vector instructions: the products are ATen's")
    sizes = (9, 5, 11, 70)
    ref = run_lstm("reference", cfg, ALL_ON, True, (9, 3, 7, 1, 9), sizes=sizes)
    ref32 = run_lstm("reference", cfg, ALL_ON, True, (9, 3, 7, 1, 9), dtype=torch.float32, sizes=sizes)
    out = run_lstm("cpp", cfg, ALL_ON, True, (9, 3, 7, 1, 9), dtype=torch.float32, sizes=sizes)
    for name in ref:
        assert out[name].dtype == torch.float32
        assert_close(name, ref[name], out[name], ratio=max(1e-5, 4 * _ratio(ref[name], ref32[name])))


def _ratio(ref, out):
    from helpers import error_ratio

    return error_ratio(ref, out)


# ---- autograd, operator registrations, compile ---------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("proj, lengths", [(0, None), (2, [3, 1])])
def test_gradcheck(ops, training, proj, lengths):
    torch.manual_seed(0)
    steps, batch, inputs, hidden = 3, 2, 3, 3
    real = proj or hidden
    reg = Regularizers(**ALL_ON)
    shapes = []
    for layer in range(2):
        for _ in range(2):
            in_l = inputs if layer == 0 else 2 * real
            shapes += [(4 * hidden, in_l), (4 * hidden, real), (4 * hidden,), (4 * hidden,)] + ([(real, hidden)] if proj else [])
    weights = [(0.5 * torch.randn(s, dtype=torch.float64)).requires_grad_() for s in shapes]
    x = torch.randn(steps, batch, inputs, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, batch, real, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, batch, hidden, dtype=torch.float64, requires_grad=True)

    def f(x, h0, c0, *weights):
        inp = x if lengths is None else pack_padded_sequence(x, torch.tensor(lengths))
        out, (h_n, c_n) = fused_rnn.lstm(inp, (h0, c0), weights, num_layers=2, bidirectional=True, training=training,
                                         regularizers=reg, seed=2**35 + 1, backend="cpp")
        if lengths is not None:
            out = pad_packed_sequence(out)[0]
        return out, h_n, c_n

    assert torch.autograd.gradcheck(f, (x, h0, c0, *weights), fast_mode=True)


def layer_args(dtype=torch.float64, requires_grad=True, proj=0, lengths=None):
    torch.manual_seed(0)
    steps, batch, inputs, hidden = 4, 3, 5, 6
    real = proj or hidden

    def t(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=requires_grad)

    return (
        t(steps, batch, inputs), t(batch, real), t(batch, hidden), t(4 * hidden, inputs), t(4 * hidden, real), t(4 * hidden),
        t(4 * hidden), t(real, hidden) if proj else None, seed_tensor(2**40 + 9),
        None if lengths is None else torch.tensor(lengths), [3, 1, 1, 0, 1], [0.3, 0.4, 0.3, 0.2, 0.3, 0.4],
    )


@pytest.mark.parametrize("proj, lengths", [(0, None), (4, (4, 1, 3))])
def test_opcheck_lstm_layer(ops, proj, lengths):
    torch.library.opcheck(ops.lstm_layer, layer_args(proj=proj, lengths=lengths))


def test_opcheck_feature_dropout(ops):
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    for locked in (False, True):
        torch.library.opcheck(ops.feature_dropout, (x, seed_tensor(2**33), 1, 1, 0.4, locked))


def test_opcheck_lstm_layer_backward(ops):
    args = layer_args(requires_grad=False)
    out = ops.lstm_layer(*args)
    grads = (torch.randn_like(out[0]), torch.randn_like(out[1]), torch.randn_like(out[2]))
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, seed, lengths, *rest = args
    torch.library.opcheck(ops.lstm_layer_backward, (*grads, x, w_ih, w_hh, w_hr, seed, lengths, *out[3:], *rest, True))


def test_backward_in_eval_mode(ops):
    ref = run_lstm("reference", (1, False, 0), dict(zoneout_h=0.3, zoneout_c=0.5), False, None)
    assert_equal64(ref, run_lstm("cpp", (1, False, 0), dict(zoneout_h=0.3, zoneout_c=0.5), False, None))


def test_torch_compile_fullgraph(ops):
    torch._dynamo.reset()
    torch.manual_seed(0)
    lstm = fused_rnn.LSTM(5, 6, 2, bidirectional=True, backend="cpp", dtype=torch.float64, **ALL_ON)
    weights = list(lstm._flat_weights)
    reg = lstm.regularizers
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)

    def f(x, *weights):
        out, (h_n, c_n) = fused_rnn.lstm(x, None, weights, num_layers=2, bidirectional=True, training=True, regularizers=reg,
                                         seed=123, backend="cpp")
        return out.sum() + h_n.sum() + c_n.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager = f(x, *weights)
    (eager_grad,) = torch.autograd.grad(eager, x)
    result = compiled(x, *weights)
    (result_grad,) = torch.autograd.grad(result, x)
    torch.testing.assert_close(result, eager, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result_grad, eager_grad, rtol=1e-12, atol=1e-12)


def test_torch_compile_with_inductor_draws_the_eager_seed(ops):
    """seed=None: inductor would put its own generator in torch.randint's place; the draw goes through an op it
    keeps as it is (functional._compiled_draw_seed), so a compiled call after torch.manual_seed uses the
    eager call's masks and leaves the generator where the eager call does."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    lstm = fused_rnn.LSTM(3, 4, backend="cpp", zoneout_h=0.3, recurrent_dropout=0.2, weight_dropout=0.3)
    x = torch.randn(3, 2, 3)
    compiled = torch.compile(lstm, fullgraph=True, backend="inductor")
    torch.manual_seed(1)
    first, second = compiled(x)[0], compiled(x)[0]
    state = torch.get_rng_state()
    torch.manual_seed(1)
    eager, eager_second = lstm(x)[0], lstm(x)[0]
    torch.testing.assert_close(first, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(second, eager_second, rtol=1e-6, atol=1e-6)
    assert not torch.equal(first, second), "each call draws a new seed"
    assert torch.equal(state, torch.get_rng_state())


COMPILE_FIRST_SCRIPT = textwrap.dedent(
    """
    import torch, fused_rnn
    lstm = fused_rnn.LSTM(5, 6, 2, bidirectional=True, backend="cpp", dtype=torch.float64, zoneout_h=0.2, weight_dropout=0.3)
    weights, reg = list(lstm._flat_weights), lstm.regularizers
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)

    def f(x, *w):
        out, (h, c) = fused_rnn.lstm(x, None, w, num_layers=2, bidirectional=True, training=True, regularizers=reg,
                                     seed=5, backend="cpp")
        return out.sum() + h.sum() + c.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x, *weights)  # the backend's first use
    eager = f(x, *weights)
    assert torch.equal(compiled, eager), (compiled, eager)
    assert torch.equal(torch.autograd.grad(compiled, x)[0], torch.autograd.grad(eager, x)[0])
    print("ok")
    """
)


def test_torch_compile_as_the_first_use(ops, tmp_path):
    """Loading the extension inside a compiled region (fresh process, the build already cached)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", COMPILE_FIRST_SCRIPT], env=env, cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


# ---- building and falling back -------------------------------------------------------------------------------------

def test_sources_are_found():
    found = loader.source_dir()
    assert found is not None and (found / "philox.h").is_file() and (found / "cell.h").is_file()


def test_cache_is_keyed_by_torch_and_python(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSED_RNN_CACHE", str(tmp_path))
    path = loader.cache_dir()
    assert path.parent == tmp_path
    assert torch.__version__.split("+")[0] in path.name and f"py{sys.version_info[0]}{sys.version_info[1]}" in path.name
    assert flags.cpu_capability() in path.name


def test_stale_build_lock_is_cleared(tmp_path):
    (tmp_path / "lock").write_text("")  # what torch leaves behind when a build is killed
    with loader._build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()


def test_build_failure_reason_names_the_compiler_error():
    output = "Error building extension 'fused_rnn_cpp': [1/2] c++ -MMD -c lstm.cpp\nIn file included from lstm.cpp:3:\n" \
             "csrc/philox.h:12:7: error: 'x' was not declared in this scope\nninja: build stopped: subcommand failed."
    assert loader._compiler_error(output) == "csrc/philox.h:12:7: error: 'x' was not declared in this scope"


def test_default_capability_flags_are_portable(monkeypatch):
    monkeypatch.setenv("FUSED_RNN_CPU_CAPABILITY", "SOMETHING_ELSE")
    assert flags.cpu_capability() == "DEFAULT"
    assert not any(f.startswith("-m") for f in flags.compile_flags("DEFAULT"))


FALLBACK_SCRIPT = textwrap.dedent(
    """
    import warnings, torch, fused_rnn
    lstm = fused_rnn.LSTM(3, 4, zoneout_h=0.2)
    x = torch.randn(5, 2, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out_auto = lstm(x, seed=7)[0]
        lstm(x, seed=8)
    fallback = [w for w in caught if "fused_rnn" in str(w.message)]
    assert len(fallback) == 1, [str(w.message) for w in caught]
    message = str(fallback[0].message)
    assert fallback[0].filename == "<string>", fallback[0].filename  # the caller's line, not the package's
    assert "cpp backend is unavailable" in message and "CXX='/nonexistent'" in message and "reference" in message, message
    lstm.backend = "reference"
    assert torch.equal(out_auto, lstm(x, seed=7)[0])
    lstm.backend = "cpp"
    try:
        lstm(x, seed=7)
    except RuntimeError as error:
        assert "backend='cpp' is not available" in str(error) and "CXX='/nonexistent'" in str(error), str(error)
    else:
        raise AssertionError("backend='cpp' ran without a compiler")
    print("ok")
    """
)


def test_no_compiler_falls_back_to_the_reference_with_one_warning(tmp_path):
    env = dict(os.environ, CXX="/nonexistent", FUSED_RNN_CACHE=str(tmp_path / "empty-cache"))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=env, cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_ninja_installed_beside_this_python_is_found_without_an_activated_environment(monkeypatch):
    """`pip install ninja` puts ninja in this Python's scripts folder, which is on PATH only where a virtual
    environment is activated (dev.py runs .venv/bin/python without): the build looks there too."""
    import shutil
    import sysconfig

    from torch.utils import cpp_extension

    scripts = sysconfig.get_path("scripts")
    if not os.path.exists(os.path.join(scripts, "ninja")):
        pytest.skip(f"no ninja in this Python's scripts folder ({scripts})")
    # PATH without any folder that holds a ninja
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and not os.path.exists(os.path.join(d, "ninja")))
    monkeypatch.setenv("PATH", path)
    assert shutil.which("ninja") is None and not cpp_extension.is_ninja_available()
    with loader._scripts_on_path():
        assert cpp_extension.is_ninja_available()
    assert os.environ["PATH"] == path
