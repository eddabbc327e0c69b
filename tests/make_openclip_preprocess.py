"""Regenerate ``clip_train/assets/openclip_preprocess.json`` from an installed open_clip (run by hand, once per
open_clip refresh): ``python -m tests.make_openclip_preprocess``.

The facts are OpenCLIP's pretrained configs (``open_clip.get_pretrained_cfg(name, tag)``: ``mean``, ``std``,
``interpolation``, ``resize_mode``), reduced to one set per architecture name:

- every pretrained tag of the name agrees: that set;
- the tags disagree (ViT-L-14: ``laion2b_s32b_b82k`` normalises with 0.5; ViT-H-14: ``dfn5b`` squashes): the
  name is listed under ``disagreeing`` and keeps OpenAI's defaults, which most of its tags use; a user fine-tuning
  the odd tag sets ``model.image_mean`` etc. for it;
- no pretrained tag: OpenAI's defaults. The families whose preprocessing is not OpenAI's (SigLIP, PE-Core,
  MobileCLIP, CLIPA) have a tag on every name today; the script fails if one ever does not, so the choice is
  made again by a person rather than silently.

Only names whose set differs from OpenAI/bicubic/shortest are written; runtime code never imports open_clip.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import open_clip
from open_clip.pretrained import get_pretrained_cfg

OUT = Path(__file__).resolve().parents[1] / "clip_train" / "assets" / "openclip_preprocess.json"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT = {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bicubic", "resize_mode": "shortest"}
NON_OPENAI_FAMILIES = re.compile(r"SigLIP|PE-Core|MobileCLIP|CLIPA")


def facts_of(name: str, tag: str) -> dict:
    """One pretrained config's preprocessing, missing keys filled as OpenCLIP's PreprocessCfg fills them."""
    cfg = get_pretrained_cfg(name, tag)
    out = dict(DEFAULT)
    for key in DEFAULT:
        if cfg.get(key) is not None:
            out[key] = list(cfg[key]) if key in ("mean", "std") else cfg[key]
    return out


def main() -> None:
    per_name: dict[str, list[dict]] = defaultdict(list)
    for name, tag in open_clip.list_pretrained():
        per_name[name].append(facts_of(name, tag))
    models, disagreeing = {}, []
    for name in open_clip.list_models():
        sets = per_name.get(name)
        if not sets:
            if NON_OPENAI_FAMILIES.search(name):
                raise SystemExit(f"{name} has no pretrained tag but belongs to a non-OpenAI family: decide by hand")
            continue
        distinct = {json.dumps(s, sort_keys=True) for s in sets}
        if len(distinct) > 1:
            disagreeing.append(name)
        elif sets[0] != DEFAULT:
            models[name] = sets[0]
    doc = {
        "NOTICE": f"Facts from open_clip {open_clip.__version__} pretrained configs (github.com/mlfoundations/open_clip, "
                  "MIT License, Copyright (c) 2012-2021 Gabriel Ilharco, Mitchell Wortsman, Nicholas Carlini, "
                  "Rohan Taori, Achal Dave, Vaishaal Shankar, John Miller, Hongseok Namkoong, Hannaneh Hajishirzi, "
                  "Ali Farhadi, Ludwig Schmidt); regenerate with python -m tests.make_openclip_preprocess",
        "default": DEFAULT,
        "disagreeing": sorted(disagreeing),
        "models": dict(sorted(models.items())),
    }
    # One line per name, so a refresh reads as a diff of names.
    body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in doc.pop("models").items())
    head = json.dumps(doc, indent=1)[:-2]
    OUT.write_text(head + ',\n "models": {\n' + body + "\n }\n}\n")
    print(f"{OUT}: {len(models)} names differ from OpenAI's preprocessing; tags disagree for {disagreeing}")


if __name__ == "__main__":
    main()
