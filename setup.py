"""Packaging. The C++ extension is built just in time at first use (fused_rnn/cpp/loader.py); set
FUSED_RNN_BUILD_CPP=1 (with `pip install --no-build-isolation .`, torch already installed) to build it
ahead of time instead. Nothing here imports torch unless that is asked for."""

import os

from setuptools import setup

cmdclass, ext_modules = {}, []
if os.environ.get("FUSED_RNN_BUILD_CPP") == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules = [
        CppExtension(
            "fused_rnn._C",
            ["csrc/lstm.cpp"],
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
