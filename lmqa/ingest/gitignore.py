"""Git's ignore rules for a tree walk, with one .gitignore per directory level.

Git lets a deeper .gitignore override a shallower one (including with "!"
negations), and within one file the last matching pattern wins; pathspec's
GitIgnoreSpec implements the latter, this stack the former. Only .gitignore
files inside the walked root count: the root is taken as the whole project.
"""

from __future__ import annotations

from pathlib import Path

from pathspec import GitIgnoreSpec


class IgnoreRules:
    def __init__(self, levels: tuple[tuple[str, GitIgnoreSpec], ...] = ()):
        self._levels = levels

    def enter(self, directory: Path, rel: str) -> IgnoreRules:
        """The rules for directory's contents: ours plus its own .gitignore.

        A symlinked .gitignore is not read, for the same reason symlinks out
        of the root are never followed.
        """
        ignore_file = directory / ".gitignore"
        if ignore_file.is_symlink() or not ignore_file.is_file():
            return self
        try:
            lines = ignore_file.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return self
        return IgnoreRules((*self._levels, (rel, GitIgnoreSpec.from_lines(lines))))

    def ignored(self, rel: str, is_dir: bool) -> bool:
        """rel: path from the root, "/"-separated."""
        for base, spec in reversed(self._levels):
            below = rel[len(base) + 1:] if base else rel
            verdict = spec.check_file(below + "/" if is_dir else below).include
            if verdict is not None:
                return verdict
        return False
