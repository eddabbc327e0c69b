"""Where ``python -m clip_train`` finds its Hydra configs.

The YAML tree lives in the repository's top-level ``configs/`` and ships inside the wheel as the package
``clip_train.configs`` (``setup.py`` maps one onto the other). A source checkout or an editable install
reads the checkout's own ``configs/`` directly, so edits there take effect without reinstalling; a normal
install reads the packaged copy through Hydra's ``pkg://`` source. Users add their own config directories
on top of either with ``--config-dir DIR`` or ``hydra.searchpath=[file://DIR]``.
"""

from __future__ import annotations

from pathlib import Path

PACKAGED_CONFIGS = "pkg://clip_train.configs"


def checkout_configs_dir() -> Path | None:
    """The checkout's ``configs/`` when this package is imported from a source tree, else None."""
    root = Path(__file__).resolve().parent.parent
    # pyproject.toml marks a checkout: an installed package's parent is site-packages, which has none.
    if (root / "pyproject.toml").is_file() and (root / "configs" / "train.yaml").is_file():
        return root / "configs"
    return None


def hydra_config_path() -> str:
    """``config_path`` for ``hydra.main``: the checkout's configs directory, else the packaged copy."""
    checkout = checkout_configs_dir()
    return str(checkout) if checkout is not None else PACKAGED_CONFIGS
