"""params.yaml and the parameter reference's table (docs/reference/parameters.md), both written from config.py.

One source for every default and its description: the config classes' field defaults and
docstrings. A docstring's first line is the comment beside the key in params.yaml; the whole
docstring is its row in the reference. `reprotune params --write` regenerates both files, and
tests/test_config.py checks that the shipped ones are exactly what it writes.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel

from reprotune.config import Params
from reprotune.errors import ReprotuneError

HEADER = """\
# Every hyperparameter of the pipeline, with its default. Each stage lists the keys it reads in
# dvc.yaml, so `dvc repro` reruns exactly what a change affects. Try one: dvc exp run -S train.lr=0.01
# (Written from src/reprotune/config.py by `reprotune params --write`: change a default or its
# description there; edit the values here freely.)
"""
COMMENT_COLUMN = 29  # where the comments start, as in a hand-aligned file
TABLE_BEGIN, TABLE_END = "<!-- params table: begin -->", "<!-- params table: end -->"
REFERENCE = Path("docs/reference/parameters.md")  # where the table lives, between the markers


def yaml_value(value) -> str:
    """A default as YAML writes it on one line: 0.0005, true, [0.9, 0.999], a plain or quoted string."""
    text = yaml.safe_dump(list(value) if isinstance(value, tuple) else value, default_flow_style=True,
                          width=1000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _first_line(doc: str | None) -> str:
    return (doc or "").split("\n\n")[0].replace("\n", " ").strip()


def _sections() -> list[tuple[str, type[BaseModel] | None]]:
    """params.yaml's top level in order: (name, section class) or (name, None) for a plain key."""
    out = []
    for name, field in Params.model_fields.items():
        annotation = field.annotation
        out.append((name, annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None))
    return out


def params_yaml() -> str:
    """The shipped params.yaml: every default, each with its one-line description."""
    defaults = Params().model_dump()
    lines = [HEADER]
    for name, section in _sections():
        if section is None:
            field = Params.model_fields[name]
            lines.append(_line(f"{name}: {yaml_value(defaults[name])}", field.description))
            continue
        lines += ["", f"{name}:".ljust(COMMENT_COLUMN) + f"# {_first_line(section.__doc__)}"]
        for key, field in section.model_fields.items():
            value = defaults[name][key]
            if isinstance(value, list | tuple):
                # A list in block style, dashes under the key, as DVC writes it back on every `dvc exp run
                # -S`: a flow list ([0.9, 0.999]) came back rewritten, a change in `git diff params.yaml`
                # nobody made.
                lines.append(_line(f"  {key}:", field.description))
                lines += [f"  - {yaml_value(item)}" for item in value]
            else:
                lines.append(_line(f"  {key}: {yaml_value(value)}", field.description))
    return "\n".join(lines) + "\n"


def _line(text: str, doc: str | None) -> str:
    """`key: value` with its comment beside it, or above it when the value is too long for that."""
    if len(text) < COMMENT_COLUMN - 1:
        return f"{text.ljust(COMMENT_COLUMN - 1)} # {_first_line(doc)}"
    indent = text[:len(text) - len(text.lstrip())]
    return f"{indent}# {_first_line(doc)}\n{text}"


def params_table() -> str:
    """The reference's table: key, default and the whole description of every parameter."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    defaults = Params().model_dump()
    for name, section in _sections():
        fields = {name: Params.model_fields[name]} if section is None else section.model_fields
        for key, field in fields.items():
            dotted = name if section is None else f"{name}.{key}"
            value = defaults[name] if section is None else defaults[name][key]
            short, _, detail = (field.description or "").partition("\n\n")
            meaning = " ".join((f"{short}. {detail}" if detail else short).split()).replace("|", "\\|")
            rows.append(f"| `{dotted}` | `{yaml_value(value)}` | {meaning} |")
    return "\n".join(rows) + "\n"


def with_table(text: str, name: str = str(REFERENCE)) -> str:
    """`text` (the file `name`) with what lies between the table markers replaced by `params_table()`."""
    pattern = re.compile(rf"{re.escape(TABLE_BEGIN)}.*?{re.escape(TABLE_END)}", re.S)
    if not pattern.search(text):
        raise ReprotuneError(f"{name} has no {TABLE_BEGIN} ... {TABLE_END} section")
    return pattern.sub(lambda m: f"{TABLE_BEGIN}\n{params_table()}{TABLE_END}", text)


def write(root: Path) -> list[Path]:
    """Rewrite params.yaml and the parameter reference's table under `root`; the files that changed."""
    reference = root / REFERENCE
    if not reference.is_file():
        raise ReprotuneError(f"{reference} is missing: run `reprotune params --write` in the project's root")
    changed = []
    for path, text in ((root / "params.yaml", params_yaml()),
                       (reference, with_table(reference.read_text(), str(REFERENCE)))):
        if path.read_text() != text:
            path.write_text(text)
            changed.append(path)
    return changed
