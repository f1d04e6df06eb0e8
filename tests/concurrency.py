"""Running test work in several Python threads at once, or with torch at one thread."""

import contextlib
import threading

import torch


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op thread count set to ``count`` inside the block, restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def run_in_threads(work, seeds, timeout: float = 120.0) -> None:
    """Call ``work(seed)`` for every seed, each in its own thread, all at once; raise an
    AssertionError listing what any of them raised (a thread's error would otherwise be
    lost), or when one has not finished within ``timeout`` seconds."""
    errors = []

    def guarded(seed):
        try:
            work(seed)
        except BaseException as error:  # report, do not die silently
            errors.append(repr(error))

    threads = [threading.Thread(target=guarded, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish"
    assert not errors, errors
