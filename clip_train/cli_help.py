"""Help text shared by the argparse tools (``make_shards``, the benchmarks)."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter without the "(default: None)" it gives arguments that have no default,
    nor the "(default: False)" of flags.

    Such an argument's help says what leaving it out means (e.g. "default: first of image, filepath, ...").
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)
