"""``make test-zoo`` / ``python -m tests.zoo_parity [NAME ...]``: numeric parity with OpenCLIP over the zoo.

For each name (default: all of ``open_clip.list_models()``): OpenCLIP's random model is saved, loaded into
clip_train by name, and the normalised features compared (fp32, CPU). Architectures above 1.5B parameters
are checked on the meta device (key names and shapes); OpenCLIP's Hugging Face text towers get their config
from our offline table instead of the Hub (``zoo_reference.openclip_model``). The table in ``docs/models.md`` is rewritten between
its markers; rows of names not run this time are kept as they were, so a subset run refreshes only its rows.
Exit status 1 when any run name fails.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import open_clip

from clip_train.models.openclip_config import family
from tests.zoo_reference import (
    BIG_MODEL_PARAMETERS,
    needs_other_branch,
    numeric_parity,
    openclip_model,
    ours_on_meta,
    parameter_count,
    shapes,
)

TOLERANCE = 1e-4
DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"
BEGIN, END = "<!-- zoo-table:begin -->", "<!-- zoo-table:end -->"
HEADER = "| architecture | family | parameters | max abs diff image | max abs diff text | seconds | result |"


def check(name: str, workdir: Path) -> dict[str, str]:
    """One table row for ``name``; ``result`` is ``ok``, ``ok (meta)``, ``FAIL ...`` or ``skipped: ...``."""
    row = {"architecture": name, "family": family(name), "parameters": "-", "image": "-", "text": "-",
           "seconds": "-", "result": ""}
    reason = needs_other_branch(name)
    if reason:
        row["result"] = f"skipped: {reason}"
        return row
    try:
        reference = openclip_model(name, device="meta")
    except OSError as err:
        row["result"] = f"skipped: OpenCLIP cannot build it offline ({str(err).splitlines()[0][:80]})"
        return row
    ours = ours_on_meta(name)
    count = parameter_count(ours)
    row["parameters"] = f"{count / 1e6:,.1f}M"
    if shapes(ours.state_dict()) != shapes(reference.state_dict()):
        row["result"] = "FAIL: key names or shapes differ from OpenCLIP's"
        return row
    if count > BIG_MODEL_PARAMETERS:
        row["result"] = "ok (meta: names and shapes)"
        return row
    try:
        result = numeric_parity(name, workdir)
    except Exception as err:  # noqa: BLE001 - a row per name: one failure must not hide the others
        row["result"] = f"FAIL: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
        return row
    row.update(image=f"{result.image_delta:.1e}", text=f"{result.text_delta:.1e}", seconds=f"{result.seconds:.0f}")
    ok = result.image_delta < TOLERANCE and result.text_delta < TOLERANCE
    row["result"] = "ok" if ok else "FAIL: features differ"
    return row


def _format(row: dict[str, str]) -> str:
    return "| " + " | ".join(row[k] for k in ("architecture", "family", "parameters", "image", "text", "seconds",
                                               "result")) + " |"


def _parse_rows(text: str) -> dict[str, dict[str, str]]:
    rows = {}
    if BEGIN not in text:
        return rows
    for line in text.split(BEGIN, 1)[1].split(END, 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] not in ("architecture", "---"):
            rows[cells[0]] = dict(zip(("architecture", "family", "parameters", "image", "text", "seconds", "result"),
                                      cells))
    return rows


def render(rows: dict[str, dict[str, str]]) -> str:
    names = open_clip.list_models()
    loaded = [n for n in names if rows.get(n, {}).get("result", "").startswith("ok")]
    pairs = open_clip.list_pretrained()
    covered = [p for p in pairs if p[0] in loaded]
    lines = [
        BEGIN,
        (f"Loaded by name with OpenCLIP's weights: **{len(loaded)} of {len(names)}** names of `open_clip.list_models()` "
        f"(features < {TOLERANCE:g}, or names and shapes on the meta device above 1.5B parameters), covering "
        f"**{len(covered)} of {len(pairs)}** pretrained (name, tag) pairs of `open_clip.list_pretrained()`. "
        "OpenCLIP builds the Hugging Face text towers from the config our loader uses offline "
        "(`hf_text.KNOWN_ARCHITECTURES`) in place of its download. Rows marked `not run` have not been measured "
        "on this branch."),
        "",
        HEADER,
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        row = rows.get(name) or {"architecture": name, "family": family(name), "parameters": "-", "image": "-",
                                 "text": "-", "seconds": "-", "result": "not run"}
        lines.append(_format(row))
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.zoo_parity", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="only these names (default: every name of open_clip.list_models())")
    args = parser.parse_args(argv)
    names = args.names or open_clip.list_models()
    unknown = [n for n in names if n not in open_clip.list_models()]
    if unknown:
        print(f"zoo_parity: error: {unknown[0]!r} is not in open_clip.list_models()", file=sys.stderr)
        return 2
    text = DOC.read_text()
    rows = _parse_rows(text)
    failed = False
    with tempfile.TemporaryDirectory() as workdir:
        for name in names:
            row = check(name, Path(workdir))
            failed |= row["result"].startswith("FAIL")
            rows[name] = row
            print(_format(row), flush=True)
            table = render(rows)
            pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.DOTALL)
            text = pattern.sub(lambda _, table=table: table, text) if BEGIN in text else text.rstrip() + "\n\n" + table + "\n"
            DOC.write_text(text)  # after every name, so an interrupted run keeps what it measured
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
