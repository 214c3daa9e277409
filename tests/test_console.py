"""The quiet console: `qoq -v` / QOQ_VERBOSE brings the libraries' detail back; without it it is left out."""

import logging
import os

from qoq import console


def test_verbose_switch(monkeypatch) -> None:
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    assert not console.verbose()
    for value, expected in (("1", True), ("yes", True), ("0", False), ("false", False)):
        monkeypatch.setenv(console.VERBOSE_ENV, value)
        assert console.verbose() is expected


def test_quiet_drops_lightning_hardware_lines_only(monkeypatch, caplog) -> None:
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "WARNING")  # so that monkeypatch restores the session's value
    monkeypatch.delenv("VLLM_LOGGING_LEVEL")
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    monkeypatch.setattr(logger, "filters", list(logger.filters))  # the session's filters come back
    console.quiet_libraries()
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("GPU available: False, used: False")
        logger.info("`Trainer.fit` stopped: `max_steps=2` reached.")
    assert [r.getMessage() for r in caplog.records] == ["`Trainer.fit` stopped: `max_steps=2` reached."]
    assert os.environ["VLLM_LOGGING_LEVEL"] == "ERROR"
