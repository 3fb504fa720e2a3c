"""Build kdops and its extension ``kdops._C``.

* ``csrc/kdops.cpp`` (the op schemas) and ``csrc/cpu/*.cpp`` (CPU kernels) are always built.
* ``csrc/cuda/*.cu`` + ``csrc/cuda/*_api.cpp`` are added when torch is a CUDA build and nvcc
  is found, or when ``KDOPS_FORCE_CUDA=1``.
* ``KDOPS_NO_EXT=1`` installs pure Python (the reference backend, and Triton where it runs).
* ``KDOPS_PORTABLE=1`` drops ``-march=native`` from the CPU flags (for binaries that travel).

Triton is not a requirement: the Triton kernels need a CUDA GPU (where CUDA builds of torch
bring triton along) or, for the tests, Triton's interpreter. ``pip install -e .`` on a CPU
machine therefore installs no triton; the ``test`` extra (= requirements-test.txt, what the
README's test command installs) does, so that CI runs the Triton kernels under
TRITON_INTERPRET=1.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _requirements(name):
    with open(os.path.join(ROOT, name)) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def _flag(name):
    return os.environ.get(name, "0") == "1"


def extension_modules():
    if _flag("KDOPS_NO_EXT"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = ["csrc/kdops.cpp"] + rel("csrc/cpu/*.cpp")
    # No -std flag: each torch version adds the C++ standard its headers need (17 or 20).
    cxx = ["-O3", "-fopenmp"]
    if not _flag("KDOPS_PORTABLE"):
        cxx.append("-march=native")
    with_cuda = _flag("KDOPS_FORCE_CUDA") or (torch.version.cuda is not None and CUDA_HOME is not None)
    include_dirs = [os.path.join(ROOT, "csrc")]
    # The shared C++ runtime, named before the driver's own -lstdc++: a toolchain that ships only
    # libstdc++.a (the H200 image's /opt/gcc) otherwise links a private copy into kdops._C, whose
    # locale facets are never initialised: formatting a number in an error message segfaulted.
    link = ["-fopenmp", "-l:libstdc++.so.6"]
    if with_cuda:
        sources += rel("csrc/cuda/*.cu") + rel("csrc/cuda/*_api.cpp")
        # TORCH_CUDA_ARCH_LIST (e.g. "9.0" on an H100/H200 machine: one architecture, half the
        # compile time) is honoured by torch's build; without it, Ampere and Hopper.
        gencode = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else [
            "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        ext = CUDAExtension(
            "kdops._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("KDOPS_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx,
                # No --use_fast_math: DESIGN.md's numerics ask for round-off-level exp/log/pow and
                # IEEE division, and tests/test_cuda_sources.py checks spills without it.
                "nvcc": ["-O3", "-lineinfo"] + gencode,
            },
            extra_link_args=link,
        )
    else:
        ext = CppExtension("kdops._C", sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="kdops",
    version="0.1.0",
    description="Fused kernels for knowledge-distillation losses in semantic segmentation",
    packages=find_packages(include=["kdops", "kdops.*"]) + ["kdops.models"],
    package_dir={"kdops.models": "models"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm", "Pillow"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": _requirements("requirements-test.txt"),
        "bench": ["matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "kdops-train=kdops.train.cli:train_main",
            "kdops-distill=kdops.train.cli:distill_main",
        ]
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
