"""Command-line tests: the digits demo trained once per test process, in a cache of its own.

Imported by the test modules that run the demo (an autouse fixture applies to its module).
"""

import pytest
import torch

from hesse.demo import load_demo


@pytest.fixture(scope="module", autouse=True)
def digits_cache(tmp_path_factory):
    """Point ``HESSE_CACHE_DIR`` at the session's folder and train (or load) digits there."""
    cache = tmp_path_factory.getbasetemp() / "hesse-cache"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HESSE_CACHE_DIR", str(cache))
        load_demo("digits")
        yield cache
    torch.set_num_threads(threads)  # the demos run single-threaded; give the suite its threads
