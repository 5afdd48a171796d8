"""Only the optional C mask kernel lives here; everything else is in pyproject.toml.

``optional=True``: where no C compiler is available the install still succeeds and the runtime
uses numba or numpy instead (edgemerge/runtime/kernel.py picks the fastest one that imports).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("edgemerge.runtime._cmask", ["edgemerge/runtime/_cmask.c"], optional=True,
                             extra_compile_args=["-O3", "-std=c99"])])
