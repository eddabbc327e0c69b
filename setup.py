"""The one packaging rule pyproject.toml cannot express: the top-level ``configs/`` directory ships inside the
wheel as the package ``clip_train.configs``, so an installed clip_train finds its Hydra configs (``pkg://``).

Everything else (metadata, dependencies) is in pyproject.toml. ``launch/``, ``tests/`` and ``docs/`` are not
packaged.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=find_namespace_packages(include=["clip_train", "clip_train.*"]) + ["clip_train.configs"],
    package_dir={"clip_train.configs": "configs"},
    package_data={
        "clip_train": ["assets/*", "assets/**/*"],
        "clip_train.configs": ["*.yaml", "**/*.yaml", "*.yml", "**/*.yml"],
    },
)
