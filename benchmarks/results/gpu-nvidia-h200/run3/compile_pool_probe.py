"""Why was the fused mode's host-to-host call at batch 1 ~8 ms against 0.94 ms unfused? Time each part.

Run from the project's root on a CUDA machine: `python3 benchmarks/results/gpu-nvidia-h200/run3/compile_pool_probe.py`
(every probe) or `... compile_pool_probe.py series` (a one-image copy timed every 0.5 s after a first compile), each
also with `TORCHINDUCTOR_COMPILE_THREADS=1`. The code that ran on the H200 (before `torch_impl.fuse` compiled
in-process), laid out by ruff.
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, ".")
import numpy as np
import torch

import torch_impl
from benchmarks.runtimes.pytorch import capture_cuda_graph

torch.backends.cudnn.benchmark = True
dev = torch.device("cuda")
twin = torch_impl.ResNet34(num_classes=10, classifier_activation=None).eval()


def prep(model):
    return model.eval().to(dev, torch.float16).to(memory_format=torch.channels_last)


def med(f, n=50):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


host = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32))
results = {}


def probe(name, model):
    x = host.to(dev, torch.float16).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        graph, out = capture_cuda_graph(model, x)
    r = {}
    r["load_ms"] = med(lambda: x.copy_(host))
    r["replay_ms"] = med(lambda: graph.replay())
    r["fetch_ms"] = med(lambda: out.float().cpu().numpy())
    r["e2e_ms"] = med(lambda: (x.copy_(host), graph.replay(), out.float().cpu().numpy()))
    r["h2d_plain_ms"] = med(lambda: host.to(dev))
    r["small_cpu_op_ms"] = med(lambda: torch.zeros(10).add_(1))
    r["cpu_convert_ms"] = med(lambda: host.to(torch.float16).contiguous(memory_format=torch.channels_last))
    r["threads"] = torch.get_num_threads()
    with torch.inference_mode():
        r["eager_ms"] = med(lambda: model(x), 20)
    results[name] = r
    print(name, {k: round(v, 4) for k, v in r.items()}, flush=True)


print("threads", torch.get_num_threads(), flush=True)
if len(sys.argv) == 1:
    probe("plain-1", prep(torch_impl.ResNet34(num_classes=10, classifier_activation=None)))
if len(sys.argv) == 1:
    probe("fused", prep(torch_impl.fuse(twin)))
if len(sys.argv) == 1:
    probe("plain-2", prep(torch_impl.ResNet34(num_classes=10, classifier_activation=None)))
if len(sys.argv) == 1:
    probe("fused-noglue", prep(torch_impl.fuse(twin, compile_glue=False)))
if len(sys.argv) == 1:
    probe("plain-3", prep(torch_impl.ResNet34(num_classes=10, classifier_activation=None)))
json.dump(results, open(os.path.join(os.environ.get("OUT", "."), "e2e.json"), "w"), indent=1)

# How long the slowdown lasts after a fresh compile: a new compiled function, then load timed every 0.5 s.
if len(sys.argv) > 1 and sys.argv[1] == "series":
    f = torch.compile(lambda t: torch.relu(t) * 3 + 1, dynamic=False, fullgraph=True)
    x = host.to(dev, torch.float16).contiguous(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    f(x)
    torch.cuda.synchronize()
    print(f"compile {time.perf_counter() - t0:.2f} s")
    start = time.perf_counter()
    while time.perf_counter() - start < 20:
        print(f"t={time.perf_counter() - start:5.1f}s load {med(lambda: x.copy_(host), 5):.3f} ms", flush=True)
        time.sleep(0.5)
