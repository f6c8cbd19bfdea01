"""The CPU readings of devstack.measure_lag_cpu, against this process's own /proc entries."""

from __future__ import annotations

import argparse
import os
import time

import pytest

from devstack.cpu import machine_busy_s, process_cpu_s, shares
from devstack.measure_lag_cpu import parse_rates


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_a_busy_process_reads_as_about_one_core_and_the_machine_as_at_least_that() -> None:
    before = {"me": process_cpu_s(os.getpid()), "machine": machine_busy_s()}
    started = time.monotonic()
    _spin(0.3)
    after = {"me": process_cpu_s(os.getpid()), "machine": machine_busy_s()}
    used = shares(before, after, time.monotonic() - started)
    assert 0.5 <= used["me"] <= 1.1
    assert used["machine"] >= used["me"] - 0.1


def test_a_process_that_is_gone_reads_as_zero() -> None:
    assert process_cpu_s(2**22 + 1) == 0.0  # above the kernel's pid_max limit


def test_rates_are_positive_numbers() -> None:
    assert parse_rates("40, 80,136.5") == [40.0, 80.0, 136.5]
    for bad in ("", "fast", "10,-1", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_rates(bad)
