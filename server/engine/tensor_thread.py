"""The one OS thread that does all tensor work of a server."""

from __future__ import annotations

import concurrent.futures


class TensorThread:
    """One OS thread for all tensor work of a server: loading the model, the start-up profile, the step loop.

    PyTorch's CPU kernels run on an OpenMP thread team that belongs to the calling thread. When the model is
    loaded on one thread and the step loop runs on another, the two teams compete for the cores. On a 2-core
    machine a decode step then took 20 to 50% longer than with every call on one thread.
    """

    def __init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="matlora-tensor")

    def run(self, function, *args, **kwargs):
        """Call ``function`` on the tensor thread and return its result (re-raising its exception)."""
        return self._executor.submit(function, *args, **kwargs).result()

    def submit(self, function, *args, **kwargs) -> concurrent.futures.Future:
        return self._executor.submit(function, *args, **kwargs)
