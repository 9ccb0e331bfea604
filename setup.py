import os
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup
from setuptools.command.build_ext import build_ext


class ParallelBuildExt(build_ext):
    """Compiles the extension's C files side by side, one compiler per core: one after another
    they were ~15 s of a fresh `pip install .` on the 2-vCPU dev VM (setuptools' own --parallel
    builds several extensions at once, not the files of one)."""

    def build_extension(self, ext):
        compile_files = self.compiler.compile

        def compile_each(sources, *args, **kwargs):
            with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
                parts = pool.map(lambda src: compile_files([src], *args, **kwargs), sources)
                return [obj for objs in parts for obj in objs]

        self.compiler.compile = compile_each
        try:
            super().build_extension(ext)
        finally:
            del self.compiler.compile


# The C kernels are compiled by cffi from build_ext.py (API mode); cffi builds on this command.
setup(cffi_modules=["build_ext.py:ffibuilder"], cmdclass={"build_ext": ParallelBuildExt})
