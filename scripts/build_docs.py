"""Build the docs site: draw the pictures into docs/img/, then run ``mkdocs build --strict``.

    python scripts/build_docs.py             # pictures, then the site in site/
    python scripts/build_docs.py --pictures  # pictures only
    python scripts/build_docs.py --check     # exit 1 if docs/img/ differs from a fresh drawing

The pictures are committed, so the site shows them without this step; rerun it whenever a change
to the code changes what a picture shows (the docs tests say so when that happens).

This file is also the mkdocs hook named in ``mkdocs.yml``: on every ``mkdocs build`` or
``mkdocs serve`` its ``on_files`` adds the API reference page ``api.md``, written from the
docstrings of every module of the package at that moment. Generated at build time and never
committed, the reference cannot go stale.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
IMG = DOCS / "img"

# ----- the API reference -------------------------------------------------------------------------


class _Annotation:
    """An annotation kept as text (``from __future__ import annotations``), printed unquoted."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def signature(obj: object) -> str:
    """``obj``'s call signature as source would spell it, or ``""`` when it has none."""
    try:
        sig = inspect.signature(obj)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""

    def plain(a: object) -> object:
        return _Annotation(a) if isinstance(a, str) else a

    params = [p.replace(annotation=plain(p.annotation)) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=plain(sig.return_annotation)))


def modules(package: str = "minipaged") -> list[str]:
    """Every public module of ``package``, in alphabetical order (a package before its
    modules). Private modules (``_name``) and ``__main__`` are left out."""
    root = importlib.import_module(package)
    names = [package]
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


def _doc(obj: object) -> list[str]:
    doc = inspect.getdoc(obj)
    return ["", "```text", doc, "```"] if doc else []


def _members(cls: type) -> list[tuple[str, object]]:
    """The public methods and properties that ``cls`` itself defines, in source order."""
    out = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, staticmethod | classmethod):
            value = value.__func__
        if inspect.isfunction(value) or isinstance(value, property):
            out.append((name, value))
    return out


def _plain(value: object) -> bool:
    """A constant worth printing: a number, a short string, or a short tuple or dict of those
    (no paths, functions or objects, whose text would depend on the machine)."""
    if isinstance(value, tuple):
        ok = all(_plain(v) for v in value)
    elif isinstance(value, dict):
        ok = all(_plain(k) and _plain(v) for k, v in value.items())
    else:
        ok = isinstance(value, int | float | str) and "\n" not in str(value)
    return ok and len(repr(value)) <= 120


def module_reference(name: str) -> list[str]:
    """The Markdown lines for one module: its docstring, then each public class (with its own
    methods and properties) and function defined there, in source order."""
    module = importlib.import_module(name)
    lines = [f"## {name}", *_doc(module)]
    public = getattr(module, "__all__", None)
    documented: set[str] = set()
    for attr, obj in vars(module).items():
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if public is not None and attr not in public:
            continue
        if inspect.isclass(obj):
            documented.add(attr)
            lines += ["", f"### class {attr}", "", f"```python\n{attr}{signature(obj)}\n```"]
            lines += _doc(obj)
            for member, value in _members(obj):
                if isinstance(value, property):
                    lines += ["", f"**`{attr}.{member}`** (property)", *_doc(value)]
                else:
                    lines += ["", f"**`{attr}.{member}{signature(value)}`**", *_doc(value)]
        elif inspect.isfunction(obj):
            documented.add(attr)
            lines += ["", f"### {attr}", "", f"```python\n{attr}{signature(obj)}\n```"]
            lines += _doc(obj)
    source = inspect.getsource(module)
    for attr, obj in vars(module).items():  # constants: upper-case names assigned here
        if attr.isupper() and not attr.startswith("_") and (public is None or attr in public):
            if _plain(obj) and re.search(rf"^{attr}\s*[:=]", source, re.M):
                documented.add(attr)
                lines += ["", f"`{attr} = {obj!r}`"]
    rest = [n for n in public or [] if n not in documented]
    if rest:
        lines += ["", "Also exported here: " + ", ".join(f"`{n}`" for n in rest)]
    return lines


def api_reference() -> str:
    """The whole API reference page, one section per module of :func:`modules`."""
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings at build time (`scripts/build_docs.py`), so it always",
        "matches the code. Each module's docstring says why it exists; each class and function",
        "says what it keeps true.",
    ]
    for name in modules():
        lines += ["", *module_reference(name)]
    return "\n".join(lines) + "\n"


def on_files(files, config):  # noqa: ANN001, ANN201 (mkdocs hook: types come from mkdocs)
    """mkdocs hook: add the generated ``api.md`` to the site's files."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, "api.md", content=api_reference()))
    return files


# ----- pictures and the build --------------------------------------------------------------------


def stale_pictures(img: Path = IMG) -> list[str]:
    """The pictures in ``img`` that are missing or differ from a fresh drawing."""
    from minipaged.pictures import render_all

    with tempfile.TemporaryDirectory() as tmp:
        return [
            fresh.name
            for fresh in render_all(tmp)
            if not (img / fresh.name).is_file()
            or (img / fresh.name).read_bytes() != fresh.read_bytes()
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--pictures", action="store_true", help="draw the pictures only")
    what.add_argument("--check", action="store_true", help="check docs/img/ is up to date")
    parser.add_argument("--site-dir", type=Path, default=ROOT / "site", help="default: site/")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_pictures()
        for name in stale:
            print(f"docs/img/{name} is out of date: run python scripts/build_docs.py")
        return 1 if stale else 0
    from minipaged.pictures import render_all

    for path in render_all(IMG):
        print(f"drew {path.relative_to(ROOT)}")
    if args.pictures:
        return 0
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(args.site_dir)]
    return subprocess.run(cmd, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
