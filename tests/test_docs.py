"""The docs run: every code example in docs/*.md and README.md is executed, the pictures are
redrawn and compared with the committed ones, and the site builds with ``mkdocs build --strict``.

How examples are found: fenced blocks of a Markdown file, in order, sharing one namespace per
file (a walkthrough builds on its earlier steps).

- a block whose first line starts with ``>>>`` (```` ```pycon ````, or any language) is a doctest:
  the printed output must match, with ``...`` as a wildcard and whitespace runs equal;
- a ```` ```python ```` block without prompts is executed as it is;
- a ```` ```console ```` block runs each ``$ minipaged ...`` line through ``minipaged.cli.main``
  and checks its output the same way (other commands, such as ``pip``, are shown, not run).

Other fences (text, bash, plain) are listings, not run. The slow test at the end installs the
package in a fresh virtual environment and runs the README's two commands as a new user would
(``python3 -m pytest -q --runslow tests/test_docs.py -k fresh``).
"""

from __future__ import annotations

import contextlib
import doctest
import importlib.util
import io
import re
import shlex
import shutil
import subprocess
import sys
import venv
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from minipaged import pictures
from minipaged.alloc import BestFitAllocator, BuddyAllocator, FirstFitAllocator, PagedAllocator
from minipaged.block_manager import BlockManager
from minipaged.errors import InvalidRequest, OutOfMemory, UnknownSequence

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S
)


def _build_docs():
    """scripts/build_docs.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("build_docs", ROOT / "scripts" / "build_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----- running the examples ----------------------------------------------------------------------


def code_blocks(text: str) -> list[tuple[str, int, str]]:
    """``(kind, line, body)`` for every fenced block: kind is doctest, python, console or
    listing; line is the 1-based line of the block's first body line."""
    blocks = []
    for m in FENCE.finditer(text):
        info = m["info"].strip().split()
        lang = info[0].lower() if info else ""
        indent = len(m["indent"])
        body = "\n".join(line[indent:] for line in m["body"].splitlines()) + "\n"
        line = text.count("\n", 0, m.start("body")) + 1
        if body.lstrip().startswith(">>>"):
            kind = "doctest"
        elif lang in ("python", "py"):
            kind = "python"
        elif lang == "console":
            kind = "console"
        else:
            kind = "listing"
        blocks.append((kind, line, body))
    return blocks


def run_console(body: str, where: str, checker: doctest.OutputChecker) -> list[str]:
    """Run each ``$ minipaged ...`` command of a console block and compare its output; returns
    the failures as messages."""
    from minipaged.cli import main

    failures = []
    commands: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], []))
        elif commands:
            commands[-1][1].append(line)
    for command, want_lines in commands:
        argv = shlex.split(command)
        if argv[0] != "minipaged":
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                rc = main(argv[1:])
            except SystemExit as e:
                rc = e.code
        want = "\n".join(want_lines).strip() + "\n"
        got = out.getvalue().strip() + "\n"
        if rc != 0 or not checker.check_output(want, got, FLAGS):
            failures.append(f"{where}: $ {command}\nexit code {rc}; expected:\n{want}got:\n{got}")
    return failures


def run_page(path: Path) -> tuple[int, list[str]]:
    """Run every example of one Markdown file; returns (examples run, failure messages)."""
    text = path.read_text(encoding="utf-8")
    globs: dict = {"__name__": f"docs_{path.stem}"}
    parser, checker = doctest.DocTestParser(), doctest.OutputChecker()
    ran, failures = 0, []
    for kind, line, body in code_blocks(text):
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}"
        if kind == "doctest":
            examples = parser.get_examples(body, where)
            for ex in examples:
                ex.lineno += line - 1
            test = doctest.DocTest(examples, globs, where, str(path), 0, body)
            test.globs = globs  # DocTest copies its globals; the page shares one namespace
            report = io.StringIO()
            runner = doctest.DocTestRunner(checker, optionflags=FLAGS)
            result = runner.run(test, out=report.write, clear_globs=False)
            ran += result.attempted
            if result.failed:
                failures.append(report.getvalue())
        elif kind == "python":
            exec(compile(body, where, "exec"), globs)
            ran += 1
        elif kind == "console":
            ran += 1
            failures += run_console(body, where, checker)
    return ran, failures


@pytest.mark.parametrize("path", PAGES, ids=[p.name for p in PAGES])
def test_examples_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every example of the page runs and shows what the page says it shows."""
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    _, failures = run_page(path)
    assert not failures, "\n".join(failures)


def test_walkthroughs_have_examples() -> None:
    """The walkthroughs teach by running code: each has examples (and so is checked)."""
    for name in ("quickstart", "allocators", "block_manager", "simulator", "compaction"):
        ran, _ = run_page(DOCS / f"{name}.md")
        assert ran >= 3, f"docs/{name}.md runs only {ran} examples"


def test_collector_finds_every_kind() -> None:
    text = (
        "```pycon\n>>> 1 + 1\n2\n```\n\n```python\nx = 1\n```\n\n"
        "```console\n$ minipaged --help\n```\n\n```\nplain\n```\n"
        "- item\n\n    ```pycon\n    >>> 2\n    2\n    ```\n"
    )
    blocks = code_blocks(text)
    assert [(k, n) for k, n, _ in blocks] == [
        ("doctest", 2),
        ("python", 7),
        ("console", 11),
        ("listing", 15),
        ("doctest", 20),
    ]
    assert blocks[-1][2] == ">>> 2\n2\n"


def test_a_wrong_example_fails(tmp_path: Path) -> None:
    """The collector really compares output: a page with a wrong answer reports it."""
    page = tmp_path / "wrong.md"
    page.write_text("```pycon\n>>> 1 + 1\n3\n```\n\n```console\n$ minipaged nonsense\n```\n")
    ran, failures = run_page(page)
    assert ran == 2 and len(failures) == 2
    assert "Expected:\n    3\nGot:\n    2" in failures[0]
    assert "minipaged nonsense" in failures[1]


# ----- pictures ----------------------------------------------------------------------------------


def svg_cells(svg: str, size: str = "16") -> list[str]:
    """The fill colours of the memory map's unit squares (rects of ``size`` x ``size``)."""
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    return [
        r.get("fill")
        for r in root.iter(f"{ns}rect")
        if r.get("width") == size and r.get("height") == size
    ]


def test_pictures_render(tmp_path: Path) -> None:
    """Each docs picture is drawn into a fresh directory, is well-formed SVG and shows
    something: dozens of shapes and some text."""
    paths = pictures.render_all(tmp_path / "img")
    assert [p.name for p in paths] == list(pictures.PICTURES)
    ns = "{http://www.w3.org/2000/svg}"
    for path in paths:
        root = ET.parse(path).getroot()
        assert root.tag == f"{ns}svg", path.name
        assert float(root.get("width")) >= 300 and float(root.get("height")) >= 100
        assert len(list(root.iter(f"{ns}rect"))) >= 15, path.name
        assert len(list(root.iter(f"{ns}text"))) >= 5, path.name
        assert path.stat().st_size > 2000, path.name


def test_committed_pictures_are_up_to_date() -> None:
    """docs/img/ holds exactly what the code draws now (the renderers are deterministic)."""
    stale = _build_docs().stale_pictures(DOCS / "img")
    assert not stale, f"out of date: {stale}; run python scripts/build_docs.py --pictures"


def test_docs_link_every_picture() -> None:
    """Every picture is shown on some page, and every image a page links exists."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in DOCS.glob("*.md"))
    links = set(re.findall(r"\]\(img/([^)\s]+)\)", text))
    assert set(pictures.PICTURES) <= links
    for name in links:
        assert (DOCS / "img" / name).is_file(), name


def test_memory_map_svg_counts_units() -> None:
    """One square per unit, coloured by state, so the counts equal ``stats()``: a buddy block
    rounded up shows its unrequested tail."""
    buddy = BuddyAllocator(16, 4)
    buddy.alloc(3)  # 4 pages reserved
    buddy.alloc(5)  # 8 pages reserved
    cells = svg_cells(pictures.memory_map_svg(buddy, per_row=8))
    assert len(cells) == 16
    requested = sum(c in pictures.REQUESTED_COLOURS for c in cells)
    wasted = sum(c in pictures.WASTED_COLOURS for c in cells)
    assert (requested, wasted, cells.count(pictures.FREE_COLOUR)) == (8, 4, 4)
    # neighbouring allocations get different shades
    assert cells[0] == pictures.REQUESTED_COLOURS[0] and cells[8] == pictures.REQUESTED_COLOURS[1]


def test_picture_errors_name_the_value() -> None:
    with pytest.raises(InvalidRequest, match="per_row must be an int >= 1, got 0"):
        pictures.memory_map_svg(FirstFitAllocator(8), per_row=0)
    with pytest.raises(InvalidRequest, match="5000 units is too large"):
        pictures.memory_map_svg(FirstFitAllocator(5000))
    with pytest.raises(InvalidRequest, match="draws a BuddyAllocator, got <minipaged"):
        pictures.buddy_svg(FirstFitAllocator(8))
    with pytest.raises(InvalidRequest, match="300 pages are too many"):
        pictures.buddy_svg(BuddyAllocator(300, 4))
    with pytest.raises(InvalidRequest, match="at least one simulation result"):
        pictures.breakdown_svg([])
    bm = BlockManager(65, 4)
    with pytest.raises(InvalidRequest, match="65 blocks is too large"):
        pictures.table_view(bm, [])
    with pytest.raises(UnknownSequence, match="'nope'"):
        pictures.table_view(BlockManager(4, 4), ["nope"])


def test_cow_picture_marks_the_copy() -> None:
    before, after, copies = pictures.cow_example()
    assert copies == [(1, 2)]
    assert before.tables == {"parent": (0, 1), "child": (0, 1)}
    assert after.tables == {"parent": (0, 1), "child": (0, 2)}
    assert before.refs[:3] == (2, 2, 0) and after.refs[:3] == (2, 1, 1)
    svg = pictures.cow_svg(before, after, copies)
    assert "block 1 -&gt; block 2" in svg
    assert svg.count(f'stroke="{pictures.HIGHLIGHT}"') == 2  # src before, dst after


class PictureMachine(RuleBasedStateMachine):
    """Random allocator and block-manager histories; after every step the pictures must agree
    with the objects they draw, unit by unit and block by block, and must not change them."""

    def __init__(self) -> None:
        super().__init__()
        self.allocators = [
            FirstFitAllocator(48),
            BestFitAllocator(48, round_to=4),
            BuddyAllocator(48, 4),
            PagedAllocator(12, 4),
        ]
        self.live: list[list] = [[] for _ in self.allocators]
        self.bm = BlockManager(10, 4, num_cpu_blocks=10, watermark=0)
        self.seqs: list[str] = []
        self.next_id = 0

    @rule(which=st.integers(0, 3), n=st.integers(1, 16))
    def alloc(self, which: int, n: int) -> None:
        with contextlib.suppress(OutOfMemory):
            self.live[which].append(self.allocators[which].alloc(n))

    @rule(which=st.integers(0, 3), data=st.data())
    def free(self, which: int, data: st.DataObject) -> None:
        if self.live[which]:
            i = data.draw(st.integers(0, len(self.live[which]) - 1))
            self.allocators[which].free(self.live[which].pop(i))

    @rule(n=st.integers(1, 12))
    def allocate(self, n: int) -> None:
        seq = f"s{self.next_id}"
        with contextlib.suppress(OutOfMemory, InvalidRequest):
            self.bm.allocate(seq, list(range(n)))
            self.seqs.append(seq)
            self.next_id += 1

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), n=st.integers(1, 5))
    def append_or_fork(self, data: st.DataObject, n: int) -> None:
        seq = data.draw(st.sampled_from(self.seqs))
        if self.bm.is_swapped(seq):
            with contextlib.suppress(OutOfMemory):
                self.bm.swap_in(seq)
        elif data.draw(st.booleans()):
            with contextlib.suppress(OutOfMemory):
                self.bm.append_slots(seq, n)
        else:
            child = f"s{self.next_id}"
            self.next_id += 1
            self.bm.fork(seq, child)
            self.seqs.append(child)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free_or_swap(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.seqs))
        if data.draw(st.booleans()):
            self.bm.free(seq)
            self.seqs.remove(seq)
        elif not self.bm.is_swapped(seq):
            with contextlib.suppress(Exception):  # a shared block: swap the group, or nothing
                self.bm.swap_out(seq)

    @invariant()
    def memory_maps_match_stats(self) -> None:
        for a in self.allocators:
            before = a.stats()
            cells = svg_cells(pictures.memory_map_svg(a, per_row=16))
            s = a.stats()
            assert s == before
            assert len(cells) == s.total
            assert sum(c in pictures.REQUESTED_COLOURS for c in cells) == s.requested
            assert sum(c in pictures.WASTED_COLOURS for c in cells) == s.reserved - s.requested
            assert cells.count(pictures.FREE_COLOUR) == s.free
            if isinstance(a, BuddyAllocator):
                ET.fromstring(pictures.buddy_svg(a))

    @invariant()
    def block_tables_match_the_manager(self) -> None:
        before = self.bm.stats()
        view = pictures.table_view(self.bm, self.seqs)
        svg = pictures.block_tables_svg(view)
        assert self.bm.stats() == before
        ET.fromstring(svg)
        running = [s for s in self.seqs if not self.bm.is_swapped(s)]
        assert list(view.tables) == running
        assert set(view.swapped) == set(self.seqs) - set(running)
        holders = [0] * len(view.refs)
        for seq, table in view.tables.items():
            assert list(table) == self.bm.block_table(seq)
            for b in table:
                holders[b] += 1
        assert list(view.refs) == holders  # ref count == tables holding the block (all drawn)
        arrows = sum(len(t) for t in view.tables.values())
        assert svg.count('marker-end="url(#arrow)"') == arrows
        assert sum(view.fill(b) for b in range(len(view.refs))) == before.tokens_stored


TestPictureMachine = PictureMachine.TestCase
TestPictureMachine.settings = settings(max_examples=40, stateful_step_count=25)


# ----- the API reference and the site ------------------------------------------------------------


def test_api_reference_covers_the_package() -> None:
    """The generated page has a section for every module and names every public class and
    function of the packages' ``__all__``."""
    build = _build_docs()
    text = build.api_reference()
    for name in build.modules():
        assert f"\n## {name}\n" in text, name
    for package in ("minipaged.alloc", "minipaged.kernels", "minipaged.sim"):
        for name in __import__(package, fromlist=["__all__"]).__all__:
            assert re.search(rf"### (class )?{name}\b|`{name} = ", text), (package, name)
    assert "BuddyAllocator(total_pages: int, max_order: int)" in text  # unquoted annotations
    assert "**`BuddyAllocator.alloc(self, n: int) -> Allocation`**" in text


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None,
    reason="mkdocs is not installed: pip install -e '.[docs]' (it is in the test extra too)",
)
def test_site_builds_strict(tmp_path: Path) -> None:
    """``mkdocs build --strict`` succeeds (a warning, such as a broken link, fails it) and the
    site has every page, the generated API reference and the pictures."""
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for page in DOCS.glob("*.md"):
        name = "index.html" if page.stem == "index" else f"{page.stem}/index.html"
        assert (site / name).is_file(), name
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    assert "minipaged.alloc.buddy" in api and "BuddyAllocator" in api
    for name in pictures.PICTURES:
        assert (site / "img" / name).is_file(), name


# ----- as a new user would -----------------------------------------------------------------------


def readme_commands() -> list[str]:
    """The README's first two commands: install and run the main job, install and test."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = [line.strip() for line in text.splitlines() if line.startswith("    pip install")]
    assert len(commands) >= 2, "README.md lost its install commands"
    return commands[:2]


def test_readme_commands_are_found() -> None:
    run_job, run_tests = readme_commands()
    assert "minipaged" in run_job and "pytest" in run_tests
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert run_tests.replace("pip install", "python3 -m pip install -q") in ci, (
        ".ci/run must run exactly the README's test command"
    )


def _copy_checkout(dst: Path) -> None:
    """The files a fresh clone would have: tracked and untracked files git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for rel in listed:
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    shared = ROOT.parent / "shared"
    if shared.is_dir():  # the reference figures some docs and tests read, beside the checkout
        shutil.copytree(shared, dst.parent / "shared", dirs_exist_ok=True)


@pytest.mark.slow
def test_fresh_venv_runs_readme_commands(tmp_path: Path) -> None:
    """Install into a new virtual environment, from a copy of the checkout, and run the README's
    two commands exactly as written (``pip``, ``python3`` and ``minipaged`` resolve to the new
    environment). Takes as long as the whole suite, plus the install."""
    repo = tmp_path / "work" / "minipaged"
    repo.mkdir(parents=True)
    _copy_checkout(repo)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("PYTEST")}
    env.pop("NUMBA_ENABLE_CUDASIM", None)  # the new user's shell does not have it
    env["PATH"] = f"{env_dir / 'bin'}:{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    for command in readme_commands():
        proc = subprocess.run(
            ["bash", "-c", command],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=1500,
        )
        assert proc.returncode == 0, f"$ {command}\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
        if "simulate" in command:
            assert "paged" in proc.stdout and "external" in proc.stdout
        if "pytest" in command:
            assert " passed" in proc.stdout
