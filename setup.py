"""The one packaging rule pyproject.toml cannot express: the top-level ``configs/`` directory ships inside the
wheel as the package ``clip_train.configs``, so an installed clip_train finds its Hydra configs (``pkg://``).

Everything else (metadata, dependencies) is in pyproject.toml. ``launch/``, ``tests/`` and ``docs/`` are not
packaged.
"""

from setuptools import find_namespace_packages, setup

# Each config group (configs/model, configs/hydra/launcher, ...) is listed as a package of its own: setuptools
# warns about, and will stop shipping, data directories that are importable but not declared.
config_packages = ["clip_train.configs"] + [
    f"clip_train.configs.{group}" for group in find_namespace_packages(where="configs")
]

setup(
    packages=find_namespace_packages(include=["clip_train", "clip_train.*"]) + config_packages,
    package_dir={"clip_train.configs": "configs"},
    package_data={
        "clip_train": ["assets/*", "assets/**/*"],
        **{package: ["*.yaml", "*.yml"] for package in config_packages},
    },
)
