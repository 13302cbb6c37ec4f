import os

os.environ.setdefault("WANDB_MODE", "disabled")
# Triton kernels run in its interpreter on a CPU-only machine; read when the kernels are defined,
# so before anything imports reft_lab.kernels
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# under pytest-xdist (make test runs -n <cores>) each worker gets a core of its own: the jobs it runs
# read their thread count from the affinity (reft_lab.sweep.threads_per_job), and so do the
# processes it starts, so workers never oversubscribe the cores
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if XDIST_WORKER.startswith("gw") and hasattr(os, "sched_setaffinity"):
    _cores = sorted(os.sched_getaffinity(0))
    _worker = int(XDIST_WORKER[2:])
    os.sched_setaffinity(0, {_cores[_worker % len(_cores)]})

import pytest  # noqa: E402
import torch  # noqa: E402

if XDIST_WORKER.startswith("gw"):
    torch.set_num_threads(1)

from reft_lab.models import ModelConfig, load_model  # noqa: E402

TINY_ARCHS = ["llama", "qwen2", "gpt2", "gpt_neox"]
# the device under test: tests of the kernel and of the fused path build their models and tensors
# here, so a CUDA machine runs the compiled kernel and a CPU-only one the interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def tiny():
    """tiny(arch) -> a fresh tiny random model (same weights every call) and its tokenizer, on the
    CPU unless ``device`` says otherwise."""

    def make(arch: str = "llama", dtype: str = "float32", device: str = "cpu"):
        return load_model(ModelConfig(name_or_path=f"tiny:{arch}", dtype=dtype, device=device))

    return make


@pytest.fixture
def batch():
    """Two rows of 9 tokens: row 0 right-padded (7 attended), row 1 left-padded (6 attended)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    mask[1, :3] = 0
    ids[mask == 0] = 0
    return ids, mask, torch.tensor([5, 4])
