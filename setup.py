from setuptools import setup

# The C kernels are compiled by cffi from build_ext.py (API mode).
setup(cffi_modules=["build_ext.py:ffibuilder"])
