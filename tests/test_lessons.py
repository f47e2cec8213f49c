"""The course's guarantees: the library passes every lesson's checker, every untouched skeleton
fails it task by task, planted bugs are caught with a readable message, and the pictures in the
lessons' READMEs are what the library draws now.

Checker runs here cap Hypothesis at a few examples (``examples=``) and run kernels on tiny shapes
in the CUDA simulator, so the whole file stays well under a few minutes."""

from __future__ import annotations

import importlib.util
import os
import re
import sys

import pytest

from minipaged.cli import main
from minipaged.errors import InvalidRequest
from minipaged.lessons import (
    FILE_ENV,
    LESSONS,
    LESSONS_DIR,
    ROOT,
    STUDENT_MODULE,
    TESTS_DIR,
    check,
    find_lesson,
    format_result,
)

EXAMPLES = 3


def ready(lesson) -> bool:
    """A lesson's checker can reach the student's file only through test modules that name
    their code under test with ``under_test``."""
    return all("under_test(" in (TESTS_DIR / f).read_text() for f in lesson.test_files)


LESSON_IDS = [pytest.param(x, id=f"{x.number}_{x.name}") for x in LESSONS]


def skip_unless_ready(lesson) -> None:
    if not ready(lesson):
        pytest.skip(f"{lesson.test_files} do not call under_test yet")


@pytest.mark.parametrize("lesson", LESSON_IDS)
def test_the_library_passes_every_task(lesson):
    skip_unless_ready(lesson)
    result = check(lesson.number, ROOT / lesson.reference, examples=EXAMPLES)
    assert not result.error, result.error
    for task in result.tasks:
        assert task.tests, f"lesson {lesson.number} task {task.number} collected no test"
        assert task.passed, format_result(result, verbose=True)


@pytest.mark.parametrize("lesson", LESSON_IDS)
def test_the_untouched_skeleton_fails_task_by_task(lesson):
    skip_unless_ready(lesson)
    result = check(lesson.number, examples=EXAMPLES, shrink=False)
    assert not result.error, result.error
    assert len(result.tasks) == len(lesson.tasks)
    for task in result.tasks:
        assert task.tests, f"task {task.number} collected no test"
        assert task.failures, f"task {task.number} passed on the untouched skeleton"
        # the failures come from the skeleton's holes, i.e. the checker calls the student's code
        assert any("not implemented yet: " in text for text in task.failures.values())
    assert not result.passed
    text = format_result(result)
    assert "FAIL" in text and "0 of" in text


def test_each_exercise_has_its_holes_and_a_readme():
    for lesson in LESSONS:
        assert (lesson.folder / "README.md").is_file(), lesson.folder
        source = lesson.exercise.read_text()
        assert 2 <= len(lesson.tasks) <= 5
        for n in range(1, len(lesson.tasks) + 1):
            assert f'NotImplementedError("task {n}: ' in source, (lesson.number, n)
            assert f"# TODO task {n} " in source, (lesson.number, n)
        assert f"minipaged lesson check {lesson.number}" in source


# ----- planted bugs -----------------------------------------------------------------------------


def plant(tmp_path, library_file: str, old: str, new: str):
    """A copy of a library file with one bug planted."""
    source = (ROOT / library_file).read_text()
    assert source.count(old) == 1, old
    path = tmp_path / "planted.py"
    path.write_text(source.replace(old, new))
    return path


def test_a_buddy_free_that_never_merges_is_caught(tmp_path):
    path = plant(
        tmp_path,
        "minipaged/alloc/buddy.py",
        "if not self._is_free(buddy, order):",
        "if True:  # planted: never merge",
    )
    result = check("02", path, examples=25)
    take, free = result.tasks[1], result.tasks[2]
    assert result.tasks[0].passed and take.passed
    assert not free.passed
    text = format_result(result)
    assert "task 3: free a block and merge it with its buddy (free): FAIL" in text
    assert "the smallest failing example Hypothesis found:" in text
    assert "state.setup(" in text  # the steps of the example, not Hypothesis internals
    assert "state.pages_add_up()" not in text  # invariant checks are left out


def test_a_block_table_off_by_one_is_caught(tmp_path):
    path = tmp_path / "planted.py"
    path.write_text(
        "from minipaged import block_manager as library\n"
        "from minipaged.block_manager import same_prefix  # noqa: F401\n\n\n"
        "class BlockManager(library.BlockManager):\n"
        "    def slot_mapping(self, seq_id, positions=None):\n"
        "        return super().slot_mapping(seq_id, positions) + 1  # planted: off by one\n"
    )
    result = check("04", path, examples=EXAMPLES, shrink=False)
    assert not result.tasks[0].passed
    assert result.tasks[1].passed
    text = format_result(result)
    assert "task 1: token positions to slots (slot_mapping): FAIL" in text
    assert "AssertionError" in text and "test_block_table_and_slot_mapping" in text


def test_a_free_queue_in_the_wrong_order_is_caught(tmp_path):
    path = plant(
        tmp_path,
        "minipaged/alloc/paged.py",
        "            self._free[b] = None\n",
        "            self._free[b] = None\n            self._free.move_to_end(b, last=False)\n",
    )
    result = check("03", path, examples=EXAMPLES)
    assert not result.tasks[0].passed
    assert "FAIL" in format_result(result)


def test_a_file_that_does_not_import_is_reported(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def oops(:\n")
    result = check("02", path)
    assert not result.passed and "does not import: SyntaxError" in result.error
    assert "error: " in format_result(result)


def test_the_checker_leaves_the_process_as_it_found_it(tmp_path):
    before = {name: sys.modules.get(name) for name in ("test_buddy", "conftest")}
    check("02", ROOT / "minipaged/alloc/buddy.py", examples=1)
    assert FILE_ENV not in os.environ
    assert STUDENT_MODULE not in sys.modules
    assert {name: sys.modules.get(name) for name in before} == before


def test_bad_arguments():
    with pytest.raises(InvalidRequest, match="'99'"):
        find_lesson("99")
    with pytest.raises(InvalidRequest, match="no such file"):
        check("02", "/nonexistent/exercise.py")
    with pytest.raises(InvalidRequest, match="0"):
        check("02", examples=0)
    assert find_lesson("2") is find_lesson("02_buddy") is LESSONS[1]


# ----- the command line -------------------------------------------------------------------------


def test_cli_list(capsys):
    assert main(["lesson", "list"]) == 0
    out = capsys.readouterr().out
    for lesson in LESSONS:
        assert f"{lesson.number}  {lesson.title}" in out
    assert "task 1: cover the arena with aligned blocks (__init__)" in out


def test_cli_check(capsys):
    assert main(["lesson", "check", "02", "--reference", "--examples", "2"]) == 0
    assert "3 of 3 tasks pass" in capsys.readouterr().out
    assert main(["lesson", "check", "01", "--examples", "1", "--no-shrink"]) == 1
    assert "not implemented yet: task 1: internal_fragmentation" in capsys.readouterr().out
    assert main(["lesson", "check", "42"]) == 2
    assert "no lesson '42'" in capsys.readouterr().err


# ----- the pictures -----------------------------------------------------------------------------


def load_make_pictures():
    spec = importlib.util.spec_from_file_location("make_pictures", LESSONS_DIR / "make_pictures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readmes_show_what_the_library_draws_now():
    make_pictures = load_make_pictures()
    assert make_pictures.stale() == []
    # every picture a README embeds is one the script draws, and every drawn one is embedded
    embedded = set()
    for readme in LESSONS_DIR.glob("*/README.md"):
        embedded |= set(re.findall(r"<!-- picture: (\S+) -->", readme.read_text()))
    assert embedded == set(make_pictures.PICTURES)
