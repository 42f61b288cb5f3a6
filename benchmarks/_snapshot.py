"""A frozen copy of the vaezip package for a benchmark run.

The working tree is edited while long benchmarks run; a file encoded by one version of
the code and decoded by another fails its checksum. So a run copies the package once
(from a git commit or the working tree) into a temporary folder laid out as `vaezip/`,
`vaezip/cli/`, `vaezip/models/`, and puts that folder first on `sys.path` and on the
subprocesses' PYTHONPATH (ahead of the editable install's finder, which setuptools
appends to `sys.meta_path`).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYOUT = {"codec": "vaezip", "cli": "vaezip/cli", "models": "vaezip/models"}
OVERLAY = {"codec/evaluation/baselines.py": "vaezip/evaluation/baselines.py"}
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout


def make(kind: str, root: Path) -> dict:
    """Copy the package into `root` and activate it in this process.

    Args:
        kind: "head" (the committed code of git HEAD), "worktree" (the files as they are
            now, uncommitted edits included) or "installed" (no copy: whatever
            `import vaezip` finds; edits during the run can break it).
        root: An empty folder that outlives the run.

    Returns:
        A JSON-able description: kind, git commit, uncommitted files, sha256 of the copy,
        and `env` (environment variables for subprocesses).
    """
    head = _git("rev-parse", "HEAD").strip()
    dirty = [line for line in _git("status", "--porcelain", "--", *LAYOUT).splitlines() if line.strip()]
    info = {"kind": kind, "git_head": head, "uncommitted_in_package": dirty if kind != "head" else [],
            "env": dict(os.environ)}
    if kind == "installed":
        info["path"] = None
        return info
    src = root / "src"
    src.mkdir(parents=True)
    if kind == "head":
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", head, *LAYOUT],
                                 capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(src, filter="data")
    elif kind == "worktree":
        for folder in LAYOUT:
            shutil.copytree(REPO / folder, src / folder, ignore=IGNORE)
    else:
        raise ValueError(f"unknown code kind {kind!r}")
    pkg = root / "pkg"
    for folder, target in LAYOUT.items():
        shutil.copytree(src / folder, pkg / target, ignore=IGNORE)
    # the benchmarks' own helper, needed even when it is not committed yet
    info["added_from_worktree"] = []
    for rel, target in OVERLAY.items():
        if not (pkg / target).exists():
            shutil.copyfile(REPO / rel, pkg / target)
            info["added_from_worktree"].append(rel)
    digest = hashlib.sha256()
    for path in sorted(p for p in pkg.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(pkg)).encode() + b"\0" + path.read_bytes())
    info["path"] = str(pkg)
    info["sha256"] = digest.hexdigest()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(pkg), *filter(None, [env.get("PYTHONPATH")])])
    info["env"] = env
    sys.path.insert(0, str(pkg))
    import vaezip
    import vaezip.evaluation.baselines

    for module in (vaezip, vaezip.evaluation.baselines):
        if not Path(module.__file__).resolve().is_relative_to(pkg.resolve()):
            raise SystemExit(f"snapshot not active: {module.__name__} imported from {module.__file__}")
    probe = subprocess.run([sys.executable, "-c", "import vaezip.cli.main, vaezip; print(vaezip.__file__)"],
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    if not Path(probe).resolve().is_relative_to(pkg.resolve()):
        raise SystemExit(f"snapshot not active in subprocesses: vaezip imported from {probe}")
    return info


def public(info: dict) -> dict:
    """`info` without the environment (for JSON output)."""
    return {k: v for k, v in info.items() if k != "env"}
