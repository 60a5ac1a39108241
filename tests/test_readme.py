"""README.md's code blocks, run as written, so that they cannot rot.

Every fenced block in the README names its language and, after it, optional marks, e.g. ```` ```bash hub gpu ````:

=========  ================================================================================================
mark       meaning
=========  ================================================================================================
(none)     run by this test
``setup``  run once per test session, before the others: it writes the ``deeptalk_output/`` they use
``hub``    needs the Hugging Face Hub; an offline twin (a block of the same language that this test runs,
           or the setup block) sits right before or after it
``gpu``    needs a CUDA GPU
``slow``   takes minutes, starts several processes, or downloads (installs, benchmarks, the test suite)
=========  ================================================================================================

Readers do not see the marks, so every skipped block outside the set-up section starts with a comment saying what
it needs (checked here).

Languages: ``bash`` blocks run through ``bash -e -o pipefail``, ``python`` blocks in a fresh interpreter;
``text`` blocks are shown output and only read; ``json`` blocks must parse (one document, or JSON Lines),
``yaml`` blocks too.

Blocks run section by section: one ``##`` section is one test, its runnable blocks in order, in a fresh working
directory that looks like a clone (the repository's top-level files and folders are linked in) and whose
``deeptalk_output`` links to the setup block's output. Each block sees the package of this checkout
(``PYTHONPATH``), the ``deeptalk`` command next to this Python, ``HF_HUB_OFFLINE=1`` and one torch thread.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
LANGUAGES = {"bash", "python", "text", "json", "yaml"}
RUNNABLE = {"bash", "python"}
MARKS = {"setup", "hub", "gpu", "slow"}
SKIPPING = {"hub", "gpu", "slow"}
BLOCK_TIMEOUT = 900
# Pages under docs/ that are written alongside the README and may land after it: a missing one is not an error.
DOCS_WRITTEN_ALONGSIDE = {"docs/quickstart_results.md", "docs/retention.md", "docs/data.md"}
# Words of a project diary, not of a software README.
HISTORY = re.compile(r"\bissue #?\d|\bthis (session|task|container)\b|\buntil now\b|\bno GPU (machine )?(was )?lent\b",
                     re.IGNORECASE)


@dataclass
class Block:
    section: str
    language: str
    marks: frozenset
    code: str
    line: int  # of the opening fence, 1-based

    @property
    def runnable(self) -> bool:
        return self.language in RUNNABLE and not self.marks & (SKIPPING | {"setup"})

    def where(self) -> str:
        return f"README.md:{self.line} ({self.section}, ```{self.language} {' '.join(sorted(self.marks))})"


def parse_readme(text: str) -> list[Block]:
    """Every fenced block with its `##` section. Fences must start at column 0 (checked)."""
    blocks, section, lines = [], "(top)", text.splitlines()
    number = 0
    while number < len(lines):
        line = lines[number]
        if line.startswith("## "):
            section = line[3:].strip()
        stripped = line.lstrip()
        if stripped.startswith("```"):
            if stripped != line:
                raise AssertionError(f"README.md:{number + 1}: indented code fence; start fences at column 0")
            words = line[3:].split()
            if not words:
                raise AssertionError(f"README.md:{number + 1}: a code block without a language")
            end = next((i for i in range(number + 1, len(lines)) if lines[i].startswith("```")), None)
            if end is None:
                raise AssertionError(f"README.md:{number + 1}: unclosed code block")
            blocks.append(Block(section, words[0], frozenset(words[1:]), "\n".join(lines[number + 1:end]) + "\n",
                                number + 1))
            number = end
        number += 1
    return blocks


BLOCKS = parse_readme(README.read_text())
SECTIONS = list(dict.fromkeys(b.section for b in BLOCKS if b.runnable))


# ---------------------------------------------------------------------------------------------- static checks


def test_every_block_has_a_known_language_and_marks():
    for block in BLOCKS:
        assert block.language in LANGUAGES, f"{block.where()}: language must be one of {sorted(LANGUAGES)}"
        assert block.marks <= MARKS, f"{block.where()}: unknown marks {sorted(block.marks - MARKS)}"
        assert not block.marks or block.language in RUNNABLE, (
            f"{block.where()}: only bash and python blocks carry marks"
        )
    assert len([b for b in BLOCKS if "setup" in b.marks]) == 1, "exactly one setup block"


def test_skipped_blocks_say_why_in_their_first_line():
    """Readers do not see the marks (GitHub shows only the language): a skipped block's first line tells them."""
    first_section = BLOCKS[0].section
    words = {"hub": "the Hub", "gpu": "GPU", "slow": ("minute", "download", "process")}
    for block in BLOCKS:
        if block.section == first_section or not block.marks & SKIPPING:
            continue
        first = block.code.splitlines()[0]
        assert first.startswith("#"), f"{block.where()}: start with a comment saying what it needs"
        for mark in sorted(block.marks & SKIPPING):
            if mark == "slow" and block.marks & {"hub", "gpu"}:
                continue  # a Hub checkpoint or a GPU says enough
            expected = words[mark] if isinstance(words[mark], tuple) else (words[mark],)
            assert any(w in first for w in expected), f"{block.where()}: the first line should say {expected[0]!r}"


def test_every_hub_block_has_an_offline_twin_next_to_it():
    for index, block in enumerate(BLOCKS):
        if "hub" not in block.marks:
            continue
        neighbours = [BLOCKS[i] for i in (index - 1, index + 1) if 0 <= i < len(BLOCKS)]
        twins = [b for b in neighbours if b.section == block.section and b.language == block.language
                 and (b.runnable or "setup" in b.marks)]
        assert twins, f"{block.where()}: needs a Hub; put an offline twin that runs right before or after it"


def test_set_up_section_holds_the_main_job_and_ci_test_command():
    first = next(line[3:].strip() for line in README.read_text().splitlines() if line.startswith("## "))
    commands = [b.code.strip() for b in BLOCKS if b.section == first]
    assert commands == ['pip install -e ".[whisper]" && deeptalk quickstart',
                        'pip install -e ".[test]" && python -m pytest -q -n 2'], commands
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci, ".ci/run must run the README's test command, character for character"


def test_data_blocks_parse():
    for block in BLOCKS:
        if block.language == "json":
            try:
                json.loads(block.code)
            except json.JSONDecodeError:
                for line in block.code.splitlines():
                    if line.strip():
                        json.loads(line)
        elif block.language == "yaml":
            yaml.safe_load(block.code)


def test_readme_is_about_the_software():
    for number, line in enumerate(README.read_text().splitlines(), 1):
        assert not HISTORY.search(line), f"README.md:{number}: development history: {line.strip()}"


def test_local_links_and_example_files_exist():
    text = README.read_text()
    targets = {t for t in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if "://" not in t}
    pages = {f"docs/{page.name}" for page in (REPO / "docs").glob("*.md")} | DOCS_WRITTEN_ALONGSIDE
    assert pages <= targets, f"the README links to no {sorted(pages - targets)}"
    for target in sorted(targets - DOCS_WRITTEN_ALONGSIDE):
        assert (REPO / target).exists(), f"README links to {target}, which does not exist"
    anchors = {re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
               for line in text.splitlines() if line.startswith("#")}
    for anchor in re.findall(r"\]\(#([^)]+)\)", text):
        assert anchor in anchors, f"README links to #{anchor}, which is no heading"
    for path in sorted(set(re.findall(r"examples/[\w./-]+\.(?:jsonl|yaml|flac|py)", text))):
        assert (REPO / path).is_file(), f"README names {path}, which is not shipped"


def test_example_data_is_what_its_script_writes(tmp_path):
    """examples/data is generated by examples/make_example_data.py from the demo corpus: shipped = regenerated."""
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import make_example_data
    finally:
        sys.path.remove(str(REPO / "examples"))
    make_example_data.build(tmp_path / "data")
    shipped = REPO / "examples" / "data"
    generated = sorted(p.relative_to(tmp_path / "data") for p in (tmp_path / "data").rglob("*") if p.is_file())
    assert generated == sorted(p.relative_to(shipped) for p in shipped.rglob("*") if p.is_file())
    for relative in generated:
        assert (shipped / relative).read_bytes() == (tmp_path / "data" / relative).read_bytes(), relative


# ---------------------------------------------------------------------------------------------- running


def block_env() -> dict:
    env = dict(os.environ)
    env.pop("DEEPTALK_HOME", None)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
               PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    return env


def run_block(block: Block, cwd: Path, scratch: Path) -> None:
    if block.language == "bash":
        argv = ["bash", "-e", "-o", "pipefail", "-c", block.code]
    else:
        script = scratch / f"readme_line_{block.line}.py"
        script.write_text(block.code)
        argv = [sys.executable, str(script)]
    result = subprocess.run(argv, cwd=cwd, env=block_env(), capture_output=True, text=True, timeout=BLOCK_TIMEOUT,
                            check=False)
    if result.returncode != 0:
        pytest.fail(f"{block.where()} exited with {result.returncode}:\n{block.code}\n--- stdout ---\n"
                    f"{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-6000:]}", pytrace=False)


def clone_view(folder: Path) -> None:
    """Link the repository's top-level entries into `folder`, as a fresh clone would have them."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in REPO.iterdir():
        skipped = entry.name in {"deeptalk_output", "build", "dist"} or entry.suffix == ".egg-info"
        if entry.name.startswith(".") or skipped:
            continue
        (folder / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())


@pytest.fixture(scope="session")
def quickstart_output(tmp_path_factory, request) -> Path:
    """The setup block's `deeptalk_output/`, made once per session (shared by pytest-xdist workers)."""
    from filelock import FileLock

    if shutil.which("deeptalk", path=os.path.dirname(sys.executable)) is None:
        pytest.fail("the `deeptalk` command is not installed next to this Python: pip install -e .", pytrace=False)
    root = tmp_path_factory.getbasetemp()
    if hasattr(request.config, "workerinput"):  # a pytest-xdist worker: share the folder above the workers' own
        root = root.parent
    session = root / "readme_setup"
    with FileLock(str(root / "readme_setup.lock")):
        done = session / "done"
        if not done.exists():
            if session.exists():
                shutil.rmtree(session)
            clone_view(session)
            (block,) = [b for b in BLOCKS if "setup" in b.marks]
            run_block(block, session, root)
            done.touch()
    return session / "deeptalk_output"


@pytest.mark.parametrize("section", SECTIONS)
def test_section_runs_as_written(section, quickstart_output, tmp_path):
    workdir = tmp_path / "clone"
    clone_view(workdir)
    (workdir / "deeptalk_output").symlink_to(quickstart_output, target_is_directory=True)
    for block in BLOCKS:
        if block.section == section and block.runnable:
            run_block(block, workdir, tmp_path)
