"""Prompt templates for zero-shot classification."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

BUILTIN_TEMPLATES = ("openai", "simple")
BUILTIN_CLASSNAMES = ("imagenet",)
CLIP_BENCHMARK_SLOT = "{c}"


def _nonblank_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _asset_lines(name: str) -> list[str]:
    """The non-blank lines of a built-in list in ``clip_train/assets``."""
    return _nonblank_lines(resources.files("clip_train.assets").joinpath(name).read_text())


def _json_field(path: Path, field: str) -> list[str] | None:
    """``doc[field]`` of a JSON file ``{"classnames": [...], "templates": [...]}`` (or a bare list)."""
    if path.suffix != ".json":
        return None
    doc = json.loads(path.read_text())
    values = doc if isinstance(doc, list) else doc.get(field)
    if not isinstance(values, list):
        raise ValueError(f"{path} has no {field!r} list")  # noqa: TRY004 - bad input: the CLI reports ValueErrors in one line
    return [str(v) for v in values]


def load_templates(spec: str) -> list[str]:
    """``openai`` (OpenAI's 80 ImageNet prompts), ``simple`` (7 of them), or a file of templates with ``{}``
    or ``{c}`` (CLIP_benchmark's spelling) for the class name (one per line, or a JSON file with a ``templates``
    list). Returned with ``{}`` as the slot, ready for ``template.format(name)``."""
    if spec in BUILTIN_TEMPLATES:
        templates = _asset_lines(f"templates_{spec}.txt")
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ValueError(f"templates {spec!r} is neither {' nor '.join(BUILTIN_TEMPLATES)} nor a file")
        templates = _json_field(path, "templates") or _nonblank_lines(path.read_text())
    # CLIP_benchmark's template files name the slot {c}; ours (and OpenAI's notebook) use {}.
    templates = [t.replace(CLIP_BENCHMARK_SLOT, "{}") for t in templates]
    if not templates:
        raise ValueError(f"templates {spec!r} holds no template (one per line, e.g. 'a photo of a {{}}.')")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(
            f"templates {spec!r}: every template must contain {{}} or {{c}} for the class name "
            f"(e.g. 'a photo of a {{}}.'); {bad[0]!r} does not"
        )
    return templates


def load_classnames(path: str) -> list[str]:
    """Class names, one per line (line i names class i), or a JSON file with a ``classnames`` list; or
    ``imagenet``: ImageNet-1k's 1,000 names as OpenAI wrote them for CLIP's zero-shot evaluation (class i is
    the i-th WordNet id in sorted order, the folder order of ImageNet's val set; ImageNet-V2's folder i)."""
    if path in BUILTIN_CLASSNAMES:
        return _asset_lines(f"classnames_{path}.txt")
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"class names file not found: {path} (one class name per line, or "
                         f"{' / '.join(BUILTIN_CLASSNAMES)} for the built-in names)")
    names = _json_field(file, "classnames") or _nonblank_lines(file.read_text())
    if not names:
        raise ValueError(f"class names file {path} is empty")
    return names
