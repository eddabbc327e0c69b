"""``python -m clip_train.models``: every architecture name with its family, parameter count and tokenizer.

Parameters are counted on the meta device (shapes only), so listing the whole zoo allocates no weights.
Names whose towers need a part this build lacks show what is missing instead of a count.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from clip_train.errors import first_line
from clip_train.models.factory import build_model
from clip_train.models.openclip_config import family, openclip_model_names, tokenizer_need, unsupported_fields
from clip_train.models.registry import builtin_models, get_model_config, list_models


def describe(name: str) -> dict:
    """One listing row: name, family, parameter count (None when not buildable here), tokenizer, missing parts."""
    in_zoo = name in openclip_model_names()
    missing = unsupported_fields(name) if in_zoo else []
    row = {"name": name, "family": family(name) if in_zoo else ("ViT" if get_model_config(name).is_vit else "ModifiedResNet"),
           "parameters": None, "tokenizer": tokenizer_need(name) if in_zoo else "CLIP BPE", "missing": missing}
    if not missing:
        try:
            with torch.device("meta"):
                model = build_model(get_model_config(name))
            row["parameters"] = sum(p.numel() for p in model.parameters())
        except (ImportError, ValueError) as err:
            row["missing"] = [first_line(err)]
    return row


def _millions(count: int | None) -> str:
    return "-" if count is None else f"{count / 1e6:,.1f}M"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clip_train.models", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    parser.add_argument("names", nargs="*", help="only these names (default: all of list_models())")
    args = parser.parse_args(argv)
    known = set(list_models())
    unknown = [n for n in args.names if n not in known and n.removesuffix("-quickgelu") not in known]
    if unknown:
        print(f"python -m clip_train.models: error: unknown model {unknown[0]!r}; run without names to list them all",
              file=sys.stderr)
        return 2
    rows = [describe(n) for n in (args.names or list_models())]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    width = max(len(r["name"]) for r in rows)
    fam_width = max(len(r["family"]) for r in rows)
    print(f"{'name':<{width}}  {'family':<{fam_width}}  {'params':>9}  tokenizer")
    for r in rows:
        note = f"  (needs: {', '.join(r['missing'])})" if r["missing"] else ""
        print(f"{r['name']:<{width}}  {r['family']:<{fam_width}}  {_millions(r['parameters']):>9}  {r['tokenizer']}{note}")
    built_in = len(builtin_models())
    print(f"{len(rows)} names ({built_in} built in, the rest from OpenCLIP's configs); each also takes -quickgelu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
