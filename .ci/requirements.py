"""Print the third-party requirements of cxrbench's distributions, one per line, for ``pip install -r``.

CI's full stage installs these with pip (which honours the machine's pip configuration: version caps, local wheels),
then the distributions themselves as editable installs without dependencies. Our own distributions are left out
and their extras expanded. Usage: python .ci/requirements.py PYPROJECT[EXTRAS]... (e.g. pyproject.toml[test]).
"""

import re
import sys
import tomllib
from pathlib import Path

REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9._-]+)\s*(?:\[([^\]]*)\])?")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(arguments: list[str]) -> None:
    projects = {}
    wanted = []
    for argument in arguments:
        path, _, extras = argument.partition("[")
        project = tomllib.loads(Path(path).read_text(encoding="utf-8"))["project"]
        projects[canonical(project["name"])] = project
        wanted.append((canonical(project["name"]), [e for e in extras.rstrip("]").split(",") if e]))
    found: set[str] = set()
    seen: set[tuple[str, str]] = set()
    while wanted:
        name, extras = wanted.pop()
        project = projects[name]
        for extra in [None, *extras]:
            if (name, extra or "") in seen:
                continue
            seen.add((name, extra or ""))
            for requirement in project["optional-dependencies"][extra] if extra else project["dependencies"]:
                match = REQUIREMENT.match(requirement)
                other = canonical(match.group(1))
                if other in projects:
                    wanted.append((other, [e.strip() for e in (match.group(2) or "").split(",") if e.strip()]))
                else:
                    found.add(requirement.strip())
    print("\n".join(sorted(found, key=str.lower)))


if __name__ == "__main__":
    main(sys.argv[1:])
