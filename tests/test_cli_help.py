"""Every command's --help renders (README and MLproject send users there)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import REPO

COMMANDS = ["train", "search", "repeat", "baseline", "register", "download"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_renders_every_option(command):
    out = subprocess.run(
        [sys.executable, "-m", "millvae", command, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith(f"usage: millvae {command}"), out.stdout[:200]
    assert "Traceback" not in out.stderr


def test_train_help_shows_percent_signs_literally():
    out = subprocess.run(
        [sys.executable, "-m", "millvae", "train", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "30 %" in " ".join(out.stdout.split())


def test_top_level_help():
    out = subprocess.run(
        [sys.executable, "-m", "millvae", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    assert all(c in out.stdout for c in COMMANDS)
