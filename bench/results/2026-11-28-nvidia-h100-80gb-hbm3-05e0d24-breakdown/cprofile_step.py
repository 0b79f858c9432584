import cProfile, pstats, sys, torch
import fused_rnn
from bench.providers import SHAPES_BY_NAME, make_input, regularizer_kwargs, build_step, Built

import os
device = torch.device(os.environ.get("DEV", "cuda"))
for name in sys.argv[1:] or ["h512"]:
    shape = SHAPES_BY_NAME[name]
    dtype = torch.float16
    inputs = make_input(shape, dtype, device)
    model = fused_rnn.LSTM(shape.input_size, shape.hidden_size, shape.num_layers, device=device, dtype=dtype,
                           **regularizer_kwargs(shape))
    step = build_step(Built(model, lambda x: model(x)[0], {}), shape, inputs, "fwdbwd")
    for _ in range(int(os.environ.get("WARM", 20))):
        step()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(int(os.environ.get("N", 50))):
        step()
    prof.disable()
    torch.cuda.synchronize()
    print(f"## {name}: cProfile of 50 steps")
    st = pstats.Stats(prof)
    st.sort_stats("tottime").print_stats(45)
    st.sort_stats("cumulative").print_stats(45)
