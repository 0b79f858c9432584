import os, statistics, sys, torch
import fused_rnn
from fused_rnn.triton import launch
from bench.providers import SHAPES_BY_NAME, make_input, regularizer_kwargs, build_step, Built

device = torch.device(os.environ.get("DEV", "cuda"))
name = sys.argv[1] if len(sys.argv) > 1 else "ptb_awd"
dtype = getattr(torch, os.environ.get("DTYPE", "float16"))
shape = SHAPES_BY_NAME[name]
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
inputs = make_input(shape, dtype, device)
torch.manual_seed(0)
model = fused_rnn.LSTM(shape.input_size, shape.hidden_size, shape.num_layers, device=device, dtype=dtype,
                       **regularizer_kwargs(shape))
step = build_step(Built(model, lambda x: model(x)[0], {}), shape, inputs, "fwdbwd")
cudnn = torch.nn.LSTM(shape.input_size, shape.hidden_size, shape.num_layers, device=device, dtype=dtype)
cudnn_step = build_step(Built(cudnn, lambda x: cudnn(x)[0], {}), shape, inputs, "fwdbwd")

VARIANTS = {
    "after": ("after", 1280, False),
    "overlap1280": ("overlap", 1280, False),
    "overlap1280prio": ("overlap", 1280, True),
    "overlap2800prio": ("overlap", 2800, True),
    "overlap640prio": ("overlap", 640, True),
}


def use(variant):
    mode, rows, prio = VARIANTS[variant]
    os.environ["FUSED_RNN_SEQUENCE_PRODUCTS"] = mode
    launch.PRODUCT_CHUNK_ROWS = rows
    launch.PRIORITY_LOOP = prio


def grads(variant):
    use(variant)
    x = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
    xx = x.detach().clone().requires_grad_()
    out, _ = model(xx, seed=5)
    out.float().square().sum().backward()
    g = [xx.grad] + [p.grad for p in model.parameters()]
    res = [t.detach().double().clone() for t in g]
    model.zero_grad(set_to_none=True)
    return res


def timed(fn, n=int(os.environ.get("N", 20))):
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(n):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); b.synchronize(); times.append(a.elapsed_time(b))
        else:
            fn(); times.append(0.0)
    return statistics.median(times)


base = grads("after")
for v in VARIANTS:
    if v == "after":
        continue
    g = grads(v)
    worst = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(g, base))
    print(f"{v}: largest gradient difference against after, relative to its largest element: {worst:.3g}", flush=True)
results = {v: [] for v in VARIANTS}
results["nn.LSTM"] = []
for _round in range(int(os.environ.get("ROUNDS", 3))):
    results["nn.LSTM"].append(timed(cudnn_step))
    for v in VARIANTS:
        use(v)
        results[v].append(timed(step))
print(f"{name} {dtype} fwdbwd, every regularizer, median ms of each round:")
for v, ms in results.items():
    print(f"  {v:18s} {' '.join(f'{m:7.3f}' for m in ms)}  (nn.LSTM ratio {statistics.median(ms) / max(statistics.median(results['nn.LSTM']), 1e-9):.3f})")
