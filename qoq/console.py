"""What a qoq command prints: the lines a researcher needs, and the rest only when asked for.

``qoq -v COMMAND ...`` (or ``QOQ_VERBOSE=1``) brings everything back: the demo set's full source and
licence tables on every run, Lightning's hardware lines and tips, vLLM's and transformers' warnings and
progress bars. Without it those are left out (:func:`quiet_libraries`); warnings that point at a real
problem still show.
"""

from __future__ import annotations

import logging
import os

#: The environment switch of verbose output.
VERBOSE_ENV = "QOQ_VERBOSE"

#: Lightning info lines that say nothing about a qoq run on the console (kept with -v).
_LIGHTNING_NOISE = ("GPU available", "TPU available", "HPU available", "litlogger", "LitLogger")


def verbose() -> bool:
    """Whether the detail was asked for (``-v`` or ``QOQ_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


class _DropLines(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def quiet_libraries() -> None:
    """Leave out the libraries' routine lines unless :func:`verbose` (called by the ``qoq`` command)."""
    if verbose():
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # vLLM's warnings repeat settings qoq chose
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' "Writing model shards", vLLM's loading bars
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines(_LIGHTNING_NOISE))
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found"
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


__all__ = ["VERBOSE_ENV", "quiet_libraries", "verbose"]
