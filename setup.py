"""Build: the C++ FH extension ``rmae._fh`` and the ``rmae`` package with ``kernels/`` as ``rmae.kernels``."""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

fh_extension = Pybind11Extension(
    "rmae._fh",
    sources=["csrc/fh.cpp", "csrc/bindings.cpp"],
    include_dirs=["csrc"],
    depends=["csrc/fh.hpp"],  # rebuilt when the header changes, and shipped in the source distribution
    cxx_std=17,
    # -ffp-contract=off: no fused multiply-add, so smoothing and edge costs are bit-identical to scipy/numpy.
    extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno"],
)

setup(
    packages=find_packages(include=["rmae", "rmae.*"]) + ["rmae.kernels"],
    package_dir={"rmae.kernels": "kernels"},
    package_data={"rmae": ["configs/**/*.yaml"]},
    ext_modules=[fh_extension],
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
