"""A SIGTERM that Prefect's engine turns into another error still counts as the interrupt (exit 143, runs KILLED)."""

from __future__ import annotations

import signal

import pytest


def test_prefect_sigterm_records_the_interrupt_before_prefect_raises():
    import prefect.utilities.engine as engine

    from diffquant.flows import cli
    from diffquant.registry.tracking import _end_status, clear_interrupted, interrupted_by

    try:
        with cli._interruptible():
            assert interrupted_by() is None
            with pytest.raises(BaseException) as raised:  # Prefect's TerminationSignal
                engine._prefect_sigterm_handler(signal.SIGTERM, None)
            assert type(raised.value).__name__ == "TerminationSignal"
            assert interrupted_by() == "SIGTERM"
            # what Prefect's engine raised instead (seen: a signal landing while a task run starts)
            assert _end_status(ValueError("Task run is not set")) == ("KILLED", "interrupted by SIGTERM")
    finally:
        clear_interrupted()
    assert interrupted_by() is None
