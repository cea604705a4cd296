"""The documents follow the code: the README names every flag, and every reference to a section
of README.md or RESULTS.md (in the code and the documents) names a section that exists."""
import glob
import os
import re
from dataclasses import fields

from data import TASKS, task_flags
from config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_the_readme_flag_table_names_every_flag():
    table = read("README.md").split("## Flags", 1)[1].split("\n## ", 1)[0]
    names = [f.name for f in fields(Config) if "group" in f.metadata] + [k for t in TASKS for k in task_flags(t)]
    missing = [n for n in names if not re.search(rf"`--(no-)?{n.replace('_', '-')}\b", table)]
    assert not missing, f"README.md's Flags section does not name: {missing}"


def test_the_readme_task_list_names_every_task():
    tasks = read("README.md").split("## Tasks", 1)[1].split("\n## ", 1)[0]
    missing = [t for t in TASKS if f"**{t}**" not in tasks]
    assert not missing, f"README.md's Tasks section does not name: {missing}"


def test_references_to_sections_name_sections_that_exist():
    headings = {doc: set(re.findall(r"^#+ (.+)$", read(doc), re.M)) for doc in ("README.md", "RESULTS.md")}
    files = [*glob.glob(os.path.join(ROOT, "*.py")), *glob.glob(os.path.join(ROOT, "research", "*.py")),
             *glob.glob(os.path.join(ROOT, "*.md"))]
    bad = []
    for path in files:
        text = " ".join(read(path).split())  # a reference may be wrapped over lines
        for doc, section in re.findall(r"\b(README|RESULTS)(?:\.md)?,? \"([^\"]+)\"", text):
            if section not in headings[f"{doc}.md"]:
                bad.append(f"{os.path.relpath(path, ROOT)}: {doc}, \"{section}\"")
    assert not bad, bad


def test_every_command_in_the_readme_names_a_script_that_exists():
    for module in re.findall(r"python -m (research\.\w+)", read("README.md")):
        assert os.path.exists(os.path.join(ROOT, *module.split(".")) + ".py"), module
    for script in re.findall(r"python (\w+\.py)", read("README.md")):
        assert os.path.exists(os.path.join(ROOT, script)), script
