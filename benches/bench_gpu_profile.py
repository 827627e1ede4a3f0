"""Driver for profiling the GPU decoder kernels with ncu (decodes an 8K SmolLM2 cache 3 times)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cachegen  # noqa: E402
from bench_gpu import MODELS, extend_container, source_container  # noqa: E402

model = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
data = extend_container(source_container(model), 8192, MODELS[model][3])
for _ in range(3):
    cachegen.decode(data, device="cuda")
torch.cuda.synchronize()
