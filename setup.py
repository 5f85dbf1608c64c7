"""Package map: the repository keeps the data plane in top-level folders, installed inside pdx.

``transports/`` and ``kernels/`` import nothing from the control plane and sit beside ``pdx/``
in the repository, but they install as ``pdx.transports`` and ``pdx.kernels``: installed
top-level packages named ``transports`` or ``kernels`` would shadow other distributions'
(Hugging Face's ``kernels``, which transformers probes for at import). Everything else is in
pyproject.toml.
"""

from setuptools import find_packages, setup

DATA_PLANE = {"pdx.transports": "transports", "pdx.kernels": "kernels"}

packages = find_packages(include=["pdx", "pdx.*"])
for name, folder in DATA_PLANE.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=DATA_PLANE)
