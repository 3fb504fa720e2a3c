"""kdops._C uses the process's shared C++ runtime (the one libtorch uses), never a copy of its own.

A private static libstdc++ inside the extension (what a toolchain with only libstdc++.a links by
default) has locale facets that are never initialised: on the H200 image every argument error
whose message formats a number crashed the process. setup.py names libstdc++.so.6 explicitly.
"""
import shutil
import subprocess

import pytest

from kdops import _extension


def _library_path() -> str:
    if not _extension.loaded():
        pytest.skip(f"kdops._C is not built: {_extension.load_error()}")
    from kdops import _C

    return _C.__file__


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) is not installed")
def test_extension_needs_the_shared_cxx_runtime():
    dynamic = subprocess.run(["readelf", "-d", _library_path()], capture_output=True, text=True, check=True)
    needed = [line.split("[")[-1].rstrip("]") for line in dynamic.stdout.splitlines() if "(NEEDED)" in line]
    assert "libstdc++.so.6" in needed, needed


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) is not installed")
def test_extension_defines_no_cxx_runtime_of_its_own():
    symbols = subprocess.run(["nm", "-C", "--defined-only", _library_path()], capture_output=True,
                             text=True, check=True)
    private = [line for line in symbols.stdout.splitlines()
               if "std::basic_ostream<char, std::char_traits<char> >::_M_insert" in line]
    assert not private, private[:3]


def test_an_error_message_with_numbers_reaches_python():
    """The crash's reproducer: a kernel's argument error that formats an int and a shape."""
    if not _extension.loaded():
        pytest.skip(f"kdops._C is not built: {_extension.load_error()}")
    import torch

    s = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"teacher must have the channels of student \(3\), got shape \[2, 2, 4, 5\]"):
        torch.ops.kdops.channel_correlation_loss(s, s[:, :2], "row")
