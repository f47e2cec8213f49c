"""The course's checker: ``minipaged lesson list`` and ``minipaged lesson check NN [--file PATH]``.

Each lesson in ``lessons/NN_name/`` has an ``exercise.py``: a skeleton of one piece of the library
with the same public interface and a few holes (tasks). The checker runs the library's OWN tests
against the student's file, not copies of them, so a lesson is only ever as strict as the library.

How the library's tests reach the student's code: every test module that a lesson uses names its
code under test once, at import, through :func:`under_test`::

    BuddyAllocator = under_test("BuddyAllocator", BuddyAllocator)

which returns the library's object unless ``MINIPAGED_LESSON_FILE`` names a file, in which case it
returns that file's object of the same name (names the file does not define stay the library's).
The checker sets the variable, runs pytest in-process on the lesson's test files (freshly
imported, so the names are bound again) with a small plugin that keeps only the tests of the
lesson's tasks (the table :data:`LESSONS`), and collects, per task, which tests passed and, for a
failure, the error and the smallest failing example Hypothesis found.

Invariant: a checker run leaves the process as it found it: the environment variable, the test
modules in ``sys.modules`` and the student's module are restored or removed afterwards.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from minipaged.errors import InvalidRequest

ROOT = Path(__file__).resolve().parent.parent  # the checkout: lessons/ and tests/ live here
LESSONS_DIR = ROOT / "lessons"
TESTS_DIR = ROOT / "tests"
FILE_ENV = "MINIPAGED_LESSON_FILE"
STUDENT_MODULE = "minipaged_lesson_under_test"

T = TypeVar("T")


# ----- the hook the library's tests call -----------------------------------------------------


def load_file(path: str | Path) -> Any:
    """Import a student's file as the module ``minipaged_lesson_under_test`` (once per path; the
    checker forgets it after each run). Errors while importing propagate unchanged."""
    path = Path(path).resolve()
    module = sys.modules.get(STUDENT_MODULE)
    if module is not None and getattr(module, "__file__", None) == str(path):
        return module
    spec = importlib.util.spec_from_file_location(STUDENT_MODULE, path)
    if spec is None or spec.loader is None:
        raise InvalidRequest(f"cannot import {str(path)!r}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[STUDENT_MODULE] = module  # dataclasses and numba look modules up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[STUDENT_MODULE]
        raise
    return module


def under_test(name: str, default: T) -> T:
    """The object the tests exercise under ``name``: ``default`` (the library's), or the one
    defined by the file that ``MINIPAGED_LESSON_FILE`` names, when it defines ``name``."""
    path = os.environ.get(FILE_ENV)
    if not path:
        return default
    return getattr(load_file(path), name, default)


# ----- the lessons ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One hole of an exercise and the library tests that check it. A test is named
    ``file::function`` (every parametrisation), ``file::function[params]`` (one), or
    ``file::TestClass`` (a state machine); a trailing ``*`` matches any ending."""

    title: str
    tests: tuple[str, ...]


@dataclass(frozen=True)
class Lesson:
    number: str
    name: str  # the folder is lessons/{number}_{name}
    title: str
    reference: str  # the library file that passes every task, relative to the checkout
    tasks: tuple[Task, ...]

    @property
    def folder(self) -> Path:
        return LESSONS_DIR / f"{self.number}_{self.name}"

    @property
    def exercise(self) -> Path:
        return self.folder / "exercise.py"

    @property
    def test_files(self) -> list[str]:
        names = {t.split("::")[0] for task in self.tasks for t in task.tests}
        return sorted(names)


def _task(title: str, *tests: str) -> Task:
    return Task(title, tests)


B, C, K, M, P, S, F = (
    "test_buddy.py",
    "test_compaction.py",
    "test_kernels.py",
    "test_metrics.py",
    "test_paged.py",
    "test_sim.py",
    "test_block_manager.py",
)
LESSONS: tuple[Lesson, ...] = (
    Lesson(
        "01",
        "metrics",
        "fragmentation and its metrics",
        "minipaged/metrics.py",
        (
            _task(
                "internal_fragmentation",
                f"{M}::test_internal_fragmentation_by_hand",
                f"{M}::test_internal_fragmentation_bounds_and_totals",
            ),
            _task(
                "external_fragmentation",
                f"{M}::test_external_fragmentation_by_hand",
                f"{M}::test_external_fragmentation_bounds_and_growth",
            ),
            _task(
                "Linux's fragmentation_index and unusable_index",
                f"{M}::test_linux_indices_by_hand",
                f"{M}::test_indices_equal_brute_force",
                f"{M}::test_index_bounds",
                f"{M}::test_indices_are_monotonic_in_order",
                f"{M}::test_a_large_enough_block_makes_the_request_succeed",
            ),
            _task(
                "free_counts_from_extents",
                f"{M}::test_free_counts_from_extents_by_hand",
                f"{M}::test_free_counts_from_extents_keeps_units_and_servable_requests",
            ),
        ),
    ),
    Lesson(
        "02",
        "buddy",
        "the buddy allocator",
        "minipaged/alloc/buddy.py",
        (
            _task("cover the arena with aligned blocks (__init__)", f"{B}::test_initial_cover"),
            _task(
                "take a block and split it down (_take)",
                f"{B}::test_rounds_up_to_a_power_of_two",
                f"{B}::test_buddyinfo",
                f"{B}::test_out_of_memory_missing_leaves_state_equal",
            ),
            _task(
                "free a block and merge it with its buddy (free)",
                f"{B}::test_worked_example_split_and_merge",
                f"{B}::test_merge_waits_for_the_buddy",
                f"{B}::test_merge_stops_at_max_order",
                f"{B}::test_non_power_of_two_arena_never_merges_past_the_end",
                f"{B}::test_lowest_address_within_an_order",
                f"{B}::test_smallest_order_before_lowest_address",
                f"{B}::test_largest_free_and_extents",
                f"{B}::test_out_of_memory_fragmented_leaves_state_equal",
                f"{B}::test_double_free_leaves_state_equal",
                f"{B}::test_handle_fields_changed_by_the_holder_do_not_matter",
                f"{B}::TestBuddyMachine",
            ),
        ),
    ),
    Lesson(
        "03",
        "paged",
        "paged allocation and block tables",
        "minipaged/alloc/paged.py",
        (
            _task(
                "the LRU free queue (allocate_block, decref)",
                f"{P}::test_allocate_block_takes_head_and_decref_returns_to_tail",
                f"{P}::test_out_of_blocks",
            ),
            _task(
                "sharing and reviving blocks (incref, take)",
                f"{P}::test_take_from_middle_of_queue",
                f"{P}::test_ref_counts",
            ),
            _task(
                "allocations as block tables (alloc, free)",
                f"{P}::test_alloc_takes_ceil_blocks_from_head",
                f"{P}::test_internal_fragmentation_below_one_block",
                f"{P}::test_free_keeps_blocks_shared_elsewhere",
                f"{P}::test_alloc_out_of_memory_is_never_fragmented",
                f"{P}::test_double_free_and_foreign_handles",
                f"{P}::test_free_after_blocks_were_freed_directly",
                f"{P}::TestPagedMachine",
            ),
        ),
    ),
    Lesson(
        "04",
        "block_manager",
        "the block manager: copy-on-write and swapping",
        "minipaged/block_manager.py",
        (
            _task(
                "token positions to slots (slot_mapping)", f"{F}::test_block_table_and_slot_mapping"
            ),
            _task(
                "fork and copy-on-write (fork, append_slots)",
                f"{F}::test_fork_shares_blocks_and_copy_on_write_reports_the_pair",
                f"{F}::test_append_after_fork_of_a_full_last_block_needs_no_copy",
                f"{F}::test_copy_on_write_needs_a_free_block",
            ),
            _task(
                "swapping groups of sequences (swap_out, swap_in)",
                f"{F}::test_swap_preserves_sharing_and_requires_a_closed_group",
                f"{F}::test_swap_group_of_tuple_ids",
                f"{F}::test_swap_needs_room",
                f"{F}::TestBlockManagerMachine",
            ),
        ),
    ),
    Lesson(
        "05",
        "prefix_caching",
        "prefix caching",
        "minipaged/block_manager.py",
        (
            _task(
                "give full blocks their chained keys (_register)",
                f"{F}::test_unknown_tokens_are_not_cached",
            ),
            _task(
                "find the longest cached prefix (same_prefix, _match)",
                f"{F}::test_same_prefix",
                f"{F}::test_prefix_hit_reuses_blocks_and_never_the_last_token",
                f"{F}::test_hash_collision_is_a_miss",
                f"{F}::test_collision_in_the_parent_chain_is_a_miss",
            ),
            _task(
                "keep freed blocks cached, evict in LRU order (_new_gpu_block, _release_gpu)",
                f"{F}::test_lru_eviction_order",
                f"{F}::test_reviving_a_cached_block_saves_it_from_eviction",
                f"{F}::TestBlockManagerMachine",
            ),
        ),
    ),
    Lesson(
        "06",
        "cache_kernels",
        "your first Numba CUDA kernel: reshape-and-cache and copy-blocks",
        "minipaged/kernels/cache_ops.py",
        (
            _task("reshape_and_cache_kernel", f"{K}::test_reshape_and_cache_matches_reference"),
            _task("copy_blocks_kernel", f"{K}::test_copy_blocks_matches_reference"),
        ),
    ),
    Lesson(
        "07",
        "paged_attention",
        "paged attention (v1, then the partitioned v2)",
        "minipaged/kernels/attention.py",
        (
            _task(
                "v1: one thread block per (sequence, head)",
                f"{K}::test_attention_matches_reference[v1]",
                f"{K}::test_huge_logits_stay_finite[v1]",
            ),
            _task(
                "v2: partitions in parallel, then a reduction",
                f"{K}::test_attention_matches_reference[v2]",
                f"{K}::test_huge_logits_stay_finite[v2]",
                f"{K}::test_v2_skips_partitions_past_a_short_sequence",
            ),
        ),
    ),
    Lesson(
        "08",
        "simulator",
        "the serving simulator: why paging wins",
        "minipaged/sim/policies.py",
        (
            _task(
                "reserve contiguous regions up front (ContiguousPolicy.admit)",
                f"{S}::test_oracle_counts_external_fragmentation_exactly",
                f"{S}::test_max_reserves_the_whole_context_window",
                f"{S}::test_pow2_reserves_the_next_power_of_two",
            ),
            _task(
                "take blocks on demand (PagedPolicy.grow)",
                f"{S}::test_paged_counts_the_partial_last_block_as_external",
                f"{S}::test_sharing_stores_the_prompt_once_and_copies_on_write",
                f"{S}::test_preemption_completes_everything",
                f"{S}::test_random_workloads_conserve_and_complete",
            ),
        ),
    ),
    Lesson(
        "09",
        "compaction",
        "detection and compaction",
        "minipaged/compaction.py",
        (
            _task(
                "missing or fragmented? (diagnose)",
                f"{C}::test_diagnose_contiguous_compares_largest_extent_with_total_free",
                f"{C}::test_diagnose_buddy_uses_the_fragmentation_index_and_threshold",
                f"{C}::test_diagnose_paged_is_never_fragmented",
            ),
            _task(
                "move memory like memmove (apply_moves)",
                f"{C}::test_apply_moves_is_a_memmove_in_both_directions",
                f"{C}::test_apply_moves_checks_every_move_first",
            ),
            _task(
                "slide allocations down (_plan_slide)",
                f"{C}::test_plan_order_matters_and_is_safe",
                f"{C}::test_pinned_allocations_stay_and_split_the_slide",
                f"{C}::TestCompactionMachine",
            ),
        ),
    ),
)


def find_lesson(number: str) -> Lesson:
    """The lesson numbered ``number`` ("2", "02" and "02_buddy" all name lesson 02)."""
    key = str(number).split("_")[0].zfill(2)
    for lesson in LESSONS:
        if lesson.number == key:
            return lesson
    known = ", ".join(lesson.number for lesson in LESSONS)
    raise InvalidRequest(f"no lesson {number!r}; the lessons are {known}")


# ----- running the checker --------------------------------------------------------------------


@dataclass
class TaskResult:
    number: int
    title: str
    tests: list[str] = field(default_factory=list)  # node ids collected for this task
    failures: dict[str, str] = field(default_factory=dict)  # node id -> readable failure

    @property
    def passed(self) -> bool:
        return bool(self.tests) and not self.failures


@dataclass
class CheckResult:
    lesson: Lesson
    file: Path
    tasks: list[TaskResult]
    error: str = ""  # the student's file could not be imported, or pytest could not run

    @property
    def passed(self) -> bool:
        return not self.error and all(t.passed for t in self.tasks)


def _keys(item: Any) -> list[str]:
    """The names a task's test patterns are matched against."""
    file = Path(str(item.fspath)).name
    if getattr(item, "cls", None) is not None and item.name == "runTest":
        return [f"{file}::{item.parent.name}"]  # a unittest TestCase: a state machine
    return [f"{file}::{getattr(item, 'originalname', item.name)}", f"{file}::{item.name}"]


def _matches(pattern: str, keys: list[str]) -> bool:
    if pattern.endswith("*"):
        return any(k.startswith(pattern[:-1]) for k in keys)
    return pattern in keys


def _invariants(module: Any) -> set[str]:
    """Names of the invariants of the state machines in a test module: Hypothesis lists them
    after every step of a failing example, which buries the steps themselves."""
    names: set[str] = set()
    for obj in vars(module).values():
        if isinstance(obj, type):
            for name, attr in vars(obj).items():
                if hasattr(attr, "hypothesis_stateful_invariant"):
                    names.add(name)
    return names


def _describe(exc: BaseException, hidden: set[str] = frozenset()) -> str:  # type: ignore[assignment]
    """A failure in words: the error, then the failing example Hypothesis shrank it to (its
    steps, without the invariant checks between them)."""
    if isinstance(exc, NotImplementedError):
        head = f"not implemented yet: {exc}"
    else:
        text = str(exc).strip()
        head = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    lines = [
        line for line in head.splitlines()[:12] if line.strip() and "Use -v to get" not in line
    ]
    where = None  # the last line of a test that the failure passed through
    tb = exc.__traceback__
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).parent == TESTS_DIR:
            where = f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}"
            where += f" in {tb.tb_frame.f_code.co_name}"
        tb = tb.tb_next
    if where:
        lines.insert(1, f"(raised at {where})")
    steps = []
    for note in getattr(exc, "__notes__", []):
        for line in note.splitlines():
            line = line.split("  # or any other generated value")[0]
            name = line.strip().removeprefix("state.").removesuffix("()")
            if (
                not line.strip()
                or "reproduce" in line
                or line.startswith("Failing test case")
                or name in hidden
                or name == "teardown"
            ):
                continue
            steps.append("  " + line)
    if steps:
        lines.append("the smallest failing example Hypothesis found:")
        lines.extend(steps[:40])
    return "\n".join(lines)


class _Plugin:
    """Keeps the lesson's tests, caps Hypothesis, and records each test's outcome per task."""

    def __init__(
        self, lesson: Lesson, results: list[TaskResult], examples: int | None, shrink: bool
    ) -> None:
        self.lesson, self.results, self.examples, self.shrink = lesson, results, examples, shrink
        self.task_of: dict[str, int] = {}

    def _settings(self, old: Any) -> Any:
        from hypothesis import HealthCheck, Phase, settings

        limit = old.max_examples if self.examples is None else min(old.max_examples, self.examples)
        return settings(
            old,
            max_examples=max(1, limit),
            derandomize=True,  # the same file gets the same verdict every time
            database=None,
            report_multiple_bugs=False,
            suppress_health_check=list(HealthCheck),
            phases=[p for p in old.phases if self.shrink or p != Phase.shrink],
        )

    def pytest_collection_modifyitems(self, session: Any, config: Any, items: list) -> None:
        keep, drop = [], []
        for item in items:
            keys = _keys(item)
            number = next(
                (
                    i
                    for i, task in enumerate(self.lesson.tasks)
                    if any(_matches(p, keys) for p in task.tests)
                ),
                None,
            )
            if number is None:
                drop.append(item)
                continue
            keep.append(item)
            self.task_of[item.nodeid] = number
            self.results[number].tests.append(item.nodeid)
            cls = getattr(item, "cls", None)
            if cls is not None and hasattr(cls, "settings") and item.name == "runTest":
                cls.settings = self._settings(cls.settings)
            func = getattr(item, "obj", None)
            inner = getattr(func, "hypothesis", None)
            if inner is not None and hasattr(func, "_hypothesis_internal_use_settings"):
                func._hypothesis_internal_use_settings = self._settings(
                    func._hypothesis_internal_use_settings
                )
        items[:] = keep
        if drop:
            config.hook.pytest_deselected(items=drop)

    def pytest_runtest_makereport(self, item: Any, call: Any) -> None:
        if call.excinfo is None or item.nodeid not in self.task_of:
            return
        if call.excinfo.errisinstance(Exception):
            task = self.results[self.task_of[item.nodeid]]
            hidden = _invariants(item.module)
            task.failures.setdefault(item.nodeid, _describe(call.excinfo.value, hidden))


@contextmanager
def _environment(path: Path, test_modules: list[str]) -> Iterator[None]:
    """Point ``under_test`` at ``path`` and make the test modules import afresh; restore all."""
    old_env = os.environ.get(FILE_ENV)
    saved = {name: sys.modules.pop(name) for name in test_modules if name in sys.modules}
    conftest = sys.modules.get("conftest")  # pytest may import tests/conftest.py again
    saved_student = sys.modules.pop(STUDENT_MODULE, None)
    os.environ[FILE_ENV] = str(path)
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop(FILE_ENV, None)
        else:
            os.environ[FILE_ENV] = old_env
        for name in test_modules:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
        if conftest is None:
            sys.modules.pop("conftest", None)
        else:
            sys.modules["conftest"] = conftest
        sys.modules.pop(STUDENT_MODULE, None)
        if saved_student is not None:
            sys.modules[STUDENT_MODULE] = saved_student


def _choose_device() -> None:
    """Kernel lessons run on a GPU when one is present and in Numba's CUDA simulator otherwise,
    decided once, before numba is first imported (the student's file may import it before
    tests/conftest.py would choose). ``MINIPAGED_GPU=0`` forces the simulator."""
    if "numba" in sys.modules:
        return
    if "MINIPAGED_GPU" not in os.environ and (
        shutil.which("nvidia-smi") or Path("/dev/nvidiactl").exists()
    ):
        os.environ["MINIPAGED_GPU"] = "1"
    if os.environ.get("MINIPAGED_GPU", "0") != "1":
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"


def check(
    number: str,
    file: str | Path | None = None,
    examples: int | None = None,
    shrink: bool = True,
) -> CheckResult:
    """Run lesson ``number``'s tests against ``file`` (default: the lesson's exercise.py).

    ``examples`` caps every Hypothesis test's number of examples (None: the tests' own counts);
    ``shrink=False`` reports failing examples as found, unshrunk (quicker, less readable).
    Returns the outcome per task; nothing is printed (see :func:`format_result`)."""
    lesson = find_lesson(number)
    path = Path(file) if file is not None else lesson.exercise
    if not path.is_file():
        raise InvalidRequest(f"no such file: {str(path)!r}")
    if examples is not None and (isinstance(examples, bool) or not isinstance(examples, int)):
        raise InvalidRequest(f"examples must be an int >= 1, got {examples!r}")
    if examples is not None and examples < 1:
        raise InvalidRequest(f"examples must be an int >= 1, got {examples!r}")
    results = [TaskResult(i + 1, t.title) for i, t in enumerate(lesson.tasks)]
    result = CheckResult(lesson, path.resolve(), results)
    _choose_device()
    modules = [Path(f).stem for f in lesson.test_files]
    with _environment(path.resolve(), modules):
        try:
            load_file(path)
        except Exception as e:  # a syntax error, a failing import: say so and stop
            result.error = f"{path} does not import: {type(e).__name__}: {e}"
            return result
        import pytest

        args = [str(TESTS_DIR / f) for f in lesson.test_files]
        args += ["-q", "-p", "no:cacheprovider", "-p", "no:randomly", "--rootdir", str(ROOT)]
        args += ["-o", "addopts=", "--no-header", "-W", "ignore::DeprecationWarning"]
        plugin = _Plugin(lesson, results, examples, shrink)
        with open(os.devnull, "w") as devnull:
            old_out, old_err = sys.stdout, sys.stderr
            sys.stdout = sys.stderr = devnull
            try:
                code = pytest.main(args, plugins=[plugin])
            finally:
                sys.stdout, sys.stderr = old_out, old_err
        if int(code) not in (0, 1):  # 2: interrupted, 3: internal error, 4: usage, 5: no tests
            result.error = f"pytest could not run the tests (exit code {int(code)})"
    return result


def format_result(result: CheckResult, verbose: bool = False) -> str:
    """The report a student reads: per task, pass, or the first failure in words."""
    lesson = result.lesson
    try:
        shown = result.file.relative_to(Path.cwd())
    except ValueError:
        shown = result.file
    lines = [f"lesson {lesson.number}: {lesson.title}", f"checking {shown}", ""]
    if result.error:
        return "\n".join([*lines, f"error: {result.error}"])
    for t in result.tasks:
        n = len(t.tests)
        if t.passed:
            lines.append(f"task {t.number}: {t.title}: pass ({n} test{'s' * (n != 1)})")
            continue
        if not t.tests:
            lines.append(f"task {t.number}: {t.title}: FAIL (no tests collected)")
            continue
        lines.append(f"task {t.number}: {t.title}: FAIL ({len(t.failures)} of {n} tests)")
        # Show a failure Hypothesis shrank to an example when there is one: it is the smallest.
        failures = sorted(t.failures.items(), key=lambda kv: "Hypothesis found" not in kv[1])
        shown_failures = failures if verbose else failures[:1]
        for nodeid, text in shown_failures:
            lines.append(f"  {nodeid.split('/')[-1]}")
            lines.append(textwrap.indent(text, "    "))
        rest = len(failures) - len(shown_failures)
        if rest:
            lines.append(f"  ... and {rest} more failing test{'s' * (rest != 1)} (-v shows them)")
    done = sum(t.passed for t in result.tasks)
    lines += ["", f"{done} of {len(result.tasks)} tasks pass"]
    return "\n".join(lines)


# ----- the command line -------------------------------------------------------------------


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``minipaged lesson list`` and ``minipaged lesson check``."""
    p = subparsers.add_parser(
        "lesson",
        help="the course: list the lessons, check an exercise",
        description="The course in lessons/: list the lessons or check a lesson's exercise.",
    )
    sub = p.add_subparsers(dest="lesson_command", metavar="ACTION")
    sub.required = True
    sub.add_parser("list", help="list the lessons and their tasks").set_defaults(func=_list)
    c = sub.add_parser(
        "check",
        help="run a lesson's tests against an exercise file",
        description=(
            "Run the library's own tests for lesson NN against a file (default: the lesson's "
            "exercise.py) and report, per task, pass or the smallest failing example. Kernel "
            "lessons run on a GPU when one is present, else in Numba's CUDA simulator "
            "(MINIPAGED_GPU=0 forces the simulator)."
        ),
    )
    c.add_argument("number", help="the lesson, e.g. 02")
    c.add_argument("--file", help="the file to check (default: lessons/NN_name/exercise.py)")
    c.add_argument("--reference", action="store_true", help="check the library's own code")
    c.add_argument("--examples", type=int, help="cap Hypothesis examples per test (faster)")
    c.add_argument(
        "--no-shrink",
        action="store_true",
        help="report failing examples as found, unshrunk (faster; shrinking a failure can "
        "take a minute)",
    )
    c.add_argument("-v", "--verbose", action="store_true", help="show every failing test")
    c.set_defaults(func=_check)


def _list(args: argparse.Namespace) -> int:
    for lesson in LESSONS:
        print(f"{lesson.number}  {lesson.title}  (lessons/{lesson.folder.name}/)")
        for i, task in enumerate(lesson.tasks, 1):
            print(f"      task {i}: {task.title}")
    return 0


def _check(args: argparse.Namespace) -> int:
    try:
        lesson = find_lesson(args.number)
        file = ROOT / lesson.reference if args.reference else args.file
        result = check(lesson.number, file, args.examples, shrink=not args.no_shrink)
    except InvalidRequest as e:
        print(f"minipaged lesson check: error: {e}", file=sys.stderr)
        return 2
    print(format_result(result, args.verbose))
    return 0 if result.passed else 1
