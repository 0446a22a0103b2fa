"""``tox -e mutation [-- PATH ...]``: mutmut 3 over fastdeploy_patch/ (or the modules at PATH) with the unit suite.

Starts from a fresh ``mutants/`` copy, so that no result of an earlier tree is reused. mutmut's own progress lines go
to ``mutants/mutmut-run.log``; this prints each mutant that was not killed, then killed/total per module. Exit code:
mutmut's (non-zero when the clean run of the unit suite fails); survivors are reported, not failed on.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
from pathlib import Path

RESULT = re.compile(r"^\s*(?P<name>\S+)__mutmut_\d+: (?P<status>.+)$")


def module_glob(path: str) -> str:
    """mutmut's name pattern for every mutant of the module at ``path`` (``a/b.py`` -> ``a.b.*``)."""
    return path.removesuffix(".py").replace("/", ".") + ".*"


def module_of(function: str, modules: list[str]) -> str:
    """The module among ``modules`` (dotted) that a mangled function name belongs to."""
    return max((m for m in modules if function.startswith(m + ".")), key=len, default=function.rsplit(".", 1)[0])


def main(paths: list[str]) -> int:
    shutil.rmtree("mutants", ignore_errors=True)
    Path("mutants").mkdir()
    globs = [module_glob(path) for path in paths]
    with open("mutants/mutmut-run.log", "w") as log:
        ran = subprocess.run(["mutmut", "run", *globs], stdout=log, stderr=subprocess.STDOUT, check=False)
    if ran.returncode != 0:
        print(Path("mutants/mutmut-run.log").read_text(errors="replace")[-4000:])
        print(f"mutation: mutmut run failed (exit {ran.returncode}); full log in mutants/mutmut-run.log")
        return ran.returncode
    listed = subprocess.run(["mutmut", "results", "--all", "true"], capture_output=True, text=True, check=True)
    modules = [g.removesuffix(".*") for g in globs]
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in listed.stdout.splitlines():
        found = RESULT.match(line)
        if found is None or found["status"] == "not checked":
            continue
        counts[module_of(found["name"], modules)][found["status"]] += 1
        if found["status"] != "killed":
            print(line.strip())
    for module, statuses in sorted(counts.items()):
        print(f"mutation: {module}: {statuses['killed']}/{sum(statuses.values())} killed ({dict(statuses)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
