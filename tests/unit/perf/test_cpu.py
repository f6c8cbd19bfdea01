"""The CPU readings of perf lag --rates, against this process's own /proc entries."""

from __future__ import annotations

import argparse
import os
import time

import pytest

from perf.cpu import machine_busy_s, process_cpu_s, shares
from perf.lag import parse_rates


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_a_busy_process_reads_its_own_cpu_time_and_the_machine_at_least_that() -> None:
    """The /proc readings agree with the kernel's own count for this process, however busy the machine is.

    Compared with time.process_time() rather than with the wall clock: on a loaded machine a
    spinning process gets less than a core, and that is a fact about the machine, not the reader.
    """
    before = {"me": process_cpu_s(os.getpid()), "machine": machine_busy_s()}
    cpu_before = time.process_time()
    _spin(0.3)
    cpu_used = time.process_time() - cpu_before
    after = {"me": process_cpu_s(os.getpid()), "machine": machine_busy_s()}
    # /proc counts in clock ticks (1/100 s): allow a few of them either way.
    assert abs((after["me"] - before["me"]) - cpu_used) <= 0.05
    assert after["machine"] - before["machine"] >= (after["me"] - before["me"]) - 0.05


def test_shares_are_cpu_seconds_per_wall_second_never_negative() -> None:
    used = shares({"a": 1.0, "b": 5.0}, {"a": 1.5, "b": 4.0}, wall_s=0.5)
    assert used == {"a": 1.0, "b": 0.0}


def test_a_process_that_is_gone_reads_as_zero() -> None:
    assert process_cpu_s(2**22 + 1) == 0.0  # above the kernel's pid_max limit


def test_rates_are_positive_numbers() -> None:
    assert parse_rates("40, 80,136.5") == [40.0, 80.0, 136.5]
    for bad in ("", "fast", "10,-1", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_rates(bad)
