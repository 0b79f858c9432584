"""Packaging. The C++ extension is built just in time at first use (fused_rnn/cpp/loader.py); set
FUSED_RNN_BUILD_CPP=1 (with `pip install --no-build-isolation .`, torch already installed) to build it
ahead of time instead. Nothing here imports torch unless that is asked for."""

import os

from setuptools import setup

cmdclass, ext_modules = {}, []
if os.environ.get("FUSED_RNN_BUILD_CPP") == "1":
    # The same sources and flags as the just-in-time build (fused_rnn/cpp/flags.py, read without importing the
    # package): built for this machine's CPU capability, or FUSED_RNN_CPU_CAPABILITY=DEFAULT for a portable build.
    import importlib.util

    from torch.utils.cpp_extension import BuildExtension, CppExtension

    root = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("_fused_rnn_flags", os.path.join(root, "fused_rnn", "cpp", "flags.py"))
    flags = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flags)
    ext_modules = [
        CppExtension(
            "fused_rnn._C",
            ["csrc/lstm.cpp"],
            include_dirs=[os.path.join(root, "csrc")],
            extra_compile_args=flags.compile_flags(flags.cpu_capability()),
            extra_link_args=flags.link_flags(),
        )
    ]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
